//! Cold starts, routing and failures against the real Docker engine and a local registry.

use crate::common;

use std::time::Duration;

use common::{docker, docker_ok, json, Fixtures, Pipes};

const DOMAIN: &str = "example.com";

#[tokio::test]
async fn serves_a_cold_deployment_then_reuses_its_container() {
    if common::skip() {
        return;
    }
    let (f, pipes, host) = common::serving_app(&[]);

    let (status, body) = json(pipes.get(&host, "/hello?x=1").await).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["id"], "v1");
    assert_eq!(body["path"], "/hello?x=1");
    assert!(body["host"].as_str().unwrap().starts_with(&host), "{body}");
    assert_eq!(body["headers"]["x-forwarded-for"], "127.0.0.1");

    let (status, again) = json(pipes.get(&host, "/").await).await;
    assert_eq!(status, 200);
    assert_eq!(again["id"], "v1");
    assert_eq!(pipes.containers().len(), 1, "one container for one deployment");
    // The engine knows the container by Pipes' labels.
    let id = &pipes.containers()[0];
    let labels = docker_ok(&["inspect", "-f", "{{json .Config.Labels}}", id]);
    let labels: serde_json::Value = serde_json::from_str(&labels).unwrap();
    assert_eq!(labels["pipes.managed"], "true");
    assert_eq!(labels["pipes.deployment"], format!("{}/app:v1", f.user));
    assert_eq!(labels["pipes.test"], common::env().run.as_str());
    assert!(labels["pipes.config-hash"].as_str().is_some_and(|h| h.len() == 16));
    // Beside the engine, Pipes reaches the container at its IP on the
    // instance's network: nothing published, no port proxy in between. The
    // one connection open to the container is Pipes' own, to that IP.
    let ports = docker_ok(&["inspect", "-f", "{{json .HostConfig.PortBindings}}", id]);
    assert!(matches!(ports.as_str(), "{}" | "null"), "published: {ports}");
    let ip = pipes.container_ip(id);
    let port: u16 = labels["pipes.port"].as_str().and_then(|p| p.parse().ok()).expect("port label");
    assert!(common::established_to(ip, port), "a kept-alive connection to {ip}:{port}");
}

#[tokio::test]
async fn published_ports_when_asked() {
    if common::skip() {
        return;
    }
    let (_f, pipes, host) = common::serving_app(&[("PIPES_PUBLISH_PORTS", Some("true"))]);
    let (status, body) = json(pipes.get(&host, "/").await).await;
    assert_eq!(status, 200, "{body}");
    // The container publishes its port on 127.0.0.1, on its instance's
    // network still, and Pipes goes through that port.
    let id = &pipes.containers()[0];
    let published = common::published(id, "80/tcp");
    pipes.container_ip(id);
    assert!(common::established_to(std::net::Ipv4Addr::LOCALHOST, published), "a kept-alive connection to 127.0.0.1:{published}");
    assert!(pipes.log().contains("containers are reached on 127.0.0.1 at published ports"), "{}", pipes.log());
}

#[tokio::test]
async fn three_domain_levels_dotted_tags_and_latest() {
    if common::skip() {
        return;
    }
    let mut f = Fixtures::new();
    f.serving("app", "1.2.3");
    f.serving("app", "latest");
    let pipes = Pipes::start(&[("DOMAINLEVELS", Some("3"))]);

    let dotted = f.host("app", "1.2.3", "pipe.example.com");
    let (status, body) = json(pipes.get(&dotted, "/").await).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["id"], "1.2.3");

    let latest = format!("app.{}.pipe.example.com", f.user);
    let (status, body) = json(pipes.get(&latest, "/").await).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["id"], "latest");
    assert_eq!(pipes.containers().len(), 2);
}

#[tokio::test]
async fn credentials_can_come_from_files() {
    if common::skip() {
        return;
    }
    let mut f = Fixtures::new();
    f.serving("app", "v1");
    let dir = std::env::temp_dir().join(common::unique("secrets"));
    std::fs::create_dir_all(&dir).unwrap();
    let user_file = dir.join("user");
    let password_file = dir.join("password");
    std::fs::write(&user_file, format!("{}\n", common::env().user)).unwrap();
    std::fs::write(&password_file, format!("{}\n", common::env().password)).unwrap();
    let pipes = Pipes::start(&[
        ("DOCKER_AUTH_USERNAME", None),
        ("DOCKER_AUTH_PASSWORD", None),
        ("DOCKER_AUTH_USERNAME_FILE", Some(user_file.to_str().unwrap())),
        ("DOCKER_AUTH_PASSWORD_FILE", Some(password_file.to_str().unwrap())),
    ]);
    let (status, body) = json(pipes.get(&f.host("app", "v1", DOMAIN), "/").await).await;
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["id"], "v1");
}

#[tokio::test]
async fn wrong_credentials_are_a_502_and_start_nothing() {
    if common::skip() {
        return;
    }
    let mut f = Fixtures::new();
    f.serving("app", "v1");
    let wrong = "not-the-password-4711";
    let pipes = Pipes::start(&[("DOCKER_AUTH_PASSWORD", Some(wrong))]);
    let resp = pipes.get(&f.host("app", "v1", DOMAIN), "/").await;
    let (status, body) = json(resp).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"], "registry_auth");
    // The public is not told the registry or the user; the log is.
    assert!(!body.to_string().contains(common::env().registry.as_str()), "{body}");
    assert!(!body.to_string().contains(wrong), "the password never shows: {body}");
    let log = pipes.log();
    assert!(log.contains(common::env().registry.as_str()) && log.contains(common::env().user.as_str()), "{log}");
    assert!(!pipes.log().contains(wrong), "the password is never logged");
    assert!(pipes.containers().is_empty(), "nothing was started");

    let no_auth = Pipes::start(&[("DOCKER_AUTH", None)]);
    let (status, body) = json(no_auth.get(&f.host("app", "v1", DOMAIN), "/").await).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"], "registry_auth");
}

#[tokio::test]
async fn missing_tag_is_a_404_and_remembered() {
    if common::skip() {
        return;
    }
    let mut f = Fixtures::new();
    f.serving("app", "v1");
    let pipes = Pipes::start(&[]);
    let host = f.host("app", "nope", DOMAIN);
    for _ in 0..3 {
        let (status, body) = json(pipes.get(&host, "/").await).await;
        assert_eq!(status, 404, "{body}");
        assert_eq!(body["error"], "image_not_found");
        assert_eq!(body["image"], format!("{}/app:nope", f.user), "the public does not see the registry");
    }
    // One pull for three requests: the failure is remembered.
    assert_eq!(pipes.log().matches("pulling").count(), 1, "{}", pipes.log());
    assert!(pipes.containers().is_empty());
}

#[tokio::test]
async fn a_post_body_reaches_the_cold_container() {
    if common::skip() {
        return;
    }
    let (_f, pipes, host) = common::serving_app(&[]);
    let resp = pipes.client(&host).post(pipes.url(&host, "/submit")).body("payload=42&x=y").send().await.unwrap();
    let (status, body) = json(resp).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["method"], "POST");
    assert_eq!(body["body"], "payload=42&x=y");
}

#[tokio::test]
async fn concurrent_first_requests_start_exactly_one_container() {
    if common::skip() {
        return;
    }
    let mut f = Fixtures::new();
    // A slow start keeps the window open while all requests arrive.
    f.publish("app", "slow", "ENV FIXTURE_DELAY_MS=1000");
    let pipes = Pipes::start(&[]);
    let host = f.host("app", "slow", DOMAIN);
    let client = pipes.client(&host);
    let url = pipes.url(&host, "/");
    let requests: Vec<_> = (0..100)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move { client.get(url).send().await.map(|r| r.status().as_u16()) })
        })
        .collect();
    let mut ok = 0;
    for r in requests {
        if r.await.unwrap().unwrap() == 200 {
            ok += 1;
        }
    }
    assert_eq!(ok, 100, "every request is answered 200");
    assert_eq!(pipes.containers().len(), 1, "exactly one container was created");
    assert_eq!(pipes.log().matches("pulling").count(), 1);
}

#[tokio::test]
async fn two_deployments_start_in_parallel() {
    if common::skip() {
        return;
    }
    let mut f = Fixtures::new();
    f.publish("one", "v1", "ENV FIXTURE_DELAY_MS=3000");
    f.publish("two", "v1", "ENV FIXTURE_DELAY_MS=3000");
    let pipes = Pipes::start(&[]);
    let (one, two) = (f.host("one", "v1", DOMAIN), f.host("two", "v1", DOMAIN));
    let (a, b) = tokio::join!(pipes.get(&one, "/"), pipes.get(&two, "/"));
    assert_eq!(a.status(), 200);
    assert_eq!(b.status(), 200);
    // Each container takes 3 s to answer after it started. Had the starts been
    // serial, one container would have started after the other answered.
    let started: Vec<String> = pipes.containers().iter().map(|id| docker_ok(&["inspect", "-f", "{{.State.StartedAt}}", id])).collect();
    assert_eq!(started.len(), 2);
    let t = |s: &str| humantime::parse_rfc3339(s).unwrap_or_else(|e| panic!("{s}: {e}"));
    let (s1, s2) = (t(&started[0]), t(&started[1]));
    let gap = if s1 > s2 { s1.duration_since(s2) } else { s2.duration_since(s1) }.unwrap();
    assert!(gap < Duration::from_secs(3), "starts overlapped (gap {gap:?}); serial starts would be ≥ 3 s apart");
}

#[tokio::test]
async fn a_restarted_pipes_reuses_its_container() {
    if common::skip() {
        return;
    }
    let (_f, mut pipes, host) = common::serving_app(&[]);
    assert_eq!(pipes.get(&host, "/").await.status(), 200);
    let before = pipes.containers();
    assert_eq!(before.len(), 1);

    pipes.restart();
    assert!(pipes.log().contains("adopted 1 container"), "{}", pipes.log());
    assert_eq!(pipes.get(&host, "/").await.status(), 200);
    assert_eq!(pipes.containers(), before, "the same container serves after a restart");

    // Also when the container was stopped while Pipes was down.
    pipes.terminate();
    docker_ok(&["stop", "-t", "1", &before[0]]);
    pipes.restart();
    assert_eq!(pipes.get(&host, "/").await.status(), 200);
    assert_eq!(pipes.containers(), before, "the stopped container is started again, not replaced");
}

#[tokio::test]
async fn a_container_killed_from_outside_is_started_again() {
    if common::skip() {
        return;
    }
    let (_f, pipes, host) = common::serving_app(&[]);
    let client = pipes.client(&host);
    let url = pipes.url(&host, "/");
    assert_eq!(client.get(&url).send().await.unwrap().status(), 200);
    let id = pipes.containers()[0].clone();

    docker_ok(&["kill", &id]);
    let resp = client.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200, "the client sees no error");
    assert_eq!(pipes.containers(), vec![id.clone()], "the killed container was started again");

    docker_ok(&["rm", "-f", &id]);
    let (status, body) = json(client.post(&url).body("after removal").send().await.unwrap()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["body"], "after removal", "even a POST is retried: nothing had been sent");
    let now = pipes.containers();
    assert_eq!(now.len(), 1);
    assert_ne!(now[0], id, "a removed container is replaced by a new one");
}

#[tokio::test]
async fn a_container_that_exits_while_starting_is_a_502_with_its_log() {
    if common::skip() {
        return;
    }
    let mut f = Fixtures::new();
    f.publish("app", "crash", "ENV FIXTURE_MODE=crash");
    // Log lines reach anonymous clients only where the operator opens them.
    let pipes = Pipes::start(&[("PIPES_PUBLIC_LOGS", Some("true"))]);
    let (status, body) = json(pipes.get(&f.host("app", "crash", DOMAIN), "/").await).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"], "container_exited");
    assert_eq!(body["exit_code"], 3);
    let logs = body["logs"].as_array().unwrap();
    assert!(logs.iter().any(|l| l.as_str().unwrap().contains("crashing on purpose")), "{body}");

    // Browsers get a page with the same facts.
    let host = f.host("app", "crash", DOMAIN);
    let resp = pipes.client(&host).get(pipes.url(&host, "/")).header("accept", "text/html").send().await.unwrap();
    assert_eq!(resp.status(), 502);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    assert!(resp.text().await.unwrap().contains("crashing on purpose"));
}

#[tokio::test]
async fn a_never_ready_container_is_a_504_at_the_timeout() {
    if common::skip() {
        return;
    }
    let mut f = Fixtures::new();
    f.publish("app", "hang", "ENV FIXTURE_MODE=hang");
    let pipes = Pipes::start(&[("PIPES_START_TIMEOUT", Some("2s"))]);
    let (status, body) = json(pipes.get(&f.host("app", "hang", DOMAIN), "/").await).await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["error"], "not_ready");
    assert_eq!(body["timeout_ms"], 2000);
    assert!(body["probed"].is_null(), "the public does not see container addresses: {body}");
    assert!(pipes.log().contains("did not answer GET http://"), "{}", pipes.log());
}

#[tokio::test]
async fn the_image_exposed_port_is_used() {
    if common::skip() {
        return;
    }
    let mut f = Fixtures::new();
    f.publish("app", "p8080", "ENV FIXTURE_PORT=8080\nEXPOSE 8080");
    let pipes = Pipes::start(&[]);
    let (status, body) = json(pipes.get(&f.host("app", "p8080", DOMAIN), "/").await).await;
    assert_eq!(status, 200, "{body}");
    let id = &pipes.containers()[0];
    assert_eq!(docker_ok(&["inspect", "-f", "{{index .Config.Labels \"pipes.port\"}}", id]), "8080");
}

#[tokio::test]
async fn nothing_is_deployed_unless_allowed() {
    if common::skip() {
        return;
    }
    let mut f = Fixtures::new();
    f.serving("app", "v1");
    let pipes = Pipes::start(&[("PIPES_ALLOW", None)]);
    let (status, body) = json(pipes.get(&f.host("app", "v1", DOMAIN), "/").await).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["setting"], "PIPES_ALLOW");
    assert!(pipes.containers().is_empty());
    let image = docker(&["image", "inspect", &f.reference("app", "v1")]);
    assert!(!image.status.success(), "a denied image is never pulled");

    let scoped = Pipes::start(&[("PIPES_ALLOW", Some(&format!("{}/app:v1", f.user)))]);
    assert_eq!(scoped.get(&f.host("app", "v1", DOMAIN), "/").await.status(), 200);
    assert_eq!(scoped.get(&f.host("app", "v2", DOMAIN), "/").await.status(), 403);
}

#[tokio::test]
async fn names_that_are_not_deployments() {
    if common::skip() {
        return;
    }
    let pipes = Pipes::start(&[]);
    let (status, body) = json(pipes.get("v1.app.Bad_-Name.example.com", "/").await).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["label"], "bad_-name");
    let (status, body) = json(pipes.get("alice.example.com", "/").await).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"], "no_deployment");
    let (status, body) = json(pipes.get("localhost", "/").await).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"], "not_our_host");
    assert!(pipes.containers().is_empty());
}

#[tokio::test]
async fn an_unreachable_engine_is_a_503_with_retry_after() {
    if common::skip() {
        return;
    }
    let pipes = Pipes::start(&[("DOCKER_HOST", Some("unix:///nonexistent/docker.sock"))]);
    let resp = pipes.get("v1.app.alice.example.com", "/").await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "5");
    let (_, body) = json(resp).await;
    assert_eq!(body["error"], "engine_unavailable");
}

#[tokio::test]
async fn http2_requests_route_by_authority() {
    if common::skip() {
        return;
    }
    let (_f, pipes, host) = common::serving_app(&[]);
    let client = reqwest::Client::builder().no_proxy().http2_prior_knowledge().resolve(&host, ([127, 0, 0, 1], 0).into()).build().unwrap();
    let resp = client.get(pipes.url(&host, "/h2")).send().await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    let (status, body) = json(resp).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["id"], "v1");
}

#[tokio::test]
async fn sigterm_stops_pipes_within_seconds() {
    if common::skip() {
        return;
    }
    let mut pipes = Pipes::start(&[]);
    let status = pipes.terminate().expect("pipes exits after SIGTERM (bounded wait: 20 s)");
    assert!(status.success() || status.code().is_some(), "{status:?}");
}

#[tokio::test]
async fn one_deployments_failure_leaves_others_alone() {
    if common::skip() {
        return;
    }
    let mut f = Fixtures::new();
    f.publish("app", "crash", "ENV FIXTURE_MODE=crash");
    f.publish("app", "slow", "ENV FIXTURE_DELAY_MS=500");
    let pipes = Pipes::start(&[]);
    let (crash, slow) = (f.host("app", "crash", DOMAIN), f.host("app", "slow", DOMAIN));
    let (missing, bad) = (f.host("app", "missing", DOMAIN), f.host("app", "v1", DOMAIN).replace("v1.", "-v1."));
    let (a, b, c, d) = tokio::join!(pipes.get(&crash, "/"), pipes.get(&slow, "/"), pipes.get(&missing, "/"), pipes.get(&bad, "/"));
    assert_eq!(a.status(), 502);
    assert_eq!(b.status(), 200, "a healthy deployment starts while others fail");
    assert_eq!(c.status(), 404);
    assert_eq!(d.status(), 400);
    assert_eq!(pipes.get(&slow, "/").await.status(), 200);
}

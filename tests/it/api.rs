//! The management API at /__proxyapi against the real engine: every endpoint,
//! the auth matrix, bad input, and configs across restarts.

use crate::common;

use std::time::{Duration, Instant};

use common::{api, docker_ok, engine_state, json, snapshot, Fixtures, Pipes};

const TOKEN: &str = "test-token-0123456789abcdef";
const ALICE_TOKEN: &str = "scoped-token-0123456789";
const DOMAIN: &str = "example.com";

fn admin() -> Option<&'static str> {
    Some(TOKEN)
}

#[tokio::test]
async fn the_api_is_closed_without_a_token() {
    if common::skip() {
        return;
    }
    let pipes = Pipes::start(&[]);
    let (status, body) = json(pipes.get("v1.app.alice.example.com", "/__proxyapi/container").await).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"], "api_closed");
    assert_eq!(body["setting"], "PIPES_API_TOKEN");

    let open = Pipes::start(&[("PIPES_API_AUTH", Some("none"))]);
    let (status, body) = api(&open, "v1.app.alice.example.com", "GET", "/__proxyapi/container", None, None).await;
    assert_eq!(status, 200, "an operator may turn auth off on purpose: {body}");
}

#[tokio::test]
async fn the_auth_matrix() {
    if common::skip() {
        return;
    }
    let mut f = Fixtures::new();
    f.serving("app", "v1");
    let pipes = Pipes::start(&[("PIPES_API_TOKEN", Some(TOKEN))]);
    // A token scoped to this test's user, and a host of another user.
    let tokens = format!(r#"{{"tokens":[{{"name":"scoped","users":["{}"],"token":"{ALICE_TOKEN}"}}]}}"#, f.user);
    std::fs::create_dir_all(pipes.dir.join("configs")).unwrap();
    std::fs::write(pipes.dir.join("configs/tokens.json"), tokens).unwrap();
    let own = f.host("app", "v1", DOMAIN);
    let other = "v1.app.someoneelse.example.com";
    let path = "/__proxyapi/container";

    for (host, token, expected) in [
        (own.as_str(), None, 401),
        (own.as_str(), Some("wrong-token-0123456789"), 401),
        (own.as_str(), Some(TOKEN), 200),
        (other, Some(TOKEN), 200),
        (own.as_str(), Some(ALICE_TOKEN), 200),
        (other, Some(ALICE_TOKEN), 403),
    ] {
        let (status, body) = api(&pipes, host, "GET", path, None, token).await;
        assert_eq!(status, expected, "{host} with {token:?}: {body}");
    }
    let resp = pipes.client(&own).get(pipes.url(&own, path)).send().await.unwrap();
    assert_eq!(resp.headers()["www-authenticate"], "Bearer realm=\"pipes\"");
    assert!(!pipes.log().contains(TOKEN) && !pipes.log().contains(ALICE_TOKEN), "tokens are never logged");

    // The fleet view shows a scoped token only its users' deployments.
    assert_eq!(pipes.get(&own, "/").await.status(), 200);
    let (status, all) = api(&pipes, DOMAIN, "GET", "/__proxyapi/deployments", None, Some(ALICE_TOKEN)).await;
    assert_eq!(status, 200, "{all}");
    let list = all["deployments"].as_array().unwrap();
    assert!(list.iter().all(|d| d["deployment"].as_str().unwrap().starts_with(&format!("{}/", f.user))), "{all}");
    assert_eq!(list.iter().filter(|d| d["state"] == "running").count(), 1, "{all}");
}

#[tokio::test]
async fn container_endpoints_do_what_they_say() {
    if common::skip() {
        return;
    }
    let (_f, pipes, host) = common::serving_app(&[("PIPES_API_TOKEN", Some(TOKEN))]);

    let (status, body) = api(&pipes, &host, "GET", "/__proxyapi/container", None, admin()).await;
    assert_eq!((status, body["state"].as_str()), (200, Some("absent")), "asking starts nothing: {body}");
    assert!(pipes.containers().is_empty());

    assert_eq!(pipes.get(&host, "/").await.status(), 200);
    let (_, body) = api(&pipes, &host, "GET", "/__proxyapi/container", None, admin()).await;
    assert_eq!(body["state"], "running");
    assert_eq!(body["container"]["id"], pipes.containers()[0].as_str());
    assert_eq!(body["upstream"], format!("{}:80", pipes.container_ip(&pipes.containers()[0])), "{body}");
    assert!(body["last_request_at"].is_string(), "{body}");
    assert_eq!(body["config"]["memory"], "512m", "the default limit applies: {body}");
    let id = pipes.containers()[0].clone();
    assert_eq!(docker_ok(&["inspect", "-f", "{{.HostConfig.Memory}} {{.HostConfig.NanoCpus}}", &id]), "536870912 1000000000");

    // Logs.
    let (status, body) = api(&pipes, &host, "GET", "/__proxyapi/container/logs?tail=1", None, admin()).await;
    assert_eq!(status, 200, "{body}");
    let lines = body["lines"].as_array().unwrap();
    assert_eq!(lines.len(), 1);
    assert!(lines[0].as_str().unwrap().contains("listening on port 80"), "{body}");

    // Stop keeps the container; the next request starts it again.
    let (status, body) = api(&pipes, &host, "POST", "/__proxyapi/container/stop", None, admin()).await;
    assert_eq!((status, body["state"].as_str()), (200, Some("stopped")), "{body}");
    assert_eq!(pipes.containers(), vec![id.clone()]);
    assert_eq!(pipes.get(&host, "/").await.status(), 200);
    assert_eq!(pipes.containers(), vec![id.clone()], "the stopped container was started again");
    let (_, body) = api(&pipes, &host, "GET", "/__proxyapi/container", None, admin()).await;
    assert!(body["container"]["exit_code"].is_null(), "a running container has no exit code: {body}");
    let (status, body) = api(&pipes, &host, "GET", "/__proxyapi/container/stop", None, admin()).await;
    assert_eq!((status, body["state"].as_str()), (200, Some("stopped")), "GET stops too, as the original API did");

    // Restart brings it back, same container, and waits until it answers.
    let before = docker_ok(&["inspect", "-f", "{{.State.StartedAt}}", &id]);
    let (status, body) = api(&pipes, &host, "POST", "/__proxyapi/container/restart", None, admin()).await;
    assert_eq!((status, body["state"].as_str()), (200, Some("running")), "{body}");
    assert_eq!(pipes.containers(), vec![id.clone()]);
    assert_ne!(docker_ok(&["inspect", "-f", "{{.State.StartedAt}}", &id]), before);

    // DELETE removes the container and keeps the config.
    let (status, _) = api(&pipes, &host, "PUT", "/__proxyapi/container/config", Some(r#"{"env":{"APP_KEEP":"1"}}"#), admin()).await;
    assert_eq!(status, 200);
    let (status, body) = api(&pipes, &host, "DELETE", "/__proxyapi/container", None, admin()).await;
    assert_eq!((status, body["state"].as_str()), (200, Some("absent")), "{body}");
    assert!(pipes.containers().is_empty());
    let (_, body) = api(&pipes, &host, "GET", "/__proxyapi/container/config", None, admin()).await;
    assert_eq!(body["config"]["env"]["APP_KEEP"], "1", "{body}");
}

#[tokio::test]
async fn configs_shape_containers() {
    if common::skip() {
        return;
    }
    let mut f = Fixtures::new();
    f.serving("app", "v1");
    f.serving("app", "v2");
    let pipes = Pipes::start(&[("PIPES_API_TOKEN", Some(TOKEN))]);
    let (v1, v2) = (f.host("app", "v1", DOMAIN), f.host("app", "v2", DOMAIN));

    // A repository default reaches a tag started after it.
    let repo = r#"{"env":{"APP_FROM":"repository","APP_BOTH":"repository"},"memory":"128m"}"#;
    let (status, body) = api(&pipes, &v1, "PUT", "/__proxyapi/repository/config", Some(repo), admin()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["config"]["memory"], "128m");
    let (status, body) = json(pipes.get(&v2, "/").await).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["env"]["APP_FROM"], "repository", "{body}");

    // A tag's own config wins field by field, and PUT recreates its container.
    assert_eq!(pipes.get(&v1, "/").await.status(), 200);
    let (_, before) = api(&pipes, &v1, "GET", "/__proxyapi/container", None, admin()).await;
    let tag = r#"{"env":{"APP_BOTH":"tag"},"cpus":0.5}"#;
    let (status, after) = api(&pipes, &v1, "PUT", "/__proxyapi/container/config", Some(tag), admin()).await;
    assert_eq!((status, after["state"].as_str()), (200, Some("running")), "{after}");
    assert_ne!(before["container"]["id"], after["container"]["id"], "the container was recreated");
    let (_, body) = json(pipes.get(&v1, "/").await).await;
    assert_eq!(body["env"]["APP_FROM"], "repository", "{body}");
    assert_eq!(body["env"]["APP_BOTH"], "tag", "{body}");
    let id = after["container"]["id"].as_str().unwrap();
    assert_eq!(docker_ok(&["inspect", "-f", "{{.HostConfig.Memory}} {{.HostConfig.NanoCpus}}", id]), "134217728 500000000");

    let (_, merged) = api(&pipes, &v1, "GET", "/__proxyapi/container/config", None, admin()).await;
    assert_eq!(merged["config"]["env"]["APP_BOTH"], "tag");
    assert_eq!(merged["repository"]["env"]["APP_BOTH"], "repository");
    assert_eq!(merged["effective"]["env"]["APP_BOTH"], "tag");
    assert_eq!(merged["effective"]["cpus"], 0.5);

    // A repository change does not reach a running container by itself: the
    // API shows what runs and what is pending, and a restart applies it.
    let (_, running) = api(&pipes, &v2, "GET", "/__proxyapi/container", None, admin()).await;
    assert!(running["config_pending"].is_null(), "{running}");
    let repo = r#"{"env":{"APP_FROM":"repository, changed"}}"#;
    let (status, _) = api(&pipes, &v2, "PUT", "/__proxyapi/repository/config", Some(repo), admin()).await;
    assert_eq!(status, 200);
    let (_, pending) = api(&pipes, &v2, "GET", "/__proxyapi/container", None, admin()).await;
    assert_eq!(pending["config"]["env"]["APP_FROM"], "repository", "{pending}");
    assert_eq!(pending["config_pending"]["env"]["APP_FROM"], "repository, changed", "{pending}");
    assert_eq!(pending["container"]["id"], running["container"]["id"]);
    let (status, restarted) = api(&pipes, &v2, "POST", "/__proxyapi/container/restart", None, admin()).await;
    assert_eq!(status, 200, "{restarted}");
    assert_ne!(restarted["container"]["id"], running["container"]["id"], "the restart made it anew");
    assert!(restarted["config_pending"].is_null(), "{restarted}");
    let (_, body) = json(pipes.get(&v2, "/").await).await;
    assert_eq!(body["env"]["APP_FROM"], "repository, changed", "{body}");
}

#[tokio::test]
async fn bad_input_changes_nothing() {
    if common::skip() {
        return;
    }
    let (_f, pipes, host) = common::serving_app(&[("PIPES_API_TOKEN", Some(TOKEN))]);
    let (status, _) = api(&pipes, &host, "PUT", "/__proxyapi/container/config", Some(r#"{"env":{"APP_OK":"1"}}"#), admin()).await;
    assert_eq!(status, 200);
    let files = snapshot(&pipes.dir.join("configs"));
    let engine = engine_state(&pipes);
    assert_eq!(engine.len(), 1);

    let big = format!(r#"{{"env":{{"APP_BIG":"{}"}}}}"#, "x".repeat(1 << 20));
    let cases: Vec<(&str, &str, String, u16, &str)> = vec![
        ("PUT", "/__proxyapi/container/config", "{\n  \"port\": 80,\n  oops".into(), 400, "line"),
        ("PUT", "/__proxyapi/container/config", r#"{"port":80,"colour":"red"}"#.into(), 400, "colour"),
        ("PUT", "/__proxyapi/repository/config", r#"{"health":{"paht":"/"}}"#.into(), 400, "paht"),
        ("PUT", "/__proxyapi/container/config", r#"{"port":"80"}"#.into(), 422, "port"),
        ("PUT", "/__proxyapi/container/config", r#"{"port":0}"#.into(), 422, "port"),
        ("PUT", "/__proxyapi/container/config", r#"{"port":70000}"#.into(), 422, "port"),
        ("PUT", "/__proxyapi/container/config", r#"{"memory":-1}"#.into(), 422, "memory"),
        ("PUT", "/__proxyapi/repository/config", r#"{"idle_timeout":"a while"}"#.into(), 422, "idle_timeout"),
        ("PUT", "/__proxyapi/container/config", r#"{"cpus":"lots"}"#.into(), 422, "cpus"),
        ("PUT", "/__proxyapi/container/config", big, 413, "limit_bytes"),
        ("PATCH", "/__proxyapi/container/config", "{}".into(), 405, "allow"),
        ("POST", "/__proxyapi/container", "{}".into(), 405, "allow"),
        ("GET", "/__proxyapi/nothing", String::new(), 404, "known"),
        ("GET", "/__proxyapi/deployments", String::new(), 404, "served on the bare domain"),
        ("GET", "/__proxyapi/container/logs?tail=-3", String::new(), 400, "tail"),
    ];
    for (method, path, body, expected, mentions) in cases {
        let body = (!body.is_empty()).then_some(body);
        let (status, answer) = api(&pipes, &host, method, path, body.as_deref(), admin()).await;
        assert_eq!(status, expected, "{method} {path}: {answer}");
        assert!(answer.to_string().contains(mentions), "{method} {path} should mention {mentions}: {answer}");
    }
    let resp = pipes.client(&host).patch(pipes.url(&host, "/__proxyapi/container/config")).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(resp.headers()["allow"], "GET, HEAD, PUT");
    let (_, answer) = api(&pipes, &host, "PUT", "/__proxyapi/container/config", Some("{\n  \"port\": 80,\n  oops"), admin()).await;
    assert_eq!((answer["line"].as_u64(), answer["column"].as_u64()), (Some(3), Some(3)), "{answer}");

    assert_eq!(snapshot(&pipes.dir.join("configs")), files, "no config file changed");
    assert_eq!(engine_state(&pipes), engine, "no container changed");
}

#[tokio::test]
async fn the_policy_holds_over_the_api() {
    if common::skip() {
        return;
    }
    let (f, pipes, host) = common::serving_app(&[("PIPES_API_TOKEN", Some(TOKEN)), ("PIPES_ALLOW", Some("nobody/*"))]);
    let files = snapshot(&pipes.dir.join("configs"));
    let (status, body) = api(&pipes, &host, "PUT", "/__proxyapi/container/config", Some("{}"), admin()).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["setting"], "PIPES_ALLOW");
    let (status, _) = api(&pipes, &host, "POST", "/__proxyapi/container/restart", None, admin()).await;
    assert_eq!(status, 403);
    assert_eq!(snapshot(&pipes.dir.join("configs")), files);
    assert!(pipes.containers().is_empty());
    assert!(!common::docker(&["image", "inspect", &f.reference("app", "v1")]).status.success(), "never pulled");
}

#[tokio::test]
async fn configs_and_containers_survive_a_restart() {
    if common::skip() {
        return;
    }
    let (_f, mut pipes, host) = common::serving_app(&[("PIPES_API_TOKEN", Some(TOKEN))]);
    let (status, _) = api(&pipes, &host, "PUT", "/__proxyapi/repository/config", Some(r#"{"env":{"APP_R":"1"}}"#), admin()).await;
    assert_eq!(status, 200);
    let (status, _) = api(&pipes, &host, "PUT", "/__proxyapi/container/config", Some(r#"{"env":{"APP_T":"2"}}"#), admin()).await;
    assert_eq!(status, 200);
    let containers = pipes.containers();
    let (_, before) = api(&pipes, &host, "GET", "/__proxyapi/container/config", None, admin()).await;

    pipes.restart();
    let (_, after) = api(&pipes, &host, "GET", "/__proxyapi/container/config", None, admin()).await;
    assert_eq!(after, before);
    let (status, body) = json(pipes.get(&host, "/").await).await;
    assert_eq!(status, 200);
    assert_eq!((body["env"]["APP_R"].as_str(), body["env"]["APP_T"].as_str()), (Some("1"), Some("2")));
    assert_eq!(pipes.containers(), containers, "the same container serves, not a new one");
}

#[tokio::test]
async fn a_broken_config_file_is_reported_and_kept() {
    if common::skip() {
        return;
    }
    let (f, mut pipes, host) = common::serving_app(&[("PIPES_API_TOKEN", Some(TOKEN))]);
    let (status, _) = api(&pipes, &host, "PUT", "/__proxyapi/repository/config", Some("{}"), admin()).await;
    assert_eq!(status, 200);
    let file = pipes.dir.join(format!("configs/repos/{}/app/repository.json", f.user));
    std::fs::write(&file, "{\"memory\": \"lots\"}\n").unwrap();

    pipes.restart();
    assert!(pipes.log().contains(&format!("repos/{}/app/repository.json", f.user)), "{}", pipes.log());
    let (status, body) = json(pipes.get(&host, "/").await).await;
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"], "config_broken");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "{\"memory\": \"lots\"}\n", "never replaced silently");
    // An explicit PUT is how an operator replaces it.
    let (status, _) = api(&pipes, &host, "PUT", "/__proxyapi/repository/config", Some(r#"{"memory":"64m"}"#), admin()).await;
    assert_eq!(status, 200);
    assert_eq!(pipes.get(&host, "/").await.status(), 200);
}

#[tokio::test]
async fn too_many_containers_is_a_503() {
    if common::skip() {
        return;
    }
    let mut f = Fixtures::new();
    f.serving("app", "v1");
    f.serving("app", "v2");
    let pipes = Pipes::start(&[("PIPES_MAX_CONTAINERS", Some("1"))]);
    assert_eq!(pipes.get(&f.host("app", "v1", DOMAIN), "/").await.status(), 200);
    let resp = pipes.get(&f.host("app", "v2", DOMAIN), "/").await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "5");
    let (_, body) = json(resp).await;
    assert_eq!(body["error"], "too_many_containers");
    assert_eq!(body["setting"], "PIPES_MAX_CONTAINERS");
    assert_eq!(pipes.containers().len(), 1);
}

#[tokio::test]
async fn idle_containers_are_stopped() {
    if common::skip() {
        return;
    }
    let (_f, pipes, host) = common::serving_app(&[("PIPES_API_TOKEN", Some(TOKEN))]);
    let (status, _) = api(&pipes, &host, "PUT", "/__proxyapi/repository/config", Some(r#"{"idle_timeout":"1s"}"#), admin()).await;
    assert_eq!(status, 200);
    assert_eq!(pipes.get(&host, "/").await.status(), 200);
    let id = pipes.containers()[0].clone();
    // Bounded wait for the idle stop (checked every second).
    let deadline = Instant::now() + Duration::from_secs(30);
    while docker_ok(&["inspect", "-f", "{{.State.Running}}", &id]) == "true" {
        assert!(Instant::now() < deadline, "the idle container was not stopped:\n{}", pipes.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(pipes.get(&host, "/").await.status(), 200, "the next request starts it again");
    assert_eq!(pipes.containers(), vec![id]);
}

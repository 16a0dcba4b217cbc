//! Services beside a deployment, with real software: an app that keeps rows
//! in Postgres and counts hits in Redis, both started from the host name
//! alone, asleep with the app, kept across redeploys and restarts, and gone
//! with the deployment.

use crate::common;

use std::time::Duration;

use common::{api, docker_ok, eventually, json, Fixtures, Pipes};

const DOMAIN: &str = "example.com";
const TOKEN: &str = "services-test-token-0123456789";

/// The app with its database and cache; `user` owns the service images.
fn config(user: &str, idle: &str) -> String {
    format!(
        r#"{{"port": 8000, "idle_timeout": "{idle}", "volumes": {{"uploads": "/tmp/uploads"}},
            "services": {{
              "db": {{"image": "{user}/postgres:15", "cmd": ["-c", "fsync=off"],
                      "volumes": {{"pgdata": "/var/lib/postgresql/data"}},
                      "health": {{"cmd": ["/usr/lib/postgresql/15/bin/pg_isready", "-h", "127.0.0.1", "-U", "postgres"], "timeout": "60s"}},
                      "memory": "256m"}},
              "cache": {{"image": "{user}/redis:7", "volumes": {{"redisdata": "/data"}}, "health": {{"tcp": 6379}}}}
            }}}}"#
    )
}

/// The services' images and the app's, published for a fresh user.
fn published() -> Fixtures {
    let mut f = Fixtures::new();
    let e = common::env();
    f.publish_from(&e.postgres, "postgres", "15", "");
    f.publish_from(&e.redis, "redis", "7", "");
    f.publish_from(&e.app, "shop", "v1", "ENV APP_ID=v1");
    f
}

/// `GET container`, as an operator sees it.
async fn container(pipes: &Pipes, host: &str) -> serde_json::Value {
    let (status, body) = api(pipes, host, "GET", "/__proxyapi/container", None, Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The engine's word on a container: `running`, `exited`, …
fn engine_status(id: &str) -> String {
    docker_ok(&["inspect", "-f", "{{.State.Status}}", id])
}

/// Names of the networks of this Pipes and of its deployments' volumes.
fn shared(pipes: &Pipes) -> (Vec<String>, Vec<String>) {
    let label = format!("label=pipes.instance={}", pipes.instance);
    let lines = |out: String| out.lines().map(str::to_owned).collect::<Vec<_>>();
    (
        lines(docker_ok(&["network", "ls", "--format", "{{.Name}}", "--filter", &label])),
        // Volumes of its deployments: not its claim on the instance name.
        lines(docker_ok(&["volume", "ls", "--format", "{{.Name}}", "--filter", &label, "--filter", "label=pipes.deployment"])),
    )
}

/// `GET /notes` until it answers 200 (a restarting database answers 500 for a moment).
async fn notes(pipes: &Pipes, host: &str) -> serde_json::Value {
    let mut last = String::new();
    for _ in 0..60 {
        let resp = pipes.get(host, "/notes").await;
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        if status == 200 {
            return serde_json::from_str(&text).expect("JSON");
        }
        last = format!("{status}: {text}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("GET /notes did not answer 200 within 30 s; last {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_app_with_postgres_and_redis_lives_and_keeps_its_rows() {
    if common::skip() {
        return;
    }
    let mut f = published();
    let metrics = common::free_port();
    let metrics_listen = format!("127.0.0.1:{metrics}");
    let mut pipes = Pipes::start(&[("PIPES_API_TOKEN", Some(TOKEN)), ("PIPES_METRICS_LISTEN", Some(&metrics_listen))]);
    let host = f.host("shop", "v1", DOMAIN);
    // The repository's config: saved, nothing started yet.
    let (status, body) = api(&pipes, &host, "PUT", "/__proxyapi/repository/config", Some(&config(&f.user, "3s")), Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert!(pipes.containers().is_empty());

    // Twenty first requests at once: one network, one container per service, one app.
    let first: Vec<_> = (0..20).map(|_| pipes.get(&host, "/")).collect();
    for resp in futures_util::future::join_all(first).await {
        assert_eq!(resp.status().as_u16(), 200);
    }
    assert_eq!(pipes.containers().len(), 3, "app, db and cache");
    let state = container(&pipes, &host).await;
    let (db, cache) = (state["services"]["db"].clone(), state["services"]["cache"].clone());
    assert_eq!((db["state"].as_str(), db["health"].as_str()), (Some("running"), Some("healthy")), "{state}");
    assert_eq!(cache["state"], "running", "{state}");
    let db_id = db["container"].as_str().expect("db container").to_owned();
    assert_eq!(state["volumes"].as_array().map(Vec::len), Some(3), "uploads, and db's and cache's data: {state}");
    let (networks, _) = shared(&pipes);
    assert_eq!(networks.len(), 1, "the deployment's own, where the app and its services live: {networks:?}");
    let (status, list) = api(&pipes, DOMAIN, "GET", "/__proxyapi/deployments", None, Some(TOKEN)).await;
    let listed = list["deployments"].as_array().and_then(|l| l.iter().find(|d| d["deployment"] == format!("{}/shop:v1", f.user)).cloned());
    assert_eq!((status, listed.map(|d| d["services"].clone())), (200, Some(serde_json::json!(2))), "{list}");
    let text = reqwest::get(format!("http://{metrics_listen}/metrics")).await.expect("metrics").text().await.expect("text");
    assert!(text.contains(r#"pipes_cold_start_phase_seconds_count{phase="service:db"} 1"#), "{text}");

    for body in ["first", "second"] {
        let resp = pipes.client(&host).post(pipes.url(&host, "/notes")).body(body).send().await.expect("answer");
        assert_eq!(resp.status().as_u16(), 201);
    }
    assert_eq!(notes(&pipes, &host).await["notes"], serde_json::json!(["first", "second"]));
    let (status, logs) = api(&pipes, &host, "GET", "/__proxyapi/container/logs?service=db&tail=50", None, Some(TOKEN)).await;
    assert_eq!(status, 200, "{logs}");
    assert!(logs["lines"].as_array().is_some_and(|l| l.iter().any(|l| l.as_str().is_some_and(|l| l.contains("ready to accept connections")))), "{logs}");

    // Idle: the app and its services stop together; the next request finds the rows.
    eventually("app, db and cache stop for idleness", Duration::from_secs(30), || async { pipes.containers().iter().all(|id| engine_status(id) == "exited") })
        .await;
    assert_eq!(notes(&pipes, &host).await["notes"], serde_json::json!(["first", "second"]));
    assert_eq!(container(&pipes, &host).await["services"]["db"]["container"], db_id.as_str(), "the same database container");

    // A redeploy of the app joins the same database.
    f.push_from(&common::env().app, "shop", "v1", "v2", "ENV APP_ID=v2");
    let (status, body) = api(&pipes, &host, "POST", "/__proxyapi/container/redeploy", None, Some(TOKEN)).await;
    assert_eq!((status, body["changed"].as_bool()), (200, Some(true)), "{body}");
    let after = notes(&pipes, &host).await;
    assert_eq!((after["app"].as_str(), after["notes"].clone()), (Some("v2"), serde_json::json!(["first", "second"])));
    assert_eq!(container(&pipes, &host).await["services"]["db"]["container"], db_id.as_str(), "not restarted by the redeploy");

    // The engine restarts the database; then Pipes restarts. Nothing is lost.
    docker_ok(&["restart", "-t", "5", &db_id]);
    assert_eq!(notes(&pipes, &host).await["notes"], serde_json::json!(["first", "second"]));
    pipes.restart();
    assert_eq!(notes(&pipes, &host).await["notes"], serde_json::json!(["first", "second"]));

    // Removed with its volumes kept: a new start finds the rows again.
    let (status, body) = api(&pipes, &host, "DELETE", "/__proxyapi/container?keep_volumes=true", None, Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert!(pipes.containers().is_empty(), "no container left");
    assert_eq!(shared(&pipes).1.len(), 3, "the volumes stay");
    assert_eq!(notes(&pipes, &host).await["notes"], serde_json::json!(["first", "second"]));
    assert_ne!(container(&pipes, &host).await["services"]["db"]["container"], db_id.as_str(), "a new database container, the same data");

    // Removed for good: no container, no network of the deployment, no volume.
    let (status, body) = api(&pipes, &host, "DELETE", "/__proxyapi/container", None, Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert!(pipes.containers().is_empty(), "no container left");
    let (networks, volumes) = shared(&pipes);
    assert!(networks.iter().all(|n| *n == format!("pipes-{}", pipes.instance)), "only Pipes' own network: {networks:?}");
    assert!(volumes.is_empty(), "no volume left: {volumes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_are_refused_when_not_allowed_and_a_crash_is_a_502_with_its_log() {
    if common::skip() {
        return;
    }
    let f = published();
    let allow = format!("{}/*", f.user);
    let pipes = Pipes::start(&[("PIPES_API_TOKEN", Some(TOKEN)), ("PIPES_ALLOW", Some(&allow))]);
    let host = f.host("shop", "v1", DOMAIN);
    let foreign = r#"{"services": {"db": {"image": "someone/postgres:15"}}}"#;
    let (status, body) = api(&pipes, &host, "PUT", "/__proxyapi/container/config", Some(foreign), Some(TOKEN)).await;
    assert_eq!((status, body["error"].as_str(), body["field"].as_str()), (422, Some("invalid_field"), Some("services.db.image")), "{body}");
    assert!(body["message"].as_str().is_some_and(|m| m.contains("PIPES_ALLOW")), "{body}");
    assert!(pipes.containers().is_empty(), "nothing started");

    // Postgres refuses a setting it does not know and exits.
    let crashing = config(&f.user, "1m").replace(r#""cmd": ["-c", "fsync=off"]"#, r#""cmd": ["-c", "no_such_setting=1"]"#);
    let (status, _) = api(&pipes, &host, "PUT", "/__proxyapi/repository/config", Some(&crashing), Some(TOKEN)).await;
    assert_eq!(status, 200);
    let (status, body) = json(pipes.get(&host, "/").await).await;
    assert_eq!((status, body["error"].as_str(), body["service"].as_str()), (502, Some("service_exited"), Some("db")), "{body}");
    assert!(body.get("logs").is_none(), "the public is not shown a service's log: {body}");
    let state = container(&pipes, &host).await;
    let error = &state["last_error"];
    assert_eq!(error["error"], "service_exited", "{state}");
    assert!(error["logs"].as_array().is_some_and(|l| l.iter().any(|l| l.as_str().is_some_and(|l| l.contains("no_such_setting")))), "{state}");
    assert_eq!(state["container"], serde_json::Value::Null, "the app was not started");
    let services = docker_ok(&["ps", "-aq", "--filter", &format!("label=pipes.instance={}", pipes.instance), "--filter", "label=pipes.service"]);
    assert_eq!(services.lines().count(), pipes.containers().len(), "no app container without its services");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_swarm_services_share_an_overlay_and_a_volume_pins_its_service() {
    if common::no_swarm() {
        return;
    }
    let mut f = published();
    let mut created = crate::swarm::Created::default();
    created.instance = common::unique("svc");
    let image = common::build_pipes_image();
    created.image = Some(image.clone());
    created.network = Some(common::network("pipes-services-overlay", &["-d", "overlay", "--attachable"]));
    let (_, port) = crate::swarm::run_replica(&mut created, &image, &[]);
    common::until_answering(port).await;
    let host = f.host("shop", "v1", DOMAIN);
    let client = common::client_for(&host, port);
    let url = |path: &str| format!("http://{host}:{port}{path}");
    let call = |method: &str, path: &str, body: Option<String>| {
        let mut req = client.request(method.parse().expect("method"), url(path)).bearer_auth(crate::swarm::TOKEN);
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        async move { json(req.send().await.expect("answer")).await }
    };
    // The database with its volume, pinned; the cache without one.
    let config = config(&f.user, "10m").replace(r#""volumes": {"redisdata": "/data"}, "#, "");
    let (status, body) = call("PUT", "/__proxyapi/repository/config", Some(config)).await;
    assert_eq!(status, 200, "{body}");

    let (status, body) = json(client.get(url("/")).send().await.expect("answer")).await;
    assert_eq!(status, 200, "{body}");
    let resp = client.post(url("/notes")).body("on a swarm").send().await.expect("answer");
    assert_eq!(resp.status().as_u16(), 201, "{}", resp.text().await.unwrap_or_default());
    let (status, notes) = json(client.get(url("/notes")).send().await.expect("answer")).await;
    assert_eq!((status, notes["notes"].clone()), (200, serde_json::json!(["on a swarm"])), "{notes}");

    let (status, state) = call("GET", "/__proxyapi/container", None).await;
    assert_eq!(status, 200, "{state}");
    let db = state["services"]["db"]["container"].as_str().expect("db's service").to_owned();
    let cache = state["services"]["cache"]["container"].as_str().expect("cache's service").to_owned();
    let constraints = |id: &str| docker_ok(&["service", "inspect", "-f", "{{json .Spec.TaskTemplate.Placement.Constraints}}", id]);
    let node = docker_ok(&["info", "-f", "{{.Swarm.NodeID}}"]);
    assert_eq!(constraints(&db).trim(), format!("[\"node.id=={}\"]", node.trim()), "the database is pinned to its volume's node");
    assert_eq!(constraints(&cache).trim(), "null", "the cache has no volume to hold it anywhere");
    f.push_from(&common::env().app, "shop", "v1", "v2", "ENV APP_ID=v2");
    let (status, body) = call("POST", "/__proxyapi/container/redeploy", None).await;
    assert_eq!((status, body["changed"].as_bool()), (200, Some(true)), "{body}");
    let (_, notes) = json(client.get(url("/notes")).send().await.expect("answer")).await;
    assert_eq!((notes["app"].as_str(), notes["notes"].clone()), (Some("v2"), serde_json::json!(["on a swarm"])), "{notes}");

    let (status, body) = call("DELETE", "/__proxyapi/container", None).await;
    assert_eq!(status, 200, "{body}");
    let label = format!("label=pipes.deployment={}/shop:v1", f.user);
    eventually("no service, network or volume of the deployment is left", Duration::from_secs(30), || async {
        ["service", "network", "volume"].iter().all(|kind| docker_ok(&[kind, "ls", "-q", "--filter", &label]).trim().is_empty())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_service_is_started_again_and_an_idle_pause_takes_the_services_along() {
    if common::skip() {
        return;
    }
    let f = published();
    let pipes = Pipes::start(&[("PIPES_API_TOKEN", Some(TOKEN))]);
    let host = f.host("shop", "v1", DOMAIN);
    let config = format!(
        r#"{{"port": 8000, "idle_timeout": "8s", "idle_action": "pause",
            "services": {{"cache": {{"image": "{}/redis:7", "health": {{"tcp": 6379}}}}}}}}"#,
        f.user
    );
    let (status, body) = api(&pipes, &host, "PUT", "/__proxyapi/repository/config", Some(&config), Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(pipes.get(&host, "/").await.status().as_u16(), 200);
    let cache = container(&pipes, &host).await["services"]["cache"]["container"].as_str().expect("the cache").to_owned();

    // Killed behind Pipes' back while its app serves: the engine's events tell Pipes, which starts it again.
    docker_ok(&["kill", &cache]);
    eventually("Pipes starts the killed cache again", Duration::from_secs(15), || async { engine_status(&cache) == "running" }).await;
    assert!(pipes.log().contains("service cache stopped"), "{}", pipes.log());

    // Idle: the app and its cache are paused together, and the next request thaws both.
    eventually("app and cache are paused", Duration::from_secs(30), || async { pipes.containers().iter().all(|id| engine_status(id) == "paused") }).await;
    assert_eq!(pipes.get(&host, "/").await.status().as_u16(), 200);
    assert!(pipes.containers().iter().all(|id| engine_status(id) == "running"), "thawed together");
    assert_eq!(container(&pipes, &host).await["services"]["cache"]["container"], cache.as_str(), "the same cache container");
}

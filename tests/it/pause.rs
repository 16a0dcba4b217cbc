//! Cold starts in milliseconds, against the real engine: an idle deployment
//! paused rather than stopped and thawed by its next request, the pause
//! ceiling and timeout, an open WebSocket keeping a deployment awake, and
//! the right image woken after the tag moved (pulled ahead on a push).

use crate::common;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use common::{api, docker_ok, eventually, json, Fixtures, Pipes};

const DOMAIN: &str = "example.com";
const TOKEN: &str = "pause-test-token-0123456789";

/// The engine's word on a container: `running`, `paused`, `exited`, …
fn engine_status(id: &str) -> String {
    docker_ok(&["inspect", "-f", "{{.State.Status}}", id])
}

/// The state `GET container` reports.
async fn state(pipes: &Pipes, host: &str) -> String {
    let (status, body) = api(pipes, host, "GET", "/__proxyapi/container", None, Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    body["state"].as_str().unwrap_or_default().to_owned()
}

async fn configure(pipes: &Pipes, host: &str, config: &str) {
    let (status, body) = api(pipes, host, "PUT", "/__proxyapi/container/config", Some(config), Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn an_idle_deployment_is_paused_and_its_next_request_thaws_it() {
    if common::skip() {
        return;
    }
    let (_f, pipes, host) = common::serving_app(&[("PIPES_API_TOKEN", Some(TOKEN))]);
    configure(&pipes, &host, r#"{"idle_timeout":"1s","idle_action":"pause"}"#).await;
    let (_, first) = json(pipes.get(&host, "/").await).await;
    let id = pipes.containers()[0].clone();
    eventually("the engine shows it paused", Duration::from_secs(15), || async { engine_status(&id) == "paused" }).await;
    assert_eq!(state(&pipes, &host).await, "paused");

    let (status, again) = json(pipes.get(&host, "/").await).await;
    assert_eq!(status, 200);
    assert_eq!(again["id"], first["id"], "the same container answered");
    assert_eq!(pipes.containers(), vec![id.clone()], "no new container");
    assert_eq!(engine_status(&id), "running");
    assert!(pipes.log().contains("thawing its paused instance"), "{}", pipes.log());
}

#[tokio::test]
async fn paused_containers_stop_past_the_ceiling_and_after_their_pause_timeout() {
    if common::skip() {
        return;
    }
    let mut f = Fixtures::new();
    f.serving("app", "one");
    f.serving("app", "two");
    let pipes = Pipes::start(&[("PIPES_API_TOKEN", Some(TOKEN)), ("PIPES_MAX_PAUSED", Some("1"))]);
    let (one, two) = (f.host("app", "one", DOMAIN), f.host("app", "two", DOMAIN));
    configure(&pipes, &one, r#"{"idle_timeout":"1s","idle_action":"pause"}"#).await;
    configure(&pipes, &two, r#"{"idle_timeout":"1s","idle_action":"pause","pause_timeout":"3s"}"#).await;
    assert_eq!(pipes.get(&one, "/").await.status(), 200);
    eventually("one is paused", Duration::from_secs(15), || async { state(&pipes, &one).await == "paused" }).await;
    assert_eq!(pipes.get(&two, "/").await.status(), 200);
    eventually("two is paused and one stopped for it", Duration::from_secs(15), || async {
        state(&pipes, &two).await == "paused" && state(&pipes, &one).await == "stopped"
    })
    .await;
    eventually("two is stopped after its pause timeout", Duration::from_secs(15), || async { state(&pipes, &two).await == "stopped" }).await;
    for id in pipes.containers() {
        assert_eq!(engine_status(&id), "exited");
    }
}

#[tokio::test]
async fn an_open_websocket_keeps_a_pause_deployment_awake() {
    if common::skip() {
        return;
    }
    let (_f, pipes, host) = common::serving_app(&[("PIPES_API_TOKEN", Some(TOKEN))]);
    configure(&pipes, &host, r#"{"idle_timeout":"1s","idle_action":"pause"}"#).await;
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", pipes.port)).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{host}:{}/ws", pipes.port), stream).await.expect("handshake");
    for i in 0..4 {
        tokio::time::sleep(Duration::from_millis(800)).await;
        ws.send(Message::text(format!("ping {i}"))).await.unwrap();
        assert!(matches!(ws.next().await, Some(Ok(Message::Text(t))) if t.ends_with(&format!("ping {i}"))));
    }
    assert_eq!(state(&pipes, &host).await, "running", "3.2 s with a WebSocket open, idle timeout 1 s");
    ws.close(None).await.unwrap();
    drop(ws);
    eventually("paused once the WebSocket closed", Duration::from_secs(15), || async { state(&pipes, &host).await == "paused" }).await;
}

/// Stands in for Pipes as the registry's notification endpoint and keeps
/// what the registry sent, so the test decides when Pipes gets it.
/// The media type of the registry's notifications.
const REGISTRY_EVENTS: &str = "application/vnd.docker.distribution.events.v1+json";

struct HeldNotifications {
    port: u16,
    bodies: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
}

impl HeldNotifications {
    fn start() -> HeldNotifications {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let bodies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = bodies.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let kept = kept.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut stream = stream;
                    loop {
                        let mut length = 0;
                        loop {
                            let mut line = String::new();
                            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                                return;
                            }
                            if line == "\r\n" {
                                break;
                            }
                            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                                length = v.trim().parse().unwrap_or(0);
                            }
                        }
                        let mut body = vec![0u8; length];
                        if reader.read_exact(&mut body).is_err() {
                            return;
                        }
                        kept.lock().unwrap().push(body);
                        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
                    }
                });
            }
        });
        HeldNotifications { port, bodies }
    }

    /// Hands what the registry sent so far to Pipes' hook, each `times`
    /// times, fifty at once: a registry retrying, or a storm of them. The
    /// statuses Pipes answered.
    async fn deliver_repeatedly(&self, pipes: &Pipes, times: usize) -> Vec<u16> {
        let bodies = std::mem::take(&mut *self.bodies.lock().unwrap());
        let url = format!("http://localhost:{}/__proxyapi/hooks/registry", pipes.port);
        let client = common::client_for("localhost", pipes.port);
        let mut statuses = Vec::new();
        for body in &bodies {
            for start in (0..times).step_by(50) {
                let batch = (start..times.min(start + 50))
                    .map(|_| client.post(&url).bearer_auth(TOKEN).header("content-type", REGISTRY_EVENTS).body(body.clone()).send());
                for resp in futures_util::future::join_all(batch).await {
                    statuses.push(resp.map(|r| r.status().as_u16()).unwrap_or(0));
                }
            }
        }
        statuses
    }
}

/// A deployment that ran and was stopped, then a push of a new image of its
/// tag to a registry of the test's own, whose notification is held.
struct StoppedThenPushed {
    pipes: Pipes,
    held: HeldNotifications,
    registry: common::Registry,
    reference: String,
    host: String,
}

impl StoppedThenPushed {
    async fn new() -> StoppedThenPushed {
        let port = common::free_port();
        let pipes = Pipes::start(&[
            ("PIPES_API_TOKEN", Some(TOKEN)),
            ("DOMAINLEVELS", Some("1")),
            ("PIPES_REGISTRY", Some(&format!("127.0.0.1:{port}"))),
            ("DOCKER_AUTH", None),
        ]);
        // The registry's notifications are held until the test's own copy of
        // the pushed image is gone, so that only Pipes can bring it back.
        let held = HeldNotifications::start();
        let registry = common::Registry::start(port, &format!("http://127.0.0.1:{}/notify", held.port), TOKEN);
        let user = common::unique("w");
        let reference = format!("127.0.0.1:{port}/{user}/app:v1");
        let push = |id: &str| {
            common::build_image(&reference, &format!("FROM {}\nLABEL pipes.fixture={reference}#{id}\nENV FIXTURE_ID={id}\n", common::env().fixture));
            docker_ok(&["push", "-q", &reference]);
            docker_ok(&["rmi", &reference]);
        };
        push("one");
        let host = format!("v1.app.{user}.localhost");
        assert_eq!(json(pipes.get(&host, "/").await).await.1["id"], "one");
        let (status, _) = api(&pipes, &host, "POST", "/__proxyapi/container/stop", None, Some(TOKEN)).await;
        assert_eq!(status, 200);
        push("two");
        eventually("the registry sent its notification", Duration::from_secs(30), || async { !held.bodies.lock().unwrap().is_empty() }).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        StoppedThenPushed { pipes, held, registry, reference, host }
    }
}

#[tokio::test]
async fn a_push_pulls_a_stopped_deployment_ahead_and_its_next_start_runs_the_new_image() {
    if common::skip() {
        return;
    }
    let StoppedThenPushed { pipes, held, registry, reference, host } = StoppedThenPushed::new().await;
    let statuses = held.deliver_repeatedly(&pipes, 1).await;
    assert!(!statuses.is_empty() && statuses.iter().all(|s| *s == 202), "{statuses:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !pipes.log().contains("ahead of its next start") {
        assert!(std::time::Instant::now() < deadline, "the notification pulled nothing:\n{}\n--- registry\n{}", pipes.log(), registry.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let local = common::docker(&["image", "inspect", "-f", "{{.Config.Env}}", &reference]);
    assert!(String::from_utf8_lossy(&local.stdout).contains("FIXTURE_ID=two"), "the new image is local: {local:?}\n{}", pipes.log());

    let (status, body) = json(pipes.get(&host, "/").await).await;
    assert_eq!(status, 200);
    assert_eq!(body["id"], "two", "the new image serves, not the stopped container's");
    let log = pipes.log();
    let after_request = &log[log.find("ahead of its next start").unwrap_or(0)..];
    assert!(!after_request.contains(": pulling "), "no pull on the request path:\n{log}");
    assert!(after_request.contains("making a new generation"), "{log}");
    drop(registry);
}

/// Pulls of `reference` the engine made between `since` and now (Unix seconds).
fn pulls_since(reference: &str, since: u64) -> usize {
    let until = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 1;
    let events = docker_ok(&[
        "events",
        "--since",
        &since.to_string(),
        "--until",
        &until.to_string(),
        "--filter",
        "type=image",
        "--filter",
        "event=pull",
        "--format",
        "{{.Actor.ID}}",
    ]);
    events.lines().filter(|id| *id == reference).count()
}

#[tokio::test]
async fn a_storm_of_push_notifications_pulls_once() {
    if common::skip() {
        return;
    }
    let StoppedThenPushed { pipes, held, registry, reference, host } = StoppedThenPushed::new().await;
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() - 1;
    let copies = held.bodies.lock().unwrap().clone();
    let statuses = held.deliver_repeatedly(&pipes, 300).await;
    assert!(statuses.iter().all(|s| *s == 202), "every notification is taken: {statuses:?}");
    eventually("the pull ahead", Duration::from_secs(30), || async { pipes.log().contains("ahead of its next start") }).await;
    // A second storm while the first pull's image is here.
    held.bodies.lock().unwrap().extend(copies);
    held.deliver_repeatedly(&pipes, 300).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pulls = pulls_since(&reference, since);
    assert_eq!(pulls, 1, "{} notifications, one pull:\n{}", statuses.len() * 2, pipes.log());
    assert_eq!(json(pipes.get(&host, "/").await).await.1["id"], "two", "and the next start runs it");
    drop(registry);
}

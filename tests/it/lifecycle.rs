//! The life of a deployment after its first start, against the real engine:
//! engine events, redeploys and rollbacks, tag watching, and long-lived
//! connections (WebSocket, stream, upload) through every lifecycle event —
//! idle stop, redeploy, SIGTERM and the zero-downtime upgrade.

use crate::common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{api, docker_ok, eventually, json, running, Fixtures, Pipes};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

const TOKEN: &str = "lifecycle-token-0123456789";
const DOMAIN: &str = "example.com";

/// What a long-lived connection saw.
#[derive(Debug)]
struct Outcome {
    kind: Kind,
    /// The identities of the fixture that answered.
    ids: Vec<String>,
    /// Messages, lines or bytes that arrived complete.
    units: usize,
    /// Whether it ended the way its protocol ends.
    clean: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    WebSocket,
    Stream,
    Upload,
}

const KINDS: [Kind; 3] = [Kind::WebSocket, Kind::Stream, Kind::Upload];
/// Every long-lived connection exchanges this many units, one every `TICK`.
const UNITS: usize = 16;
const TICK: Duration = Duration::from_millis(250);

/// Opens a long-lived connection of `kind` to `host` through Pipes and keeps
/// it busy for `UNITS` × `TICK`.
async fn long_lived(kind: Kind, port: u16, host: String) -> Outcome {
    match kind {
        Kind::WebSocket => {
            let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
            let url = format!("ws://{host}:{port}/ws");
            let (mut ws, response) = tokio_tungstenite::client_async(url, stream).await.expect("the WebSocket handshake");
            assert_eq!(response.status(), 101);
            let (mut ids, mut units) = (Vec::new(), 0);
            for i in 0..UNITS {
                ws.send(Message::text(format!("ping {i}"))).await.expect("send");
                match ws.next().await {
                    Some(Ok(Message::Text(text))) => {
                        let (id, echo) = text.split_once(": ").expect("id: message");
                        assert_eq!(echo, format!("ping {i}"));
                        ids.push(id.to_owned());
                        units += 1;
                    }
                    other => {
                        return Outcome {
                            kind,
                            ids,
                            units,
                            clean: {
                                eprintln!("ws: {other:?}");
                                false
                            },
                        }
                    }
                }
                tokio::time::sleep(TICK).await;
            }
            let clean = ws.close(None).await.is_ok();
            Outcome { kind, ids, units, clean }
        }
        Kind::Stream => {
            let client = common::client_for(&host, port);
            let url = format!("http://{host}:{port}/stream?lines={UNITS}&interval_ms={}", TICK.as_millis());
            let resp = client.get(url).send().await.expect("the stream starts");
            assert_eq!(resp.status(), 200);
            let mut body = resp.bytes_stream();
            let mut text = String::new();
            let mut clean = true;
            while let Some(chunk) = body.next().await {
                match chunk {
                    Ok(bytes) => text.push_str(&String::from_utf8_lossy(&bytes)),
                    Err(e) => {
                        eprintln!("stream: {e}");
                        clean = false;
                        break;
                    }
                }
            }
            let units = text.lines().filter(|l| l.starts_with("line ")).count();
            Outcome { kind, ids: Vec::new(), units, clean: clean && units == UNITS }
        }
        Kind::Upload => {
            let chunks = futures_util::stream::unfold(0usize, |i| async move {
                if i == UNITS {
                    return None;
                }
                tokio::time::sleep(TICK).await;
                Some((Ok::<_, std::io::Error>(vec![b'u'; 64 * 1024]), i + 1))
            });
            let client = common::client_for(&host, port);
            let resp = client.post(format!("http://{host}:{port}/upload")).body(reqwest::Body::wrap_stream(chunks)).send().await;
            match resp {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let (_, body) = json(resp).await;
                    let bytes = body["bytes"].as_u64().unwrap_or(0) as usize;
                    Outcome {
                        kind,
                        ids: body["id"].as_str().map(str::to_owned).into_iter().collect(),
                        units: bytes / (64 * 1024),
                        clean: status == 200 && bytes == UNITS * 64 * 1024,
                    }
                }
                Err(e) => {
                    eprintln!("upload: {e}");
                    Outcome { kind, ids: Vec::new(), units: 0, clean: false }
                }
            }
        }
    }
}

/// Starts one long-lived connection of each kind.
fn open_all(port: u16, host: &str) -> Vec<tokio::task::JoinHandle<Outcome>> {
    KINDS.iter().map(|&k| tokio::spawn(long_lived(k, port, host.to_owned()))).collect()
}

/// Waits for them and checks each ran to its end, answered by `id`.
async fn all_complete(connections: Vec<tokio::task::JoinHandle<Outcome>>, id: &str) {
    for c in connections {
        let outcome = c.await.expect("the connection task");
        assert!(outcome.clean, "{:?} did not end cleanly: {outcome:?}", outcome.kind);
        assert_eq!(outcome.units, UNITS, "{outcome:?}");
        assert!(outcome.ids.iter().all(|i| i == id), "{:?} was answered by {:?}, expected {id}", outcome.kind, outcome.ids);
    }
}

/// A request loop: `clients` tasks send GETs until stopped (or 60 s), and
/// record each status and identity.
struct Load {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<(u16, String)>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(pipes: &Pipes, host: &str, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..clients)
            .map(|_| {
                let (client, url, stop, seen) = (pipes.client(host), pipes.url(host, "/"), stop.clone(), seen.clone());
                tokio::spawn(async move {
                    let deadline = Instant::now() + Duration::from_secs(60);
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        let entry = match client.get(&url).send().await {
                            Ok(resp) => {
                                let status = resp.status().as_u16();
                                let body: serde_json::Value = resp.json().await.unwrap_or_default();
                                (status, body["id"].as_str().unwrap_or("").to_owned())
                            }
                            Err(e) => (0, e.to_string()),
                        };
                        seen.lock().unwrap().push(entry);
                    }
                })
            })
            .collect();
        Load { stop, seen, tasks }
    }

    /// Stops the loop; every status and identity, in order of arrival.
    async fn finish(self) -> Vec<(u16, String)> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("load task");
        }
        Arc::try_unwrap(self.seen).expect("tasks ended").into_inner().unwrap()
    }
}

fn failures(seen: &[(u16, String)]) -> Vec<&(u16, String)> {
    seen.iter().filter(|(status, _)| *status != 200).collect()
}

/// A Pipes with `changes` serving a fresh `app:main` that answers as `one`;
/// its fixtures (to push again) and the deployment's host.
fn serving_one(changes: &[(&str, Option<&str>)]) -> (Fixtures, Pipes, String) {
    let mut f = Fixtures::new();
    f.push("app", "main", "one", "");
    let pipes = Pipes::start(changes);
    let host = f.host("app", "main", DOMAIN);
    (f, pipes, host)
}

/// The state of `host`'s deployment as `GET container` says.
async fn state(pipes: &Pipes, host: &str) -> serde_json::Value {
    let (status, body) = api(pipes, host, "GET", "/__proxyapi/container", None, Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test]
async fn a_killed_container_leaves_the_table_at_once_and_a_started_one_is_adopted() {
    if common::skip() {
        return;
    }
    let (_f, pipes, host) = common::serving_app(&[("PIPES_API_TOKEN", Some(TOKEN))]);
    assert_eq!(pipes.get(&host, "/").await.status(), 200);
    let id = pipes.containers()[0].clone();

    docker_ok(&["kill", &id]);
    let killed = Instant::now();
    // No request to the deployment: only the engine's event tells Pipes.
    eventually("the list shows it stopped", Duration::from_secs(10), || async {
        let (_, list) = api(&pipes, DOMAIN, "GET", "/__proxyapi/deployments", None, Some(TOKEN)).await;
        list["deployments"][0]["state"] == "stopped" && list["deployments"][0]["upstream"].is_null()
    })
    .await;
    eprintln!("stopped and out of the table {:?} after docker kill", killed.elapsed());
    assert!(pipes.log().contains("no more requests go to it"), "{}", pipes.log());

    docker_ok(&["start", &id]);
    eventually("a container started by hand is adopted", Duration::from_secs(15), || async {
        let body = state(&pipes, &host).await;
        body["state"] == "running" && body["upstream"].is_string()
    })
    .await;
    assert_eq!(pipes.containers(), vec![id], "adopted, not replaced");
}

#[tokio::test]
async fn a_redeploy_under_load_fails_no_request_and_a_rollback_brings_the_old_one_back() {
    if common::skip() {
        return;
    }
    let (mut f, pipes, host) = serving_one(&[("PIPES_API_TOKEN", Some(TOKEN)), ("PIPES_DRAIN_TIMEOUT", Some("5s"))]);
    let (_, body) = json(pipes.get(&host, "/").await).await;
    assert_eq!(body["id"], "one");
    let (status, same) = api(&pipes, &host, "POST", "/__proxyapi/container/redeploy", None, Some(TOKEN)).await;
    assert_eq!((status, &same["changed"]), (200, &serde_json::json!(false)), "{same}");

    f.push("app", "main", "two", "");
    let load = Load::start(&pipes, &host, 4);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, swap) = api(&pipes, &host, "POST", "/__proxyapi/container/redeploy", None, Some(TOKEN)).await;
    assert_eq!(status, 200, "{swap}");
    assert_eq!(swap["changed"], true);
    assert_ne!(swap["previous"]["digest"], swap["current"]["digest"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen = load.finish().await;
    assert!(failures(&seen).is_empty(), "every request during the redeploy answered 200: {:?}", failures(&seen));
    let first_two = seen.iter().position(|(_, id)| id == "two").expect("the new generation served");
    assert!(seen[..first_two].iter().all(|(_, id)| id == "one"));
    eprintln!("{} requests during the redeploy, all 200", seen.len());
    let (_, body) = json(pipes.get(&host, "/").await).await;
    assert_eq!(body["id"], "two");

    let old = swap["previous"]["container"].as_str().unwrap().to_owned();
    eventually("the old generation is drained and stopped", Duration::from_secs(20), || async { !running(&old) }).await;
    assert_eq!(pipes.containers().len(), 2, "the previous generation is kept for a rollback");
    let body = state(&pipes, &host).await;
    assert_eq!(body["previous"]["id"], old.as_str(), "{body}");

    let began = Instant::now();
    let (status, back) = api(&pipes, &host, "POST", "/__proxyapi/container/rollback", None, Some(TOKEN)).await;
    assert_eq!(status, 200, "{back}");
    eprintln!("rollback answered in {:?}", began.elapsed());
    assert_eq!(back["current"]["container"], old.as_str());
    let (_, body) = json(pipes.get(&host, "/").await).await;
    assert_eq!(body["id"], "one");
}

#[tokio::test]
async fn a_crashing_push_never_replaces_a_good_container() {
    if common::skip() {
        return;
    }
    let mut f = Fixtures::new();
    f.push("app", "main", "good", "");
    let pipes = Pipes::start(&[("PIPES_API_TOKEN", Some(TOKEN))]);
    let host = f.host("app", "main", DOMAIN);
    let (status, body) = api(&pipes, &host, "PUT", "/__proxyapi/container/config", Some(r#"{"health":{"timeout":"2s"}}"#), Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    let good = pipes.containers();

    f.push("app", "main", "bad", "ENV FIXTURE_MODE=crash");
    let (status, body) = api(&pipes, &host, "POST", "/__proxyapi/container/redeploy", None, Some(TOKEN)).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"], "container_exited");
    assert!(body["logs"].to_string().contains("crashing on purpose"), "{body}");
    let (status, body) = json(pipes.get(&host, "/").await).await;
    assert_eq!((status, body["id"].as_str()), (200, Some("good")), "the good container keeps serving");
    assert_eq!(pipes.containers(), good, "the failed generation was removed");

    f.push("app", "main", "hangs", "ENV FIXTURE_MODE=hang");
    let (status, body) = api(&pipes, &host, "POST", "/__proxyapi/container/redeploy", None, Some(TOKEN)).await;
    assert_eq!(status, 504, "{body}");
    let (status, body) = json(pipes.get(&host, "/").await).await;
    assert_eq!((status, body["id"].as_str()), (200, Some("good")), "the good container keeps serving");
    assert_eq!(pipes.containers(), good, "the never-ready generation was removed");
}

#[tokio::test]
async fn a_watched_tag_follows_pushes() {
    if common::skip() {
        return;
    }
    let (mut f, pipes, host) = serving_one(&[("PIPES_API_TOKEN", Some(TOKEN)), ("PIPES_WATCH", Some("1s"))]);
    assert_eq!(json(pipes.get(&host, "/").await).await.1["id"], "one");
    f.push("app", "main", "two", "");
    eventually("the pushed image serves", Duration::from_secs(30), || async { json(pipes.get(&host, "/").await).await.1["id"] == "two" }).await;
}

#[tokio::test]
async fn the_registry_notifies_pipes_of_a_push() {
    if common::skip() {
        return;
    }
    // A registry of this test's own, whose notifications go to this test's Pipes.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let pipes = Pipes::start(&[
        ("PIPES_API_TOKEN", Some(TOKEN)),
        ("DOMAINLEVELS", Some("1")),
        ("PIPES_REGISTRY", Some(&format!("127.0.0.1:{port}"))),
        ("DOCKER_AUTH", None),
    ]);
    let registry = common::Registry::start(port, &format!("http://localhost:{}/__proxyapi/hooks/registry", pipes.port), TOKEN);
    let user = common::unique("n");
    let reference = format!("127.0.0.1:{port}/{user}/app:v1");
    let push = |id: &str| {
        common::build_image(&reference, &format!("FROM {}\nLABEL pipes.fixture={reference}#{id}\nENV FIXTURE_ID={id}\n", common::env().fixture));
        docker_ok(&["push", "-q", &reference]);
    };
    push("one");
    docker_ok(&["rmi", &reference]);
    let host = format!("v1.app.{user}.localhost");
    assert_eq!(json(pipes.get(&host, "/").await).await.1["id"], "one");

    // The pushed image stays here until the end: removing it would race the
    // redeploy the notification starts (the run's clean-up removes it by its
    // label should the test fail).
    push("two");
    eventually("the registry's notification redeployed it", Duration::from_secs(30), || async { json(pipes.get(&host, "/").await).await.1["id"] == "two" })
        .await;
    // At least once, unordered: the registry may send a push more than once.
    let created = pipes.log().matches(&format!("{user}/app:v1: created container")).count();
    assert_eq!(created, 2, "one container per generation:\n{}", pipes.log());

    // Docker Hub's webhook shape, token in the query as Hub must send it.
    let hub = format!(r#"{{"push_data":{{"tag":"v1"}},"repository":{{"repo_name":"{user}/app"}}}}"#);
    let url = format!("http://localhost:{}/__proxyapi/hooks/registry?token={TOKEN}", pipes.port);
    let resp = common::client_for("localhost", pipes.port).post(url).header("content-type", "application/json").body(hub).send().await.unwrap();
    let (status, body) = json(resp).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["redeploying"][0], format!("{user}/app:v1"));
    assert!(!pipes.log().contains(TOKEN), "the token is never logged");
    drop(registry);
    drop(pipes);
    let _ = common::docker(&["rmi", "-f", &reference]);
}

#[tokio::test]
async fn long_lived_connections_keep_an_idle_deployment_running() {
    if common::skip() {
        return;
    }
    let (_f, pipes, host) = serving_one(&[("PIPES_API_TOKEN", Some(TOKEN))]);
    let (status, body) = api(&pipes, &host, "PUT", "/__proxyapi/container/config", Some(r#"{"idle_timeout":"1s"}"#), Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    let connections = open_all(pipes.port, &host);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let body = state(&pipes, &host).await;
    assert_eq!(body["open_connections"], 3, "{body}");
    assert!(body["idle_at"].is_null(), "not idle while something is open: {body}");
    // Each runs 4 s: well past the idle timeout, which counts from the end.
    all_complete(connections, "one").await;
    let id = pipes.containers()[0].clone();
    eventually("stopped once idle", Duration::from_secs(15), || async { !running(&id) }).await;
}

#[tokio::test]
async fn long_lived_connections_survive_a_redeploy() {
    if common::skip() {
        return;
    }
    let (mut f, pipes, host) = serving_one(&[("PIPES_API_TOKEN", Some(TOKEN))]);
    assert_eq!(pipes.get(&host, "/").await.status(), 200);
    let old = pipes.containers()[0].clone();
    let connections = open_all(pipes.port, &host);
    tokio::time::sleep(Duration::from_secs(1)).await;
    f.push("app", "main", "two", "");
    let (status, body) = api(&pipes, &host, "POST", "/__proxyapi/container/redeploy", None, Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(pipes.get(&host, "/").await).await.1["id"], "two", "new requests go to the new generation");
    assert!(running(&old), "the old generation drains");
    all_complete(connections, "one").await;
    eventually("the drained generation stops", Duration::from_secs(20), || async { !running(&old) }).await;
}

#[tokio::test]
async fn sigterm_lets_requests_and_connections_in_flight_finish() {
    if common::skip() {
        return;
    }
    let (_f, mut pipes, host) = serving_one(&[]);
    assert_eq!(pipes.get(&host, "/").await.status(), 200);
    let slow = {
        let (client, url) = (pipes.client(&host), pipes.url(&host, "/slow?ms=2000"));
        tokio::spawn(async move { client.get(url).send().await.map(|r| r.status().as_u16()) })
    };
    let connections = open_all(pipes.port, &host);
    tokio::time::sleep(Duration::from_millis(500)).await;
    pipes.signal("TERM");
    let stopped = Instant::now();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(std::net::TcpStream::connect(("127.0.0.1", pipes.port)).is_err(), "no new connections after SIGTERM");
    assert_eq!(slow.await.unwrap().expect("the slow request is answered"), 200);
    all_complete(connections, "one").await;
    let status = tokio::task::spawn_blocking(move || {
        let status = pipes.wait_exit(Duration::from_secs(20));
        (status, pipes)
    });
    let (status, pipes) = status.await.unwrap();
    let status = status.expect("Pipes exits once nothing is in flight");
    assert!(status.success(), "{status:?}\n{}", pipes.log());
    let took = stopped.elapsed();
    eprintln!("exited {took:?} after SIGTERM");
    assert!(took < Duration::from_secs(25), "not after the whole drain timeout (30 s)");
    assert!(pipes.log().contains("every request in flight finished"), "{}", pipes.log());
}

#[tokio::test]
async fn an_upgrade_under_load_fails_no_request_and_adopts_the_containers() {
    if common::skip() {
        return;
    }
    let (_f, mut pipes, host) = serving_one(&[]);
    assert_eq!(pipes.get(&host, "/").await.status(), 200);
    let containers = pipes.containers();
    let connections = open_all(pipes.port, &host);
    let load = Load::start(&pipes, &host, 4);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut old = pipes.upgrade();
    all_complete(connections, "one").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen = load.finish().await;
    assert!(failures(&seen).is_empty(), "no request failed during the upgrade: {:?}", failures(&seen));
    eprintln!("{} requests during the upgrade, all 200", seen.len());
    let old_status = tokio::task::spawn_blocking(move || old.wait()).await.unwrap().unwrap();
    assert!(old_status.success(), "the old process exits cleanly: {old_status:?}");
    assert_eq!(pipes.get(&host, "/").await.status(), 200, "the new process serves");
    assert_eq!(pipes.containers(), containers, "the new process adopted the container, no duplicate");
}

#[tokio::test]
async fn a_1_gib_upload_streams_through_with_flat_memory() {
    if common::skip() {
        return;
    }
    let (_f, pipes, host) = serving_one(&[]);
    assert_eq!(pipes.get(&host, "/").await.status(), 200);
    let (before, _) = pipes.memory_kib();
    let sent = Arc::new(AtomicUsize::new(0));
    let chunk = bytes::Bytes::from(vec![b'z'; 1 << 20]);
    let counter = sent.clone();
    let body = futures_util::stream::iter((0..1024).map(move |_| {
        counter.fetch_add(1, Ordering::Relaxed);
        Ok::<_, std::io::Error>(chunk.clone())
    }));
    let resp = pipes.client(&host).post(pipes.url(&host, "/upload")).body(reqwest::Body::wrap_stream(body)).send().await.unwrap();
    let (status, answer) = json(resp).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["bytes"], 1u64 << 30);
    let (_, peak) = pipes.memory_kib();
    eprintln!("Pipes resident memory: {before} KiB before, peak {peak} KiB during a 1 GiB upload");
    assert!(peak < before + 64 * 1024, "memory stayed flat: {before} KiB → peak {peak} KiB");
}

/// A WebSocket through Pipes to `host`, after one echo.
async fn websocket(port: u16, host: &str) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{host}:{port}/ws"), stream).await.expect("handshake");
    ws.send(Message::text("hello")).await.unwrap();
    assert!(matches!(ws.next().await, Some(Ok(Message::Text(_)))));
    ws
}

#[tokio::test]
async fn websockets_open_at_the_drain_deadline_are_closed_with_1001() {
    if common::skip() {
        return;
    }
    let (mut f, mut pipes, host) = serving_one(&[("PIPES_API_TOKEN", Some(TOKEN)), ("PIPES_DRAIN_TIMEOUT", Some("2s"))]);

    // A redeploy drains the old generation for 2 s.
    let mut on_old = websocket(pipes.port, &host).await;
    f.push("app", "main", "two", "");
    let (status, body) = api(&pipes, &host, "POST", "/__proxyapi/container/redeploy", None, Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(common::close_code(&mut on_old).await, Some(1001), "going away, as the old generation stops");

    // SIGTERM drains Pipes for 2 s.
    let mut open = websocket(pipes.port, &host).await;
    pipes.signal("TERM");
    assert_eq!(common::close_code(&mut open).await, Some(1001), "going away, as Pipes stops");
    let status = tokio::task::spawn_blocking(move || pipes.wait_exit(Duration::from_secs(20))).await.unwrap();
    assert!(status.expect("Pipes exits").success());
}

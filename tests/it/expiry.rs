//! Expiry against the engine: a deployment no request reached for its
//! `expire_after` goes whole — containers, tag config, image — and a signed
//! webhook says so; one with an open WebSocket stays; the time of the last
//! request survives a restart of Pipes.

use crate::common;
use crate::webhooks::{Receiver, SECRET};

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use common::{api, docker, eventually, Fixtures, Pipes};

const TOKEN: &str = "expiry-token-0123456789";
const DOMAIN: &str = "example.com";

/// The containers of `deployment` (`user/repo:tag`) on the engine.
fn containers_of(pipes: &Pipes, deployment: &str) -> usize {
    let out =
        docker(&["ps", "-aq", "--filter", &format!("label=pipes.instance={}", pipes.instance), "--filter", &format!("label=pipes.deployment={deployment}")]);
    String::from_utf8_lossy(&out.stdout).lines().count()
}

#[tokio::test]
async fn an_unused_deployment_expires_whole_and_an_open_one_stays() {
    if common::skip() {
        return;
    }
    let receiver = Receiver::start();
    let mut f = Fixtures::new();
    f.serving("app", "v1");
    f.serving("app", "v2");
    let pipes = Pipes::start(&[
        ("PIPES_API_TOKEN", Some(TOKEN)),
        ("PIPES_DOMAIN", Some(DOMAIN)),
        ("PIPES_WEBHOOK_URL", Some(&receiver.url("/ok"))),
        ("PIPES_WEBHOOK_SECRET", Some(SECRET)),
    ]);
    let (v1, v2) = (f.host("app", "v1", DOMAIN), f.host("app", "v2", DOMAIN));
    let (d1, d2) = (format!("{}/app:v1", f.user), format!("{}/app:v2", f.user));
    for host in [&v1, &v2] {
        let (status, body) = api(&pipes, host, "PUT", "/__proxyapi/container/config", Some(r#"{"expire_after":"3s"}"#), Some(TOKEN)).await;
        assert_eq!(status, 200, "{body}");
    }
    assert!(pipes.containers().is_empty(), "an expiry change starts nothing");
    assert_eq!(pipes.get(&v1, "/").await.status(), 200);
    let (_, state) = api(&pipes, &v1, "GET", "/__proxyapi/container", None, Some(TOKEN)).await;
    assert!(state["expires_at"].as_str().is_some_and(|t| t.ends_with('Z')), "{state}");
    // v2 holds a WebSocket open through all of it.
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", pipes.port)).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{v2}:{}/ws", pipes.port), stream).await.expect("handshake");
    ws.send(Message::text("hello")).await.unwrap();
    assert!(matches!(ws.next().await, Some(Ok(Message::Text(_)))));

    let config = pipes.dir.join(format!("configs/repos/{}/app/tags/v1.json", f.user));
    assert!(config.exists());
    eventually("v1 expires", Duration::from_secs(30), || async { containers_of(&pipes, &d1) == 0 }).await;
    eventually("its expired webhook arrives", Duration::from_secs(10), || async { !receiver.of("/ok", "expired").is_empty() }).await;
    let told = &receiver.of("/ok", "expired")[0];
    assert_eq!((told["valid"].as_bool(), told["body"]["deployment"].as_str()), (Some(true), Some(d1.as_str())), "{told}");
    assert!(!config.exists(), "its tag config went with it");
    assert!(!common::image_present(&f.reference("app", "v1")), "and its image, which nothing else used");

    // v2, quiet but for its open WebSocket for longer than 3 s, stays.
    assert_eq!(containers_of(&pipes, &d2), 1);
    ws.send(Message::text("still")).await.unwrap();
    assert!(matches!(ws.next().await, Some(Ok(Message::Text(t))) if t.contains("still")));
    drop(ws);
    eventually("v2 expires once its WebSocket closed", Duration::from_secs(30), || async { containers_of(&pipes, &d2) == 0 }).await;

    // A removed deployment comes back as new on its next request.
    assert_eq!(pipes.get(&v1, "/").await.status(), 200);
    assert_eq!(containers_of(&pipes, &d1), 1);
}

#[tokio::test]
async fn the_last_request_survives_a_restart() {
    if common::skip() {
        return;
    }
    let mut f = Fixtures::new();
    f.serving("app", "v1");
    let mut pipes = Pipes::start(&[("PIPES_API_TOKEN", Some(TOKEN)), ("PIPES_EXPIRE_AFTER", Some("1h"))]);
    let host = f.host("app", "v1", DOMAIN);
    assert_eq!(pipes.get(&host, "/").await.status(), 200);
    let record = pipes.dir.join("configs/activity.json");
    let key = format!("{}/app:v1", f.user);
    eventually("the last request is recorded", Duration::from_secs(20), || async { std::fs::read_to_string(&record).is_ok_and(|t| t.contains(&key)) }).await;
    let view = |pipes: &Pipes| {
        let (pipes, host) = (pipes.port, host.clone());
        async move {
            let resp = common::client_for(&host, pipes).get(format!("http://{host}:{pipes}/__proxyapi/container")).bearer_auth(TOKEN).send().await.unwrap();
            common::json(resp).await.1
        }
    };
    // The request's end (after its cold start) is recorded at the next
    // expiry pass, which may come after its start was.
    let last = view(&pipes).await["last_request_at"].as_str().expect("a last request").to_owned();
    let stored = || {
        let record: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&record).unwrap_or_default()).unwrap_or_default();
        record[&key].as_u64().map(|ms| humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string())
    };
    eventually("the request's end is recorded", Duration::from_secs(20), || async { stored().as_deref() == Some(last.as_str()) }).await;
    let before = view(&pipes).await["expires_at"].clone();
    assert!(before.is_string(), "{before}");
    pipes.restart();
    assert_eq!(view(&pipes).await["expires_at"], before, "counted from the last request, not from the restart");
}

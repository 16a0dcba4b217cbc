//! Signed webhooks to a receiver written as a user would write one (Python,
//! checking each signature with its own `hmac`): what happens to a
//! deployment arrives, retried with one delivery id, filtered by `notify`,
//! and a receiver that never answers holds up no start.

use crate::common;

use std::process::{Child, Command};
use std::time::Duration;

use common::{api, eventually, free_port, sample, Fixtures, Pipes};
use serde_json::Value;

const TOKEN: &str = "webhooks-token-0123456789";
pub(crate) const SECRET: &str = "webhooks-secret-0123456789";
const DOMAIN: &str = "example.com";

/// The Python receiver on 127.0.0.1, stopped on drop.
pub(crate) struct Receiver {
    child: Child,
    port: u16,
    out: std::path::PathBuf,
}

impl Receiver {
    pub(crate) fn start() -> Receiver {
        let port = free_port();
        let out = std::env::temp_dir().join(common::unique("webhooks")).with_extension("jsonl");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/webhooks/receiver.py");
        let child = Command::new("python3").args([script, &port.to_string(), SECRET, &out.display().to_string()]).spawn().expect("python3 runs");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "the receiver did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        Receiver { child, port, out }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Every request it got, in order.
    fn got(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.out).unwrap_or_default().lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect()
    }

    /// The requests to `path` for `event`.
    pub(crate) fn of(&self, path: &str, event: &str) -> Vec<Value> {
        self.got().into_iter().filter(|r| r["path"] == path && r["event"] == event).collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.out);
    }
}

#[tokio::test]
async fn happenings_arrive_signed_retried_with_one_delivery_id_and_filtered() {
    if common::skip() {
        return;
    }
    let receiver = Receiver::start();
    let mut f = Fixtures::new();
    f.serving("app", "v1");
    let metrics = free_port();
    let urls = format!("{},{}", receiver.url("/ok"), receiver.url("/flaky"));
    let pipes = Pipes::start(&[
        ("PIPES_API_TOKEN", Some(TOKEN)),
        ("PIPES_DOMAIN", Some(DOMAIN)),
        ("PIPES_WEBHOOK_URL", Some(&urls)),
        ("PIPES_WEBHOOK_SECRET", Some(SECRET)),
        ("PIPES_METRICS_LISTEN", Some(&format!("127.0.0.1:{metrics}"))),
    ]);
    let host = f.host("app", "v1", DOMAIN);
    let deployment = format!("{}/app:v1", f.user);
    assert_eq!(pipes.get(&host, "/").await.status(), 200);

    // Told at once where the receiver takes it, signed.
    eventually("ready arrives", Duration::from_secs(10), || async { !receiver.of("/ok", "ready").is_empty() }).await;
    let starting = receiver.of("/ok", "starting");
    assert_eq!(starting.len(), 1, "{starting:?}");
    let ready = &receiver.of("/ok", "ready")[0];
    assert_eq!(ready["valid"], true, "Python's hmac accepts the signature: {ready}");
    let body = &ready["body"];
    assert_eq!(body["deployment"], deployment);
    assert_eq!(body["url"], format!("http://{host}:{}/", pipes.port));
    assert!(body["digest"].as_str().is_some_and(|d| d.starts_with("sha256:")), "{body}");
    assert!(body["at"].as_str().is_some_and(|a| a.ends_with('Z')), "{body}");
    for phase in ["pull", "create", "start", "probe"] {
        assert!(body["phases_ms"][phase].is_u64(), "{phase} timed: {body}");
    }

    // Where the receiver answers 500 twice: three tries, one delivery id.
    eventually("the third try of ready is taken", Duration::from_secs(40), || async { receiver.of("/flaky", "ready").len() >= 3 }).await;
    let tries = receiver.of("/flaky", "ready");
    assert_eq!(tries.len(), 3, "no fourth try after a 200: {tries:?}");
    assert!(tries.iter().all(|t| t["delivery"] == tries[0]["delivery"] && t["valid"] == true), "{tries:?}");
    assert_ne!(tries[0]["delivery"], ready["delivery"], "each receiver's delivery has its own id");

    // A redeploy and a rollback.
    f.push("app", "v1", "v1-new", "");
    let (status, body) = api(&pipes, &host, "POST", "/__proxyapi/container/redeploy", None, Some(TOKEN)).await;
    assert_eq!((status, body["changed"].as_bool()), (200, Some(true)), "{body}");
    let (status, body) = api(&pipes, &host, "POST", "/__proxyapi/container/rollback", None, Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    eventually("redeployed and rolled back arrive", Duration::from_secs(10), || async {
        !receiver.of("/ok", "redeployed").is_empty() && !receiver.of("/ok", "rolled_back").is_empty()
    })
    .await;

    // The repository chooses: only stops and deletions from now on.
    let (status, body) = api(&pipes, &host, "PUT", "/__proxyapi/repository/config", Some(r#"{"notify":["stopped","deleted"]}"#), Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = api(&pipes, &host, "PUT", "/__proxyapi/repository/config", Some(r#"{"notify":["stoped"]}"#), Some(TOKEN)).await;
    assert_eq!((status, body["field"].as_str()), (422, Some("notify")), "{body}");
    let (status, _) = api(&pipes, &host, "POST", "/__proxyapi/container/stop", None, Some(TOKEN)).await;
    assert_eq!(status, 200);
    eventually("stopped arrives", Duration::from_secs(10), || async { !receiver.of("/ok", "stopped").is_empty() }).await;
    assert_eq!(pipes.get(&host, "/").await.status(), 200);
    let (status, _) = api(&pipes, &host, "DELETE", "/__proxyapi/container", None, Some(TOKEN)).await;
    assert_eq!(status, 200);
    eventually("deleted arrives", Duration::from_secs(10), || async { !receiver.of("/ok", "deleted").is_empty() }).await;
    assert_eq!(receiver.of("/ok", "starting").len(), 1, "the second start was not told: notify leaves it out");
    assert_eq!(receiver.of("/ok", "deleted")[0]["body"]["reason"], "deleted");

    let text = reqwest::get(format!("http://127.0.0.1:{metrics}/metrics")).await.unwrap().text().await.unwrap();
    assert!(sample(&text, r#"pipes_webhook_deliveries_total{result="delivered"}"#).is_some_and(|n| n >= 6.0), "{text}");
}

#[tokio::test]
async fn a_receiver_that_never_answers_holds_up_no_start() {
    if common::skip() {
        return;
    }
    let receiver = Receiver::start();
    let mut f = Fixtures::new();
    f.serving("app", "v1");
    let pipes = Pipes::start(&[("PIPES_WEBHOOK_URL", Some(&receiver.url("/hang"))), ("PIPES_WEBHOOK_SECRET", Some(SECRET))]);
    let host = f.host("app", "v1", DOMAIN);
    // The receiver holds `starting` unanswered (for an hour) while the start
    // goes on: its first request is answered all the same.
    let began = std::time::Instant::now();
    assert_eq!(pipes.get(&host, "/").await.status(), 200);
    eprintln!("cold start with a receiver that never answers: {:?}", began.elapsed());
    eventually("the receiver got starting and ready", Duration::from_secs(10), || async {
        !receiver.of("/hang", "starting").is_empty() && !receiver.of("/hang", "ready").is_empty()
    })
    .await;
    assert_eq!(pipes.get(&host, "/again").await.status(), 200);
}

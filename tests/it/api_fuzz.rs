//! Arbitrary methods, paths and bodies thrown at the API of a running Pipes:
//! no 5xx, no crash, and whatever is refused changes no config file. And
//! arbitrary bytes thrown at its port: every connection is answered with
//! HTTP or closed, and Pipes serves on.

use crate::common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use common::{snapshot, Pipes};
use pipes::config::DeployConfig;
use proptest::prelude::*;
use serde_json::Value;

const TOKEN: &str = "fuzz-token-0123456789";
const HOST: &str = "v1.app.fuzz.example.com";
const METHODS: &[&str] = &["GET", "PUT", "POST", "DELETE", "PATCH", "HEAD", "OPTIONS"];
const FIELDS: &[&str] = &["port", "env", "cmd", "memory", "cpus", "health", "path", "timeout", "idle_timeout", "restart", "pull"];

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-1e6f64..1e6).prop_map(Value::from),
        "[a-z0-9/:. -]{0,12}".prop_map(Value::from),
        prop_oneof![Just("512m"), Just("15m"), Just("/healthz"), Just("always"), Just("no")].prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(prop_oneof![prop::sample::select(FIELDS).prop_map(str::to_owned), "[A-Za-z_]{1,8}"], inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(Vec::new()),
        prop::collection::vec(any::<u8>(), 0..300),
        json_value().prop_map(|v| v.to_string().into_bytes()),
        json_value().prop_map(|v| {
            let mut s = v.to_string();
            s.truncate(s.len() / 2);
            s.into_bytes()
        }),
    ]
}

fn path() -> impl Strategy<Value = String> {
    let known: Vec<&'static str> = std::iter::once("/__proxyapi").chain(pipes::api::Endpoint::ALL.iter().map(|e| e.path())).collect();
    let (k1, k2, k3) = (known.clone(), known.clone(), known);
    prop_oneof![
        prop::sample::select(k1).prop_map(str::to_owned),
        (prop::sample::select(k2), "[a-z/._%?=&-]{0,16}").prop_map(|(k, s)| format!("{k}{s}")),
        "/__proxyapi(/[a-z0-9_.%-]{0,10}){0,3}",
        (prop::sample::select(k3), "-?[0-9a-z]{0,6}").prop_map(|(k, t)| format!("{k}?tail={t}")),
    ]
}

/// Method, path and body; two in five are config PUTs, so bodies reach the parser.
fn request() -> impl Strategy<Value = (&'static str, String, Vec<u8>)> {
    prop_oneof![
        3 => (prop::sample::select(METHODS), path(), body()),
        2 => (
            Just("PUT"),
            prop::sample::select(&["/__proxyapi/container/config", "/__proxyapi/repository/config"][..]).prop_map(str::to_owned),
            body(),
        ),
    ]
}

#[test]
fn arbitrary_api_requests_are_refused_cleanly() {
    if common::skip() {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The fuzz user may not be deployed: a valid container config is refused
    // by the policy, so nothing starts; repository configs may be written.
    let pipes = Pipes::start(&[("PIPES_API_TOKEN", Some(TOKEN)), ("PIPES_ALLOW", Some("someoneelse/*"))]);
    let configs = pipes.dir.join("configs");
    let sent = AtomicUsize::new(0);
    let statuses = Mutex::new(BTreeMap::<u16, usize>::new());

    let config = ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() };
    proptest!(config, |((method, path, body) in request(),
                        with_token in prop::bool::weighted(0.9), on_domain in prop::bool::weighted(0.1),
                        as_json in prop::bool::weighted(0.9))| {
        let host = if on_domain { "example.com" } else { HOST };
        let before = snapshot(&configs);
        let (status, text) = rt.block_on(async {
            let mut req = pipes.client(host).request(method.parse().unwrap(), pipes.url(host, &path)).body(body.clone());
            if with_token {
                req = req.bearer_auth(TOKEN);
            }
            if as_json {
                req = req.header("content-type", "application/json");
            }
            let resp = req.send().await.expect("Pipes answers every request");
            // The event stream is accepted and never ends: its head is the answer.
            if resp.headers().get("content-type").is_some_and(|t| t == "text/event-stream") {
                return (resp.status().as_u16(), String::new());
            }
            (resp.status().as_u16(), resp.text().await.unwrap_or_default())
        });
        sent.fetch_add(1, Ordering::Relaxed);
        *statuses.lock().unwrap().entry(status).or_default() += 1;
        prop_assert!(status < 500, "{method} {path} -> {status}: {text}");
        let after = snapshot(&configs);
        if status >= 400 {
            prop_assert_eq!(&before, &after, "a refused request changed a config: {} {} -> {}", method, path, status);
        } else if before != after {
            // Only an accepted PUT of a valid repository config writes.
            prop_assert!(method == "PUT" && path.starts_with("/__proxyapi/repository/config"), "{method} {path}");
            prop_assert!(DeployConfig::from_json(&body).is_ok());
        }
    });
    assert!(pipes.containers().is_empty(), "nothing was started");
    let last = rt.block_on(pipes.get(HOST, "/__proxyapi/container"));
    assert!(last.status().as_u16() < 500, "Pipes still answers");
    eprintln!("sent {} requests; statuses: {:?}", sent.load(Ordering::Relaxed), statuses.lock().unwrap());
}

/// Raw request bytes: garbage, and valid requests with bytes replaced,
/// inserted or cut.
fn raw_request() -> impl Strategy<Value = Vec<u8>> {
    let valid = prop::sample::select(vec![
        "GET / HTTP/1.1\r\nHost: v1.app.fuzz.example.com\r\n\r\n",
        "GET / HTTP/1.0\r\n\r\n",
        "POST /__proxyapi/repository/config HTTP/1.1\r\nHost: v1.app.fuzz.example.com\r\nContent-Length: 2\r\n\r\n{}",
        "POST / HTTP/1.1\r\nHost: v1.app.fuzz.example.com\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "GET /ws HTTP/1.1\r\nHost: v1.app.fuzz.example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
    ]);
    let edit = (any::<prop::sample::Index>(), prop::collection::vec(any::<u8>(), 0..8), 0usize..3);
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..200),
        (valid, prop::collection::vec(edit, 0..4)).prop_map(|(v, edits)| {
            let mut bytes = v.as_bytes().to_vec();
            for (at, insert, kind) in edits {
                let i = at.index(bytes.len() + 1);
                let end = match kind {
                    0 => i,
                    1 => (i + insert.len()).min(bytes.len()),
                    _ => bytes.len(),
                };
                let insert = if kind == 2 { Vec::new() } else { insert };
                bytes.splice(i..end, insert);
            }
            bytes
        }),
    ]
}

#[test]
fn arbitrary_bytes_are_answered_or_closed_and_pipes_serves_on() {
    if common::skip() {
        return;
    }
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    let pipes = Pipes::start(&[("PIPES_API_TOKEN", Some(TOKEN)), ("PIPES_ALLOW", Some("fuzz/*"))]);
    let statuses = Mutex::new(BTreeMap::<String, usize>::new());
    let config = ProptestConfig { cases: 1500, failure_persistence: None, ..ProptestConfig::default() };
    proptest!(config, |(bytes in raw_request())| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", pipes.port)).expect("Pipes accepts");
        let _ = s.write_all(&bytes);
        // The client is done: an unfinished head ends here, not at the deadline.
        let _ = s.shutdown(std::net::Shutdown::Write);
        s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let (mut answer, mut buf, deadline) = (Vec::new(), [0u8; 4096], Instant::now() + Duration::from_secs(15));
        let closed = loop {
            match s.read(&mut buf) {
                Ok(0) => break true,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                    if Instant::now() > deadline { break false; }
                }
                Err(_) => break true,
            }
        };
        prop_assert!(closed, "the connection ended: {:?}", String::from_utf8_lossy(&bytes));
        let kind = match common::status_of(&answer) {
            Some(status) => status.to_string(),
            None if answer.is_empty() => "closed".to_owned(),
            None if answer.starts_with(&[0, 0]) => "http/2".to_owned(),
            None => format!("other: {:?}", String::from_utf8_lossy(&answer[..answer.len().min(40)])),
        };
        prop_assert!(!kind.starts_with("other") && !kind.starts_with('5'), "{kind} for {:?}", String::from_utf8_lossy(&bytes));
        *statuses.lock().unwrap().entry(kind).or_default() += 1;
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    let last = rt.block_on(pipes.get(HOST, "/__proxyapi/container"));
    assert!(last.status().as_u16() < 500, "Pipes still answers");
    assert!(!pipes.log().contains("panicked"), "{}", pipes.log());
    eprintln!("answers to arbitrary bytes: {:?}", statuses.lock().unwrap());
}

//! Anonymous event streams cannot take Pipes' connections: they are served
//! only for names a request could start, capped per client address and, all
//! together, to a share of `PIPES_MAX_CONNECTIONS`; a stream whose client
//! left gives its place back at once. Raw sockets, as an attacker's would be.

use crate::common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{status_of, Fixtures, Pipes};

const DOMAIN: &str = "example.com";
const TOKEN: &str = "streams-token-0123456789";

/// Opens the event stream of `host` on a raw socket (as client `from`, told
/// to Pipes by a trusted proxy's `X-Forwarded-For`, if given): the socket,
/// and the answer's status.
fn open_stream(port: u16, host: &str, from: Option<&str>, token: Option<&str>) -> (TcpStream, u16) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let forwarded = from.map(|a| format!("X-Forwarded-For: {a}\r\n")).unwrap_or_default();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(s, "GET /__proxyapi/events HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n{forwarded}{auth}\r\n").expect("request sent");
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout set");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    let status = status_of(&head).unwrap_or(0);
    (s, status)
}

#[tokio::test]
async fn anonymous_streams_are_for_startable_names_only_and_capped_per_client() {
    if common::skip() {
        return;
    }
    let mut f = Fixtures::new();
    f.serving("app", "v1");
    let allow = format!("{}/*", f.user);
    let pipes = Pipes::start(&[("PIPES_ALLOW", Some(&allow)), ("PIPES_MAX_STREAMS_PER_CLIENT", Some("4"))]);
    let app = f.host("app", "v1", DOMAIN);

    assert_eq!(open_stream(pipes.port, &format!("v1.app.someone{}.{DOMAIN}", f.user), None, None).1, 403, "a name the policy refuses");
    assert_eq!(open_stream(pipes.port, &f.host("nothing", "v1", DOMAIN), None, None).1, 404, "an image the registry does not have");

    let mut open: Vec<TcpStream> = (0..4)
        .map(|_| {
            let (s, status) = open_stream(pipes.port, &app, None, None);
            assert_eq!(status, 200);
            s
        })
        .collect();
    assert_eq!(open_stream(pipes.port, &app, None, None).1, 429, "a fifth stream of one client");
    assert_eq!(pipes.get(&app, "/").await.status(), 200, "requests go on");

    // The client leaves: its places come back well before the 15 s heartbeat
    // would have told a stream that only writes.
    open.clear();
    let port = pipes.port;
    let again = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let streams: Vec<(TcpStream, u16)> = (0..4).map(|_| open_stream(port, &f.host("app", "v1", DOMAIN), None, None)).collect();
            if streams.iter().all(|(_, s)| *s == 200) {
                return true;
            }
            if std::time::Instant::now() > deadline {
                return false;
            }
            drop(streams);
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    assert!(again.await.unwrap(), "the places of closed streams came back within 10 s");
}

#[tokio::test]
async fn anonymous_streams_keep_to_their_share_of_connections() {
    if common::skip() {
        return;
    }
    let mut f = Fixtures::new();
    f.serving("app", "v1");
    // A quarter of 24 connections: 6 anonymous streams at most, whoever opens them.
    let pipes = Pipes::start(&[("PIPES_MAX_CONNECTIONS", Some("24")), ("PIPES_TRUSTED_PROXIES", Some("127.0.0.1/32")), ("PIPES_API_TOKEN", Some(TOKEN))]);
    let app = f.host("app", "v1", DOMAIN);
    let mut open = Vec::new();
    for i in 0..6 {
        let (s, status) = open_stream(pipes.port, &app, Some(&format!("192.0.2.{}", i + 1)), None);
        assert_eq!(status, 200, "stream {i}, from its own address");
        open.push(s);
    }
    let (_refused, status) = open_stream(pipes.port, &app, Some("192.0.2.99"), None);
    assert_eq!(status, 503, "a seventh anonymous stream, from yet another address");
    let (_operator, status) = open_stream(pipes.port, &app, Some("192.0.2.100"), Some(TOKEN));
    assert_eq!(status, 200, "an operator's stream is not held to the public share");
    assert_eq!(pipes.get(&app, "/").await.status(), 200, "and requests are served meanwhile");
}

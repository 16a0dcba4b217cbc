//! Pipes' front door against clients that bend HTTP/1.1: request lines that
//! are not origin-form, pipelined requests, header spellings a CGI or WSGI
//! server would read as Pipes' own, and state changes through safe methods
//! or from other sites. Raw sockets where a library would tidy the request.

use crate::common;

use std::time::Duration;

use common::{raw_exchange, status_of};

/// The answers in `raw`, as (status, body) in order.
fn answers(raw: &[u8]) -> Vec<(u16, String)> {
    let text = String::from_utf8_lossy(raw).into_owned();
    let mut out = Vec::new();
    let mut rest = text.as_str();
    while let Some(start) = rest.find("HTTP/1.1 ") {
        rest = &rest[start..];
        let Some((head, after)) = rest.split_once("\r\n\r\n") else { break };
        let status = status_of(head.as_bytes()).unwrap_or(0);
        let length =
            head.lines().find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap_or(0))).unwrap_or(0);
        let body = after.get(..length).unwrap_or(after).to_owned();
        out.push((status, body));
        rest = &after[length.min(after.len())..];
    }
    out
}

#[tokio::test]
async fn request_targets_that_are_not_origin_form_are_refused_never_rewritten() {
    if common::skip() {
        return;
    }
    let (_f, pipes, host) = common::serving_app(&[]);
    assert_eq!(pipes.get(&host, "/").await.status(), 200);
    for line in ["GET  /a HTTP/1.1", "GET a/b HTTP/1.1", "GET ?x=1 HTTP/1.1", "GET * HTTP/1.1"] {
        let request = format!("{line}\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let (answer, _) = raw_exchange(pipes.port, request.as_bytes(), Duration::from_secs(5));
        assert_eq!(status_of(&answer), Some(400), "{line:?}: {}", String::from_utf8_lossy(&answer));
    }
    let options = format!("OPTIONS * HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let (answer, _) = raw_exchange(pipes.port, options.as_bytes(), Duration::from_secs(5));
    assert_ne!(status_of(&answer), Some(400), "OPTIONS * is a request line of its own: {}", String::from_utf8_lossy(&answer));
    let fine = format!("GET /a?b=1 HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let (answer, _) = raw_exchange(pipes.port, fine.as_bytes(), Duration::from_secs(5));
    let found = answers(&answer);
    assert_eq!(found.len(), 1);
    let body: serde_json::Value = serde_json::from_str(&found[0].1).unwrap();
    assert_eq!(body["path"], "/a?b=1");
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    if common::skip() {
        return;
    }
    let (_f, pipes, host) = common::serving_app(&[]);
    assert_eq!(pipes.get(&host, "/").await.status(), 200);
    // All three in one segment, as apt sends them; a body in the middle.
    let three = format!(
        "GET /first HTTP/1.1\r\nHost: {host}\r\n\r\n\
         POST /second HTTP/1.1\r\nHost: {host}\r\nContent-Length: 2\r\n\r\nhi\
         GET /third HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    );
    let (answer, closed) = raw_exchange(pipes.port, three.as_bytes(), Duration::from_secs(10));
    let found = answers(&answer);
    let seen: Vec<(u16, String, String)> = found
        .iter()
        .map(|(status, body)| {
            let body: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
            (*status, body["path"].as_str().unwrap_or("").to_owned(), body["body"].as_str().unwrap_or("").to_owned())
        })
        .collect();
    let expected = [(200, "/first", ""), (200, "/second", "hi"), (200, "/third", "")].map(|(s, p, b)| (s, p.to_owned(), b.to_owned()));
    assert_eq!(seen, expected, "every pipelined request answered, in order: {}", String::from_utf8_lossy(&answer));
    assert!(closed, "and the last one's Connection: close ends it");
}

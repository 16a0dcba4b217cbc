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

const TOKEN: &str = "front-door-token-0123456789";

/// Serves `html` to every request on a port of 127.0.0.1, another site than
/// Pipes' domain, for as long as the test runs; the port.
fn serve_page(html: String) -> u16 {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten().take(20) {
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let answer = format!("HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{html}", html.len());
            let _ = stream.write_all(answer.as_bytes());
        }
    });
    port
}

#[tokio::test]
async fn head_never_acts_and_api_bodies_are_json() {
    if common::skip() {
        return;
    }
    let (_f, pipes, host) = common::serving_app(&[("PIPES_API_TOKEN", Some(TOKEN))]);
    assert_eq!(pipes.get(&host, "/").await.status(), 200);
    let client = pipes.client(&host);
    let stop = pipes.url(&host, "/__proxyapi/container/stop");
    let head = client.head(&stop).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(head.status(), 405, "HEAD asks, never acts");
    let (_, state) = common::api(&pipes, &host, "GET", "/__proxyapi/container", None, Some(TOKEN)).await;
    assert_eq!(state["state"], "running", "{state}");

    let config = pipes.url(&host, "/__proxyapi/repository/config");
    for (content_type, body) in [(Some("text/plain"), "{}"), (Some("application/x-www-form-urlencoded"), "a=1"), (None, "{}")] {
        let mut req = client.put(&config).bearer_auth(TOKEN).body(body);
        if let Some(t) = content_type {
            req = req.header("content-type", t);
        }
        let (status, answer) = common::json(req.send().await.unwrap()).await;
        assert_eq!(status, 415, "{content_type:?}: {answer}");
        assert_eq!(answer["error"], "unsupported_media_type");
    }
    let json = client.put(&config).bearer_auth(TOKEN).header("content-type", "application/json; charset=utf-8").body("{}").send().await.unwrap();
    assert_eq!(json.status(), 200);

    // The original API's GET stops, for clients that are no browser.
    assert_eq!(client.get(&stop).bearer_auth(TOKEN).send().await.unwrap().status(), 200);
    let (_, state) = common::api(&pipes, &host, "GET", "/__proxyapi/container", None, Some(TOKEN)).await;
    assert_eq!(state["state"], "stopped", "{state}");
}

#[tokio::test]
async fn a_page_of_another_site_cannot_drive_an_open_api() {
    if common::skip() {
        return;
    }
    let (_f, pipes, host) = common::serving_app(&[("PIPES_API_AUTH", Some("none")), ("PIPES_ACCESS_LOG", Some("json"))]);
    assert_eq!(pipes.get(&host, "/").await.status(), 200);
    let stop = pipes.url(&host, "/__proxyapi/container/stop");
    // A page elsewhere embeds the stop URL and posts to it, as a hostile
    // site would; Chromium says where the requests come from.
    let page = format!(
        "<img src='{stop}'><script>fetch('{stop}', {{ method: 'POST', mode: 'no-cors' }}).then(() => document.title = 'sent', () => document.title = 'sent');</script>"
    );
    let elsewhere = serve_page(page);
    let browser = common::browser::Browser::start().await;
    browser.goto(&format!("http://127.0.0.1:{elsewhere}/")).await;
    browser.until("the page sent its requests", Duration::from_secs(20), "return document.title === 'sent'").await;
    common::eventually("both requests reached Pipes", Duration::from_secs(10), || async {
        pipes.log().lines().filter(|l| l.contains("\"path\":\"/__proxyapi/container/stop\"")).count() >= 2
    })
    .await;
    let refused = pipes.log().lines().filter(|l| l.contains("\"path\":\"/__proxyapi/container/stop\"") && l.contains("\"status\":403")).count();
    assert!(refused >= 2, "both refused:\n{}", pipes.log());
    let (_, state) = common::api(&pipes, &host, "GET", "/__proxyapi/container", None, None).await;
    assert_eq!(state["state"], "running", "the deployment still runs: {state}");

    // The same GET without a browser's word on its origin still stops, as promised.
    assert_eq!(pipes.client(&host).get(&stop).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn what_a_crashing_app_prints_reaches_operators_only() {
    if common::skip() {
        return;
    }
    let mut f = common::Fixtures::new();
    // What the app prints while crashing holds its database's password.
    f.publish("app", "v1", "ENV FIXTURE_MODE=crash\nENV FIXTURE_ID=postgres://app:hunter2@db.internal/app");
    let pipes = common::Pipes::start(&[("PIPES_API_TOKEN", Some(TOKEN)), ("PIPES_FAILURE_TTL", Some("1s"))]);
    let host = f.host("app", "v1", "example.com");

    let (status, body) = common::json(pipes.get(&host, "/").await).await;
    assert_eq!(status, 502);
    assert_eq!((body["error"].as_str(), body["exit_code"].as_i64()), (Some("container_exited"), Some(3)), "{body}");
    let html = pipes.client(&host).get(pipes.url(&host, "/")).header("accept", "text/html").send().await.unwrap().text().await.unwrap();
    let (stream, _) = raw_exchange(pipes.port, format!("GET /__proxyapi/events HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes(), Duration::from_secs(2));
    let stream = String::from_utf8_lossy(&stream).into_owned();
    assert!(stream.contains("container_exited"), "the public stream tells the failure: {stream}");
    for (view, text) in [("502 body", body.to_string()), ("error page", html), ("event stream", stream)] {
        assert!(!text.contains("hunter2"), "{view} shows what the app printed to anonymous clients: {text}");
    }

    // Started again once its failure is forgotten: the same crash, told once.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(pipes.get(&host, "/").await.status(), 502);
    let (_, state) = common::api(&pipes, &host, "GET", "/__proxyapi/container", None, Some(TOKEN)).await;
    let logs: Vec<&str> = state["last_error"]["logs"].as_array().expect("the operator sees the lines").iter().filter_map(|l| l.as_str()).collect();
    assert!(logs.iter().any(|l| l.contains("hunter2")), "{state}");
    let mut unique = logs.clone();
    unique.dedup();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), logs.len(), "no line twice: {logs:?}");

    let open = common::Pipes::start(&[("PIPES_PUBLIC_LOGS", Some("true"))]);
    let (_, body) = common::json(open.get(&host, "/").await).await;
    assert!(body.to_string().contains("hunter2"), "PIPES_PUBLIC_LOGS shows them to everyone: {body}");
}

#[tokio::test]
async fn header_spellings_a_cgi_server_would_read_as_the_edges_do_not_pass() {
    if common::skip() {
        return;
    }
    let (_f, pipes, host) = common::serving_app(&[]);
    let request = format!(
        "GET /h HTTP/1.1\r\nHost: {host}\r\nX_Real_IP: 6.6.6.6\r\nX_Forwarded_For: 6.6.6.6\r\nX-Forwarded-Port: 1\r\n\
         X-Forwarded-Prefix: /admin\r\nTrue-Client-IP: 6.6.6.6\r\nX-App: kept\r\nConnection: close\r\n\r\n"
    );
    let (answer, _) = raw_exchange(pipes.port, request.as_bytes(), Duration::from_secs(10));
    let found = answers(&answer);
    assert_eq!(found.len(), 1, "{}", String::from_utf8_lossy(&answer));
    let body: serde_json::Value = serde_json::from_str(&found[0].1).unwrap();
    let seen = &body["headers"];
    for name in ["x_real_ip", "x_forwarded_for", "x-forwarded-port", "x-forwarded-prefix", "true-client-ip"] {
        assert!(seen[name].is_null(), "{name} reached the container: {seen}");
    }
    assert_eq!(seen["x-app"], "kept");
    assert_eq!(seen["x-real-ip"], "127.0.0.1", "Pipes' own word: {seen}");

    let keeping = common::Pipes::start(&[("PIPES_UNDERSCORE_HEADERS", Some("true"))]);
    let (answer, _) = raw_exchange(keeping.port, request.as_bytes(), Duration::from_secs(10));
    let body: serde_json::Value = serde_json::from_str(&answers(&answer)[0].1).unwrap();
    assert_eq!(body["headers"]["x_real_ip"], "6.6.6.6", "kept where the operator asks");
}

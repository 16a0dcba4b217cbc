//! Private deployments with real clients: curl with and without
//! credentials, a forward-auth server of the test's own, share links, and
//! WebSockets and server-sent events behind each kind of access. A refused
//! request never reaches the engine: the tests count containers.

use crate::common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use common::{api, free_port, sample, Fixtures, Pipes};

const TOKEN: &str = "access-token-0123456789";
const DOMAIN: &str = "example.com";

/// `user:hash` as `htpasswd -nbB` writes it: the hash alone.
fn bcrypt_hash(user: &str, password: &str) -> String {
    let out = Command::new("htpasswd").args(["-nbB", user, password]).output().expect("htpasswd runs (scripts/test installs apache2-utils)");
    let line = String::from_utf8(out.stdout).expect("text");
    line.trim().split_once(':').expect("user:hash").1.to_owned()
}

/// What curl saw: status, headers (lower-case names), body.
struct Seen {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|_| panic!("not JSON ({}): {}", self.status, self.body))
    }
}

/// `curl` to `path` on `host` through Pipes, with `extra` arguments; never follows redirects.
fn curl(pipes: &Pipes, host: &str, path: &str, extra: &[&str]) -> Seen {
    let out = Command::new("curl")
        .args(["-sS", "-i", "--max-time", "60", "--resolve", &format!("{host}:{}:127.0.0.1", pipes.port)])
        .args(extra)
        .arg(format!("http://{host}:{}{path}", pipes.port))
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("an HTTP answer: {text}{}", String::from_utf8_lossy(&out.stderr)));
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).expect("a status line");
    let headers = lines.filter_map(|l| l.split_once(':')).map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned())).collect();
    Seen { status, headers, body: body.to_owned() }
}

/// Puts `config` as the tag's own config of `host`.
async fn put_config(pipes: &Pipes, host: &str, config: serde_json::Value) -> (u16, serde_json::Value) {
    api(pipes, host, "PUT", "/__proxyapi/container/config", Some(&config.to_string()), Some(TOKEN)).await
}

/// A WebSocket to `/ws` of `host` with `headers`: `Ok` after one echo, or
/// the status the handshake was refused with.
async fn websocket(pipes: &Pipes, host: &str, headers: &[(&str, &str)]) -> Result<(), u16> {
    let mut request = format!("ws://{host}:{}/ws", pipes.port).into_client_request().expect("request");
    for (name, value) in headers {
        request.headers_mut().insert(http::HeaderName::from_bytes(name.as_bytes()).unwrap(), value.parse().unwrap());
    }
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", pipes.port)).await.expect("connect");
    match tokio_tungstenite::client_async(request, stream).await {
        Ok((mut ws, _)) => {
            ws.send(Message::text("hello")).await.expect("send");
            let echo = ws.next().await;
            assert!(matches!(echo, Some(Ok(Message::Text(ref t))) if t.contains("hello")), "{echo:?}");
            Ok(())
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => Err(response.status().as_u16()),
        Err(e) => panic!("handshake: {e}"),
    }
}

/// Server-sent events of `/sse` on `host` with `args` for curl: how many arrived.
fn sse_events(pipes: &Pipes, host: &str, args: &[&str]) -> usize {
    let seen = curl(pipes, host, "/sse?events=3&interval_ms=10", args);
    assert_eq!(seen.status, 200, "{}", seen.body);
    assert_eq!(seen.header("content-type"), Some("text/event-stream"));
    seen.body.matches("data:").count()
}

#[tokio::test]
async fn basic_auth_lets_in_only_right_credentials_and_never_wakes_a_deployment() {
    if common::skip() {
        return;
    }
    let mut f = Fixtures::new();
    f.serving("app", "v1");
    let metrics = free_port();
    let pipes =
        Pipes::start(&[("PIPES_API_TOKEN", Some(TOKEN)), ("PIPES_METRICS_LISTEN", Some(&format!("127.0.0.1:{metrics}"))), ("PIPES_ACCESS_LOG", Some("json"))]);
    let host = f.host("app", "v1", DOMAIN);
    let deployment = format!("{}/app:v1", f.user);
    let hash = bcrypt_hash("alice", "s3cret");

    // Saved; only access changed, so nothing starts.
    let (status, body) = put_config(&pipes, &host, serde_json::json!({ "access": { "basic": { "alice": hash } } })).await;
    assert_eq!(status, 200, "{body}");
    assert!(pipes.containers().is_empty(), "an access change starts nothing");

    // Fifty strangers: 401 each, with the challenge; the engine never hears of it.
    for _ in 0..50 {
        let seen = curl(&pipes, &host, "/", &[]);
        assert_eq!(seen.status, 401, "{}", seen.body);
        assert_eq!(seen.header("www-authenticate"), Some(format!("Basic realm=\"{deployment}\", charset=\"UTF-8\"").as_str()));
    }
    assert_eq!(curl(&pipes, &host, "/", &["-u", "alice:wrong"]).status, 401);
    assert_eq!(curl(&pipes, &host, "/", &["-u", "mallory:s3cret"]).status, 401);
    assert!(pipes.containers().is_empty(), "no pull, no container: {:?}", pipes.containers());

    // The right password: served, without the header Pipes checked.
    let seen = curl(&pipes, &host, "/", &["-u", "alice:s3cret", "-H", "X-App: kept"]);
    assert_eq!(seen.status, 200, "{}", seen.body);
    let echoed = seen.json();
    assert!(echoed["headers"].get("authorization").is_none(), "the credentials stay at the edge: {echoed}");
    assert_eq!(echoed["headers"]["x-app"], "kept");
    assert_eq!(seen.header("x-robots-tag"), Some("noindex, nofollow"), "previews are not indexed by default");

    // Behind basic: a WebSocket and server-sent events, with and without credentials.
    let basic = format!("Basic {}", base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "alice:s3cret"));
    assert_eq!(websocket(&pipes, &host, &[]).await, Err(401));
    assert_eq!(websocket(&pipes, &host, &[("authorization", &basic)]).await, Ok(()));
    assert_eq!(curl(&pipes, &host, "/sse?events=1", &[]).status, 401);
    assert_eq!(sse_events(&pipes, &host, &["-u", "alice:s3cret"]), 3);

    // The API keeps its own token, whatever the access rules say.
    let (status, state) = api(&pipes, &host, "GET", "/__proxyapi/container", None, Some(TOKEN)).await;
    assert_eq!((status, state["state"].as_str()), (200, Some("running")), "{state}");

    // Stopped, it stays stopped for strangers.
    let (status, _) = api(&pipes, &host, "POST", "/__proxyapi/container/stop", None, Some(TOKEN)).await;
    assert_eq!(status, 200);
    let before = common::engine_state(&pipes);
    for _ in 0..50 {
        assert_eq!(curl(&pipes, &host, "/", &["-u", "alice:nope"]).status, 401);
    }
    assert_eq!(common::engine_state(&pipes), before, "no start, no unpause");

    // Counted by reason, logged by check.
    let text = reqwest::get(format!("http://127.0.0.1:{metrics}/metrics")).await.unwrap().text().await.unwrap();
    let counted = |reason: &str| sample(&text, &format!("pipes_access_denied_total{{deployment=\"{deployment}\",reason=\"{reason}\"}}"));
    assert!(counted("basic").is_some_and(|n| n >= 50.0), "{text}");
    let log = pipes.log();
    assert!(log.contains(r#""access":"basic","access_allowed":true"#), "{log}");
    assert!(log.contains(r#""access":"basic","access_allowed":false"#), "{log}");

    // noindex off by config; the password still holds.
    let (status, body) = put_config(&pipes, &host, serde_json::json!({ "access": { "basic": { "alice": hash } }, "noindex": false })).await;
    assert_eq!(status, 200, "{body}");
    let seen = curl(&pipes, &host, "/", &["-u", "alice:s3cret"]);
    assert_eq!(seen.status, 200);
    assert_eq!(seen.header("x-robots-tag"), None);
    assert_eq!(curl(&pipes, &host, "/", &[]).status, 401);

    // A password in place of a hash is refused, naming the field; nothing changes.
    let (status, body) = put_config(&pipes, &host, serde_json::json!({ "access": { "basic": { "alice": "s3cret" } } })).await;
    assert_eq!((status, body["field"].as_str()), (422, Some("access.basic.alice")), "{body}");
    assert_eq!(curl(&pipes, &host, "/", &["-u", "alice:s3cret"]).status, 200);
}

#[tokio::test]
async fn allowed_addresses_count_the_client_behind_a_trusted_proxy_only() {
    if common::skip() {
        return;
    }
    let mut f = Fixtures::new();
    f.serving("app", "v1");
    f.serving("app", "v2");
    // The operator's default: only 10.9.8.0/24, which no test client is.
    let mut pipes = Pipes::start(&[("PIPES_API_TOKEN", Some(TOKEN)), ("PIPES_ACCESS", Some(r#"{"allow_ips":["10.9.8.0/24"]}"#))]);
    let (v1, v2) = (f.host("app", "v1", DOMAIN), f.host("app", "v2", DOMAIN));
    let seen = curl(&pipes, &v1, "/", &["-H", "X-Forwarded-For: 10.9.8.7"]);
    assert_eq!((seen.status, seen.json()["error"].as_str()), (403, Some("access_denied")), "an untrusted peer's X-Forwarded-For is not believed");
    assert_eq!(websocket(&pipes, &v1, &[]).await, Err(403));
    assert!(pipes.containers().is_empty());

    // Behind a trusted proxy (127.0.0.1 here), the client it names counts.
    pipes.set_env("PIPES_TRUSTED_PROXIES", "127.0.0.1");
    pipes.restart();
    assert_eq!(curl(&pipes, &v1, "/", &["-H", "X-Forwarded-For: 10.9.8.7"]).status, 200);
    assert_eq!(curl(&pipes, &v1, "/", &["-H", "X-Forwarded-For: 10.9.9.7"]).status, 403);
    assert_eq!(curl(&pipes, &v1, "/", &[]).status, 403, "the proxy itself is not the client it names");
    assert_eq!(websocket(&pipes, &v1, &[("x-forwarded-for", "10.9.8.7")]).await, Ok(()));
    assert_eq!(websocket(&pipes, &v1, &[("x-forwarded-for", "10.9.9.7")]).await, Err(403));
    assert_eq!(sse_events(&pipes, &v1, &["-H", "X-Forwarded-For: 10.9.8.7"]), 3);

    // A deployment's own access replaces the default: v2 opens to 127.0.0.1.
    let (status, body) = put_config(&pipes, &v2, serde_json::json!({ "access": { "allow_ips": ["127.0.0.1"] } })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(curl(&pipes, &v2, "/", &[]).status, 200);
    assert_eq!(curl(&pipes, &v1, "/", &[]).status, 403, "v1 keeps the default");
}

/// What the test's auth server saw: the headers of each request to `/auth`.
type Asked = Arc<Mutex<Vec<HashMap<String, String>>>>;

/// An auth server in the manner of oauth2-proxy on 127.0.0.1: `/auth`
/// answers 202 with the user for a `session=ok` cookie, else 302 to
/// `/login`, which sets the cookie; `/slow` answers after 3 s.
async fn auth_server() -> (u16, Asked, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().unwrap().port();
    let asked: Asked = Arc::default();
    let seen = asked.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let mut headers = [httparse::EMPTY_HEADER; 32];
                let mut req = httparse::Request::new(&mut headers);
                let _ = req.parse(&buf);
                let path = req.path.unwrap_or("/").to_owned();
                let got: HashMap<String, String> =
                    req.headers.iter().map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).into_owned())).collect();
                let answer = match path.split('?').next().unwrap_or("") {
                    "/login" => "HTTP/1.1 200 OK\r\nSet-Cookie: session=ok; Path=/\r\nContent-Length: 9\r\n\r\nlogged in".to_owned(),
                    "/slow" => {
                        tokio::time::sleep(Duration::from_secs(3)).await;
                        "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_owned()
                    }
                    _ => {
                        let signed_in = got.get("cookie").is_some_and(|c| c.contains("session=ok"));
                        seen.lock().unwrap().push(got.clone());
                        if signed_in {
                            "HTTP/1.1 202 Accepted\r\nX-Auth-Request-User: alice\r\nX-Auth-Request-Email: alice@example.com\r\n\
                             Set-Cookie: refreshed=1; Path=/\r\nContent-Length: 0\r\n\r\n"
                                .to_owned()
                        } else {
                            let rd = format!(
                                "http://{}{}",
                                got.get("x-forwarded-host").cloned().unwrap_or_default(),
                                got.get("x-forwarded-uri").cloned().unwrap_or_default()
                            );
                            let body = "sign in first";
                            format!(
                                "HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:{port}/login?rd={rd}\r\nSet-Cookie: csrf=abc; Path=/\r\n\
                                 Content-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                                body.len()
                            )
                        }
                    }
                };
                let _ = conn.write_all(answer.as_bytes()).await;
            });
        }
    });
    (port, asked, task)
}

// Two workers: curl blocks one while the auth server answers on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_auth_redirects_to_sign_in_then_lets_through_with_its_headers() {
    if common::skip() {
        return;
    }
    let mut f = Fixtures::new();
    f.serving("app", "v1");
    let (auth_port, asked, auth) = auth_server().await;
    let prefix = format!("http://127.0.0.1:{auth_port}/");
    let pipes = Pipes::start(&[("PIPES_API_TOKEN", Some(TOKEN)), ("PIPES_FORWARD_AUTH_URLS", Some(&prefix)), ("PIPES_FORWARD_AUTH_TIMEOUT", Some("1s"))]);
    let host = f.host("app", "v1", DOMAIN);
    let forward_auth = |path: &str| {
        serde_json::json!({ "access": { "forward_auth": {
            "url": format!("http://127.0.0.1:{auth_port}{path}"),
            "copy_headers": ["X-Auth-Request-User", "X-Auth-Request-Email"],
        } } })
    };

    // Only auth servers the operator named.
    let elsewhere = serde_json::json!({ "access": { "forward_auth": { "url": "http://127.0.0.2:4180/oauth2/auth" } } });
    let (status, body) = put_config(&pipes, &host, elsewhere).await;
    assert_eq!((status, body["field"].as_str()), (422, Some("access.forward_auth.url")), "{body}");
    let (status, body) = put_config(&pipes, &host, forward_auth("/auth")).await;
    assert_eq!(status, 200, "{body}");

    // Not signed in: the auth server's own answer, as it came.
    let seen = curl(&pipes, &host, "/page?q=1", &["-H", "Accept: text/html"]);
    assert_eq!(seen.status, 302, "{}", seen.body);
    let location = seen.header("location").expect("a login redirect").to_owned();
    assert_eq!(location, format!("http://127.0.0.1:{auth_port}/login?rd=http://{host}:{}/page?q=1", pipes.port));
    assert_eq!(seen.header("set-cookie"), Some("csrf=abc; Path=/"));
    assert_eq!(seen.body, "sign in first");
    assert!(pipes.containers().is_empty(), "nothing started for a stranger");
    let first = asked.lock().unwrap()[0].clone();
    assert_eq!(first.get("x-forwarded-method").map(String::as_str), Some("GET"));
    assert_eq!(first.get("x-forwarded-proto").map(String::as_str), Some("http"));
    assert_eq!(first.get("x-forwarded-uri").map(String::as_str), Some("/page?q=1"));
    assert_eq!(first.get("x-forwarded-for").map(String::as_str), Some("127.0.0.1"));
    assert_eq!(first.get("accept").map(String::as_str), Some("text/html"));

    // Signing in at the login page sets the cookie; with it, the app answers.
    let login = Command::new("curl").args(["-sS", "-i", &location]).output().expect("curl");
    let login = String::from_utf8_lossy(&login.stdout);
    assert!(login.contains("Set-Cookie: session=ok"), "{login}");
    let seen = curl(&pipes, &host, "/", &["-H", "Cookie: session=ok; theme=dark", "-H", "X-Auth-Request-User: mallory", "-H", "X-Auth-Request-Email: forged"]);
    assert_eq!(seen.status, 200, "{}", seen.body);
    let echoed = seen.json();
    assert_eq!(echoed["headers"]["x-auth-request-user"], "alice", "the auth server's word, not the client's: {echoed}");
    assert_eq!(echoed["headers"]["x-auth-request-email"], "alice@example.com");
    assert_eq!(echoed["headers"]["cookie"], "session=ok; theme=dark");
    assert!(seen.headers.iter().any(|(n, v)| n == "set-cookie" && v == "refreshed=1; Path=/"), "cookies the auth server refreshed reach the client");
    assert_eq!(websocket(&pipes, &host, &[]).await, Err(302));
    assert_eq!(websocket(&pipes, &host, &[("cookie", "session=ok")]).await, Ok(()));
    assert_eq!(sse_events(&pipes, &host, &["-H", "Cookie: session=ok"]), 3);

    // Slower than PIPES_FORWARD_AUTH_TIMEOUT, or down: 503, never through.
    let (status, _) = put_config(&pipes, &host, forward_auth("/slow")).await;
    assert_eq!(status, 200);
    let seen = curl(&pipes, &host, "/", &["-H", "Cookie: session=ok"]);
    assert_eq!((seen.status, seen.json()["error"].as_str()), (503, Some("forward_auth_unavailable")), "{}", seen.body);
    assert!(seen.header("retry-after").is_some());
    let (status, _) = put_config(&pipes, &host, forward_auth("/auth")).await;
    assert_eq!(status, 200);
    auth.abort();
    let _ = auth.await;
    let seen = curl(&pipes, &host, "/", &["-H", "Cookie: session=ok"]);
    assert_eq!((seen.status, seen.json()["error"].as_str()), (503, Some("forward_auth_unavailable")), "{}", seen.body);
}

#[tokio::test]
async fn share_links_open_a_deployment_until_they_expire_or_are_revoked() {
    if common::skip() {
        return;
    }
    let mut f = Fixtures::new();
    f.serving("app", "v1");
    let metrics = free_port();
    let pipes = Pipes::start(&[("PIPES_API_TOKEN", Some(TOKEN)), ("PIPES_METRICS_LISTEN", Some(&format!("127.0.0.1:{metrics}")))]);
    let host = f.host("app", "v1", DOMAIN);
    let (status, _) = put_config(&pipes, &host, serde_json::json!({ "access": { "basic": { "alice": bcrypt_hash("alice", "s3cret") } } })).await;
    assert_eq!(status, 200);

    let (status, shared) = api(&pipes, &host, "POST", "/__proxyapi/container/share", Some(r#"{"ttl":"1h"}"#), Some(TOKEN)).await;
    assert_eq!(status, 200, "{shared}");
    let url = shared["url"].as_str().expect("a URL").to_owned();
    let (_, path) = url.split_once(&format!("{host}:{}", pipes.port)).unwrap_or_else(|| panic!("a link to the deployment's host: {url}"));
    assert!(path.starts_with("/?pipes_share="), "{url}");

    // Opening it: the cookie for this host, and the same URL without the token.
    let opened = curl(&pipes, &host, &format!("{path}&tab=2"), &[]);
    assert_eq!(opened.status, 303, "{}", opened.body);
    assert_eq!(opened.header("location"), Some("/?tab=2"));
    let cookie = opened.header("set-cookie").expect("the share cookie").to_owned();
    assert!(cookie.starts_with("pipes_share=") && cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax"), "{cookie}");
    assert!(!cookie.contains("Secure"), "plain HTTP: a Secure cookie would never come back: {cookie}");
    let pair = cookie.split(';').next().unwrap().to_owned();

    // With it, no credentials are asked; the app never sees the cookie.
    let seen = curl(&pipes, &host, "/", &["-H", &format!("Cookie: theme=dark; {pair}")]);
    assert_eq!(seen.status, 200, "{}", seen.body);
    assert_eq!(seen.json()["headers"]["cookie"], "theme=dark");
    assert_eq!(websocket(&pipes, &host, &[("cookie", &pair)]).await, Ok(()));
    assert_eq!(sse_events(&pipes, &host, &["-H", &format!("Cookie: {pair}")]), 3);
    // The cookie is no API token.
    let api_call = curl(&pipes, &host, "/__proxyapi/container", &["-H", &format!("Cookie: {pair}")]);
    assert_eq!(api_call.status, 401, "{}", api_call.body);

    // Revoked: the cookie and the link no longer open it.
    let (status, body) = api(&pipes, &host, "POST", "/__proxyapi/container/share/revoke", None, Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    let seen = curl(&pipes, &host, "/", &["-H", &format!("Cookie: {pair}")]);
    assert_eq!((seen.status, seen.json()["error"].as_str()), (401, Some("share_expired")), "{}", seen.body);
    assert_eq!(curl(&pipes, &host, path, &[]).status, 401);
    // A link made after the revocation works.
    let (_, fresh) = api(&pipes, &host, "POST", "/__proxyapi/container/share", None, Some(TOKEN)).await;
    let fresh_path = fresh["url"].as_str().unwrap().split_once(&format!(":{}", pipes.port)).unwrap().1.to_owned();
    assert_eq!(curl(&pipes, &host, &fresh_path, &[]).status, 303);

    // Expired: a link of one second, a second and a half later.
    let (_, short) = api(&pipes, &host, "POST", "/__proxyapi/container/share", Some(r#"{"ttl":"1s"}"#), Some(TOKEN)).await;
    let short_path = short["url"].as_str().unwrap().split_once(&format!(":{}", pipes.port)).unwrap().1.to_owned();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let seen = curl(&pipes, &host, &short_path, &[]);
    assert_eq!((seen.status, seen.json()["error"].as_str()), (401, Some("share_expired")), "{}", seen.body);
    let (status, body) = api(&pipes, &host, "POST", "/__proxyapi/container/share", Some(r#"{"ttl":"90d"}"#), Some(TOKEN)).await;
    assert_eq!((status, body["field"].as_str()), (422, Some("ttl")), "{body}");

    let text = reqwest::get(format!("http://127.0.0.1:{metrics}/metrics")).await.unwrap().text().await.unwrap();
    let deployment = format!("{}/app:v1", f.user);
    assert!(sample(&text, &format!("pipes_access_denied_total{{deployment=\"{deployment}\",reason=\"share_expired\"}}")).is_some_and(|n| n >= 2.0), "{text}");
}

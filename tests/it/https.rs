//! HTTPS with real clients and a real certificate authority: curl over the
//! operator's wildcard certificate (flat host names, HTTP/2 by ALPN, the
//! redirect from plain HTTP), and certificates obtained on demand from
//! Pebble, Let's Encrypt's test CA, which validates HTTP-01 against Pipes
//! itself (with its default of rejecting 5 % of nonces).

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use common::pki::TestCa;
use common::{free_port, Fixtures, Pipes};

const DOMAIN: &str = "example.com";

/// curl, sending `name` to 127.0.0.1:`port` over HTTPS and trusting `ca`.
fn curl_https(name: &str, port: u16, path: &str, ca: &Path, extra: &[&str]) -> Output {
    Command::new("curl")
        .args(["-sS", "--max-time", "60", "--resolve", &format!("{name}:{port}:127.0.0.1"), "--cacert"])
        .arg(ca)
        .args(extra)
        .arg(format!("https://{name}:{port}{path}"))
        .output()
        .expect("curl runs")
}

/// Processes a test started, killed when it ends.
struct Started(Vec<Child>);

impl Drop for Started {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test]
async fn a_wildcard_certificate_serves_flat_names_over_http2_and_plain_http_is_redirected() {
    if common::skip() {
        return;
    }
    let mut f = Fixtures::new();
    f.serving("app", "v1");
    let ca = TestCa::new("wildcard");
    let (cert, key) = ca.issue("wildcard", &[&format!("*.{DOMAIN}"), DOMAIN]);
    let tls_port = free_port();
    let pipes = Pipes::start(&[
        ("PIPES_DOMAIN", Some(DOMAIN)),
        ("PIPES_HOST_STYLE", Some("flat")),
        ("PIPES_TLS_LISTEN", Some(&format!("127.0.0.1:{tls_port}"))),
        ("PIPES_TLS_CERT", Some(cert.to_str().unwrap())),
        ("PIPES_TLS_KEY", Some(key.to_str().unwrap())),
        ("PIPES_HTTPS_REDIRECT", Some("true")),
    ]);
    let host = format!("v1--app--{}.{DOMAIN}", f.user);

    let out = curl_https(&host, tls_port, "/hello?x=1", &ca.ca_pem(), &["-w", "\n%{http_code} %{http_version}"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}\n{}", String::from_utf8_lossy(&out.stderr), pipes.log());
    let (body, status) = text.rsplit_once('\n').unwrap();
    assert_eq!(status, "200 2", "HTTP/2 chosen by ALPN");
    let body: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(body["path"], "/hello?x=1");
    assert_eq!(body["headers"]["x-forwarded-proto"], "https");

    let out = curl_https(&host, tls_port, "/", &ca.ca_pem(), &["--http1.1", "-o", "/dev/null", "-w", "%{http_code} %{http_version}"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200 1.1");

    // A WebSocket, a server-sent event stream and an upload pass through over HTTPS too.
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", tls_port)).await.unwrap();
    let mut connector = openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls()).unwrap();
    connector.set_ca_file(ca.ca_pem()).unwrap();
    let ssl = connector.build().configure().unwrap().into_ssl(&host).unwrap();
    let mut tls = tokio_openssl::SslStream::new(ssl, tcp).unwrap();
    std::pin::Pin::new(&mut tls).connect().await.expect("TLS handshake");
    let (mut ws, response) = tokio_tungstenite::client_async(format!("wss://{host}:{tls_port}/ws"), tls).await.expect("the WebSocket handshake");
    assert_eq!(response.status(), 101);
    for i in 0..3 {
        ws.send(Message::text(format!("ping {i}"))).await.unwrap();
        match ws.next().await {
            Some(Ok(Message::Text(text))) => assert!(text.ends_with(&format!(": ping {i}")), "{text}"),
            other => panic!("{other:?}"),
        }
    }
    ws.close(None).await.unwrap();

    let out = curl_https(&host, tls_port, "/sse?events=3&interval_ms=200", &ca.ca_pem(), &["-N"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "data: 1\n\ndata: 2\n\ndata: 3\n\n");
    let upload = ca.dir.join("upload.bin");
    std::fs::write(&upload, vec![7u8; 8 << 20]).unwrap();
    let out = curl_https(&host, tls_port, "/upload", &ca.ca_pem(), &["--data-binary", &format!("@{}", upload.display())]);
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert_eq!(answer["bytes"], 8 << 20, "{}", String::from_utf8_lossy(&out.stderr));

    // A dotted name is not covered by the wildcard, nor routed in the flat style.
    let out = curl_https(&format!("v1.app.{}.{DOMAIN}", f.user), tls_port, "/", &ca.ca_pem(), &[]);
    assert!(!out.status.success(), "curl refuses a certificate that does not cover the name");

    // Plain HTTP is sent to the same URL on https, keeping path and query.
    let resp = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .resolve(&host, ([127, 0, 0, 1], pipes.port).into())
        .build()
        .unwrap()
        .post(format!("http://{host}:{}/form?a=b", pipes.port))
        .body("x=1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 308);
    assert_eq!(resp.headers()["location"], format!("https://{host}:{tls_port}/form?a=b").as_str());
}

#[tokio::test]
async fn a_stalled_handshake_is_cut_and_counts_against_the_connection_cap() {
    if common::skip() {
        return;
    }
    let ca = TestCa::new("stall");
    let (cert, key) = ca.issue("stall", &[&format!("*.{DOMAIN}")]);
    let tls_port = free_port();
    let pipes = Pipes::start(&[
        ("PIPES_TLS_LISTEN", Some(&format!("127.0.0.1:{tls_port}"))),
        ("PIPES_TLS_CERT", Some(cert.to_str().unwrap())),
        ("PIPES_TLS_KEY", Some(key.to_str().unwrap())),
        ("PIPES_HEADER_TIMEOUT", Some("1s")),
        ("PIPES_MAX_CONNECTIONS", Some("16")),
    ]);
    // Sixteen connections that never send a ClientHello take every place...
    let stalled: Vec<_> = (0..16).map(|_| std::net::TcpStream::connect(("127.0.0.1", tls_port)).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let (answer, closed) = common::raw_exchange(pipes.port, b"", Duration::from_secs(3));
    assert!(closed && common::status_of(&answer) == Some(503), "the plain listener shares the cap: {}", String::from_utf8_lossy(&answer));
    // ...until the header deadline closes them.
    std::thread::sleep(Duration::from_millis(1500));
    for mut s in stalled {
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 16];
        assert!(matches!(std::io::Read::read(&mut s, &mut buf), Ok(0) | Err(_)), "a stalled handshake is closed");
    }
    let out = curl_https(&format!("x.{DOMAIN}"), tls_port, "/", &ca.ca_pem(), &["-o", "/dev/null", "-w", "%{http_code}"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404", "served again: {}", pipes.log());
}

/// Pebble and its DNS (every name resolves to 127.0.0.1), validating HTTP-01
/// challenges on `http_port`.
struct Pebble {
    _processes: Started,
    directory: String,
    management: u16,
    log: PathBuf,
}

impl Pebble {
    fn start(ca: &TestCa, http_port: u16) -> Pebble {
        let (cert, key) = ca.issue("pebble", &["localhost"]);
        let (acme, management, dns, dns_management) = (free_port(), free_port(), free_port(), free_port());
        let config = serde_json::json!({ "pebble": {
            "listenAddress": format!("127.0.0.1:{acme}"),
            "managementListenAddress": format!("127.0.0.1:{management}"),
            "certificate": cert, "privateKey": key,
            "httpPort": http_port, "tlsPort": free_port(),
            "ocspResponderURL": "", "externalAccountBindingRequired": false,
        }});
        let config_file = ca.dir.join("pebble.json");
        std::fs::write(&config_file, config.to_string()).unwrap();
        let log = ca.dir.join("pebble.log");
        let output = |path: &Path| Stdio::from(std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap());
        let challtestsrv = Command::new("pebble-challtestsrv")
            .args(["-defaultIPv6", "", "-defaultIPv4", "127.0.0.1", "-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-dns01", &format!("127.0.0.1:{dns}"), "-management", &format!("127.0.0.1:{dns_management}")])
            .stdout(output(&ca.dir.join("challtestsrv.log")))
            .stderr(output(&ca.dir.join("challtestsrv.log")))
            .spawn()
            .expect("pebble-challtestsrv runs");
        let pebble = Command::new("pebble")
            .args(["-config"])
            .arg(&config_file)
            .args(["-dnsserver", &format!("127.0.0.1:{dns}")])
            // No random sleeps before validating; nonces are still rejected 5 % of the time.
            .env("PEBBLE_VA_NOSLEEP", "1")
            .stdout(output(&log))
            .stderr(output(&log))
            .spawn()
            .expect("pebble runs");
        let pebble = Pebble { _processes: Started(vec![challtestsrv, pebble]), directory: format!("https://127.0.0.1:{acme}/dir"), management, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", acme)).is_err() || std::net::TcpStream::connect(("127.0.0.1", management)).is_err() {
            assert!(Instant::now() < deadline, "pebble did not listen:\n{}", pebble.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        pebble
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// New orders Pebble has received.
    /// Orders Pebble made. Not the order requests: Pebble rejects a few good
    /// nonces on purpose, and a rejected request is sent again.
    fn orders(&self) -> usize {
        self.log().matches("Added order").count()
    }

    /// The root certificate Pebble signs with, written to a file.
    fn root(&self, ca: &TestCa) -> PathBuf {
        let out = Command::new("curl")
            .args(["-sSf", "--cacert"])
            .arg(ca.ca_pem())
            .arg(format!("https://127.0.0.1:{}/roots/0", self.management))
            .output()
            .expect("curl runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let path = ca.dir.join("pebble-root.pem");
        std::fs::write(&path, out.stdout).unwrap();
        path
    }
}

#[tokio::test]
async fn certificates_are_obtained_on_demand_only_for_allowed_existing_deployments_and_kept() {
    if common::skip() {
        return;
    }
    let mut f = Fixtures::new();
    f.serving("app", "v1");
    let ca = TestCa::new("acme");
    let tls_port = free_port();
    let allow = format!("{}/*", f.user);
    let mut pipes = Pipes::start(&[
        ("PIPES_DOMAIN", Some(DOMAIN)),
        ("PIPES_ALLOW", Some(&allow)),
        ("PIPES_TLS_LISTEN", Some(&format!("127.0.0.1:{tls_port}"))),
        ("PIPES_ACME_CA", Some(ca.ca_pem().to_str().unwrap())),
        ("PIPES_ACME_EMAIL", Some("ops@example.com")),
        // Set below, once Pebble listens; Pipes asks it only when a name needs a certificate.
        ("PIPES_ACME_DIRECTORY", Some("https://127.0.0.1:1/dir")),
    ]);
    let pebble = Pebble::start(&ca, pipes.port);
    pipes.terminate();
    pipes.set_env("PIPES_ACME_DIRECTORY", &pebble.directory);
    pipes.restart();
    let root = pebble.root(&ca);
    let host = f.host("app", "v1", DOMAIN);

    // Handshakes at once for the same new name share one order.
    let handshakes: Vec<_> = (0..6)
        .map(|_| {
            let (host, root) = (host.clone(), root.clone());
            tokio::task::spawn_blocking(move || curl_https(&host, tls_port, "/", &root, &["-w", "\n%{http_code}"]))
        })
        .collect();
    for handshake in handshakes {
        let out = handshake.await.unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(text.ends_with("\n200"), "{text}\n{}\n--- pipes\n{}\n--- pebble\n{}", String::from_utf8_lossy(&out.stderr), pipes.log(), pebble.log());
    }
    assert_eq!(pebble.orders(), 1, "one order for one name:\n{}", pebble.log());
    assert!(pebble.log().contains("Attempting to validate w/ HTTP: http://"), "validated over HTTP-01 against Pipes:\n{}", pebble.log());

    // Names that must not get a certificate place no order: a user not
    // allowed, an image that does not exist, a name outside the domain.
    for denied in [format!("v1.app.nobody.{DOMAIN}"), f.host("app", "missing", DOMAIN), "v1.app.someone.example.org".to_owned()] {
        let out = curl_https(&denied, tls_port, "/", &root, &[]);
        assert!(!out.status.success(), "{denied} got through");
    }
    assert_eq!(pebble.orders(), 1, "no order for a denied name:\n{}", pebble.log());
    assert!(pipes.log().contains("no certificate for v1.app.nobody.example.com"), "{}", pipes.log());

    // The certificate and account are stored, and reused after a restart.
    let stored = pipes.dir.join("configs/certs").join(format!("{host}.pem"));
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&stored).expect("stored").permissions());
    assert_eq!(mode & 0o077, 0, "only the owner reads a private key");
    pipes.restart();
    let out = curl_https(&host, tls_port, "/", &root, &["-o", "/dev/null", "-w", "%{http_code}"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    assert_eq!(pebble.orders(), 1, "the stored certificate was used:\n{}", pipes.log());
    assert!(!pipes.log().contains("secret") && !pipes.log().contains("PRIVATE KEY"), "{}", pipes.log());
}

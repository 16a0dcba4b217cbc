//! HTTPS with real clients and a real certificate authority: curl over the
//! operator's wildcard certificate (flat host names, HTTP/2 by ALPN, the
//! redirect from plain HTTP), and certificates obtained on demand from
//! Pebble, Let's Encrypt's test CA, which validates HTTP-01 against Pipes
//! itself (with its default of rejecting 5 % of nonces).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::x509::extension::{BasicConstraints, SubjectAlternativeName};
use openssl::x509::{X509NameBuilder, X509};

use common::{free_port, unique, Fixtures, Pipes};

const DOMAIN: &str = "example.com";

/// A certificate authority made for one test, and certificates it signs.
struct TestCa {
    dir: PathBuf,
    key: PKey<Private>,
    cert: X509,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let dir = std::env::temp_dir().join(unique(&format!("pipes-{name}-")));
        std::fs::create_dir_all(&dir).unwrap();
        let key = ec_key();
        let mut builder = cert_builder(&key, "Pipes test CA", 3650);
        builder.append_extension(BasicConstraints::new().critical().ca().build().unwrap()).unwrap();
        builder.set_issuer_name(builder_name("Pipes test CA").as_ref()).unwrap();
        builder.sign(&key, MessageDigest::sha256()).unwrap();
        let cert = builder.build();
        std::fs::write(dir.join("ca.pem"), cert.to_pem().unwrap()).unwrap();
        TestCa { dir, key, cert }
    }

    fn ca_pem(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Signs a certificate for `dns` names (and 127.0.0.1); returns the
    /// chain and key files.
    fn issue(&self, file: &str, dns: &[&str]) -> (PathBuf, PathBuf) {
        let key = ec_key();
        let mut builder = cert_builder(&key, dns[0], 30);
        builder.set_issuer_name(self.cert.subject_name()).unwrap();
        let mut san = SubjectAlternativeName::new();
        for name in dns {
            san.dns(name);
        }
        san.ip("127.0.0.1");
        let san = san.build(&builder.x509v3_context(Some(&self.cert), None)).unwrap();
        builder.append_extension(san).unwrap();
        builder.sign(&self.key, MessageDigest::sha256()).unwrap();
        let (cert, key_file) = (self.dir.join(format!("{file}.pem")), self.dir.join(format!("{file}.key")));
        std::fs::write(&cert, builder.build().to_pem().unwrap()).unwrap();
        std::fs::write(&key_file, key.private_key_to_pem_pkcs8().unwrap()).unwrap();
        (cert, key_file)
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ec_key() -> PKey<Private> {
    PKey::from_ec_key(EcKey::generate(&EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap()).unwrap()).unwrap()
}

fn builder_name(cn: &str) -> openssl::x509::X509Name {
    let mut name = X509NameBuilder::new().unwrap();
    name.append_entry_by_text("CN", cn).unwrap();
    name.build()
}

fn cert_builder(key: &PKey<Private>, cn: &str, days: u32) -> openssl::x509::X509Builder {
    let mut builder = X509::builder().unwrap();
    builder.set_version(2).unwrap();
    let mut serial = BigNum::new().unwrap();
    serial.rand(64, MsbOption::MAYBE_ZERO, false).unwrap();
    builder.set_serial_number(&serial.to_asn1_integer().unwrap()).unwrap();
    builder.set_subject_name(builder_name(cn).as_ref()).unwrap();
    builder.set_pubkey(key).unwrap();
    builder.set_not_before(Asn1Time::days_from_now(0).unwrap().as_ref()).unwrap();
    builder.set_not_after(Asn1Time::days_from_now(days).unwrap().as_ref()).unwrap();
    builder
}

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
    fn orders(&self) -> usize {
        self.log().matches("POST /order-plz").count()
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

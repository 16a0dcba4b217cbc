//! Pipes against hostile and broken clients, against the real engine: each
//! test reproduces one way a client could hold, starve or fool Pipes, and
//! checks it with counts (connections closed, places free, failed
//! requests), not timings.

use crate::common;

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{api, docker_ok, eventually, json, raw_exchange, running, snapshot, status_of, Fixtures, Pipes};

const TOKEN: &str = "hardening-token-0123456789";
const DOMAIN: &str = "example.com";

/// Opens `n` connections that send `opening` and then nothing, a
/// millisecond apart: connections held open, as a slowloris client holds
/// them, not a connect flood (which a 2-core machine can accept faster than
/// it answers the ones past the cap with 503).
fn silent_connections(port: u16, n: usize, opening: &[u8]) -> Vec<TcpStream> {
    (0..n)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            s.write_all(opening).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
            std::thread::sleep(Duration::from_millis(1));
            s
        })
        .collect()
}

/// How many of `conns` the server closed (or answered and closed).
fn closed_by_server(conns: &mut [TcpStream]) -> usize {
    use std::io::Read;
    let mut buf = [0u8; 4096];
    let mut closed = 0;
    for s in conns.iter_mut() {
        loop {
            match s.read(&mut buf) {
                Ok(0) => {
                    closed += 1;
                    break;
                }
                Ok(_) => continue,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => break,
                Err(_) => {
                    closed += 1;
                    break;
                }
            }
        }
    }
    closed
}

#[tokio::test]
async fn connections_that_never_finish_a_request_are_closed_and_capped() {
    if common::skip() {
        return;
    }
    let mut f = Fixtures::new();
    f.serving("app", "v1");
    // The descriptor limit the attack exhausted: 256. The cap follows it.
    let pipes = Pipes::start_under(&["prlimit", "--nofile=256:256"], &[("PIPES_HEADER_TIMEOUT", Some("1s")), ("PIPES_KEEPALIVE_TIMEOUT", Some("2s"))]);
    let host = f.host("app", "v1", DOMAIN);
    assert_eq!(pipes.get(&host, "/").await.status(), 200);

    // 300 connections that send nothing, or only HTTP/2's preface, or a head never finished.
    let mut idle = silent_connections(pipes.port, 150, b"");
    idle.extend(silent_connections(pipes.port, 75, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
    idle.extend(silent_connections(pipes.port, 75, b"GET / HTTP/1.1\r\nHost: x"));
    // The cap (a quarter of what 256 descriptors leave: 48) answers the rest 503 at once;
    // those within it are closed at the header deadline.
    let (answer, closed) = raw_exchange(pipes.port, b"", Duration::from_secs(3));
    assert!(closed, "a connection past the cap is closed");
    let refused = status_of(&answer);
    assert!(refused == Some(503) || answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let closed = closed_by_server(&mut idle);
    assert_eq!(closed, idle.len(), "every connection that made no progress was closed");

    // A short complete request is answered, and its HTTP/1.0 connection closed.
    let (answer, closed) = raw_exchange(pipes.port, format!("GET / HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes(), Duration::from_secs(5));
    assert_eq!(status_of(&answer), Some(200), "{}", String::from_utf8_lossy(&answer));
    assert!(closed);
    let (answer, _) = raw_exchange(pipes.port, b"GET / HTTP/1.0\r\n\r\n", Duration::from_secs(5));
    assert_eq!(status_of(&answer), Some(404), "18 bytes, no Host: answered");

    // A kept-alive connection is closed once idle for PIPES_KEEPALIVE_TIMEOUT.
    let (answer, closed) = raw_exchange(pipes.port, format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes(), Duration::from_secs(10));
    assert_eq!(status_of(&answer), Some(200));
    assert!(closed, "an idle kept-alive connection is closed");

    assert_eq!(pipes.get(&host, "/").await.status(), 200, "real clients are served after the flood");
    assert!(!pipes.log().contains("Too many open files"), "{}", pipes.log());
}

#[tokio::test]
async fn request_heads_are_capped_and_api_bodies_wait_for_the_token() {
    if common::skip() {
        return;
    }
    let pipes = Pipes::start(&[("PIPES_API_TOKEN", Some(TOKEN)), ("PIPES_HEADER_TIMEOUT", Some("2s"))]);
    let big = format!("GET / HTTP/1.1\r\nHost: v1.app.alice.example.com\r\nX-Big: {}\r\n\r\n", "a".repeat(100 << 10));
    let (answer, closed) = raw_exchange(pipes.port, big.as_bytes(), Duration::from_secs(5));
    assert_eq!(status_of(&answer), Some(431));
    assert!(closed);

    // No token: answered before any of the declared megabyte is sent.
    let (rss_before, _) = pipes.memory_kib();
    let head = b"PUT /__proxyapi/repository/config HTTP/1.1\r\nHost: v1.app.alice.example.com\r\nContent-Length: 1048576\r\n\r\n";
    let mut unread = Vec::new();
    for _ in 0..100 {
        let mut s = TcpStream::connect(("127.0.0.1", pipes.port)).unwrap();
        s.write_all(head).unwrap();
        s.write_all(&vec![b'{'; 512 << 10]).unwrap_or(());
        unread.push(s);
    }
    let (answer, _) = raw_exchange(pipes.port, head, Duration::from_secs(5));
    assert_eq!(status_of(&answer), Some(401), "{}", String::from_utf8_lossy(&answer));
    let (rss, _) = pipes.memory_kib();
    eprintln!("resident memory {rss_before} KiB before, {rss} KiB with 100 unauthenticated 1 MiB uploads open");
    assert!(rss < rss_before + 32 * 1024, "bodies without a token are not read: {rss_before} → {rss} KiB");
    drop(unread);

    // With a token, a body that never finishes is cut at the deadline.
    let slow = format!(
        "PUT /__proxyapi/repository/config HTTP/1.1\r\nHost: v1.app.alice.example.com\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
    );
    let (answer, closed) = raw_exchange(pipes.port, slow.as_bytes(), Duration::from_secs(6));
    assert_eq!(status_of(&answer), Some(408), "{}", String::from_utf8_lossy(&answer));
    assert!(closed, "and the connection closed");
}

#[tokio::test]
async fn a_flood_of_missing_images_holds_no_place_and_starves_no_start() {
    if common::skip() {
        return;
    }
    let mut f = Fixtures::new();
    f.serving("app", "run");
    f.publish("app", "good", "ENV FIXTURE_DELAY_MS=500");
    let pipes = Pipes::start(&[("PIPES_MAX_CONTAINERS", Some("2")), ("PIPES_API_TOKEN", Some(TOKEN))]);
    assert_eq!(pipes.get(&f.host("app", "run", DOMAIN), "/").await.status(), 200);

    // One client asks for 300 names whose images do not exist, 60 at a time.
    let flood = {
        let (port, user) = (pipes.port, f.user.clone());
        tokio::spawn(async move {
            let mut statuses = std::collections::BTreeMap::new();
            for round in 0..5 {
                let answers = futures_util::future::join_all((0..60).map(|i| {
                    let host = format!("v1.nope{round}x{i}.{user}.{DOMAIN}");
                    let client = common::client_for(&host, port);
                    async move { client.get(format!("http://{host}:{port}/")).send().await.map(|r| r.status().as_u16()).unwrap_or(0) }
                }))
                .await;
                for s in answers {
                    *statuses.entry(s).or_insert(0) += 1;
                }
            }
            statuses
        })
    };
    // Another client's real cold start, meanwhile.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let host = f.host("app", "good", DOMAIN);
    let other =
        reqwest::Client::builder().no_proxy().local_address(std::net::IpAddr::from([127, 0, 0, 2])).resolve(&host, ([127, 0, 0, 1], 0).into()).build().unwrap();
    let good = other.get(pipes.url(&host, "/")).send().await.unwrap().status().as_u16();
    let statuses = flood.await.unwrap();
    eprintln!("flood answers by status: {statuses:?}");
    assert_eq!(good, 200, "a real start got through the flood");
    assert!(statuses.keys().all(|s| *s == 404 || *s == 503), "{statuses:?}");
    assert_eq!(pipes.containers().len(), 2, "the flood took no place");
    let (_, list) = api(&pipes, DOMAIN, "GET", "/__proxyapi/deployments", None, Some(TOKEN)).await;
    assert_eq!(list["deployments"].as_array().unwrap().len(), 2, "and left nothing in the table: {list}");
}

#[tokio::test]
async fn configs_cannot_switch_limits_off_or_pass_the_ceilings() {
    if common::skip() {
        return;
    }
    let pipes = Pipes::start(&[
        ("PIPES_API_TOKEN", Some(TOKEN)),
        ("PIPES_MAX_MEMORY", Some("1g")),
        ("PIPES_MAX_CPUS", Some("1")),
        ("PIPES_ALLOWED_CAPABILITIES", Some("NET_RAW")),
    ]);
    let host = "v1.app.alice.example.com";
    let files = snapshot(&pipes.dir.join("configs"));
    for (body, field, mentions) in [
        (r#"{"memory":"9000000t"}"#, "memory", "engine"),
        (r#"{"memory":"18446744073709551615"}"#, "memory", "engine"),
        (r#"{"cpus":1e-300}"#, "cpus", "0.01"),
        (r#"{"memory":"2g"}"#, "memory", "PIPES_MAX_MEMORY"),
        (r#"{"cpus":1024}"#, "cpus", "PIPES_MAX_CPUS"),
        (r#"{"pids":100000}"#, "pids", "PIPES_MAX_PIDS"),
        (r#"{"capabilities":["SYS_ADMIN"]}"#, "capabilities", "PIPES_ALLOWED_CAPABILITIES"),
    ] {
        let (status, answer) = api(&pipes, host, "PUT", "/__proxyapi/repository/config", Some(body), Some(TOKEN)).await;
        assert_eq!(status, 422, "{body}: {answer}");
        assert_eq!(answer["field"], field, "{body}: {answer}");
        assert!(answer["message"].as_str().unwrap().contains(mentions), "{body}: {answer}");
    }
    assert_eq!(snapshot(&pipes.dir.join("configs")), files, "nothing was stored");
    let (status, _) = api(&pipes, host, "PUT", "/__proxyapi/repository/config", Some(r#"{"capabilities":["net_raw"]}"#), Some(TOKEN)).await;
    assert_eq!(status, 200, "what the operator allows is accepted");
}

#[tokio::test]
async fn a_container_killed_stopped_or_removed_under_load_costs_few_requests() {
    if common::skip() {
        return;
    }
    let (_f, pipes, host) = common::serving_app(&[]);
    assert_eq!(pipes.get(&host, "/").await.status(), 200);
    const CLIENTS: usize = 4;
    for (what, args) in [("kill -9", vec!["kill", "-s", "KILL"]), ("stop", vec!["stop", "-t", "1"]), ("rm -f", vec!["rm", "-f"])] {
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let load: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let (client, url, stop, ok, failed) = (pipes.client(&host), pipes.url(&host, "/"), stop.clone(), ok.clone(), failed.clone());
                tokio::spawn(async move {
                    let deadline = Instant::now() + Duration::from_secs(30);
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        match client.get(&url).send().await {
                            Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                            _ => failed.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let id = pipes.containers().into_iter().find(|id| running(id)).expect("a running container");
        let mut command = args.clone();
        command.push(&id);
        docker_ok(&command);
        // Served again: by the same container started again, or a new one.
        eventually("served again", Duration::from_secs(20), || async { pipes.get(&host, "/").await.status() == 200 }).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.store(true, Ordering::Relaxed);
        for l in load {
            l.await.unwrap();
        }
        let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
        eprintln!("{what}: {failed} failed of {} requests", ok + failed);
        // At most the requests in flight when it happened, one per client.
        assert!(failed <= CLIENTS, "{what}: {failed} requests failed");
    }
}

#[tokio::test]
async fn a_pull_that_stalls_ends_at_its_timeout() {
    if common::skip() {
        return;
    }
    // A "registry" that accepts connections and never answers.
    let stall = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = stall.local_addr().unwrap().port();
    let done = Arc::new(AtomicBool::new(false));
    let held = std::thread::spawn({
        let done = done.clone();
        move || {
            let mut open = Vec::new();
            stall.set_nonblocking(true).unwrap();
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline && !done.load(Ordering::Relaxed) {
                if let Ok((s, _)) = stall.accept() {
                    open.push(s);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    });
    let pipes = Pipes::start(&[("PIPES_REGISTRY", Some(&format!("127.0.0.1:{port}"))), ("DOCKER_AUTH", None), ("PIPES_PULL_TIMEOUT", Some("2s"))]);
    let began = Instant::now();
    let (status, body) = json(pipes.get("v1.app.stalled.example.com", "/").await).await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["error"], "pull_timeout");
    eprintln!("answered {:?} after the request", began.elapsed());
    drop(pipes);
    done.store(true, Ordering::Relaxed);
    let _ = held.join();
}

#[tokio::test]
async fn broken_requests_are_the_clients_fault_and_close_the_connection() {
    if common::skip() {
        return;
    }
    let (_f, pipes, host) = common::serving_app(&[]);
    assert_eq!(pipes.get(&host, "/").await.status(), 200);
    let bad_chunk = format!("POST / HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n");
    let (answer, closed) = raw_exchange(pipes.port, bad_chunk.as_bytes(), Duration::from_secs(5));
    let text = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert_eq!(status_of(&answer), Some(400), "{text}");
    assert!(text.contains("connection: close"), "an answer that ends the connection says so: {text}");
    assert!(closed);
    assert!(!pipes.log().contains("ERROR"), "a client's broken request is not Pipes' error:\n{}", pipes.log());
}

#[tokio::test]
async fn what_the_container_is_told_cannot_be_spoofed() {
    if common::skip() {
        return;
    }
    let (_f, pipes, host) = common::serving_app(&[]);
    let request = format!(
        "POST http://{host}/abs?x=1 HTTP/1.1\r\nHost: {host}\r\nX-Forwarded-For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\n\
         Forwarded: for=6.6.6.6\r\nX-Forwarded-Host: evil.example\r\nContent-Length: 5, 5\r\nConnection: close\r\n\r\nhello"
    );
    let (answer, _) = raw_exchange(pipes.port, request.as_bytes(), Duration::from_secs(10));
    let text = String::from_utf8_lossy(&answer);
    assert_eq!(status_of(&answer), Some(200), "{text}");
    let body: serde_json::Value = serde_json::from_str(text.split_once("\r\n\r\n").unwrap().1).unwrap();
    let h = &body["headers"];
    assert_eq!(h["x-forwarded-for"], "127.0.0.1", "{body}");
    assert_eq!(h["x-real-ip"], "127.0.0.1");
    assert_eq!(h["x-forwarded-host"], host.as_str());
    assert!(h["forwarded"].is_null(), "{body}");
    assert_eq!(h["content-length"], "5", "one canonical length: {body}");
    assert_eq!(body["path"], "/abs?x=1", "origin-form upstream: {body}");
    assert_eq!(body["body"], "hello");

    let trusting = Pipes::start(&[("PIPES_TRUSTED_PROXIES", Some("127.0.0.1"))]);
    let resp = trusting.client(&host).get(trusting.url(&host, "/")).header("x-forwarded-for", "198.51.100.7").send().await.unwrap();
    let (_, body) = json(resp).await;
    assert_eq!(body["headers"]["x-forwarded-for"], "198.51.100.7, 127.0.0.1", "a trusted proxy's header is extended");
    assert_eq!(body["headers"]["x-real-ip"], "198.51.100.7");
}

#[tokio::test]
async fn deployments_are_isolated_from_each_other_and_the_host() {
    if common::skip() {
        return;
    }
    let mut f = Fixtures::new();
    f.serving("app", "one");
    f.serving("app", "two");
    let pipes = Pipes::start(&[]);
    let (one, two) = (f.host("app", "one", DOMAIN), f.host("app", "two", DOMAIN));
    assert_eq!(pipes.get(&two, "/").await.status(), 200);
    let network = format!("pipes-{}", pipes.instance);
    let target = pipes.containers()[0].clone();
    let ip = pipes.container_ip(&target);
    let (status, body) = json(pipes.get(&one, &format!("/connect?to={ip}:80")).await).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["connected"], false, "one deployment cannot call another past Pipes");
    assert_eq!(docker_ok(&["network", "inspect", "-f", "{{index .Options \"com.docker.network.bridge.enable_icc\"}}", &network]), "false");
    let host_config = docker_ok(&["inspect", "-f", "{{json .HostConfig.CapDrop}} {{json .HostConfig.SecurityOpt}} {{.HostConfig.PidsLimit}}", &target]);
    assert_eq!(host_config, r#"["ALL"] ["no-new-privileges:true"] 512"#);
}

#[tokio::test]
async fn anonymous_errors_show_no_setup_and_odd_hosts_are_refused() {
    if common::skip() {
        return;
    }
    let pipes = Pipes::start(&[("DOCKER_HOST", Some("unix:///nonexistent/pipes-engine.sock"))]);
    let (status, body) = json(pipes.get("v1.app.alice.example.com", "/").await).await;
    assert_eq!(status, 503, "{body}");
    assert!(!body.to_string().contains("nonexistent"), "the engine's address is the operator's business: {body}");
    assert!(pipes.log().contains("nonexistent"), "and the log's");

    for host in ["v1..web.alice.example.com", "v1.web.alice.example.com..", "v1.wéb.alice.example.com"] {
        let (answer, _) = raw_exchange(pipes.port, format!("GET / HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes(), Duration::from_secs(5));
        assert_eq!(status_of(&answer), Some(400), "{host}: {}", String::from_utf8_lossy(&answer));
    }
}

#[tokio::test]
async fn a_broken_token_file_leaves_the_admin_token_working() {
    if common::skip() {
        return;
    }
    let pipes = Pipes::start(&[("PIPES_API_TOKEN", Some(TOKEN))]);
    std::fs::create_dir_all(pipes.dir.join("configs")).unwrap();
    std::fs::write(pipes.dir.join("configs/tokens.json"), "{ not json").unwrap();
    let (status, body) = api(&pipes, DOMAIN, "GET", "/__proxyapi/deployments", None, Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = api(&pipes, DOMAIN, "GET", "/__proxyapi/deployments", None, Some("some-scoped-token-0123456")).await;
    assert_eq!(status, 401);
    assert!(pipes.log().contains("tokens.json"), "the broken file is logged");
    let (status, body) = api(&pipes, "v1.app.alice.example.com", "PUT", "/__proxyapi/repository/config", Some("{} x"), Some(TOKEN)).await;
    assert_eq!(status, 400, "trailing input is malformed JSON: {body}");
}

/// Runs a second Pipes of `instance`: how it ended and what it said.
fn second_pipes(instance: &str) -> (Option<i32>, String) {
    let dir = std::env::temp_dir().join(format!("pipes-second-{instance}"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pipes"));
    cmd.env_clear().envs(Pipes::base_env(instance, common::free_port(), &dir));
    let ended = common::exit_of(cmd, Duration::from_secs(20));
    let _ = std::fs::remove_dir_all(&dir);
    ended
}

/// The claims on `instance`'s name the engine holds.
fn claims(instance: &str) -> Vec<String> {
    docker_ok(&["volume", "ls", "-q", "--filter", &format!("label=pipes.claim={instance}")]).lines().map(str::to_owned).collect()
}

#[tokio::test]
async fn a_second_pipes_of_one_instance_name_refuses_to_start() {
    if common::skip() {
        return;
    }
    let mut first = Pipes::start(&[]);
    let instance = first.instance.clone();
    assert_eq!(claims(&instance).len(), 1, "the first Pipes holds one claim");

    let (code, err) = second_pipes(&instance);
    assert_eq!(code, Some(1), "{err}");
    let last = err.lines().last().unwrap_or_default();
    let pid = first.pid().expect("runs");
    assert!(last.starts_with(&format!("pipes: another Pipes of instance '{instance}' runs (process {pid} on this host)")), "{err}");
    assert!(last.contains("PIPES_INSTANCE"), "{err}");
    assert_eq!(claims(&instance).len(), 1, "the refused one claimed nothing");
    first.get("example.com", "/").await; // the first one answers on

    // A Pipes that was killed holds nothing: its process is gone.
    first.kill9();
    let mut again = Pipes::start_instance(&instance, &[], &[]);
    assert_eq!(claims(&instance).len(), 1, "the stale claim was replaced");
    // One that stops lets its name go.
    assert!(again.terminate().is_some_and(|s| s.success()));
    assert!(claims(&instance).is_empty(), "a stopped Pipes leaves no claim");
}

//! Soak: Pipes under hours-like pressure, compressed.
//!
//! For `PIPES_BENCH_SECONDS` (default 600), in windows of a minute: wrk keeps
//! 200 connections busy on a warm deployment; a cold client asks every 250 ms
//! for one of ten deployments that stop after 2 s idle (so they start again
//! and again) or for a name whose image does not exist; 500 slowloris
//! connections trickle a request head one byte every 2 s and reconnect when
//! cut; and churn: every 2 s a request for the next of eight deployments
//! that expire 3 s after their last request, so each comes back as new
//! (pulled, created, started) and goes again (containers, config and image
//! removed). Each window reports Pipes' resident memory, open descriptors,
//! wrk's rate and failures, cold answers by status, slowloris connections
//! cut, churn answers, deployments expired, and — to show that churn leaves
//! nothing behind — the run's images on the engine and the engine's disk use.
//! Run through `scripts/bench soak`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{api, Fixtures, Pipes};

const TOKEN: &str = "soak-token-0123456789";
const WARM_CONNECTIONS: usize = 200;
const SLOWLORIS: usize = 500;
const COLD: usize = 10;
const CHURN: usize = 8;
const WINDOW: u64 = 60;

fn seconds() -> u64 {
    std::env::var("PIPES_BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(600)
}

fn proc_status(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status.lines().find_map(|l| l.strip_prefix("VmRSS:")?.split_whitespace().next()?.parse().ok()).unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
    (rss, fds)
}

/// One slowloris connection, again and again until `stop`: counts how often Pipes cut it.
fn slowloris(port: u16, stop: Arc<AtomicBool>, cut: Arc<AtomicUsize>) {
    let head = b"GET / HTTP/1.1\r\nHost: v1.warm.soak.example.com\r\nX-Slow: ";
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(2000)));
        let mut sent = 0;
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let byte = head.get(sent).copied().unwrap_or(b'a');
            if s.write_all(&[byte]).is_err() {
                cut.fetch_add(1, Ordering::Relaxed);
                break;
            }
            sent += 1;
            let mut buf = [0u8; 512];
            match s.read(&mut buf) {
                Ok(_) => {
                    cut.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(_) => {
                    cut.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
    }
}

/// Asks Pipes for the host `host(i)` of the i-th request every `every`
/// until `stop`; the task, and the answers by status so far.
fn asking(
    stop: Arc<AtomicBool>,
    every: Duration,
    host: impl Fn(usize) -> String + Send + 'static,
    port: u16,
) -> (tokio::task::JoinHandle<()>, Arc<Mutex<BTreeMap<u16, usize>>>) {
    let answers = Arc::new(Mutex::new(BTreeMap::<u16, usize>::new()));
    let counted = answers.clone();
    let task = tokio::spawn(async move {
        let mut i = 0usize;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            let host = host(i);
            let status = match common::client_for(&host, port).get(format!("http://{host}:{port}/")).send().await {
                Ok(r) => r.status().as_u16(),
                Err(_) => 0,
            };
            *counted.lock().unwrap().entry(status).or_default() += 1;
            tokio::time::sleep(every).await;
        }
    });
    (task, answers)
}

#[tokio::main]
async fn main() {
    let total = seconds();
    let mut f = Fixtures::new();
    f.serving("warm", "v1");
    for i in 0..COLD {
        f.serving("cold", &format!("c{i}"));
    }
    for i in 0..CHURN {
        f.serving("churn", &format!("t{i}"));
    }
    let metrics = format!("127.0.0.1:{}", common::free_port());
    let pipes = Pipes::start(&[
        ("PIPES_API_TOKEN", Some(TOKEN)),
        ("PIPES_METRICS_LISTEN", Some(&metrics)),
        ("PIPES_SERVER_CONF", Some(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/pipes.yaml"))),
        ("RUST_LOG", Some("warn")),
    ]);
    let pid = pipes.pid().expect("running");
    let warm = f.host("warm", "v1", "example.com");
    // Every tag of the cold repository stops after 2 s without requests.
    let (status, _) =
        api(&pipes, &f.host("cold", "c0", "example.com"), "PUT", "/__proxyapi/repository/config", Some(r#"{"idle_timeout":"2s"}"#), Some(TOKEN)).await;
    assert_eq!(status, 200);
    let (status, _) =
        api(&pipes, &f.host("churn", "t0", "example.com"), "PUT", "/__proxyapi/repository/config", Some(r#"{"expire_after":"3s"}"#), Some(TOKEN)).await;
    assert_eq!(status, 200);
    assert_eq!(pipes.get(&warm, "/").await.status(), 200);

    let stop = Arc::new(AtomicBool::new(false));
    let cut = Arc::new(AtomicUsize::new(0));
    let lorises: Vec<_> = (0..SLOWLORIS)
        .map(|_| {
            let (stop, cut, port) = (stop.clone(), cut.clone(), pipes.port);
            std::thread::Builder::new().stack_size(64 << 10).spawn(move || slowloris(port, stop, cut)).unwrap()
        })
        .collect();
    // One in five cold requests asks for an image that does not exist.
    let (user, port) = (f.user.clone(), pipes.port);
    let (cold, cold_answers) = asking(
        stop.clone(),
        Duration::from_millis(250),
        move |i| {
            if i.is_multiple_of(5) {
                format!("x{i}.nope.{user}.example.com")
            } else {
                format!("c{}.cold.{user}.example.com", i % COLD)
            }
        },
        port,
    );
    let user = f.user.clone();
    let (churn, churn_answers) = asking(stop.clone(), Duration::from_secs(2), move |i| format!("t{}.churn.{user}.example.com", i % CHURN), port);
    let engine_dir = common::docker_ok(&["info", "--format", "{{.DockerRootDir}}"]).trim().to_owned();
    let run_images = || common::docker_ok(&["images", "--format", "{{.Repository}}"]).lines().filter(|r| r.contains(&format!("/{}/", f.user))).count();
    let disk_used_gib = || {
        let out = Command::new("df").args(["-B1", "--output=used", &engine_dir]).output().expect("df runs");
        String::from_utf8_lossy(&out.stdout).lines().nth(1).and_then(|l| l.trim().parse::<f64>().ok()).unwrap_or(0.0) / f64::from(1u32 << 30)
    };
    let expired = || {
        let text = Command::new("curl")
            .args(["-s", &format!("http://{metrics}/metrics")])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        common::sample(&text, "pipes_expired_total").unwrap_or(0.0)
    };

    println!(
        "\nSoak: {WARM_CONNECTIONS} warm connections (wrk), {SLOWLORIS} slowloris connections, cold traffic every 250 ms, \
         churn of {CHURN} deployments expiring 3 s after their last request, one asked for every 2 s; {total} s in windows of {WINDOW} s\n"
    );
    println!("| minute | Pipes RSS MiB | open fds | warm req/s | warm p99 ms | warm failed | cold answers | slowloris cut | churn answers | expired | run's images | engine disk used GiB |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let began = Instant::now();
    let mut minute = 0;
    while began.elapsed().as_secs() + 5 < total {
        minute += 1;
        let window = WINDOW.min(total - began.elapsed().as_secs());
        let out = Command::new("wrk")
            .args(["-t1", &format!("-c{WARM_CONNECTIONS}"), &format!("-d{window}s"), "--latency", "-H", &format!("Host: {warm}")])
            .arg(format!("http://127.0.0.1:{}/bytes/3", pipes.port))
            .output()
            .expect("wrk runs");
        let text = String::from_utf8_lossy(&out.stdout);
        let field = |prefix: &str| text.lines().map(str::trim).find_map(|l| l.strip_prefix(prefix)).map(|v| v.trim().to_owned());
        let rps = field("Requests/sec:").unwrap_or_default();
        let p99 = field("99%").unwrap_or_default();
        let failed: u64 = text
            .lines()
            .filter(|l| l.contains("Non-2xx") || l.contains("Socket errors"))
            .flat_map(|l| l.split([',', ':']).filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok()))
            .sum();
        let (rss, fds) = proc_status(pid);
        let cold = std::mem::take(&mut *cold_answers.lock().unwrap());
        let churned = std::mem::take(&mut *churn_answers.lock().unwrap());
        println!(
            "| {minute} | {:.1} | {fds} | {rps} | {p99} | {failed} | {cold:?} | {} | {churned:?} | {} | {} | {:.2} |",
            rss as f64 / 1024.0,
            cut.swap(0, Ordering::Relaxed),
            expired(),
            run_images(),
            disk_used_gib()
        );
    }
    stop.store(true, Ordering::Relaxed);
    cold.await.unwrap();
    churn.await.unwrap();
    for l in lorises {
        let _ = l.join();
    }
    assert!(pipes.pid().is_some(), "Pipes ran through");
}

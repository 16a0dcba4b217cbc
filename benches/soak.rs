//! Soak: Pipes under hours-like pressure, compressed.
//!
//! For `PIPES_BENCH_SECONDS` (default 600), in windows of a minute: wrk keeps
//! 200 connections busy on a warm deployment; a cold client asks every 250 ms
//! for one of ten deployments that stop after 2 s idle (so they start again
//! and again) or for a name whose image does not exist; 500 slowloris
//! connections trickle a request head one byte every 2 s and reconnect when
//! cut. Each window reports Pipes' resident memory, open descriptors, wrk's
//! rate and failures, cold answers by status, and slowloris connections cut.
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

#[tokio::main]
async fn main() {
    let total = seconds();
    let mut f = Fixtures::new();
    f.serving("warm", "v1");
    for i in 0..COLD {
        f.serving("cold", &format!("c{i}"));
    }
    let pipes = Pipes::start(&[
        ("PIPES_API_TOKEN", Some(TOKEN)),
        ("PIPES_SERVER_CONF", Some(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/pipes.yaml"))),
        ("RUST_LOG", Some("warn")),
    ]);
    let pid = pipes.pid().expect("running");
    let warm = f.host("warm", "v1", "example.com");
    // Every tag of the cold repository stops after 2 s without requests.
    let (status, _) =
        api(&pipes, &f.host("cold", "c0", "example.com"), "PUT", "/__proxyapi/repository/config", Some(r#"{"idle_timeout":"2s"}"#), Some(TOKEN)).await;
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
    let cold_answers = Arc::new(Mutex::new(BTreeMap::<u16, usize>::new()));
    let cold = {
        let (stop, answers, port, user) = (stop.clone(), cold_answers.clone(), pipes.port, f.user.clone());
        tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                // One in five asks for an image that does not exist.
                let host = if i.is_multiple_of(5) { format!("x{i}.nope.{user}.example.com") } else { format!("c{}.cold.{user}.example.com", i % COLD) };
                let client = common::client_for(&host, port);
                let status = match client.get(format!("http://{host}:{port}/")).send().await {
                    Ok(r) => r.status().as_u16(),
                    Err(_) => 0,
                };
                *answers.lock().unwrap().entry(status).or_default() += 1;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };

    println!(
        "\nSoak: {WARM_CONNECTIONS} warm connections (wrk), {SLOWLORIS} slowloris connections, cold traffic every 250 ms; {total} s in windows of {WINDOW} s\n"
    );
    println!("| minute | Pipes RSS MiB | open fds | warm req/s | warm p99 ms | warm failed | cold answers | slowloris cut |");
    println!("|---|---|---|---|---|---|---|---|");
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
        println!("| {minute} | {:.1} | {fds} | {rps} | {p99} | {failed} | {cold:?} | {} |", rss as f64 / 1024.0, cut.swap(0, Ordering::Relaxed));
    }
    stop.store(true, Ordering::Relaxed);
    cold.await.unwrap();
    for l in lorises {
        let _ = l.join();
    }
    assert!(pipes.pid().is_some(), "Pipes ran through");
}

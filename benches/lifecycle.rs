//! Redeploy under load: what a client sees while a deployment moves to a new
//! image, against the same load with nothing happening, in one run.
//!
//! Eight clients send GETs back to back through Pipes. Phase A: steady
//! load, nothing happens. Phase B: the same load while the tag is redeployed
//! (new generation started beside the old, probed, switched, old drained).
//! Both phases are repeated, alternating; figures are per phase. Run through
//! `scripts/bench lifecycle`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{api, Fixtures, Pipes};

const TOKEN: &str = "bench-token-0123456789";
const CLIENTS: usize = 8;
const PHASE: Duration = Duration::from_secs(4);

fn rounds() -> usize {
    std::env::var("PIPES_BENCH_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(3)
}

/// Latencies and failures of one phase.
#[derive(Default)]
struct Phase {
    ok: Vec<Duration>,
    failed: usize,
}

/// Runs the load for `PHASE`; `during` runs beside it from 1 s in.
async fn load<F: std::future::Future<Output = ()>>(pipes: &Pipes, host: &str, during: F) -> Phase {
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Phase::default()));
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (client, url, stop, seen) = (pipes.client(host), pipes.url(host, "/"), stop.clone(), seen.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let t0 = Instant::now();
                    let ok = client.get(&url).send().await.map(|r| r.status() == 200).unwrap_or(false);
                    let mut s = seen.lock().unwrap();
                    if ok {
                        s.ok.push(t0.elapsed());
                    } else {
                        s.failed += 1;
                    }
                }
            })
        })
        .collect();
    let began = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    during.await;
    tokio::time::sleep(PHASE.saturating_sub(began.elapsed())).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let mut phase = Arc::try_unwrap(seen).ok().unwrap().into_inner().unwrap();
    phase.ok.sort();
    phase
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted.get(((sorted.len().max(1) - 1) as f64 * p).round() as usize).copied().unwrap_or_default()
}

#[tokio::main]
async fn main() {
    let mut f = Fixtures::new();
    f.push("app", "live", "g0", "");
    let pipes = Pipes::start(&[
        ("PIPES_API_TOKEN", Some(TOKEN)),
        ("PIPES_DRAIN_TIMEOUT", Some("5s")),
        ("PIPES_SERVER_CONF", Some(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/pipes.yaml"))),
        ("RUST_LOG", Some("warn")),
    ]);
    let host = f.host("app", "live", "example.com");
    assert_eq!(pipes.get(&host, "/").await.status(), 200);

    println!("\nRedeploy under load: {CLIENTS} clients back to back for {} s per phase, alternating\n", PHASE.as_secs());
    println!("| round | phase | requests | failed | p50 ms | p99 ms | max ms | redeploy call ms |");
    println!("|---|---|---|---|---|---|---|---|");
    for round in 1..=rounds() {
        let steady = load(&pipes, &host, async {}).await;
        f.push("app", "live", &format!("g{round}"), "");
        let took = Arc::new(Mutex::new(Duration::ZERO));
        let swap = load(&pipes, &host, {
            let (took, pipes, host) = (took.clone(), &pipes, host.clone());
            async move {
                let t0 = Instant::now();
                let (status, body) = api(pipes, &host, "POST", "/__proxyapi/container/redeploy", None, Some(TOKEN)).await;
                assert_eq!((status, &body["changed"]), (200, &serde_json::json!(true)), "{body}");
                *took.lock().unwrap() = t0.elapsed();
            }
        })
        .await;
        for (name, p, call) in [("steady", &steady, String::new()), ("redeploy", &swap, format!("{:.0}", ms(*took.lock().unwrap())))] {
            println!(
                "| {round} | {name} | {} | {} | {:.2} | {:.2} | {:.1} | {call} |",
                p.ok.len() + p.failed,
                p.failed,
                ms(pct(&p.ok, 0.5)),
                ms(pct(&p.ok, 0.99)),
                ms(p.ok.last().copied().unwrap_or_default()),
            );
        }
        // Let the old generation drain before the next round.
        tokio::time::sleep(Duration::from_secs(6)).await;
    }
    println!();
}

//! The warm path over HTTPS: Pipes against Debian's nginx with the same
//! certificate (ECDSA P-256), the same upstream container and as many
//! workers as Pipes has threads; requests kept alive on one TLS connection,
//! and a new TLS handshake for every request. Systems alternate round by
//! round; figures are medians. Run through `scripts/bench tls`.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/load.rs"]
mod load;

use std::fmt::Write as _;

use common::pki::TestCa;
use common::{env, Pipes};
use load::*;

#[tokio::main]
async fn main() {
    let e = env();
    let rounds = setting("PIPES_BENCH_ROUNDS", 3) as usize;
    let seconds = setting("PIPES_BENCH_SECONDS", 4);
    let threads = setting("PIPES_BENCH_THREADS", 2) as usize;
    let reference = format!("{}/bench/warm:v1", e.registry);
    common::docker_ok(&["tag", &e.fixture, &reference]);
    let ca = TestCa::new("bench-tls");
    let (cert, key) = ca.issue("bench", &[HOST, "*.warm.bench.example.com"]);
    let conf = ca.dir.join("pipes.yaml");
    std::fs::write(&conf, format!("---\nversion: 1\nthreads: {threads}\nupstream_keepalive_pool_size: 1024\n")).unwrap();
    let tls_port = free_port();
    let pipes = Pipes::start(&[
        ("PIPES_SERVER_CONF", Some(conf.to_str().unwrap())),
        ("PIPES_ALLOW", Some("bench/*")),
        ("PIPES_TLS_LISTEN", Some(&format!("127.0.0.1:{tls_port}"))),
        ("PIPES_TLS_CERT", Some(cert.to_str().unwrap())),
        ("PIPES_TLS_KEY", Some(key.to_str().unwrap())),
        ("RUST_LOG", Some("warn")),
    ]);
    assert_eq!(pipes.get(HOST, "/").await.status(), 200);
    let upstream = upstream_of(&pipes.containers()[0]);
    let nginx = Nginx::start(upstream, threads, &[], Some((&cert, &key)));

    let systems = [("nginx", nginx.port), ("Pipes", tls_port)];
    let cases = [("3 B, keep-alive", "/bytes/3", true), ("64 KiB, keep-alive", "/bytes/65536", true), ("3 B, new TLS connection each", "/bytes/3", false)];
    let mut commands = Vec::new();
    let mut table = String::new();
    writeln!(table, "| case | system | req/s | p50 ms | p99 ms | errors | req/s vs nginx | p99 vs nginx |\n|---|---|---|---|---|---|---|---|").unwrap();
    for (case, path, keepalive) in cases {
        let mut runs: Vec<Vec<Load>> = vec![Vec::new(); systems.len()];
        for _ in 0..rounds {
            for (i, (_, port)) in systems.iter().enumerate() {
                runs[i].push(wrk(&format!("https://127.0.0.1:{port}{path}"), keepalive, None, seconds, &mut commands));
            }
        }
        let s: Vec<Load> = runs.iter().map(|r| summary(r)).collect();
        for (i, (name, _)) in systems.iter().enumerate() {
            writeln!(
                table,
                "| {case} | {name} | {:.0} | {:.2} | {:.2} | {} | {:.2} | {:.2} |",
                s[i].rps,
                s[i].p50_ms,
                s[i].p99_ms,
                s[i].errors,
                s[i].rps / s[0].rps,
                s[i].p99_ms / s[0].p99_ms
            )
            .unwrap();
        }
    }
    println!("\nWarm path over TLS: {threads} Pipes threads, {threads} nginx workers, {rounds} rounds of {seconds} s, medians\n");
    println!("{table}");
    println!("Commands (port differs per system):\n");
    for c in &commands {
        println!("    {c}");
    }
    drop(nginx);
    drop(pipes);
    let _ = common::docker(&["rmi", &reference]);
}

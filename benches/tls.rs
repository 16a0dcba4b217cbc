//! The warm path over HTTPS: Pipes against Debian's nginx, HAProxy and Caddy
//! with the same certificate (ECDSA P-256), the same upstream container and
//! as many workers or threads as Pipes has threads; requests kept alive on
//! one TLS connection, and a new TLS handshake for every request. Systems
//! alternate round by round; figures (req/s, latency, CPU time of the
//! proxy per request) are medians. Run through `scripts/bench tls`.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/load.rs"]
mod load;
#[path = "support/proxies.rs"]
mod proxies;

use std::fmt::Write as _;

use common::pki::TestCa;
use common::{env, Pipes};
use load::*;
use proxies::Proxy;

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
    let tls = Some((cert.as_path(), key.as_path()));
    let nginx = Proxy::nginx(&[], upstream, threads, &[], tls);
    let haproxy = Proxy::haproxy(&[], upstream, threads, tls);
    let caddy = Proxy::caddy(&[], upstream, threads, tls);

    let systems = [
        ("nginx", nginx.port, nginx.pid()),
        ("HAProxy", haproxy.port, haproxy.pid()),
        ("Caddy", caddy.port, caddy.pid()),
        ("Pipes", tls_port, pipes.pid().expect("pipes runs")),
    ];
    let by_caddy = systems.iter().position(|s| s.0 == "Caddy").expect("Caddy is raced");
    let cases = [("3 B, keep-alive", "/bytes/3", true), ("64 KiB, keep-alive", "/bytes/65536", true), ("3 B, new TLS connection each", "/bytes/3", false)];
    let mut commands = Vec::new();
    let mut table = String::new();
    writeln!(
        table,
        "| case | system | req/s | p50 ms | p99 ms | errors | CPU µs per request | req/s vs nginx | req/s vs Caddy | CPU vs nginx | CPU vs Caddy | p99 vs nginx |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    .unwrap();
    for (case, path, keepalive) in cases {
        let mut runs: Vec<Vec<Counted>> = vec![Vec::new(); systems.len()];
        for _ in 0..rounds {
            for (i, (_, port, process)) in systems.iter().enumerate() {
                runs[i].push(counted(Some(*process), || wrk(&format!("https://127.0.0.1:{port}{path}"), keepalive, None, seconds, &mut commands)));
            }
        }
        let s: Vec<Counted> = runs.iter().map(|r| Counted::summary(r)).collect();
        for (i, (name, _, _)) in systems.iter().enumerate() {
            let (load, cpu) = (&s[i].load, s[i].cpu_us);
            writeln!(
                table,
                "| {case} | {name} | {:.0} | {:.2} | {:.2} | {} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
                load.rps,
                load.p50_ms,
                load.p99_ms,
                load.errors,
                cpu,
                load.rps / s[0].load.rps,
                load.rps / s[by_caddy].load.rps,
                cpu / s[0].cpu_us,
                cpu / s[by_caddy].cpu_us,
                load.p99_ms / s[0].load.p99_ms
            )
            .unwrap();
        }
    }
    println!(
        "\nWarm path over TLS: {threads} Pipes threads, {threads} nginx workers, HAProxy {threads} threads, Caddy GOMAXPROCS={threads}; \
         {rounds} rounds of {seconds} s, medians; {}, {}, Caddy {}\n",
        version("nginx", &["-v"]),
        version("haproxy", &["-v"]),
        version("caddy", &["version"])
    );
    println!("{table}");
    println!("Commands (port differs per system):\n");
    for c in &commands {
        println!("    {c}");
    }
    drop((nginx, haproxy, caddy));
    drop(pipes);
    let _ = common::docker(&["rmi", &reference]);
}

//! Warm path: the same load through nothing, nginx and Pipes, then spread over
//! 100 deployments.
//!
//! One fixture container; wrk drives a fixed number of connections for a fixed
//! time against it directly (where Pipes reaches it: its IP on Pipes' network,
//! or its port published on 127.0.0.1), against Debian's nginx as reverse
//! proxy (upstream keepalive, as many workers as Pipes has threads), and against
//! Pipes; and against a bare Pingora proxy to the same upstream (this binary,
//! re-executed), the floor Pipes is held to; and against Pipes with metrics
//! on, and with the access log as well, for what recording costs. Systems
//! alternate round by round
//! so drift hits all of them. Then 100 deployments run and the same load is
//! spread over their hosts, through Pipes and through nginx. Prints a table
//! and writes `target/bench-results/warm_path.md`. Run through `scripts/bench`.

#[path = "support/bare.rs"]
mod bare;
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/load.rs"]
mod load;
#[path = "support/proxies.rs"]
mod proxies;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::{docker_ok, env, Pipes};
use load::*;
use proxies::Proxy;

const SPREAD: usize = 100;

// Pipes' allocator, for the bare proxy this binary becomes.
#[global_allocator]
static GLOBAL: pipes::alloc::Allocator = pipes::alloc::Allocator;

fn main() {
    // The bench re-executes itself as the bare-Pingora baseline.
    bare::run_if_asked();
    tokio::runtime::Runtime::new().expect("runtime").block_on(bench());
}

async fn bench() {
    let e = env();
    let rounds = setting("PIPES_BENCH_ROUNDS", 3) as usize;
    let seconds = setting("PIPES_BENCH_SECONDS", 4);
    let threads = setting("PIPES_BENCH_THREADS", 2) as usize;
    let user = "bench";
    let repo_ref = format!("{}/{user}/warm", e.registry);
    for tag in std::iter::once("v1".to_owned()).chain((0..SPREAD).map(|i| format!("s{i}"))) {
        docker_ok(&["tag", &e.fixture, &format!("{repo_ref}:{tag}")]);
    }
    let conf_dir = std::env::temp_dir().join(format!("pipes-bench-conf-{}", std::process::id()));
    std::fs::create_dir_all(&conf_dir).unwrap();
    let conf = conf_dir.join("pipes.yaml");
    std::fs::write(
        &conf,
        format!("---\nversion: 1\nthreads: {threads}\ngrace_period_seconds: 1\ngraceful_shutdown_timeout_seconds: 1\nupstream_keepalive_pool_size: 1024\n"),
    )
    .unwrap();
    let pipes = Pipes::start(&[
        ("PIPES_SERVER_CONF", Some(conf.to_str().unwrap())),
        ("PIPES_ALLOW", Some("bench/*")),
        ("PIPES_MAX_CONTAINERS", Some("150")),
        ("RUST_LOG", Some("warn")),
    ]);
    let pid = pipes.pid().expect("pipes runs");
    // The same with metrics on, and with the access log as well: what recording costs.
    let observed = |log: bool| {
        let metrics = format!("127.0.0.1:{}", free_port());
        Pipes::start(&[
            ("PIPES_SERVER_CONF", Some(conf.to_str().unwrap())),
            ("PIPES_ALLOW", Some("bench/*")),
            ("PIPES_METRICS_LISTEN", Some(&metrics)),
            ("PIPES_ACCESS_LOG", Some(if log { "json" } else { "off" })),
            ("RUST_LOG", Some("warn")),
        ])
    };
    let (metered, logged) = (observed(false), observed(true));
    // PIPES_BENCH_EXTRA_YAML (e.g. "work_stealing: false") runs one more Pipes
    // with those lines added to its Pingora YAML: a change tried against the
    // rest in the same run.
    let extra_yaml = std::env::var("PIPES_BENCH_EXTRA_YAML").ok().filter(|y| !y.trim().is_empty());
    let variant = extra_yaml.as_ref().map(|yaml| {
        let path = conf_dir.join("variant.yaml");
        let lines: Vec<String> = yaml.split("\\n").map(|l| l.trim().to_owned()).collect();
        // A key given again replaces the bench's own line for it.
        let base: String = std::fs::read_to_string(&conf)
            .expect("the bench's YAML")
            .lines()
            .filter(|l| !lines.iter().any(|n| n.split(':').next() == l.split(':').next()))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&path, format!("{base}{}\n", lines.join("\n"))).expect("variant YAML");
        let variant = Pipes::start(&[("PIPES_SERVER_CONF", Some(path.to_str().unwrap())), ("PIPES_ALLOW", Some("bench/*")), ("RUST_LOG", Some("warn"))]);
        (format!("Pipes + {}", yaml.replace("\\n", ", ")), variant)
    });
    if let Some((_, v)) = &variant {
        assert_eq!(v.get(HOST, "/").await.status(), 200);
    }
    assert_eq!(metered.get(HOST, "/").await.status(), 200);
    assert_eq!(logged.get(HOST, "/").await.status(), 200);

    // The warm deployment, and where Pipes reaches its container: the
    // direct runs and the other proxies go there too.
    assert_eq!(pipes.get(HOST, "/").await.status(), 200);
    let container = pipes.containers()[0].clone();
    let upstream = upstream_of(&container);
    let nginx = Proxy::nginx(&[], upstream, threads, &[], None);
    let haproxy = Proxy::haproxy(&[], upstream, threads, None);
    let caddy = Proxy::caddy(&[], upstream, threads, None);
    let bare_port = free_port();
    let bare = Process(bare::command(&[], bare_port, upstream, &conf).spawn().expect("bare proxy starts"));
    wait_listening(bare_port, "bare Pingora");

    let mut commands = Vec::new();
    let local = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    // Each system's address and the process whose CPU time is counted (none
    // for the container reached directly).
    let mut systems: Vec<(&str, SocketAddr, Option<u32>)> = vec![
        ("direct", upstream, None),
        ("nginx", local(nginx.port), Some(nginx.pid())),
        ("HAProxy", local(haproxy.port), Some(haproxy.pid())),
        ("Caddy", local(caddy.port), Some(caddy.pid())),
        ("bare Pingora", local(bare_port), Some(bare.0.id())),
        ("Pipes", local(pipes.port), Some(pid)),
        ("Pipes, metrics on", local(metered.port), metered.pid()),
        ("Pipes, metrics and access log on", local(logged.port), logged.pid()),
    ];
    if let Some((name, v)) = &variant {
        systems.push((name.as_str(), local(v.port), v.pid()));
    }
    let index = |name: &str| systems.iter().position(|s| s.0 == name).expect("a system of the bench");
    let (direct, by_nginx, by_caddy, by_bare, by_pipes) = (index("direct"), index("nginx"), index("Caddy"), index("bare Pingora"), index("Pipes"));
    let cases: [(&str, &str, bool); 3] =
        [("3 B, keep-alive", "/bytes/3", true), ("64 KiB, keep-alive", "/bytes/65536", true), ("3 B, new connection each", "/bytes/3", false)];
    let mut table = String::new();
    writeln!(
        table,
        "| case | system | req/s | p50 ms | p99 ms | errors | CPU µs per request | switches per request | req/s vs nginx | req/s vs Caddy | req/s vs direct | req/s vs bare | req/s vs Pipes | CPU vs nginx | CPU vs Caddy | p99 vs nginx |"
    )
    .unwrap();
    writeln!(table, "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|").unwrap();
    // PIPES_BENCH_ONLY picks cases by name (e.g. "new connection") and skips the 100 deployments.
    let only = std::env::var("PIPES_BENCH_ONLY").ok();
    for (case, path, keepalive) in cases.into_iter().filter(|(c, _, _)| only.as_ref().is_none_or(|o| c.contains(o.as_str()))) {
        let mut runs: Vec<Vec<Counted>> = vec![Vec::new(); systems.len()];
        for _ in 0..rounds {
            for (i, (_, address, process)) in systems.iter().enumerate() {
                runs[i].push(counted(*process, || wrk(&format!("http://{address}{path}"), keepalive, None, seconds, &mut commands)));
            }
        }
        let s: Vec<Counted> = runs.iter().map(|r| Counted::summary(r)).collect();
        for (i, (name, _, _)) in systems.iter().enumerate() {
            let (load, cpu) = (&s[i].load, s[i].cpu_us);
            writeln!(
                table,
                "| {case} | {name} | {:.0} | {:.2} | {:.2} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.3} | {} | {} | {:.2} |",
                load.rps,
                load.p50_ms,
                load.p99_ms,
                load.errors,
                shown(cpu, 1),
                shown(s[i].switches, 2),
                load.rps / s[by_nginx].load.rps,
                load.rps / s[by_caddy].load.rps,
                load.rps / s[direct].load.rps,
                load.rps / s[by_bare].load.rps,
                load.rps / s[by_pipes].load.rps,
                shown(cpu / s[by_nginx].cpu_us, 2),
                shown(cpu / s[by_caddy].cpu_us, 2),
                load.p99_ms / s[by_nginx].load.p99_ms
            )
            .unwrap();
        }
    }
    table.push_str(
        "\nCPU is user + system time of the proxy's threads (nginx's workers included) over each run, divided by its requests; \
         switches are the threads' context switches, per request; both medians over rounds.\n",
    );

    drop((metered, logged, variant));
    if only.is_some() {
        println!("\n{table}");
        return;
    }

    // 100 deployments: start them (8 at a time), then spread the load over them.
    let hosts: Vec<String> = (0..SPREAD).map(|i| format!("s{i}.warm.{user}.example.com")).collect();
    for chunk in hosts.chunks(8) {
        let answers = futures_util::future::join_all(chunk.iter().map(|h| pipes.get(h, "/bytes/3"))).await;
        assert!(answers.iter().all(|r| r.status() == 200));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_kib = rss_kib(pid);
    let script = conf_dir.join("spread.lua");
    let host_list = hosts.iter().map(|h| format!("\"{h}\"")).collect::<Vec<_>>().join(",");
    std::fs::write(
        &script,
        format!(
            "local hosts = {{{host_list}}}\nlocal i = 0\nrequest = function()\n  i = i % #hosts + 1\n  \
             return wrk.format(\"GET\", \"/bytes/3\", {{ Host = hosts[i] }})\nend\n"
        ),
    )
    .unwrap();
    let upstreams: Vec<(String, SocketAddr)> = (0..SPREAD)
        .map(|i| {
            let filter = format!("label=pipes.deployment={user}/warm:s{i}");
            let id = docker_ok(&["ps", "-q", "--filter", &filter, "--filter", &format!("label=pipes.instance={}", pipes.instance)]);
            (hosts[i].clone(), upstream_of(&id))
        })
        .collect();
    let nginx_spread = Proxy::nginx(&[], upstream, threads, &upstreams, None);
    let url = format!("http://127.0.0.1:{}/bytes/3", pipes.port);
    let nginx_url = format!("http://127.0.0.1:{}/bytes/3", nginx_spread.port);
    let (mut single, mut spread, mut nginx_single, mut nginx_many) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        std::thread::spawn(move || {
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid), std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    for _ in 0..rounds {
        single.push(wrk(&url, true, None, seconds, &mut commands));
        spread.push(wrk(&url, true, Some(&script), seconds, &mut commands));
        nginx_single.push(wrk(&nginx_url, true, None, seconds, &mut commands));
        nginx_many.push(wrk(&nginx_url, true, Some(&script), seconds, &mut commands));
    }
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    sampler.join().unwrap();
    let (one, many) = (summary(&single), summary(&spread));
    let (n_one, n_many) = (summary(&nginx_single), summary(&nginx_many));
    let running = docker_ok(&["ps", "-q", "--filter", &format!("label=pipes.instance={}", pipes.instance)]).lines().count();
    writeln!(table, "\n| 100 deployments running | req/s | p50 ms | p99 ms | errors | spread / one host |\n|---|---|---|---|---|---|").unwrap();
    for (name, l, base) in [
        ("Pipes, one host", one, one),
        (&*format!("Pipes, spread over {SPREAD} hosts"), many, one),
        ("nginx, one host", n_one, n_one),
        (&*format!("nginx, spread over {SPREAD} upstreams"), n_many, n_one),
    ] {
        writeln!(table, "| {name} | {:.0} | {:.2} | {:.2} | {} | {:.2} |", l.rps, l.p50_ms, l.p99_ms, l.errors, l.rps / base.rps).unwrap();
    }
    writeln!(
        table,
        "\nContainers running: {running}. Pipes resident memory: {:.1} MiB idle with {SPREAD} deployments, {:.1} MiB peak under load.",
        idle_kib as f64 / 1024.0,
        peak.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1024.0
    )
    .unwrap();

    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned()))
        .unwrap_or_default();
    let mut report = String::new();
    writeln!(report, "# Warm-path benchmark\n").unwrap();
    writeln!(report, "Machine: {} cores, {cpu}, kernel {}.", version("nproc", &[]), version("uname", &["-r"])).unwrap();
    writeln!(
        report,
        "Versions: Pipes {} ({threads} threads), {}, {}, Caddy {}, {}, Docker engine {}.",
        version("git", &["rev-parse", "--short", "HEAD"]),
        version("nginx", &["-v"]),
        version("haproxy", &["-v"]),
        version("caddy", &["version"]),
        version("wrk", &["-v"]),
        docker_ok(&["version", "--format", "{{.Server.Version}}"])
    )
    .unwrap();
    writeln!(
        report,
        "Setup: one fixture container (static Rust HTTP/1.1 server) reached by every system at {upstream} \
         (where Pipes reaches it); nginx {threads} workers, upstream keepalive 128; HAProxy {threads} threads, \
         `http-reuse always`; Caddy GOMAXPROCS={threads}, 128 idle upstream connections per host; {rounds} rounds of {seconds} s per \
         system, alternating; figures are medians over rounds.\n"
    )
    .unwrap();
    report.push_str(&table);
    writeln!(report, "\nCommands (URL port differs per system):\n").unwrap();
    for c in &commands {
        writeln!(report, "    {c}").unwrap();
    }
    println!("\n{report}");
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-results");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("warm_path.md"), &report).unwrap();
    println!("written to {}", out.join("warm_path.md").display());

    drop((nginx, haproxy, caddy, bare));
    drop(nginx_spread);
    drop(pipes);
    for tag in std::iter::once("v1".to_owned()).chain((0..SPREAD).map(|i| format!("s{i}"))) {
        let _ = common::docker(&["rmi", &format!("{repo_ref}:{tag}")]);
    }
    let _ = std::fs::remove_dir_all(&conf_dir);
}

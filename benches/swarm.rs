//! Warm path with the Swarm backend against the Docker backend.
//!
//! Two Pipes containers of the image, one per backend, both on one attachable
//! overlay network and both reaching their deployment (the same fixture
//! image) over it, so the backend is the only difference; wrk drives each in
//! turn, round by round (first in alternate rounds), through its published port. Needs a swarm manager
//! (scripts/bench initializes a single-node swarm as scripts/test does).
//! Prints the figures and writes `target/bench-results/swarm.md`.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/load.rs"]
mod load;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use common::{docker, docker_ok, env, unique};
use load::*;

/// What the bench creates, removed on drop.
struct Created {
    containers: Vec<String>,
    instances: Vec<String>,
    network: String,
    image: String,
}

impl Drop for Created {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = docker(&["rm", "-fv", c]);
        }
        for instance in &self.instances {
            let label = format!("label=pipes.instance={instance}");
            for kind in [&["service", "ls", "-q"][..], &["ps", "-aq"][..]] {
                let listed = docker(&[kind, &["--filter", &label]].concat());
                for id in String::from_utf8_lossy(&listed.stdout).lines() {
                    let _ = if kind[0] == "service" { docker(&["service", "rm", id]) } else { docker(&["rm", "-f", id]) };
                }
            }
        }
        for _ in 0..50 {
            if docker(&["network", "rm", &self.network]).status.success() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = docker(&["rmi", "-f", &self.image]);
    }
}

fn main() {
    if std::env::var_os("PIPES_TEST_SWARM").is_none() {
        eprintln!("skipped: the engine is not a swarm manager (run through scripts/bench)");
        return;
    }
    let e = env();
    let rounds = setting("PIPES_BENCH_ROUNDS", 3) as usize;
    let seconds = setting("PIPES_BENCH_SECONDS", 4);
    let reference = format!("{}/bench/warm:v1", e.registry);
    docker_ok(&["tag", &e.fixture, &reference]);
    docker_ok(&["push", "-q", &reference]);
    let image = common::build_pipes_image();
    let network = common::network("pipes-bench-overlay", &["-d", "overlay", "--attachable"]);
    let mut created = Created { containers: Vec::new(), instances: Vec::new(), network, image };

    let mut ports = Vec::new();
    for backend in ["docker", "swarm"] {
        let instance = unique(&format!("bench-{backend}"));
        let name = unique(&format!("pipes-bench-{backend}"));
        let network = created.network.clone();
        let mut args: Vec<String> =
            ["run", "-d", "--name", &name, "--label", &format!("pipes.test={}", e.run), "--network", &network].iter().map(|s| s.to_string()).collect();
        args.extend(["-v".into(), "/var/run/docker.sock:/var/run/docker.sock".into(), "-p".into(), "127.0.0.1::8080".into()]);
        let own = [format!("PIPES_BACKEND={backend}"), format!("PIPES_NETWORK={network}"), "PIPES_ALLOW=bench/*".to_owned()];
        for v in common::container_env(&instance).into_iter().chain(own) {
            args.extend(["-e".to_owned(), v]);
        }
        args.push(created.image.clone());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        docker_ok(&refs);
        created.containers.push(name.clone());
        created.instances.push(instance);
        let port = common::published(&name, "8080/tcp");
        // First request: the cold start, until it answers 200.
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let out = std::process::Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", &format!("Host: {HOST}"), &format!("http://127.0.0.1:{port}/")])
                .output()
                .expect("curl runs");
            if out.stdout == b"200" {
                break;
            }
            assert!(Instant::now() < deadline, "{backend} Pipes did not serve {HOST} within 90 s");
            std::thread::sleep(Duration::from_millis(200));
        }
        ports.push((backend, port));
    }

    let mut commands = Vec::new();
    let mut runs: Vec<Vec<Load>> = vec![Vec::new(); ports.len()];
    for round in 0..rounds {
        // Each backend goes first every other round, so drift hits both.
        for k in 0..ports.len() {
            let i = (k + round) % ports.len();
            runs[i].push(wrk(&format!("http://127.0.0.1:{}/", ports[i].1), true, None, seconds, &mut commands));
        }
    }
    let results: Vec<Load> = runs.iter().map(|r| summary(r)).collect();
    let mut out = String::new();
    let _ = writeln!(out, "Warm path by backend: 3 B answers, keep-alive, {CONNECTIONS} connections, {rounds} rounds of {seconds} s, medians\n");
    let _ = writeln!(out, "| backend | req/s | p50 ms | p99 ms | errors |\n|---|---|---|---|---|");
    for ((backend, _), r) in ports.iter().zip(&results) {
        let _ = writeln!(out, "| {backend} | {:.0} | {:.2} | {:.2} | {} |", r.rps, r.p50_ms, r.p99_ms, r.errors);
    }
    let _ = writeln!(out, "\nswarm / docker: {:.2}x req/s\n", results[1].rps / results[0].rps.max(1.0));
    for c in &commands {
        let _ = writeln!(out, "    {c}");
    }
    print!("{out}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-results");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("swarm.md"), out);
}

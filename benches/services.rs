//! Cold start of an app with its services: what Pipes adds to the engine.
//!
//! In one run, alternating A B A B, each round on fresh volumes (so Postgres
//! makes its cluster every time) with the images present:
//! - A: time to the first answer through Pipes for a deployment of the
//!   services tests' app with Postgres and Redis beside it (each checked by a
//!   TCP connect), and each phase of that start as Pipes timed it;
//! - B: the engine's own work for the same three containers, in sequence over
//!   its API: network and volumes, Postgres until its port accepts, Redis
//!   until its port accepts, the app until it answers 200.
//!
//! Run through `scripts/bench services`, which prepares the engine, registry
//! and images.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bollard::models::{ContainerCreateBody, EndpointSettings, HostConfig, Mount, MountType, NetworkCreateRequest, NetworkingConfig, VolumeCreateRequest};
use bollard::query_parameters::{CreateContainerOptions, RemoveContainerOptions};
use bollard::Docker;
use common::{api, client_for, env, Fixtures, Pipes};

const TOKEN: &str = "bench-token-0123456789";

fn rounds() -> usize {
    std::env::var("PIPES_BENCH_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(7)
}

fn config(user: &str) -> String {
    format!(
        r#"{{"port": 8000, "services": {{
            "db": {{"image": "{user}/postgres:15", "cmd": ["-c", "fsync=off"], "volumes": {{"pgdata": "/var/lib/postgresql/data"}}, "health": {{"tcp": 5432}}}},
            "cache": {{"image": "{user}/redis:7", "volumes": {{"redisdata": "/data"}}, "health": {{"tcp": 6379}}}}}}}}"#
    )
}

/// Time to the first answer through Pipes for tag `tag`.
async fn through_pipes(pipes: &Pipes, user: &str, tag: &str) -> Duration {
    let host = format!("{tag}.shop.{user}.example.com");
    let t0 = Instant::now();
    let resp = client_for(&host, 0).get(pipes.url(&host, "/")).send().await.expect("answer");
    let took = t0.elapsed();
    assert_eq!(resp.status(), 200, "{tag}: {}", resp.text().await.unwrap_or_default());
    took
}

/// Waits until `addr` accepts a connection, as Pipes' probe does.
async fn until_connects(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "{addr} did not accept within 60 s");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Creates and starts a container on `network` (known there as `alias`),
/// with `volume` mounted at `path`; its IP on the network.
async fn run(docker: &Docker, label: &HashMap<String, String>, image: &str, network: &str, alias: &str, mount: Option<(&str, &str)>) -> std::net::IpAddr {
    let endpoint = EndpointSettings { aliases: Some(vec![alias.to_owned()]), ..Default::default() };
    let mounts =
        mount.map(|(volume, path)| vec![Mount { target: Some(path.into()), source: Some(volume.into()), typ: Some(MountType::VOLUME), ..Default::default() }]);
    let body = ContainerCreateBody {
        image: Some(image.into()),
        labels: Some(label.clone()),
        cmd: (alias == "db").then(|| vec!["-c".into(), "fsync=off".into()]),
        host_config: Some(HostConfig { network_mode: Some(network.into()), mounts, ..Default::default() }),
        networking_config: Some(NetworkingConfig { endpoints_config: Some(HashMap::from([(network.to_owned(), endpoint)])) }),
        ..Default::default()
    };
    let id = docker.create_container(None::<CreateContainerOptions>, body).await.expect("create").id;
    docker.start_container(&id, None).await.expect("start");
    let info = docker.inspect_container(&id, None).await.expect("inspect");
    let ip = info.network_settings.and_then(|n| n.networks).and_then(|mut n| n.remove(network)).and_then(|e| e.ip_address).expect("an address");
    ip.parse().expect("an IP")
}

/// The engine's own work for the same three containers, in sequence.
async fn direct(docker: &Docker, images: &[String; 3], round: usize) -> Duration {
    let run_id = &env().run;
    let label = HashMap::from([("pipes.test".to_string(), run_id.clone()), (DIRECT.0.to_string(), DIRECT.1.to_string())]);
    let network = format!("bench-services-{run_id}-{round}");
    let (pgdata, redisdata) = (format!("{network}-pg"), format!("{network}-redis"));
    let probe = reqwest::Client::builder().no_proxy().build().expect("client");
    let t0 = Instant::now();
    let request = NetworkCreateRequest { name: network.clone(), driver: Some("bridge".into()), labels: Some(label.clone()), ..Default::default() };
    docker.create_network(request).await.expect("network");
    for volume in [&pgdata, &redisdata] {
        let request = VolumeCreateRequest { name: Some(volume.clone()), labels: Some(label.clone()), ..Default::default() };
        docker.create_volume(request).await.expect("volume");
    }
    let db = run(docker, &label, &images[0], &network, "db", Some((&pgdata, "/var/lib/postgresql/data"))).await;
    until_connects(SocketAddr::new(db, 5432)).await;
    let cache = run(docker, &label, &images[1], &network, "cache", Some((&redisdata, "/data"))).await;
    until_connects(SocketAddr::new(cache, 6379)).await;
    let app = run(docker, &label, &images[2], &network, "app", None).await;
    let url = format!("http://{app}:8000/");
    loop {
        if probe.get(&url).send().await.is_ok_and(|r| r.status() == 200) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    t0.elapsed()
}

/// The label of what the engine's rounds make (and nothing of Pipes').
const DIRECT: (&str, &str) = ("pipes.bench", "services-direct");

/// Removes what the engine's rounds made.
async fn clean(docker: &Docker) {
    for kind in [&["ps", "-aq"][..], &["network", "ls", "-q"], &["volume", "ls", "-q"]] {
        let filter = format!("label={}={}", DIRECT.0, DIRECT.1);
        let mut args = kind.to_vec();
        args.extend(["--filter", &filter]);
        for id in common::docker_ok(&args).lines() {
            match kind[0] {
                "ps" => {
                    let _ = docker.remove_container(id, Some(RemoveContainerOptions { force: true, v: true, ..Default::default() })).await;
                }
                "network" => {
                    let _ = docker.remove_network(id).await;
                }
                _ => {
                    let _ = common::docker(&["volume", "rm", id]);
                }
            }
        }
    }
}

/// `pipes_cold_start_phase_seconds_sum` by phase, from the metrics.
async fn phase_sums(metrics: &str) -> HashMap<String, f64> {
    let text = reqwest::get(format!("http://{metrics}/metrics")).await.expect("metrics").text().await.expect("text");
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("pipes_cold_start_phase_seconds_sum{phase=\"")?;
            let (phase, value) = rest.split_once("\"} ")?;
            Some((phase.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main]
async fn main() {
    let e = env();
    let docker = Docker::connect_with_local_defaults().expect("engine").negotiate_version().await.expect("version");
    let mut f = Fixtures::new();
    f.publish_from(&e.postgres, "postgres", "15", "");
    f.publish_from(&e.redis, "redis", "7", "");
    f.publish_from(&e.app, "shop", "v0", "");
    let images = [e.postgres.clone(), e.redis.clone(), e.app.clone()];
    let metrics = format!("127.0.0.1:{}", common::free_port());
    let allow = format!("{}/*", f.user);
    let pipes = Pipes::start(&[
        ("PIPES_METRICS_LISTEN", Some(&metrics)),
        ("PIPES_ALLOW", Some(&allow)),
        ("PIPES_API_TOKEN", Some(TOKEN)),
        ("PIPES_SERVER_CONF", Some(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/pipes.yaml"))),
        ("RUST_LOG", Some("warn")),
    ]);
    let host = format!("v0.shop.{}.example.com", f.user);
    let (status, body) = api(&pipes, &host, "PUT", "/__proxyapi/repository/config", Some(&config(&f.user)), Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    // Every image pulled once, outside the rounds.
    through_pipes(&pipes, &f.user, "v0").await;
    // One tag per round, pulled here: every round starts cold with its images present.
    for i in 1..=rounds() {
        let reference = f.push_from(&e.app, "shop", &format!("r{i}"), "r", "");
        common::docker_ok(&["pull", "-q", &reference]);
    }

    let (mut with_pipes, mut by_engine, mut phases) = (Vec::new(), Vec::new(), HashMap::<String, Vec<f64>>::new());
    for round in 1..=rounds() {
        let before = phase_sums(&metrics).await;
        with_pipes.push(through_pipes(&pipes, &f.user, &format!("r{round}")).await.as_secs_f64() * 1000.0);
        for (phase, sum) in phase_sums(&metrics).await {
            let took = (sum - before.get(&phase).copied().unwrap_or(0.0)) * 1000.0;
            if took > 0.0 {
                phases.entry(phase).or_default().push(took);
            }
        }
        by_engine.push(direct(&docker, &images, round).await.as_secs_f64() * 1000.0);
        clean(&docker).await;
    }
    let (p, d) = (median(with_pipes.clone()), median(by_engine.clone()));
    println!("\n## Cold start of an app with Postgres and Redis ({} rounds, images present, fresh volumes)\n", rounds());
    println!("| case | median ms | min ms | max ms |");
    println!("|---|---|---|---|");
    let row = |name: &str, v: &[f64]| {
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(0.0, f64::max);
        println!("| {name} | {:.0} | {min:.0} | {max:.0} |", median(v.to_vec()));
    };
    row("through Pipes: first answer", &with_pipes);
    row("engine API, in sequence: network, volumes, db, cache, app answering", &by_engine);
    println!("\nPipes / engine in sequence: {:.2}\n", p / d);
    println!("| phase (Pipes) | median ms |");
    println!("|---|---|");
    let mut names: Vec<&String> = phases.keys().collect();
    names.sort();
    for name in names {
        println!("| {name} | {:.0} |", median(phases[name].clone()));
    }
    // Pipes' deployments go with it; their volumes with their deployments.
    for round in 1..=rounds() {
        let host = format!("r{round}.shop.{}.example.com", f.user);
        let _ = api(&pipes, &host, "DELETE", "/__proxyapi/container", None, Some(TOKEN)).await;
    }
    let _ = api(&pipes, &host, "DELETE", "/__proxyapi/container", None, Some(TOKEN)).await;
}

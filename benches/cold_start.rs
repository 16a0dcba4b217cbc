//! Cold start: what Pipes adds to the engine's own work.
//!
//! In one run, alternating A B A B:
//! - A: time to first byte through Pipes for a deployment with no container;
//! - B: the engine's own create + start + first HTTP 200 for the same image,
//!   driven directly over its API;
//!
//! once with the image present locally and once with a pull from the local
//! registry. Then 200 concurrent first requests to one cold deployment.
//! Run through `scripts/bench`, which prepares the engine, registry and fixture.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bollard::auth::DockerCredentials;
use bollard::models::{ContainerCreateBody, HostConfig, PortBinding};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, ListContainersOptions, PushImageOptions, RemoveContainerOptions, RemoveImageOptions, TagImageOptions,
};
use bollard::Docker;
use common::{client_for, env, Pipes, TestEnv as Env};
use futures_util::StreamExt;

fn rounds() -> usize {
    std::env::var("PIPES_BENCH_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(15)
}

fn start_pipes() -> Pipes {
    Pipes::start(&[
        ("PIPES_ALLOW", Some("bench/*")),
        ("PIPES_SERVER_CONF", Some(concat!(env!("CARGO_MANIFEST_DIR"), "/conf/pipes.yaml"))),
        ("RUST_LOG", Some("warn")),
    ])
}

fn client(host: &str) -> reqwest::Client {
    client_for(host, 0)
}

/// Time to the response head of a GET through Pipes.
async fn through_pipes(pipes: &Pipes, tag: &str) -> Duration {
    let host = format!("{tag}.app.bench.example.com");
    let c = client(&host);
    let t0 = Instant::now();
    let resp = c.get(format!("http://{host}:{}/", pipes.port)).send().await.expect("answer");
    let took = t0.elapsed();
    assert_eq!(resp.status(), 200, "{tag}: {}", resp.text().await.unwrap_or_default());
    took
}

/// The engine's own work for the same image: [pull +] create + start + first 200.
async fn direct(docker: &Docker, e: &Env, image: &str, pull: bool, name: &str) -> Duration {
    let probe = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(0).build().unwrap();
    let t0 = Instant::now();
    if pull {
        let (repo, tag) = image.rsplit_once(':').unwrap();
        let options = CreateImageOptions { from_image: Some(repo.into()), tag: Some(tag.into()), ..Default::default() };
        let creds = DockerCredentials {
            username: Some(e.user.clone()),
            password: Some(e.password.clone()),
            serveraddress: Some(e.registry.clone()),
            ..Default::default()
        };
        let mut s = docker.create_image(Some(options), None, Some(creds));
        while let Some(item) = s.next().await {
            item.expect("pull");
        }
    }
    let binding = PortBinding { host_ip: Some("127.0.0.1".into()), host_port: Some(String::new()) };
    let body = ContainerCreateBody {
        image: Some(image.into()),
        labels: Some(HashMap::from([("pipes.test".to_string(), e.run.clone())])),
        exposed_ports: Some(vec!["80/tcp".into()]),
        host_config: Some(HostConfig { port_bindings: Some(HashMap::from([("80/tcp".to_string(), Some(vec![binding]))])), ..Default::default() }),
        ..Default::default()
    };
    let options = CreateContainerOptions { name: Some(name.into()), ..Default::default() };
    let id = docker.create_container(Some(options), body).await.expect("create").id;
    docker.start_container(&id, None).await.expect("start");
    let info = docker.inspect_container(&id, None).await.expect("inspect");
    let port = info
        .network_settings
        .and_then(|n| n.ports)
        .and_then(|p| p.get("80/tcp").cloned().flatten())
        .and_then(|b| b.first().and_then(|b| b.host_port.clone()))
        .expect("published port");
    let url = format!("http://127.0.0.1:{port}/");
    loop {
        if let Ok(r) = probe.get(&url).send().await {
            if r.status() == 200 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    t0.elapsed()
}

async fn tag(docker: &Docker, source: &str, repo: &str, tag: &str) {
    let options = TagImageOptions { repo: Some(repo.into()), tag: Some(tag.into()) };
    docker.tag_image(source, Some(options)).await.expect("tag");
}

async fn push(docker: &Docker, e: &Env, repo: &str, tag: &str) {
    let creds =
        DockerCredentials { username: Some(e.user.clone()), password: Some(e.password.clone()), serveraddress: Some(e.registry.clone()), ..Default::default() };
    let options = PushImageOptions { tag: Some(tag.into()), ..Default::default() };
    let mut s = docker.push_image(repo, Some(options), Some(creds));
    while let Some(item) = s.next().await {
        item.expect("push");
    }
}

async fn untag(docker: &Docker, image: &str) {
    let options = RemoveImageOptions { noprune: true, ..Default::default() };
    let _ = docker.remove_image(image, Some(options), None).await;
}

async fn remove_labelled(docker: &Docker, label: &str) {
    let filters = HashMap::from([("label".to_string(), vec![label.to_string()])]);
    let list = docker.list_containers(Some(ListContainersOptions { all: true, filters: Some(filters), ..Default::default() })).await.unwrap_or_default();
    for c in list {
        if let Some(id) = c.id {
            let options = RemoveContainerOptions { force: true, ..Default::default() };
            let _ = docker.remove_container(&id, Some(options)).await;
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

struct Row {
    case: &'static str,
    pipes: Vec<Duration>,
    direct: Vec<Duration>,
}

impl Row {
    fn print(&mut self) {
        self.pipes.sort();
        self.direct.sort();
        let (pm, pp) = (percentile(&self.pipes, 0.5), percentile(&self.pipes, 0.9));
        let (dm, dp) = (percentile(&self.direct, 0.5), percentile(&self.direct, 0.9));
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:+.1} | {:.2} |",
            self.case,
            self.pipes.len(),
            ms(pm),
            ms(pp),
            ms(dm),
            ms(dp),
            ms(pm) - ms(dm),
            pm.as_secs_f64() / dm.as_secs_f64()
        );
    }
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes --bench; this harness takes no arguments.
    let e = env();
    let docker = Docker::connect_with_local_defaults().unwrap().negotiate_version().await.unwrap();
    let pipes = start_pipes();
    let repo = format!("{}/bench/app", e.registry);
    let n = rounds();

    // Image present locally: one tag per round and system, so every round is cold.
    let mut local = Row { case: "image present", pipes: vec![], direct: vec![] };
    for i in 0..n {
        tag(&docker, &e.fixture, &repo, &format!("l{i}")).await;
        tag(&docker, &e.fixture, &repo, &format!("d{i}")).await;
    }
    for i in 0..n {
        local.pipes.push(through_pipes(&pipes, &format!("l{i}")).await);
        let name = format!("bench-{}-d{i}", e.run);
        local.direct.push(direct(&docker, e, &format!("{repo}:d{i}"), false, &name).await);
    }

    // Image pulled from the registry: pushed, then removed locally.
    let mut pulled = Row { case: "pulled from registry", pipes: vec![], direct: vec![] };
    for i in 0..n {
        for t in [format!("pl{i}"), format!("pd{i}")] {
            tag(&docker, &e.fixture, &repo, &t).await;
            push(&docker, e, &repo, &t).await;
            untag(&docker, &format!("{repo}:{t}")).await;
        }
    }
    for i in 0..n {
        pulled.pipes.push(through_pipes(&pipes, &format!("pl{i}")).await);
        let name = format!("bench-{}-pd{i}", e.run);
        pulled.direct.push(direct(&docker, e, &format!("{repo}:pd{i}"), true, &name).await);
    }

    // Coalescing: 200 concurrent first requests to one cold deployment, on
    // several deployments in turn, so the tail is not one sample's.
    let mut bursts = Vec::new();
    for b in 0..BURSTS {
        let t = format!("burst{b}");
        tag(&docker, &e.fixture, &repo, &t).await;
        bursts.push(burst(&docker, &pipes, &t).await);
    }
    println!("\nCold start, {n} rounds each, alternating Pipes and direct (ms, time to first response head)\n");
    println!("| case | n | Pipes p50 | Pipes p90 | direct p50 | direct p90 | Pipes - direct (p50) | ratio p50 |");
    println!("|---|---|---|---|---|---|---|---|");
    local.print();
    pulled.print();
    println!("\nCoalescing: 200 concurrent first requests to one cold deployment, {BURSTS} deployments in turn\n");
    println!("| burst | containers created | errors | p50 ms | p99 ms | p99 − p50 ms |");
    println!("|---|---|---|---|---|---|");
    for (i, b) in bursts.iter().enumerate() {
        println!("| {} | {} | {} | {:.1} | {:.1} | {:.1} |", i + 1, b.created, b.errors, ms(b.p50), ms(b.p99), ms(b.p99) - ms(b.p50));
    }
    println!();

    drop(pipes);
    remove_labelled(&docker, &format!("pipes.test={}", e.run)).await;
    for i in 0..n {
        for t in [format!("l{i}"), format!("d{i}"), format!("pl{i}"), format!("pd{i}")] {
            untag(&docker, &format!("{repo}:{t}")).await;
        }
    }
    for b in 0..BURSTS {
        untag(&docker, &format!("{repo}:burst{b}")).await;
    }
}

/// Cold deployments hit by a burst of first requests.
const BURSTS: usize = 5;

/// What one burst of first requests saw.
struct Burst {
    created: usize,
    errors: usize,
    p50: Duration,
    p99: Duration,
}

/// 200 concurrent first requests to `bench/app:{tag}`, which has no container.
async fn burst(docker: &Docker, pipes: &Pipes, tag: &str) -> Burst {
    let host = format!("{tag}.app.bench.example.com");
    let c = client(&host);
    let url = format!("http://{host}:{}/", pipes.port);
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let (c, url) = (c.clone(), url.clone());
            tokio::spawn(async move {
                let t0 = Instant::now();
                let ok = c.get(url).send().await.map(|r| r.status() == 200).unwrap_or(false);
                (ok, t0.elapsed())
            })
        })
        .collect();
    let mut took = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (ok, d) = t.await.unwrap();
        errors += usize::from(!ok);
        took.push(d);
    }
    took.sort();
    let filters = HashMap::from([("label".to_string(), vec![format!("pipes.instance={}", pipes.instance), format!("pipes.deployment=bench/app:{tag}")])]);
    let created = docker.list_containers(Some(ListContainersOptions { all: true, filters: Some(filters), ..Default::default() })).await.unwrap().len();
    Burst { created, errors, p50: percentile(&took, 0.5), p99: percentile(&took, 0.99) }
}

//! Cold start: what Pipes adds to the engine's own work.
//!
//! In one run, alternating A B A B:
//! - A: time to first byte through Pipes for a deployment with no container;
//! - B: the engine's own create + start + first HTTP 200 for the same image,
//!   driven directly over its API;
//!
//! once with the image present locally and once with a pull from the local
//! registry. Then waking: the first answer of a stopped and of a paused
//! deployment through Pipes, against the engine's own start (or unpause) and
//! first answer; and after a push, the first answer with the new image pulled
//! ahead against pulling it on the request path. Then 200 concurrent first
//! requests to one cold deployment.
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
use common::{api, client_for, env, Pipes, TestEnv as Env};
use futures_util::StreamExt;

fn rounds() -> usize {
    std::env::var("PIPES_BENCH_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(15)
}

const TOKEN: &str = "bench-token-0123456789";

fn start_pipes(metrics_port: u16) -> Pipes {
    let metrics = format!("127.0.0.1:{metrics_port}");
    Pipes::start(&[
        ("PIPES_METRICS_LISTEN", Some(&metrics)),
        ("PIPES_ALLOW", Some("bench/*")),
        ("PIPES_API_TOKEN", Some(TOKEN)),
        // Every case's deployments stay up until the end: room for all of them.
        ("PIPES_MAX_CONTAINERS", Some("1000")),
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
    let metrics_port = common::free_port();
    let pipes = start_pipes(metrics_port);
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

    let (stopped, paused) = wake(&docker, e, &pipes, &repo, n).await;
    let (ahead, on_path) = after_push(&docker, e, &pipes, &repo, n).await;

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
    let (mut stopped, mut paused) = (stopped, paused);
    stopped.print();
    paused.print();
    let p50 = |v: &mut Vec<Duration>| {
        v.sort();
        percentile(v, 0.5)
    };
    println!("\nPaused against stopped, first answer through Pipes (p50): {:.2}", p50(&mut paused.pipes).as_secs_f64() / p50(&mut stopped.pipes).as_secs_f64());
    let (mut ahead, mut on_path) = (ahead, on_path);
    println!(
        "\nAfter a push to a stopped deployment, first answer with the new image (p50 of {n}): pulled ahead {:.1} ms, \
         pulled on the request path {:.1} ms",
        ms(p50(&mut ahead)),
        ms(p50(&mut on_path))
    );
    println!("\nWhere Pipes' starts spent their time, over every case above (mean ms per step, from its metrics):\n");
    println!("| phase | steps | mean ms |");
    println!("|---|---|---|");
    for (phase, count, mean) in phases(metrics_port).await {
        println!("| {phase} | {count} | {mean:.1} |");
    }
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

/// Each cold-start phase's count and mean (ms), from `pipes_cold_start_phase_seconds`.
async fn phases(metrics_port: u16) -> Vec<(String, u64, f64)> {
    let text = reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics")).await.expect("metrics").text().await.expect("metrics body");
    let value = |name: &str, phase: &str| {
        let prefix = format!("pipes_cold_start_phase_seconds_{name}{{phase=\"{phase}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse::<f64>().ok()).unwrap_or(0.0)
    };
    ["pull", "create", "start", "probe"]
        .iter()
        .map(|p| {
            let (count, sum) = (value("count", p), value("sum", p));
            (p.to_string(), count as u64, if count > 0.0 { sum * 1000.0 / count } else { 0.0 })
        })
        .collect()
}

/// Waits until `GET container` of `host` reports `state`.
async fn until_state(pipes: &Pipes, host: &str, state: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = api(pipes, host, "GET", "/__proxyapi/container", None, Some(TOKEN)).await;
        if body["state"] == state {
            return;
        }
        assert!(Instant::now() < deadline, "{host} never {state}: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The published port of a container's port 80.
async fn port_of(docker: &Docker, id: &str) -> u16 {
    let info = docker.inspect_container(id, None).await.expect("inspect");
    info.network_settings
        .and_then(|n| n.ports)
        .and_then(|p| p.get("80/tcp").cloned().flatten())
        .and_then(|b| b.first().and_then(|b| b.host_port.clone()))
        .and_then(|p| p.parse().ok())
        .expect("published port")
}

/// GETs `port` until it answers 200.
async fn until_200(port: u16) {
    let probe = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(0).build().unwrap();
    let url = format!("http://127.0.0.1:{port}/");
    while !probe.get(&url).send().await.is_ok_and(|r| r.status() == 200) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// First answers of stopped and of paused deployments, through Pipes and by
/// the engine's own start (unpause) + first answer.
async fn wake(docker: &Docker, e: &Env, pipes: &Pipes, repo: &str, n: usize) -> (Row, Row) {
    let mut stopped = Row { case: "stopped container (start)", pipes: vec![], direct: vec![] };
    let mut paused = Row { case: "paused container (unpause)", pipes: vec![], direct: vec![] };
    let host = |t: &str| format!("{t}.app.bench.example.com");
    let pause_config = r#"{"idle_timeout":"1s","idle_action":"pause","pause_timeout":"1h"}"#;
    for i in 0..n {
        for t in [format!("ws{i}"), format!("wp{i}")] {
            tag(docker, &e.fixture, repo, &t).await;
        }
        let (status, _) = api(pipes, &host(&format!("wp{i}")), "PUT", "/__proxyapi/container/config", Some(pause_config), Some(TOKEN)).await;
        assert_eq!(status, 200);
        through_pipes(pipes, &format!("ws{i}")).await;
        through_pipes(pipes, &format!("wp{i}")).await;
        let (status, _) = api(pipes, &host(&format!("ws{i}")), "POST", "/__proxyapi/container/stop", None, Some(TOKEN)).await;
        assert_eq!(status, 200);
    }
    for i in 0..n {
        until_state(pipes, &host(&format!("wp{i}")), "paused").await;
    }
    // The engine's own: one container, stopped and started, paused and unpaused.
    tag(docker, &e.fixture, repo, "wd").await;
    let name = format!("bench-{}-wd", e.run);
    direct(docker, e, &format!("{repo}:wd"), false, &name).await;
    for i in 0..n {
        stopped.pipes.push(through_pipes(pipes, &format!("ws{i}")).await);
        docker.stop_container(&name, None).await.expect("stop");
        let t0 = Instant::now();
        docker.start_container(&name, None).await.expect("start");
        until_200(port_of(docker, &name).await).await;
        stopped.direct.push(t0.elapsed());

        paused.pipes.push(through_pipes(pipes, &format!("wp{i}")).await);
        docker.pause_container(&name).await.expect("pause");
        let port = port_of(docker, &name).await;
        let t0 = Instant::now();
        docker.unpause_container(&name).await.expect("unpause");
        until_200(port).await;
        paused.direct.push(t0.elapsed());
    }
    for i in 0..n {
        for t in [format!("ws{i}"), format!("wp{i}")] {
            untag(docker, &format!("{repo}:{t}")).await;
        }
    }
    untag(docker, &format!("{repo}:wd")).await;
    (stopped, paused)
}

/// After a push to a stopped deployment's tag: its first answer with the new
/// image pulled ahead (the push notification given to Pipes), against one
/// that must pull on the request path (its container and image gone).
async fn after_push(docker: &Docker, e: &Env, pipes: &Pipes, repo: &str, n: usize) -> (Vec<Duration>, Vec<Duration>) {
    let (mut ahead, mut on_path) = (Vec::new(), Vec::new());
    let repository = repo.split_once('/').map_or(repo, |(_, r)| r).to_owned();
    for i in 0..n {
        for t in [format!("ua{i}"), format!("ub{i}")] {
            let reference = format!("{repo}:{t}");
            tag(docker, &e.fixture, repo, &t).await;
            through_pipes(pipes, &t).await;
            let (status, _) = api(pipes, &format!("{t}.app.bench.example.com"), "POST", "/__proxyapi/container/stop", None, Some(TOKEN)).await;
            assert_eq!(status, 200);
            // The tag moves: a new image, pushed, not kept here.
            common::build_image(&reference, &format!("FROM {}\nLABEL bench.push={t}\n", e.fixture));
            push(docker, e, repo, &t).await;
            untag(docker, &reference).await;
        }
        // Pulled ahead: the registry's notification, as Pipes' hook receives it.
        let notification = format!(r#"{{"events":[{{"action":"push","target":{{"repository":"{repository}","tag":"ua{i}"}}}}]}}"#);
        let url = format!("http://example.com:{}/__proxyapi/hooks/registry", pipes.port);
        let resp = client("example.com").post(url).bearer_auth(TOKEN).body(notification).send().await.unwrap();
        assert_eq!(resp.status(), 202);
        let reference = format!("{repo}:ua{i}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while docker.inspect_image(&reference).await.is_err() {
            assert!(Instant::now() < deadline, "{reference} was not pulled ahead");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ahead.push(through_pipes(pipes, &format!("ua{i}")).await);
        // On the request path: nothing of it left here.
        let (status, _) = api(pipes, &format!("ub{i}.app.bench.example.com"), "DELETE", "/__proxyapi/container", None, Some(TOKEN)).await;
        assert_eq!(status, 200);
        on_path.push(through_pipes(pipes, &format!("ub{i}")).await);
    }
    (ahead, on_path)
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

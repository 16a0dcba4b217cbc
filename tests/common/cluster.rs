//! A real three-node swarm for tests and benchmarks: `scripts/cluster up`
//! (run by scripts/test, and by scripts/bench for its cluster case) makes
//! engines n1, n2, n3 — each in network and mount namespaces of its own,
//! all managers — and `solo`, an engine with live-restore outside the swarm.
//! Pipes replicas run as containers on the nodes, with their node's engine
//! socket; deployments go wherever the swarm puts them.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use super::{env, unique};

/// The API token of the replicas the tests run.
pub const TOKEN: &str = "cluster-test-token-0123456789";
/// The registry as the nodes reach it (the test registry's storage).
pub const REGISTRY: &str = "10.213.37.1:5000";
/// The swarm's nodes (all managers); `solo` is not one.
pub const SWARM_NODES: [&str; 3] = ["n1", "n2", "n3"];

/// Where `scripts/cluster` keeps its state, when scripts/test made a cluster.
pub fn state() -> Option<String> {
    std::env::var("PIPES_TEST_CLUSTER").ok().filter(|s| !s.is_empty())
}

/// Whether to skip (no engine, or no cluster: scripts/test says why).
pub fn no_cluster() -> bool {
    if super::skip() {
        return true;
    }
    if state().is_none() {
        super::skipped("no three-node cluster (scripts/cluster up did not run; scripts/test says why)");
        return true;
    }
    false
}

/// A node's address on the cluster's bridge.
pub fn address(node: &str) -> Ipv4Addr {
    let last = match node {
        "n1" => 11,
        "n2" => 12,
        "n3" => 13,
        "solo" => 14,
        other => panic!("no node {other}"),
    };
    Ipv4Addr::new(10, 213, 37, last)
}

/// `node`'s engine socket, as the host sees it.
pub fn socket(node: &str) -> String {
    format!("{}/{node}/docker.sock", state().expect("a cluster"))
}

/// The docker CLI against `node`'s engine.
pub fn on(node: &str, args: &[&str]) -> Output {
    Command::new("docker").arg("-H").arg(format!("unix://{}", socket(node))).args(args).output().expect("docker CLI runs")
}

/// [`on`], asserting success; its trimmed output.
pub fn on_ok(node: &str, args: &[&str]) -> String {
    let out = on(node, args);
    assert!(out.status.success(), "docker -H {node} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The non-empty lines of `text`.
pub fn lines(text: &str) -> Vec<String> {
    text.lines().filter(|l| !l.is_empty()).map(str::to_owned).collect()
}

/// `scripts/cluster <args>`: stops or starts a node's engine.
pub fn cluster_script(args: &[&str]) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cluster");
    let out = Command::new("bash").arg(script).args(args).output().expect("scripts/cluster runs");
    assert!(out.status.success(), "scripts/cluster {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// Whether `node`'s engine answers.
pub fn engine_up(node: &str) -> bool {
    on(node, &["info", "--format", "{{.ID}}"]).status.success()
}

/// An image of the host's engine copied to `nodes`' engines.
pub fn copy_image(image: &str, nodes: &[&str]) {
    for node in nodes {
        let status = Command::new("sh")
            .arg("-c")
            .arg(format!("docker save '{image}' | docker -H 'unix://{}' load -q >/dev/null", socket(node)))
            .status()
            .expect("sh runs");
        assert!(status.success(), "copying {image} to {node}");
    }
}

/// A Pipes replica: where it answers.
pub struct Replica {
    pub addr: SocketAddr,
}

/// Everything a test makes on the cluster, removed on drop (also on
/// failure), leaving every engine running and every node active.
#[derive(Default)]
pub struct Cluster {
    pub instance: String,
    pub network: String,
    pub replicas: Vec<(&'static str, String)>,
    pub image: String,
    /// Stacks deployed (`docker stack deploy` on n1).
    pub stacks: Vec<String>,
}

impl Cluster {
    /// A new instance on a new attachable overlay network, the Pipes image on n1..n3.
    pub fn new() -> Cluster {
        let mut cluster = Cluster::default();
        cluster.instance = unique("cl");
        cluster.image = super::build_pipes_image();
        copy_image(&cluster.image, &SWARM_NODES);
        cluster.network = unique("pipes-cluster-net");
        on_ok("n1", &["network", "create", "-d", "overlay", "--attachable", "--label", &format!("pipes.test={}", env().run), &cluster.network]);
        cluster
    }

    /// Replicas A on n1 and B on n2 with `extra_env`, once both answer.
    pub async fn replicas_a_and_b(&mut self, extra_env: &[&str]) -> (Replica, Replica) {
        let (a, b) = (self.replica("n1", extra_env), self.replica("n2", extra_env));
        until_answering(a.addr).await;
        until_answering(b.addr).await;
        (a, b)
    }

    /// Pipes replica of this instance on `node`, published on the node's address.
    pub fn replica(&mut self, node: &'static str, extra_env: &[&str]) -> Replica {
        let e = env();
        let name = unique("pipes-replica");
        let mut args: Vec<String> = [
            "run",
            "-d",
            "--name",
            &name,
            "--label",
            &format!("pipes.test={}", e.run),
            "--network",
            &self.network,
            "-v",
            "/var/run/docker.sock:/var/run/docker.sock",
            "-p",
            &format!("{}::8080", address(node)),
        ]
        .map(str::to_owned)
        .to_vec();
        let settings = [
            format!("PIPES_INSTANCE={}", self.instance),
            format!("PIPES_LABELS=pipes.test={}", e.run),
            format!("PIPES_REGISTRY={REGISTRY}"),
            "DOCKER_AUTH=true".to_owned(),
            format!("DOCKER_AUTH_USERNAME={}", e.user),
            format!("DOCKER_AUTH_PASSWORD={}", e.password),
            "PIPES_BACKEND=swarm".to_owned(),
            format!("PIPES_NETWORK={}", self.network),
            "PIPES_ALLOW=*".to_owned(),
            format!("PIPES_API_TOKEN={TOKEN}"),
        ];
        for v in settings.into_iter().chain(extra_env.iter().map(|v| v.to_string())) {
            args.push("-e".into());
            args.push(v);
        }
        args.push(self.image.clone());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        on_ok(node, &refs);
        self.replicas.push((node, name.clone()));
        let mapping = on_ok(node, &["port", &name, "8080/tcp"]);
        let addr = mapping.lines().next().and_then(|l| l.parse().ok()).expect("published address");
        Replica { addr }
    }

    /// The services of this instance.
    pub fn services(&self) -> Vec<String> {
        lines(&on_ok("n1", &["service", "ls", "-q", "--filter", &format!("label=pipes.instance={}", self.instance)]))
    }

    /// The one service of `deployment`.
    pub fn service_of(&self, deployment: &str) -> String {
        let found = lines(&on_ok(
            "n1",
            &[
                "service",
                "ls",
                "-q",
                "--filter",
                &format!("label=pipes.instance={}", self.instance),
                "--filter",
                &format!("label=pipes.deployment={deployment}"),
            ],
        ));
        assert_eq!(found.len(), 1, "one service for {deployment}: {found:?}");
        found[0].clone()
    }
}

/// The node (hostname) and container of service `id`'s running task.
pub fn running_task(id: &str) -> Option<(String, String)> {
    let tasks = on_ok("n1", &["service", "ps", "--filter", "desired-state=running", "--no-trunc", "--format", "{{.ID}} {{.Node}} {{.CurrentState}}", id]);
    let task = tasks.lines().find(|l| l.contains("Running"))?.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
    let container = on_ok("n1", &["inspect", "--format", "{{.Status.ContainerStatus.ContainerID}}", &task[0]]);
    Some((task[1].trim_start_matches("pipes-").to_owned(), container))
}

/// The replicas service `id` asks for.
pub fn replicas(id: &str) -> u64 {
    on_ok("n1", &["service", "inspect", "-f", "{{.Spec.Mode.Replicated.Replicas}}", id]).parse().expect("replicas")
}

/// Sets the availability of `nodes` (active, pause, drain).
pub fn availability(nodes: &[&str], to: &str) {
    for node in nodes {
        on_ok("n1", &["node", "update", "--availability", to, &format!("pipes-{node}")]);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // The next test needs the whole cluster: engines up, nodes active.
        for node in SWARM_NODES {
            if !engine_up(node) {
                cluster_script(&["start-engine", node]);
            }
        }
        for node in SWARM_NODES {
            let _ = on("n1", &["node", "update", "--availability", "active", &format!("pipes-{node}")]);
        }
        for (node, name) in &self.replicas {
            if std::thread::panicking() {
                let logs = on(node, &["logs", "--tail", "60", name]);
                eprintln!("--- {name} on {node} ---\n{}{}", String::from_utf8_lossy(&logs.stdout), String::from_utf8_lossy(&logs.stderr));
            }
            let _ = on(node, &["rm", "-fv", name]);
        }
        for stack in &self.stacks {
            let _ = on("n1", &["stack", "rm", stack]);
        }
        let label = format!("label=pipes.instance={}", self.instance);
        for id in lines(&String::from_utf8_lossy(&on("n1", &["service", "ls", "-q", "--filter", &label]).stdout)) {
            if std::thread::panicking() {
                let ps = on("n1", &["service", "ps", "--no-trunc", "--format", "{{.Name}} {{.Node}} {{.CurrentState}} {{.Error}}", &id]);
                eprintln!("--- tasks of {id} ---\n{}", String::from_utf8_lossy(&ps.stdout));
            }
            let _ = on("n1", &["service", "rm", &id]);
        }
        for id in lines(&String::from_utf8_lossy(&on("n1", &["config", "ls", "-q", "--filter", &label]).stdout)) {
            let _ = on("n1", &["config", "rm", &id]);
        }
        // Networks (the instance's, deployments') once their tasks are gone; volumes on every node.
        for _ in 0..100 {
            let mut left = 0;
            for node in SWARM_NODES {
                for id in lines(&String::from_utf8_lossy(&on(node, &["network", "ls", "-q", "--filter", &label]).stdout)) {
                    left += usize::from(!on(node, &["network", "rm", &id]).status.success());
                }
                for id in lines(&String::from_utf8_lossy(&on(node, &["volume", "ls", "-q", "--filter", &label]).stdout)) {
                    left += usize::from(!on(node, &["volume", "rm", &id]).status.success());
                }
            }
            for id in lines(&String::from_utf8_lossy(&on("n1", &["secret", "ls", "-q", "--filter", &label]).stdout)) {
                left += usize::from(!on("n1", &["secret", "rm", &id]).status.success());
            }
            let network_gone = self.network.is_empty()
                || !on("n1", &["network", "inspect", &self.network]).status.success()
                || on("n1", &["network", "rm", &self.network]).status.success();
            if left == 0 && network_gone {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        for node in SWARM_NODES {
            let images = String::from_utf8_lossy(&on(node, &["images", "-q"]).stdout).to_string();
            for id in lines(&images) {
                // Only what is not in use goes; the fixture images are the run's.
                let _ = on(node, &["rmi", &id]);
            }
        }
        let _ = super::docker(&["rmi", "-f", &self.image]);
    }
}

/// A client that sends every host name to `addr`.
pub fn client(host: &str, addr: SocketAddr) -> reqwest::Client {
    reqwest::Client::builder().no_proxy().resolve(host, addr).timeout(Duration::from_secs(60)).build().expect("client")
}

/// GET `path` on `host` through the replica at `addr`: status and JSON body.
pub async fn get(host: &str, addr: SocketAddr, path: &str) -> (u16, serde_json::Value) {
    super::json(client(host, addr).get(format!("http://{host}:{}{path}", addr.port())).send().await.expect("answer")).await
}

/// `method` `path` of the API on `host` through `addr`, with the token.
pub async fn api(host: &str, addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
    let mut req = client(host, addr).request(method.parse().expect("method"), format!("http://{host}:{}{path}", addr.port())).bearer_auth(TOKEN);
    if let Some(b) = body {
        req = req.header("content-type", "application/json").body(b.to_owned());
    }
    super::json(req.send().await.expect("answer")).await
}

/// Waits (a minute at most) until Pipes at `addr` answers HTTP.
pub async fn until_answering(addr: SocketAddr) {
    super::until_answering_at(addr, Duration::from_secs(60)).await;
}

/// Runs `host`'s first request through `through` while only `node` takes
/// tasks, storing `config` first (which starts it) if given.
pub async fn started_on(node: &str, host: &str, through: &Replica, config: Option<&str>) {
    let others: Vec<&str> = SWARM_NODES.into_iter().filter(|n| *n != node).collect();
    availability(&others, "pause");
    if let Some(config) = config {
        let (status, body) = api(host, through.addr, "PUT", "/__proxyapi/container/config", Some(config)).await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, body) = get(host, through.addr, "/").await;
    availability(&others, "active");
    assert_eq!(status, 200, "{body}");
}

/// One answer of a [`Traffic`] loop.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Since the loop started.
    pub at: Duration,
    /// Index of the host asked, and of the address it was asked through.
    pub host: usize,
    pub via: usize,
    pub ok: bool,
    /// The fixture's id and container host name, when it answered.
    pub id: String,
    pub hostname: String,
}

/// Steady request loops, one per host and address, each sending a request
/// every `every` (each given 2 s), bounded to `max` requests each and
/// 5 minutes, or until stopped.
pub struct Traffic {
    pub started: Instant,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    loops: Vec<tokio::task::JoinHandle<Vec<Answer>>>,
}

impl Traffic {
    /// Starts the loops: `hosts` through each of `via`.
    pub fn start(hosts: Vec<String>, via: Vec<SocketAddr>, every: Duration, max: usize) -> Traffic {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let started = Instant::now();
        let mut loops = Vec::new();
        for (host, name) in hosts.into_iter().enumerate() {
            for (through, addr) in via.iter().copied().enumerate() {
                let (flag, name) = (stop.clone(), name.clone());
                loops.push(tokio::spawn(async move {
                    let client = reqwest::Client::builder().no_proxy().resolve(&name, addr).timeout(Duration::from_secs(2)).build().expect("client");
                    let url = format!("http://{name}:{}/loop", addr.port());
                    let mut answers = Vec::new();
                    let mut tick = tokio::time::interval(every);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    while !flag.load(std::sync::atomic::Ordering::Relaxed) && answers.len() < max && started.elapsed() < Duration::from_secs(300) {
                        tick.tick().await;
                        let answer = match client.get(&url).send().await {
                            Ok(resp) if resp.status().is_success() => resp.json::<serde_json::Value>().await.ok(),
                            _ => None,
                        };
                        answers.push(Answer {
                            at: started.elapsed(),
                            host,
                            via: through,
                            ok: answer.is_some(),
                            id: answer.as_ref().and_then(|a| a["id"].as_str()).unwrap_or_default().to_owned(),
                            hostname: answer.as_ref().and_then(|a| a["hostname"].as_str()).unwrap_or_default().to_owned(),
                        });
                    }
                    answers
                }));
            }
        }
        Traffic { started, stop, loops }
    }

    /// Every answer, in the order they came.
    pub async fn stop(self) -> Vec<Answer> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut answers: Vec<Answer> = futures_util::future::join_all(self.loops).await.into_iter().flat_map(|l| l.expect("request loop")).collect();
        answers.sort_by_key(|a| a.at);
        answers
    }
}

/// Failed answers of host `host`, and the time from `from` to the first
/// success after the last failure (zero when none failed).
pub fn outage(answers: &[Answer], host: usize, from: Duration) -> (usize, Duration) {
    outage_of(answers.iter().filter(|a| a.host == host), from)
}

/// [`outage`] of the answers given.
pub fn outage_of<'a>(answers: impl Iterator<Item = &'a Answer>, from: Duration) -> (usize, Duration) {
    let of_host: Vec<&Answer> = answers.filter(|a| a.at >= from).collect();
    let failed = of_host.iter().filter(|a| !a.ok).count();
    let last_failure = of_host.iter().rposition(|a| !a.ok);
    let recovered = match last_failure {
        None => Duration::ZERO,
        Some(i) => of_host.get(i + 1).map_or(Duration::MAX, |a| a.at.saturating_sub(from)),
    };
    (failed, recovered)
}

/// When service `id`'s running task started running.
pub fn task_running_since(id: &str) -> std::time::SystemTime {
    let task = on_ok("n1", &["service", "ps", "-q", "--filter", "desired-state=running", id]);
    let stamp = on_ok("n1", &["inspect", "-f", "{{.Status.Timestamp}}", task.lines().next().expect("a task")]);
    humantime::parse_rfc3339_weak(stamp.split('.').next().unwrap_or_default()).unwrap_or(std::time::UNIX_EPOCH)
}

/// Pipes (the Docker backend) as a process on node `solo`: in its network
/// namespace, talking to its engine; killed and its containers removed on drop.
pub struct OnSolo {
    child: std::process::Child,
    pub addr: SocketAddr,
    pub instance: String,
    pub log: std::path::PathBuf,
}

impl OnSolo {
    /// Starts Pipes on `solo` with `extra_env` besides the test settings; waits until it answers.
    pub async fn start(extra_env: &[(&str, &str)]) -> OnSolo {
        let e = env();
        let instance = unique("solo");
        let dir = std::env::temp_dir().join(format!("pipes-{instance}"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let log = dir.join("pipes.log");
        let port = super::free_port();
        let addr = SocketAddr::from((address("solo"), port));
        let file = std::fs::File::create(&log).expect("log file");
        let mut command = Command::new("nsenter");
        command
            .arg("--net=/run/netns/pipes-solo")
            .arg(env!("CARGO_BIN_EXE_pipes"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs([
                ("DOCKER_HOST", format!("unix://{}", socket("solo"))),
                ("PIPES_LISTEN", addr.to_string()),
                ("PIPES_INSTANCE", instance.clone()),
                ("PIPES_LABELS", format!("pipes.test={}", e.run)),
                ("PIPES_REGISTRY", REGISTRY.to_owned()),
                ("PIPES_ALLOW", "*".to_owned()),
                ("PIPES_API_TOKEN", TOKEN.to_owned()),
                ("PIPES_CONFIG_DIR", dir.join("configs").display().to_string()),
                ("PIPES_DISK_MIN_FREE", "0%".to_owned()),
                ("PIPES_DISK_HIGH", "100%".to_owned()),
                ("DOCKER_AUTH", "true".to_owned()),
                ("DOCKER_AUTH_USERNAME", e.user.clone()),
                ("DOCKER_AUTH_PASSWORD", e.password.clone()),
                ("RUST_LOG", "info".to_owned()),
            ])
            .envs(extra_env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .stdout(file.try_clone().expect("log"))
            .stderr(file);
        let child = command.spawn().expect("nsenter runs");
        let solo = OnSolo { child, addr, instance, log };
        until_answering(addr).await;
        solo
    }

    /// What Pipes logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for OnSolo {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- Pipes on solo ---\n{}", self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !engine_up("solo") {
            cluster_script(&["start-engine", "solo"]);
        }
        let label = format!("label=pipes.instance={}", self.instance);
        for id in lines(&String::from_utf8_lossy(&on("solo", &["ps", "-aq", "--filter", &label]).stdout)) {
            let _ = on("solo", &["rm", "-fv", &id]);
        }
        for kind in ["network", "volume"] {
            for id in lines(&String::from_utf8_lossy(&on("solo", &[kind, "ls", "-q", "--filter", &label]).stdout)) {
                let _ = on("solo", &[kind, "rm", &id]);
            }
        }
        for id in lines(&String::from_utf8_lossy(&on("solo", &["images", "-q"]).stdout)) {
            let _ = on("solo", &["rmi", &id]);
        }
    }
}

/// Two replicas, A on n1 and B on n2, and two deployments both serve: `lost`
/// with its task on n3, `kept` with its task on n1.
pub struct LostAndKept {
    pub cluster: Cluster,
    pub fixtures: super::Fixtures,
    pub a: Replica,
    pub b: Replica,
    pub lost: String,
    pub kept: String,
    pub lost_service: String,
}

impl LostAndKept {
    /// Makes the replicas and the deployments; both replicas have served both.
    pub async fn new() -> LostAndKept {
        let mut cluster = Cluster::new();
        let (a, b) = cluster.replicas_a_and_b(&[]).await;
        let mut fixtures = super::Fixtures::new();
        fixtures.serving("lost", "v1");
        fixtures.serving("kept", "v1");
        let (lost, kept) = (fixtures.host("lost", "v1", "example.com"), fixtures.host("kept", "v1", "example.com"));
        started_on("n3", &lost, &a, None).await;
        started_on("n1", &kept, &a, None).await;
        let lost_service = cluster.service_of(&format!("{}/lost:v1", fixtures.user));
        // Both replicas serve both before any loop starts.
        for host in [&lost, &kept] {
            let (status, body) = get(host, b.addr, "/").await;
            assert_eq!(status, 200, "{body}");
        }
        LostAndKept { cluster, fixtures, a, b, lost, kept, lost_service }
    }
}

/// What a node's loss cost request loops (every 50 ms per host and address).
pub struct Loss {
    pub answers: Vec<Answer>,
    /// When the engine stopped, since the loops started, and as wall time.
    pub at: Duration,
    pub at_time: std::time::SystemTime,
}

impl Loss {
    /// Failed requests to host `host` from the loss on, and the time from the
    /// loss to its first answer after its last failure.
    pub fn of(&self, host: usize) -> (usize, Duration) {
        outage(&self.answers, host, self.at)
    }

    /// [`Loss::of`] through the address `via` only.
    pub fn of_via(&self, host: usize, via: usize) -> (usize, Duration) {
        outage_of(self.answers.iter().filter(|a| a.host == host && a.via == via), self.at)
    }
}

/// Stops `node`'s engine (as an upgrade or a crash would) while request
/// loops run to `hosts` through `via`; returns once every host answers
/// through every address again (2 minutes at most), and 3 s more.
pub async fn while_losing(node: &str, hosts: &[String], via: &[SocketAddr]) -> Loss {
    let traffic = Traffic::start(hosts.to_vec(), via.to_vec(), Duration::from_millis(50), 6000);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let at = traffic.started.elapsed();
    let at_time = std::time::SystemTime::now();
    cluster_script(&["stop-engine", node]);
    let deadline = Instant::now() + Duration::from_secs(120);
    'answering: loop {
        assert!(Instant::now() < deadline, "not every deployment answered again within 2 minutes of losing {node}");
        for host in hosts {
            for addr in via {
                if get(host, *addr, "/").await.0 != 200 {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue 'answering;
                }
            }
        }
        break;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    Loss { answers: traffic.stop().await, at, at_time }
}

/// Stops and starts node `solo`'s engine (live-restore as `live_restore`
/// says when it starts again) while 20 requests a second go to `host`
/// through `addr`; returns their answers once it answers again (a minute at
/// most) and 2 s more, and when the engine stopped (since the loop started).
pub async fn restart_under_load(host: &str, addr: SocketAddr, live_restore: bool) -> (Vec<Answer>, Duration) {
    let traffic = Traffic::start(vec![host.to_owned()], vec![addr], Duration::from_millis(50), 4000);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let at = traffic.started.elapsed();
    cluster_script(&["stop-engine", "solo"]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster_script(&["start-engine", "solo", if live_restore { "true" } else { "false" }]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while get(host, addr, "/").await.0 != 200 {
        assert!(Instant::now() < deadline, "{host} did not answer within a minute of the engine's restart");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    (traffic.stop().await, at)
}

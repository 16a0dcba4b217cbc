//! The Swarm backend on a single-node swarm (scripts/test initializes one):
//! two Pipes replicas, containers of the Pipes image on an overlay network,
//! each with an empty config dir of its own, serving the same deployments.

use crate::common;

use std::time::{Duration, Instant};

use common::{docker, docker_ok, echo, env, json, unique, websocket, Fixtures};

pub(crate) const TOKEN: &str = "swarm-test-token-0123456789";

/// Everything the test creates on the engine, removed on drop (also on failure).
#[derive(Default)]
pub(crate) struct Created {
    pub(crate) replicas: Vec<String>,
    pub(crate) instance: String,
    pub(crate) network: Option<String>,
    pub(crate) image: Option<String>,
}

impl Drop for Created {
    fn drop(&mut self) {
        for r in &self.replicas {
            if std::thread::panicking() {
                let logs = docker(&["logs", "--tail", "80", r]);
                eprintln!("--- {r} ---\n{}{}", String::from_utf8_lossy(&logs.stdout), String::from_utf8_lossy(&logs.stderr));
            }
            let _ = docker(&["rm", "-fv", r]);
        }
        let label = format!("label=pipes.instance={}", self.instance);
        remove_services_and_configs(&label);
        // Deployments' networks and volumes, once their tasks are gone.
        for _ in 0..50 {
            let networks = lines(&docker(&["network", "ls", "-q", "--filter", &label]));
            let volumes = lines(&docker(&["volume", "ls", "-q", "--filter", &label]));
            if networks.is_empty() && volumes.is_empty() {
                break;
            }
            for id in networks {
                let _ = docker(&["network", "rm", &id]);
            }
            for id in volumes {
                let _ = docker(&["volume", "rm", &id]);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        if let Some(n) = &self.network {
            // The network is in use until the services' tasks are gone.
            for _ in 0..50 {
                if docker(&["network", "rm", n]).status.success() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        if let Some(i) = &self.image {
            let _ = docker(&["rmi", "-f", i]);
        }
    }
}

/// Removes the services and configs labelled `label`, showing each
/// service's tasks and last log lines first when a test failed.
fn remove_services_and_configs(label: &str) {
    for id in lines(&docker(&["service", "ls", "-q", "--filter", label])) {
        if std::thread::panicking() {
            let ps = docker(&["service", "ps", "--no-trunc", "--format", "{{.Name}} {{.CurrentState}} {{.Error}}", &id]);
            eprintln!("--- tasks of {id} ---\n{}", String::from_utf8_lossy(&ps.stdout));
            let logs = docker(&["service", "logs", "--tail", "30", &id]);
            eprintln!("--- service {id} ---\n{}{}", String::from_utf8_lossy(&logs.stdout), String::from_utf8_lossy(&logs.stderr));
        }
        let _ = docker(&["service", "rm", &id]);
    }
    for id in lines(&docker(&["config", "ls", "-q", "--filter", label])) {
        let _ = docker(&["config", "rm", &id]);
    }
}

fn lines(out: &std::process::Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
}

/// One Pipes replica of `created.instance` on the overlay network; its
/// 127.0.0.1 port.
pub(crate) fn run_replica(created: &mut Created, image: &str, extra_env: &[&str]) -> (String, u16) {
    let e = env();
    let name = unique("pipes-replica");
    let network = created.network.clone().expect("network");
    let mut args: Vec<String> = vec![
        "run".into(),
        "-d".into(),
        "--name".into(),
        name.clone(),
        "--label".into(),
        format!("pipes.test={}", e.run),
        "--network".into(),
        network.clone(),
        "-v".into(),
        "/var/run/docker.sock:/var/run/docker.sock".into(),
        "-p".into(),
        "127.0.0.1::8080".into(),
    ];
    let shared = ["PIPES_BACKEND=swarm".to_owned(), format!("PIPES_NETWORK={network}"), "PIPES_ALLOW=*".to_owned(), format!("PIPES_API_TOKEN={TOKEN}")];
    for v in common::container_env(&created.instance).into_iter().chain(shared).chain(extra_env.iter().map(|v| v.to_string())) {
        args.push("-e".into());
        args.push(v);
    }
    args.push(image.to_owned());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    docker_ok(&refs);
    created.replicas.push(name.clone());
    let port = common::published(&name, "8080/tcp");
    (name, port)
}

/// A replica's published port on 127.0.0.1.
fn local(port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], port))
}

async fn get(host: &str, port: u16, path: &str) -> (u16, serde_json::Value) {
    json(common::client_for(host, port).get(format!("http://{host}:{port}{path}")).send().await.expect("answer")).await
}

async fn api(host: &str, port: u16, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
    let mut req = common::client_for(host, port).request(method.parse().unwrap(), format!("http://{host}:{port}{path}")).bearer_auth(TOKEN);
    if let Some(b) = body {
        req = req.header("content-type", "application/json").body(b.to_owned());
    }
    json(req.send().await.expect("answer")).await
}

/// The services of the test's instance (task containers do not carry the
/// service's labels, services are what is counted).
fn services(instance: &str) -> Vec<String> {
    lines(&docker(&["service", "ls", "-q", "--filter", &format!("label=pipes.instance={instance}")]))
}

/// The replicas service `id` asks for.
fn replicas(id: &str) -> u64 {
    docker_ok(&["service", "inspect", "-f", "{{.Spec.Mode.Replicated.Replicas}}", id]).trim().parse().expect("replicas")
}

fn service_of(instance: &str, deployment: &str) -> String {
    let found = lines(&docker(&[
        "service",
        "ls",
        "-q",
        "--filter",
        &format!("label=pipes.instance={instance}"),
        "--filter",
        &format!("label=pipes.deployment={deployment}"),
    ]));
    assert_eq!(found.len(), 1, "one service for {deployment}: {found:?}");
    found[0].clone()
}

/// Two replicas of one instance on a new overlay network, answering.
async fn cluster(extra_env: &[&str]) -> (Created, [(String, u16); 2]) {
    let mut created = Created::default();
    created.instance = unique("sw");
    let image = common::build_pipes_image();
    created.image = Some(image.clone());
    created.network = Some(common::network("pipes-test-overlay", &["-d", "overlay", "--attachable"]));
    let a = run_replica(&mut created, &image, extra_env);
    let b = run_replica(&mut created, &image, extra_env);
    common::until_answering(a.1).await;
    common::until_answering(b.1).await;
    (created, [a, b])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_share_deployments_configs_and_idleness_through_the_swarm() {
    if common::no_swarm() {
        return;
    }
    let (created, [(_, port_a), (b, port_b)]) = cluster(&["PIPES_DRAIN_TIMEOUT=2s"]).await;
    let mut f = Fixtures::new();
    f.serving("app", "v1");
    f.serving("app", "v2");

    // 40 concurrent first requests, split over both replicas: one service, 40 answers.
    let v1 = f.host("app", "v1", "example.com");
    let requests = (0..40).map(|i| {
        let (host, port) = (v1.clone(), if i % 2 == 0 { port_a } else { port_b });
        tokio::spawn(async move { get(&host, port, &format!("/first/{i}")).await })
    });
    for answer in futures_util::future::join_all(requests).await {
        let (status, body) = answer.expect("request task");
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["id"], "v1");
    }
    assert_eq!(services(&created.instance).len(), 1, "40 concurrent first requests over two replicas make one service");
    let v1_service = service_of(&created.instance, &format!("{}/app:v1", f.user));

    // Either replica lists it, whichever started it.
    for port in [port_a, port_b] {
        let (status, body) = api("example.com", port, "GET", "/__proxyapi/deployments", None).await;
        assert_eq!(status, 200, "{body}");
        let listed = body["deployments"].as_array().expect("list").iter().any(|d| d["deployment"] == format!("{}/app:v1", f.user));
        assert!(listed, "replica on port {port} lists v1: {body}");
    }

    // A scoped token, stored as docs/swarm.md says, covers only its user.
    let scoped = "swarm-scoped-token-0123456789";
    let tokens = format!(r#"{{"tokens": [{{"name": "ci", "users": ["{}"], "token": "{scoped}"}}]}}"#, f.user);
    let file = std::env::temp_dir().join(format!("{}-tokens.json", created.instance));
    std::fs::write(&file, tokens).unwrap();
    let instance_label = format!("pipes.instance={}", created.instance);
    let config_name = format!("{}-tokens-1", created.instance);
    let made = docker(&[
        "config",
        "create",
        "--label",
        "pipes.managed=true",
        "--label",
        &instance_label,
        "--label",
        "pipes.store=tokens.json",
        "--label",
        "pipes.store-version=1",
        &config_name,
        &file.display().to_string(),
    ]);
    let _ = std::fs::remove_file(&file);
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let (status, body) =
        json(common::client_for(&v1, port_b).get(format!("http://{v1}:{port_b}/__proxyapi/container")).bearer_auth(scoped).send().await.expect("answer")).await;
    assert_eq!(status, 200, "the scoped token manages its user's deployment: {body}");
    let other = format!("v1.app.{}.example.com", unique("other"));
    let resp =
        common::client_for(&other, port_b).get(format!("http://{other}:{port_b}/__proxyapi/container")).bearer_auth(scoped).send().await.expect("answer");
    assert_eq!(resp.status().as_u16(), 403, "and no other user's");

    // A config PUT through A, for a deployment never started, is served through B.
    let v2 = f.host("app", "v2", "example.com");
    let (status, body) = api(&v2, port_a, "PUT", "/__proxyapi/container/config", Some(r#"{"env":{"APP_GREETING":"from-a"},"idle_timeout":"6s"}"#)).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = api(&v2, port_b, "GET", "/__proxyapi/container/config", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["config"]["env"]["APP_GREETING"], "from-a", "{body}");
    let (status, body) = get(&v2, port_b, "/").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["env"]["APP_GREETING"], "from-a", "B runs v2 with the config A stored: {body}");
    let v2_service = service_of(&created.instance, &format!("{}/app:v2", f.user));

    // A serves it too (it follows the swarm's events), so A's idle check runs.
    common::eventually("A serves v2", Duration::from_secs(10), || {
        let v2 = v2.clone();
        async move { api(&v2, port_a, "GET", "/__proxyapi/container", None).await.1["state"] == "running" }
    })
    .await;
    // Busy through B only, for twice its idle timeout: A must not scale it to 0.
    let busy_until = Instant::now() + Duration::from_secs(14);
    while Instant::now() < busy_until {
        let (status, _) = get(&v2, port_b, "/busy").await;
        assert_eq!(status, 200);
        assert_eq!(replicas(&v2_service), 1, "scaled to 0 while B served it");
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    // Quiet on both: scaled to 0, the service kept.
    common::eventually("idle v2 scaled to 0", Duration::from_secs(40), || {
        let id = v2_service.clone();
        async move { replicas(&id) == 0 }
    })
    .await;
    // The next request, through A, scales it back to 1.
    let (status, body) = get(&v2, port_a, "/again").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["env"]["APP_GREETING"], "from-a");
    assert_eq!(replicas(&v2_service), 1);

    // A WebSocket open through B, silent for twice the idle timeout, keeps it
    // up too: what is open counts, not only requests.
    let mut ws = websocket(local(port_b), &v2, "v2").await;
    let until = Instant::now() + Duration::from_secs(13);
    while Instant::now() < until {
        assert_eq!(replicas(&v2_service), 1, "scaled to 0 under B's open WebSocket");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(echo(&mut ws, "still").await, "v2: still");
    drop(ws);

    // Access rules saved through A hold on B within its reload (10 s); a
    // share link made by A opens the deployment through B, and a revocation
    // through B closes it on A: the key and revocations live in the swarm.
    let hash = bcrypt::hash("s3cret", 4).expect("hash");
    let private = format!(r#"{{"env":{{"APP_GREETING":"from-a"}},"idle_timeout":"6s","access":{{"basic":{{"alice":"{hash}"}}}}}}"#);
    let (status, body) = api(&v2, port_a, "PUT", "/__proxyapi/container/config", Some(&private)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(replicas(&v2_service), 1, "an access change restarts nothing");
    let status_through = |port: u16, cookie: Option<String>| {
        let v2 = v2.clone();
        async move {
            let mut req = common::client_for(&v2, port).get(format!("http://{v2}:{port}/"));
            if let Some(c) = cookie {
                req = req.header("cookie", c);
            }
            req.send().await.expect("answer").status().as_u16()
        }
    };
    common::eventually("B asks for credentials", Duration::from_secs(20), || async { status_through(port_b, None).await == 401 }).await;
    let (status, shared) = api(&v2, port_a, "POST", "/__proxyapi/container/share", None).await;
    assert_eq!(status, 200, "{shared}");
    let cookie = shared["url"].as_str().and_then(|u| u.split_once('?')).map(|(_, q)| q.to_owned()).expect("a token");
    assert_eq!(status_through(port_b, Some(cookie.clone())).await, 200, "B accepts A's link");
    let (status, body) = api(&v2, port_b, "POST", "/__proxyapi/container/share/revoke", None).await;
    assert_eq!(status, 200, "{body}");
    common::eventually("A refuses the revoked link", Duration::from_secs(20), || async { status_through(port_a, Some(cookie.clone())).await == 401 }).await;

    // One replica stopped (SIGTERM): its WebSocket ends with 1001 at its
    // drain timeout, the other replica serves on.
    let mut on_b = websocket(local(port_b), &v1, "v1").await;
    let stopping = std::thread::spawn({
        let b = b.clone();
        move || docker_ok(&["stop", "-t", "20", &b])
    });
    assert_eq!(common::close_code(&mut on_b).await, Some(1001), "going away, as B stops");
    stopping.join().expect("docker stop");
    let (status, body) = get(&v1, port_a, "/after-b-left").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["id"], "v1");
    assert_eq!(replicas(&v1_service), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redeploy_through_one_replica_is_followed_by_the_other_which_drains_its_websockets() {
    if common::no_swarm() {
        return;
    }
    let (created, [(_, port_a), (_, port_b)]) = cluster(&["PIPES_DRAIN_TIMEOUT=10s", "PIPES_FAILURE_TTL=1s"]).await;
    let mut f = Fixtures::new();
    f.serving("app", "v1");
    let host = f.host("app", "v1", "example.com");
    for port in [port_a, port_b] {
        let (status, body) = get(&host, port, "/").await;
        assert_eq!((status, body["id"].as_str()), (200, Some("v1")), "{body}");
    }
    let mut on_old = websocket(local(port_b), &host, "v1").await;

    // A new image, redeployed through A: B follows to the new generation.
    f.push("app", "v1", "v1b", "");
    let (status, body) = api(&host, port_a, "POST", "/__proxyapi/container/redeploy", None).await;
    assert_eq!(status, 200, "{body}");
    common::eventually("B serves the new generation", Duration::from_secs(30), || {
        let host = host.clone();
        async move { get(&host, port_b, "/").await.1["id"] == "v1b" }
    })
    .await;
    let (_, body) = get(&host, port_a, "/").await;
    assert_eq!(body["id"], "v1b");

    // The WebSocket B relays to the old generation is not cut by A, whose own
    // drain ended at once: B drains it, and ends it with 1001 at its deadline.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(echo(&mut on_old, "still").await, "v1: still");
    let closed = common::close_code(&mut on_old).await;
    assert_eq!(closed, Some(1001), "going away, as B's drain of the old generation ends");

    // A deployment whose container exits at once: each start after the
    // failure is remembered runs a new task, and says how it ended.
    f.publish("crash", "v1", "ENV FIXTURE_MODE=crash");
    let crash = f.host("crash", "v1", "example.com");
    for port in [port_a, port_b] {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let resp = common::client_for(&crash, port).get(format!("http://{crash}:{port}/")).send().await.expect("answer");
        assert_eq!(resp.status().as_u16(), 502);
        let body = resp.text().await.unwrap();
        assert!(body.contains("container_exited") && body.contains("code 3"), "{body}");
    }
    let service = service_of(&created.instance, &format!("{}/crash:v1", f.user));
    let tasks = lines(&docker(&["service", "ps", "-q", &service]));
    assert!(tasks.len() >= 2, "a new task for the second start: {tasks:?}");
}

/// A stack deployed from `deploy/pipes-stack.yml`, removed on drop with the
/// services, configs and secrets it made.
struct Stack {
    name: String,
    instance: String,
    network: String,
    secrets: Vec<String>,
    image: String,
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let logs = docker(&["service", "logs", "--tail", "80", &format!("{}_pipes", self.name)]);
            eprintln!("--- stack {} ---\n{}{}", self.name, String::from_utf8_lossy(&logs.stdout), String::from_utf8_lossy(&logs.stderr));
        }
        let _ = docker(&["stack", "rm", &self.name]);
        let label = format!("label=pipes.instance={}", self.instance);
        remove_services_and_configs(&label);
        // Secrets and the network are in use until the stack's tasks are gone.
        for _ in 0..100 {
            let secrets_gone =
                self.secrets.iter().all(|s| docker(&["secret", "rm", s]).status.success() || !docker(&["secret", "inspect", s]).status.success());
            let network_gone = !docker(&["network", "inspect", &self.network]).status.success() || docker(&["network", "rm", &self.network]).status.success();
            if secrets_gone && network_gone {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = docker(&["rmi", "-f", &self.image]);
    }
}

/// A Docker secret holding `value`, labelled for clean-up.
fn secret(name: &str, value: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new("docker")
        .args(["secret", "create", "--label", &format!("pipes.test={}", env().run), name, "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("docker runs");
    child.stdin.take().expect("stdin").write_all(value.as_bytes()).expect("secret written");
    assert!(child.wait().expect("docker secret create").success(), "cannot create secret {name}");
}

#[tokio::test]
async fn the_stack_file_runs_pipes_as_a_swarm_service() {
    if common::no_swarm() {
        return;
    }
    let e = env();
    let stack = Stack {
        name: unique("pipesstack"),
        instance: unique("st"),
        network: unique("pipes-test-stack-net"),
        secrets: vec![unique("pipes-test-token"), unique("pipes-test-registry-password")],
        image: common::build_pipes_image(),
    };
    secret(&stack.secrets[0], TOKEN);
    secret(&stack.secrets[1], &e.password);
    let mut f = Fixtures::new();
    f.serving("app", "v1");
    let port = common::free_port();
    let root = env!("CARGO_MANIFEST_DIR");
    let out = std::process::Command::new("docker")
        .args(["stack", "deploy", "-c", &format!("{root}/deploy/pipes-stack.yml"), &stack.name])
        .envs([
            ("PIPES_IMAGE", stack.image.clone()),
            ("PIPES_NETWORK", stack.network.clone()),
            ("PIPES_INSTANCE", stack.instance.clone()),
            ("PIPES_ALLOW", "*".to_owned()),
            ("PIPES_REGISTRY", e.registry.clone()),
            ("PIPES_LABELS", format!("pipes.test={}", e.run)),
            ("DOCKER_AUTH_USERNAME", e.user.clone()),
            ("PIPES_PORT", port.to_string()),
            ("PIPES_REPLICAS", "1".to_owned()),
            ("PIPES_API_TOKEN_SECRET", stack.secrets[0].clone()),
            ("PIPES_REGISTRY_PASSWORD_SECRET", stack.secrets[1].clone()),
        ])
        .output()
        .expect("docker stack deploy runs");
    assert!(out.status.success(), "docker stack deploy: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));

    common::until_answering(port).await;
    let host = f.host("app", "v1", "example.com");
    let (status, body) = get(&host, port, "/from-the-stack").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["id"], "v1");
    // The token came from the secret, through PIPES_API_TOKEN_FILE.
    let (status, body) = api("example.com", port, "GET", "/__proxyapi/deployments", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deployments"][0]["deployment"], format!("{}/app:v1", f.user));
    assert_eq!(services(&stack.instance).len(), 1);
}

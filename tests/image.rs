//! The Pipes image, run as users run it: in a container with the engine's
//! socket mounted, reaching deployments over a network the test creates.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{docker, docker_ok, env, json, unique, Fixtures};

/// Everything the test creates on the engine, removed on drop (also on failure).
#[derive(Default)]
struct Created {
    containers: Vec<String>,
    instances: Vec<String>,
    network: Option<String>,
    image: Option<String>,
    dirs: Vec<std::path::PathBuf>,
}

impl Drop for Created {
    fn drop(&mut self) {
        for c in &self.containers {
            if std::thread::panicking() {
                let logs = docker(&["logs", c]);
                eprintln!("--- {c} ---\n{}", String::from_utf8_lossy(&logs.stderr));
            }
            let _ = docker(&["rm", "-f", c]);
        }
        for instance in &self.instances {
            let out = docker(&["ps", "-aq", "--filter", &format!("label=pipes.instance={instance}")]);
            for id in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = docker(&["rm", "-f", id]);
            }
            let _ = docker(&["network", "rm", &format!("pipes-{instance}")]);
        }
        if let Some(n) = &self.network {
            let _ = docker(&["network", "rm", n]);
        }
        if let Some(i) = &self.image {
            let _ = docker(&["rmi", "-f", i]);
        }
        for d in &self.dirs {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Builds the image from the repository's Dockerfile with the binary under test.
fn build_pipes_image(created: &mut Created) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let binary = Path::new(env!("CARGO_BIN_EXE_pipes"));
    let relative = binary.strip_prefix(root).expect("the binary is built inside the repository");
    let tag = format!("pipes-test:{}", unique("i"));
    let out = std::process::Command::new("docker")
        .args(["build", "-q", "--label", &format!("pipes.test={}", env().run), "-t", &tag])
        .arg("--build-arg")
        .arg(format!("BINARY={}", relative.display()))
        .arg(root)
        .env("DOCKER_BUILDKIT", "0")
        .output()
        .expect("docker build runs");
    assert!(out.status.success(), "building the image failed (the binary must be static: run through scripts/test): {}", String::from_utf8_lossy(&out.stderr));
    created.image = Some(tag.clone());
    tag
}

/// `docker run` arguments every Pipes container of these tests shares: its
/// instance, the test label for what it creates, the registry and credentials.
fn pipes_env(instance: &str) -> Vec<String> {
    let e = env();
    [
        format!("PIPES_INSTANCE={instance}"),
        format!("PIPES_LABELS=pipes.test={}", e.run),
        format!("PIPES_REGISTRY={}", e.registry),
        "PIPES_ALLOW=*".to_owned(),
        "DOCKER_AUTH=true".to_owned(),
        format!("DOCKER_AUTH_USERNAME={}", e.user),
        format!("DOCKER_AUTH_PASSWORD={}", e.password),
    ]
    .into_iter()
    .flat_map(|v| ["-e".to_owned(), v])
    .collect()
}

/// Runs the image on `network` and returns the 127.0.0.1 port it is published on.
fn run_pipes(created: &mut Created, image: &str, network: &str, extra_env: &[String]) -> (String, u16) {
    let e = env();
    let instance = unique("c");
    created.instances.push(instance.clone());
    let configs = std::env::temp_dir().join(format!("pipes-{instance}-configs"));
    std::fs::create_dir_all(&configs).unwrap();
    created.dirs.push(configs.clone());
    let mut args: Vec<String> = [
        "run",
        "-d",
        "--label",
        &format!("pipes.test={}", e.run),
        "--network",
        network,
        "-v",
        "/var/run/docker.sock:/var/run/docker.sock",
        "-v",
        &format!("{}:/configs", configs.display()),
        "-p",
        "127.0.0.1::8080",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(pipes_env(&instance));
    for v in extra_env {
        args.push("-e".into());
        args.push(v.clone());
    }
    args.push(image.to_owned());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let id = docker_ok(&refs);
    created.containers.push(id.clone());
    let mapping = docker_ok(&["port", &id, "8080/tcp"]);
    let port: u16 = mapping.lines().next().and_then(|l| l.rsplit(':').next()).and_then(|p| p.parse().ok()).expect("published port");
    (instance, port)
}

/// Waits until Pipes answers HTTP on `port`: the engine's port proxy accepts
/// connections before the program in the container listens.
async fn until_answering(port: u16) {
    let client = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(2)).build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.get(format!("http://127.0.0.1:{port}/")).send().await.is_err() {
        assert!(Instant::now() < deadline, "pipes in a container did not answer within 20 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_image_serves_deployments_over_a_network() {
    if common::skip() {
        return;
    }
    let mut created = Created::default();
    let image = build_pipes_image(&mut created);
    let network = unique("pipes-test-net");
    docker_ok(&["network", "create", "--label", &format!("pipes.test={}", env().run), &network]);
    created.network = Some(network.clone());
    let mut f = Fixtures::new();
    f.serving("app", "v1");
    let host = f.host("app", "v1", "example.com");

    // Named network, and found on its own: the engine runs Pipes' container.
    for extra in [vec![format!("PIPES_NETWORK={network}")], vec![]] {
        let (instance, port) = run_pipes(&mut created, &image, &network, &extra);
        until_answering(port).await;
        let client = common::client_for(&host, port);
        let resp = client.get(format!("http://{host}:{port}/in-container")).send().await.unwrap();
        let (status, body) = json(resp).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["id"], "v1");
        let deployed = docker_ok(&["ps", "-q", "--filter", &format!("label=pipes.instance={instance}")]);
        let networks = docker_ok(&["inspect", "-f", "{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}", &deployed]);
        assert_eq!(networks.trim(), network, "the deployment joined the test network only");
    }
}

/// The image's zero-downtime upgrade as the README describes it: both
/// containers on the host's network, sharing the upgrade socket's directory;
/// the new one started with `-u`, the old one sent SIGQUIT.
#[tokio::test]
async fn the_image_hands_over_to_a_new_container_without_dropping_requests() {
    if common::skip() {
        return;
    }
    let mut created = Created::default();
    let image = build_pipes_image(&mut created);
    let e = env();
    let instance = unique("c");
    created.instances.push(instance.clone());
    let dir = std::env::temp_dir().join(format!("pipes-{instance}"));
    std::fs::create_dir_all(dir.join("configs")).unwrap();
    std::fs::create_dir_all(dir.join("run")).unwrap();
    created.dirs.push(dir.clone());
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let run = |extra: &[&str]| -> String {
        let mut args: Vec<String> = [
            "run",
            "-d",
            "--label",
            &format!("pipes.test={}", e.run),
            "--network",
            "host",
            "-v",
            "/var/run/docker.sock:/var/run/docker.sock",
            "-v",
            &format!("{}:/configs", dir.join("configs").display()),
            "-v",
            &format!("{}:/tmp", dir.join("run").display()),
            "-e",
            &format!("PIPES_LISTEN=127.0.0.1:{port}"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(pipes_env(&instance));
        args.push(image.clone());
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        docker_ok(&refs)
    };
    let old = run(&[]);
    created.containers.push(old.clone());
    until_answering(port).await;
    let mut f = Fixtures::new();
    f.serving("app", "v1");
    let host = f.host("app", "v1", "example.com");
    let client = common::client_for(&host, port);
    let url = format!("http://{host}:{port}/");
    assert_eq!(client.get(&url).send().await.unwrap().status(), 200);
    let deployed = docker_ok(&["ps", "-aq", "--filter", &format!("label=pipes.instance={instance}")]);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (client, url, stop) = (client.clone(), url.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0usize, Vec::new());
                let deadline = Instant::now() + Duration::from_secs(60);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                    match client.get(&url).send().await {
                        Ok(r) if r.status() == 200 => ok += 1,
                        Ok(r) => failed.push(r.status().to_string()),
                        Err(e) => failed.push(e.to_string()),
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let sock = dir.join("run/pipes_upgrade.sock");
    let _ = std::fs::remove_file(&sock);
    let new = run(&["-u"]);
    created.containers.push(new.clone());
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "the new container did not open the upgrade socket");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    docker_ok(&["kill", "--signal", "QUIT", &old]);
    let exit = tokio::task::spawn_blocking(move || docker_ok(&["wait", &old])).await.unwrap();
    assert_eq!(exit, "0", "the old container drains and exits cleanly");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, Vec::new());
    for l in load {
        let (o, f) = l.await.unwrap();
        ok += o;
        failed.extend(f);
    }
    assert!(failed.is_empty(), "{} of {} requests failed during the hand-over: {failed:?}", failed.len(), ok + failed.len());
    eprintln!("{ok} requests during the hand-over, all 200");
    assert_eq!(client.get(&url).send().await.unwrap().status(), 200, "the new container serves");
    assert!(docker_ok(&["inspect", "-f", "{{.State.Running}}", &new]) == "true");
    let now = docker_ok(&["ps", "-aq", "--filter", &format!("label=pipes.instance={instance}")]);
    let deployments: Vec<&str> = now.lines().filter(|id| !new.starts_with(id)).collect();
    assert_eq!(deployments, deployed.lines().collect::<Vec<_>>(), "the deployment's container was adopted, not duplicated");
}

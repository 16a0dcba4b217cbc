//! The Pipes image, run as users run it: in a container with the engine's
//! socket mounted, reaching deployments over a network the test creates.

use crate::common;

use std::path::{Path, PathBuf};
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

/// Builds the Pipes image, removed with `created`.
fn build_pipes_image(created: &mut Created) -> String {
    let tag = common::build_pipes_image();
    created.image = Some(tag.clone());
    tag
}

/// `docker run` arguments every Pipes container of these tests shares.
fn pipes_env(instance: &str) -> Vec<String> {
    common::container_env(instance).into_iter().chain(["PIPES_ALLOW=*".to_owned()]).flat_map(|v| ["-e".to_owned(), v]).collect()
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
    (instance, common::published(&id, "8080/tcp"))
}

#[tokio::test]
async fn the_image_serves_deployments_over_a_network() {
    if common::skip() {
        return;
    }
    let mut created = Created::default();
    let image = build_pipes_image(&mut created);
    let network = common::network("pipes-test-net", &[]);
    created.network = Some(network.clone());
    let mut f = Fixtures::new();
    f.serving("app", "v1");
    let host = f.host("app", "v1", "example.com");

    // Named network, and found on its own: the engine runs Pipes' container.
    for extra in [vec![format!("PIPES_NETWORK={network}")], vec![]] {
        let (instance, port) = run_pipes(&mut created, &image, &network, &extra);
        common::until_answering(port).await;
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
    common::until_answering(port).await;
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

/// Runs `scripts/run` with `vars` (and nothing else of Pipes' settings).
fn scripts_run(args: &[&str], vars: &[(&str, String)]) -> std::process::Output {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cmd = std::process::Command::new(root.join("scripts/run"));
    cmd.args(args).current_dir(root);
    for (k, _) in std::env::vars() {
        if k.starts_with("PIPES_") && !k.starts_with("PIPES_TEST_") || k == "DOMAINLEVELS" {
            cmd.env_remove(k);
        }
    }
    cmd.envs(vars.iter().map(|(k, v)| (*k, v.as_str())));
    cmd.output().expect("scripts/run runs")
}

#[tokio::test]
async fn scripts_run_serves_the_demo_and_passes_every_setting_on() {
    if common::skip() {
        return;
    }
    let mut created = Created::default();
    let image = build_pipes_image(&mut created);
    let instance = unique("run");
    created.instances.push(instance.clone());
    created.containers.push(instance.clone());
    let (port, registry_port) = (common::free_port(), common::free_port());
    let state = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("target/pipes-run/registry-{registry_port}"));
    created.dirs.push(state.clone());
    let configs = std::env::temp_dir().join(format!("pipes-{instance}-configs"));
    created.dirs.push(configs.clone());
    let secret = std::env::temp_dir().join(format!("pipes-{instance}-max-paused"));
    std::fs::write(&secret, "3").unwrap();
    // A network of its own: Pipes must join it to reach the demo there.
    let network = common::network("pipes-test-run-net", &[]);
    created.network = Some(network.clone());
    let vars = vec![
        ("PIPES_NETWORK", network.clone()),
        ("PIPES_INSTANCE", instance.clone()),
        ("PIPES_PORT", port.to_string()),
        ("PIPES_IMAGE", image.clone()),
        ("PIPES_DEMO_REGISTRY_PORT", registry_port.to_string()),
        ("PIPES_LABELS", format!("pipes.test={}", env().run)),
        ("PIPES_CONFIG_DIR", configs.display().to_string()),
        ("PIPES_API_AUTH", "none".to_owned()),
        ("PIPES_MAX_CONTAINERS", "7".to_owned()),
        ("PIPES_MAX_PAUSED_FILE", secret.display().to_string()),
    ];
    let demo_image = format!("127.0.0.1:{registry_port}/demo/hello:v1");
    // Stops what scripts/run started and removes its files, also on failure.
    struct Stop<'a>(&'a [(&'a str, String)], &'a str, [PathBuf; 3]);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            let _ = scripts_run(&["stop"], self.0);
            let _ = docker(&["rmi", "-f", self.1]);
            for file in &self.2 {
                let _ = std::fs::remove_file(file);
            }
        }
    }
    let _stop = Stop(&vars, &demo_image, [secret.clone(), state.with_extension("yml"), state.with_extension("log")]);

    let out = scripts_run(&[], &vars);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "scripts/run failed:\n{stderr}");
    let curl_line = format!("curl http://v1.hello.demo.localhost:{port}/");
    assert_eq!(stdout.trim(), curl_line, "it prints the command that reaches the demo:\n{stderr}");

    // The printed command, run as printed: curl resolves *.localhost itself.
    let args: Vec<&str> = curl_line.split_whitespace().skip(1).collect();
    let answer = std::process::Command::new("curl").args(["-s", "--max-time", "60"]).args(&args).output().expect("curl runs");
    let body: serde_json::Value = serde_json::from_slice(&answer.stdout).unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&answer.stdout)));
    assert_eq!(body["id"], "demo/hello:v1", "{body}");

    // Every setting set reached the container: the API is open as asked, limits and files arrived.
    let api = std::process::Command::new("curl")
        .args(["-s", "--max-time", "10", &format!("http://v1.hello.demo.localhost:{port}/__proxyapi/container")])
        .output()
        .expect("curl runs");
    let state_json: serde_json::Value = serde_json::from_slice(&api.stdout).expect("JSON");
    assert_eq!(state_json["state"], "running", "{state_json}");
    let container_env = docker_ok(&["inspect", "-f", "{{join .Config.Env \"\\n\"}}", &instance]);
    for expected in ["PIPES_API_AUTH=none", "PIPES_MAX_CONTAINERS=7", "PIPES_MAX_PAUSED_FILE=/run/pipes/PIPES_MAX_PAUSED_FILE", "DOMAINLEVELS=1"] {
        assert!(container_env.lines().any(|l| l == expected), "{expected} not passed on:\n{container_env}");
    }
    assert!(configs.is_dir(), "PIPES_CONFIG_DIR is the mounted config dir");
    let networks = docker_ok(&["inspect", "-f", "{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}", &instance]);
    assert_eq!(networks.trim(), network, "Pipes joined PIPES_NETWORK");

    // A re-run with a bad setting leaves the running Pipes alone.
    let running = docker_ok(&["inspect", "-f", "{{.Id}}", &instance]);
    let mut bad = vars.clone();
    bad.push(("PIPES_MAX_CONTAINERS", "many".to_owned()));
    bad.retain(|(k, v)| *k != "PIPES_MAX_CONTAINERS" || v == "many");
    let out = scripts_run(&[], &bad);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("PIPES_MAX_CONTAINERS"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(docker_ok(&["inspect", "-f", "{{.Id}} {{.State.Running}}", &instance]), format!("{running} true"));

    let out = scripts_run(&["stop"], &vars);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!docker(&["container", "inspect", &instance]).status.success(), "the container is gone");
    assert_ne!(
        std::process::Command::new("curl")
            .args(["-s", "-o", "/dev/null", "--max-time", "2", &format!("http://127.0.0.1:{registry_port}/v2/")])
            .status()
            .map(|s| s.success())
            .ok(),
        Some(true),
        "the demo registry stopped"
    );
}

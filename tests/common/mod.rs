//! Test harness: a real Pipes process, fixture images in the local registry,
//! and clean-up of everything a test creates, also when it fails.
//!
//! `scripts/test` sets up the engine, registry and base fixture image, and
//! passes them in `PIPES_TEST_*` variables.

#![allow(dead_code)]

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// What `scripts/test` prepared.
pub struct TestEnv {
    pub run: String,
    pub registry: String,
    pub user: String,
    pub password: String,
    pub fixture: String,
}

/// The prepared environment, if `scripts/test` prepared one.
pub fn prepared() -> Option<&'static TestEnv> {
    static ENV: OnceLock<Option<TestEnv>> = OnceLock::new();
    ENV.get_or_init(|| {
        let var = |name: &str| std::env::var(name).ok();
        Some(TestEnv {
            run: var("PIPES_TEST_RUN")?,
            registry: var("PIPES_TEST_REGISTRY")?,
            user: var("PIPES_TEST_REGISTRY_USER")?,
            password: var("PIPES_TEST_REGISTRY_PASSWORD")?,
            fixture: var("PIPES_TEST_FIXTURE_IMAGE")?,
        })
    })
    .as_ref()
}

/// Whether an engine test must be skipped: true, with one line saying how to
/// run it, when the environment `scripts/test` prepares is missing.
pub fn skip() -> bool {
    let missing = prepared().is_none();
    if missing {
        eprintln!("skipped: this test needs the engine, registry and fixture images that scripts/test prepares; run scripts/test");
    }
    missing
}

/// The prepared environment; tests call [`skip`] first.
pub fn env() -> &'static TestEnv {
    prepared().expect("this needs the engine, registry and fixtures that scripts/test (or scripts/bench) prepares")
}

/// A name unique to this test process, usable as a Docker user or repository.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!("{prefix}{}x{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Runs the docker CLI.
pub fn docker(args: &[&str]) -> Output {
    Command::new("docker").args(args).output().expect("docker CLI runs")
}

/// Runs the docker CLI and returns its trimmed stdout; panics with stderr on failure.
pub fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(out.status.success(), "docker {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Builds an image from a Dockerfile given as text (no context), labelled for clean-up.
pub fn build_image(tag: &str, dockerfile: &str) {
    let mut child = Command::new("docker")
        .args(["build", "-q", "--label", &format!("pipes.test={}", env().run), "-t", tag, "-"])
        .env("DOCKER_BUILDKIT", "0")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("docker build runs");
    use std::io::Write;
    child.stdin.take().expect("stdin").write_all(dockerfile.as_bytes()).expect("dockerfile sent");
    let out = child.wait_with_output().expect("docker build finishes");
    assert!(out.status.success(), "docker build {tag}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Fixture images pushed to the registry under one test user; the local copies
/// (pushed or pulled by Pipes) are removed when this is dropped.
pub struct Fixtures {
    pub user: String,
    refs: Vec<String>,
}

impl Fixtures {
    /// A fresh registry user name for one test.
    pub fn new() -> Self {
        Fixtures { user: unique("u"), refs: Vec::new() }
    }

    /// The full reference of `repo:tag` of this user.
    pub fn reference(&self, repo: &str, tag: &str) -> String {
        format!("{}/{}/{repo}:{tag}", env().registry, self.user)
    }

    /// Pushes `repo:tag` built from the fixture with extra Dockerfile lines,
    /// then removes the local copy so that Pipes has to pull it.
    pub fn publish(&mut self, repo: &str, tag: &str, extra: &str) -> String {
        let reference = self.reference(repo, tag);
        // The reference label comes first: it makes every image, and every
        // intermediate layer the classic builder caches, unique to this test.
        // Shared ones would be pruned from under one test by another's clean-up.
        build_image(
            &reference,
            &format!("FROM {}\nLABEL pipes.fixture={reference}\nENV FIXTURE_ID={tag}\n{extra}\n", env().fixture),
        );
        docker_ok(&["push", "-q", &reference]);
        docker_ok(&["rmi", &reference]);
        self.refs.push(reference.clone());
        reference
    }

    /// Publishes a fixture that answers with its tag as identity.
    pub fn serving(&mut self, repo: &str, tag: &str) -> String {
        self.publish(repo, tag, "")
    }

    /// The host name of `repo:tag` of this user under `domain`.
    pub fn host(&self, repo: &str, tag: &str, domain: &str) -> String {
        format!("{tag}.{repo}.{}.{domain}", self.user)
    }
}

impl Drop for Fixtures {
    fn drop(&mut self) {
        for r in &self.refs {
            let _ = docker(&["rmi", "-f", r]);
        }
    }
}

/// A Pipes process listening on 127.0.0.1, owning the containers of its instance.
pub struct Pipes {
    child: Option<Child>,
    pub port: u16,
    pub instance: String,
    pub dir: PathBuf,
    env: Vec<(String, String)>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

impl Pipes {
    /// The environment every test Pipes gets: local registry with credentials,
    /// everything allowed, containers labelled for clean-up.
    pub fn base_env(instance: &str, port: u16, dir: &std::path::Path) -> Vec<(String, String)> {
        let e = env();
        [
            ("PIPES_LISTEN", format!("127.0.0.1:{port}")),
            ("PIPES_INSTANCE", instance.to_owned()),
            ("PIPES_LABELS", format!("pipes.test={}", e.run)),
            ("PIPES_REGISTRY", e.registry.clone()),
            ("PIPES_ALLOW", "*".to_owned()),
            ("PIPES_CONFIG_DIR", dir.join("configs").display().to_string()),
            ("PIPES_START_TIMEOUT", "30s".to_owned()),
            ("DOCKER_AUTH", "true".to_owned()),
            ("DOCKER_AUTH_USERNAME", e.user.clone()),
            ("DOCKER_AUTH_PASSWORD", e.password.clone()),
            ("RUST_LOG", "info".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// Starts Pipes with the base environment changed by `changes`
    /// (`(name, Some(value))` sets, `(name, None)` removes).
    pub fn start(changes: &[(&str, Option<&str>)]) -> Pipes {
        let port = free_port();
        let instance = unique("t");
        let dir = std::env::temp_dir().join(format!("pipes-{instance}"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut env = Self::base_env(&instance, port, &dir);
        for (name, value) in changes {
            env.retain(|(k, _)| k != name);
            if let Some(v) = value {
                env.push((name.to_string(), v.to_string()));
            }
        }
        let mut pipes = Pipes { child: None, port, instance, dir, env };
        pipes.spawn();
        pipes
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("pipes.log"))
            .expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pipes"));
        cmd.env_clear().envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Ok(path) = std::env::var("PATH") {
            cmd.env("PATH", path);
        }
        let child = cmd
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("pipes starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("pipes exited at start with {status}:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "pipes did not listen within 20 s:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id, while Pipes runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything Pipes logged so far.
    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(self.dir.join("pipes.log")) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    /// Sends SIGTERM and waits (at most 20 s) for the process to exit.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills Pipes with SIGKILL, as a crash or `kill -9` would.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops Pipes and starts it again with the same instance and settings.
    pub fn restart(&mut self) {
        self.terminate();
        self.spawn();
    }

    /// A client that sends requests for `host` to this Pipes.
    pub fn client(&self, host: &str) -> reqwest::Client {
        client_for(host, self.port)
    }

    /// The URL of `path` on `host`, for a client from [`Pipes::client`].
    pub fn url(&self, host: &str, path: &str) -> String {
        format!("http://{host}:{}{path}", self.port)
    }

    /// `GET path` on `host`.
    pub async fn get(&self, host: &str, path: &str) -> reqwest::Response {
        self.client(host).get(self.url(host, path)).send().await.expect("request answered")
    }

    /// Ids of the containers of this instance.
    pub fn containers(&self) -> Vec<String> {
        let filter = format!("label=pipes.instance={}", self.instance);
        let out = docker_ok(&["ps", "-aq", "--no-trunc", "--filter", &filter]);
        out.lines().map(str::to_owned).collect()
    }
}

impl Drop for Pipes {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- pipes log ({}) ---\n{}", self.instance, self.log());
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for id in self.containers() {
            let _ = docker(&["rm", "-f", &id]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A client that resolves `host` to 127.0.0.1, so the URL carries the real host name.
pub fn client_for(host: &str, _port: u16) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .resolve(host, SocketAddr::from(([127, 0, 0, 1], 0)))
        .timeout(Duration::from_secs(90))
        .build()
        .expect("client")
}

/// The JSON body of a response, with its status.
pub async fn json(resp: reqwest::Response) -> (u16, serde_json::Value) {
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    let value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"));
    (status, value)
}

/// An API call: method, path (with query) on `host`, optional JSON body and token.
pub async fn api(
    pipes: &Pipes,
    host: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> (u16, serde_json::Value) {
    let mut req = pipes.client(host).request(method.parse().expect("method"), pipes.url(host, path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.header("content-type", "application/json").body(b.to_owned());
    }
    json(req.send().await.expect("answer")).await
}

/// Every file below `dir` with its content, to show that nothing changed.
pub fn snapshot(dir: &std::path::Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut files = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                files.insert(p, bytes);
            }
        }
    }
    files
}

/// The state and id of each container of `pipes`, to show the engine did not change.
pub fn engine_state(pipes: &Pipes) -> Vec<String> {
    pipes
        .containers()
        .iter()
        .map(|id| docker_ok(&["inspect", "-f", "{{.Id}} {{.State.Status}} {{.State.StartedAt}}", id]))
        .collect()
}

//! Test harness: a real Pipes process, fixture images in the local registry,
//! and clean-up of everything a test creates, also when it fails.
//!
//! `scripts/test` sets up the engine, registry and base fixture image, and
//! passes them in `PIPES_TEST_*` variables.

#![allow(dead_code)]

pub mod browser;
pub mod cluster;
pub mod pki;

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
    /// Real services on Debian: Postgres, Redis, and an app using both.
    pub postgres: String,
    pub redis: String,
    pub app: String,
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
            postgres: var("PIPES_TEST_POSTGRES_IMAGE")?,
            redis: var("PIPES_TEST_REDIS_IMAGE")?,
            app: var("PIPES_TEST_APP_IMAGE")?,
        })
    })
    .as_ref()
}

/// Whether an engine test must be skipped: true, with one line saying how to
/// run it, when the environment `scripts/test` prepares is missing.
pub fn skip() -> bool {
    let missing = prepared().is_none();
    if missing {
        skipped("this test needs the engine, registry and fixture images that scripts/test prepares; run scripts/test");
    }
    missing
}

/// Says loudly that the running test is skipped, and why: on stderr, and as a
/// line in the file `PIPES_TEST_SKIPS` names, which `scripts/test` counts and
/// shows (and fails on in CI, where nothing may be skipped).
pub fn skipped(why: &str) {
    let test = std::thread::current().name().unwrap_or("a test").to_owned();
    eprintln!("skipped: {test}: {why}");
    if let Some(path) = std::env::var_os("PIPES_TEST_SKIPS") {
        use std::io::Write;
        let line = format!("{test}: {why}\n");
        let written = std::fs::OpenOptions::new().create(true).append(true).open(&path).and_then(|mut f| f.write_all(line.as_bytes()));
        written.expect("the skip record PIPES_TEST_SKIPS names is writable");
    }
}

/// Whether a Swarm test must be skipped: the environment is missing, or
/// the engine is no swarm manager (where scripts/test could not make it one).
pub fn no_swarm() -> bool {
    if skip() {
        return true;
    }
    if std::env::var_os("PIPES_TEST_SWARM").is_none() {
        skipped("the engine is not a swarm manager (scripts/test says why)");
        return true;
    }
    false
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

/// Runs `cmd` until it exits (killed after `timeout`: a process that should
/// have ended fails the test instead of hanging it); its exit code, if it
/// exited, and what it wrote to stderr.
pub fn exit_of(mut cmd: Command, timeout: Duration) -> (Option<i32>, String) {
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("the command runs");
    let deadline = Instant::now() + timeout;
    let code = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    child.stderr.take().expect("stderr").read_to_string(&mut err).expect("stderr");
    (code, err)
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

/// Builds the Pipes image from the repository's Dockerfile with the binary
/// under test, labelled for clean-up; its tag (the caller removes it).
pub fn build_pipes_image() -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_pipes"));
    let relative = binary.strip_prefix(root).expect("the binary is built inside the repository");
    let tag = format!("pipes-test:{}", unique("i"));
    let out = Command::new("docker")
        .args(["build", "-q", "--label", &format!("pipes.test={}", env().run), "-t", &tag])
        .arg("--build-arg")
        .arg(format!("BINARY={}", relative.display()))
        .arg(root)
        .env("DOCKER_BUILDKIT", "0")
        .output()
        .expect("docker build runs");
    assert!(out.status.success(), "building the image failed (the binary must be static: run through scripts/test): {}", String::from_utf8_lossy(&out.stderr));
    tag
}

/// The environment every Pipes container of the tests shares, as `NAME=value`:
/// its instance, the test label for what it creates, the registry and its
/// credentials.
pub fn container_env(instance: &str) -> Vec<String> {
    let e = env();
    vec![
        format!("PIPES_INSTANCE={instance}"),
        format!("PIPES_LABELS=pipes.test={}", e.run),
        format!("PIPES_REGISTRY={}", e.registry),
        "DOCKER_AUTH=true".to_owned(),
        format!("DOCKER_AUTH_USERNAME={}", e.user),
        format!("DOCKER_AUTH_PASSWORD={}", e.password),
    ]
}

/// A new network named `prefix` and a unique suffix, labelled for clean-up
/// (the caller removes it); `driver` is e.g. `["-d", "overlay", "--attachable"]`.
pub fn network(prefix: &str, driver: &[&str]) -> String {
    let name = unique(prefix);
    let label = format!("pipes.test={}", env().run);
    docker_ok(&[&["network", "create"], driver, &["--label", &label, &name]].concat());
    name
}

/// The 127.0.0.1 port a container's `port` (e.g. `8080/tcp`) is published on.
pub fn published(container: &str, port: &str) -> u16 {
    let mapping = docker_ok(&["port", container, port]);
    mapping.lines().next().and_then(|l| l.rsplit(':').next()).and_then(|p| p.parse().ok()).expect("published port")
}

/// Waits until Pipes in a container answers HTTP on `port`: the engine's
/// port proxy accepts connections before the program in the container listens.
pub async fn until_answering(port: u16) {
    until_answering_at(SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_secs(30)).await;
}

/// Waits (at most `within`) until Pipes answers HTTP at `addr`, whatever the answer.
pub async fn until_answering_at(addr: SocketAddr, within: Duration) {
    let client = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(2)).build().expect("client");
    let deadline = Instant::now() + within;
    while client.get(format!("http://{addr}/")).send().await.is_err() {
        assert!(Instant::now() < deadline, "Pipes at {addr} did not answer within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A WebSocket to the fixture's `/ws` on `host` through `addr`, after one
/// echo from the fixture `id`.
pub async fn websocket(addr: SocketAddr, host: &str, id: &str) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{host}:{}/ws", addr.port()), stream).await.expect("handshake");
    assert_eq!(echo(&mut ws, "hello").await, format!("{id}: hello"));
    ws
}

/// Sends `text` and returns the fixture's echo (`{id}: {text}`), within 10 s.
pub async fn echo(ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>, text: &str) -> String {
    use futures_util::{SinkExt, StreamExt};
    ws.send(tokio_tungstenite::tungstenite::Message::text(text)).await.expect("sent");
    match tokio::time::timeout(Duration::from_secs(10), ws.next()).await.expect("an echo within 10 s") {
        Some(Ok(tokio_tungstenite::tungstenite::Message::Text(echo))) => echo.to_string(),
        other => panic!("no echo: {other:?}"),
    }
}
/// Waits (30 s at most) for the server's close frame on a WebSocket; its status code.
pub async fn close_code(ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>) -> Option<u16> {
    use futures_util::StreamExt;
    let frame = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(message) = ws.next().await {
            if let Ok(tokio_tungstenite::tungstenite::Message::Close(frame)) = message {
                return frame;
            }
        }
        None
    })
    .await
    .expect("closed within 30 s");
    frame.map(|f| u16::from(f.code))
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
        self.publish_from(&env().fixture, repo, tag, extra)
    }

    /// Pushes `repo:tag` built from image `base` with extra Dockerfile
    /// lines, then removes the local copy so that Pipes has to pull it.
    pub fn publish_from(&mut self, base: &str, repo: &str, tag: &str, extra: &str) -> String {
        let reference = self.reference(repo, tag);
        // The reference label comes first: it makes every image, and every
        // intermediate layer the classic builder caches, unique to this test.
        // Shared ones would be pruned from under one test by another's clean-up.
        build_image(&reference, &format!("FROM {base}\nLABEL pipes.fixture={reference}\nENV FIXTURE_ID={tag}\n{extra}\n"));
        docker_ok(&["push", "-q", &reference]);
        docker_ok(&["rmi", &reference]);
        self.refs.push(reference.clone());
        reference
    }

    /// Publishes a fixture that answers with its tag as identity.
    pub fn serving(&mut self, repo: &str, tag: &str) -> String {
        self.publish(repo, tag, "")
    }

    /// Pushes a new image under `repo:tag` (a new digest) answering with
    /// `id` as identity, with extra Dockerfile lines.
    pub fn push(&mut self, repo: &str, tag: &str, id: &str, extra: &str) -> String {
        self.push_from(&env().fixture, repo, tag, id, extra)
    }

    /// Pushes a new image under `repo:tag` built from image `base`, as
    /// [`Fixtures::push`] does.
    pub fn push_from(&mut self, base: &str, repo: &str, tag: &str, id: &str, extra: &str) -> String {
        let reference = self.reference(repo, tag);
        build_image(&reference, &format!("FROM {base}\nLABEL pipes.fixture={reference}#{id}\nENV FIXTURE_ID={id}\n{extra}\n"));
        docker_ok(&["push", "-q", &reference]);
        docker_ok(&["rmi", &reference]);
        if !self.refs.contains(&reference) {
            self.refs.push(reference.clone());
        }
        reference
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
    /// A command Pipes is run under (e.g. `prlimit --nofile=256`), if any.
    wrapper: Vec<String>,
}

/// A port on 127.0.0.1 nothing listens on now.
/// A command running `program`, run by `wrapper` (a command that runs the
/// one after it, such as `prlimit --nofile=256:256` or valgrind) if given.
pub fn wrapped(wrapper: &[&str], program: impl AsRef<std::ffi::OsStr>) -> Command {
    match wrapper.split_first() {
        Some((first, rest)) => {
            let mut command = Command::new(first);
            command.args(rest).arg(program);
            command
        }
        None => Command::new(program),
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// The IPv4 sockets of this network namespace, from `/proc/net/tcp`: local
/// address, remote address, state and inode of each.
fn tcp_sockets() -> Vec<[String; 4]> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            Some([fields.get(1)?, fields.get(2)?, fields.get(3)?, fields.get(9)?].map(|f| f.to_string()))
        })
        .collect()
}

/// `ip:port` as `/proc/net/tcp` writes it (the address in little-endian hex).
fn proc_address(ip: std::net::Ipv4Addr, port: u16) -> String {
    let [a, b, c, d] = ip.octets();
    format!("{d:02X}{c:02X}{b:02X}{a:02X}:{port:04X}")
}

/// Whether a TCP connection to `ip:port` is established from this host's
/// network namespace.
pub fn established_to(ip: std::net::Ipv4Addr, port: u16) -> bool {
    let remote = proc_address(ip, port);
    // State 01 is ESTABLISHED.
    tcp_sockets().iter().any(|[_, r, state, _]| *r == remote && state == "01")
}

/// Whether process `pid` holds the socket listening on 127.0.0.1:`port`
/// (from `/proc`: the listening socket's inode among the process's files).
fn listens(pid: u32, port: u16) -> bool {
    let local = proc_address(std::net::Ipv4Addr::LOCALHOST, port);
    // State 0A is LISTEN.
    let inodes: Vec<String> = tcp_sockets().into_iter().filter(|[l, _, state, _]| *l == local && state == "0A").map(|[_, _, _, inode]| inode).collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).map(|target| inodes.iter().any(|inode| target.to_string_lossy() == format!("socket:[{inode}]"))).unwrap_or(false)
    })
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
            // How full this machine's disk is must not decide unrelated tests.
            ("PIPES_DISK_MIN_FREE", "0%".to_owned()),
            ("PIPES_DISK_HIGH", "100%".to_owned()),
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
        Self::start_under(&[], changes)
    }

    /// Starts Pipes as [`Pipes::start`] does, run by `wrapper` (a command
    /// that runs the one after it, such as `prlimit --nofile=256:256`).
    pub fn start_under(wrapper: &[&str], changes: &[(&str, Option<&str>)]) -> Pipes {
        Self::start_instance(&unique("t"), wrapper, changes)
    }

    /// Starts Pipes as [`Pipes::start_under`] does, with instance name `instance`.
    pub fn start_instance(instance: &str, wrapper: &[&str], changes: &[(&str, Option<&str>)]) -> Pipes {
        let instance = instance.to_owned();
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("pipes-{instance}"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        // Its own pid file and upgrade socket, so tests can upgrade in parallel.
        let conf = dir.join("pipes.yaml");
        let yaml = format!(
            "---\nversion: 1\nthreads: 2\ngraceful_shutdown_timeout_seconds: 1\npid_file: {}\nupgrade_sock: {}\n",
            dir.join("pipes.pid").display(),
            dir.join("upgrade.sock").display()
        );
        std::fs::write(&conf, yaml).expect("server configuration");
        let mut env = Self::base_env(&instance, port, &dir);
        env.push(("PIPES_SERVER_CONF".into(), conf.display().to_string()));
        for (name, value) in changes {
            env.retain(|(k, _)| k != name);
            if let Some(v) = value {
                env.push((name.to_string(), v.to_string()));
            }
        }
        let wrapper = wrapper.iter().map(|w| w.to_string()).collect();
        let mut pipes = Pipes { child: None, port, instance, dir, env, wrapper };
        pipes.spawn();
        pipes
    }

    fn command(&self, args: &[&str]) -> Child {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("pipes.log")).expect("log file");
        let wrapper: Vec<&str> = self.wrapper.iter().map(String::as_str).collect();
        let mut cmd = wrapped(&wrapper, env!("CARGO_BIN_EXE_pipes"));
        cmd.args(args).env_clear().envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Ok(path) = std::env::var("PATH") {
            cmd.env("PATH", path);
        }
        cmd.stdout(log.try_clone().expect("log")).stderr(log).spawn().expect("pipes starts")
    }

    /// Starts the process and waits until it listens. Ports come from
    /// `free_port`, which another test process may be handed too: a port
    /// someone else took is noticed (the listener is not our child's) and a
    /// new one is tried.
    fn spawn(&mut self) {
        for _ in 0..3 {
            self.child = Some(self.command(&[]));
            match self.until_listening(Duration::from_secs(20)) {
                Ok(()) => return,
                Err(why) if why.contains("another process") => {
                    eprintln!("port {} {why}; trying another", self.port);
                    self.kill9();
                    self.port = free_port();
                    let listen = format!("127.0.0.1:{}", self.port);
                    self.env.retain(|(k, _)| k != "PIPES_LISTEN");
                    self.env.push(("PIPES_LISTEN".into(), listen));
                }
                Err(why) => panic!("{why}:\n{}", self.log()),
            }
        }
        panic!("no free port after three tries:\n{}", self.log());
    }

    fn until_listening(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut taken_since = None;
        loop {
            let child = self.child.as_mut().expect("spawned");
            if let Ok(Some(status)) = child.try_wait() {
                if self.log().contains("(PIPES_LISTEN)") {
                    return Err("is held by another process".into());
                }
                return Err(format!("pipes exited at start with {status}"));
            }
            if listens(child.id(), self.port) {
                return Ok(());
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                let since = *taken_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_secs(1) {
                    return Err("is held by another process".into());
                }
            }
            if Instant::now() > deadline {
                return Err(format!("pipes did not listen within {timeout:?}"));
            }
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

    /// Sends `signal` (e.g. `TERM`, `QUIT`) to the running Pipes.
    pub fn signal(&self, signal: &str) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]).status();
        }
    }

    /// Waits at most `timeout` for the running Pipes to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The zero-downtime upgrade as an operator does it: a new process with
    /// `-u`, then SIGQUIT to the old one, which hands over its listening
    /// sockets and drains. Returns the old process, still draining.
    pub fn upgrade(&mut self) -> Child {
        let sock = self.dir.join("upgrade.sock");
        let _ = std::fs::remove_file(&sock);
        let new = self.command(&["-u"]);
        // The new process waits for the sockets on its upgrade socket.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sock.exists() {
            assert!(Instant::now() < deadline, "the new process did not open its upgrade socket:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(10));
        }
        let old = self.child.replace(new).expect("a running Pipes");
        let _ = Command::new("kill").args(["-QUIT", &old.id().to_string()]).status();
        old
    }

    /// Resident and peak resident memory of the running Pipes, in KiB.
    pub fn memory_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid().expect("running"))).expect("status");
        let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)?.split_whitespace().next()?.parse().ok()).unwrap_or(0);
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// Kills Pipes with SIGKILL, as a crash or `kill -9` would.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Changes setting `name` for the next start.
    pub fn set_env(&mut self, name: &str, value: &str) {
        self.env.retain(|(k, _)| k != name);
        self.env.push((name.to_owned(), value.to_owned()));
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

    /// The IP of `container` on this instance's own network, where Pipes
    /// beside the engine reaches it.
    pub fn container_ip(&self, container: &str) -> std::net::Ipv4Addr {
        let network = format!("pipes-{}", self.instance);
        let ip = docker_ok(&["inspect", "-f", &format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}"), container]);
        ip.parse().unwrap_or_else(|_| panic!("{container} is not on {network}: '{ip}'"))
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
        // Its containers' own network (published mode), its deployments'
        // networks and volumes.
        let _ = docker(&["network", "rm", &format!("pipes-{}", self.instance)]);
        let label = format!("label=pipes.instance={}", self.instance);
        for network in docker_ok(&["network", "ls", "-q", "--filter", &label]).lines() {
            let _ = docker(&["network", "rm", network]);
        }
        for volume in docker_ok(&["volume", "ls", "-q", "--filter", &label]).lines() {
            let _ = docker(&["volume", "rm", volume]);
        }
        // Its claim on the instance name, left behind by a kill.
        let claims = docker_ok(&["volume", "ls", "-q", "--filter", &format!("label=pipes.claim={}", self.instance)]);
        for volume in claims.lines() {
            let _ = docker(&["volume", "rm", volume]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A client that resolves `host` to 127.0.0.1, so the URL carries the real host name.
pub fn client_for(host: &str, _port: u16) -> reqwest::Client {
    reqwest::Client::builder().no_proxy().resolve(host, SocketAddr::from(([127, 0, 0, 1], 0))).timeout(Duration::from_secs(90)).build().expect("client")
}

/// Waits (at most `timeout`) until `check` holds, polling; panics naming `what`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "not within {timeout:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends `request` (raw bytes) on a new connection to 127.0.0.1:`port` and
/// reads until the server closes or `wait` passes; what came back, and
/// whether the server closed.
pub fn raw_exchange(port: u16, request: &[u8], wait: Duration) -> (Vec<u8>, bool) {
    use std::io::Write;
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
    let _ = stream.write_all(request);
    let (mut answer, deadline) = (Vec::new(), Instant::now() + wait);
    let mut buf = [0u8; 8192];
    while Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) => return (answer, true),
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return (answer, true),
        }
    }
    (answer, false)
}

/// The status code of a raw HTTP/1 answer, if it has one.
pub fn status_of(answer: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(answer.get(..12)?).ok()?;
    text.strip_prefix("HTTP/1.1 ").or(text.strip_prefix("HTTP/1.0 "))?.get(..3)?.parse().ok()
}

/// Whether container `id` runs.
pub fn running(id: &str) -> bool {
    docker(&["inspect", "-f", "{{.State.Running}}", id]).stdout.starts_with(b"true")
}

/// The JSON body of a response, with its status.
pub async fn json(resp: reqwest::Response) -> (u16, serde_json::Value) {
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    let value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"));
    (status, value)
}

/// An API call: method, path (with query) on `host`, optional JSON body and token.
pub async fn api(pipes: &Pipes, host: &str, method: &str, path: &str, body: Option<&str>, token: Option<&str>) -> (u16, serde_json::Value) {
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
    pipes.containers().iter().map(|id| docker_ok(&["inspect", "-f", "{{.Id}} {{.State.Status}} {{.State.StartedAt}}", id])).collect()
}

/// A registry of a test's own (Debian's `docker-registry`, no auth) on
/// 127.0.0.1, sending its push notifications to `notify` with a bearer
/// token, as its `notifications.endpoints` config does. Stopped on drop.
pub struct Registry {
    child: Child,
    dir: PathBuf,
}

impl Registry {
    /// Starts it on `port` and waits until it answers.
    pub fn start(port: u16, notify: &str, token: &str) -> Registry {
        let dir = std::env::temp_dir().join(unique("registry"));
        std::fs::create_dir_all(dir.join("data")).expect("registry dir");
        let config = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {data}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{port}\nnotifications:\n  endpoints:\n    - name: pipes\n      url: {notify}\n\
             \x20     headers:\n        Authorization: [\"Bearer {token}\"]\n      timeout: 2s\n      threshold: 3\n      backoff: 1s\n",
            data = dir.join("data").display()
        );
        std::fs::write(dir.join("config.yml"), config).expect("registry config");
        let log = std::fs::File::create(dir.join("registry.log")).expect("registry log");
        let child = Command::new("docker-registry")
            .args(["serve", &dir.join("config.yml").display().to_string()])
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("docker-registry runs (scripts/test installs it)");
        let registry = Registry { child, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the registry did not listen:\n{}", registry.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        registry
    }

    /// What the registry logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- registry log ---\n{}", self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The most common setup: `app:v1` of a fresh fixture user pushed and Pipes
/// started with `changes`; returns the fixtures (keep them alive: dropping
/// removes what they made), Pipes, and the deployment's host on example.com.
pub fn serving_app(changes: &[(&str, Option<&str>)]) -> (Fixtures, Pipes, String) {
    let mut f = Fixtures::new();
    f.serving("app", "v1");
    let pipes = Pipes::start(changes);
    let host = f.host("app", "v1", "example.com");
    (f, pipes, host)
}

/// The value of the sample `series` (name and labels, exactly as written)
/// in a Prometheus exposition.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Whether the engine has the image `reference`.
pub fn image_present(reference: &str) -> bool {
    docker(&["image", "inspect", reference]).status.success()
}

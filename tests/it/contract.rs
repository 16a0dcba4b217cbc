//! The backend contract: every backend answers the fleet's calls the same
//! way — the in-memory fake of the fleet's unit tests, Docker's engine, and
//! a Swarm. A new backend is done when it passes these checks too.
//!
//! The fake runs in plain `cargo test`; Docker and Swarm need what
//! `scripts/test` prepares (engine, registry, fixture image, a swarm) and say
//! so loudly when it is missing.

use crate::common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use pipes::config::Restart;
use pipes::engine::docker::{Docker, DockerOptions};
use pipes::engine::fake::{Behaviour, Fake};
use pipes::engine::swarm::Swarm;
use pipes::engine::{Backend, EventKind, Image, Instance, RegistryAuth, Spec};
use pipes::route::Deployment;
use pipes::secret::Secret;

/// The port the serving images listen on, and every spec names.
const PORT: u16 = 8080;
/// Longest wait for something the engine does in the background.
const WAIT: Duration = Duration::from_secs(60);
const GRACE: Duration = Duration::from_secs(1);

/// A backend under test, and what it runs.
struct Subject {
    backend: Arc<dyn Backend>,
    /// The same kind of backend with its engine out of reach.
    down: Arc<dyn Backend>,
    /// The user whose deployments the checks make.
    user: String,
    /// Serves HTTP on [`PORT`].
    serving: String,
    /// Serves on another port than [`PORT`].
    elsewhere: String,
    /// Exits at once with code 3, printing a line first.
    crashing: String,
    /// Not in the registry.
    missing: String,
    /// Whether this process can connect to instances at their addresses
    /// (not to a Swarm's overlay network from the host).
    reachable: bool,
}

impl Subject {
    fn deployment(&self, repo: &str) -> Deployment {
        Deployment::parse(&format!("{}/{repo}:v1", self.user)).expect("a deployment key")
    }
}

fn spec(d: &Deployment, reference: &str, image: &Image, hash: &str) -> Spec {
    Spec {
        deployment: d.clone(),
        service: None,
        image: reference.to_owned(),
        port: PORT,
        hash: hash.to_owned(),
        identity: format!("{hash}-identity"),
        env: BTreeMap::new(),
        cmd: None,
        memory_bytes: 64 << 20,
        cpus: 0.5,
        restart: Restart::No,
        digest: image.digest.clone(),
        image_id: image.id.clone(),
        pids: 64,
        capabilities: Vec::new(),
        config: "{}".to_owned(),
        volumes: BTreeMap::new(),
        network: false,
        health_cmd: None,
    }
}

/// The spec of service `name` of `d`, checked on [`PORT`], with volume `data`.
fn service_spec(d: &Deployment, name: &str, reference: &str, image: &Image) -> Spec {
    Spec {
        service: Some(name.to_owned()),
        network: true,
        volumes: BTreeMap::from([("data".to_owned(), "/data".to_owned())]),
        ..spec(d, reference, image, &format!("service-{name}"))
    }
}

async fn within<T>(what: &str, work: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, work).await.unwrap_or_else(|_| panic!("not within {WAIT:?}: {what}"))
}

async fn pulled(b: &dyn Backend, reference: &str) -> Image {
    b.images().pull(reference, &|_, _| {}).await.unwrap_or_else(|e| panic!("pull {reference}: {e}"))
}

async fn only_instance(b: &dyn Backend, d: &Deployment) -> Instance {
    let mut all = b.instances(d).await.expect("instances");
    assert_eq!(all.len(), 1, "one instance of {d}: {all:?}");
    all.remove(0)
}

/// Whether `addr` accepts a TCP connection within `long`.
async fn accepts(addr: SocketAddr, long: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + long;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

type Events = futures_util::stream::BoxStream<'static, Result<pipes::engine::Event, pipes::error::PipesError>>;

/// Waits for an event of `id` that `wanted` accepts on `events`.
async fn event(events: &mut Events, id: &str, what: &str, wanted: impl Fn(&EventKind) -> bool) {
    within(what, async {
        while let Some(event) = events.next().await {
            let event = event.unwrap_or_else(|e| panic!("the event stream failed: {e}"));
            if event.id == id && wanted(&event.kind) {
                return;
            }
        }
        panic!("the event stream ended before {what}");
    })
    .await;
}

fn wall_nanos() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after 1970");
    i64::try_from(now.as_nanos()).expect("nanoseconds fit")
}

/// Every check, in the order a deployment lives.
async fn keeps_the_contract(s: &Subject) {
    let b = &*s.backend;
    b.describe().await.expect("describe answers");
    images(s).await;
    lifecycle(s).await;
    a_crash_is_reported(s).await;
    services_and_volumes(s).await;
    if s.reachable {
        the_spec_port_is_where_it_answers(s).await;
    }
    an_engine_out_of_reach_is_a_503(s).await;
}

async fn images(s: &Subject) {
    let b = &*s.backend;
    assert_eq!(b.images().image(&s.serving).await.expect("image"), None, "not here before the pull");
    let digest = b.images().registry_digest(&s.serving).await.expect("the registry has it");
    let image = pulled(b, &s.serving).await;
    assert_eq!(image.digest.as_deref(), Some(digest.as_str()), "pulled what the registry names");
    assert_eq!(b.images().image(&s.serving).await.expect("image"), Some(image), "here after the pull");
    let missing = b.images().pull(&s.missing, &|_, _| {}).await.expect_err("a missing image is not pulled");
    assert_eq!(missing.status(), 404, "{missing}");
    let missing = b.images().registry_digest(&s.missing).await.expect_err("a missing image has no digest");
    assert_eq!(missing.status(), 404, "{missing}");
}

async fn lifecycle(s: &Subject) {
    let b = &*s.backend;
    let d = s.deployment("life");
    let image = pulled(b, &s.serving).await;
    let spec_a = spec(&d, &s.serving, &image, "hash-a");

    let created = b.create(&spec_a).await.expect("created");
    assert!(!created.running && !created.paused, "created, not started: {created:?}");
    assert_eq!((created.deployment.clone(), created.port, created.digest.clone()), (d.clone(), Some(PORT), image.digest.clone()));
    assert_eq!(created.spec_hash.as_deref(), Some("hash-a"));
    let again = b.create(&spec_a).await.expect("created again");
    assert_eq!(again.id, created.id, "one instance per deployment and digest");
    assert_eq!(only_instance(b, &d).await.id, created.id);
    assert!(b.list().await.expect("list").iter().any(|i| i.id == created.id), "listed");
    let id = created.id.as_str();

    // A stream follows the engine from its first poll; `since` replays
    // what happened from then on, as the fleet's watcher asks after a reconnect.
    let mut events = b.events(Some(wall_nanos() - 1_000_000_000));
    let started = b.start(id).await.expect("started");
    assert!(started.running && !started.paused && started.exit_code.is_none(), "{started:?}");
    assert!(started.address.is_some(), "a running instance has an address");
    assert!(started.started().is_some(), "and a start time");
    if s.reachable {
        assert!(accepts(started.address.expect("address"), WAIT).await, "it answers at its address");
    }
    assert_eq!(b.start(id).await.expect("started again").id, id, "a running instance is left as it is");
    event(&mut events, id, "a Started event", |k| *k == EventKind::Started).await;
    drop(events);

    if let Some(pausing) = b.pausing() {
        pausing.pause(id).await.expect("paused");
        let paused = only_instance(b, &d).await;
        assert!(paused.paused && !paused.running, "{paused:?}");
        assert!(pausing.pause(id).await.is_err(), "pausing what does not run is refused");
        assert!(b.start(id).await.is_err(), "a paused instance is thawed, not started");
        let thawed = pausing.unpause(id).await.expect("thawed");
        assert!(thawed.running && !thawed.paused, "{thawed:?}");
        assert!(pausing.unpause(id).await.is_err(), "thawing what is not paused is refused");
    }

    b.restart(id, GRACE).await.expect("restarted");
    assert!(only_instance(b, &d).await.running, "running after a restart");
    let mut after = b.events(Some(wall_nanos()));
    b.stop(id, GRACE).await.expect("stopped");
    event(&mut after, id, "an event that it stopped", |k| matches!(k, EventKind::Stopped | EventKind::Died(_))).await;
    let stopped = only_instance(b, &d).await;
    assert!(!stopped.running && !stopped.paused && stopped.address.is_none(), "{stopped:?}");
    within("exited after a stop", b.exited(id)).await.expect("its exit");
    b.stop(id, GRACE).await.expect("stopping a stopped instance is no error");

    let replaced = b.create(&spec(&d, &s.serving, &image, "hash-b")).await.expect("created from another spec");
    assert_ne!(replaced.id, created.id, "another spec: a new instance");
    assert_eq!(only_instance(b, &d).await.id, replaced.id, "the old one was replaced, never kept beside");

    assert!(b.images().in_use().await.expect("asked").contains(&image.id), "a container's image is in use");
    assert!(!b.images().remove_unused(&s.serving).await.expect("asked"), "an image a container uses stays");
    b.remove(&replaced.id).await.expect("removed");
    assert!(b.instances(&d).await.expect("instances").is_empty(), "none left");
    // A swarm removes a service's task containers after the service: the
    // image is in use until the last one is gone.
    let mut gone = false;
    for _ in 0..100 {
        gone = b.images().remove_unused(&s.serving).await.expect("asked");
        if gone {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "an image nothing uses goes");
    assert_eq!(b.images().image(&s.serving).await.expect("image"), None);
    assert!(!b.images().remove_unused(&s.serving).await.expect("asked"), "removing a removed image is no error");
    b.remove(&replaced.id).await.expect("removing a removed instance is no error");
    b.stop(&replaced.id, GRACE).await.expect("stopping a removed instance is no error");
}

async fn a_crash_is_reported(s: &Subject) {
    let b = &*s.backend;
    let d = s.deployment("crash");
    let image = pulled(b, &s.crashing).await;
    let created = b.create(&spec(&d, &s.crashing, &image, "crash")).await.expect("created");
    // It may run for a moment before it exits.
    b.start(&created.id).await.expect("started");
    assert_eq!(within("the crash", b.exited(&created.id)).await.expect("its exit"), 3);
    let crashed = only_instance(b, &d).await;
    assert!(!crashed.running, "{crashed:?}");
    assert_eq!(crashed.exit_code, Some(3));
    let logs = within("its logs", async {
        loop {
            let logs = b.logs(&created.id, 10).await;
            if !logs.is_empty() {
                return logs;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(logs.len() <= 10, "at most the lines asked for: {logs:?}");
    b.remove(&created.id).await.expect("removed");
}

/// A service is an instance of its own beside the app's generations, on
/// the deployment's network, with volumes that outlive it.
async fn services_and_volumes(s: &Subject) {
    let b = &*s.backend;
    let d = s.deployment("with-db");
    let image = pulled(b, &s.serving).await;
    let db = b.create(&service_spec(&d, "db", &s.serving, &image)).await.expect("a service created");
    assert_eq!(db.service.as_deref(), Some("db"));
    let again = b.create(&service_spec(&d, "db", &s.serving, &image)).await.expect("created again");
    assert_eq!(again.id, db.id, "one instance per deployment and service");
    let app = b.create(&Spec { network: true, ..spec(&d, &s.serving, &image, "app") }).await.expect("the app created");
    assert_eq!(app.service, None);
    let ids = |all: Vec<Instance>| all.into_iter().map(|i| i.id).collect::<Vec<_>>();
    assert_eq!(ids(b.instances(&d).await.expect("instances")), vec![app.id.clone()], "instances are the app's generations only");
    assert_eq!(ids(b.services(&d).await.expect("services")), vec![db.id.clone()], "services are listed apart");
    let listed = b.list().await.expect("list");
    assert!(listed.iter().any(|i| i.id == db.id && i.service.as_deref() == Some("db")), "list names the service: {listed:?}");

    let mut events = b.events(Some(wall_nanos() - 1_000_000_000));
    let running = b.start(&db.id).await.expect("the service started");
    assert!(running.running && running.service.as_deref() == Some("db"), "{running:?}");
    if s.reachable {
        let addr = running.address.expect("a service checked on a port has an address");
        assert!(accepts(addr, WAIT).await, "the service answers at {addr}");
    }
    within("the service's Started event", async {
        while let Some(event) = events.next().await {
            let event = event.expect("an event");
            if event.id == db.id && event.kind == EventKind::Started {
                assert_eq!(event.service.as_deref(), Some("db"), "events name the service");
                return;
            }
        }
    })
    .await;
    assert!(b.start(&app.id).await.expect("the app started").running);
    assert_eq!(b.volumes(&d).await.expect("volumes").len(), 1, "its volume was made");

    for i in [&app.id, &db.id] {
        b.remove(i).await.expect("removed");
    }
    b.remove_shared(&d, true).await.expect("the network removed, volumes kept");
    assert_eq!(b.volumes(&d).await.expect("volumes").len(), 1, "volumes outlive the instances");
    b.remove_shared(&d, false).await.expect("the volumes removed");
    assert!(b.volumes(&d).await.expect("volumes").is_empty(), "none left");
    b.remove_shared(&d, false).await.expect("removing what is gone is no error");
}

async fn the_spec_port_is_where_it_answers(s: &Subject) {
    let b = &*s.backend;
    let d = s.deployment("elsewhere");
    let image = pulled(b, &s.elsewhere).await;
    let created = b.create(&spec(&d, &s.elsewhere, &image, "elsewhere")).await.expect("created");
    let started = b.start(&created.id).await.expect("started");
    let addr = started.address.expect("an address");
    assert!(!accepts(addr, Duration::from_secs(2)).await, "nothing answers at {addr}: its program listens on another port");
    b.remove(&created.id).await.expect("removed");
}

async fn an_engine_out_of_reach_is_a_503(s: &Subject) {
    let down = &*s.down;
    let d = s.deployment("down");
    let status = |r: Result<(), u16>| r.expect_err("fails while the engine is out of reach");
    assert_eq!(status(down.describe().await.map(drop).map_err(|e| e.status())), 503);
    assert_eq!(status(down.list().await.map(drop).map_err(|e| e.status())), 503);
    assert_eq!(status(down.instances(&d).await.map(drop).map_err(|e| e.status())), 503);
    assert_eq!(status(down.services(&d).await.map(drop).map_err(|e| e.status())), 503);
    assert_eq!(status(down.volumes(&d).await.map(drop).map_err(|e| e.status())), 503);
    assert_eq!(status(down.images().image(&s.serving).await.map(drop).map_err(|e| e.status())), 503);
    assert_eq!(status(down.images().pull(&s.serving, &|_, _| {}).await.map(drop).map_err(|e| e.status())), 503);
    let image = Image { id: "sha256:0".into(), digest: None, exposed_tcp: Vec::new(), size: 0 };
    assert_eq!(status(down.create(&spec(&d, &s.serving, &image, "down")).await.map(drop).map_err(|e| e.status())), 503);
    assert_eq!(status(down.start("nothing").await.map(drop).map_err(|e| e.status())), 503);
    assert_eq!(status(down.stop("nothing", GRACE).await.map_err(|e| e.status())), 503);
    assert_eq!(status(down.remove("nothing").await.map_err(|e| e.status())), 503);
    assert!(down.logs("nothing", 10).await.is_empty());
    let first = within("the event stream's answer", down.events(None).next()).await;
    assert!(matches!(first, Some(Err(_))), "the event stream fails at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fake_keeps_the_contract() {
    let fake = Fake::new();
    let (serving, elsewhere, crashing) = ("registry.test/contract/serving:v1", "registry.test/contract/elsewhere:v1", "registry.test/contract/crash:v1");
    fake.publish(serving, Behaviour::default());
    fake.publish(elsewhere, Behaviour { listens_on: Some(PORT + 1), ..Behaviour::default() });
    fake.publish(crashing, Behaviour { exit_code: Some(3), ..Behaviour::default() });
    let down = Fake::new();
    down.set_down(true);
    let subject = Subject {
        backend: fake,
        down,
        user: "contract".into(),
        serving: serving.into(),
        elsewhere: elsewhere.into(),
        crashing: crashing.into(),
        missing: "registry.test/contract/missing:v1".into(),
        reachable: true,
    };
    keeps_the_contract(&subject).await;
}

/// The images of the engine checks, pushed to the test registry.
fn engine_images(fixtures: &mut common::Fixtures) -> [String; 4] {
    [
        fixtures.publish("serving", "v1", &format!("ENV FIXTURE_PORT={PORT}")),
        fixtures.publish("elsewhere", "v1", &format!("ENV FIXTURE_PORT={}", PORT + 1)),
        fixtures.publish("crash", "v1", "ENV FIXTURE_MODE=crash"),
        fixtures.reference("missing", "v1"),
    ]
}

/// What the engine backends are configured with for instance `instance`.
fn options(instance: &str, network: Option<String>) -> DockerOptions {
    let e = common::env();
    DockerOptions {
        host: std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".into()),
        instance: instance.to_owned(),
        labels: vec![("pipes.test".into(), e.run.clone())],
        registry_host: e.registry.clone(),
        auth: Some(RegistryAuth { username: e.user.clone(), email: None, password: Secret::new(e.password.clone()) }),
        max_pulls: 2,
        network,
        publish_ports: false,
        hostname: None,
        in_container: false,
    }
}

/// Removes what an engine check made (instances, services, configs,
/// networks, volumes), also when it fails.
struct Made {
    instance: String,
    networks: Vec<String>,
}

impl Drop for Made {
    fn drop(&mut self) {
        let label = format!("label=pipes.instance={}", self.instance);
        for kind in ["service", "config"] {
            for id in common::docker_ok(&[kind, "ls", "-q", "--filter", &label]).lines() {
                let _ = common::docker(&[kind, "rm", id]);
            }
        }
        for id in common::docker_ok(&["ps", "-aq", "--filter", &label]).lines() {
            let _ = common::docker(&["rm", "-fv", id]);
        }
        for id in common::docker_ok(&["volume", "ls", "-q", "--filter", &label]).lines() {
            let _ = common::docker(&["volume", "rm", id]);
        }
        let labelled = common::docker_ok(&["network", "ls", "-q", "--filter", &label]);
        for network in self.networks.iter().map(String::as_str).chain(labelled.lines()) {
            // In use until the services' tasks are gone.
            for _ in 0..50 {
                if common::docker(&["network", "rm", network]).status.success() || common::docker(&["network", "inspect", network]).status.code() != Some(0) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_keeps_the_contract() {
    if common::skip() {
        return;
    }
    let mut fixtures = common::Fixtures::new();
    let [serving, elsewhere, crashing, missing] = engine_images(&mut fixtures);
    let instance = common::unique("contract");
    let _made = Made { instance: instance.clone(), networks: vec![format!("pipes-{instance}")] };
    let backend = Docker::connect(&options(&instance, None)).await;
    let down = DockerOptions { host: "unix:///nonexistent/docker.sock".into(), ..options(&instance, None) };
    let subject = Subject {
        backend: Arc::new(backend),
        down: Arc::new(Docker::new(&down, pipes::engine::docker::Reach::Published)),
        user: fixtures.user.clone(),
        serving,
        elsewhere,
        crashing,
        missing,
        reachable: true,
    };
    keeps_the_contract(&subject).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swarm_keeps_the_contract() {
    if common::no_swarm() {
        return;
    }
    let mut fixtures = common::Fixtures::new();
    let [serving, elsewhere, crashing, missing] = engine_images(&mut fixtures);
    let instance = common::unique("contract");
    let network = common::network("pipes-contract", &["-d", "overlay", "--attachable"]);
    let _made = Made { instance: instance.clone(), networks: vec![network.clone()] };
    let down = DockerOptions { host: "unix:///nonexistent/docker.sock".into(), ..options(&instance, Some(network.clone())) };
    let subject = Subject {
        backend: Arc::new(Swarm::new(&options(&instance, Some(network)))),
        down: Arc::new(Swarm::new(&down)),
        user: fixtures.user.clone(),
        serving,
        elsewhere,
        crashing,
        missing,
        // Tasks answer on the overlay network, which this process is not on.
        reachable: false,
    };
    keeps_the_contract(&subject).await;
}

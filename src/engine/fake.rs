//! An in-memory [`Backend`] for tests: the fleet's unit tests and the
//! backend contract (`tests/it/contract.rs`), which holds it to what Docker's
//! engine does.
//!
//! An instance is a tiny HTTP server on 127.0.0.1 that answers `200 ok`, so
//! the fleet's probes and connections are real; stopping one closes its
//! listener, so a refused connection is real too. Images are "published" by
//! the test with the behaviour their instances show. Where the engine
//! refuses (pausing what does not run, starting what is paused), the fake
//! refuses too; its "engine down" switch fails every call.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{broadcast, watch};
use tokio::task::AbortHandle;

use super::{Backend, Event, EventKind, Image, Images, Instance, Pausing, Progress, Quiet, Replicas, Spec};
use crate::error::PipesError;
use crate::route::Deployment;

/// How instances of a published image behave.
#[derive(Debug, Clone, Default)]
pub struct Behaviour {
    /// Exit at once with this code instead of serving.
    pub exit_code: Option<i64>,
    /// Start listening only after this long.
    pub listen_after: Duration,
    /// Ports the image exposes.
    pub exposed: Vec<u16>,
    /// The port its program listens on, if not the one the spec names: its
    /// instances then refuse connections at their address, as a container
    /// whose program listens elsewhere does.
    pub listens_on: Option<u16>,
    /// Its health check never passes: it stays `starting`.
    pub unhealthy: bool,
}

struct Entry {
    instance: Instance,
    spec: Spec,
    server: Option<AbortHandle>,
    /// `Some(code)` once it stopped running.
    exit: watch::Sender<Option<i64>>,
}

#[derive(Default)]
struct Inner {
    /// Reference → how its instances behave, and its digest now.
    registry: HashMap<String, (Behaviour, String)>,
    /// Reference → the image pulled last.
    local: HashMap<String, Image>,
    entries: HashMap<String, Entry>,
    next_id: usize,
    /// Names of the volumes made, `{deployment}/{volume}`.
    volumes: BTreeSet<String>,
    /// Deployments whose own network exists.
    networks: BTreeSet<String>,
    down: bool,
    /// Set when the fake plays one of several Pipes serving its instances.
    others: Option<Others>,
}

/// What the other Pipes serving the fake's instances do, as a test sets it.
#[derive(Debug, Clone, Default)]
pub struct Others {
    /// They had something open at this time (Unix ms).
    pub busy_at: Option<u64>,
    /// One of them writes between the look at them and the stop.
    pub interfere: bool,
    /// What this Pipes reported to them: instance id and time.
    pub told: Vec<(String, u64)>,
}

/// Counts of backend calls, for tests to assert on.
#[derive(Default)]
pub struct Calls {
    pub pulls: AtomicUsize,
    pub creates: AtomicUsize,
    pub starts: AtomicUsize,
    pub stops: AtomicUsize,
    pub pauses: AtomicUsize,
    pub unpauses: AtomicUsize,
    pub lists: AtomicUsize,
    pub digests: AtomicUsize,
}

/// The fake backend.
pub struct Fake {
    inner: Mutex<Inner>,
    events: broadcast::Sender<Event>,
    /// Every event so far, for `events(since)`; locked after `inner`.
    history: Mutex<Vec<Event>>,
    pub calls: Calls,
}

impl Fake {
    /// An empty fake: no images, no instances.
    pub fn new() -> Arc<Fake> {
        Arc::new(Fake { inner: Mutex::default(), events: broadcast::channel(1024).0, history: Mutex::default(), calls: Calls::default() })
    }

    /// Makes the fake one of several Pipes serving its instances.
    pub fn share_with(&self, others: Others) {
        self.lock().others = Some(others);
    }

    /// What this Pipes told the others so far.
    pub fn told(&self) -> Vec<(String, u64)> {
        self.lock().others.as_ref().map(|o| o.told.clone()).unwrap_or_default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Pushes an image to the fake registry: a new digest for `reference`.
    pub fn publish(&self, reference: &str, behaviour: Behaviour) -> String {
        static PUSHES: AtomicUsize = AtomicUsize::new(0);
        let digest = format!("sha256:{:064x}", PUSHES.fetch_add(1, Ordering::Relaxed) + 1);
        self.lock().registry.insert(reference.to_owned(), (behaviour, digest.clone()));
        digest
    }

    /// Ids of `d`'s app instances that run.
    pub fn running(&self, d: &Deployment) -> Vec<String> {
        self.lock()
            .entries
            .values()
            .filter(|e| &e.instance.deployment == d && e.instance.service.is_none() && e.instance.running)
            .map(|e| e.instance.id.clone())
            .collect()
    }

    /// Whether `d`'s network exists, and its volumes' names.
    pub fn shared(&self, d: &Deployment) -> (bool, Vec<String>) {
        let inner = self.lock();
        let prefix = format!("{d}/");
        (inner.networks.contains(&d.to_string()), inner.volumes.iter().filter(|v| v.starts_with(&prefix)).cloned().collect())
    }

    /// Tells followers of `kind` happening to `entry`. Called with `inner`
    /// locked, so that `events` can take the history and follow from one
    /// point, missing nothing and repeating nothing.
    fn emit(&self, entry: &Entry, kind: EventKind) {
        let time_nano = i64::try_from(crate::clock::wall().as_nanos()).unwrap_or(i64::MAX);
        let event = Event {
            id: entry.instance.id.clone(),
            deployment: Some(entry.instance.deployment.clone()),
            service: entry.instance.service.clone(),
            kind,
            time_nano,
        };
        self.history.lock().unwrap_or_else(PoisonError::into_inner).push(event.clone());
        let _ = self.events.send(event);
    }

    /// Makes every call fail as if the engine were unreachable (or answer again).
    pub fn set_down(&self, down: bool) {
        self.lock().down = down;
    }

    /// Stops `d`'s running app instances (or its service `service`) behind
    /// Pipes' back, as `docker kill` would.
    pub fn kill(&self, d: &Deployment, service: Option<&str>) {
        let mut inner = self.lock();
        for entry in inner.entries.values_mut().filter(|e| &e.instance.deployment == d && e.instance.service.as_deref() == service && e.instance.running) {
            halt(entry, 137);
            self.emit(entry, EventKind::Died(Some(137)));
        }
    }

    /// How many instances exist, running or not.
    pub fn instance_count(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether `d` has a running instance.
    pub fn is_running(&self, d: &Deployment) -> bool {
        !self.running(d).is_empty()
    }

    fn up(&self) -> Result<(), PipesError> {
        if self.lock().down {
            Err(down())
        } else {
            Ok(())
        }
    }

    /// Starts the entry `id`: serves, or exits at once as its image says.
    async fn launch(&self, id: &str) -> Result<Instance, PipesError> {
        let (behaviour, port) = {
            let inner = self.lock();
            let entry = inner.entries.get(id).ok_or_else(|| gone(id))?;
            (inner.registry.get(&entry.spec.image).map(|(b, _)| b.clone()).unwrap_or_default(), entry.spec.port)
        };
        let listens = behaviour.listens_on.is_none_or(|p| p == port);
        let served = match behaviour.exit_code {
            Some(_) => None,
            None => Some(serve(behaviour.listen_after, listens).await),
        };
        let mut inner = self.lock();
        let entry = inner.entries.get_mut(id).ok_or_else(|| gone(id))?;
        entry.instance.started_at = Some(humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string());
        entry.exit.send_replace(None);
        match (behaviour.exit_code, served) {
            (Some(code), _) => {
                halt(entry, code);
                self.emit(entry, EventKind::Started);
                self.emit(entry, EventKind::Died(Some(code)));
            }
            (None, Some((addr, server))) => {
                entry.instance.running = true;
                entry.instance.exit_code = None;
                entry.instance.address = Some(addr);
                entry.instance.health = entry.spec.health_cmd.as_ref().map(|_| if behaviour.unhealthy { "starting" } else { "healthy" }.to_owned());
                entry.server = Some(server);
                self.emit(entry, EventKind::Started);
            }
            (None, None) => unreachable!("a serving image has a server"),
        }
        Ok(entry.instance.clone())
    }
}

fn gone(id: &str) -> PipesError {
    PipesError::Engine { action: "find an instance", detail: format!("no instance {id}") }
}

/// What the engine answers to an operation its instance's state forbids.
fn refused(action: &str, id: &str, why: &str) -> PipesError {
    PipesError::Engine { action: "change an instance", detail: format!("cannot {action} {id}: it {why}") }
}

fn down() -> PipesError {
    PipesError::EngineUnavailable { reason: "the fake engine is down".into() }
}

fn halt(entry: &mut Entry, code: i64) {
    if let Some(server) = entry.server.take() {
        server.abort();
    }
    entry.instance.running = false;
    entry.instance.paused = false;
    entry.instance.address = None;
    entry.instance.exit_code = Some(code);
    entry.exit.send_replace(Some(code));
}

/// A server answering every request `200 ok`, listening after `delay` — or
/// never, unless `listens`. Its socket is bound at once and kept: until it
/// listens, connections to its address are refused, and no other program
/// can take the port meanwhile.
async fn serve(delay: Duration, listens: bool) -> (SocketAddr, AbortHandle) {
    let socket = TcpSocket::new_v4().expect("a socket");
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("a free port");
    let addr = socket.local_addr().expect("a bound address");
    let task = match (listens, delay.is_zero()) {
        (false, _) => tokio::spawn(async move {
            let _bound = socket;
            std::future::pending::<()>().await
        }),
        (true, true) => tokio::spawn(answer_ok(socket.listen(1024).expect("listening"))),
        (true, false) => tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if let Ok(listener) = socket.listen(1024) {
                answer_ok(listener).await;
            }
        }),
    };
    (addr, task.abort_handle())
}

/// Answers every request on `listener` with `200 ok`.
async fn answer_ok(listener: TcpListener) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { return };
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut seen = 0;
            while !buf[..seen].windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf[seen..]).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => seen += n,
                }
                if seen == buf.len() {
                    return;
                }
            }
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok").await;
        });
    }
}

#[async_trait]
impl Backend for Fake {
    async fn describe(&self) -> Result<String, PipesError> {
        self.up()?;
        Ok("fake backend".into())
    }

    async fn list(&self) -> Result<Vec<Instance>, PipesError> {
        self.up()?;
        self.calls.lists.fetch_add(1, Ordering::Relaxed);
        Ok(self.lock().entries.values().map(|e| e.instance.clone()).collect())
    }

    async fn instances(&self, d: &Deployment) -> Result<Vec<Instance>, PipesError> {
        self.up()?;
        Ok(self.lock().entries.values().filter(|e| &e.instance.deployment == d && e.instance.service.is_none()).map(|e| e.instance.clone()).collect())
    }

    async fn services(&self, d: &Deployment) -> Result<Vec<Instance>, PipesError> {
        self.up()?;
        Ok(self.lock().entries.values().filter(|e| &e.instance.deployment == d && e.instance.service.is_some()).map(|e| e.instance.clone()).collect())
    }

    async fn volumes(&self, d: &Deployment) -> Result<Vec<String>, PipesError> {
        self.up()?;
        Ok(self.shared(d).1)
    }

    async fn remove_shared(&self, d: &Deployment, keep_volumes: bool) -> Result<(), PipesError> {
        self.up()?;
        let mut inner = self.lock();
        inner.networks.remove(&d.to_string());
        if !keep_volumes {
            let prefix = format!("{d}/");
            inner.volumes.retain(|v| !v.starts_with(&prefix));
        }
        Ok(())
    }

    fn images(&self) -> &dyn Images {
        self
    }

    async fn create(&self, spec: &Spec) -> Result<Instance, PipesError> {
        self.up()?;
        self.calls.creates.fetch_add(1, Ordering::Relaxed);
        // One look and one change under one lock: like the engine's unique
        // names, two creates of one generation never make two instances.
        let mut inner = self.lock();
        if spec.network {
            inner.networks.insert(spec.deployment.to_string());
        }
        for volume in spec.volumes.keys() {
            inner.volumes.insert(format!("{}/{volume}", spec.deployment));
        }
        // One instance per deployment and digest, or per deployment and service.
        let same_name = inner
            .entries
            .values()
            .find(|e| e.instance.deployment == spec.deployment && e.spec.service == spec.service && (spec.service.is_some() || e.spec.digest == spec.digest))
            .map(|e| e.instance.id.clone());
        if let Some(id) = same_name {
            let entry = inner.entries.get(&id).ok_or_else(|| gone(&id))?;
            if entry.spec.hash == spec.hash {
                // A generation coming back, or made by another Pipes first.
                return Ok(entry.instance.clone());
            }
            // Made from another spec: replaced.
            if let Some(mut old) = inner.entries.remove(&id) {
                halt(&mut old, 137);
                self.emit(&old, EventKind::Destroyed);
            }
        }
        inner.next_id += 1;
        let id = format!("fake{:08}", inner.next_id);
        let instance = Instance::created(id.clone(), spec);
        // Waiting for a container that never ran returns at once, as the engine's does.
        let (exit, _) = watch::channel(Some(0));
        inner.entries.insert(id, Entry { instance: instance.clone(), spec: spec.clone(), server: None, exit });
        Ok(instance)
    }

    async fn start(&self, id: &str) -> Result<Instance, PipesError> {
        self.up()?;
        self.calls.starts.fetch_add(1, Ordering::Relaxed);
        let now = self.lock().entries.get(id).ok_or_else(|| gone(id))?.instance.clone();
        if now.paused {
            return Err(refused("start", id, "is paused: unpause it instead"));
        }
        if now.running {
            return Ok(now);
        }
        self.launch(id).await
    }

    async fn stop(&self, id: &str, _grace: Duration) -> Result<(), PipesError> {
        self.up()?;
        self.calls.stops.fetch_add(1, Ordering::Relaxed);
        if let Some(entry) = self.lock().entries.get_mut(id) {
            // The engine stops a paused container too.
            entry.instance.paused = false;
            if entry.instance.running || entry.server.is_some() {
                halt(entry, 0);
                self.emit(entry, EventKind::Died(Some(0)));
                self.emit(entry, EventKind::Stopped);
            }
        }
        Ok(())
    }

    async fn restart(&self, id: &str, grace: Duration) -> Result<(), PipesError> {
        self.stop(id, grace).await?;
        self.launch(id).await.map(drop)
    }

    async fn remove(&self, id: &str) -> Result<(), PipesError> {
        self.up()?;
        if let Some(mut entry) = self.lock().entries.remove(id) {
            halt(&mut entry, 137);
            self.emit(&entry, EventKind::Destroyed);
        }
        Ok(())
    }

    async fn exited(&self, id: &str) -> Result<i64, PipesError> {
        self.up()?;
        let mut exit = self.lock().entries.get(id).ok_or_else(|| gone(id))?.exit.subscribe();
        let code = exit.wait_for(Option::is_some).await.map_err(|_| gone(id))?;
        Ok(code.unwrap_or(0))
    }

    async fn logs(&self, id: &str, lines: usize) -> Vec<String> {
        let inner = self.lock();
        if inner.down {
            return Vec::new();
        }
        let Some(entry) = inner.entries.get(id) else { return Vec::new() };
        let line = match entry.instance.exit_code {
            Some(code) => format!("{} exited with {code}", entry.spec.image),
            None => format!("{} serving", entry.spec.image),
        };
        std::iter::once(line).take(lines).collect()
    }

    fn events(&self, since_nano: Option<i64>) -> BoxStream<'static, Result<Event, PipesError>> {
        let (rx, past) = {
            let inner = self.lock();
            if inner.down {
                return futures_util::stream::once(std::future::ready(Err(down()))).boxed();
            }
            let past: Vec<Event> = match since_nano {
                Some(since) => self.history.lock().unwrap_or_else(PoisonError::into_inner).iter().filter(|e| e.time_nano > since).cloned().collect(),
                None => Vec::new(),
            };
            (self.events.subscribe(), past)
        };
        let live = futures_util::stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(event) => return Some((Ok(event), rx)),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        futures_util::stream::iter(past.into_iter().map(Ok)).chain(live).boxed()
    }

    fn pausing(&self) -> Option<&dyn Pausing> {
        Some(self)
    }

    fn replicas(&self) -> Option<&dyn Replicas> {
        self.lock().others.is_some().then_some(self as &dyn Replicas)
    }
}

#[async_trait]
impl Images for Fake {
    async fn image(&self, reference: &str) -> Result<Option<Image>, PipesError> {
        self.up()?;
        Ok(self.lock().local.get(reference).cloned())
    }

    async fn pull(&self, reference: &str, progress: &Progress<'_>) -> Result<Image, PipesError> {
        self.up()?;
        self.calls.pulls.fetch_add(1, Ordering::Relaxed);
        let mut inner = self.lock();
        let published = inner.registry.get(reference).cloned();
        match published {
            Some((behaviour, digest)) => {
                let image = Image { id: format!("sha256:image-of-{digest}"), digest: Some(digest), exposed_tcp: behaviour.exposed.clone(), size: 1024 };
                inner.local.insert(reference.to_owned(), image.clone());
                // One layer of a kilobyte, all there at once.
                progress(1024, 1024);
                Ok(image)
            }
            None => Err(PipesError::ImageNotFound { image: reference.to_owned() }),
        }
    }

    async fn registry_digest(&self, reference: &str) -> Result<String, PipesError> {
        self.up()?;
        self.calls.digests.fetch_add(1, Ordering::Relaxed);
        let inner = self.lock();
        inner.registry.get(reference).map(|(_, digest)| digest.clone()).ok_or_else(|| PipesError::ImageNotFound { image: reference.to_owned() })
    }

    async fn in_use(&self) -> Result<HashSet<String>, PipesError> {
        self.up()?;
        let inner = self.lock();
        Ok(inner.entries.values().filter_map(|e| inner.local.get(&e.spec.image)).map(|i| i.id.clone()).collect())
    }

    async fn remove_unused(&self, reference: &str) -> Result<bool, PipesError> {
        self.up()?;
        let mut inner = self.lock();
        if inner.entries.values().any(|e| e.spec.image == reference) {
            return Ok(false);
        }
        Ok(inner.local.remove(reference).is_some())
    }
}

#[async_trait]
impl Pausing for Fake {
    async fn pause(&self, id: &str) -> Result<(), PipesError> {
        self.up()?;
        self.calls.pauses.fetch_add(1, Ordering::Relaxed);
        let mut inner = self.lock();
        let entry = inner.entries.get_mut(id).ok_or_else(|| gone(id))?;
        if !entry.instance.running {
            return Err(refused("pause", id, "is not running"));
        }
        // Its server task stays, like a frozen process's socket.
        entry.instance.running = false;
        entry.instance.paused = true;
        self.emit(entry, EventKind::Paused);
        Ok(())
    }

    async fn unpause(&self, id: &str) -> Result<Instance, PipesError> {
        self.up()?;
        self.calls.unpauses.fetch_add(1, Ordering::Relaxed);
        let mut inner = self.lock();
        let entry = inner.entries.get_mut(id).ok_or_else(|| gone(id))?;
        if !entry.instance.paused {
            return Err(refused("unpause", id, "is not paused"));
        }
        entry.instance.paused = false;
        entry.instance.running = true;
        self.emit(entry, EventKind::Unpaused);
        Ok(entry.instance.clone())
    }
}

/// The fake plays one of several Pipes when a test makes it ([`Fake::share_with`]).
#[async_trait]
impl Replicas for Fake {
    async fn share_activity(&self, id: &str, at_ms: u64) -> Result<(), PipesError> {
        self.up()?;
        if let Some(others) = self.lock().others.as_mut() {
            others.told.push((id.to_owned(), at_ms));
        }
        Ok(())
    }

    async fn quiet_elsewhere(&self, _id: &str, _idle: Duration) -> Result<Quiet, PipesError> {
        self.up()?;
        Ok(match self.lock().others.as_ref().and_then(|o| o.busy_at) {
            Some(at) => Quiet::Busy(at),
            None => Quiet::Since(1),
        })
    }

    async fn stop_quiet(&self, id: &str, grace: Duration, _since: u64) -> Result<bool, PipesError> {
        if self.lock().others.as_ref().is_some_and(|o| o.interfere) {
            return Ok(false);
        }
        self.stop(id, grace).await.map(|()| true)
    }
}

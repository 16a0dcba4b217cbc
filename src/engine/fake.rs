//! An in-memory [`Backend`] for the fleet's unit tests.
//!
//! An instance is a tiny HTTP server on 127.0.0.1 that answers `200 ok`, so
//! the fleet's probes and connections are real; stopping one closes its
//! listener, so a refused connection is real too. Images are "published" by
//! the test with the behaviour their instances show.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};
use tokio::task::AbortHandle;

use super::{Backend, Event, EventKind, Image, Instance, Progress, Quiet, Spec};
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
    pub calls: Calls,
}

impl Fake {
    /// An empty fake: no images, no instances.
    pub fn new() -> Arc<Fake> {
        Arc::new(Fake { inner: Mutex::default(), events: broadcast::channel(1024).0, calls: Calls::default() })
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

    /// Ids of `d`'s instances that run.
    pub fn running(&self, d: &Deployment) -> Vec<String> {
        self.lock().entries.values().filter(|e| &e.instance.deployment == d && e.instance.running).map(|e| e.instance.id.clone()).collect()
    }

    fn emit(&self, entry: &Entry, kind: EventKind) {
        let time_nano = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
        let _ = self.events.send(Event { id: entry.instance.id.clone(), deployment: Some(entry.instance.deployment.clone()), kind, time_nano });
    }

    /// Makes every call fail as if the engine were unreachable (or answer again).
    pub fn set_down(&self, down: bool) {
        self.lock().down = down;
    }

    /// Stops `d`'s running instances behind Pipes' back, as `docker kill` would.
    pub fn kill(&self, d: &Deployment) {
        let mut inner = self.lock();
        for entry in inner.entries.values_mut().filter(|e| &e.instance.deployment == d && e.instance.running) {
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
            Err(PipesError::EngineUnavailable { reason: "the fake engine is down".into() })
        } else {
            Ok(())
        }
    }

    /// Starts the entry `id`: serves, or exits at once as its image says.
    async fn launch(&self, id: &str) -> Result<Instance, PipesError> {
        let behaviour = {
            let inner = self.lock();
            let entry = inner.entries.get(id).ok_or_else(|| gone(id))?;
            inner.registry.get(&entry.spec.image).map(|(b, _)| b.clone()).unwrap_or_default()
        };
        let served = match behaviour.exit_code {
            Some(_) => None,
            None => Some(serve(behaviour.listen_after).await),
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

/// A server answering every request `200 ok`, listening after `delay`.
async fn serve(delay: Duration) -> (SocketAddr, AbortHandle) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a free port");
    let addr = listener.local_addr().expect("a bound address");
    let task = tokio::spawn(async move {
        let listener = if delay.is_zero() {
            listener
        } else {
            // Listen later: connections before then are refused.
            drop(listener);
            tokio::time::sleep(delay).await;
            let Ok(listener) = TcpListener::bind(addr).await else { return };
            listener
        };
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
    });
    (addr, task.abort_handle())
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
        Ok(self.lock().entries.values().filter(|e| &e.instance.deployment == d).map(|e| e.instance.clone()).collect())
    }

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
                let image = Image { id: format!("sha256:image-of-{digest}"), digest: Some(digest), exposed_tcp: behaviour.exposed.clone() };
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

    async fn create(&self, spec: &Spec) -> Result<Instance, PipesError> {
        self.up()?;
        self.calls.creates.fetch_add(1, Ordering::Relaxed);
        let reuse = {
            let mut inner = self.lock();
            let same_name = inner
                .entries
                .values()
                .find(|e| e.instance.deployment == spec.deployment && e.spec.digest == spec.digest)
                .map(|e| (e.instance.id.clone(), e.spec.hash == spec.hash));
            match same_name {
                // A generation coming back.
                Some((id, true)) => Some(id),
                // Made from another spec: replaced.
                Some((id, false)) => {
                    if let Some(mut old) = inner.entries.remove(&id) {
                        halt(&mut old, 137);
                    }
                    None
                }
                None => None,
            }
        };
        if let Some(id) = reuse {
            return Ok(self.lock().entries.get(&id).ok_or_else(|| gone(&id))?.instance.clone());
        }
        let created = {
            let mut inner = self.lock();
            inner.next_id += 1;
            let id = format!("fake{:08}", inner.next_id);
            let instance = Instance::created(id.clone(), spec);
            let (exit, _) = watch::channel(None);
            inner.entries.insert(id.clone(), Entry { instance: instance.clone(), spec: spec.clone(), server: None, exit });
            instance
        };
        Ok(created)
    }

    async fn start(&self, id: &str) -> Result<Instance, PipesError> {
        self.up()?;
        self.calls.starts.fetch_add(1, Ordering::Relaxed);
        let running = self.lock().entries.get(id).ok_or_else(|| gone(id))?.instance.clone();
        if running.running {
            return Ok(running);
        }
        self.launch(id).await
    }

    async fn pause(&self, id: &str) -> Result<(), PipesError> {
        self.up()?;
        self.calls.pauses.fetch_add(1, Ordering::Relaxed);
        let mut inner = self.lock();
        let entry = inner.entries.get_mut(id).ok_or_else(|| gone(id))?;
        if entry.instance.running {
            // Its server task stays, like a frozen process's socket.
            entry.instance.running = false;
            entry.instance.paused = true;
            self.emit(entry, EventKind::Paused);
        }
        Ok(())
    }

    async fn unpause(&self, id: &str) -> Result<Instance, PipesError> {
        self.up()?;
        self.calls.unpauses.fetch_add(1, Ordering::Relaxed);
        let mut inner = self.lock();
        let entry = inner.entries.get_mut(id).ok_or_else(|| gone(id))?;
        if entry.instance.paused {
            entry.instance.paused = false;
            entry.instance.running = true;
            self.emit(entry, EventKind::Unpaused);
        }
        Ok(entry.instance.clone())
    }

    // One fake backend is one Pipes: its name is always free.
    async fn claim(&self, _beside: bool) -> Result<Option<String>, PipesError> {
        self.up()?;
        Ok(None)
    }

    async fn release(&self) {}

    fn shared(&self) -> bool {
        self.lock().others.is_some()
    }

    async fn share_activity(&self, id: &str, at_ms: u64) -> Result<(), PipesError> {
        if let Some(others) = self.lock().others.as_mut() {
            others.told.push((id.to_owned(), at_ms));
        }
        Ok(())
    }

    async fn quiet_elsewhere(&self, _id: &str, _idle: Duration) -> Result<Quiet, PipesError> {
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

    async fn stop(&self, id: &str, _grace: Duration) -> Result<(), PipesError> {
        self.up()?;
        self.calls.stops.fetch_add(1, Ordering::Relaxed);
        if let Some(entry) = self.lock().entries.get_mut(id) {
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
        let mut exit = self.lock().entries.get(id).ok_or_else(|| gone(id))?.exit.subscribe();
        let code = exit.wait_for(Option::is_some).await.map_err(|_| gone(id))?;
        Ok(code.unwrap_or(0))
    }

    async fn logs(&self, id: &str, lines: usize) -> Vec<String> {
        let inner = self.lock();
        let Some(entry) = inner.entries.get(id) else { return Vec::new() };
        let line = match entry.instance.exit_code {
            Some(code) => format!("{} exited with {code}", entry.spec.image),
            None => format!("{} serving", entry.spec.image),
        };
        std::iter::once(line).take(lines).collect()
    }

    fn events(&self, _since_nano: Option<i64>) -> BoxStream<'static, Result<Event, PipesError>> {
        futures_util::stream::unfold(self.events.subscribe(), |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(event) => return Some((Ok(event), rx)),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
        .boxed()
    }
}

//! Step 3 of the request path: the table of deployments, and who starts them.
//!
//! The table is a copy-on-write map behind an `ArcSwap`: a request reads it
//! without taking any lock, and finds a [`Slot`] whose ready upstream is one more
//! atomic load. Only new deployments (cold path) copy the map.
//!
//! A cold start runs as a task on the control runtime, not inside the request
//! that caused it, so a client that hangs up does not cancel a start that
//! others wait on. Every request for a starting deployment awaits the same task.

mod deploy;
mod probe;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, ArcSwapOption};
use futures_util::future::{BoxFuture, FutureExt, Shared};
use pingora::upstreams::peer::HttpPeer;

pub use deploy::Deployer;

use crate::engine::{Container, Engine};
use crate::error::PipesError;
use crate::route::{Deployment, DeploymentRef};
use crate::security::Policy;
use crate::settings::Settings;

/// How long Pipes waits to connect to a container that should be running.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Resolution of the last-request time; idle timeouts are at least a second.
const TOUCH_RESOLUTION_MS: u64 = 100;
/// Seconds a container gets to stop before it is killed.
const STOP_GRACE_SECS: i32 = 10;

/// A running container that answered: where requests for a deployment go.
#[derive(Debug)]
pub struct Upstream {
    pub container_id: String,
    pub addr: SocketAddr,
    /// Stop the container after this long without requests.
    pub idle_timeout: Option<Duration>,
    /// Unix time in milliseconds when it became ready.
    pub ready_ms: u64,
    peer: HttpPeer,
}

impl Upstream {
    /// An upstream at `addr` served by container `container_id`.
    pub fn new(container_id: String, addr: SocketAddr, idle_timeout: Option<Duration>) -> Self {
        let mut peer = HttpPeer::new(addr, false, String::new());
        peer.options.connection_timeout = Some(CONNECT_TIMEOUT);
        Upstream { container_id, addr, idle_timeout, ready_ms: now_ms(), peer }
    }

    /// The peer Pingora connects to for one request.
    pub fn peer(&self) -> Box<HttpPeer> {
        Box::new(self.peer.clone())
    }
}

type StartResult = Result<Arc<Upstream>, PipesError>;
type Start = Shared<BoxFuture<'static, StartResult>>;

/// What only the cold path touches.
#[derive(Default)]
struct Cold {
    /// The start in progress, which every waiting request awaits.
    starting: Option<Start>,
    /// The last failed start, remembered for `failure_ttl`.
    failed: Option<(Instant, PipesError)>,
}

/// One deployment in the table.
pub struct Slot {
    pub deployment: Deployment,
    ready: ArcSwapOption<Upstream>,
    /// Unix time in milliseconds of the last proxied request; 0 if none.
    last_request_ms: AtomicU64,
    cold: Mutex<Cold>,
}

/// What the API reports of a slot without asking the engine.
#[derive(Debug, Clone)]
pub enum SlotState {
    Running(Arc<Upstream>),
    Starting,
    Failed(PipesError),
    Idle,
}

impl Slot {
    fn new(deployment: Deployment) -> Self {
        Slot {
            deployment,
            ready: ArcSwapOption::empty(),
            last_request_ms: AtomicU64::new(0),
            cold: Mutex::new(Cold::default()),
        }
    }

    /// The upstream, if the deployment is running and answered: the hot path.
    #[inline]
    pub fn ready(&self) -> Option<Arc<Upstream>> {
        self.ready.load_full()
    }

    /// Records a proxied request, for idle accounting.
    ///
    /// Writes at most every `TOUCH_RESOLUTION_MS`: a store on every request
    /// would bounce this cache line between the proxy threads.
    #[inline]
    pub fn touch(&self) {
        let now = now_ms();
        if now.saturating_sub(self.last_request_ms.load(Ordering::Relaxed)) >= TOUCH_RESOLUTION_MS {
            self.last_request_ms.store(now, Ordering::Relaxed);
        }
    }

    /// Unix time in milliseconds of the last proxied request.
    pub fn last_request_ms(&self) -> Option<u64> {
        Some(self.last_request_ms.load(Ordering::Relaxed)).filter(|ms| *ms > 0)
    }

    /// The state as the table knows it.
    pub fn state(&self) -> SlotState {
        if let Some(up) = self.ready() {
            return SlotState::Running(up);
        }
        let cold = self.lock_cold();
        match (&cold.starting, &cold.failed) {
            (Some(_), _) => SlotState::Starting,
            (None, Some((_, e))) => SlotState::Failed(e.clone()),
            (None, None) => SlotState::Idle,
        }
    }

    fn lock_cold(&self) -> MutexGuard<'_, Cold> {
        // The guarded data stays consistent even if a holder panicked.
        self.cold.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

type Table = hashbrown::HashMap<Deployment, Arc<Slot>>;

/// Every deployment Pipes knows, and the means to start them.
pub struct Fleet {
    table: ArcSwap<Table>,
    /// Serializes additions to the table (cold path only).
    grow: Mutex<()>,
    policy: Policy,
    failure_ttl: Duration,
    deployer: Arc<Deployer>,
    /// The runtime that runs starts and engine calls.
    control: tokio::runtime::Handle,
}

impl Fleet {
    /// A fleet deploying with `engine` on the `control` runtime.
    pub fn new(settings: Arc<Settings>, engine: Engine, control: tokio::runtime::Handle) -> Self {
        Fleet {
            table: ArcSwap::from_pointee(Table::new()),
            grow: Mutex::new(()),
            policy: settings.policy.clone(),
            failure_ttl: settings.failure_ttl,
            deployer: Arc::new(Deployer::new(engine, settings)),
            control,
        }
    }

    /// The engine, for the API.
    pub fn engine(&self) -> &Engine {
        self.deployer.engine()
    }

    /// The deployer, for the API.
    pub fn deployer(&self) -> &Deployer {
        &self.deployer
    }

    /// Whether the policy lets `d` run here.
    #[inline]
    pub fn allows(&self, d: DeploymentRef<'_>) -> bool {
        self.policy.allows(d)
    }

    /// The slot of a deployment the table knows: lock-free, no allocation.
    #[inline]
    pub fn get(&self, d: DeploymentRef<'_>) -> Option<Arc<Slot>> {
        self.table.load().get(&d).cloned()
    }

    /// The slot of a deployment, added to the table if new.
    pub fn slot(&self, d: DeploymentRef<'_>) -> Arc<Slot> {
        if let Some(slot) = self.get(d) {
            return slot;
        }
        let _grow = self.grow.lock().unwrap_or_else(PoisonError::into_inner);
        let table = self.table.load();
        if let Some(slot) = table.get(&d) {
            return slot.clone();
        }
        let slot = Arc::new(Slot::new(d.to_owned()));
        let mut next = Table::clone(&table);
        next.insert(slot.deployment.clone(), slot.clone());
        self.table.store(Arc::new(next));
        slot
    }

    /// Every slot, sorted by deployment.
    pub fn slots(&self) -> Vec<Arc<Slot>> {
        let mut all: Vec<_> = self.table.load().values().cloned().collect();
        all.sort_by(|a, b| a.deployment.cmp(&b.deployment));
        all
    }

    /// The upstream of a running deployment, starting it first if needed.
    pub async fn ready(&self, slot: &Arc<Slot>) -> StartResult {
        if let Some(up) = slot.ready() {
            return Ok(up);
        }
        self.start(slot).await
    }

    /// After `failed` refused a connection: forget it and start the deployment again.
    pub async fn recover(&self, slot: &Arc<Slot>, failed: SocketAddr) -> StartResult {
        {
            let _cold = slot.lock_cold();
            if slot.ready().is_some_and(|up| up.addr == failed) {
                log::info!("{}: upstream {failed} stopped answering, starting it again", slot.deployment);
                slot.ready.store(None);
            }
        }
        self.ready(slot).await
    }

    /// Forgets the upstream of a deployment whose container was stopped or removed.
    pub fn forget(&self, slot: &Slot) {
        let mut cold = slot.lock_cold();
        slot.ready.store(None);
        cold.failed = None;
    }

    /// Forgets remembered failures of a repository's deployments, after its
    /// config changed: the next request tries again at once.
    pub fn retry_repository(&self, user: &str, repo: &str) {
        for slot in self.table.load().values() {
            if slot.deployment.user == user && slot.deployment.repo == repo {
                slot.lock_cold().failed = None;
            }
        }
    }

    /// Waits for a start under way, so an operation does not race it.
    async fn settle(&self, slot: &Slot) {
        let start = slot.lock_cold().starting.clone();
        if let Some(start) = start {
            let _ = start.await;
        }
    }

    /// Runs `action` on the deployment's container, if it has one, after any
    /// start under way settled and with the table no longer sending it requests.
    async fn on_container<F, Fut>(&self, slot: &Arc<Slot>, action: F) -> Result<(), PipesError>
    where
        F: FnOnce(Engine, Container) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<(), PipesError>> + Send,
    {
        self.settle(slot).await;
        self.forget(slot);
        let (engine, name) = (self.engine().clone(), self.engine().container_name(&slot.deployment));
        self.on_control(async move {
            match engine.inspect(&name).await? {
                Some(c) => action(engine, c).await,
                None => Ok(()),
            }
        })
        .await
    }

    /// Stops the deployment's container and keeps it; the next request starts it again.
    pub async fn stop(&self, slot: &Arc<Slot>) -> Result<(), PipesError> {
        self.on_container(slot, |engine, c| async move { engine.stop(&c.id, STOP_GRACE_SECS).await }).await
    }

    /// Stops and removes the deployment's container; its config stays.
    pub async fn remove(&self, slot: &Arc<Slot>) -> Result<(), PipesError> {
        self.on_container(slot, |engine, c| async move { engine.remove(&c.id).await }).await
    }

    /// Restarts the deployment's container (or starts one) and waits until it answers.
    pub async fn restart(&self, slot: &Arc<Slot>) -> StartResult {
        self.on_container(slot, |engine, c| async move {
            if c.running {
                engine.restart(&c.id, STOP_GRACE_SECS).await
            } else {
                Ok(())
            }
        })
        .await?;
        self.ready(slot).await
    }

    /// Replaces the deployment's container with one made from its current config.
    pub async fn recreate(&self, slot: &Arc<Slot>) -> StartResult {
        self.remove(slot).await?;
        self.ready(slot).await
    }

    /// Stops containers idle for longer than their `idle_timeout`.
    pub fn stop_idle(self: &Arc<Self>) {
        let now = now_ms();
        for slot in self.table.load().values() {
            let Some(up) = slot.ready() else { continue };
            let Some(idle) = up.idle_timeout else { continue };
            let last = slot.last_request_ms().unwrap_or(0).max(up.ready_ms);
            if now.saturating_sub(last) < u64::try_from(idle.as_millis()).unwrap_or(u64::MAX) {
                continue;
            }
            log::info!("{}: idle for {}, stopping its container", slot.deployment, humantime::format_duration(idle));
            let (fleet, slot) = (self.clone(), slot.clone());
            self.control.spawn(async move {
                if let Err(e) = fleet.stop(&slot).await {
                    log::warn!("{}: cannot stop idle container: {e}", slot.deployment);
                }
            });
        }
    }

    /// Starts a deployment, or joins the start already under way.
    async fn start(&self, slot: &Arc<Slot>) -> StartResult {
        let start = {
            let mut cold = slot.lock_cold();
            if let Some(up) = slot.ready() {
                return Ok(up);
            }
            if let Some((at, error)) = &cold.failed {
                if at.elapsed() < self.failure_ttl {
                    return Err(error.clone());
                }
            }
            match &cold.starting {
                Some(start) => start.clone(),
                None => {
                    let start = self.spawn_start(slot.clone());
                    cold.starting = Some(start.clone());
                    start
                }
            }
        };
        start.await
    }

    fn spawn_start(&self, slot: Arc<Slot>) -> Start {
        let deployer = self.deployer.clone();
        let task = self.control.spawn(async move {
            let began = Instant::now();
            let result = deployer.deploy(&slot.deployment).await.map(Arc::new);
            let mut cold = slot.lock_cold();
            cold.starting = None;
            match &result {
                Ok(up) => {
                    log::info!("{}: ready at {} in {:?}", slot.deployment, up.addr, began.elapsed());
                    cold.failed = None;
                    slot.ready.store(Some(up.clone()));
                }
                Err(e) => {
                    log::warn!("{}: start failed after {:?}: {e}", slot.deployment, began.elapsed());
                    cold.failed = Some((Instant::now(), e.clone()));
                }
            }
            result
        });
        async move {
            task.await.unwrap_or_else(|e| {
                Err(PipesError::Engine { action: "start the deployment", detail: format!("start task failed: {e}") })
            })
        }
        .boxed()
        .shared()
    }

    /// Drops slots with no running container, no start under way and no failure
    /// still remembered, so host names that never became deployments do not
    /// accumulate. A dropped deployment is found again by its container name.
    pub fn sweep(&self) -> usize {
        let _grow = self.grow.lock().unwrap_or_else(PoisonError::into_inner);
        let table = self.table.load();
        let idle = |slot: &Slot| {
            let cold = slot.lock_cold();
            slot.ready().is_none()
                && cold.starting.is_none()
                && cold.failed.as_ref().is_none_or(|(at, _)| at.elapsed() >= self.failure_ttl)
        };
        let keep: Table = table.iter().filter(|(_, s)| !idle(s)).map(|(d, s)| (d.clone(), s.clone())).collect();
        let dropped = table.len() - keep.len();
        if dropped > 0 {
            self.table.store(Arc::new(keep));
        }
        dropped
    }

    /// Runs engine work on the control runtime, where the engine connection lives.
    pub async fn on_control<F, T>(&self, work: F) -> Result<T, PipesError>
    where
        F: std::future::Future<Output = Result<T, PipesError>> + Send + 'static,
        T: Send + 'static,
    {
        self.control.spawn(work).await.unwrap_or_else(|e| {
            Err(PipesError::Engine { action: "finish an engine call", detail: format!("task failed: {e}") })
        })
    }

    /// Takes over the containers this instance left running or stopped.
    pub async fn adopt(&self) -> Result<usize, PipesError> {
        let engine = self.engine();
        let mut adopted = 0;
        for (d, id) in engine.managed(true).await? {
            let slot = self.slot(d.as_ref());
            if let Some(container) = engine.inspect(&id).await? {
                if let (true, Some(addr)) = (container.running, container.address) {
                    let idle = self.deployer.effective(&d).ok().and_then(|c| c.idle_timeout);
                    slot.ready.store(Some(Arc::new(Upstream::new(container.id, addr, idle))));
                }
                log::info!("adopted {d} (container {}, running: {})", short_id(&id), container.running);
                adopted += 1;
            }
        }
        Ok(adopted)
    }
}

/// The first 12 characters of a container id, as `docker ps` shows it.
pub fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::{Cli, Reach, Sources};

    fn fleet(runtime: &tokio::runtime::Runtime, failure_ttl: &str) -> Fleet {
        let mut src = Sources::default();
        src.env.insert("PIPES_ALLOW".into(), "alice/*".into());
        src.env.insert("PIPES_FAILURE_TTL".into(), failure_ttl.into());
        // Any engine call would answer 503: these tests must not need one.
        src.env.insert("DOCKER_HOST".into(), "unix:///nonexistent/docker.sock".into());
        let settings = Arc::new(Settings::from_sources(Cli::default(), &src).unwrap());
        let engine = Engine::new(&settings, Reach::Published);
        Fleet::new(settings, engine, runtime.handle().clone())
    }

    fn key(text: &str) -> Deployment {
        Deployment::parse(text).unwrap()
    }

    #[test]
    fn slots_are_found_by_borrowed_keys_and_added_once() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let fleet = fleet(&rt, "10s");
        let d = key("alice/app:v1");
        assert!(fleet.get(d.as_ref()).is_none());
        let a = fleet.slot(d.as_ref());
        let b = fleet.slot(d.as_ref());
        assert!(Arc::ptr_eq(&a, &b));
        assert!(Arc::ptr_eq(&fleet.get(d.as_ref()).unwrap(), &a));
        assert_eq!(fleet.slots().len(), 1);
        assert!(fleet.allows(d.as_ref()));
        assert!(!fleet.allows(key("bob/app:v1").as_ref()));
    }

    #[test]
    fn sweep_keeps_running_and_recently_failed_slots() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let fleet = fleet(&rt, "1h");
        let running = fleet.slot(key("alice/run:v1").as_ref());
        running.ready.store(Some(Arc::new(Upstream::new("c1".into(), "127.0.0.1:1".parse().unwrap(), None))));
        let failed = fleet.slot(key("alice/fail:v1").as_ref());
        failed.lock_cold().failed = Some((Instant::now(), PipesError::ImageNotFound { image: "x".into() }));
        fleet.slot(key("alice/idle:v1").as_ref());

        assert_eq!(fleet.sweep(), 1);
        let left: Vec<String> = fleet.slots().iter().map(|s| s.deployment.to_string()).collect();
        assert_eq!(left, ["alice/fail:v1", "alice/run:v1"]);
        assert!(matches!(failed.state(), SlotState::Failed(_)));
        assert!(matches!(running.state(), SlotState::Running(_)));
    }

    #[test]
    fn a_remembered_failure_is_answered_without_the_engine() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let fleet = fleet(&rt, "1h");
        let slot = fleet.slot(key("alice/app:v1").as_ref());
        let error = PipesError::ImageNotFound { image: "alice/app:v1".into() };
        slot.lock_cold().failed = Some((Instant::now(), error.clone()));
        // Asking the (absent) engine would be a 503: the answer is the remembered 404.
        assert_eq!(rt.block_on(fleet.ready(&slot)).unwrap_err(), error);
    }
}

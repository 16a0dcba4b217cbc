//! Step 3 of the request path: the table of deployments, and who starts them.
//!
//! The table is a copy-on-write map behind an `ArcSwap`: a request reads it
//! without taking any lock, and finds a [`Slot`] whose upstream is one more
//! atomic load. Only new deployments (cold path) copy the map.
//!
//! A cold start runs as a task on the control runtime, not inside the request
//! that caused it, so a client that hangs up does not cancel a start that
//! others wait on. Every request for a starting deployment awaits the same
//! task. Every backend call runs on the control runtime too: that is where the
//! backend's connection lives, and no proxy thread ever waits on it.

mod deploy;
pub mod feed;
mod janitor;
mod probe;
mod slot;
mod watch;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::hash::BuildHasher;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use futures_util::future::FutureExt;

use crate::auth::ScopedToken;
use crate::config::{DeployConfig, Effective, IdleAction};
use crate::engine::{short_id, Backend, Event, EventKind, Image, Instance, Quiet};
use crate::error::PipesError;
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::route::{Deployment, DeploymentRef};
use crate::settings::Settings;
use crate::store::Store;
use deploy::Deployer;
use feed::Feed;
use slot::{now_ms, Start};

pub use feed::{Happening, What};
pub use janitor::Janitor;
pub use slot::{Activity, OpenCount, Slot, StartResult, Upstream};
pub use watch::Watcher;

/// Keys are shared with nothing but cheap to copy: growing the table copies
/// pointers, not names.
type Table = hashbrown::HashMap<Arc<Deployment>, Arc<Slot>>;

/// Images the registry did not have, remembered at most this many at once.
const MAX_MISSING: usize = 4096;
/// How long an exiting Pipes waits for the engine to drop its claim.
const RELEASE_WAIT: Duration = Duration::from_secs(3);
/// Another Pipes that reported a draining generation busy this recently
/// still has something open on it (it reports every [`SHARE_EVERY`]).
const DRAINING_ELSEWHERE: Duration = Duration::from_secs(5);
/// How often, at most, a deployment's activity here is reported to the
/// other Pipes serving it while it goes on (a quarter of its idle timeout
/// when that is longer): each report is a write to the engine.
const SHARE_EVERY: Duration = Duration::from_secs(2);

/// What a deployment is doing, as the API and its users see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Its instance runs.
    Running,
    /// A start is under way.
    Starting,
    /// Its instance is paused: it holds its memory, and the next request
    /// thaws it in milliseconds.
    Paused,
    /// Its instance exists and does not run.
    Stopped,
    /// It has no instance.
    Absent,
    /// Its last start failed (remembered for `PIPES_FAILURE_TTL`).
    Failed,
}

impl State {
    /// The one rule for every view: a start under way wins, then the backend's
    /// word on the instance, then a remembered failure.
    fn of(slot: Option<&Slot>, instance: Option<&Instance>, failed: bool) -> State {
        if slot.is_some_and(Slot::starting) {
            return State::Starting;
        }
        match instance {
            Some(i) if i.running => State::Running,
            Some(i) if i.paused => State::Paused,
            _ if failed => State::Failed,
            Some(_) => State::Stopped,
            None => State::Absent,
        }
    }

    /// The name the API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Running => "running",
            State::Starting => "starting",
            State::Paused => "paused",
            State::Stopped => "stopped",
            State::Absent => "absent",
            State::Failed => "failed",
        }
    }
}

/// Everything known of one deployment.
#[derive(Debug)]
pub struct Status {
    pub deployment: Deployment,
    pub state: State,
    /// The full image reference.
    pub image_ref: String,
    /// The image as the backend has it locally.
    pub image: Option<Image>,
    pub allowed: bool,
    /// The current generation.
    pub instance: Option<Instance>,
    /// The generation kept for a rollback.
    pub previous: Option<Instance>,
    /// Where requests go, if the table has an upstream.
    pub upstream: Option<SocketAddr>,
    pub last_request_ms: Option<u64>,
    /// Requests, upgraded connections and streams open on the upstream.
    pub open_connections: usize,
    /// When it counts as idle (Unix ms): `None` while something is open or
    /// without an idle timeout.
    pub idle_at_ms: Option<u64>,
    pub idle_timeout: Option<Duration>,
    /// The effective config, or why it cannot be read.
    pub config: Result<Effective, PipesError>,
    /// The current generation was made from another config than the
    /// effective one (a restart applies it).
    pub config_pending: bool,
    /// The failure of the last start, while it is remembered.
    pub last_error: Option<PipesError>,
}

/// One line of the fleet's list.
#[derive(Debug)]
pub struct Summary {
    pub deployment: Deployment,
    pub state: State,
    pub instance_id: Option<String>,
    pub upstream: Option<SocketAddr>,
    pub last_request_ms: Option<u64>,
}

/// One generation, as a redeploy reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    pub instance: Option<String>,
    pub digest: Option<String>,
}

/// What a redeploy or rollback did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Switch {
    /// The tag still names what serves.
    Unchanged(Generation),
    /// `current` serves now; `previous` drains and is kept stopped.
    Replaced { previous: Generation, current: Generation },
}

/// A deployment's config layers and their merge.
#[derive(Debug)]
pub struct Configs {
    pub own: Option<DeployConfig>,
    pub repository: Option<DeployConfig>,
    pub effective: Effective,
}

/// Every deployment Pipes knows, and the means to start and operate them.
pub struct Fleet {
    table: ArcSwap<Table>,
    /// Serializes additions to the table (cold path only).
    grow: Mutex<()>,
    policy: Policy,
    failure_ttl: Duration,
    drain_timeout: Duration,
    deployer: Arc<Deployer>,
    /// The runtime that runs starts and backend calls.
    control: tokio::runtime::Handle,
    /// Set when this process hands over or stops: it no longer stops idle
    /// deployments or watches tags, which the next process does.
    retired: AtomicBool,
    /// `PIPES_MAX_NOT_RUNNING`.
    max_not_running: usize,
    /// Instances this Pipes paused (or found paused), by id.
    paused: Mutex<HashMap<String, Paused>>,
    /// `PIPES_MAX_PAUSED`.
    max_paused: usize,
    /// Images the registry did not have, and when it said so: kept apart from
    /// the table, so that names of images that do not exist hold no slot.
    missing: Mutex<hashbrown::HashMap<Deployment, Instant>>,
    /// Deployments each client address waits on a start of, and how many of
    /// its requests wait on each (`PIPES_MAX_STARTS_PER_CLIENT`).
    starts: Arc<Mutex<Starts>>,
    max_starts_per_client: usize,
    /// What is counted for Prometheus, when `PIPES_METRICS_LISTEN` is set.
    metrics: Option<Arc<Metrics>>,
    /// What happens to deployments, for whoever follows.
    feed: Feed,
}

type Starts = HashMap<IpAddr, HashMap<Deployment, usize>>;

/// A paused instance: whose, since when, and for how long at most.
#[derive(Debug, Clone)]
struct Paused {
    deployment: Deployment,
    since: Instant,
    timeout: Duration,
}

/// A request of one client waiting on a deployment's start; ends when dropped.
pub struct ClientStart {
    starts: Arc<Mutex<Starts>>,
    client: IpAddr,
    deployment: Deployment,
}

impl Drop for ClientStart {
    fn drop(&mut self) {
        let mut starts = self.starts.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(waiting) = starts.get_mut(&self.client) else { return };
        if let Some(n) = waiting.get_mut(&self.deployment) {
            *n -= 1;
            if *n == 0 {
                waiting.remove(&self.deployment);
            }
        }
        if waiting.is_empty() {
            starts.remove(&self.client);
        }
    }
}

impl Fleet {
    /// A fleet deploying on `backend` with configs from `store`, running its
    /// work on the `control` runtime.
    pub fn new(settings: &Settings, backend: Arc<dyn Backend>, store: Store, control: tokio::runtime::Handle) -> Self {
        let metrics = settings.metrics.as_ref().map(|m| Arc::new(Metrics::new(m.max_deployments)));
        let feed = Feed::default();
        Fleet {
            table: ArcSwap::from_pointee(Table::new()),
            grow: Mutex::new(()),
            policy: settings.policy.clone(),
            failure_ttl: settings.failure_ttl,
            drain_timeout: settings.drain_timeout,
            deployer: Arc::new(Deployer::new(backend, store, settings, metrics.clone(), feed.clone())),
            control,
            retired: AtomicBool::new(false),
            max_not_running: settings.max_not_running,
            paused: Mutex::new(HashMap::new()),
            max_paused: settings.max_paused,
            missing: Mutex::new(hashbrown::HashMap::new()),
            starts: Arc::new(Mutex::new(HashMap::new())),
            max_starts_per_client: settings.max_starts_per_client,
            metrics,
            feed,
        }
    }

    /// What happens to deployments from now on.
    pub fn follow(&self) -> tokio::sync::broadcast::Receiver<Arc<Happening>> {
        self.feed.follow()
    }

    /// What happened to `d` since its start under way began.
    pub fn this_start(&self, d: &Deployment) -> Vec<Arc<Happening>> {
        self.feed.this_start(d)
    }

    /// The state of `slot` as the table alone tells it, without asking the
    /// backend: `stopped` covers deployments whose instance is stopped or
    /// gone. For metrics, read at every scrape.
    pub fn table_state(&self, slot: &Slot) -> &'static str {
        if slot.upstream().is_some() {
            "running"
        } else if slot.starting() {
            "starting"
        } else if slot.failure(self.failure_ttl).is_some() {
            "failed"
        } else {
            "stopped"
        }
    }

    /// The state of `d` and its remembered failure as the table alone tells
    /// them, without asking the backend (see [`Fleet::table_state`]).
    pub fn table_view(&self, d: DeploymentRef<'_>) -> (&'static str, Option<PipesError>) {
        match self.get(d) {
            Some(slot) => (self.table_state(&slot), slot.failure(self.failure_ttl)),
            None => match self.missing(d) {
                Some(e) => ("failed", Some(e)),
                None => ("stopped", None),
            },
        }
    }

    /// What is counted for Prometheus, if metrics are on.
    pub fn metrics(&self) -> Option<&Arc<Metrics>> {
        self.metrics.as_ref()
    }

    /// The remembered answer for `d` if the registry did not have its image
    /// within `PIPES_FAILURE_TTL`: answered without the engine or a slot.
    pub fn missing(&self, d: DeploymentRef<'_>) -> Option<PipesError> {
        let missing = self.missing.lock().unwrap_or_else(PoisonError::into_inner);
        let (key, at) = missing.get_key_value(&d)?;
        (at.elapsed() < self.failure_ttl).then(|| PipesError::ImageNotFound { image: self.deployer.image_ref(key) })
    }

    /// `Ok` if `d` may run here and its image exists: it runs, or the
    /// registry has it (one manifest request, nothing pulled). Decides whether
    /// a certificate may be obtained for `d`'s host, so that names a scanner
    /// makes up cost the certificate authority nothing.
    pub async fn check_exists(&self, d: &Deployment) -> Result<(), PipesError> {
        self.check_allowed(d)?;
        if let Some(missing) = self.missing(d.as_ref()) {
            return Err(missing);
        }
        if self.serving(d.as_ref()) {
            return Ok(());
        }
        let deployer = self.deployer.clone();
        let reference = deployer.image_ref(d);
        let asked = self.control.spawn(async move { deployer.backend().registry_digest(&reference).await }).await;
        match asked {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => {
                if matches!(e, PipesError::ImageNotFound { .. }) {
                    self.remember_missing(d);
                }
                Err(e)
            }
            Err(join) => Err(PipesError::Engine { action: "ask the registry for an image", detail: join.to_string() }),
        }
    }

    /// Remembers that the registry has no image for `d`, and takes `d` out of
    /// the table.
    fn remember_missing(&self, d: &Deployment) {
        {
            let mut missing = self.missing.lock().unwrap_or_else(PoisonError::into_inner);
            if missing.len() >= MAX_MISSING {
                missing.retain(|_, at| at.elapsed() < self.failure_ttl);
                if missing.len() >= MAX_MISSING {
                    // A flood of names: forget the oldest half.
                    let mut ages: Vec<Instant> = missing.values().copied().collect();
                    ages.sort_unstable();
                    let cut = ages[ages.len() / 2];
                    missing.retain(|_, at| *at > cut);
                }
            }
            missing.insert(d.clone(), Instant::now());
        }
        let _grow = self.grow.lock().unwrap_or_else(PoisonError::into_inner);
        let table = self.table.load();
        if let Some(slot) = table.get(&d.as_ref()) {
            let idle = slot.upstream().is_none() && !slot.starting();
            if idle {
                let mut next = Table::clone(&table);
                next.remove(&d.as_ref());
                self.table.store(Arc::new(next));
            }
        }
    }

    /// Lets `client` wait on the start of `d`, unless it waits on the starts
    /// of `PIPES_MAX_STARTS_PER_CLIENT` other deployments already: a flood of
    /// names from one address cannot take every start from others, while any
    /// number of its requests may wait on one start.
    pub fn client_start(&self, client: IpAddr, d: &Deployment) -> Result<ClientStart, PipesError> {
        let mut starts = self.starts.lock().unwrap_or_else(PoisonError::into_inner);
        let waiting = starts.entry(client).or_default();
        if !waiting.contains_key(d) && waiting.len() >= self.max_starts_per_client {
            return Err(PipesError::TooManyStarts { max: self.max_starts_per_client });
        }
        *waiting.entry(d.clone()).or_insert(0) += 1;
        Ok(ClientStart { starts: self.starts.clone(), client, deployment: d.clone() })
    }

    /// Stops this fleet's upkeep (idle stops, tag watching, adoption), as the
    /// process is about to hand over to another or stop.
    pub fn retire(&self) {
        if !self.retired.swap(true, Ordering::AcqRel) {
            log::info!("stopping or handing over: no more idle stops or tag checks from this process");
        }
    }

    /// Claims `PIPES_INSTANCE` on the engine: who holds it, if another live
    /// Pipes does (see [`Backend::claim`]).
    pub async fn claim(&self, beside: bool) -> Result<Option<String>, PipesError> {
        let deployer = self.deployer.clone();
        self.on_control(async move { deployer.backend().claim(beside).await }).await
    }

    /// Renews the claim on the instance name, in the background.
    pub fn renew_claim(self: &Arc<Self>) {
        if self.retired() {
            return;
        }
        let deployer = self.deployer.clone();
        self.control.spawn(async move {
            if let Err(e) = deployer.backend().claim(true).await {
                log::warn!("cannot renew the claim on this instance name: {e}");
            }
        });
    }

    /// Lets the claim go, waiting a little for the engine; for the threads
    /// that end the process.
    pub fn release_claim(&self) {
        let deployer = self.deployer.clone();
        // The timer is made inside: it needs the runtime that `block_on` enters.
        let release = async move { tokio::time::timeout(RELEASE_WAIT, deployer.backend().release()).await };
        if self.control.block_on(release).is_err() {
            log::warn!("the engine did not confirm the release of this instance name");
        }
    }

    /// Whether this process is stopping or handing over.
    pub fn retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// Whether the policy lets `d` run here.
    #[inline]
    pub fn allows(&self, d: DeploymentRef<'_>) -> bool {
        self.policy.allows(d)
    }

    /// `Ok` if the policy lets `d` run here, else 403.
    pub fn check_allowed(&self, d: &Deployment) -> Result<(), PipesError> {
        if self.allows(d.as_ref()) {
            Ok(())
        } else {
            Err(PipesError::Forbidden { deployment: d.to_string() })
        }
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
        self.insert(d)
    }

    /// The slot of a deployment a request names, added to the table if new —
    /// unless `PIPES_MAX_NOT_RUNNING` slots that do not run are there already
    /// (after a sweep): then 503.
    pub fn slot_for_request(&self, d: DeploymentRef<'_>) -> Result<Arc<Slot>, PipesError> {
        if let Some(slot) = self.get(d) {
            return Ok(slot);
        }
        let _grow = self.grow.lock().unwrap_or_else(PoisonError::into_inner);
        let not_running = |table: &Table| table.values().filter(|s| s.upstream().is_none()).count();
        if not_running(&self.table.load()) >= self.max_not_running {
            self.sweep_locked();
            if not_running(&self.table.load()) >= self.max_not_running {
                return Err(PipesError::TooManyNotRunning { max: self.max_not_running });
            }
        }
        Ok(self.insert(d))
    }

    /// Adds `d` to the table (or finds it); the caller holds `grow`.
    fn insert(&self, d: DeploymentRef<'_>) -> Arc<Slot> {
        let table = self.table.load();
        if let Some(slot) = table.get(&d) {
            return slot.clone();
        }
        let d = d.to_owned();
        let metrics = self.metrics.as_ref().map(|m| m.deployment(&d));
        let slot = Arc::new(Slot::new(d, metrics));
        let mut next = Table::clone(&table);
        next.insert(Arc::new(slot.deployment.clone()), slot.clone());
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
    pub async fn ready(self: &Arc<Self>, slot: &Arc<Slot>) -> StartResult {
        if let Some(up) = slot.upstream() {
            return Ok(up);
        }
        self.start(slot).await
    }

    /// After `failed` refused a connection: forget it and start the deployment again.
    pub async fn recover(self: &Arc<Self>, slot: &Arc<Slot>, failed: SocketAddr) -> StartResult {
        {
            let _cold = slot.lock_cold();
            if slot.upstream().is_some_and(|up| up.addr == failed) {
                log::info!("{}: upstream {failed} stopped answering, starting it again", slot.deployment);
                slot.set_upstream(None);
            }
        }
        self.ready(slot).await
    }

    /// Runs `op` on the deployer for `d` on the control runtime, after any
    /// other operation on `d` (a start among them) ended and with the table no
    /// longer sending it requests.
    async fn operate<F, Fut>(&self, d: &Deployment, op: F) -> Result<(), PipesError>
    where
        F: FnOnce(Arc<Deployer>, Deployment) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), PipesError>> + Send + 'static,
    {
        let slot = self.slot(d.as_ref());
        let (deployer, d) = (self.deployer.clone(), d.clone());
        self.on_control(async move {
            let _op = slot.ops.lock().await;
            slot.forget();
            op(deployer, d).await
        })
        .await
    }

    /// Stops the deployment's instance and keeps it; the next request starts it again.
    pub async fn stop(&self, d: &Deployment) -> Result<(), PipesError> {
        self.operate(d, |deployer, d| async move { deployer.stop(&d).await }).await
    }

    /// Stops and removes the deployment's instance; its config stays.
    pub async fn remove(&self, d: &Deployment) -> Result<(), PipesError> {
        self.operate(d, |deployer, d| async move { deployer.remove(&d).await }).await
    }

    /// Restarts the deployment's instance (or starts one) and waits until it answers.
    pub async fn restart(self: &Arc<Self>, d: &Deployment) -> StartResult {
        self.operate(d, |deployer, d| async move { deployer.restart(&d).await }).await?;
        self.ready(&self.slot(d.as_ref())).await
    }

    /// Replaces the deployment's instance with one made from its current config.
    pub async fn recreate(self: &Arc<Self>, d: &Deployment) -> StartResult {
        self.remove(d).await?;
        self.ready(&self.slot(d.as_ref())).await
    }

    /// Stops instances that have had nothing open for their `idle_timeout`;
    /// the stops run on the control runtime.
    pub fn stop_idle(self: &Arc<Self>) {
        if self.retired() {
            return;
        }
        let now = now_ms();
        for slot in self.table.load().values() {
            let Some(up) = slot.upstream() else { continue };
            if slot.idle_at_ms(&up).is_none_or(|at| now < at) {
                continue;
            }
            let (fleet, slot) = (self.clone(), slot.clone());
            self.control.spawn(async move { fleet.stop_if_idle(&slot, up).await });
        }
    }

    /// Reports what this Pipes had open lately to the other Pipes serving
    /// the same instances (Swarm replicas), so none of them stops what
    /// another serves: while traffic goes on, every quarter of the
    /// deployment's idle timeout ([`SHARE_EVERY`] at least), and at the next
    /// check after a quiet spell.
    pub fn share_activity(self: &Arc<Self>) {
        let backend = self.deployer.backend();
        if !backend.shared() || self.retired() {
            return;
        }
        let now = now_ms();
        for slot in self.table.load().values() {
            // Without an idle timeout nobody stops it for being idle: nothing to tell.
            let Some(up) = slot.upstream() else { continue };
            let Some(idle) = up.idle_timeout else { continue };
            let every = u64::try_from((idle / 4).max(SHARE_EVERY).as_millis()).unwrap_or(u64::MAX);
            let Some(at) = slot.activity_to_share(&up, now, every) else { continue };
            let (backend, d) = (backend.clone(), slot.deployment.clone());
            self.control.spawn(async move {
                if let Err(e) = backend.share_activity(&up.instance_id, at).await {
                    log::warn!("{d}: cannot share its activity with the other Pipes: {e}");
                }
            });
        }
    }

    /// Stops `seen` if it is still the deployment's upstream and still idle,
    /// here and at every other Pipes serving it.
    async fn stop_if_idle(&self, slot: &Slot, seen: Arc<Upstream>) {
        // Something else changing the deployment wins; the next check sees it anew.
        let Ok(_op) = slot.ops.try_lock() else { return };
        let backend = self.deployer.backend();
        let quiet = match backend.quiet_elsewhere(&seen.instance_id, seen.idle_timeout.unwrap_or_default()).await {
            Ok(Quiet::Since(token)) => token,
            Ok(Quiet::Busy(at)) => {
                log::debug!("{}: busy through another Pipes: not idle", slot.deployment);
                return slot.busy_elsewhere(at);
            }
            Err(e) => return log::warn!("{}: cannot ask the other Pipes whether it is idle: {e}", slot.deployment),
        };
        {
            let _cold = slot.lock_cold();
            let same = slot.upstream().is_some_and(|up| Arc::ptr_eq(&up, &seen));
            if !same || slot.idle_at_ms(&seen).is_none_or(|at| now_ms() < at) {
                return;
            }
            slot.set_upstream(None);
        }
        // A request that took the upstream just before it left the table keeps it.
        if seen.open() > 0 {
            slot.set_upstream(Some(seen));
            return;
        }
        let idle = seen.idle_timeout.map(humantime::format_duration).map(|i| i.to_string()).unwrap_or_default();
        if seen.idle_action == IdleAction::Pause && backend.pauses() {
            self.make_room_to_pause().await;
            log::info!("{}: nothing open for {idle}, pausing it", slot.deployment);
            match self.deployer.backend().pause(&seen.instance_id).await {
                Ok(()) => {
                    let paused = Paused { deployment: slot.deployment.clone(), since: Instant::now(), timeout: seen.pause_timeout };
                    self.paused.lock().unwrap_or_else(PoisonError::into_inner).insert(seen.instance_id.clone(), paused);
                    if let Some(m) = &slot.metrics {
                        m.idle_pause();
                    }
                    return;
                }
                Err(e) => log::warn!("{}: cannot pause idle instance, stopping it: {e}", slot.deployment),
            }
        } else {
            log::info!("{}: nothing open for {idle}, stopping it", slot.deployment);
        }
        match self.deployer.stop_idle_instance(&seen.instance_id, quiet).await {
            Ok(true) => {
                if let Some(m) = &slot.metrics {
                    m.idle_stop();
                }
            }
            // Another Pipes served it, or stopped it, meanwhile. Which one is
            // the backend's to say: the next request asks it (and finds it
            // running, or starts it).
            Ok(false) => log::info!("{}: changed by another Pipes meanwhile: not stopped here", slot.deployment),
            Err(e) => log::warn!("{}: cannot stop idle instance: {e}", slot.deployment),
        }
    }

    /// At `PIPES_MAX_PAUSED`, stops the instance paused longest.
    async fn make_room_to_pause(&self) {
        let oldest = {
            let paused = self.paused.lock().unwrap_or_else(PoisonError::into_inner);
            if paused.len() < self.max_paused {
                return;
            }
            paused.iter().min_by_key(|(_, p)| p.since).map(|(id, p)| (id.clone(), p.deployment.clone()))
        };
        if let Some((id, d)) = oldest {
            log::info!("{d}: {} instances are paused (PIPES_MAX_PAUSED): stopping {}, paused longest", self.max_paused, short_id(&id));
            self.stop_paused(&id, &d).await;
        }
    }

    /// Stops paused instances whose `pause_timeout` passed.
    pub fn expire_paused(self: &Arc<Self>) {
        if self.retired() {
            return;
        }
        let expired: Vec<(String, Deployment)> = self
            .paused
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(_, p)| p.since.elapsed() >= p.timeout)
            .map(|(id, p)| (id.clone(), p.deployment.clone()))
            .collect();
        for (id, d) in expired {
            let fleet = self.clone();
            self.control.spawn(async move {
                log::info!("{d}: paused for its pause_timeout, stopping instance {}", short_id(&id));
                fleet.stop_paused(&id, &d).await;
            });
        }
    }

    /// Stops a paused instance, unless a start of its deployment thawed it first.
    async fn stop_paused(&self, id: &str, d: &Deployment) {
        let slot = self.slot(d.as_ref());
        let _op = slot.ops.lock().await;
        if self.paused.lock().unwrap_or_else(PoisonError::into_inner).remove(id).is_none() {
            return;
        }
        if let Err(e) = self.deployer.stop_instance(id).await {
            log::warn!("{d}: cannot stop paused instance {}: {e}", short_id(id));
        }
    }

    /// Forgets that `id` is paused (it was thawed, stopped or removed).
    fn unpaused(&self, id: &str) {
        self.paused.lock().unwrap_or_else(PoisonError::into_inner).remove(id);
    }

    /// The deployments with a paused instance.
    pub fn paused_deployments(&self) -> HashSet<Deployment> {
        self.paused.lock().unwrap_or_else(PoisonError::into_inner).values().map(|p| p.deployment.clone()).collect()
    }

    /// Asks the registry for the tag of every running deployment whose
    /// `watch` interval passed, and redeploys those whose tag moved. Each
    /// deployment asks at most once per interval, jittered by up to ±10 %.
    pub fn poll_tags(self: &Arc<Self>) {
        if self.retired() {
            return;
        }
        let now = now_ms();
        for slot in self.table.load().values() {
            let Some(every) = slot.upstream().and_then(|up| up.watch) else { continue };
            let every_ms = u64::try_from(every.as_millis()).unwrap_or(u64::MAX);
            let jitter = std::collections::hash_map::RandomState::new().hash_one((now, &slot.deployment)) % 200;
            let next = now.saturating_add(every_ms.saturating_mul(900 + jitter) / 1000);
            let due = slot.next_watch_ms.load(Ordering::Relaxed);
            if due == 0 {
                // First sight: the first check is one interval away.
                slot.next_watch_ms.store(next, Ordering::Relaxed);
                continue;
            }
            if now < due {
                continue;
            }
            slot.next_watch_ms.store(next, Ordering::Relaxed);
            self.redeploy_later(slot.deployment.clone(), "tag check");
        }
    }

    /// Moves `d` to what its tag names now: a new generation beside the
    /// current one, probed, switched to, and the old one drained and kept.
    /// A new generation that fails leaves the current one serving.
    pub async fn redeploy(self: &Arc<Self>, d: &Deployment) -> Result<Switch, PipesError> {
        let (fleet, slot) = (self.clone(), self.slot(d.as_ref()));
        self.on_control(async move {
            let _op = slot.ops.lock().await;
            let d = &slot.deployment;
            let serving = slot.upstream();
            let was = match &serving {
                Some(up) => Generation { instance: Some(up.instance_id.clone()), digest: up.digest.clone() },
                None => {
                    let (now, _) = fleet.deployer.generations(d).await?;
                    Generation { instance: now.as_ref().map(|i| i.id.clone()), digest: now.and_then(|i| i.digest) }
                }
            };
            let next = fleet.deployer.next_generation(d, was.digest.as_deref()).await;
            if let Some(m) = &slot.metrics {
                m.redeploy(match &next {
                    Ok(None) => "unchanged",
                    Ok(Some(_)) => "switched",
                    Err(e) => e.kind(),
                });
            }
            match next? {
                None => Ok(Switch::Unchanged(was)),
                Some(next) => Ok(fleet.switch(&slot, next, was).await),
            }
        })
        .await
    }

    /// Redeploys `d` in the background (after a tag check or a push
    /// notification, which must not wait), logging the outcome.
    pub fn redeploy_later(self: &Arc<Self>, d: Deployment, cause: &'static str) {
        let fleet = self.clone();
        self.control.spawn(async move {
            match fleet.redeploy(&d).await {
                Ok(Switch::Unchanged(_)) => log::debug!("{d}: {cause}: the tag names what serves already"),
                Ok(Switch::Replaced { current, .. }) => {
                    log::info!("{d}: {cause}: the tag moved, now serving {}", current.digest.unwrap_or_default())
                }
                Err(e) => log::warn!("{d}: {cause}: redeploy failed, the current generation keeps serving: {e}"),
            }
        });
    }

    /// Whether `d` ran here before: an instance of it exists, or a config was
    /// stored for it or its repository. Pushes pull ahead only for those.
    pub async fn has_run(&self, d: &Deployment) -> bool {
        let deployer = self.deployer.clone();
        let key = d.clone();
        let instances = self.on_control(async move { deployer.backend().instances(&key).await }).await;
        if instances.is_ok_and(|i| !i.is_empty()) {
            return true;
        }
        matches!(self.configs(d).await, Ok(c) if c.own.is_some() || c.repository.is_some())
    }

    /// Pulls what `d`'s tag names now, in the background and within
    /// `PIPES_MAX_PULLS`: its next start then wakes no stale image and waits
    /// for no pull.
    pub fn prepull_later(self: &Arc<Self>, d: Deployment) {
        let deployer = self.deployer.clone();
        self.control.spawn(async move {
            match deployer.pull(&d).await {
                Ok(digest) => log::info!("{d}: push notification: pulled {digest} ahead of its next start"),
                Err(e) => log::warn!("{d}: push notification: pulling ahead failed: {e}"),
            }
        });
    }

    /// Whether `d` is served now (its upstream is in the table).
    pub fn serving(&self, d: DeploymentRef<'_>) -> bool {
        self.get(d).is_some_and(|s| s.upstream().is_some())
    }

    /// The path part of `PIPES_REGISTRY` (`team` in `registry.example.com/team`),
    /// which a registry's own notifications put before `user/repo`.
    pub fn registry_path(&self) -> Option<&str> {
        self.deployer.registry_path()
    }

    /// Brings back the generation kept before the current one.
    pub async fn rollback(self: &Arc<Self>, d: &Deployment) -> Result<Switch, PipesError> {
        let (fleet, slot) = (self.clone(), self.slot(d.as_ref()));
        self.on_control(async move {
            let _op = slot.ops.lock().await;
            let serving = slot.upstream();
            let was = Generation { instance: serving.as_ref().map(|u| u.instance_id.clone()), digest: serving.as_ref().and_then(|u| u.digest.clone()) };
            let back = fleet.deployer.previous_generation(&slot.deployment, was.instance.as_deref()).await?;
            Ok(fleet.switch(&slot, back, was).await)
        })
        .await
    }

    /// Points the table at `next`; the upstream it replaces drains and stops.
    /// The caller holds the slot's operation lock.
    async fn switch(self: &Arc<Self>, slot: &Arc<Slot>, next: Upstream, was: Generation) -> Switch {
        let next = Arc::new(next);
        let old = {
            let mut cold = slot.lock_cold();
            cold.failed = None;
            let old = slot.upstream();
            if let Some(old) = &old {
                cold.draining.push(old.instance_id.clone());
            }
            slot.set_upstream(Some(next.clone()));
            old
        };
        log::info!("{}: now served by {} ({})", slot.deployment, short_id(&next.instance_id), next.digest.as_deref().unwrap_or("no digest"));
        self.feed.tell(&slot.deployment, What::Switched { digest: next.digest.clone() });
        match old {
            Some(old) => self.drain(slot.clone(), old),
            None => self.deployer.prune(&slot.deployment, &next.instance_id, &[]).await,
        }
        Switch::Replaced { previous: was, current: Generation { instance: Some(next.instance_id.clone()), digest: next.digest.clone() } }
    }

    /// Lets what is open on `old` finish (up to `PIPES_DRAIN_TIMEOUT`), then
    /// stops it and keeps it as the previous generation.
    fn drain(self: &Arc<Self>, slot: Arc<Slot>, old: Arc<Upstream>) {
        let fleet = self.clone();
        self.control.spawn(async move {
            let deadline = tokio::time::Instant::now() + fleet.drain_timeout;
            let backend = fleet.deployer.backend().clone();
            let mut told: Option<Instant> = None;
            while old.open() > 0 && tokio::time::Instant::now() < deadline {
                // Other Pipes serving it wait for what is still open here.
                if backend.shared() && told.is_none_or(|t| t.elapsed() >= SHARE_EVERY) {
                    told = Some(Instant::now());
                    if let Err(e) = backend.share_activity(&old.instance_id, now_ms()).await {
                        log::warn!("{}: cannot tell the other Pipes it still drains: {e}", slot.deployment);
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let d = &slot.deployment;
            if old.open() > 0 {
                // WebSockets relayed to it end with a close frame (1001), then the rest is cut.
                old.going_away();
                let grace = tokio::time::Instant::now() + Duration::from_secs(1);
                while old.open() > 0 && tokio::time::Instant::now() < grace {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            // And for what other Pipes still have open on it: they followed
            // the switch a little later, so their drain ends a little later.
            let others_deadline = deadline + DRAINING_ELSEWHERE;
            while backend.shared() && tokio::time::Instant::now() < others_deadline {
                match backend.quiet_elsewhere(&old.instance_id, DRAINING_ELSEWHERE).await {
                    Ok(Quiet::Busy(_)) => tokio::time::sleep(Duration::from_secs(1)).await,
                    _ => break,
                }
            }
            match old.open() {
                0 => log::info!("{d}: instance {} drained, stopping it", short_id(&old.instance_id)),
                n => log::warn!("{d}: {n} connection(s) still open on {} after the drain timeout; stopping it", short_id(&old.instance_id)),
            }
            let _op = slot.ops.lock().await;
            if let Err(e) = fleet.deployer.stop_instance(&old.instance_id).await {
                log::warn!("{d}: cannot stop drained instance {}: {e}", short_id(&old.instance_id));
            }
            let draining = {
                let mut cold = slot.lock_cold();
                cold.draining.retain(|id| *id != old.instance_id);
                cold.draining.clone()
            };
            if let Some(current) = slot.upstream() {
                fleet.deployer.prune(d, &current.instance_id, &draining).await;
            }
        });
    }

    /// Keeps the table true to what the backend did: an instance that stopped
    /// leaves the table at once; one that started (by hand, by its restart
    /// policy) and is not served yet is probed and adopted.
    pub(crate) fn on_event(self: &Arc<Self>, event: &Event) {
        let Some(d) = &event.deployment else { return };
        if !matches!(event.kind, EventKind::Paused | EventKind::Health(_)) {
            self.unpaused(&event.id);
        }
        match &event.kind {
            kind if kind.ends_it() => {
                if let Some(slot) = self.get(d.as_ref()) {
                    if slot.retract(&event.id) {
                        log::info!("{d}: instance {} {kind:?}: no more requests go to it", short_id(&event.id));
                        let (state, why) = match kind {
                            EventKind::Paused => ("paused", "paused"),
                            EventKind::Destroyed => ("removed", "removed"),
                            EventKind::OutOfMemory => ("stopped", "out of memory"),
                            EventKind::Killed => ("stopped", "killed"),
                            EventKind::Died(_) => ("stopped", "exited"),
                            _ => ("stopped", "stopped"),
                        };
                        self.feed.tell(d, What::Left { state, why });
                    }
                }
            }
            EventKind::Started | EventKind::Unpaused => self.adopt_running(d, &event.id),
            EventKind::Health(status) => log::debug!("{d}: instance {} is {status}", short_id(&event.id)),
            _ => {}
        }
    }

    /// Level-triggered repair: drops upstreams whose instance no longer runs,
    /// and adopts running instances the table does not serve.
    pub(crate) async fn reconcile(self: &Arc<Self>) -> Result<(), PipesError> {
        let deployer = self.deployer.clone();
        let instances = self.on_control(async move { deployer.backend().list().await }).await?;
        let running: HashSet<&str> = instances.iter().filter(|i| i.running).map(|i| i.id.as_str()).collect();
        for slot in self.table.load().values() {
            if let Some(up) = slot.upstream() {
                if !running.contains(up.instance_id.as_str()) && slot.retract(&up.instance_id) {
                    log::info!("{}: instance {} no longer runs: no more requests go to it", slot.deployment, short_id(&up.instance_id));
                }
            }
        }
        for instance in instances.iter().filter(|i| i.running) {
            self.adopt_running(&instance.deployment, &instance.id);
        }
        self.note_paused(&instances);
        Ok(())
    }

    /// Keeps the record of paused instances true to the backend's list:
    /// ones paused by hand (or before a restart) time out from now.
    fn note_paused(&self, instances: &[Instance]) {
        let mut paused = self.paused.lock().unwrap_or_else(PoisonError::into_inner);
        paused.retain(|id, _| instances.iter().any(|i| i.paused && &i.id == id));
        for i in instances.iter().filter(|i| i.paused) {
            paused.entry(i.id.clone()).or_insert_with(|| Paused {
                deployment: i.deployment.clone(),
                since: Instant::now(),
                timeout: self.deployer.defaults().pause_timeout,
            });
        }
    }

    /// Starts serving `d` through the usual start (which finds its running
    /// instance and probes it), unless it is served or starting already;
    /// when another instance than `id` is served, follows the newer
    /// generation if `id` made one.
    fn adopt_running(self: &Arc<Self>, d: &Deployment, id: &str) {
        if self.retired() || !self.allows(d.as_ref()) {
            return;
        }
        let slot = self.slot(d.as_ref());
        if slot.starting() {
            return;
        }
        let fleet = self.clone();
        match slot.upstream() {
            None => {
                self.control.spawn(async move {
                    if let Err(e) = fleet.ready(&slot).await {
                        log::debug!("{}: not adopted: {e}", slot.deployment);
                    }
                });
            }
            Some(up) if up.instance_id != id => {
                let started = id.to_owned();
                self.control.spawn(async move { fleet.follow_generation(&slot, up, &started).await });
            }
            Some(_) => {}
        }
    }

    /// Serves the generation another Pipes made current (a redeploy through
    /// another replica; one started by hand), once it answers here, and
    /// drains `serving`, the one served until now.
    async fn follow_generation(self: &Arc<Self>, slot: &Arc<Slot>, serving: Arc<Upstream>, started: &str) {
        let next = match self.deployer.newer_running(&slot.deployment, &serving.instance_id, started).await {
            Ok(Some(next)) => next,
            Ok(None) => return,
            Err(e) => return log::info!("{}: a newer generation does not answer here, keeping {}: {e}", slot.deployment, short_id(&serving.instance_id)),
        };
        let _op = slot.ops.lock().await;
        // A change made here meanwhile (a redeploy, a rollback) wins.
        if !slot.upstream().is_some_and(|up| Arc::ptr_eq(&up, &serving)) {
            return;
        }
        let was = Generation { instance: Some(serving.instance_id.clone()), digest: serving.digest.clone() };
        self.switch(slot, next, was).await;
    }

    /// Starts a deployment, or joins the start already under way.
    async fn start(self: &Arc<Self>, slot: &Arc<Slot>) -> StartResult {
        if let Some(missing) = self.missing(slot.deployment.as_ref()) {
            return Err(missing);
        }
        let start = {
            let mut cold = slot.lock_cold();
            if let Some(up) = slot.upstream() {
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

    fn spawn_start(self: &Arc<Self>, slot: Arc<Slot>) -> Start {
        let (fleet, deployer) = (self.clone(), self.deployer.clone());
        let task = self.control.spawn(async move {
            let _op = slot.ops.lock().await;
            let began = Instant::now();
            // An operation that just ended may have made it serve (a rollback, an adoption).
            let result = match slot.upstream() {
                Some(up) => Ok(up),
                None => {
                    fleet.feed.tell(&slot.deployment, What::Starting { expected: slot.last_start() });
                    deployer.deploy(&slot.deployment).await.map(Arc::new)
                }
            };
            if let Some(m) = &slot.metrics {
                m.cold_start(result.as_ref().map_or_else(PipesError::kind, |_| "ready"));
            }
            let mut cold = slot.lock_cold();
            cold.starting = None;
            match &result {
                Ok(up) => {
                    fleet.unpaused(&up.instance_id);
                    let took = began.elapsed();
                    log::info!("{}: ready at {} in {took:?}", slot.deployment, up.addr);
                    slot.set_last_start(took);
                    cold.failed = None;
                    slot.set_upstream(Some(up.clone()));
                    // Told once a request would be served: the waiting page moves on at this.
                    fleet.feed.tell(&slot.deployment, What::Ready { took });
                }
                Err(e) => {
                    log::warn!("{}: start failed after {:?}: {e}", slot.deployment, began.elapsed());
                    fleet.feed.tell(&slot.deployment, What::Failed { error: e.clone() });
                    match e {
                        PipesError::ImageNotFound { .. } => {
                            drop(cold);
                            fleet.remember_missing(&slot.deployment);
                        }
                        // A passing engine trouble is not the deployment's: the next request tries again.
                        e if e.remembered() => cold.failed = Some((Instant::now(), e.clone())),
                        _ => {}
                    }
                }
            }
            result
        });
        async move { task.await.unwrap_or_else(|e| Err(PipesError::Engine { action: "start the deployment", detail: format!("start task failed: {e}") })) }
            .boxed()
            .shared()
    }

    /// Drops slots with no upstream, no start under way and no failure still
    /// remembered, so host names that never became deployments do not
    /// accumulate. A dropped deployment is found again through the backend.
    pub fn sweep(&self) -> usize {
        let _grow = self.grow.lock().unwrap_or_else(PoisonError::into_inner);
        self.missing.lock().unwrap_or_else(PoisonError::into_inner).retain(|_, at| at.elapsed() < self.failure_ttl);
        self.sweep_locked()
    }

    /// The sweep, with `grow` held by the caller.
    fn sweep_locked(&self) -> usize {
        let table = self.table.load();
        let idle = |slot: &Slot| {
            let cold = slot.lock_cold();
            slot.upstream().is_none() && cold.starting.is_none() && cold.failed.as_ref().is_none_or(|(at, _)| at.elapsed() >= self.failure_ttl)
        };
        let keep: Table = table.iter().filter(|(_, s)| !idle(s)).map(|(d, s)| (d.clone(), s.clone())).collect();
        let dropped = table.len() - keep.len();
        if dropped > 0 {
            self.table.store(Arc::new(keep));
        }
        dropped
    }

    /// Runs backend work on the control runtime, where the backend's connection lives.
    async fn on_control<F, T>(&self, work: F) -> Result<T, PipesError>
    where
        F: Future<Output = Result<T, PipesError>> + Send + 'static,
        T: Send + 'static,
    {
        self.control.spawn(work).await.unwrap_or_else(|e| Err(PipesError::Engine { action: "finish an engine call", detail: format!("task failed: {e}") }))
    }

    /// Takes over the instances this Pipes left running or stopped: the
    /// current generation of each deployment serves again at once.
    pub async fn adopt(&self) -> Result<usize, PipesError> {
        let deployer = self.deployer.clone();
        let listed = self.on_control(async move { deployer.backend().list().await }).await?;
        self.note_paused(&listed);
        let mut deployments: Vec<&Deployment> = listed.iter().map(|i| &i.deployment).collect();
        deployments.sort();
        deployments.dedup();
        for d in deployments {
            let (deployer, key) = (self.deployer.clone(), d.clone());
            let running = self.on_control(async move { deployer.running(&key).await }).await?;
            let slot = self.slot(d.as_ref());
            match running {
                Some(up) => {
                    log::info!("adopted {d}: instance {} serves at {}", short_id(&up.instance_id), up.addr);
                    slot.set_upstream(Some(Arc::new(up)));
                }
                None => log::info!("adopted {d}: stopped"),
            }
        }
        Ok(listed.len())
    }

    /// What the backend says it is, for the start-up log.
    pub async fn describe_backend(&self) -> Result<String, PipesError> {
        let deployer = self.deployer.clone();
        self.on_control(async move { deployer.backend().describe().await }).await
    }

    /// Config files that cannot be read, reported at start-up.
    pub async fn check_configs(&self) -> Vec<PipesError> {
        self.deployer.store().check().await
    }

    /// Everything known of `d`, from the table, the backend and the store.
    pub async fn status(&self, d: &Deployment) -> Result<Status, PipesError> {
        let (deployer, key) = (self.deployer.clone(), d.clone());
        let ((instance, previous), image, config) = self
            .on_control(async move {
                let generations = deployer.generations(&key).await?;
                let image = deployer.backend().image(&deployer.image_ref(&key)).await?;
                Ok((generations, image, deployer.effective(&key).await))
            })
            .await?;
        let slot = self.get(d.as_ref());
        let upstream = slot.as_deref().and_then(Slot::upstream);
        let last_error = slot.as_deref().and_then(|s| s.failure(self.failure_ttl)).or_else(|| self.missing(d.as_ref()));
        let config_pending = match (&instance, &config) {
            (Some(i), Ok(c)) => self.deployer.outdated(d, i, c),
            _ => false,
        };
        Ok(Status {
            deployment: d.clone(),
            state: State::of(slot.as_deref(), instance.as_ref(), last_error.is_some()),
            image_ref: self.deployer.image_ref(d),
            image,
            allowed: self.allows(d.as_ref()),
            instance,
            previous,
            upstream: upstream.as_ref().map(|u| u.addr),
            last_request_ms: slot.as_deref().and_then(Slot::last_request_ms),
            open_connections: upstream.as_ref().map_or(0, |u| u.open()),
            idle_at_ms: upstream.as_ref().and_then(|u| slot.as_deref()?.idle_at_ms(u)),
            idle_timeout: upstream.as_ref().and_then(|u| u.idle_timeout),
            config,
            config_pending,
            last_error,
        })
    }

    /// Every deployment with an instance or a place in the table, sorted.
    pub async fn summaries(&self) -> Result<Vec<Summary>, PipesError> {
        let deployer = self.deployer.clone();
        let instances = self.on_control(async move { deployer.backend().list().await }).await?;
        let mut keys: Vec<Deployment> = instances.iter().map(|i| i.deployment.clone()).collect();
        keys.extend(self.slots().iter().map(|s| s.deployment.clone()));
        keys.sort();
        keys.dedup();
        Ok(keys
            .into_iter()
            .map(|d| {
                let slot = self.get(d.as_ref());
                let mine: Vec<Instance> = instances.iter().filter(|i| i.deployment == d).cloned().collect();
                let instance = crate::engine::current(&mine);
                // A name whose image the registry did not have says so, as `GET container` does.
                let failed = slot.as_deref().and_then(|s| s.failure(self.failure_ttl)).is_some() || self.missing(d.as_ref()).is_some();
                Summary {
                    state: State::of(slot.as_deref(), instance, failed),
                    instance_id: instance.map(|i| i.id.clone()),
                    upstream: slot.as_deref().and_then(Slot::upstream).map(|u| u.addr),
                    last_request_ms: slot.as_deref().and_then(Slot::last_request_ms),
                    deployment: d,
                }
            })
            .collect())
    }

    /// `d`'s own config, its repository's, and what they merge to.
    pub async fn configs(&self, d: &Deployment) -> Result<Configs, PipesError> {
        let store = self.deployer.store();
        Ok(Configs { own: store.tag(d).await?, repository: store.repository(&d.user, &d.repo).await?, effective: self.deployer.effective(d).await? })
    }

    /// The default config of `d`'s repository.
    pub async fn repository_config(&self, d: &Deployment) -> Result<Option<DeployConfig>, PipesError> {
        self.deployer.store().repository(&d.user, &d.repo).await
    }

    /// Replaces `d`'s own config; its instance is not touched.
    /// Refused (422) above the operator's ceilings.
    pub async fn put_config(&self, d: &Deployment, config: DeployConfig) -> Result<(), PipesError> {
        self.deployer.check_ceilings(&config)?;
        self.deployer.store().put_tag(d, config).await
    }

    /// Replaces the default config of `d`'s repository, and forgets the
    /// remembered failures of its deployments: the next request tries again.
    /// Refused (422) above the operator's ceilings.
    pub async fn put_repository_config(&self, d: &Deployment, config: DeployConfig) -> Result<(), PipesError> {
        self.deployer.check_ceilings(&config)?;
        self.deployer.store().put_repository(&d.user, &d.repo, config).await?;
        for slot in self.table.load().values() {
            if slot.deployment.user == d.user && slot.deployment.repo == d.repo {
                slot.lock_cold().failed = None;
            }
        }
        Ok(())
    }

    /// The last `lines` lines of `d`'s instance, with its id.
    pub async fn logs(&self, d: &Deployment, lines: usize) -> Result<(Option<String>, Vec<String>), PipesError> {
        let (deployer, d) = (self.deployer.clone(), d.clone());
        self.on_control(async move { deployer.logs(&d, lines).await }).await
    }

    /// The scoped API tokens of `tokens.json`.
    pub async fn tokens(&self) -> Result<Vec<ScopedToken>, PipesError> {
        self.deployer.store().tokens().await
    }
}

#[cfg(test)]
mod tests;

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
mod janitor;
mod probe;
mod slot;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use futures_util::future::FutureExt;

use crate::auth::ScopedToken;
use crate::config::{DeployConfig, Effective};
use crate::engine::{short_id, Backend, Image, Instance};
use crate::error::PipesError;
use crate::policy::Policy;
use crate::route::{Deployment, DeploymentRef};
use crate::settings::Settings;
use crate::store::Store;
use deploy::Deployer;
use slot::Start;

pub use janitor::Janitor;
pub use slot::{Slot, StartResult, Upstream};

type Table = hashbrown::HashMap<Deployment, Arc<Slot>>;

/// What a deployment is doing, as the API and its users see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Its instance runs.
    Running,
    /// A start is under way.
    Starting,
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
    fn of(slot: Option<&Slot>, instance: Option<&Instance>, failure_ttl: Duration) -> State {
        if slot.is_some_and(Slot::starting) {
            return State::Starting;
        }
        let failed = slot.and_then(|s| s.failure(failure_ttl)).is_some();
        match instance {
            Some(i) if i.running => State::Running,
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
    pub instance: Option<Instance>,
    /// Where requests go, if the table has an upstream.
    pub upstream: Option<SocketAddr>,
    pub last_request_ms: Option<u64>,
    /// The effective config, or why it cannot be read.
    pub config: Result<Effective, PipesError>,
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
    deployer: Arc<Deployer>,
    /// The runtime that runs starts and backend calls.
    control: tokio::runtime::Handle,
}

impl Fleet {
    /// A fleet deploying on `backend`, running its work on the `control` runtime.
    pub fn new(settings: &Settings, backend: Arc<dyn Backend>, control: tokio::runtime::Handle) -> Self {
        let store = Store::new(settings.config_dir.clone());
        Fleet {
            table: ArcSwap::from_pointee(Table::new()),
            grow: Mutex::new(()),
            policy: settings.policy.clone(),
            failure_ttl: settings.failure_ttl,
            deployer: Arc::new(Deployer::new(backend, store, settings)),
            control,
        }
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
        if let Some(up) = slot.upstream() {
            return Ok(up);
        }
        self.start(slot).await
    }

    /// After `failed` refused a connection: forget it and start the deployment again.
    pub async fn recover(&self, slot: &Arc<Slot>, failed: SocketAddr) -> StartResult {
        {
            let _cold = slot.lock_cold();
            if slot.upstream().is_some_and(|up| up.addr == failed) {
                log::info!("{}: upstream {failed} stopped answering, starting it again", slot.deployment);
                slot.set_upstream(None);
            }
        }
        self.ready(slot).await
    }

    /// Forgets the upstream and failure of a deployment whose instance is
    /// about to change: the next request asks the backend again.
    fn forget(&self, slot: &Slot) {
        let mut cold = slot.lock_cold();
        slot.set_upstream(None);
        cold.failed = None;
    }

    /// Waits for a start under way, so an operation does not race it.
    async fn settle(&self, slot: &Slot) {
        let start = slot.lock_cold().starting.clone();
        if let Some(start) = start {
            let _ = start.await;
        }
    }

    /// Runs `op` on the deployer for `d` on the control runtime, after any
    /// start under way settled and with the table no longer sending it requests.
    async fn operate<F, Fut>(&self, d: &Deployment, op: F) -> Result<(), PipesError>
    where
        F: FnOnce(Arc<Deployer>, Deployment) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), PipesError>> + Send + 'static,
    {
        let slot = self.slot(d.as_ref());
        self.settle(&slot).await;
        self.forget(&slot);
        let (deployer, d) = (self.deployer.clone(), d.clone());
        self.on_control(async move { op(deployer, d).await }).await
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
    pub async fn restart(&self, d: &Deployment) -> StartResult {
        self.operate(d, |deployer, d| async move { deployer.restart(&d).await }).await?;
        self.ready(&self.slot(d.as_ref())).await
    }

    /// Replaces the deployment's instance with one made from its current config.
    pub async fn recreate(&self, d: &Deployment) -> StartResult {
        self.remove(d).await?;
        self.ready(&self.slot(d.as_ref())).await
    }

    /// Stops instances idle for longer than their `idle_timeout`; the stops
    /// run on the control runtime.
    pub fn stop_idle(self: &Arc<Self>) {
        let now = slot::now_ms();
        for slot in self.table.load().values() {
            let Some(up) = slot.upstream() else { continue };
            let Some(idle) = up.idle_timeout else { continue };
            let last = slot.last_request_ms().unwrap_or(0).max(up.ready_ms);
            if now.saturating_sub(last) < u64::try_from(idle.as_millis()).unwrap_or(u64::MAX) {
                continue;
            }
            log::info!("{}: idle for {}, stopping its instance", slot.deployment, humantime::format_duration(idle));
            let (fleet, d) = (self.clone(), slot.deployment.clone());
            self.control.spawn(async move {
                if let Err(e) = fleet.stop(&d).await {
                    log::warn!("{d}: cannot stop idle instance: {e}");
                }
            });
        }
    }

    /// Starts a deployment, or joins the start already under way.
    async fn start(&self, slot: &Arc<Slot>) -> StartResult {
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
                    slot.set_upstream(Some(up.clone()));
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

    /// Drops slots with no upstream, no start under way and no failure still
    /// remembered, so host names that never became deployments do not
    /// accumulate. A dropped deployment is found again through the backend.
    pub fn sweep(&self) -> usize {
        let _grow = self.grow.lock().unwrap_or_else(PoisonError::into_inner);
        let table = self.table.load();
        let idle = |slot: &Slot| {
            let cold = slot.lock_cold();
            slot.upstream().is_none()
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

    /// Runs backend work on the control runtime, where the backend's connection lives.
    async fn on_control<F, T>(&self, work: F) -> Result<T, PipesError>
    where
        F: Future<Output = Result<T, PipesError>> + Send + 'static,
        T: Send + 'static,
    {
        self.control.spawn(work).await.unwrap_or_else(|e| {
            Err(PipesError::Engine { action: "finish an engine call", detail: format!("task failed: {e}") })
        })
    }

    /// Takes over the instances this Pipes left running or stopped.
    pub async fn adopt(&self) -> Result<usize, PipesError> {
        let deployer = self.deployer.clone();
        let listed = self.on_control(async move { deployer.backend().list().await }).await?;
        for instance in &listed {
            let d = &instance.deployment;
            let slot = self.slot(d.as_ref());
            if let (true, Some(addr)) = (instance.running, instance.address) {
                let idle = self.deployer.effective(d).await.ok().and_then(|c| c.idle_timeout);
                slot.set_upstream(Some(Arc::new(Upstream::new(addr, idle))));
            }
            log::info!("adopted {d} (instance {}, running: {})", short_id(&instance.id), instance.running);
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
        let (instance, image, config) = self
            .on_control(async move {
                let instance = deployer.backend().instance(&key).await?;
                let image = deployer.backend().image(&deployer.image_ref(&key)).await?;
                Ok((instance, image, deployer.effective(&key).await))
            })
            .await?;
        let slot = self.get(d.as_ref());
        Ok(Status {
            deployment: d.clone(),
            state: State::of(slot.as_deref(), instance.as_ref(), self.failure_ttl),
            image_ref: self.deployer.image_ref(d),
            image,
            allowed: self.allows(d.as_ref()),
            instance,
            upstream: slot.as_deref().and_then(Slot::upstream).map(|u| u.addr),
            last_request_ms: slot.as_deref().and_then(Slot::last_request_ms),
            config,
            last_error: slot.as_deref().and_then(|s| s.failure(self.failure_ttl)),
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
                let instance = instances.iter().find(|i| i.deployment == d);
                Summary {
                    state: State::of(slot.as_deref(), instance, self.failure_ttl),
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
        Ok(Configs {
            own: store.tag(d).await?,
            repository: store.repository(&d.user, &d.repo).await?,
            effective: self.deployer.effective(d).await?,
        })
    }

    /// The default config of `d`'s repository.
    pub async fn repository_config(&self, d: &Deployment) -> Result<Option<DeployConfig>, PipesError> {
        self.deployer.store().repository(&d.user, &d.repo).await
    }

    /// Replaces `d`'s own config; its instance is not touched.
    pub async fn put_config(&self, d: &Deployment, config: DeployConfig) -> Result<(), PipesError> {
        self.deployer.store().put_tag(d, config).await
    }

    /// Replaces the default config of `d`'s repository, and forgets the
    /// remembered failures of its deployments: the next request tries again.
    pub async fn put_repository_config(&self, d: &Deployment, config: DeployConfig) -> Result<(), PipesError> {
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

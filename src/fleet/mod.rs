//! Step 3 of the request path and everything after it: the table of
//! deployments, and who starts, stops and changes them.
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
//!
//! One file per job, each holding the one function that owns its flow:
//!
//! | flow | file | entry point |
//! |---|---|---|
//! | admit a request | `admission.rs` | [`Fleet::admit`] |
//! | start a deployment | `start.rs` | [`Fleet::ready`] |
//! | stop for idleness | `idle.rs` | [`Fleet::stop_idle`] |
//! | pause, and stop what paused too long | `pause.rs` | [`Fleet::expire_paused`] |
//! | redeploy, roll back | `rollout.rs` | [`Fleet::redeploy`], [`Fleet::rollback`] |
//! | follow the engine | `sync.rs` | `Fleet::on_event`, `Fleet::reconcile` |
//! | change a config | `ops.rs` | [`Fleet::change_config`] |
//! | expire what nobody asked for | `expiry.rs` | [`Fleet::expire_unused`] |
//! | collect images nothing uses | `images.rs` | [`Fleet::collect_images`] |
//! | follow access rules stored elsewhere | `mod.rs` | [`Fleet::load_access`] |
//! | operator operations | `ops.rs` | [`Fleet::stop`], [`Fleet::remove`], [`Fleet::restart`] |
//!
//! `table.rs` holds the map itself; `view.rs` what the API and metrics read;
//! `deploy.rs` the backend-facing steps (pull, create, probe, generations).

mod admission;
mod deploy;
mod disk;
mod expiry;
pub mod feed;
mod idle;
mod images;
mod janitor;
mod ops;
mod pause;
mod prepull;
mod probe;
mod rollout;
mod services;
mod slot;
mod start;
mod sync;
mod table;
mod view;
mod watch;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use arc_swap::ArcSwap;

use crate::access::Guard;
use crate::engine::Backend;
use crate::error::PipesError;
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::route::Deployment;
use crate::settings::Settings;
use crate::store::Store;
use deploy::Deployer;
use feed::Feed;

pub use admission::{Admission, ClientStart, ColdStart, Entry};
pub use feed::{Happening, HappeningKind};
pub use janitor::Janitor;
pub use ops::{Applied, ConfigScope, DELETED, EXPIRED};
pub use rollout::{Generation, Switch};
pub use slot::{Activity, OpenCount, Slot, StartResult, Upstream};
pub use view::{Configs, State, Status, Summary};
pub use watch::Watcher;

use admission::Starts;
use pause::Paused;
use table::Table;

/// How long an exiting Pipes waits for the engine to drop its claim.
const RELEASE_WAIT: Duration = Duration::from_secs(3);

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
    /// Pulls ahead after push notifications.
    prepulls: prepull::Prepulls,
    /// Deployments with a redeploy under way in the background, and whether
    /// another was asked for meanwhile.
    redeploys: Mutex<HashMap<Deployment, bool>>,
    /// Who may open which deployment.
    access: Arc<Guard>,
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
            deployer: Arc::new(Deployer::new(backend, store.clone(), settings, metrics.clone(), feed.clone())),
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
            prepulls: prepull::Prepulls::new(settings.docker.max_pulls),
            redeploys: Mutex::new(HashMap::new()),
            access: Arc::new(Guard::new(settings, store.clone())),
        }
    }

    /// Access rules and share links.
    pub fn access(&self) -> &Arc<Guard> {
        &self.access
    }

    /// Reloads access rules from the store and applies those that changed
    /// to the deployments in the table.
    pub async fn load_access(&self) -> Result<(), PipesError> {
        let guard = self.access.clone();
        if self.on_control(async move { guard.load().await }).await? {
            self.reapply_access(|_| true);
        }
        Ok(())
    }

    /// Resolves the access rules of the deployments `covered` says anew.
    /// Under `grow`, so no slot is added meanwhile with rules resolved before.
    pub(super) fn reapply_access(&self, covered: impl Fn(&Deployment) -> bool) {
        let _grow = self.grow.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for slot in self.table.load().values().filter(|s| covered(&s.deployment)) {
            slot.set_access(self.access.rules(&slot.deployment));
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

    /// What is counted for Prometheus, if metrics are on.
    pub fn metrics(&self) -> Option<&Arc<Metrics>> {
        self.metrics.as_ref()
    }

    /// Stops this fleet's upkeep (idle stops, tag watching, adoption), as the
    /// process is about to hand over to another or stop.
    pub fn retire(&self) {
        if !self.retired.swap(true, Ordering::AcqRel) {
            log::info!("stopping or handing over: no more idle stops or tag checks from this process");
        }
    }

    /// Claims `PIPES_INSTANCE` on the engine: who holds it, if another live
    /// Pipes does (see [`crate::engine::Claims::claim`]); always free on a
    /// backend that keeps no claims.
    pub async fn claim(&self, beside: bool) -> Result<Option<String>, PipesError> {
        let deployer = self.deployer.clone();
        self.on_control(async move {
            match deployer.backend().claims() {
                Some(claims) => claims.claim(beside).await,
                None => Ok(None),
            }
        })
        .await
    }

    /// Renews the claim on the instance name, in the background.
    pub fn renew_claim(self: &Arc<Self>) {
        if self.retired() {
            return;
        }
        let deployer = self.deployer.clone();
        self.control.spawn(async move {
            let Some(claims) = deployer.backend().claims() else { return };
            if let Err(e) = claims.claim(true).await {
                log::warn!("cannot renew the claim on this instance name: {e}");
            }
        });
    }

    /// Lets the claim go, waiting a little for the engine; for the threads
    /// that end the process.
    pub fn release_claim(&self) {
        let deployer = self.deployer.clone();
        // The timer is made inside: it needs the runtime that `block_on` enters.
        let release = async move {
            match deployer.backend().claims() {
                Some(claims) => tokio::time::timeout(RELEASE_WAIT, claims.release()).await,
                None => Ok(()),
            }
        };
        if self.control.block_on(release).is_err() {
            log::warn!("the engine did not confirm the release of this instance name");
        }
    }

    /// Whether this process is stopping or handing over.
    pub fn retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// Runs backend work on the control runtime, where the backend's connection lives.
    async fn on_control<F, T>(&self, work: F) -> Result<T, PipesError>
    where
        F: Future<Output = Result<T, PipesError>> + Send + 'static,
        T: Send + 'static,
    {
        self.control.spawn(work).await.unwrap_or_else(|e| Err(PipesError::Engine { action: "finish an engine call", detail: format!("task failed: {e}") }))
    }
}

#[cfg(test)]
mod tests;

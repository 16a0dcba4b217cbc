//! Rollout: redeploys (by hand, tag checks, push notifications), rollbacks,
//! the switch of the table to another generation and the drain of the old one.

use std::hash::BuildHasher;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::idle::SHARE_EVERY;
use super::{Fleet, HappeningKind, Slot, Upstream};
use crate::clock::unix_ms as now_ms;
use crate::engine::{short_id, Quiet};
use crate::error::PipesError;
use crate::route::Deployment;

/// Another Pipes that reported a draining generation busy this recently
/// still has something open on it (it reports every [`SHARE_EVERY`]).
const DRAINING_ELSEWHERE: Duration = Duration::from_secs(5);

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

impl Fleet {
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
                Some(next) => Ok(fleet.switch(&slot, next, was, false).await),
            }
        })
        .await
    }

    /// Redeploys `d` in the background (after a tag check or a push
    /// notification, which must not wait), logging the outcome.
    ///
    /// Coalesced per deployment: while one runs, any number of further
    /// requests make one more after it (so a push during a redeploy is not
    /// missed), never one each — a storm of notifications asks the registry
    /// twice at most.
    pub fn redeploy_later(self: &Arc<Self>, d: Deployment, cause: &'static str) {
        {
            let mut pending = self.redeploys.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(again) = pending.get_mut(&d) {
                *again = true;
                return;
            }
            pending.insert(d.clone(), false);
        }
        let fleet = self.clone();
        self.control.spawn(async move {
            loop {
                match fleet.redeploy(&d).await {
                    Ok(Switch::Unchanged(_)) => log::debug!("{d}: {cause}: the tag names what serves already"),
                    Ok(Switch::Replaced { current, .. }) => {
                        log::info!("{d}: {cause}: the tag moved, now serving {}", current.digest.unwrap_or_default())
                    }
                    Err(e) => log::warn!("{d}: {cause}: redeploy failed, the current generation keeps serving: {e}"),
                }
                let mut pending = fleet.redeploys.lock().unwrap_or_else(PoisonError::into_inner);
                match pending.get_mut(&d) {
                    Some(again) if *again => *again = false,
                    _ => {
                        pending.remove(&d);
                        return;
                    }
                }
            }
        });
    }

    /// Brings back the generation kept before the current one.
    pub async fn rollback(self: &Arc<Self>, d: &Deployment) -> Result<Switch, PipesError> {
        let (fleet, slot) = (self.clone(), self.slot(d.as_ref()));
        self.on_control(async move {
            let _op = slot.ops.lock().await;
            let serving = slot.upstream();
            let was = Generation { instance: serving.as_ref().map(|u| u.instance_id.clone()), digest: serving.as_ref().and_then(|u| u.digest.clone()) };
            let back = fleet.deployer.previous_generation(&slot.deployment, was.instance.as_deref()).await?;
            Ok(fleet.switch(&slot, back, was, true).await)
        })
        .await
    }

    /// Points the table at `next`; the upstream it replaces drains and stops.
    /// The caller holds the slot's operation lock.
    async fn switch(self: &Arc<Self>, slot: &Arc<Slot>, next: Upstream, was: Generation, rollback: bool) -> Switch {
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
        self.feed.tell(&slot.deployment, HappeningKind::Switched { digest: next.digest.clone(), rollback });
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
            let deadline = Instant::now() + fleet.drain_timeout;
            let backend = fleet.deployer.backend().clone();
            match backend.replicas() {
                // Other Pipes serving it wait for what is still open here:
                // told every SHARE_EVERY until it closed.
                Some(replicas) => {
                    while old.open() > 0 && Instant::now() < deadline {
                        if let Err(e) = replicas.share_activity(&old.instance_id, now_ms()).await {
                            log::warn!("{}: cannot tell the other Pipes it still drains: {e}", slot.deployment);
                        }
                        old.until_closed(deadline.min(Instant::now() + SHARE_EVERY)).await;
                    }
                }
                None => {
                    old.until_closed(deadline).await;
                }
            }
            let d = &slot.deployment;
            if old.open() > 0 {
                // WebSockets relayed to it end with a close frame (1001), then the rest is cut.
                old.going_away();
                old.until_closed(Instant::now() + Duration::from_secs(1)).await;
            }
            // And for what other Pipes still have open on it: they followed
            // the switch a little later, so their drain ends a little later.
            let others_deadline = deadline + DRAINING_ELSEWHERE;
            while let Some(replicas) = backend.replicas().filter(|_| Instant::now() < others_deadline) {
                match replicas.quiet_elsewhere(&old.instance_id, DRAINING_ELSEWHERE).await {
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

    /// Serves the generation another Pipes made current (a redeploy through
    /// another replica; one started by hand), once it answers here, and
    /// drains `serving`, the one served until now.
    pub(super) async fn follow_generation(self: &Arc<Self>, slot: &Arc<Slot>, serving: Arc<Upstream>, started: &str) {
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
        self.switch(slot, next, was, false).await;
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

    /// The path part of `PIPES_REGISTRY` (`team` in `registry.example.com/team`),
    /// which a registry's own notifications put before `user/repo`.
    pub fn registry_path(&self) -> Option<&str> {
        self.deployer.registry_path()
    }
}

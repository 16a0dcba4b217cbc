//! Pause bookkeeping: which instances this Pipes paused, the ceiling
//! `PIPES_MAX_PAUSED`, and stopping those paused past their `pause_timeout`.

use std::collections::HashSet;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::{Fleet, HappeningKind, Slot, State, Upstream};
use crate::engine::{short_id, Instance};
use crate::error::PipesError;
use crate::route::Deployment;

/// A paused instance: whose, since when, and for how long at most.
#[derive(Debug, Clone)]
pub(super) struct Paused {
    deployment: Deployment,
    since: Instant,
    timeout: Duration,
}

impl Fleet {
    /// Pauses `seen`, idle, after making room under `PIPES_MAX_PAUSED`; it
    /// is stopped after its `pause_timeout`, or thawed by the next start.
    pub(super) async fn pause_idle(&self, slot: &Slot, seen: &Upstream) -> Result<(), PipesError> {
        self.make_room_to_pause().await;
        let backend = self.deployer.backend();
        let pausing = backend.pausing().ok_or_else(|| PipesError::Engine { action: "pause an instance", detail: "this backend cannot pause".into() })?;
        pausing.pause(&seen.instance_id).await?;
        // Its services sleep with it; the next start thaws them first.
        if let Err(e) = self.deployer.pause_services(&slot.deployment).await {
            log::warn!("{}: cannot pause its services: {e}", slot.deployment);
        }
        let paused = Paused { deployment: slot.deployment.clone(), since: Instant::now(), timeout: seen.pause_timeout };
        self.paused.lock().unwrap_or_else(PoisonError::into_inner).insert(seen.instance_id.clone(), paused);
        if let Some(m) = &slot.metrics {
            m.idle_pause();
        }
        self.feed.tell(&slot.deployment, HappeningKind::Left { state: State::Paused, why: "idle" });
        Ok(())
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
        if let Err(e) = self.deployer.stop_services(d).await {
            log::warn!("{d}: cannot stop its services: {e}");
        }
    }

    /// Forgets that `id` is paused (it was thawed, stopped or removed).
    pub(super) fn unpaused(&self, id: &str) {
        self.paused.lock().unwrap_or_else(PoisonError::into_inner).remove(id);
    }

    /// The deployments with a paused instance.
    pub fn paused_deployments(&self) -> HashSet<Deployment> {
        self.paused.lock().unwrap_or_else(PoisonError::into_inner).values().map(|p| p.deployment.clone()).collect()
    }

    /// Keeps the record of paused instances true to the backend's list:
    /// ones paused by hand (or before a restart) time out from now.
    pub(super) fn note_paused(&self, instances: &[Instance]) {
        // Services pause and stop with their app: only apps are counted.
        let instances: Vec<&Instance> = instances.iter().filter(|i| i.service.is_none()).collect();
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
}

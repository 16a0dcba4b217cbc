//! Stop for idleness: an instance with nothing open for its `idle_timeout`
//! is paused or stopped, here and at every other Pipes serving it.

use std::sync::Arc;
use std::time::Duration;

use super::{Fleet, HappeningKind, Slot, State, Upstream};
use crate::clock::unix_ms as now_ms;
use crate::config::IdleAction;
use crate::engine::Quiet;

/// How often, at most, a deployment's activity here is reported to the
/// other Pipes serving it while it goes on (a quarter of its idle timeout
/// when that is longer): each report is a write to the engine.
pub(super) const SHARE_EVERY: Duration = Duration::from_secs(2);

impl Fleet {
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
    /// deployment's idle timeout (`SHARE_EVERY`, 2 s, at least), and at the next
    /// check after a quiet spell.
    pub fn share_activity(self: &Arc<Self>) {
        let backend = self.deployer.backend();
        if backend.replicas().is_none() || self.retired() {
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
                let Some(replicas) = backend.replicas() else { return };
                if let Err(e) = replicas.share_activity(&up.instance_id, at).await {
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
        let asked = match backend.replicas() {
            Some(replicas) => replicas.quiet_elsewhere(&seen.instance_id, seen.idle_timeout.unwrap_or_default()).await,
            None => Ok(Quiet::Since(0)),
        };
        let quiet = match asked {
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
        if seen.idle_action == IdleAction::Pause && backend.pausing().is_some() {
            log::info!("{}: nothing open for {idle}, pausing it", slot.deployment);
            match self.pause_idle(slot, &seen).await {
                Ok(()) => return,
                Err(e) => log::warn!("{}: cannot pause idle instance, stopping it: {e}", slot.deployment),
            }
        } else {
            log::info!("{}: nothing open for {idle}, stopping it", slot.deployment);
        }
        match self.deployer.stop_idle_instance(&slot.deployment, &seen.instance_id, quiet).await {
            Ok(true) => {
                if let Some(m) = &slot.metrics {
                    m.idle_stop();
                }
                self.feed.tell(&slot.deployment, HappeningKind::Left { state: State::Stopped, why: "idle" });
            }
            // Another Pipes served it, or stopped it, meanwhile. Which one is
            // the backend's to say: the next request asks it (and finds it
            // running, or starts it).
            Ok(false) => log::info!("{}: changed by another Pipes meanwhile: not stopped here", slot.deployment),
            Err(e) => log::warn!("{}: cannot stop idle instance: {e}", slot.deployment),
        }
    }
}

//! The table itself: deployments by name, each with its [`Slot`]; read
//! without a lock, copied on growth, swept of what no longer serves.

use std::sync::{Arc, PoisonError};

use super::{Fleet, Slot};
use crate::error::PipesError;
use crate::route::{Deployment, DeploymentRef};

/// Keys are shared with nothing but cheap to copy: growing the table copies
/// pointers, not names.
pub(super) type Table = hashbrown::HashMap<Arc<Deployment>, Arc<Slot>>;

impl Fleet {
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
        let access = self.access.rules(&d);
        let slot = Arc::new(Slot::new(d, metrics, access));
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

    /// Whether `d` is served now (its upstream is in the table).
    pub fn serving(&self, d: DeploymentRef<'_>) -> bool {
        self.get(d).is_some_and(|s| s.upstream().is_some())
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
}

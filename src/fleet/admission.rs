//! Who may have what: the one place a request is admitted to a deployment.
//!
//! [`Fleet::entry`] applies the policy (`PIPES_ALLOW`) and finds the
//! deployment's access rules; the proxy judges access by them (`access`);
//! then [`Fleet::admit`] applies the memory of images the registry did not
//! have, the per-client limit on starts (`PIPES_MAX_STARTS_PER_CLIENT`) and
//! the ceiling on slots that do not run (`PIPES_MAX_NOT_RUNNING`). A request
//! refused by any of them never reaches the engine, and a name a client may
//! not start gets no slot.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use tokio::time::Instant;

use super::{Fleet, Slot, StartResult, Table, Upstream};
use crate::access::Rules;
use crate::error::PipesError;
use crate::route::{Deployment, DeploymentRef};

/// Images the registry did not have, remembered at most this many at once.
const MAX_MISSING: usize = 4096;

pub(super) type Starts = HashMap<IpAddr, HashMap<Deployment, usize>>;

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

/// The deployment a request names, allowed by the policy, before access is
/// judged: nothing was added to the table for it.
pub enum Entry {
    /// The table knows it.
    Known(Arc<Slot>),
    /// The table does not know it (yet), and these are its access rules.
    New(Deployment, Arc<Rules>),
}

impl Entry {
    /// Its access rules: one atomic load for a deployment the table knows.
    #[inline]
    pub fn rules(&self) -> arc_swap::Guard<Arc<Rules>> {
        match self {
            Entry::Known(slot) => slot.access(),
            Entry::New(_, rules) => arc_swap::Guard::from_inner(rules.clone()),
        }
    }

    /// Its counters, if it has its own yet.
    pub fn metrics(&self) -> Option<&Arc<crate::metrics::DeploymentMetrics>> {
        match self {
            Entry::Known(slot) => slot.metrics.as_ref(),
            Entry::New(..) => None,
        }
    }
}

/// What a request may do with the deployment it names.
pub enum Admission {
    /// The deployment serves: proxy to `upstream` at once (the warm path).
    Warm { slot: Arc<Slot>, upstream: Arc<Upstream> },
    /// It does not serve yet: wait for its start.
    Cold(ColdStart),
}

/// A request waiting for its deployment to start. It holds its client's
/// place among starts (`PIPES_MAX_STARTS_PER_CLIENT`) until dropped.
pub struct ColdStart {
    fleet: Arc<Fleet>,
    slot: Arc<Slot>,
    _client: Option<ClientStart>,
}

impl ColdStart {
    /// The slot of the deployment that starts.
    pub fn slot(&self) -> &Arc<Slot> {
        &self.slot
    }

    /// The upstream once the deployment answers; joins a start under way.
    pub async fn ready(&self) -> StartResult {
        self.fleet.ready(&self.slot).await
    }
}

impl Fleet {
    /// The deployment `d` a request names, if the policy lets it run here.
    /// For a deployment the table knows: a policy check and a table lookup,
    /// no lock, no allocation.
    #[inline]
    pub fn entry(&self, d: DeploymentRef<'_>) -> Result<Entry, PipesError> {
        if !self.allows(d) {
            return Err(PipesError::Forbidden { deployment: d.to_string() });
        }
        Ok(match self.get(d) {
            Some(slot) => Entry::Known(slot),
            None => {
                let d = d.to_owned();
                let rules = self.access.rules(&d);
                Entry::New(d, rules)
            }
        })
    }

    /// The access rules of `d` now: its slot's, or those it would get.
    pub fn rules(&self, d: &Deployment) -> Arc<Rules> {
        match self.get(d.as_ref()) {
            Some(slot) => arc_swap::Guard::into_inner(slot.access()),
            None => self.access.rules(d),
        }
    }

    /// Admits a request whose access was judged; `client` tells who asks
    /// (when known), and is asked only on the cold path. The warm path is
    /// one atomic load.
    pub fn admit(self: &Arc<Self>, entry: Entry, client: impl FnOnce() -> Option<IpAddr>) -> Result<Admission, PipesError> {
        let d = match entry {
            Entry::Known(slot) => {
                if let Some(upstream) = slot.upstream() {
                    return Ok(Admission::Warm { slot, upstream });
                }
                let client = client().map(|c| self.client_start(c, &slot.deployment)).transpose()?;
                return Ok(Admission::Cold(ColdStart { fleet: self.clone(), slot, _client: client }));
            }
            Entry::New(d, _) => d,
        };
        if let Some(missing) = self.missing(d.as_ref()) {
            return Err(missing);
        }
        // A name the client may not start now gets no slot either.
        let client = client().map(|c| self.client_start(c, &d)).transpose()?;
        let slot = self.slot_for_request(d.as_ref())?;
        Ok(Admission::Cold(ColdStart { fleet: self.clone(), slot, _client: client }))
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
        let asked = self.control.spawn(async move { deployer.backend().images().registry_digest(&reference).await }).await;
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

    /// `Ok` if anyone may follow `d`'s events: a deployment the table knows
    /// (starting, serving, failed or stopped here) at once, else as
    /// [`Fleet::check_exists`] tells.
    pub async fn check_followable(&self, d: &Deployment) -> Result<(), PipesError> {
        self.check_allowed(d)?;
        if self.get(d.as_ref()).is_some() {
            return Ok(());
        }
        self.check_exists(d).await
    }

    /// Remembers that the registry has no image for `d`, and takes `d` out of
    /// the table.
    pub(super) fn remember_missing(&self, d: &Deployment) {
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
    pub(super) fn client_start(&self, client: IpAddr, d: &Deployment) -> Result<ClientStart, PipesError> {
        let mut starts = self.starts.lock().unwrap_or_else(PoisonError::into_inner);
        let waiting = starts.entry(client).or_default();
        if !waiting.contains_key(d) && waiting.len() >= self.max_starts_per_client {
            return Err(PipesError::TooManyStarts { max: self.max_starts_per_client });
        }
        *waiting.entry(d.clone()).or_insert(0) += 1;
        Ok(ClientStart { starts: self.starts.clone(), client, deployment: d.clone() })
    }
}

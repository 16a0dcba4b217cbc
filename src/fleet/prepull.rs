//! Pulls ahead after a push notification, for deployments that ran here and
//! do not run now: their next start then waits for no pull.
//!
//! A notification costs at most one registry question: pulls ahead are
//! coalesced per deployment (one under way at a time, then none for
//! [`PREPULL_EVERY`]), skipped when the tag's digest is here already, and
//! never take the last of `PIPES_MAX_PULLS`' places, which stays for cold
//! starts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::Fleet;
use crate::route::Deployment;

/// At most one pull ahead per deployment this often.
const PREPULL_EVERY: Duration = Duration::from_secs(10);
/// Deployments remembered at most, as a flood of names must not grow it.
const MAX_REMEMBERED: usize = 4096;

/// The pulls ahead under way and lately begun.
pub(super) struct Prepulls {
    /// When each deployment's last pull ahead began.
    began: Mutex<HashMap<Deployment, Instant>>,
    /// `PIPES_MAX_PULLS` less one: the last place is for cold starts; none
    /// (no pulls ahead) when there is only one.
    places: Option<Arc<Semaphore>>,
}

impl Prepulls {
    pub(super) fn new(max_pulls: usize) -> Prepulls {
        let places = (max_pulls > 1).then(|| Arc::new(Semaphore::new(max_pulls - 1)));
        Prepulls { began: Mutex::new(HashMap::new()), places }
    }

    /// Whether a pull ahead of `d` began within [`PREPULL_EVERY`].
    fn lately(&self, d: &Deployment) -> bool {
        let began = self.began.lock().unwrap_or_else(PoisonError::into_inner);
        began.get(d).is_some_and(|at| at.elapsed() < PREPULL_EVERY)
    }

    /// Whether a pull ahead of `d` may begin now; if so, it counts as begun.
    fn begin(&self, d: &Deployment) -> bool {
        let mut began = self.began.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if began.get(d).is_some_and(|at| now.duration_since(*at) < PREPULL_EVERY) {
            return false;
        }
        if began.len() >= MAX_REMEMBERED {
            began.retain(|_, at| now.duration_since(*at) < PREPULL_EVERY);
        }
        began.insert(d.clone(), now);
        true
    }
}

impl Fleet {
    /// Whether a pull ahead of `d` began within `PREPULL_EVERY` (10 s): a push
    /// notification for it is answered without asking the engine.
    pub fn prepulled_lately(&self, d: &Deployment) -> bool {
        self.prepulls.lately(d)
    }

    /// Pulls what `d`'s tag names now, in the background, unless a pull
    /// ahead of `d` began within `PREPULL_EVERY` (10 s) or the image is here
    /// already; whether one was begun.
    pub fn prepull_later(self: &Arc<Self>, d: Deployment) -> bool {
        let Some(places) = self.prepulls.places.clone() else {
            log::debug!("{d}: push notification: PIPES_MAX_PULLS is 1, kept for starts: no pull ahead");
            return false;
        };
        if !self.prepulls.begin(&d) {
            log::debug!("{d}: push notification: a pull ahead began lately, none now");
            return false;
        }
        let deployer = self.deployer.clone();
        self.control.spawn(async move {
            let Ok(_place) = places.acquire_owned().await else { return };
            let image_ref = deployer.image_ref(&d);
            let images = deployer.backend().images();
            let (named, here) = match (images.registry_digest(&image_ref).await, images.image(&image_ref).await) {
                (Ok(named), Ok(here)) => (named, here.and_then(|i| i.digest)),
                (Err(e), _) | (_, Err(e)) => return log::warn!("{d}: push notification: cannot tell whether to pull ahead: {e}"),
            };
            if here.as_deref() == Some(named.as_str()) {
                return log::info!("{d}: push notification: {named} is here already");
            }
            match deployer.pull(&d).await {
                Ok(digest) => log::info!("{d}: push notification: pulled {digest} ahead of its next start"),
                Err(e) => log::warn!("{d}: push notification: pulling ahead failed: {e}"),
            }
        });
        true
    }
}

//! Background upkeep of the fleet, as a Pingora service that stops with the
//! server: idle instances are stopped (or paused), paused ones past their
//! pause timeout stopped, watched tags are checked, deployments unused past
//! their `expire_after` removed, unused images collected, access rules reloaded,
//! the claim on the instance name is renewed, and slots that never became deployments are
//! dropped from the table.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use super::Fleet;
use crate::error::PipesError;

/// How often instances are checked against their idle timeout and watch interval.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Slots are swept every this many checks.
const SWEEP_EVERY_TICKS: u64 = 60;
/// Deployments are checked for expiry (and last requests recorded) every
/// this many checks.
const EXPIRY_EVERY_TICKS: u64 = 2;
/// Images nothing uses are collected every this many checks.
const IMAGES_EVERY_TICKS: u64 = 3;
/// Access rules are reloaded from the store every this many checks, for
/// changes made through other replicas or by hand.
const ACCESS_EVERY_TICKS: u64 = 10;
/// The claim on the instance name is renewed every this many checks.
const CLAIM_EVERY_TICKS: u64 = crate::engine::CLAIM_RENEW_EVERY.as_secs() / CHECK_INTERVAL.as_secs();

/// The fleet's periodic upkeep.
pub struct Janitor {
    fleet: Arc<Fleet>,
    /// Set while an expiry check or an image collection runs: a slow one
    /// is not joined by another.
    expiring: Arc<AtomicBool>,
    collecting: Arc<AtomicBool>,
}

impl Janitor {
    /// Upkeep of `fleet`.
    pub fn new(fleet: Arc<Fleet>) -> Self {
        Janitor { fleet, expiring: Arc::new(AtomicBool::new(false)), collecting: Arc::new(AtomicBool::new(false)) }
    }
}

#[async_trait]
impl BackgroundService for Janitor {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut every = tokio::time::interval(CHECK_INTERVAL);
        for tick in 1u64.. {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = every.tick() => {}
            }
            self.fleet.share_activity();
            self.fleet.stop_idle();
            self.fleet.expire_paused();
            self.fleet.poll_tags();
            if tick % EXPIRY_EVERY_TICKS == 0 && !self.fleet.retired() {
                let fleet = self.fleet.clone();
                alone(&self.expiring, "check deployments for expiry", async move { fleet.expire_unused().await });
            }
            if tick % IMAGES_EVERY_TICKS == 0 && !self.fleet.retired() {
                let fleet = self.fleet.clone();
                alone(&self.collecting, "collect unused images", async move { fleet.collect_images().await });
            }
            if tick % ACCESS_EVERY_TICKS == 0 {
                let fleet = self.fleet.clone();
                tokio::spawn(async move {
                    if let Err(e) = fleet.load_access().await {
                        log::warn!("cannot reload access rules: {e}");
                    }
                });
            }
            if tick % CLAIM_EVERY_TICKS == 0 {
                self.fleet.renew_claim();
            }
            if tick % SWEEP_EVERY_TICKS == 0 {
                let dropped = self.fleet.sweep();
                if dropped > 0 {
                    log::debug!("dropped {dropped} idle deployment(s) from the table");
                }
            }
        }
    }
}

/// Runs `job` in the background unless the one `running` marks still runs.
fn alone(running: &Arc<AtomicBool>, what: &'static str, job: impl Future<Output = Result<usize, PipesError>> + Send + 'static) {
    if running.swap(true, Ordering::AcqRel) {
        return;
    }
    let running = running.clone();
    tokio::spawn(async move {
        if let Err(e) = job.await {
            log::warn!("cannot {what}: {e}");
        }
        running.store(false, Ordering::Release);
    });
}

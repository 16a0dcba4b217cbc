//! Cold start: one start per deployment, shared by every request that waits
//! for it, run on the control runtime so a client hanging up cannot cancel it.

use std::net::SocketAddr;
use std::sync::Arc;
use tokio::time::Instant;

use futures_util::future::FutureExt;

use super::slot::Start;
use super::{Fleet, HappeningKind, Slot, StartResult};
use crate::error::PipesError;

impl Fleet {
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
                    fleet.feed.tell(&slot.deployment, HappeningKind::Starting { expected: slot.last_start() });
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
                    fleet.feed.tell(&slot.deployment, HappeningKind::Ready { took });
                }
                Err(e) => {
                    log::warn!("{}: start failed after {:?}: {e}", slot.deployment, began.elapsed());
                    fleet.feed.tell(&slot.deployment, HappeningKind::Failed { error: e.clone() });
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
}

//! Following what the backend does, as it happens: a Pingora service that
//! reads the backend's event stream into the fleet, reconnects with backoff
//! when the stream ends, and reconciles the whole table after every
//! reconnect and every minute, so that a lost event is repaired rather than
//! trusted.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use super::Fleet;

/// Full reconciliation this often, besides after every reconnect.
const RECONCILE_EVERY: Duration = Duration::from_secs(60);
/// First pause before reconnecting, and the longest.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// The fleet's event watcher.
pub struct Watcher {
    fleet: Arc<Fleet>,
}

impl Watcher {
    /// Follows the backend of `fleet`.
    pub fn new(fleet: Arc<Fleet>) -> Self {
        Watcher { fleet }
    }
}

#[async_trait]
impl BackgroundService for Watcher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        // The backend's connection lives on the control runtime.
        let task = self.fleet.control.spawn(follow(self.fleet.clone()));
        let _ = shutdown.changed().await;
        task.abort();
    }
}

async fn follow(fleet: Arc<Fleet>) {
    let mut since = None;
    let mut backoff = FIRST_BACKOFF;
    loop {
        // The engine drops a subscriber that does not take an event within
        // about 100 ms: one task only reads the socket into an unbounded
        // queue, another does the work.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut events = fleet.deployer.backend().events(since);
        let reader = tokio::spawn(async move {
            while let Some(item) = events.next().await {
                if tx.send(item).is_err() {
                    return;
                }
            }
        });
        if let Err(e) = fleet.reconcile().await {
            log::warn!("cannot reconcile with the backend: {e}");
        }
        let mut every = tokio::time::interval(RECONCILE_EVERY);
        every.tick().await;
        loop {
            tokio::select! {
                item = rx.recv() => match item {
                    Some(Ok(event)) => {
                        since = Some(event.time_nano);
                        backoff = FIRST_BACKOFF;
                        fleet.on_event(&event);
                    }
                    Some(Err(e)) => {
                        log::warn!("backend events: {e}; reconnecting in {backoff:?}");
                        break;
                    }
                    None => {
                        log::info!("backend event stream ended; reconnecting in {backoff:?}");
                        break;
                    }
                },
                _ = every.tick() => {
                    if let Err(e) = fleet.reconcile().await {
                        log::warn!("cannot reconcile with the backend: {e}");
                    }
                }
            }
        }
        reader.abort();
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

//! What happens to deployments, as it happens: cold-start phases with their
//! timings and pull progress, readiness, failures, stops and pauses. The
//! waiting page, the dashboard and users' own tools follow it through
//! `GET /__proxyapi/events`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::broadcast;

use super::State;
use crate::error::PipesError;
use crate::metrics::Phase;
use crate::route::Deployment;

/// Happenings kept for a follower that is behind; one further behind misses
/// some and is told so.
const BACKLOG: usize = 1024;

/// One thing that happened to one deployment.
#[derive(Debug, Clone)]
pub struct Happening {
    pub deployment: Deployment,
    /// Unix time in milliseconds.
    pub at_ms: u64,
    pub kind: HappeningKind,
}

/// What happened.
#[derive(Debug, Clone)]
pub enum HappeningKind {
    /// A start began; `expected` is how long the last one took, if any did.
    Starting { expected: Option<Duration> },
    /// A phase of a start ended.
    Phase { phase: Phase, took: Duration },
    /// Image pull progress, in bytes over every layer the engine reported so far.
    Pulling { done: u64, total: u64 },
    /// It answers: requests are served from now on.
    Ready { took: Duration },
    /// The start failed.
    Failed { error: PipesError },
    /// It stopped serving: stopped, paused or removed, and why.
    Left { state: State, why: &'static str },
    /// Another generation serves it now: a redeploy, or a rollback.
    Switched { digest: Option<String>, rollback: bool },
}

/// Happenings kept for followers that arrive during a start.
const RECENT: usize = 256;

/// The fleet's stream of happenings, and the last few of them. Only starts,
/// stops and their phases are told: nothing on the warm path.
#[derive(Debug, Clone)]
pub struct Feed {
    tx: broadcast::Sender<Arc<Happening>>,
    recent: Arc<Mutex<VecDeque<Arc<Happening>>>>,
}

impl Default for Feed {
    fn default() -> Self {
        Feed { tx: broadcast::channel(BACKLOG).0, recent: Arc::new(Mutex::new(VecDeque::with_capacity(RECENT))) }
    }
}

impl Feed {
    /// Tells every follower that `kind` happened to `d`.
    pub fn tell(&self, d: &Deployment, kind: HappeningKind) {
        let at_ms = crate::clock::unix_ms();
        let happening = Arc::new(Happening { deployment: d.clone(), at_ms, kind });
        {
            let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
            if recent.len() == RECENT {
                recent.pop_front();
            }
            recent.push_back(happening.clone());
        }
        let _ = self.tx.send(happening);
    }

    /// A new follower, seeing what happens from now on.
    pub fn follow(&self) -> broadcast::Receiver<Arc<Happening>> {
        self.tx.subscribe()
    }

    /// What happened to `d` since its last start began (if it is among the
    /// recent happenings): for a follower that arrives while it starts.
    pub fn this_start(&self, d: &Deployment) -> Vec<Arc<Happening>> {
        let recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(began) = recent.iter().rposition(|h| h.deployment == *d && matches!(h.kind, HappeningKind::Starting { .. })) else {
            return Vec::new();
        };
        recent.iter().skip(began).filter(|h| h.deployment == *d).cloned().collect()
    }
}

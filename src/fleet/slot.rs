//! One deployment in the table: where it answers (the hot path reads this
//! with one atomic load) and what only the cold path touches.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use futures_util::future::{BoxFuture, Shared};
use pingora::upstreams::peer::HttpPeer;

use crate::error::PipesError;
use crate::route::Deployment;

/// How long Pipes waits to connect to a container that should be running.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Resolution of the last-request time; idle timeouts are at least a second.
const TOUCH_RESOLUTION_MS: u64 = 100;

/// A running instance that answered: where requests for a deployment go.
#[derive(Debug)]
pub struct Upstream {
    pub addr: SocketAddr,
    /// Stop the instance after this long without requests.
    pub idle_timeout: Option<Duration>,
    /// Unix time in milliseconds when it became ready.
    pub ready_ms: u64,
    peer: HttpPeer,
}

impl Upstream {
    /// An upstream at `addr`.
    pub fn new(addr: SocketAddr, idle_timeout: Option<Duration>) -> Self {
        let mut peer = HttpPeer::new(addr, false, String::new());
        peer.options.connection_timeout = Some(CONNECT_TIMEOUT);
        Upstream { addr, idle_timeout, ready_ms: now_ms(), peer }
    }

    /// The peer Pingora connects to for one request.
    pub fn peer(&self) -> Box<HttpPeer> {
        Box::new(self.peer.clone())
    }
}

/// What a start yields: the upstream, or why there is none.
pub type StartResult = Result<Arc<Upstream>, PipesError>;
/// A start under way, which every waiting request awaits.
pub(super) type Start = Shared<BoxFuture<'static, StartResult>>;

/// What only the cold path touches.
#[derive(Default)]
pub(super) struct Cold {
    /// The start in progress.
    pub starting: Option<Start>,
    /// The last failed start, remembered for `PIPES_FAILURE_TTL`.
    pub failed: Option<(Instant, PipesError)>,
}

/// One deployment in the table.
pub struct Slot {
    pub deployment: Deployment,
    upstream: ArcSwapOption<Upstream>,
    /// Unix time in milliseconds of the last proxied request; 0 if none.
    last_request_ms: AtomicU64,
    cold: Mutex<Cold>,
}

impl Slot {
    pub(super) fn new(deployment: Deployment) -> Self {
        Slot {
            deployment,
            upstream: ArcSwapOption::empty(),
            last_request_ms: AtomicU64::new(0),
            cold: Mutex::new(Cold::default()),
        }
    }

    /// The upstream, if the deployment runs and answered: the hot path.
    #[inline]
    pub fn upstream(&self) -> Option<Arc<Upstream>> {
        self.upstream.load_full()
    }

    pub(super) fn set_upstream(&self, upstream: Option<Arc<Upstream>>) {
        self.upstream.store(upstream);
    }

    /// Records a proxied request, for idle accounting.
    ///
    /// Writes at most every `TOUCH_RESOLUTION_MS`: a store on every request
    /// would bounce this cache line between the proxy threads.
    #[inline]
    pub fn touch(&self) {
        let now = now_ms();
        if now.saturating_sub(self.last_request_ms.load(Ordering::Relaxed)) >= TOUCH_RESOLUTION_MS {
            self.last_request_ms.store(now, Ordering::Relaxed);
        }
    }

    /// Unix time in milliseconds of the last proxied request.
    pub fn last_request_ms(&self) -> Option<u64> {
        Some(self.last_request_ms.load(Ordering::Relaxed)).filter(|ms| *ms > 0)
    }

    /// Whether a start is under way.
    pub fn starting(&self) -> bool {
        self.lock_cold().starting.is_some()
    }

    /// The failure of the last start, while it is remembered.
    pub fn failure(&self, ttl: Duration) -> Option<PipesError> {
        let cold = self.lock_cold();
        cold.failed.as_ref().filter(|(at, _)| at.elapsed() < ttl).map(|(_, e)| e.clone())
    }

    pub(super) fn lock_cold(&self) -> MutexGuard<'_, Cold> {
        // The guarded data stays consistent even if a holder panicked.
        self.cold.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Unix time in milliseconds.
pub(super) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

//! One deployment in the table: where it answers (the hot path reads this
//! with one atomic load), what is open on it, and what only the cold path
//! touches.

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use futures_util::future::{BoxFuture, Shared};
use pingora::upstreams::peer::HttpPeer;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::access::Rules;
use crate::clock::unix_ms;
use crate::config::IdleAction;
use crate::error::PipesError;
use crate::metrics::DeploymentMetrics;
use crate::route::Deployment;

/// How long Pipes waits to connect to an instance that should be running.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Resolution of the last-activity time; idle timeouts are at least a second.
const TOUCH_RESOLUTION_MS: u64 = 100;
/// Requests that waited for a start reach the fresh instance this many at a
/// time: a burst of first requests must not overflow a small listen backlog
/// (a dropped SYN costs a one-second retransmit).
const WARMUP_CONCURRENCY: usize = 32;
/// How often a wait for an upstream to close looks again without a wake-up.
const RECHECK: Duration = Duration::from_millis(500);

/// A running instance that answered: where requests for a deployment go.
#[derive(Debug)]
pub struct Upstream {
    /// The backend's id of the instance.
    pub instance_id: String,
    pub addr: SocketAddr,
    /// The image digest the instance runs, if known.
    pub digest: Option<String>,
    /// Stop (or pause) the instance after this long with nothing open.
    pub idle_timeout: Option<Duration>,
    /// Whether an idle instance is stopped or paused.
    pub idle_action: IdleAction,
    /// How long it may stay paused before it is stopped.
    pub pause_timeout: Duration,
    /// Ask the registry for the tag's digest this often.
    pub watch: Option<Duration>,
    /// Unix time in milliseconds when it became ready.
    pub ready_ms: u64,
    peer: HttpPeer,
    open: OpenCount,
    warmup: Arc<Semaphore>,
    /// Set when its drain ends: relayed WebSockets close with 1001.
    drained: watch::Sender<bool>,
    /// Set while someone waits for nothing to be open on it (a drain):
    /// only then does the end of each activity wake `closed`.
    watched: AtomicBool,
    closed: Notify,
}

impl Upstream {
    /// An upstream at `addr`, served by instance `instance_id`.
    pub fn new(instance_id: String, addr: SocketAddr, digest: Option<String>) -> Self {
        let mut peer = HttpPeer::new(addr, false, String::new());
        peer.options.connection_timeout = Some(CONNECT_TIMEOUT);
        Upstream {
            instance_id,
            addr,
            digest,
            idle_timeout: None,
            idle_action: IdleAction::Stop,
            pause_timeout: Duration::from_secs(3600),
            watch: None,
            ready_ms: unix_ms(),
            peer,
            open: OpenCount::default(),
            warmup: Arc::new(Semaphore::new(WARMUP_CONCURRENCY)),
            drained: watch::channel(false).0,
            watched: AtomicBool::new(false),
            closed: Notify::new(),
        }
    }

    /// Waits until nothing is open on it, or `deadline`; whether nothing is.
    /// Woken by the end of each activity; a wake-up lost to the race
    /// between the two counters costs at most `RECHECK` (500 ms).
    pub async fn until_closed(&self, deadline: Instant) -> bool {
        self.watched.store(true, Ordering::Relaxed);
        loop {
            let closed = self.closed.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            if self.open() == 0 {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let _ = tokio::time::timeout_at(deadline.min(now + RECHECK), closed).await;
        }
    }

    /// Tells connections relayed to it that it goes away (its drain ended).
    pub fn going_away(&self) {
        self.drained.send_replace(true);
    }

    /// Resolves, for a relayed connection, once its drain ended.
    pub fn closing(&self) -> watch::Receiver<bool> {
        self.drained.subscribe()
    }

    /// The peer Pingora connects to for one request.
    pub fn peer(&self) -> Box<HttpPeer> {
        Box::new(self.peer.clone())
    }

    /// Requests, upgraded connections and streaming responses open on it now.
    pub fn open(&self) -> usize {
        self.open.total()
    }

    /// A place among the requests that reach a fresh instance at once.
    pub async fn warmup_permit(&self) -> Option<OwnedSemaphorePermit> {
        self.warmup.clone().acquire_owned().await.ok()
    }
}

/// A count that many threads change often and few read: one cache line per
/// shard, so proxy threads do not bounce a shared line on every request.
#[derive(Debug, Default)]
pub struct OpenCount([Shard; SHARDS]);

const SHARDS: usize = 8;

#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard(AtomicI64);

impl OpenCount {
    /// Zero.
    pub const fn new() -> Self {
        OpenCount([const { Shard(AtomicI64::new(0)) }; SHARDS])
    }

    fn shard(&self) -> &AtomicI64 {
        thread_local! {
            static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
        }
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let i = SHARD.with(|s| {
            if s.get() == usize::MAX {
                s.set(NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS);
            }
            s.get()
        });
        &self.0[i].0
    }

    /// Adds `n` (which may be negative) on this thread's shard.
    pub fn add(&self, n: i64) {
        self.shard().fetch_add(n, Ordering::Relaxed);
    }

    /// The sum over all shards.
    pub fn total(&self) -> usize {
        let sum: i64 = self.0.iter().map(|s| s.0.load(Ordering::Relaxed)).sum();
        usize::try_from(sum).unwrap_or(0)
    }
}

/// Something open on an upstream — a request, an upgraded connection, a
/// streaming response — from when it was routed until Pipes is done with it,
/// whichever way that ends. Idle time counts from when the last one ended.
pub struct Activity {
    slot: Arc<Slot>,
    upstream: Arc<Upstream>,
}

impl Activity {
    /// The upstream it is open on.
    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }
}

impl Drop for Activity {
    fn drop(&mut self) {
        self.upstream.open.add(-1);
        self.slot.touch();
        if self.upstream.watched.load(Ordering::Relaxed) {
            self.upstream.closed.notify_waiters();
        }
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
    /// Instances that no longer get new requests and finish open ones.
    pub draining: Vec<String>,
}

/// One deployment in the table.
pub struct Slot {
    pub deployment: Deployment,
    upstream: ArcSwapOption<Upstream>,
    /// Unix time in milliseconds of the last request's start or end; 0 if none.
    last_activity_ms: AtomicU64,
    /// Unix time in milliseconds when the tag's digest is next asked for.
    pub(super) next_watch_ms: AtomicU64,
    cold: Mutex<Cold>,
    /// Held by whatever changes the deployment's instances (start, stop,
    /// redeploy, …), so they happen one at a time and in order.
    pub(super) ops: tokio::sync::Mutex<()>,
    /// Where its requests are counted, when metrics are on.
    pub metrics: Option<Arc<DeploymentMetrics>>,
    /// How long its last start took, in ms; 0 before any.
    last_start_ms: AtomicU64,
    /// The latest activity other Pipes serving it reported (Unix ms; 0 if
    /// none): it counts for idle as this Pipes' own does.
    elsewhere_ms: AtomicU64,
    /// The activity this Pipes last reported to the others (Unix ms; 0 if none).
    pub(super) shared_ms: AtomicU64,
    /// Who may open it: one atomic load on the warm path.
    access: ArcSwap<Rules>,
}

impl Slot {
    pub(super) fn new(deployment: Deployment, metrics: Option<Arc<DeploymentMetrics>>, access: Arc<Rules>) -> Self {
        Slot {
            access: ArcSwap::new(access),
            deployment,
            metrics,
            upstream: ArcSwapOption::empty(),
            last_activity_ms: AtomicU64::new(0),
            next_watch_ms: AtomicU64::new(0),
            cold: Mutex::new(Cold::default()),
            ops: tokio::sync::Mutex::new(()),
            last_start_ms: AtomicU64::new(0),
            elsewhere_ms: AtomicU64::new(0),
            shared_ms: AtomicU64::new(0),
        }
    }

    /// Who may open it now.
    #[inline]
    pub fn access(&self) -> arc_swap::Guard<Arc<Rules>> {
        self.access.load()
    }

    /// Applies new access rules, unless they check the same as the ones it
    /// has (whose caches of verified credentials then stay).
    pub(super) fn set_access(&self, rules: Arc<Rules>) {
        if !self.access.load().same_as(&rules) {
            self.access.store(rules);
        }
    }

    /// How long its last start took, if it ever started here.
    pub fn last_start(&self) -> Option<Duration> {
        Some(self.last_start_ms.load(Ordering::Relaxed)).filter(|ms| *ms > 0).map(Duration::from_millis)
    }

    pub(super) fn set_last_start(&self, took: Duration) {
        self.last_start_ms.store(u64::try_from(took.as_millis()).unwrap_or(u64::MAX).max(1), Ordering::Relaxed);
    }

    /// The upstream, if the deployment runs and answered: the hot path.
    #[inline]
    pub fn upstream(&self) -> Option<Arc<Upstream>> {
        self.upstream.load_full()
    }

    pub(super) fn set_upstream(&self, upstream: Option<Arc<Upstream>>) {
        self.upstream.store(upstream);
    }

    /// Opens an [`Activity`] on `upstream` for one routed request.
    #[inline]
    pub fn begin(self: &Arc<Self>, upstream: Arc<Upstream>) -> Activity {
        upstream.open.add(1);
        self.touch();
        Activity { slot: self.clone(), upstream }
    }

    /// Records activity, for idle accounting.
    ///
    /// Writes at most every `TOUCH_RESOLUTION_MS`: a store on every request
    /// would bounce this cache line between the proxy threads.
    #[inline]
    fn touch(&self) {
        let now = unix_ms();
        if now.saturating_sub(self.last_activity_ms.load(Ordering::Relaxed)) >= TOUCH_RESOLUTION_MS {
            self.last_activity_ms.store(now, Ordering::Relaxed);
        }
    }

    /// Unix time in milliseconds of the last request's start or end.
    pub fn last_request_ms(&self) -> Option<u64> {
        Some(self.last_activity_ms.load(Ordering::Relaxed)).filter(|ms| *ms > 0)
    }

    /// When the deployment counts as idle, in Unix milliseconds: `None` while
    /// something is open on it or it has no idle timeout.
    pub fn idle_at_ms(&self, upstream: &Upstream) -> Option<u64> {
        let idle = u64::try_from(upstream.idle_timeout?.as_millis()).unwrap_or(u64::MAX);
        if upstream.open() > 0 {
            return None;
        }
        let last = self.last_request_ms().unwrap_or(0).max(upstream.ready_ms).max(self.elsewhere_ms.load(Ordering::Relaxed));
        Some(last.saturating_add(idle))
    }

    /// Notes that another Pipes serving it had something open at `at_ms`.
    pub(super) fn busy_elsewhere(&self, at_ms: u64) {
        self.elsewhere_ms.fetch_max(at_ms, Ordering::Relaxed);
    }

    /// The activity to report to the other Pipes serving it, if there is
    /// newer than last reported and the last report is `every_ms` old: now
    /// while something is open, else the last request.
    pub(super) fn activity_to_share(&self, upstream: &Upstream, now: u64, every_ms: u64) -> Option<u64> {
        let at = if upstream.open() > 0 { now } else { self.last_request_ms()? };
        let shared = self.shared_ms.load(Ordering::Relaxed);
        (at > shared && now.saturating_sub(shared) >= every_ms).then(|| {
            self.shared_ms.store(at, Ordering::Relaxed);
            at
        })
    }

    /// Takes the deployment out of the table and forgets its failure: the
    /// next request asks the backend again.
    pub(super) fn forget(&self) {
        let mut cold = self.lock_cold();
        self.set_upstream(None);
        cold.failed = None;
    }

    /// Takes `upstream` out of the table if it is still there; whether it was.
    pub(super) fn retract(&self, instance_id: &str) -> bool {
        let _cold = self.lock_cold();
        let there = self.upstream().is_some_and(|up| up.instance_id == instance_id);
        if there {
            self.set_upstream(None);
        }
        there
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

#[cfg(test)]
mod tests {
    use super::*;

    fn open_rules() -> Arc<Rules> {
        Arc::new(Rules::new(&Deployment::parse("a/b:c").unwrap(), &crate::config::AccessConfig::default(), true))
    }

    #[test]
    fn open_counts_sum_across_threads() {
        let up = Arc::new(Upstream::new("x".into(), "127.0.0.1:1".parse().unwrap(), None));
        let slot = Arc::new(Slot::new(Deployment::parse("a/b:c").unwrap(), None, open_rules()));
        let held: Vec<Activity> = (0..3).map(|_| slot.begin(up.clone())).collect();
        let moved = std::thread::spawn({
            let (slot, up) = (slot.clone(), up.clone());
            move || slot.begin(up)
        })
        .join()
        .unwrap();
        assert_eq!(up.open(), 4);
        // Ended on another thread than it began: the sum is still right.
        std::thread::spawn(move || drop(moved)).join().unwrap();
        drop(held);
        assert_eq!(up.open(), 0);
        assert!(slot.last_request_ms().is_some());
    }

    #[test]
    fn idle_counts_from_the_last_activity_and_never_while_open() {
        let mut up = Upstream::new("x".into(), "127.0.0.1:1".parse().unwrap(), None);
        up.idle_timeout = Some(Duration::from_secs(10));
        let up = Arc::new(up);
        let slot = Arc::new(Slot::new(Deployment::parse("a/b:c").unwrap(), None, open_rules()));
        let activity = slot.begin(up.clone());
        assert_eq!(slot.idle_at_ms(&up), None);
        drop(activity);
        let at = slot.idle_at_ms(&up).unwrap();
        assert!(at >= slot.last_request_ms().unwrap() + 10_000);
    }
}

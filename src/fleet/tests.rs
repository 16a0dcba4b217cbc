//! The fleet's logic against the in-memory backend: coalescing, the failure
//! TTL, recovery, admission, idle stop and the sweep, in plain `cargo test`.
//! Every test runs on a paused tokio clock: waits of seconds take none.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::*;
use crate::clock::unix_ms as now_ms;
use crate::config::DeployConfig;
use crate::engine::fake::{Behaviour, Fake, Others};
use crate::settings::{Settings, Sources};

/// A fleet on a fresh fake backend, with the given settings over test defaults.
struct Harness {
    fleet: Arc<Fleet>,
    fake: Arc<Fake>,
    dir: PathBuf,
}

impl Harness {
    fn new(vars: &[(&str, &str)]) -> Harness {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!("pipes-fleet-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
        let mut env: std::collections::HashMap<String, String> =
            [("PIPES_ALLOW", "alice/*"), ("PIPES_REGISTRY", "registry.test"), ("PIPES_START_TIMEOUT", "5s")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
        env.insert("PIPES_CONFIG_DIR".into(), dir.display().to_string());
        env.extend(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let settings = Settings::from_sources(["pipes"], &Sources { env, ..Sources::default() }).expect("settings");
        let fake = Fake::new();
        let fleet = Arc::new(Fleet::new(&settings, fake.clone(), Store::dir(settings.config_dir.clone()), tokio::runtime::Handle::current()));
        Harness { fleet, fake, dir }
    }

    /// Publishes `key` (`user/repo:tag`) in the fake registry.
    fn publish(&self, key: &str, behaviour: Behaviour) -> Deployment {
        self.push(key, behaviour);
        Deployment::parse(key).expect("a key")
    }

    /// Pushes `key` again: a new digest, which it returns.
    fn push(&self, key: &str, behaviour: Behaviour) -> String {
        let d = Deployment::parse(key).expect("a key");
        self.fake.publish(&format!("registry.test/{}/{}:{}", d.user, d.repo, d.tag), behaviour)
    }

    async fn ready(&self, d: &Deployment) -> StartResult {
        self.fleet.ready(&self.fleet.slot(d.as_ref())).await
    }

    /// Publishes `key` with an idle timeout of 1 s and starts it.
    async fn idling(&self, key: &str) -> (Deployment, Arc<Upstream>) {
        let d = self.publish(key, Behaviour::default());
        self.fleet.deployer.store().put_repository(&d.user, &d.repo, DeployConfig::from_json(br#"{"idle_timeout":"1s"}"#).unwrap()).await.unwrap();
        let up = self.ready(&d).await.unwrap();
        (d, up)
    }

    /// Runs the idle check every 50 ms for `long`.
    async fn check_idle_for(&self, long: Duration) {
        let until = Instant::now() + long;
        while Instant::now() < until {
            self.fleet.stop_idle();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs the idle check until `d` no longer runs (bounded).
    async fn until_stopped_idle(&self, d: &Deployment, what: &str) {
        eventually(what, || {
            self.fleet.stop_idle();
            !self.fake.is_running(d)
        })
        .await;
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits (bounded) until `done` holds.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "not within 10 s: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn key(text: &str) -> Deployment {
    Deployment::parse(text).unwrap()
}

#[tokio::test(start_paused = true)]
async fn slots_are_found_by_borrowed_keys_and_added_once() {
    let h = Harness::new(&[]);
    let d = key("alice/app:v1");
    assert!(h.fleet.get(d.as_ref()).is_none());
    let a = h.fleet.slot(d.as_ref());
    let b = h.fleet.slot(d.as_ref());
    assert!(Arc::ptr_eq(&a, &b));
    assert!(Arc::ptr_eq(&h.fleet.get(d.as_ref()).unwrap(), &a));
    assert_eq!(h.fleet.slots().len(), 1);
    assert!(h.fleet.allows(d.as_ref()));
    assert!(!h.fleet.allows(key("bob/app:v1").as_ref()));
}

#[tokio::test(start_paused = true)]
async fn a_cold_start_pulls_runs_and_probes() {
    let h = Harness::new(&[]);
    let d = h.publish("alice/app:v1", Behaviour::default());
    let up = h.ready(&d).await.expect("started");
    assert_eq!(h.fake.calls.pulls.load(Ordering::Relaxed), 1);
    assert_eq!(h.fake.calls.creates.load(Ordering::Relaxed), 1);
    // The upstream answers: the probe was real.
    assert!(tokio::net::TcpStream::connect(up.addr).await.is_ok());
    // Warm: the same upstream, no backend call.
    let again = h.ready(&d).await.unwrap();
    assert!(Arc::ptr_eq(&up, &again));
    assert_eq!(h.fake.calls.creates.load(Ordering::Relaxed), 1);
    let status = h.fleet.status(&d).await.unwrap();
    assert_eq!(status.state, State::Running);
    assert_eq!(status.upstream, Some(up.addr));
}

#[tokio::test(start_paused = true)]
async fn concurrent_first_requests_share_one_start() {
    let h = Harness::new(&[]);
    let d = h.publish("alice/slow:v1", Behaviour { listen_after: Duration::from_millis(300), ..Behaviour::default() });
    let waits: Vec<_> = (0..50)
        .map(|_| {
            let (fleet, d) = (h.fleet.clone(), d.clone());
            tokio::spawn(async move { fleet.ready(&fleet.slot(d.as_ref())).await })
        })
        .collect();
    let mut addrs = Vec::new();
    for w in waits {
        addrs.push(w.await.unwrap().expect("every waiter is served").addr);
    }
    addrs.dedup();
    assert_eq!(addrs.len(), 1, "one upstream for all");
    assert_eq!(h.fake.calls.creates.load(Ordering::Relaxed), 1, "exactly one instance was made");
    assert_eq!(h.fake.instance_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_failure_is_remembered_for_its_ttl_then_tried_again() {
    let h = Harness::new(&[("PIPES_FAILURE_TTL", "300ms")]);
    let d = key("alice/missing:v1");
    for _ in 0..3 {
        let e = h.ready(&d).await.unwrap_err();
        assert!(matches!(e, PipesError::ImageNotFound { .. }), "{e}");
    }
    assert_eq!(h.fake.calls.pulls.load(Ordering::Relaxed), 1, "remembered: one pull for three requests");
    assert_eq!(h.fleet.status(&d).await.unwrap().state, State::Failed);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(h.ready(&d).await.is_err());
    assert_eq!(h.fake.calls.pulls.load(Ordering::Relaxed), 2, "after the TTL it is tried again");
}

#[tokio::test(start_paused = true)]
async fn an_instance_that_exits_while_starting_is_reported_with_its_log() {
    let h = Harness::new(&[]);
    let d = h.publish("alice/crash:v1", Behaviour { exit_code: Some(3), ..Behaviour::default() });
    match h.ready(&d).await.unwrap_err() {
        PipesError::Exited { code, logs, .. } => {
            assert_eq!(code, 3);
            assert!(logs.iter().any(|l| l.contains("exited with 3")), "{logs:?}");
        }
        other => panic!("{other}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_refused_connection_starts_the_deployment_again() {
    let h = Harness::new(&[]);
    let d = h.publish("alice/app:v1", Behaviour::default());
    let first = h.ready(&d).await.unwrap();
    h.fake.kill(&d, None);
    // Its listener closes once the aborted server task is dropped.
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(first.addr).await.is_ok() {
        assert!(Instant::now() < deadline, "the killed instance refuses");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let slot = h.fleet.slot(d.as_ref());
    let second = h.fleet.recover(&slot, first.addr).await.expect("recovered");
    assert_ne!(first.addr, second.addr);
    assert!(tokio::net::TcpStream::connect(second.addr).await.is_ok());
    assert_eq!(h.fake.calls.creates.load(Ordering::Relaxed), 1, "the stopped instance was started again, not replaced");
    assert_eq!(h.fake.calls.starts.load(Ordering::Relaxed), 2);
    assert_eq!(h.fake.instance_count(), 1);
    // A late report of the old address changes nothing.
    let third = h.fleet.recover(&slot, first.addr).await.unwrap();
    assert!(Arc::ptr_eq(&second, &third));
}

#[tokio::test(start_paused = true)]
async fn admission_stops_at_max_containers() {
    let h = Harness::new(&[("PIPES_MAX_CONTAINERS", "1")]);
    let one = h.publish("alice/one:v1", Behaviour::default());
    let two = h.publish("alice/two:v1", Behaviour::default());
    h.ready(&one).await.expect("the first fits");
    let e = h.ready(&two).await.unwrap_err();
    assert!(matches!(e, PipesError::TooManyContainers { max: 1 }), "{e}");
    assert_eq!(h.fake.calls.creates.load(Ordering::Relaxed), 1, "nothing was made for the second");
}

#[tokio::test(start_paused = true)]
async fn idle_instances_are_stopped_and_started_again_on_demand() {
    let h = Harness::new(&[]);
    let d = h.publish("alice/idle:v1", Behaviour::default());
    let config = DeployConfig::from_json(br#"{"idle_timeout":"1s"}"#).unwrap();
    h.fleet.deployer.store().put_repository(&d.user, &d.repo, config).await.unwrap();
    h.ready(&d).await.unwrap();
    h.until_stopped_idle(&d, "the idle instance stops").await;
    assert!(h.fleet.slot(d.as_ref()).upstream().is_none(), "the table forgot it");
    h.ready(&d).await.expect("the next request starts it again");
    assert_eq!(h.fake.instance_count(), 1, "the same instance");
}

#[tokio::test(start_paused = true)]
async fn a_repository_config_change_is_pending_until_a_restart_applies_it() {
    let h = Harness::new(&[]);
    let d = h.publish("alice/app:v1", Behaviour::default());
    h.ready(&d).await.unwrap();
    let status = h.fleet.status(&d).await.unwrap();
    assert!(!status.config_pending, "made from the config now");
    let first = status.instance.unwrap().id;

    let config = DeployConfig::from_json(br#"{"env":{"GREETING":"hi"}}"#).unwrap();
    let applied = h.fleet.change_config(ConfigScope::Repository(&d), config).await.unwrap();
    assert!(matches!(applied, Applied::Pending), "{applied:?}");
    let status = h.fleet.status(&d).await.unwrap();
    assert!(status.config_pending, "the running instance was made from the old config");
    assert_eq!(status.instance.as_ref().unwrap().id, first, "nothing was replaced by the PUT");
    assert!(!status.instance.unwrap().config.unwrap().contains("GREETING"), "it shows what it runs");

    let idle_only = DeployConfig::from_json(br#"{"env":{"GREETING":"hi"},"idle_timeout":"5m"}"#).unwrap();
    h.fleet.change_config(ConfigScope::Repository(&d), idle_only).await.unwrap();
    assert!(h.fleet.status(&d).await.unwrap().config_pending, "an idle timeout applies at the next start too");

    h.fleet.restart(&d).await.unwrap();
    let status = h.fleet.status(&d).await.unwrap();
    let now = status.instance.unwrap();
    assert_ne!(now.id, first, "the restart made it anew");
    assert!(now.config.unwrap().contains("GREETING"));
    assert!(!status.config_pending);
    h.fleet.restart(&d).await.unwrap();
    assert_eq!(h.fleet.status(&d).await.unwrap().instance.unwrap().id, now.id, "an unchanged config restarts in place");
}

#[tokio::test(start_paused = true)]
async fn a_tag_config_change_makes_the_deployment_anew_without_its_rollback_generation() {
    let h = Harness::new(&[("PIPES_MAX_MEMORY", "1g")]);
    let d = h.publish("alice/app:v1", Behaviour::default());
    h.ready(&d).await.unwrap();
    h.publish("alice/app:v1", Behaviour::default());
    assert!(matches!(h.fleet.redeploy(&d).await.unwrap(), Switch::Replaced { .. }));
    assert!(h.fleet.status(&d).await.unwrap().previous.is_some(), "a generation kept for a rollback");

    let config = DeployConfig::from_json(br#"{"env":{"A":"1"}}"#).unwrap();
    let Applied::Recreated(started) = h.fleet.change_config(ConfigScope::Tag(&d), config).await.unwrap() else { panic!("applied at once") };
    started.expect("the new instance answers");
    let status = h.fleet.status(&d).await.unwrap();
    assert!(status.instance.unwrap().config.unwrap().contains("\"A\""), "made from the new config");
    assert!(status.previous.is_none(), "a rollback cannot bring the replaced config back");
    assert!(!status.config_pending);

    let over = DeployConfig::from_json(br#"{"memory":"2g"}"#).unwrap();
    let refused = h.fleet.change_config(ConfigScope::Tag(&d), over).await;
    assert_eq!(refused.map(|_| ()).unwrap_err().status(), 422, "above the ceilings");
    let denied = key("mallory/app:v1");
    let refused = h.fleet.change_config(ConfigScope::Tag(&denied), DeployConfig::default()).await;
    assert_eq!(refused.map(|_| ()).unwrap_err().status(), 403, "not allowed here");
    assert!(h.fleet.deployer.store().tag(&denied).await.unwrap().is_none(), "nothing saved");
}

#[tokio::test(start_paused = true)]
async fn a_changed_config_replaces_a_stopped_instance() {
    let h = Harness::new(&[]);
    let d = h.publish("alice/app:v1", Behaviour::default());
    h.ready(&d).await.unwrap();
    h.fleet.stop(&d).await.unwrap();
    let config = DeployConfig::from_json(br#"{"env":{"A":"1"}}"#).unwrap();
    h.fleet.deployer.store().put_tag(&d, config).await.unwrap();
    h.ready(&d).await.unwrap();
    assert_eq!(h.fake.calls.creates.load(Ordering::Relaxed), 2, "a new instance for the new config");
    assert_eq!(h.fake.calls.starts.load(Ordering::Relaxed), 2, "each new instance was started, the old one not again");
    assert_eq!(h.fake.instance_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_sweep_keeps_running_and_recently_failed_slots() {
    let h = Harness::new(&[("PIPES_FAILURE_TTL", "1h")]);
    let running = h.publish("alice/run:v1", Behaviour::default());
    h.ready(&running).await.unwrap();
    let failed = h.publish("alice/fail:v1", Behaviour { exit_code: Some(1), ..Behaviour::default() });
    assert!(h.ready(&failed).await.is_err());
    h.fleet.slot(key("alice/idle:v1").as_ref());

    assert_eq!(h.fleet.sweep(), 1);
    let left: Vec<String> = h.fleet.slots().iter().map(|s| s.deployment.to_string()).collect();
    assert_eq!(left, ["alice/fail:v1", "alice/run:v1"]);
}

#[tokio::test(start_paused = true)]
async fn adoption_takes_over_running_instances() {
    let h = Harness::new(&[]);
    let d = h.publish("alice/app:v1", Behaviour::default());
    let up = h.ready(&d).await.unwrap();
    // A second fleet on the same backend, as after a restart of Pipes.
    let settings =
        Settings::from_sources(["pipes"], &Sources { env: [("PIPES_ALLOW".to_owned(), "alice/*".to_owned())].into(), ..Sources::default() }).unwrap();
    let fresh = Fleet::new(&settings, h.fake.clone(), Store::dir(settings.config_dir.clone()), tokio::runtime::Handle::current());
    assert_eq!(fresh.adopt().await.unwrap(), 1);
    let slot = fresh.get(d.as_ref()).expect("adopted into the table");
    assert_eq!(slot.upstream().map(|u| u.addr), Some(up.addr));
    let summaries = fresh.summaries().await.unwrap();
    assert_eq!(summaries.len(), 1);
    assert_eq!(summaries[0].state, State::Running);
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_backend_is_a_503() {
    let h = Harness::new(&[]);
    let d = h.publish("alice/app:v1", Behaviour::default());
    h.fake.set_down(true);
    let e = h.ready(&d).await.unwrap_err();
    assert_eq!(e.status(), 503, "{e}");
    assert!(h.fleet.status(&d).await.is_err());
}

/// `d`'s upstream right now.
fn upstream_of(h: &Harness, d: &Deployment) -> Option<Arc<Upstream>> {
    h.fleet.get(d.as_ref()).and_then(|s| s.upstream())
}

#[tokio::test(start_paused = true)]
async fn a_redeploy_switches_to_the_new_digest_and_keeps_the_old_stopped() {
    let h = Harness::new(&[]);
    let d = h.publish("alice/app:v1", Behaviour::default());
    let first = h.ready(&d).await.unwrap();
    assert_eq!(h.fleet.redeploy(&d).await.unwrap(), Switch::Unchanged(Generation { instance: Some(first.instance_id.clone()), digest: first.digest.clone() }));
    assert_eq!(h.fake.calls.creates.load(Ordering::Relaxed), 1, "an unchanged tag makes nothing");

    let pushed = h.push("alice/app:v1", Behaviour::default());
    let Switch::Replaced { previous, current } = h.fleet.redeploy(&d).await.unwrap() else { panic!("replaced") };
    assert_eq!(previous.instance.as_deref(), Some(first.instance_id.as_str()));
    assert_eq!(current.digest.as_deref(), Some(pushed.as_str()));
    let now = upstream_of(&h, &d).unwrap();
    assert_eq!(now.digest.as_deref(), Some(pushed.as_str()), "the table points at the new generation");
    let (fake, d2) = (h.fake.clone(), d.clone());
    eventually("the old generation is drained and stopped", move || fake.running(&d2) == [now.instance_id.clone()]).await;
    assert_eq!(h.fake.instance_count(), 2, "the previous generation is kept");

    // One more push: the oldest generation goes, one previous stays.
    h.publish("alice/app:v1", Behaviour::default());
    h.fleet.redeploy(&d).await.unwrap();
    let fake = h.fake.clone();
    eventually("only two generations are kept", move || fake.instance_count() == 2).await;
}

#[tokio::test(start_paused = true)]
async fn a_bad_push_never_replaces_a_good_instance() {
    let h = Harness::new(&[]);
    let d = h.publish("alice/app:v1", Behaviour::default());
    let good = h.ready(&d).await.unwrap();
    h.publish("alice/app:v1", Behaviour { exit_code: Some(2), ..Behaviour::default() });
    match h.fleet.redeploy(&d).await.unwrap_err() {
        PipesError::Exited { code, logs, .. } => {
            assert_eq!(code, 2);
            assert!(!logs.is_empty(), "the failed generation's log is in the answer");
        }
        other => panic!("{other}"),
    }
    assert!(Arc::ptr_eq(&upstream_of(&h, &d).unwrap(), &good), "the good instance keeps serving");
    assert_eq!(h.fake.instance_count(), 1, "the failed generation was removed");
    assert!(h.fleet.slot(d.as_ref()).failure(Duration::from_secs(3600)).is_none(), "no failure is remembered");
}

#[tokio::test(start_paused = true)]
async fn a_drain_waits_for_what_is_open_on_the_old_generation() {
    let h = Harness::new(&[("PIPES_DRAIN_TIMEOUT", "30s")]);
    let d = h.publish("alice/app:v1", Behaviour::default());
    let old = h.ready(&d).await.unwrap();
    let slot = h.fleet.slot(d.as_ref());
    let open = slot.begin(old.clone());
    h.publish("alice/app:v1", Behaviour::default());
    h.fleet.redeploy(&d).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(h.fake.running(&d).contains(&old.instance_id), "still running while a connection is open on it");
    drop(open);
    let (fake, d2, id) = (h.fake.clone(), d.clone(), old.instance_id.clone());
    eventually("stopped once the connection ended", move || !fake.running(&d2).contains(&id)).await;
}

#[tokio::test(start_paused = true)]
async fn a_rollback_brings_back_the_previous_generation() {
    let h = Harness::new(&[]);
    let d = h.publish("alice/app:v1", Behaviour::default());
    assert_eq!(h.ready(&d).await.map(|_| ()).and(h.fleet.rollback(&d).await.map(|_| ())).unwrap_err().status(), 409);
    let first = upstream_of(&h, &d).unwrap();
    h.publish("alice/app:v1", Behaviour::default());
    h.fleet.redeploy(&d).await.unwrap();
    let second = upstream_of(&h, &d).unwrap();
    let (fake, d2, id) = (h.fake.clone(), d.clone(), second.instance_id.clone());
    eventually("the first generation drained", move || fake.running(&d2) == [id.clone()]).await;

    let Switch::Replaced { current, previous } = h.fleet.rollback(&d).await.unwrap() else { panic!("replaced") };
    assert_eq!(current.instance.as_deref(), Some(first.instance_id.as_str()));
    assert_eq!(previous.instance.as_deref(), Some(second.instance_id.as_str()));
    assert_eq!(upstream_of(&h, &d).unwrap().instance_id, first.instance_id);
    let (fake, d2, id) = (h.fake.clone(), d.clone(), first.instance_id.clone());
    eventually("the rolled-back-from generation stops", move || fake.running(&d2) == [id.clone()]).await;
    assert_eq!(h.fake.instance_count(), 2);
}

#[tokio::test(start_paused = true)]
async fn idle_counts_from_when_the_last_open_connection_ended() {
    let h = Harness::new(&[]);
    let (d, up) = h.idling("alice/idle:v1").await;
    let open = h.fleet.slot(d.as_ref()).begin(up.clone());
    h.check_idle_for(Duration::from_millis(1600)).await;
    assert!(h.fake.is_running(&d), "an open connection keeps it running past its idle timeout");
    drop(open);
    h.until_stopped_idle(&d, "stopped an idle timeout after the connection ended").await;
}

#[tokio::test(start_paused = true)]
async fn an_instance_another_pipes_serves_is_not_stopped_for_idleness_here() {
    let h = Harness::new(&[]);
    let (d, up) = h.idling("alice/idle:v1").await;
    let slot = h.fleet.slot(d.as_ref());

    // Activity here is told to the others: at once after a quiet spell.
    h.fake.share_with(Others::default());
    drop(slot.begin(up.clone()));
    h.fleet.share_activity();
    eventually("the activity was told", || h.fake.told().iter().any(|(id, _)| *id == up.instance_id)).await;

    // Busy through another Pipes a moment ago: kept past the idle timeout here.
    let busy_at = now_ms();
    h.fake.share_with(Others { busy_at: Some(busy_at), ..Others::default() });
    h.check_idle_for(Duration::from_millis(1500)).await;
    assert!(h.fake.is_running(&d), "busy elsewhere is not idle");
    assert!(slot.idle_at_ms(&up).is_some_and(|at| at >= busy_at + 1000), "idle counts from the activity elsewhere");

    // Quiet there too, but one of them writes before the stop: kept, still served.
    h.fake.share_with(Others { interfere: true, ..Others::default() });
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..5 {
        h.fleet.stop_idle();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(h.fake.is_running(&d), "a write in between keeps it running");
    let starts = h.fake.calls.starts.load(Ordering::Relaxed);
    let again = h.ready(&d).await.expect("the next request is served");
    assert_eq!(again.instance_id, up.instance_id, "by the instance that kept running");
    assert_eq!(h.fake.calls.starts.load(Ordering::Relaxed), starts, "without starting anything");

    // Quiet everywhere: stopped.
    h.fake.share_with(Others::default());
    h.until_stopped_idle(&d, "stopped once quiet everywhere").await;
}

#[tokio::test(start_paused = true)]
async fn events_keep_the_table_true_without_a_request() {
    let h = Harness::new(&[]);
    let d = h.publish("alice/app:v1", Behaviour::default());
    let up = h.ready(&d).await.unwrap();
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let watcher = Watcher::new(h.fleet.clone());
    let watching = tokio::spawn(async move { pingora::services::background::BackgroundService::start(&watcher, shutdown).await });

    h.fake.kill(&d, None);
    let fleet = h.fleet.clone();
    let d2 = d.clone();
    eventually("a killed instance leaves the table", move || fleet.get(d2.as_ref()).unwrap().upstream().is_none()).await;
    assert_eq!(h.fleet.status(&d).await.unwrap().state, State::Stopped);

    // Started by hand: adopted, probed, served.
    h.fake.start(&up.instance_id).await.unwrap();
    let fleet = h.fleet.clone();
    let d2 = d.clone();
    eventually("a started instance is adopted", move || fleet.get(d2.as_ref()).unwrap().upstream().is_some()).await;
    stop.send(true).unwrap();
    watching.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_watched_tag_is_redeployed_when_it_moves() {
    let h = Harness::new(&[("PIPES_WATCH", "1s")]);
    let d = h.publish("alice/app:v1", Behaviour::default());
    h.ready(&d).await.unwrap();
    let pushed = h.push("alice/app:v1", Behaviour::default());
    let (fleet, d2) = (h.fleet.clone(), d.clone());
    eventually("the new digest serves", move || {
        fleet.poll_tags();
        upstream_of_fleet(&fleet, &d2).and_then(|u| u.digest.clone()).as_deref() == Some(pushed.as_str())
    })
    .await;
    let asked = h.fake.calls.digests.load(Ordering::Relaxed);
    assert!(asked <= 3, "at most one question per interval: {asked}");
}

fn upstream_of_fleet(fleet: &Fleet, d: &Deployment) -> Option<Arc<Upstream>> {
    fleet.get(d.as_ref()).and_then(|s| s.upstream())
}

#[tokio::test(start_paused = true)]
async fn names_of_missing_images_hold_no_slot_and_no_place() {
    let h = Harness::new(&[("PIPES_MAX_CONTAINERS", "1"), ("PIPES_FAILURE_TTL", "1h")]);
    let good = h.publish("alice/good:v1", Behaviour::default());
    for i in 0..20 {
        let bad = key(&format!("alice/nope{i}:v1"));
        let e = h.fleet.ready(&h.fleet.slot_for_request(bad.as_ref()).unwrap()).await.unwrap_err();
        assert!(matches!(e, PipesError::ImageNotFound { .. }), "{e}");
        assert!(h.fleet.get(bad.as_ref()).is_none(), "a missing image leaves no slot");
        assert!(h.fleet.missing(bad.as_ref()).is_some(), "and is remembered");
    }
    // Twenty missing images took no place: the one place is still free.
    h.ready(&good).await.expect("a real deployment starts");
    assert_eq!(h.fleet.status(&key("alice/nope3:v1")).await.unwrap().state, State::Failed);
}

#[tokio::test(start_paused = true)]
async fn a_passing_engine_failure_is_not_remembered() {
    let h = Harness::new(&[("PIPES_FAILURE_TTL", "1h")]);
    let d = h.publish("alice/app:v1", Behaviour::default());
    h.fake.set_down(true);
    assert_eq!(h.ready(&d).await.unwrap_err().status(), 503);
    h.fake.set_down(false);
    h.ready(&d).await.expect("the next request tries again at once");
}

#[tokio::test(start_paused = true)]
async fn one_client_waits_on_a_bounded_number_of_starts() {
    let h = Harness::new(&[("PIPES_MAX_STARTS_PER_CLIENT", "2")]);
    let (a, b): (std::net::IpAddr, std::net::IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
    let (one, two, three) = (key("alice/one:v1"), key("alice/two:v1"), key("alice/three:v1"));
    let first = h.fleet.client_start(a, &one).unwrap();
    let many: Vec<_> = (0..50).map(|_| h.fleet.client_start(a, &two).unwrap()).collect();
    assert!(matches!(h.fleet.client_start(a, &three), Err(PipesError::TooManyStarts { max: 2 })), "a third deployment");
    let _more = h.fleet.client_start(a, &one).expect("any number of requests may wait on one start");
    let _other = h.fleet.client_start(b, &three).expect("another client is not held back");
    drop(many);
    let _now = h.fleet.client_start(a, &three).expect("a place came free");
    drop(first);
}

#[tokio::test(start_paused = true)]
async fn the_table_holds_a_bounded_number_of_deployments_that_do_not_run() {
    let h = Harness::new(&[("PIPES_MAX_NOT_RUNNING", "3"), ("PIPES_FAILURE_TTL", "1h")]);
    let running = h.publish("alice/run:v1", Behaviour::default());
    h.ready(&running).await.unwrap();
    for i in 0..3 {
        let crash = h.publish(&format!("alice/crash{i}:v1"), Behaviour { exit_code: Some(1), ..Behaviour::default() });
        assert!(h.ready(&crash).await.is_err());
    }
    let Err(e) = h.fleet.slot_for_request(key("alice/more:v1").as_ref()) else { panic!("a fourth slot") };
    assert!(matches!(e, PipesError::TooManyNotRunning { max: 3 }), "{e}");
    assert!(h.fleet.slot_for_request(running.as_ref()).is_ok(), "known deployments are found as ever");
}

/// Pauses `d` after its idle timeout (set to 1 s with `idle_action: pause`).
async fn paused_after_idle(h: &Harness, d: &Deployment, extra: &str) {
    let config = DeployConfig::from_json(format!(r#"{{"idle_timeout":"1s","idle_action":"pause"{extra}}}"#).as_bytes()).unwrap();
    h.fleet.deployer.store().put_tag(d, config).await.unwrap();
    h.ready(d).await.unwrap();
    let (fleet, slot) = (h.fleet.clone(), h.fleet.slot(d.as_ref()));
    eventually("the idle instance is paused", move || {
        fleet.stop_idle();
        slot.upstream().is_none() && fleet.paused_deployments().contains(&slot.deployment)
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn an_idle_pause_deployment_is_paused_and_thawed_by_the_next_request() {
    let h = Harness::new(&[]);
    let d = h.publish("alice/nap:v1", Behaviour::default());
    paused_after_idle(&h, &d, "").await;
    assert_eq!(h.fake.calls.pauses.load(Ordering::Relaxed), 1);
    assert_eq!(h.fake.calls.stops.load(Ordering::Relaxed), 0, "paused, not stopped");
    let status = h.fleet.status(&d).await.unwrap();
    assert_eq!(status.state, State::Paused);
    h.ready(&d).await.expect("the next request thaws it");
    assert_eq!(h.fake.calls.unpauses.load(Ordering::Relaxed), 1);
    assert_eq!((h.fake.calls.creates.load(Ordering::Relaxed), h.fake.calls.starts.load(Ordering::Relaxed)), (1, 1), "no new instance, no start");
    assert!(h.fleet.paused_deployments().is_empty());
}

#[tokio::test(start_paused = true)]
async fn paused_instances_are_stopped_past_the_ceiling_and_the_pause_timeout() {
    let h = Harness::new(&[("PIPES_MAX_PAUSED", "1")]);
    let one = h.publish("alice/one:v1", Behaviour::default());
    let two = h.publish("alice/two:v1", Behaviour::default());
    paused_after_idle(&h, &one, "").await;
    paused_after_idle(&h, &two, r#","pause_timeout":"1s""#).await;
    assert_eq!(h.fleet.paused_deployments(), HashSet::from([two.clone()]), "the one paused longest was stopped");
    assert_eq!(h.fleet.status(&one).await.unwrap().state, State::Stopped);
    let fleet = h.fleet.clone();
    eventually("the pause timeout stops it", move || {
        fleet.expire_paused();
        fleet.paused_deployments().is_empty()
    })
    .await;
    // The stop runs on the control runtime after the record is dropped.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (fleet, two) = (h.fleet.clone(), two.clone());
        let state = tokio::spawn(async move { fleet.status(&two).await.unwrap().state }).await.unwrap();
        if state == State::Stopped {
            break;
        }
        assert!(Instant::now() < deadline, "still {state:?} 10 s after its pause timeout");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_stopped_instance_of_an_older_image_is_replaced_not_woken() {
    let h = Harness::new(&[]);
    let d = h.publish("alice/app:v1", Behaviour::default());
    let first = h.ready(&d).await.unwrap();
    h.fleet.stop(&d).await.unwrap();
    let newer = h.push("alice/app:v1", Behaviour::default());
    h.fleet.deployer.pull(&d).await.expect("pulled ahead, as a push does");
    let pulls = h.fake.calls.pulls.load(Ordering::Relaxed);
    let second = h.ready(&d).await.unwrap();
    assert_ne!(first.instance_id, second.instance_id, "a new generation");
    assert_eq!(second.digest.as_deref(), Some(newer.as_str()));
    assert_eq!(h.fake.calls.pulls.load(Ordering::Relaxed), pulls, "no pull on the request path");
}

#[tokio::test(start_paused = true)]
async fn pushes_pull_ahead_once_per_deployment_and_keep_a_place_for_starts() {
    let h = Harness::new(&[("PIPES_MAX_PULLS", "2")]);
    let d = h.publish("alice/app:v1", Behaviour::default());
    h.ready(&d).await.unwrap();
    h.fleet.stop(&d).await.unwrap();
    h.push("alice/app:v1", Behaviour::default());
    let (pulls, digests) = (h.fake.calls.pulls.load(Ordering::Relaxed), h.fake.calls.digests.load(Ordering::Relaxed));

    let begun = (0..300).filter(|_| h.fleet.prepull_later(d.clone())).count();
    assert_eq!(begun, 1, "300 notifications, one pull ahead");
    let fake = h.fake.clone();
    eventually("the pull ahead", move || fake.calls.pulls.load(Ordering::Relaxed) == pulls + 1).await;
    assert_eq!(h.fake.calls.digests.load(Ordering::Relaxed), digests + 1, "one registry question");

    tokio::time::advance(Duration::from_secs(11)).await;
    assert!(h.fleet.prepull_later(d.clone()), "a later notification asks again");
    let fake = h.fake.clone();
    eventually("the question", move || fake.calls.digests.load(Ordering::Relaxed) == digests + 2).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(h.fake.calls.pulls.load(Ordering::Relaxed), pulls + 1, "what the tag names is here already: no pull");

    let one = Harness::new(&[("PIPES_MAX_PULLS", "1")]);
    let d = one.publish("alice/app:v1", Behaviour::default());
    assert!(!one.fleet.prepull_later(d), "the only pull place stays for starts");
}

#[tokio::test(start_paused = true)]
async fn a_storm_of_redeploy_requests_asks_the_registry_twice_at_most() {
    let h = Harness::new(&[]);
    let d = h.publish("alice/app:v1", Behaviour::default());
    let first = h.ready(&d).await.unwrap();
    let newer = h.push("alice/app:v1", Behaviour::default());
    let digests = h.fake.calls.digests.load(Ordering::Relaxed);
    for _ in 0..300 {
        h.fleet.redeploy_later(d.clone(), "push notification");
    }
    let slot = h.fleet.slot(d.as_ref());
    let want = newer.clone();
    eventually("the new generation serves", move || slot.upstream().is_some_and(|up| up.digest.as_deref() == Some(want.as_str()))).await;
    let fleet = h.fleet.clone();
    eventually("the redeploys are done", move || fleet.redeploys.lock().unwrap().is_empty()).await;
    let asked = h.fake.calls.digests.load(Ordering::Relaxed) - digests;
    assert!((1..=2).contains(&asked), "300 requests, {asked} registry questions");
    assert_ne!(h.fleet.slot(d.as_ref()).upstream().unwrap().instance_id, first.instance_id);
}

#[tokio::test(start_paused = true)]
async fn a_start_is_told_phase_by_phase_and_replayed_to_late_followers() {
    let h = Harness::new(&[]);
    let d = h.publish("alice/told:v1", Behaviour::default());
    let mut feed = h.fleet.follow();
    h.ready(&d).await.unwrap();
    let mut told = Vec::new();
    while let Ok(happening) = feed.try_recv() {
        assert_eq!(happening.deployment, d);
        told.push(match &happening.kind {
            HappeningKind::Starting { .. } => "starting".to_owned(),
            HappeningKind::Phase { phase, .. } => phase.name().into_owned(),
            HappeningKind::Pulling { done, total } => format!("pulling {done}/{total}"),
            HappeningKind::Ready { .. } => "ready".to_owned(),
            other => format!("{other:?}"),
        });
    }
    assert_eq!(told, ["starting", "pulling 1024/1024", "pull", "create", "start", "probe", "ready"]);
    assert_eq!(h.fleet.this_start(&d).len(), told.len(), "what a follower arriving now would hear of this start");
    assert!(h.fleet.slot(d.as_ref()).last_start().is_some(), "the next waiting page knows what to expect");

    let crash = h.publish("alice/crash:v1", Behaviour { exit_code: Some(3), ..Behaviour::default() });
    let mut feed = h.fleet.follow();
    h.ready(&crash).await.unwrap_err();
    let last = std::iter::from_fn(|| feed.try_recv().ok()).last().expect("told");
    assert!(matches!(&last.kind, HappeningKind::Failed { error: PipesError::Exited { code: 3, .. } }), "{last:?}");
}

#[path = "services_tests.rs"]
mod services;

//! Services beside a deployment, against the in-memory backend: the start
//! order, failures, admission, and the lifecycle the app and its services
//! share.

use super::*;
use crate::engine::{Backend, EventKind, Instance};
use crate::fleet::{Applied, ConfigScope};

/// Publishes `alice/{repo}:v1` and the images of its database and of its
/// cache (which behaves as `cache` says).
fn with_services(h: &Harness, repo: &str, cache: Behaviour) -> Deployment {
    h.publish("alice/postgres:15", Behaviour::default());
    h.publish("alice/redis:7", cache);
    h.publish(&format!("alice/{repo}:v1"), Behaviour::default())
}

async fn configure(h: &Harness, d: &Deployment, json: &str) {
    h.fleet.deployer.store().put_repository(&d.user, &d.repo, DeployConfig::from_json(json.as_bytes()).unwrap()).await.unwrap();
}

/// A database, and a cache that needs it, each with a volume; the app with
/// one too and an idle timeout of 1 s.
const DB_AND_CACHE: &str = r#"{"idle_timeout":"1s","volumes":{"uploads":"/app/uploads"},
    "services":{"db":{"image":"alice/postgres:15","volumes":{"data":"/var/lib/postgresql/data"},"health":{"tcp":5432}},
                "cache":{"image":"alice/redis:7","depends_on":["db"],"health":{"cmd":["redis-cli","ping"],"timeout":"3s"}}}}"#;

/// `alice/shop:v1` with its database and cache, started.
async fn started_shop(h: &Harness) -> Deployment {
    let d = with_services(h, "shop", Behaviour::default());
    configure(h, &d, DB_AND_CACHE).await;
    h.ready(&d).await.unwrap();
    d
}

fn services_of(h: &Harness, d: &Deployment) -> Vec<Instance> {
    let mut all: Vec<Instance> = futures_util::FutureExt::now_or_never(h.fake.services(d)).expect("ready").expect("services");
    all.sort_by(|a, b| a.service.cmp(&b.service));
    all
}

#[tokio::test(start_paused = true)]
async fn services_start_in_dependency_order_before_the_app() {
    let h = Harness::new(&[]);
    let d = with_services(&h, "shop", Behaviour::default());
    configure(&h, &d, DB_AND_CACHE).await;
    let mut feed = h.fleet.follow();
    h.ready(&d).await.unwrap();
    let phases: Vec<String> = std::iter::from_fn(|| feed.try_recv().ok())
        .filter_map(|happening| match &happening.kind {
            HappeningKind::Phase { phase, .. } if phase.name() != "pull" => Some(phase.name().into_owned()),
            _ => None,
        })
        .collect();
    assert_eq!(phases, ["service:db", "service:cache", "create", "start", "probe"], "db, then the cache that needs it, then the app");
    let services = services_of(&h, &d);
    assert_eq!(services.iter().map(|s| s.service.as_deref().unwrap()).collect::<Vec<_>>(), ["cache", "db"]);
    assert!(services.iter().all(|s| s.running));
    assert_eq!(services[0].health.as_deref(), Some("healthy"));
    assert_eq!(h.fake.shared(&d), (true, vec!["alice/shop:v1/data".to_owned(), "alice/shop:v1/uploads".to_owned()]));
    assert_eq!(h.fake.calls.pulls.load(Ordering::Relaxed), 3, "every image pulled once");
}

#[tokio::test(start_paused = true)]
async fn idle_stop_pause_and_wake_take_the_services_along() {
    let h = Harness::new(&[]);
    let d = started_shop(&h).await;
    let made: Vec<String> = services_of(&h, &d).into_iter().map(|s| s.id).collect();
    h.until_stopped_idle(&d, "the app stops for idleness").await;
    eventually("its services stop with it", || services_of(&h, &d).iter().all(|s| !s.running)).await;
    h.ready(&d).await.unwrap();
    let woken = services_of(&h, &d);
    assert!(woken.iter().all(|s| s.running), "woken with the app: {woken:?}");
    assert_eq!(woken.into_iter().map(|s| s.id).collect::<Vec<_>>(), made, "the same containers, not new ones");

    configure(&h, &d, &DB_AND_CACHE.replace(r#""idle_timeout":"1s""#, r#""idle_timeout":"1s","idle_action":"pause""#)).await;
    h.fleet.restart(&d).await.unwrap();
    h.until_stopped_idle(&d, "the app pauses for idleness").await;
    eventually("its services pause with it", || services_of(&h, &d).iter().all(|s| s.paused)).await;
    h.ready(&d).await.unwrap();
    assert!(services_of(&h, &d).iter().all(|s| s.running), "thawed with the app");
}

#[tokio::test(start_paused = true)]
async fn a_redeploy_keeps_the_services_and_delete_removes_everything() {
    let h = Harness::new(&[]);
    let d = with_services(&h, "shop", Behaviour::default());
    configure(&h, &d, DB_AND_CACHE).await;
    let first = h.ready(&d).await.unwrap();
    let made: Vec<String> = services_of(&h, &d).into_iter().map(|s| s.id).collect();
    h.push("alice/shop:v1", Behaviour::default());
    assert!(matches!(h.fleet.redeploy(&d).await.unwrap(), Switch::Replaced { .. }));
    assert_ne!(h.fleet.slot(d.as_ref()).upstream().unwrap().instance_id, first.instance_id);
    let kept = services_of(&h, &d);
    assert_eq!(kept.iter().map(|s| s.id.clone()).collect::<Vec<_>>(), made, "the services are not restarted");
    assert!(kept.iter().all(|s| s.running));

    h.fleet.remove(&d, true).await.unwrap();
    assert!(services_of(&h, &d).is_empty() && h.fake.instances(&d).await.unwrap().is_empty(), "no container left");
    assert_eq!(h.fake.shared(&d), (false, vec!["alice/shop:v1/data".to_owned(), "alice/shop:v1/uploads".to_owned()]), "volumes kept on request");
    h.ready(&d).await.unwrap();
    h.fleet.remove(&d, false).await.unwrap();
    assert_eq!(h.fake.shared(&d), (false, vec![]), "no network, no volume");
}

#[tokio::test(start_paused = true)]
async fn a_failing_service_fails_the_start_and_the_app_is_not_made() {
    let h = Harness::new(&[]);
    let d = with_services(&h, "crashy", Behaviour { exit_code: Some(4), ..Behaviour::default() });
    configure(&h, &d, DB_AND_CACHE).await;
    match h.ready(&d).await.unwrap_err() {
        PipesError::ServiceExited { service, code, logs, .. } => {
            assert_eq!((service.as_str(), code), ("cache", 4));
            assert!(logs.iter().any(|l| l.contains("exited with 4")), "{logs:?}");
        }
        other => panic!("{other}"),
    }
    assert!(h.fake.instances(&d).await.unwrap().is_empty(), "no app without its services");

    let slow = with_services(&h, "slow", Behaviour { unhealthy: true, ..Behaviour::default() });
    configure(&h, &slow, DB_AND_CACHE).await;
    let e = h.ready(&slow).await.unwrap_err();
    assert!(matches!(&e, PipesError::ServiceUnhealthy { service, .. } if service == "cache"), "{e}");
    assert_eq!((e.status(), e.kind()), (504, "service_unhealthy"));
    assert!(h.fake.instances(&slow).await.unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn services_take_places_among_the_containers_and_start_once() {
    let h = Harness::new(&[("PIPES_MAX_CONTAINERS", "2")]);
    let d = with_services(&h, "big", Behaviour::default());
    configure(&h, &d, DB_AND_CACHE).await;
    assert_eq!(h.ready(&d).await.unwrap_err().kind(), "too_many_containers", "two services and an app are three containers");

    let h = Harness::new(&[]);
    let d = with_services(&h, "busy", Behaviour::default());
    configure(&h, &d, DB_AND_CACHE).await;
    let starts: Vec<_> = (0..20).map(|_| h.ready(&d)).collect();
    for start in futures_util::future::join_all(starts).await {
        start.unwrap();
    }
    assert_eq!(services_of(&h, &d).len(), 2, "one container per service");
    assert_eq!(h.fake.instances(&d).await.unwrap().len(), 1, "one app container");
}

#[tokio::test(start_paused = true)]
async fn a_service_that_dies_while_the_app_serves_is_started_again() {
    let h = Harness::new(&[]);
    let d = started_shop(&h).await;
    let mut events = h.fake.events(None);
    h.fake.kill(&d, Some("db"));
    while let Some(Ok(event)) = futures_util::StreamExt::next(&mut events).await {
        let done = matches!(event.kind, EventKind::Died(_));
        h.fleet.on_event(&event);
        if done {
            break;
        }
    }
    eventually("the database runs again", || services_of(&h, &d).iter().all(|s| s.running)).await;
}

#[tokio::test(start_paused = true)]
async fn configs_with_services_are_checked_before_they_are_saved() {
    let h = Harness::new(&[("PIPES_MAX_MEMORY", "1g")]);
    let d = with_services(&h, "shop", Behaviour::default());
    let put = |json: &str| {
        let (fleet, d, config) = (h.fleet.clone(), d.clone(), DeployConfig::from_json(json.as_bytes()));
        async move { fleet.change_config(ConfigScope::Tag(&d), config?).await.map(drop) }
    };
    let refused = |e: PipesError| match e {
        PipesError::InvalidField { field, .. } => field,
        other => panic!("{other}"),
    };
    let e = put(r#"{"services":{"db":{"image":"bob/postgres:15"}}}"#).await.unwrap_err();
    assert_eq!(refused(e), "services.db.image", "an image PIPES_ALLOW does not allow");
    let e = put(r#"{"services":{"db":{"image":"alice/postgres:15","memory":"2g"}}}"#).await.unwrap_err();
    assert_eq!(refused(e), "services.db.memory", "above PIPES_MAX_MEMORY");
    let e = put(r#"{"services":{"a":{"image":"alice/postgres:15","depends_on":["b"]},"b":{"image":"alice/redis:7","depends_on":["a"]}}}"#).await.unwrap_err();
    assert_eq!(refused(e), "services", "a cycle");
    let e = put(r#"{"services":{"a":{"image":"alice/postgres:15","depends_on":["nope"]}}}"#).await.unwrap_err();
    assert_eq!(refused(e), "services.a.depends_on");
    let e = put(r#"{"services":{"Db":{"image":"alice/postgres:15"}}}"#).await.unwrap_err();
    assert_eq!(refused(e), "services.Db", "not a DNS label");
    let e = put(r#"{"volumes":{"data":"relative/path"}}"#).await.unwrap_err();
    assert_eq!(refused(e), "volumes.data");
    assert!(h.fleet.deployer.store().tag(&d).await.unwrap().is_none(), "nothing refused was saved");
    put(DB_AND_CACHE).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_service_no_longer_configured_is_removed_and_its_volume_kept() {
    let h = Harness::new(&[]);
    let d = with_services(&h, "shop", Behaviour::default());
    let put = |json: &str| {
        let (fleet, d, config) = (h.fleet.clone(), d.clone(), DeployConfig::from_json(json.as_bytes()).unwrap());
        async move { fleet.change_config(ConfigScope::Tag(&d), config).await.unwrap() }
    };
    assert!(matches!(put(DB_AND_CACHE).await, Applied::Recreated(Ok(_))));
    assert_eq!(services_of(&h, &d).len(), 2);
    assert!(matches!(put(r#"{"services":{"db":{"image":"alice/postgres:15","volumes":{"data":"/data"}}}}"#).await, Applied::Recreated(Ok(_))));
    let left = services_of(&h, &d);
    assert_eq!(left.iter().map(|s| s.service.as_deref().unwrap()).collect::<Vec<_>>(), ["db"], "the cache is gone");
    assert!(matches!(put(r#"{"idle_timeout":"1m"}"#).await, Applied::Recreated(Ok(_))));
    assert!(services_of(&h, &d).is_empty(), "no service configured, none left");
    assert!(h.fake.shared(&d).1.contains(&"alice/shop:v1/data".to_owned()), "volumes stay with the deployment");
}

#[tokio::test(start_paused = true)]
async fn a_service_config_change_waits_for_a_restart_which_keeps_its_volume() {
    let h = Harness::new(&[]);
    let d = started_shop(&h).await;
    let before = services_of(&h, &d);
    configure(&h, &d, &DB_AND_CACHE.replace(r#""health":{"tcp":5432}"#, r#""health":{"tcp":5432},"env":{"MODE":"new"}"#)).await;
    let status = h.fleet.status(&d).await.unwrap();
    let pending: Vec<(Option<&str>, bool)> = status.services.iter().map(|(s, pending)| (s.service.as_deref(), *pending)).collect();
    assert!(pending.contains(&(Some("db"), true)) && pending.contains(&(Some("cache"), false)), "{pending:?}");
    assert_eq!(services_of(&h, &d), before, "nothing is restarted by the change itself");

    h.fleet.restart(&d).await.unwrap();
    let after = services_of(&h, &d);
    assert_ne!(after[1].id, before[1].id, "the database is made anew");
    assert_eq!(after[0].id, before[0].id, "the cache, unchanged, is left as it is");
    assert!(after.iter().all(|s| s.running));
    assert!(h.fake.shared(&d).1.contains(&"alice/shop:v1/data".to_owned()), "its volume is kept");
}

#[tokio::test(start_paused = true)]
async fn the_reconcile_starts_a_service_that_died_unseen() {
    let h = Harness::new(&[]);
    let d = started_shop(&h).await;
    // Killed with no event reaching the fleet: only the periodic look sees it.
    h.fake.kill(&d, Some("cache"));
    assert!(services_of(&h, &d).iter().any(|s| !s.running));
    h.fleet.reconcile().await.unwrap();
    eventually("the cache runs again", || services_of(&h, &d).iter().all(|s| s.running)).await;
}

//! The Swarm backend on a real three-node swarm: `scripts/cluster up` (run by
//! scripts/test) makes engines n1, n2, n3 — each in a network namespace of
//! its own, all managers — and `solo`, an engine with live-restore outside
//! the swarm. Pipes replicas run as containers on n1 (A) and n2 (B);
//! deployments go wherever the swarm puts them. These tests share the
//! cluster and run one at a time (`.config/nextest.toml`); each leaves every
//! engine running and every node active.

use crate::common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::cluster::*;
use common::{echo, env, unique, websocket, Fixtures};
use futures_util::StreamExt;

/// Reads the replica's event stream for `host` until a state event whose
/// data contains `needle`; how long that took from `since`.
async fn until_event(host: String, addr: SocketAddr, needle: &'static str, since: Instant) -> Duration {
    let resp = client(&host, addr)
        .get(format!("http://{host}:{}/__proxyapi/events", addr.port()))
        .bearer_auth(TOKEN)
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .expect("event stream");
    assert_eq!(resp.status().as_u16(), 200);
    let mut body = resp.bytes_stream();
    let mut seen = String::new();
    while let Some(chunk) = body.next().await {
        seen.push_str(&String::from_utf8_lossy(&chunk.expect("stream")));
        if seen.contains(needle) {
            return since.elapsed();
        }
    }
    panic!("the stream from {addr} ended without {needle}: {seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deployments_anywhere_in_the_swarm_are_followed_by_both_replicas() {
    if no_cluster() {
        return;
    }
    let mut cluster = Cluster::new();
    let (a, b) = cluster.replicas_a_and_b(&["PIPES_DRAIN_TIMEOUT=5s"]).await;
    let mut f = Fixtures::new();
    f.serving("app", "v1");
    f.serving("app", "v2");

    // 40 concurrent first requests over both replicas: one service, 40 answers.
    let v1 = f.host("app", "v1", "example.com");
    let requests = (0..40).map(|i| {
        let (host, addr) = (v1.clone(), if i % 2 == 0 { a.addr } else { b.addr });
        tokio::spawn(async move { get(&host, addr, &format!("/first/{i}")).await })
    });
    for answer in futures_util::future::join_all(requests).await {
        let (status, body) = answer.expect("request task");
        assert_eq!((status, body["id"].as_str()), (200, Some("v1")), "{body}");
    }
    assert_eq!(cluster.services().len(), 1, "40 concurrent first requests over two replicas make one service");

    // v2 on n3, the node without a replica; both replicas reach it.
    let v2 = f.host("app", "v2", "example.com");
    started_on("n3", &v2, &a, Some(r#"{"idle_timeout":"6s"}"#)).await;
    let v2_service = cluster.service_of(&format!("{}/app:v2", f.user));
    let (node, container) = running_task(&v2_service).expect("v2 runs");
    assert_eq!(node, "n3", "v2's task is on n3");
    let (status, body) = get(&v2, b.addr, "/").await;
    assert_eq!((status, body["id"].as_str()), (200, Some("v2")), "{body}");
    assert_eq!(body["hostname"], container[..12], "{body}");

    // Its task killed through n3's engine: both replicas notice without a request.
    let killed = Instant::now();
    let watching = [a.addr, b.addr].map(|addr| tokio::spawn(until_event(v2.clone(), addr, r#""why":"exited""#, killed)));
    tokio::time::sleep(Duration::from_millis(500)).await;
    on_ok("n3", &["kill", &container]);
    for (replica, watch) in ["A", "B"].into_iter().zip(watching) {
        let took = tokio::time::timeout(Duration::from_secs(15), watch).await.expect("noticed within 15 s").expect("watch");
        eprintln!("replica {replica} noticed the task killed on n3 after {took:?}");
    }
    // The next request, through either, is served by a new task.
    for addr in [a.addr, b.addr] {
        let (status, body) = get(&v2, addr, "/after-the-kill").await;
        assert_eq!((status, body["id"].as_str()), (200, Some("v2")), "{body}");
        assert_ne!(body["hostname"], container[..12], "a new task answers: {body}");
    }

    // Idle across nodes: traffic through A only keeps it; a WebSocket from A
    // to a task on n3 stays open past the idle timeout.
    common::eventually("B serves v2's new service", Duration::from_secs(20), || {
        let v2 = v2.clone();
        async move { api(&v2, b.addr, "GET", "/__proxyapi/container", None).await.1["state"] == "running" }
    })
    .await;
    let busy_until = Instant::now() + Duration::from_secs(13);
    while Instant::now() < busy_until {
        let (status, _) = get(&v2, a.addr, "/busy").await;
        assert_eq!(status, 200);
        assert_eq!(replicas(&v2_service), 1, "scaled to 0 while A served it");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut ws = websocket(a.addr, &v2, "v2").await;
    let until = Instant::now() + Duration::from_secs(14);
    while Instant::now() < until {
        assert_eq!(replicas(&v2_service), 1, "scaled to 0 under A's open WebSocket");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(echo(&mut ws, "still").await, "v2: still");
    drop(ws);
    common::eventually("quiet v2 scaled to 0", Duration::from_secs(40), || {
        let id = v2_service.clone();
        async move { replicas(&id) == 0 }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redeploy_and_a_stopping_task_on_a_third_node_fail_no_request() {
    if no_cluster() {
        return;
    }
    let mut cluster = Cluster::new();
    let (a, b) = cluster.replicas_a_and_b(&["PIPES_DRAIN_TIMEOUT=3s"]).await;
    let mut f = Fixtures::new();
    // Its container ignores SIGTERM: a stopped task lingers for the grace period, answering.
    f.publish("app", "v1", "STOPSIGNAL SIGTERM");
    let host = f.host("app", "v1", "example.com");
    started_on("n3", &host, &a, None).await;
    let service = cluster.service_of(&format!("{}/app:v1", f.user));
    assert_eq!(running_task(&service).expect("runs").0, "n3");
    let (status, body) = get(&host, b.addr, "/").await;
    assert_eq!((status, body["id"].as_str()), (200, Some("v1")), "{body}");

    // A redeploy through A, while both replicas carry traffic: no request fails.
    let traffic = Traffic::start(vec![host.clone()], vec![a.addr, b.addr], Duration::from_millis(25), 4000);
    f.push("app", "v1", "v1b", "STOPSIGNAL SIGTERM");
    let (status, body) = api(&host, a.addr, "POST", "/__proxyapi/container/redeploy", None).await;
    assert_eq!(status, 200, "{body}");
    common::eventually("both replicas serve the new generation", Duration::from_secs(60), || {
        let host = host.clone();
        async move { get(&host, a.addr, "/").await.1["id"] == "v1b" && get(&host, b.addr, "/").await.1["id"] == "v1b" }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let answers = traffic.stop().await;
    let failed: Vec<&Answer> = answers.iter().filter(|a| !a.ok).collect();
    assert!(failed.is_empty(), "{} of {} requests failed during the redeploy: {failed:?}", failed.len(), answers.len());
    assert!(answers.iter().all(|a| a.id == "v1" || a.id == "v1b"), "only the deployment answers");
    eprintln!("redeploy across nodes: {} requests, none failed", answers.len());

    // Stopped by an operator and asked for at once: its task lingers, still
    // in the engine's DNS on the other nodes, but only the new task answers.
    let service = lines(&on_ok("n1", &["service", "ls", "-q", "--filter", &format!("label=pipes.instance={}", cluster.instance)]))
        .into_iter()
        .find(|id| running_task(id).is_some())
        .expect("the new generation runs");
    let (node, old) = running_task(&service).expect("runs");
    let (status, body) = api(&host, a.addr, "POST", "/__proxyapi/container/stop", None).await;
    assert_eq!(status, 200, "{body}");
    // Requests all through its grace period (10 s): a new task is started
    // and may take a few seconds to be named on the other nodes; until then
    // requests wait (and time out here), and none may reach the old task.
    let traffic = Traffic::start(vec![host.clone()], vec![a.addr, b.addr], Duration::from_millis(50), 600);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let lingering = on_ok(&node, &["inspect", "-f", "{{.State.Running}}", &old]);
    tokio::time::sleep(Duration::from_secs(8)).await;
    let answers = traffic.stop().await;
    assert_eq!(lingering, "true", "the stopped task still runs in its grace period (on {node})");
    let from_old: Vec<&Answer> = answers.iter().filter(|a| a.hostname == old[..12]).collect();
    assert!(from_old.is_empty(), "requests reached the stopping task: {from_old:?}");
    for addr in [a.addr, b.addr] {
        let (status, body) = get(&host, addr, "/").await;
        assert_eq!(status, 200, "{body}");
        assert_ne!(body["hostname"], old[..12], "the new task answers: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_node_and_a_lost_replica_leave_the_rest_serving() {
    if no_cluster() {
        return;
    }
    let t = LostAndKept::new().await;

    // n3's engine stops: its task goes, the swarm places it again elsewhere.
    let both = [t.lost.clone(), t.kept.clone()];
    let loss = while_losing("n3", &both, &[t.a.addr, t.b.addr]).await;
    let ((failed_lost, recovered), (failed_kept, _)) = (loss.of(0), loss.of(1));
    let placed = task_running_since(&t.lost_service).duration_since(loss.at_time).unwrap_or_default();
    let (through_a, through_b) = (loss.of_via(0, 0).1, loss.of_via(0, 1).1);
    eprintln!(
        "node loss: {failed_lost} failed requests to the lost node's deployment, served again {:.1} s after its engine stopped \
         (through A {:.1} s, through B {:.1} s; the swarm ran its new task after {:.1} s); {failed_kept} failed to a deployment on a \
         healthy node, of {} requests",
        recovered.as_secs_f64(),
        through_a.as_secs_f64(),
        through_b.as_secs_f64(),
        placed.as_secs_f64(),
        loss.answers.len()
    );
    assert_eq!(failed_kept, 0, "no request to a deployment on a healthy node fails");
    let (node, _) = running_task(&t.lost_service).expect("runs again");
    assert_ne!(node, "n3");
    cluster_script(&["start-engine", "n3"]);

    // B's node goes: A serves every deployment.
    let loss = while_losing("n2", &both, &[t.a.addr]).await;
    for (h, name) in [(0, "lost"), (1, "kept")] {
        let (failed, recovered) = loss.of(h);
        eprintln!("replica loss: {failed} failed requests to {name} through A (recovered after {:.1} s)", recovered.as_secs_f64());
        // The lost deployment's new task may have gone to n2.
        if h == 1 || node != "n2" {
            assert_eq!(failed, 0, "{name} ran on a healthy node: no request through A fails");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_engine_restart_with_live_restore_fails_no_warm_request() {
    if no_cluster() {
        return;
    }
    let solo = OnSolo::start(&[]).await;
    assert!(solo.log().contains("live-restore on"), "Pipes says the engine keeps containers through a restart:\n{}", solo.log());
    let mut f = Fixtures::new();
    f.serving("app", "v1");
    let host = f.host("app", "v1", "example.com");
    let (status, body) = get(&host, solo.addr, "/").await;
    assert_eq!((status, body["id"].as_str()), (200, Some("v1")), "{body}");

    // 20 requests a second to the warm deployment; the engine stops and starts meanwhile.
    let (answers, _) = restart_under_load(&host, solo.addr, true).await;
    let failed: Vec<&Answer> = answers.iter().filter(|a| !a.ok).collect();
    assert!(failed.is_empty(), "{} of {} warm requests failed over the engine's restart: {failed:?}", failed.len(), answers.len());
    eprintln!("engine restart with live-restore: {} warm requests, none failed", answers.len());

    // Pipes follows the engine again: a container killed through it leaves
    // the table without a request, and the next request starts it again.
    let container = on_ok("solo", &["ps", "-q", "--filter", &format!("label=pipes.instance={}", solo.instance)]);
    let killed = Instant::now();
    let watch = tokio::spawn(until_event(host.clone(), solo.addr, r#""state":"stopped""#, killed));
    tokio::time::sleep(Duration::from_millis(500)).await;
    on_ok("solo", &["kill", container.lines().next().expect("its container")]);
    let took = tokio::time::timeout(Duration::from_secs(30), watch).await.expect("the kill is noticed").expect("watch");
    eprintln!("after the restart, a killed container was noticed in {took:?}");
    let (status, body) = get(&host, solo.addr, "/again").await;
    assert_eq!((status, body["id"].as_str()), (200, Some("v1")), "{body}");
}

/// A Docker secret on the swarm, labelled with the test's instance.
fn secret(cluster: &Cluster, name: &str, value: &str) {
    use std::io::Write;
    let mut child = Command::new("docker")
        .args(["-H", &format!("unix://{}", socket("n1")), "secret", "create", "--label", &format!("pipes.instance={}", cluster.instance), name, "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("docker runs");
    child.stdin.take().expect("stdin").write_all(value.as_bytes()).expect("secret written");
    assert!(child.wait().expect("docker secret create").success(), "cannot create secret {name}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_stack_file_runs_a_replica_on_every_manager() {
    if no_cluster() {
        return;
    }
    let e = env();
    let mut cluster = Cluster::new();
    let stack = unique("pipesstack");
    cluster.stacks.push(stack.clone());
    let secrets = [unique("pipes-test-token"), unique("pipes-test-registry-password")];
    secret(&cluster, &secrets[0], TOKEN);
    secret(&cluster, &secrets[1], &e.password);
    let mut f = Fixtures::new();
    f.serving("app", "v1");
    let port = common::free_port();
    let out = Command::new("docker")
        .args(["-H", &format!("unix://{}", socket("n1")), "stack", "deploy", "-c", concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/pipes-stack.yml"), &stack])
        .envs([
            ("PIPES_IMAGE", cluster.image.clone()),
            ("PIPES_NETWORK", unique("pipes-stack-net")),
            ("PIPES_INSTANCE", cluster.instance.clone()),
            ("PIPES_ALLOW", "*".to_owned()),
            ("PIPES_REGISTRY", REGISTRY.to_owned()),
            ("PIPES_LABELS", format!("pipes.test={}", e.run)),
            ("DOCKER_AUTH_USERNAME", e.user.clone()),
            ("PIPES_PORT", port.to_string()),
            ("PIPES_REPLICAS", "3".to_owned()),
            ("PIPES_API_TOKEN_SECRET", secrets[0].clone()),
            ("PIPES_REGISTRY_PASSWORD_SECRET", secrets[1].clone()),
        ])
        .output()
        .expect("docker stack deploy runs");
    assert!(out.status.success(), "docker stack deploy: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));

    // A replica on every manager, each on its node's address.
    let host = f.host("app", "v1", "example.com");
    for node in SWARM_NODES {
        let addr = SocketAddr::from((address(node), port));
        until_answering(addr).await;
        let (status, body) = get(&host, addr, &format!("/through-{node}")).await;
        assert_eq!((status, body["id"].as_str()), (200, Some("v1")), "through {node}: {body}");
    }
    assert_eq!(cluster.services().len(), 1, "one service for the deployment, whichever replica started it: {:?}", cluster.services());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_pinned_to_a_lost_node_waits_for_it_and_keeps_its_rows() {
    if no_cluster() {
        return;
    }
    let mut cluster = Cluster::new();
    let (a, b) = cluster.replicas_a_and_b(&["PIPES_START_TIMEOUT=20s"]).await;
    let mut f = Fixtures::new();
    let e = env();
    f.publish_from(&e.postgres, "postgres", "15", "");
    f.publish_from(&e.redis, "redis", "7", "");
    f.publish_from(&e.app, "shop", "v1", "ENV APP_ID=v1");
    let host = f.host("shop", "v1", "example.com");
    // Made through B: the database and its volume are on n2, B's node.
    let config = format!(
        r#"{{"port": 8000, "services": {{
              "db": {{"image": "{user}/postgres:15", "cmd": ["-c", "fsync=off"], "volumes": {{"pgdata": "/var/lib/postgresql/data"}},
                      "health": {{"cmd": ["/usr/lib/postgresql/15/bin/pg_isready", "-h", "127.0.0.1", "-U", "postgres"], "timeout": "20s"}}}},
              "cache": {{"image": "{user}/redis:7", "health": {{"tcp": 6379}}}}}}}}"#,
        user = f.user
    );
    let (status, body) = api(&host, b.addr, "PUT", "/__proxyapi/container/config", Some(&config)).await;
    assert_eq!(status, 200, "{body}");
    let resp = client(&host, b.addr).post(format!("http://{host}:{}/notes", b.addr.port())).body("kept on n2").send().await.expect("answer");
    assert_eq!(resp.status().as_u16(), 201, "{}", resp.text().await.unwrap_or_default());
    let (_, state) = api(&host, b.addr, "GET", "/__proxyapi/container", None).await;
    let db = state["services"]["db"]["container"].as_str().expect("db's service").to_owned();
    assert_eq!(running_task(&db).expect("db runs").0, "n2");

    // n2 lost (and B with it): the database is not made again elsewhere,
    // empty; a request through A fails rather than serve without its rows.
    cluster_script(&["stop-engine", "n2"]);
    common::eventually("the swarm calls n2 down", Duration::from_secs(120), || async {
        on_ok("n1", &["node", "inspect", "-f", "{{.Status.State}}", "pipes-n2"]) == "down"
    })
    .await;
    let (status, body) = get(&host, a.addr, "/notes").await;
    assert!(status >= 500, "no answer without the database's node: {status} {body}");
    assert!(running_task(&db).is_none(), "the database runs nowhere else");
    for node in ["n1", "n3"] {
        let volumes = on_ok(node, &["volume", "ls", "-q", "--filter", "label=pipes.service=db"]);
        assert!(volumes.is_empty(), "no empty database volume made on {node}: {volumes}");
    }

    // n2 back: the next request through A is served with the rows kept there.
    cluster_script(&["start-engine", "n2"]);
    common::eventually("the shop answers with its note through A", Duration::from_secs(120), || {
        let host = host.clone();
        async move {
            let (status, body) = get(&host, a.addr, "/notes").await;
            status == 200 && body["notes"] == serde_json::json!(["kept on n2"])
        }
    })
    .await;
}

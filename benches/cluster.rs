//! Failover on a real three-node swarm (scripts/cluster, which
//! `scripts/bench cluster` brings up): what losing a node, losing a Pipes
//! replica, and restarting an engine cost a steady request loop — 20
//! requests a second per deployment and replica, each given 2 s.
//!
//! - Node loss: n3's engine stops while a deployment's task runs there; the
//!   swarm places it again, Pipes follows. Requests to a deployment on a
//!   healthy node must not fail.
//! - Replica loss: n2's engine stops, taking replica B; A serves on.
//! - Engine restart: the `solo` engine, with live-restore and then without,
//!   stops and starts under Pipes (Docker backend, a process on that node).
//!
//! Prints the figures and writes `target/bench-results/cluster.md`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::time::Duration;

use common::cluster::*;

fn main() {
    if state().is_none() {
        eprintln!("skipped: no three-node cluster (run through scripts/bench cluster)");
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().expect("runtime");
    let out = runtime.block_on(run());
    print!("{out}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-results");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("cluster.md"), out);
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

async fn run() -> String {
    let mut out =
        String::from("| case | deployment | requests | failed | served again after | the swarm ran its new task after |\n|---|---|---:|---:|---:|---:|\n");
    let t = LostAndKept::new().await;
    let both = [t.lost.clone(), t.kept.clone()];

    let loss = while_losing("n3", &both, &[t.a.addr, t.b.addr]).await;
    let placed = task_running_since(&t.lost_service).duration_since(loss.at_time).unwrap_or_default();
    for (h, name) in [(0, "on the lost node"), (1, "on a healthy node")] {
        for (via, through) in [(0, "A"), (1, "B")] {
            let (failed, recovered) = loss.of_via(h, via);
            let requests = loss.answers.iter().filter(|a| a.host == h && a.via == via && a.at >= loss.at).count();
            let swarm = if h == 0 { secs(placed) } else { "—".into() };
            let _ = writeln!(out, "| node loss (n3), through {through} | {name} | {requests} | {failed} | {} | {swarm} |", secs(recovered));
        }
    }
    let (node, _) = running_task(&t.lost_service).unwrap_or_default();
    cluster_script(&["start-engine", "n3"]);

    let loss = while_losing("n2", &both, &[t.a.addr]).await;
    for (h, name) in [(0, format!("its task on {node}")), (1, "its task on n1".to_owned())] {
        let (failed, recovered) = loss.of(h);
        let requests = loss.answers.iter().filter(|a| a.host == h && a.at >= loss.at).count();
        let _ = writeln!(out, "| replica loss (n2, with B), through A | {name} | {requests} | {failed} | {} | — |", secs(recovered));
    }
    drop(t);

    // One engine, restarted with live-restore and then without (the switch
    // itself is not measured), then left with it again.
    let solo = OnSolo::start(&[]).await;
    let mut f = common::Fixtures::new();
    f.serving("app", "v1");
    let host = f.host("app", "v1", "example.com");
    assert_eq!(get(&host, solo.addr, "/").await.0, 200);
    for live in [true, false] {
        if !live {
            cluster_script(&["stop-engine", "solo"]);
            cluster_script(&["start-engine", "solo", "false"]);
            assert_eq!(get(&host, solo.addr, "/").await.0, 200);
        }
        let (answers, at) = restart_under_load(&host, solo.addr, live).await;
        let (failed, recovered) = outage(&answers, 0, at);
        let requests = answers.iter().filter(|a| a.at >= at).count();
        let case = if live { "engine restart, live-restore on" } else { "engine restart, live-restore off" };
        let _ = writeln!(out, "| {case} | warm, Docker backend | {requests} | {failed} | {} | — |", secs(recovered));
    }
    cluster_script(&["stop-engine", "solo"]);
    cluster_script(&["start-engine", "solo"]);
    out
}

//! Instructions per proxied request: Pipes against nginx, HAProxy, Caddy and
//! a bare Pingora proxy, counted by callgrind.
//!
//! Requests per second on a two-core machine that also runs the load, the
//! port proxy and the upstream move by a tenth or more from run to run, and
//! more with what else the host does; a change of a few percent to the warm
//! path cannot be seen that way. The instructions a proxy executes per
//! request can: callgrind counts them, the same from run to run for the same
//! binary. The proxies run under callgrind (nginx with one worker and no
//! master process; HAProxy with two threads, Caddy with GOMAXPROCS=2, Pipes
//! and the bare proxy with two threads, both with Pipes' allocator; and
//! Pipes once more with metrics and the JSON access log on, for what
//! recording costs; and with each kind of access rule: `noindex`
//! off, `basic` with the right credentials on every request, `forward_auth`
//! to an auth server in this process that lets everything through) in front
//! of the same fixture image; wrk sends 3-byte keep-alive requests for a fixed time;
//! the counters are zeroed before and dumped after. Prints instructions per
//! request for each, the ratios, and the functions Pipes spends most in, and
//! writes `target/bench-results/instructions.md`. Run through `scripts/bench`.
//!
//! `PIPES_BENCH_KEEP=1` keeps callgrind's dumps and prints where they are.
//!
//! Copies (`memcpy`/`memmove`) are shown apart: callgrind counts `rep movsb`
//! once per byte, so they weigh more here than in time.

#[path = "support/bare.rs"]
mod bare;
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/load.rs"]
mod load;
#[path = "support/proxies.rs"]
mod proxies;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{docker_ok, env, Pipes};
use load::*;
use proxies::Proxy;

// Pipes' allocator, for the bare proxy this binary becomes.
#[global_allocator]
static GLOBAL: pipes::alloc::Allocator = pipes::alloc::Allocator;

fn main() {
    bare::run_if_asked();
    tokio::runtime::Runtime::new().expect("runtime").block_on(bench());
}

async fn bench() {
    let e = env();
    let seconds = setting("PIPES_BENCH_SECONDS", 10);
    docker_ok(&["tag", &e.fixture, &format!("{}/bench/warm:v1", e.registry)]);
    let dir = std::env::temp_dir().join(format!("pipes-bench-instructions-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("pipes.yaml");
    std::fs::write(&conf, "---\nversion: 1\nthreads: 2\ngrace_period_seconds: 1\ngraceful_shutdown_timeout_seconds: 1\n").unwrap();
    // Pipes under callgrind, writing to `out`, with settings `extra`.
    let counted_pipes = |out: &Path, extra: &[(&str, &str)]| {
        let mut changes = vec![
            ("PIPES_SERVER_CONF", Some(conf.to_str().unwrap())),
            ("PIPES_ALLOW", Some("bench/*")),
            // Everything runs some fifty times slower under callgrind.
            ("PIPES_START_TIMEOUT", Some("180s")),
            ("RUST_LOG", Some("warn")),
        ];
        changes.extend(extra.iter().map(|(k, v)| (*k, Some(*v))));
        Pipes::start_under(&callgrind(out).each_ref().map(String::as_str), &changes)
    };
    let metrics = format!("127.0.0.1:{}", free_port());
    let auth_port = auth_server();
    let basic = format!(r#"{{"basic":{{"bench":"{}"}}}}"#, bcrypt::hash("bench", 4).unwrap());
    let forward = format!(r#"{{"forward_auth":{{"url":"http://127.0.0.1:{auth_port}/auth"}}}}"#);
    let authorization = "Basic YmVuY2g6YmVuY2g="; // bench:bench
    let script = dir.join("basic.lua");
    std::fs::write(&script, format!("wrk.headers[\"Authorization\"] = \"{authorization}\"\n")).unwrap();
    let outs: Vec<PathBuf> = ["pipes", "recording", "noindex", "basic", "forward"].iter().map(|n| dir.join(format!("{n}.callgrind"))).collect();
    let pipes = counted_pipes(&outs[0], &[]);
    let recording = counted_pipes(&outs[1], &[("PIPES_METRICS_LISTEN", &metrics), ("PIPES_ACCESS_LOG", "json")]);
    let noindex = counted_pipes(&outs[2], &[("PIPES_NOINDEX", "false")]);
    let with_basic = counted_pipes(&outs[3], &[("PIPES_ACCESS", &basic)]);
    let with_forward = counted_pipes(&outs[4], &[("PIPES_ACCESS", &forward)]);
    for p in [&pipes, &recording, &noindex, &with_forward] {
        assert_eq!(p.get(HOST, "/bytes/3").await.status(), 200);
    }
    let first = with_basic.client(HOST).get(with_basic.url(HOST, "/bytes/3")).header("authorization", authorization).send().await.unwrap();
    assert_eq!(first.status(), 200);
    let container = pipes.containers()[0].clone();
    let upstream = upstream_of(&container);
    let (nginx_out, haproxy_out, caddy_out) = (dir.join("nginx.callgrind"), dir.join("haproxy.callgrind"), dir.join("caddy.callgrind"));
    let nginx = Proxy::nginx(&callgrind(&nginx_out).each_ref().map(String::as_str), upstream, 1, &[], None);
    let haproxy = Proxy::haproxy(&callgrind(&haproxy_out).each_ref().map(String::as_str), upstream, 2, None);
    let caddy = Proxy::caddy(&callgrind(&caddy_out).each_ref().map(String::as_str), upstream, 2, None);
    let bare_out = dir.join("bare.callgrind");
    let bare_port = free_port();
    let bare = Process(bare::command(&callgrind(&bare_out).each_ref().map(String::as_str), bare_port, upstream, &conf).spawn().expect("bare proxy starts"));
    // Under callgrind it takes some ten seconds to start.
    wait_listening_within(bare_port, "bare Pingora", Duration::from_secs(60));

    let mut commands = Vec::new();
    let mut counted = Vec::new();
    let pid = |p: &Pipes| p.pid().expect("pipes runs");
    for (name, port, pid, out, script) in [
        ("nginx", nginx.port, nginx.pid(), &nginx_out, None),
        ("HAProxy", haproxy.port, haproxy.pid(), &haproxy_out, None),
        ("Caddy", caddy.port, caddy.pid(), &caddy_out, None),
        ("bare Pingora", bare_port, bare.0.id(), &bare_out, None),
        ("Pipes", pipes.port, pid(&pipes), &outs[0], None),
        ("Pipes, metrics and access log on", recording.port, pid(&recording), &outs[1], None),
        ("Pipes, noindex off", noindex.port, pid(&noindex), &outs[2], None),
        ("Pipes, access basic", with_basic.port, pid(&with_basic), &outs[3], Some(script.as_path())),
        ("Pipes, access forward_auth", with_forward.port, pid(&with_forward), &outs[4], None),
    ] {
        let url = format!("http://127.0.0.1:{port}/bytes/3");
        // Warm: upstream connections made, lazy state set up.
        wrk(&url, true, script, 1, &mut Vec::new());
        callgrind_control("-z", pid);
        let mut command = Vec::new();
        let load = wrk(&url, true, script, seconds, &mut command);
        // One line for all three: only the port differs.
        for line in command.into_iter().map(|c| c.replace(&format!(":{port}/"), ":PORT/")) {
            if !commands.contains(&line) {
                commands.push(line);
            }
        }
        callgrind_control("-d", pid);
        assert!(load.requests > 0 && load.errors == 0, "{name}: {load:?}");
        counted.push((name, load.requests, self_costs(&latest_dump(out))));
    }

    let total = |costs: &HashMap<String, u64>| costs.values().sum::<u64>();
    let copies = |costs: &HashMap<String, u64>| costs.iter().filter(|(f, _)| f.contains("memcpy") || f.contains("memmove")).map(|(_, c)| c).sum::<u64>();
    let per = |c: u64, n: u64| c as f64 / n as f64;
    let (_, nginx_requests, nginx_costs) = &counted[0];
    let nginx_rest = per(total(nginx_costs) - copies(nginx_costs), *nginx_requests);
    let mut out = String::new();
    writeln!(out, "| proxy | requests | instructions per request | of which copies | the rest | the rest vs nginx |").unwrap();
    writeln!(out, "|---|---|---|---|---|---|").unwrap();
    for (name, requests, costs) in &counted {
        let rest = per(total(costs) - copies(costs), *requests);
        writeln!(
            out,
            "| {name} | {requests} | {:.0} | {:.0} | {rest:.0} | {:.2} |",
            per(total(costs), *requests),
            per(copies(costs), *requests),
            rest / nginx_rest
        )
        .unwrap();
    }
    let find = |name: &str| counted.iter().position(|c| c.0 == name).expect("a counted proxy");
    let rest_of = |i: usize| per(total(&counted[i].2) - copies(&counted[i].2), counted[i].1);
    let (bare_rest, pipes_rest, recording_rest) = (rest_of(find("bare Pingora")), rest_of(find("Pipes")), rest_of(find("Pipes, metrics and access log on")));
    let (_, pipes_requests, pipes_costs) = &counted[find("Pipes")];
    writeln!(out, "\nPipes over the bare proxy: {:.0} instructions per request besides copies ({:.2}×).", pipes_rest - bare_rest, pipes_rest / bare_rest)
        .unwrap();
    writeln!(out, "Metrics and the access log: {:.0} more ({:.2}× plain Pipes).", recording_rest - pipes_rest, recording_rest / pipes_rest).unwrap();
    for (name, requests, costs) in &counted[find("Pipes, metrics and access log on") + 1..] {
        let rest = per(total(costs) - copies(costs), *requests);
        writeln!(out, "{name}: {:+.0} ({:.3}× plain Pipes).", rest - pipes_rest, rest / pipes_rest).unwrap();
    }
    let mut top: Vec<(&String, &u64)> = pipes_costs.iter().collect();
    top.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    writeln!(out, "\nPipes' costliest functions, own instructions per request:\n\n| instructions | function |\n|---|---|").unwrap();
    for (function, cost) in top.into_iter().take(15) {
        let shown: String = function.chars().take(120).collect();
        writeln!(out, "| {:.0} | `{shown}` |", per(*cost, *pipes_requests)).unwrap();
    }
    writeln!(
        out,
        "\nLoad: {}, {seconds} s each, after 1 s of warming; nginx 1 worker, upstream keepalive 128; HAProxy 2 threads; Caddy GOMAXPROCS=2; Pipes and the bare proxy `threads: 2`; {}.",
        commands.join("; "),
        version("valgrind", &["--version"])
    )
    .unwrap();
    print!("{out}");
    let results = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-results");
    let _ = std::fs::create_dir_all(&results);
    let _ = std::fs::write(results.join("instructions.md"), out);
    drop((nginx, haproxy, caddy));
    drop(bare);
    drop((pipes, recording, noindex, with_basic, with_forward));
    // PIPES_BENCH_KEEP keeps the dumps, for `callgrind_annotate --inclusive=yes`.
    if std::env::var_os("PIPES_BENCH_KEEP").is_some() {
        println!("callgrind dumps kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The command line that runs a program under callgrind, writing to `out`.
fn callgrind(out: &Path) -> [String; 3] {
    ["valgrind".to_owned(), "--tool=callgrind".to_owned(), format!("--callgrind-out-file={}", out.display())]
}

/// An auth server for `access.forward_auth` on 127.0.0.1 that lets every
/// request through, keeping connections open; its port.
fn auth_server() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                use std::io::{BufRead, Write};
                let mut reader = std::io::BufReader::new(conn.try_clone().expect("clone"));
                let mut writer = conn;
                let mut line = String::new();
                loop {
                    line.clear();
                    match reader.read_line(&mut line) {
                        Ok(0) | Err(_) => return,
                        // The end of a head (GET has no body): answer it.
                        Ok(_) if line == "\r\n" => {
                            if writer.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                    }
                }
            });
        }
    });
    port
}

fn callgrind_control(flag: &str, pid: u32) {
    let status = Command::new("callgrind_control").args([flag, &pid.to_string()]).output().expect("callgrind_control runs").status;
    assert!(status.success(), "callgrind_control {flag} {pid}: {status}");
}

/// The newest dump callgrind wrote beside `base` (`base.1`, `base.2`, …),
/// once it is complete.
fn latest_dump(base: &Path) -> PathBuf {
    let prefix = format!("{}.", base.file_name().unwrap().to_string_lossy());
    for _ in 0..100 {
        let mut dumps: Vec<(u32, PathBuf)> = std::fs::read_dir(base.parent().unwrap())
            .unwrap()
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().to_string_lossy().into_owned();
                let n = name.strip_prefix(&prefix)?.split('-').next()?.parse().ok()?;
                Some((n, entry.path()))
            })
            .collect();
        dumps.sort();
        // callgrind writes `totals:` last.
        if let Some((_, path)) = dumps.pop().filter(|(_, p)| std::fs::read_to_string(p).is_ok_and(|t| t.contains("\ntotals:"))) {
            return path;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("no complete callgrind dump beside {}", base.display());
}

/// Instructions executed in each function itself (not in what it calls),
/// from a callgrind dump: cost lines count toward the current `fn=`, except
/// the line after each `calls=`, which is the call's inclusive cost.
fn self_costs(path: &Path) -> HashMap<String, u64> {
    let text = std::fs::read_to_string(path).expect("callgrind dump");
    let mut names: HashMap<String, String> = HashMap::new();
    let mut costs: HashMap<String, u64> = HashMap::new();
    let mut current = String::new();
    let mut after_call = false;
    // Compressed names: `(12) name` the first time, `(12)` after.
    let mut name = |spec: &str| match spec.strip_prefix('(').and_then(|s| s.split_once(')')) {
        Some((id, rest)) if !rest.trim().is_empty() => {
            names.insert(id.to_owned(), rest.trim().to_owned());
            rest.trim().to_owned()
        }
        Some((id, _)) => names.get(id).cloned().unwrap_or_else(|| spec.to_owned()),
        None => spec.to_owned(),
    };
    for line in text.lines() {
        if let Some(spec) = line.strip_prefix("fn=") {
            current = name(spec);
        } else if let Some(spec) = line.strip_prefix("cfn=") {
            name(spec);
        } else if line.starts_with("calls=") {
            after_call = true;
        } else if line.starts_with(|c: char| c.is_ascii_digit() || c == '+' || c == '-' || c == '*') {
            if std::mem::take(&mut after_call) {
                continue;
            }
            if let Some(cost) = line.split_whitespace().nth(1).and_then(|c| c.parse::<u64>().ok()) {
                *costs.entry(current.clone()).or_default() += cost;
            }
        }
    }
    costs
}

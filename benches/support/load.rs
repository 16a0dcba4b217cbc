//! What the load benchmarks share: wrk runs and their figures, child
//! processes. The reference proxies are in `proxies.rs`.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use std::net::SocketAddr;

use crate::common::{docker, docker_ok};

/// The host every load is sent for.
pub const HOST: &str = "v1.warm.bench.example.com";
/// Connections wrk keeps open.
pub const CONNECTIONS: usize = 32;

/// What wrk measured in one run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Load {
    /// Requests answered in the run.
    pub requests: u64,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
}

pub fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Runs wrk once; `script` may replace the request (several hosts).
pub fn wrk(url: &str, keepalive: bool, script: Option<&Path>, seconds: u64, commands: &mut Vec<String>) -> Load {
    let mut args =
        vec!["-t1".to_owned(), format!("-c{CONNECTIONS}"), format!("-d{seconds}s"), "--latency".to_owned(), "-H".to_owned(), format!("Host: {HOST}")];
    if !keepalive {
        args.extend(["-H".to_owned(), "Connection: close".to_owned()]);
    }
    if let Some(s) = script {
        args.extend(["-s".to_owned(), s.display().to_string()]);
    }
    args.push(url.to_owned());
    let line = format!("wrk {}", args.iter().map(|a| if a.contains(' ') { format!("'{a}'") } else { a.clone() }).collect::<Vec<_>>().join(" "));
    if !commands.contains(&line) {
        commands.push(line);
    }
    let out = Command::new("wrk").args(&args).output().expect("wrk runs");
    parse_wrk(&String::from_utf8_lossy(&out.stdout))
}

pub fn parse_wrk(text: &str) -> Load {
    let mut load = Load::default();
    for line in text.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("Requests/sec:"), Some(v)) => load.rps = v.parse().unwrap_or(0.0),
            (Some(n), Some("requests")) => load.requests = n.parse().unwrap_or(0),
            (Some("50%"), Some(v)) => load.p50_ms = millis(v),
            (Some("99%"), Some(v)) => load.p99_ms = millis(v),
            (Some("Non-2xx"), _) => load.errors += line.rsplit(' ').next().and_then(|n| n.parse().ok()).unwrap_or(0),
            (Some("Socket"), Some("errors:")) => {
                load.errors += line.split(',').filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok()).sum::<u64>()
            }
            _ => {}
        }
    }
    load
}

fn millis(v: &str) -> f64 {
    let (number, factor) = if let Some(n) = v.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000.0)
    } else {
        (v, 1.0)
    };
    number.parse::<f64>().unwrap_or(f64::NAN) * factor
}

pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

/// The median of each figure over rounds.
pub fn summary(runs: &[Load]) -> Load {
    Load {
        rps: median(runs.iter().map(|l| l.rps).collect()),
        p50_ms: median(runs.iter().map(|l| l.p50_ms).collect()),
        p99_ms: median(runs.iter().map(|l| l.p99_ms).collect()),
        errors: runs.iter().map(|l| l.errors).sum(),
        requests: runs.iter().map(|l| l.requests).sum(),
    }
}

/// A wrk run with what the proxy spent on it: CPU time (user + system, µs)
/// and context switches per request, NaN where no process was counted.
#[derive(Debug, Clone, Copy)]
pub struct Counted {
    pub load: Load,
    pub cpu_us: f64,
    pub switches: f64,
}

impl Counted {
    /// Medians over rounds.
    pub fn summary(runs: &[Counted]) -> Counted {
        Counted {
            load: summary(&runs.iter().map(|r| r.load).collect::<Vec<_>>()),
            cpu_us: median(runs.iter().map(|r| r.cpu_us).collect()),
            switches: median(runs.iter().map(|r| r.switches).collect()),
        }
    }
}

/// Runs `run` and counts what `process` (and its children) spent meanwhile.
pub fn counted(process: Option<u32>, run: impl FnOnce() -> Load) -> Counted {
    // Clock ticks per second of /proc's CPU times.
    const TICKS: f64 = 100.0;
    let before = process.map(switches_and_cpu);
    let load = run();
    let after = process.map(switches_and_cpu);
    let requests = load.requests.max(1) as f64;
    match (before, after) {
        (Some((s0, c0)), Some((s1, c1))) => Counted { load, cpu_us: (c1 - c0) as f64 / TICKS * 1e6 / requests, switches: (s1 - s0) as f64 / requests },
        _ => Counted { load, cpu_us: f64::NAN, switches: f64::NAN },
    }
}

/// A figure with `decimals` decimals, or a dash where there is none.
pub fn shown(value: f64, decimals: usize) -> String {
    if value.is_finite() {
        format!("{value:.decimals$}")
    } else {
        "—".to_owned()
    }
}

pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        .unwrap_or(0)
}

pub fn version(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| {
            let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
            text.lines().next().unwrap_or("").trim().to_owned()
        })
        .unwrap_or_else(|_| "not found".into())
}

/// A child process, stopped with SIGTERM (and waited for) on drop.
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        let _ = self.0.wait();
    }
}

/// Context switches (voluntary and not) and CPU time (user + system, in
/// clock ticks) so far of every thread of `pid` and of its child processes
/// (nginx's workers), from `/proc`.
pub fn switches_and_cpu(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis; utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let mut cpu = fields.get(11).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0) + fields.get(12).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    let mut switches = 0;
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return (0, 0) };
    for task in tasks.flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        switches += status
            .lines()
            .filter(|l| l.starts_with("voluntary_ctxt_switches:") || l.starts_with("nonvoluntary_ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum::<u64>();
        let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        for (s, c) in children.split_whitespace().filter_map(|c| c.parse().ok()).map(switches_and_cpu) {
            switches += s;
            cpu += c;
        }
    }
    (switches, cpu)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn wait_listening(port: u16, what: &str) {
    wait_listening_within(port, what, Duration::from_secs(10));
}

/// Waits until 127.0.0.1:`port` accepts connections, at most `limit`.
pub fn wait_listening_within(port: u16, what: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Where Pipes reaches a container's port 80, for the systems it is
/// compared with: the port published on 127.0.0.1 if the container has one,
/// else the container's IP on its network.
pub fn upstream_of(container: &str) -> SocketAddr {
    let published = docker(&["port", container, "80/tcp"]);
    let port = String::from_utf8_lossy(&published.stdout).lines().next().and_then(|l| l.rsplit(':').next()).and_then(|p| p.parse::<u16>().ok());
    if let (true, Some(port)) = (published.status.success(), port) {
        return SocketAddr::from(([127, 0, 0, 1], port));
    }
    let ip = docker_ok(&["inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}", container]);
    let ip = ip.split_whitespace().next().and_then(|ip| ip.parse::<std::net::IpAddr>().ok()).expect("the container's IP");
    SocketAddr::new(ip, 80)
}

//! The metrics listener (`PIPES_METRICS_LISTEN`): Prometheus text at
//! `/metrics`. What requests, starts and redeploys counted comes from
//! [`crate::metrics`]; what is true now (deployment states, open
//! connections, certificates, the process) is read at each scrape.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use tokio::sync::Semaphore;

use crate::access_log::AccessLog;
use crate::fleet::{Fleet, State};
use crate::metrics::{Exposition, Metrics};
use crate::proxy::IN_FLIGHT;
use crate::tls::Acme;

/// The `/metrics` endpoint.
pub struct Scrape {
    pub metrics: Arc<Metrics>,
    pub fleet: Arc<Fleet>,
    pub acme: Option<Arc<Acme>>,
    pub access_log: Option<Arc<AccessLog>>,
    /// The gate's places and how many there are: open client connections.
    pub connections: (Arc<Semaphore>, usize),
}

#[async_trait]
impl ServeHttp for Scrape {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let (status, content_type, body) = match session.req_header().uri.path() {
            "/metrics" => (200, "text/plain; version=0.0.4; charset=utf-8", self.text().into_bytes()),
            _ => (404, "text/plain; charset=utf-8", b"metrics are at /metrics\n".to_vec()),
        };
        Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, content_type)
            .header(http::header::CONTENT_LENGTH, body.len())
            .body(body)
            .unwrap_or_default()
    }
}

impl Scrape {
    fn text(&self) -> String {
        let mut out = Exposition::default();
        self.metrics.write(&mut out);

        let slots = self.fleet.slots();
        let paused = self.fleet.paused_deployments();
        let shown = [State::Running, State::Starting, State::Paused, State::Stopped, State::Failed];
        let mut states: BTreeMap<&str, usize> = shown.into_iter().map(|s| (s.as_str(), 0)).collect();
        let mut open: BTreeMap<&str, usize> = BTreeMap::new();
        for slot in &slots {
            let state = match self.fleet.table_state(slot) {
                State::Stopped if paused.contains(&slot.deployment) => State::Paused,
                state => state,
            };
            *states.entry(state.as_str()).or_default() += 1;
            if let (Some(up), Some(m)) = (slot.upstream(), &slot.metrics) {
                *open.entry(m.label()).or_default() += up.open();
            }
        }
        out.family("pipes_deployments", "gauge", "Deployments in Pipes' table, by state.");
        for (state, n) in &states {
            out.sample("pipes_deployments", &[("state", state)], *n as f64);
        }
        out.family("pipes_open_connections", "gauge", "Requests, WebSockets and streams open on a deployment now.");
        for (label, n) in &open {
            out.sample("pipes_open_connections", &[("deployment", label)], *n as f64);
        }
        out.family("pipes_requests_in_flight", "gauge", "Requests Pipes is handling now.");
        out.sample("pipes_requests_in_flight", &[], IN_FLIGHT.total() as f64);
        let (places, max) = &self.connections;
        out.family("pipes_client_connections", "gauge", "Client connections open now (at most PIPES_MAX_CONNECTIONS).");
        out.sample("pipes_client_connections", &[], max.saturating_sub(places.available_permits()) as f64);
        if let Some(acme) = &self.acme {
            out.family("pipes_certificate_expiry_timestamp_seconds", "gauge", "When each obtained certificate expires (Unix time).");
            for (name, expires) in acme.expiries() {
                out.sample("pipes_certificate_expiry_timestamp_seconds", &[("name", &name)], expires as f64);
            }
        }
        if let Some(log) = &self.access_log {
            out.family("pipes_access_log_dropped_total", "counter", "Access log lines dropped because standard output was not read fast enough.");
            out.sample("pipes_access_log_dropped_total", &[], log.dropped() as f64);
        }
        process(&mut out);
        out.into_string()
    }
}

/// The process metrics every Prometheus client library exports, from /proc.
fn process(out: &mut Exposition) {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return };
    // Fields after the command name, which is in parentheses and may hold spaces.
    let Some(fields) = stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect::<Vec<_>>()) else { return };
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
    // SAFETY: sysconf only reads a system constant.
    let (ticks, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK) as f64, libc::sysconf(libc::_SC_PAGESIZE) as f64) };
    if let (Some(utime), Some(stime)) = (field(14), field(15)) {
        out.family("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.");
        out.sample("process_cpu_seconds_total", &[], (utime + stime) / ticks);
    }
    if let Some(vsize) = field(23) {
        out.family("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.");
        out.sample("process_virtual_memory_bytes", &[], vsize);
    }
    if let Some(rss) = field(24) {
        out.family("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.");
        out.sample("process_resident_memory_bytes", &[], rss * page);
    }
    let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| s.lines().find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok()));
    if let (Some(boot), Some(start)) = (boot, field(22)) {
        out.family("process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds.");
        out.sample("process_start_time_seconds", &[], boot + start / ticks);
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        out.family("process_open_fds", "gauge", "Number of open file descriptors.");
        out.sample("process_open_fds", &[], fds.count() as f64);
    }
    if let Some(max) = crate::host::open_files_limit().map(|n| n as f64) {
        out.family("process_max_fds", "gauge", "Maximum number of open file descriptors.");
        out.sample("process_max_fds", &[], max);
    }
}

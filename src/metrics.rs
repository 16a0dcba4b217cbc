//! What Pipes counts for Prometheus, and the text format it is served in
//! (the listener is [`crate::scrape`]).
//!
//! The warm path records into its deployment's own [`DeploymentMetrics`],
//! reached through the slot the request already holds: a few relaxed atomic
//! adds, no map lookup, no lock. Labels are bounded: the first
//! `PIPES_METRICS_MAX_DEPLOYMENTS` deployments get their own, later ones
//! share `deployment="other"`, and requests Pipes answered without a
//! deployment (unknown hosts, denied names, the API on the bare domain)
//! count as `deployment="none"`.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::route::Deployment;

/// Status codes counted without a lock; others go to a map.
const CODES: [u16; 24] = [200, 201, 202, 204, 206, 301, 302, 303, 304, 307, 308, 400, 401, 403, 404, 405, 408, 413, 429, 431, 500, 502, 503, 504];
/// Upper bounds (seconds) of the request duration buckets.
const REQUEST_BUCKETS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Upper bounds (seconds) of the cold-start phase buckets.
const PHASE_BUCKETS: [f64; 12] = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

/// A step of a cold start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    Pull,
    Create,
    Start,
    Probe,
    /// A service beside the app, from its start until it is healthy.
    Service(Arc<str>),
}

/// Most services timed apart in `pipes_cold_start_phase_seconds`; later
/// names share `service:other`.
const MAX_SERVICE_PHASES: usize = 64;

impl Phase {
    const ALL: [Phase; 4] = [Phase::Pull, Phase::Create, Phase::Start, Phase::Probe];

    /// The phase's name in metrics and events: `service:{name}` for a service.
    pub fn name(&self) -> std::borrow::Cow<'static, str> {
        match self {
            Phase::Pull => "pull".into(),
            Phase::Create => "create".into(),
            Phase::Start => "start".into(),
            Phase::Probe => "probe".into(),
            Phase::Service(name) => format!("service:{name}").into(),
        }
    }

    /// Where the fixed phases keep their histogram.
    fn index(&self) -> Option<usize> {
        match self {
            Phase::Pull => Some(0),
            Phase::Create => Some(1),
            Phase::Start => Some(2),
            Phase::Probe => Some(3),
            Phase::Service(_) => None,
        }
    }
}

/// Everything counted, when metrics are on.
pub struct Metrics {
    max_deployments: usize,
    labelled: Mutex<HashMap<Deployment, Arc<DeploymentMetrics>>>,
    other: Arc<DeploymentMetrics>,
    none: Arc<DeploymentMetrics>,
    phases: [Histogram; 4],
    /// Services' phases by name, up to [`MAX_SERVICE_PHASES`].
    service_phases: Mutex<BTreeMap<String, Arc<Histogram>>>,
    /// ACME orders by outcome (`issued`, `failed`), and names refused one.
    acme: Tally,
    /// Webhook deliveries by result (`delivered`, `failed`, `dropped`).
    webhooks: Tally,
    /// Deployments removed for their `expire_after`.
    expired: AtomicU64,
    /// Free bytes of the engine's image store when last measured; `u64::MAX`: never.
    disk_free: AtomicU64,
    /// Images Pipes pulled: used, unused, and their bytes; `u64::MAX`: never counted.
    images: [AtomicU64; 3],
    /// Images removed, by reason (`unused`, `disk`).
    images_removed: Tally,
}

impl Metrics {
    /// Metrics with at most `max_deployments` deployment labels.
    pub fn new(max_deployments: usize) -> Self {
        Metrics {
            max_deployments,
            labelled: Mutex::new(HashMap::new()),
            other: Arc::new(DeploymentMetrics::new("other".into())),
            none: Arc::new(DeploymentMetrics::new("none".into())),
            phases: std::array::from_fn(|_| Histogram::new(&PHASE_BUCKETS)),
            service_phases: Mutex::new(BTreeMap::new()),
            acme: Tally::default(),
            webhooks: Tally::default(),
            expired: AtomicU64::new(0),
            disk_free: AtomicU64::new(u64::MAX),
            images: [const { AtomicU64::new(u64::MAX) }; 3],
            images_removed: Tally::default(),
        }
    }

    /// The counters of `d`: its own while labels remain, else `other`'s.
    /// Called when a slot is made (the cold path).
    pub fn deployment(&self, d: &Deployment) -> Arc<DeploymentMetrics> {
        let mut labelled = self.labelled.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(m) = labelled.get(d) {
            return m.clone();
        }
        if labelled.len() >= self.max_deployments {
            return self.other.clone();
        }
        let m = Arc::new(DeploymentMetrics::new(d.to_string()));
        labelled.insert(d.clone(), m.clone());
        m
    }

    /// The counters shared by deployments past the cap, and by those not in
    /// the table when counted (access refusals of names never started).
    pub fn other(&self) -> &Arc<DeploymentMetrics> {
        &self.other
    }

    /// The counters of requests that had no deployment.
    pub fn none(&self) -> &Arc<DeploymentMetrics> {
        &self.none
    }

    /// Records how long a phase of a cold start took.
    pub fn phase(&self, phase: &Phase, took: Duration) {
        match phase.index() {
            Some(i) => self.phases[i].observe(took),
            None => {
                let mut services = self.service_phases.lock().unwrap_or_else(PoisonError::into_inner);
                let name = phase.name();
                let key =
                    if services.len() < MAX_SERVICE_PHASES || services.contains_key(name.as_ref()) { name.into_owned() } else { "service:other".to_owned() };
                services.entry(key).or_insert_with(|| Arc::new(Histogram::new(&PHASE_BUCKETS))).observe(took);
            }
        }
    }

    /// Records an ACME order's outcome.
    pub fn acme_order(&self, outcome: &'static str) {
        self.acme.add(outcome, 1);
    }

    /// Records a deployment removed for its `expire_after`.
    pub fn expired(&self) {
        self.expired.fetch_add(1, Ordering::Relaxed);
    }

    /// Records the free bytes of the engine's image store.
    pub fn disk_free(&self, bytes: u64) {
        self.disk_free.store(bytes, Ordering::Relaxed);
    }

    /// Records how many images Pipes pulled are used and unused, and their bytes.
    pub fn images(&self, used: usize, unused: usize, bytes: u64) {
        for (slot, n) in self.images.iter().zip([used as u64, unused as u64, bytes]) {
            slot.store(n, Ordering::Relaxed);
        }
    }

    /// Records an image removed, and why.
    pub fn image_removed(&self, reason: &'static str) {
        self.images_removed.add(reason, 1);
    }

    /// Records `n` webhook deliveries that ended in `result`.
    pub fn webhook(&self, result: &'static str, n: u64) {
        self.webhooks.add(result, n);
    }

    /// Writes what was recorded, in the Prometheus text format.
    pub fn write(&self, out: &mut Exposition) {
        let mut all: Vec<Arc<DeploymentMetrics>> = self.labelled.lock().unwrap_or_else(PoisonError::into_inner).values().cloned().collect();
        all.sort_by(|a, b| a.label.cmp(&b.label));
        all.push(self.other.clone());
        all.push(self.none.clone());

        out.family("pipes_requests_total", "counter", "Requests answered, by deployment and status code.");
        for m in &all {
            for (code, n) in m.codes() {
                out.sample("pipes_requests_total", &[("deployment", &m.label), ("code", &code.to_string())], n as f64);
            }
        }
        out.family("pipes_request_duration_seconds", "histogram", "Time from a request's head to the end of its answer.");
        for m in all.iter().filter(|m| m.duration.count() > 0) {
            m.duration.write(out, "pipes_request_duration_seconds", &[("deployment", &m.label)]);
        }
        out.family("pipes_cold_starts_total", "counter", "Starts of a deployment on demand, by outcome (ready, or the error).");
        for m in &all {
            for (outcome, n) in m.map(&m.cold_starts) {
                out.sample("pipes_cold_starts_total", &[("deployment", &m.label), ("outcome", outcome)], n as f64);
            }
        }
        out.family(
            "pipes_cold_start_phase_seconds",
            "histogram",
            "Time each phase of a cold start took: pull, create, start, probe, and service:NAME for each service.",
        );
        for (phase, histogram) in Phase::ALL.iter().zip(&self.phases) {
            histogram.write(out, "pipes_cold_start_phase_seconds", &[("phase", &phase.name())]);
        }
        let services: Vec<(String, Arc<Histogram>)> =
            self.service_phases.lock().unwrap_or_else(PoisonError::into_inner).iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        for (name, histogram) in services {
            histogram.write(out, "pipes_cold_start_phase_seconds", &[("phase", &name)]);
        }
        let counts = |out: &mut Exposition, name: &str, help: &str, count: fn(&DeploymentMetrics) -> &AtomicU64| {
            out.family(name, "counter", help);
            for m in &all {
                let n = count(m).load(Ordering::Relaxed);
                if n > 0 {
                    out.sample(name, &[("deployment", &m.label)], n as f64);
                }
            }
        };
        counts(out, "pipes_upstream_connect_errors_total", "Connections to a deployment's container that failed.", |m| &m.connect_errors);
        out.family("pipes_redeploys_total", "counter", "Redeploys asked for, by outcome (switched, unchanged, or the error).");
        for m in &all {
            for (outcome, n) in m.map(&m.redeploys) {
                out.sample("pipes_redeploys_total", &[("deployment", &m.label), ("outcome", outcome)], n as f64);
            }
        }
        out.family(
            "pipes_access_denied_total",
            "counter",
            "Requests the access rules refused, by reason (ip, basic, forward_auth, forward_auth_error, share_expired, config_broken).",
        );
        for m in &all {
            for (reason, n) in m.map(&m.denied) {
                out.sample("pipes_access_denied_total", &[("deployment", &m.label), ("reason", reason)], n as f64);
            }
        }
        counts(out, "pipes_idle_stops_total", "Containers stopped after their idle timeout.", |m| &m.idle_stops);
        counts(out, "pipes_idle_pauses_total", "Containers paused after their idle timeout.", |m| &m.idle_pauses);
        self.acme.write(out, "pipes_acme_orders_total", "Certificate orders, by outcome (issued, failed).", "outcome");
        self.webhooks.write(
            out,
            "pipes_webhook_deliveries_total",
            "Webhook deliveries, by result (delivered; failed: refused with 4xx, or no 2xx after every retry; dropped: the queue was full).",
            "result",
        );
        out.family("pipes_expired_total", "counter", "Deployments removed after their expire_after without a request.");
        out.sample("pipes_expired_total", &[], self.expired.load(Ordering::Relaxed) as f64);
        let [used, unused, bytes] = self.images.each_ref().map(|n| n.load(Ordering::Relaxed));
        if bytes != u64::MAX {
            out.family("pipes_images", "gauge", "Images Pipes pulled, by state (used by a container, or unused).");
            out.sample("pipes_images", &[("state", "used")], used as f64);
            out.sample("pipes_images", &[("state", "unused")], unused as f64);
            out.family("pipes_image_bytes", "gauge", "Bytes the images Pipes pulled take on the engine's disk.");
            out.sample("pipes_image_bytes", &[], bytes as f64);
        }
        self.images_removed.write(
            out,
            "pipes_images_removed_total",
            "Images Pipes pulled and removed, by reason (unused past PIPES_IMAGE_KEEP, disk above PIPES_DISK_HIGH).",
            "reason",
        );
        let free = self.disk_free.load(Ordering::Relaxed);
        if free != u64::MAX {
            out.family("pipes_disk_free_bytes", "gauge", "Free bytes of the file system the engine keeps images on, when last measured.");
            out.sample("pipes_disk_free_bytes", &[], free as f64);
        }
    }
}

/// Counts by a label's value, for a counter family of few values.
#[derive(Default)]
struct Tally(Mutex<BTreeMap<&'static str, u64>>);

impl Tally {
    fn add(&self, key: &'static str, n: u64) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner).entry(key).or_default() += n;
    }

    /// Writes the counter family `name`, one sample per value of `label`.
    fn write(&self, out: &mut Exposition, name: &str, help: &str, label: &str) {
        out.family(name, "counter", help);
        for (key, n) in self.0.lock().unwrap_or_else(PoisonError::into_inner).iter() {
            out.sample(name, &[(label, key)], *n as f64);
        }
    }
}

/// What one deployment (or `other`, or `none`) counted.
pub struct DeploymentMetrics {
    label: String,
    codes: [AtomicU64; CODES.len()],
    other_codes: Mutex<BTreeMap<u16, u64>>,
    duration: Histogram,
    connect_errors: AtomicU64,
    idle_stops: AtomicU64,
    idle_pauses: AtomicU64,
    cold_starts: Mutex<BTreeMap<&'static str, u64>>,
    /// Requests refused by the access rules, by reason.
    denied: Mutex<BTreeMap<&'static str, u64>>,
    redeploys: Mutex<BTreeMap<&'static str, u64>>,
}

impl DeploymentMetrics {
    fn new(label: String) -> Self {
        DeploymentMetrics {
            label,
            codes: std::array::from_fn(|_| AtomicU64::new(0)),
            other_codes: Mutex::new(BTreeMap::new()),
            duration: Histogram::new(&REQUEST_BUCKETS),
            connect_errors: AtomicU64::new(0),
            idle_stops: AtomicU64::new(0),
            idle_pauses: AtomicU64::new(0),
            cold_starts: Mutex::new(BTreeMap::new()),
            denied: Mutex::new(BTreeMap::new()),
            redeploys: Mutex::new(BTreeMap::new()),
        }
    }

    /// The `deployment` label.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Records one answered request: the warm path.
    #[inline]
    pub fn request(&self, code: u16, took: Duration) {
        match CODES.iter().position(|c| *c == code) {
            Some(i) => {
                self.codes[i].fetch_add(1, Ordering::Relaxed);
            }
            None => *self.other_codes.lock().unwrap_or_else(PoisonError::into_inner).entry(code).or_default() += 1,
        }
        self.duration.observe(took);
    }

    /// Records a failed connection to the container.
    pub fn connect_error(&self) {
        self.connect_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a stop after the idle timeout.
    pub fn idle_stop(&self) {
        self.idle_stops.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a pause after the idle timeout.
    pub fn idle_pause(&self) {
        self.idle_pauses.fetch_add(1, Ordering::Relaxed);
    }

    /// Records how a cold start ended.
    pub fn cold_start(&self, outcome: &'static str) {
        *self.cold_starts.lock().unwrap_or_else(PoisonError::into_inner).entry(outcome).or_default() += 1;
    }

    /// Records a request the access rules refused, and why.
    pub fn access_denied(&self, reason: &'static str) {
        *self.denied.lock().unwrap_or_else(PoisonError::into_inner).entry(reason).or_default() += 1;
    }

    /// Records how a redeploy ended.
    pub fn redeploy(&self, outcome: &'static str) {
        *self.redeploys.lock().unwrap_or_else(PoisonError::into_inner).entry(outcome).or_default() += 1;
    }

    fn codes(&self) -> Vec<(u16, u64)> {
        let mut all: Vec<(u16, u64)> = CODES.iter().zip(&self.codes).map(|(c, n)| (*c, n.load(Ordering::Relaxed))).filter(|(_, n)| *n > 0).collect();
        all.extend(self.other_codes.lock().unwrap_or_else(PoisonError::into_inner).iter().map(|(c, n)| (*c, *n)));
        all.sort_unstable();
        all
    }

    fn map(&self, counts: &Mutex<BTreeMap<&'static str, u64>>) -> Vec<(&'static str, u64)> {
        counts.lock().unwrap_or_else(PoisonError::into_inner).iter().map(|(k, v)| (*k, *v)).collect()
    }
}

/// A histogram with fixed buckets, updated with atomics.
pub struct Histogram {
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative); the last is +Inf.
    buckets: Box<[AtomicU64]>,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram { bounds, buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(), sum_micros: AtomicU64::new(0) }
    }

    #[inline]
    fn observe(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let i = self.bounds.iter().position(|b| secs <= *b).unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(u64::try_from(took.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    fn write(&self, out: &mut Exposition, name: &str, labels: &[(&str, &str)]) {
        let mut cumulative = 0;
        let bucket = format!("{name}_bucket");
        for (i, n) in self.buckets.iter().enumerate() {
            cumulative += n.load(Ordering::Relaxed);
            let le = self.bounds.get(i).map_or_else(|| "+Inf".to_owned(), |b| b.to_string());
            let mut with_le = labels.to_vec();
            with_le.push(("le", &le));
            out.sample(&bucket, &with_le, cumulative as f64);
        }
        out.sample(&format!("{name}_sum"), labels, self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6);
        out.sample(&format!("{name}_count"), labels, cumulative as f64);
    }
}

/// Prometheus text exposition (format 0.0.4), written line by line.
#[derive(Default)]
pub struct Exposition(String);

impl Exposition {
    /// Starts a metric family.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// One sample of the family last started.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (key, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{key}=\"");
                for c in value.chars() {
                    match c {
                        '\\' => self.0.push_str("\\\\"),
                        '"' => self.0.push_str("\\\""),
                        '\n' => self.0.push_str("\\n"),
                        c => self.0.push(c),
                    }
                }
                self.0.push('"');
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    /// The text.
    pub fn into_string(self) -> String {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deployments_past_the_cap_share_other() {
        let m = Metrics::new(2);
        let d = |s: &str| Deployment::parse(s).unwrap();
        assert_eq!(m.deployment(&d("a/b:1")).label(), "a/b:1");
        assert_eq!(m.deployment(&d("a/b:2")).label(), "a/b:2");
        assert_eq!(m.deployment(&d("a/b:3")).label(), "other");
        assert_eq!(m.deployment(&d("a/b:1")).label(), "a/b:1", "a label once given stays");
    }

    #[test]
    fn requests_and_histograms_are_written_cumulatively() {
        let m = Metrics::new(10);
        let a = m.deployment(&Deployment::parse("alice/app:v1").unwrap());
        a.request(200, Duration::from_millis(3));
        a.request(200, Duration::from_millis(30));
        a.request(418, Duration::from_secs(60));
        m.phase(&Phase::Pull, Duration::from_millis(700));
        let mut out = Exposition::default();
        m.write(&mut out);
        let text = out.into_string();
        assert!(text.contains("pipes_requests_total{deployment=\"alice/app:v1\",code=\"200\"} 2\n"), "{text}");
        assert!(text.contains("pipes_requests_total{deployment=\"alice/app:v1\",code=\"418\"} 1\n"), "{text}");
        assert!(text.contains("pipes_request_duration_seconds_bucket{deployment=\"alice/app:v1\",le=\"0.005\"} 1\n"), "{text}");
        assert!(text.contains("pipes_request_duration_seconds_bucket{deployment=\"alice/app:v1\",le=\"0.05\"} 2\n"), "{text}");
        assert!(text.contains("pipes_request_duration_seconds_bucket{deployment=\"alice/app:v1\",le=\"+Inf\"} 3\n"), "{text}");
        assert!(text.contains("pipes_request_duration_seconds_count{deployment=\"alice/app:v1\"} 3\n"), "{text}");
        assert!(text.contains("pipes_cold_start_phase_seconds_bucket{phase=\"pull\",le=\"1\"} 1\n"), "{text}");
    }

    #[test]
    fn label_values_are_escaped() {
        let mut out = Exposition::default();
        out.sample("x", &[("name", "a\"b\\c\nd")], 1.0);
        assert_eq!(out.into_string(), "x{name=\"a\\\"b\\\\c\\nd\"} 1\n");
    }
}

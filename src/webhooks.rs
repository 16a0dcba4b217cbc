//! Signed webhooks: every happening a deployment's people want to hear of
//! (`starting`, `ready`, `failed`, `stopped`, `paused`, `redeployed`,
//! `rolled_back`, `expired`, `deleted`) is POSTed as one JSON object to each
//! of `PIPES_WEBHOOK_URL`, signed as GitHub signs its own: `X-Pipes-Signature:
//! sha256=<hex HMAC-SHA256 of the raw body>` with `PIPES_WEBHOOK_SECRET`.
//!
//! Delivery never holds up a request or a start: the fleet's feed is read
//! by this service, deliveries wait in a bounded queue, at most
//! [`IN_FLIGHT`] are under way at once. A network error or a 5xx is tried
//! again after 5 s, then 10, 20, … (eight tries over some ten minutes), with
//! the same `X-Pipes-Delivery`; a 4xx is not. What is dropped or fails is
//! counted (`pipes_webhook_deliveries_total`) and logged. A deployment's
//! config chooses what it sends (`notify`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::Full;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{mpsc, Semaphore};

use crate::fleet::{Fleet, Happening, HappeningKind, State, DELETED, EXPIRED};
use crate::metrics::Metrics;
use crate::route::{Deployment, Hosts};
use crate::settings::{Settings, WebhookSettings};

/// Deliveries waiting to be sent at most; more are dropped (and counted).
const QUEUE: usize = 1024;
/// Deliveries under way (sending, or waiting to try again) at once.
const IN_FLIGHT: usize = 32;
/// Tries of one delivery: the first, then after 5 s, 10 s, 20 s, … 320 s.
const TRIES: u32 = 8;
const FIRST_RETRY: Duration = Duration::from_secs(5);
/// How long one try may take, answer included.
const TRY_TIMEOUT: Duration = Duration::from_secs(10);

/// The webhooks' background service.
pub struct Webhooks {
    fleet: Arc<Fleet>,
    settings: WebhookSettings,
    hosts: Hosts,
}

/// One POST to one receiver, tried until it is taken or refused.
struct Delivery {
    url: http::Uri,
    id: String,
    event: &'static str,
    body: Bytes,
    signature: String,
}

impl Webhooks {
    /// Webhooks of `fleet` as `settings` say.
    pub fn new(fleet: Arc<Fleet>, webhooks: &WebhookSettings, settings: &Settings) -> Self {
        Webhooks { fleet, settings: webhooks.clone(), hosts: settings.hosts.clone() }
    }

    /// The deliveries `h` makes, if it is a happening webhooks tell and its
    /// deployment's config (`notify`) wants it told.
    async fn deliveries(&self, h: &Happening, phases: Option<Vec<(String, u64)>>) -> Vec<Delivery> {
        let Some(event) = event(&h.kind) else { return Vec::new() };
        let wanted = match self.fleet.configs(&h.deployment).await {
            Ok(configs) => configs.effective.notify.is_none_or(|events| events.iter().any(|e| e == event)),
            // Its config cannot be read; the operator is told of that elsewhere.
            Err(_) => true,
        };
        if !wanted {
            return Vec::new();
        }
        let body = Bytes::from(self.body(h, event, phases).to_string());
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.settings.secret.expose().as_bytes()).expect("HMAC takes a key of any length");
        mac.update(&body);
        let signature = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        self.settings
            .urls
            .iter()
            .filter_map(|u| u.parse().ok())
            .map(|url| Delivery { url, id: delivery_id(), event, body: body.clone(), signature: signature.clone() })
            .collect()
    }

    /// The JSON object a receiver gets.
    fn body(&self, h: &Happening, event: &'static str, phases: Option<Vec<(String, u64)>>) -> Value {
        let at = humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(h.at_ms)).to_string();
        let digest = match &h.kind {
            HappeningKind::Switched { digest, .. } => digest.clone(),
            _ => self.fleet.get(h.deployment.as_ref()).and_then(|s| s.upstream()).and_then(|u| u.digest.clone()),
        };
        let mut body = json!({
            "event": event,
            "deployment": h.deployment.to_string(),
            "url": self.url(&h.deployment),
            "digest": digest,
            "at": at,
        });
        let reason = match &h.kind {
            HappeningKind::Failed { error } => Some(error.to_string()),
            HappeningKind::Left { why, .. } => Some((*why).to_owned()),
            _ => None,
        };
        if let Some(obj) = body.as_object_mut() {
            if let Some(reason) = reason {
                obj.insert("reason".into(), json!(reason));
            }
            if let HappeningKind::Ready { took } = &h.kind {
                obj.insert("took_ms".into(), json!(u64::try_from(took.as_millis()).unwrap_or(u64::MAX)));
                let phases: serde_json::Map<String, Value> = phases.unwrap_or_default().into_iter().map(|(p, ms)| (p, json!(ms))).collect();
                obj.insert("phases_ms".into(), Value::Object(phases));
            }
        }
        body
    }

    /// The deployment's public URL, where the domain is known.
    fn url(&self, d: &Deployment) -> Option<String> {
        let name = self.hosts.name_of(d)?;
        let (scheme, port) = (self.settings.scheme, self.settings.port);
        let default = (scheme == "https" && port == 443) || (scheme == "http" && port == 80);
        Some(if default { format!("{scheme}://{name}/") } else { format!("{scheme}://{name}:{port}/") })
    }
}

/// The webhook event of a happening, if it is one webhooks tell.
fn event(kind: &HappeningKind) -> Option<&'static str> {
    Some(match kind {
        HappeningKind::Starting { .. } => "starting",
        HappeningKind::Ready { .. } => "ready",
        HappeningKind::Failed { .. } => "failed",
        HappeningKind::Left { state: State::Stopped, .. } => "stopped",
        HappeningKind::Left { state: State::Paused, .. } => "paused",
        HappeningKind::Left { state: State::Removed, why } if *why == DELETED => "deleted",
        HappeningKind::Left { state: State::Removed, why } if *why == EXPIRED => "expired",
        HappeningKind::Switched { rollback: false, .. } => "redeployed",
        HappeningKind::Switched { rollback: true, .. } => "rolled_back",
        _ => return None,
    })
}

/// A unique id of one delivery, the same on each of its tries.
fn delivery_id() -> String {
    let mut bytes = [0u8; 16];
    if openssl::rand::rand_bytes(&mut bytes).is_err() {
        // Unique enough without a random source: the time, to the nanosecond.
        let nanos = std::time::SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
        bytes = nanos.to_be_bytes();
    }
    hex::encode(bytes)
}

/// How long to wait before try `n` (the first is 1): 5 s, 10 s, 20 s, …
fn delay_before(n: u32) -> Duration {
    FIRST_RETRY * 2u32.saturating_pow(n.saturating_sub(2))
}

/// Sends `delivery` until a receiver takes it (2xx), refuses it (4xx) or
/// every try failed; the result, as counted.
async fn deliver(client: &crate::outbound::Client<Full<Bytes>>, delivery: &Delivery) -> &'static str {
    for n in 1..=TRIES {
        if n > 1 {
            tokio::time::sleep(delay_before(n)).await;
        }
        let request = http::Request::post(delivery.url.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::USER_AGENT, concat!("pipes/", env!("CARGO_PKG_VERSION")))
            .header("x-pipes-event", delivery.event)
            .header("x-pipes-delivery", delivery.id.as_str())
            .header("x-pipes-signature", delivery.signature.as_str())
            .body(Full::new(delivery.body.clone()));
        let request = match request {
            Ok(r) => r,
            Err(e) => {
                log::warn!("webhook {} to {}: cannot be sent: {e}", delivery.event, delivery.url);
                return "failed";
            }
        };
        let why = match tokio::time::timeout(TRY_TIMEOUT, client.request(request)).await {
            Ok(Ok(answer)) if answer.status().is_success() => return "delivered",
            Ok(Ok(answer)) if answer.status().is_client_error() => {
                log::warn!("webhook {} to {}: refused with {}; not sent again", delivery.event, delivery.url, answer.status());
                return "failed";
            }
            Ok(Ok(answer)) => format!("answered {}", answer.status()),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {}", crate::error::DisplayDuration(TRY_TIMEOUT)),
        };
        log::info!("webhook {} to {} (delivery {}), try {n} of {TRIES}: {why}", delivery.event, delivery.url, delivery.id);
    }
    log::warn!("webhook {} to {} (delivery {}): given up after {TRIES} tries", delivery.event, delivery.url, delivery.id);
    "failed"
}

#[async_trait]
impl BackgroundService for Webhooks {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let metrics: Option<Arc<Metrics>> = self.fleet.metrics().cloned();
        let count = move |result: &'static str, n: u64| {
            if let Some(m) = &metrics {
                m.webhook(result, n);
            }
        };
        let (queue, mut waiting) = mpsc::channel::<Delivery>(QUEUE);
        let sender = {
            let count = count.clone();
            tokio::spawn(async move {
                let client = Arc::new(crate::outbound::client::<Full<Bytes>>());
                let places = Arc::new(Semaphore::new(IN_FLIGHT));
                while let Some(delivery) = waiting.recv().await {
                    let Ok(place) = places.clone().acquire_owned().await else { return };
                    let (client, count) = (client.clone(), count.clone());
                    tokio::spawn(async move {
                        count(deliver(&client, &delivery).await, 1);
                        drop(place);
                    });
                }
            })
        };
        let mut feed = self.fleet.follow();
        // Each start's phase times, for its `ready`.
        let mut phases: HashMap<Deployment, Vec<(String, u64)>> = HashMap::new();
        loop {
            let happening = tokio::select! {
                _ = shutdown.changed() => break,
                next = feed.recv() => next,
            };
            let h = match happening {
                Ok(h) => h,
                Err(RecvError::Lagged(missed)) => {
                    log::warn!("webhooks fell behind the fleet: {missed} happening(s) not sent");
                    count("dropped", missed);
                    continue;
                }
                Err(RecvError::Closed) => break,
            };
            let times = match &h.kind {
                HappeningKind::Phase { phase, took } => {
                    let ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
                    phases.entry(h.deployment.clone()).or_default().push((phase.name().into_owned(), ms));
                    continue;
                }
                HappeningKind::Starting { .. } => {
                    phases.remove(&h.deployment);
                    None
                }
                HappeningKind::Ready { .. } | HappeningKind::Failed { .. } => phases.remove(&h.deployment),
                _ => None,
            };
            for delivery in self.deliveries(&h, times).await {
                if queue.try_send(delivery).is_err() {
                    log::warn!("webhook {} of {}: the queue is full, not sent", event(&h.kind).unwrap_or(""), h.deployment);
                    count("dropped", 1);
                }
            }
        }
        sender.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_double_from_five_seconds_over_some_ten_minutes() {
        let delays: Vec<u64> = (2..=TRIES).map(|n| delay_before(n).as_secs()).collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 320]);
        let total: u64 = delays.iter().sum();
        assert!((540..=720).contains(&total), "{total} s");
    }

    #[test]
    fn happenings_map_to_the_events_notify_names() {
        let names = [
            event(&HappeningKind::Starting { expected: None }),
            event(&HappeningKind::Ready { took: Duration::ZERO }),
            event(&HappeningKind::Left { state: State::Stopped, why: "idle" }),
            event(&HappeningKind::Left { state: State::Paused, why: "paused" }),
            event(&HappeningKind::Left { state: State::Removed, why: DELETED }),
            event(&HappeningKind::Left { state: State::Removed, why: EXPIRED }),
            event(&HappeningKind::Switched { digest: None, rollback: false }),
            event(&HappeningKind::Switched { digest: None, rollback: true }),
        ];
        for name in names {
            assert!(crate::config::WEBHOOK_EVENTS.contains(&name.expect("an event")));
        }
        assert_eq!(event(&HappeningKind::Left { state: State::Removed, why: "removed" }), None, "the engine's removals are no deletion");
        assert_eq!(event(&HappeningKind::Pulling { done: 1, total: 2 }), None);
        assert_ne!(delivery_id(), delivery_id());
    }
}

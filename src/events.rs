//! `GET /__proxyapi/events`: what happens to deployments, as server-sent
//! events. On the bare domain it needs a token and shows every deployment the
//! token may see; on a deployment's host it shows that deployment, in full
//! with a token and as the public sees it without one (phases, progress,
//! readiness, and failures as the error page tells them) — which is what the
//! waiting page follows.
//!
//! A stream holds a connection for as long as it is open, so streams are
//! bounded: `PIPES_MAX_STREAMS_PER_CLIENT` per client address (429 past it),
//! and anonymous ones together to a quarter of `PIPES_MAX_CONNECTIONS` (503
//! past it), so that they can never take every connection. An anonymous
//! stream is served only for a name a request could start (403 or 404 as a
//! request would get otherwise), and a stream whose client left ends within
//! a second: the read side is watched, not only the next write.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;

use crate::access::{self, Refusal, Verdict};
use crate::api::{self, Endpoint};
use crate::auth::{Access, ApiAuth};
use crate::error::PipesError;
use crate::fleet::{Fleet, Happening, HappeningKind, State};
use crate::reply::{error_body_for, Audience};
use crate::route::Deployment;
use crate::settings::Settings;
use crate::store::Store;

/// A comment line this often keeps proxies and browsers from closing a quiet stream.
const HEARTBEAT: Duration = Duration::from_secs(15);
/// How often a quiet stream checks whether Pipes is stopping.
const CHECK: Duration = Duration::from_secs(1);

/// The event streams open now, and how many may be.
pub(crate) struct Limits {
    per_client: usize,
    /// Anonymous streams, all clients together.
    public_max: usize,
    by_client: Mutex<HashMap<IpAddr, usize>>,
    public: AtomicUsize,
}

impl Limits {
    pub(crate) fn new(settings: &Settings) -> Limits {
        Limits {
            per_client: settings.max_streams_per_client,
            public_max: (settings.connections.max_connections / 4).max(1),
            by_client: Mutex::new(HashMap::new()),
            public: AtomicUsize::new(0),
        }
    }

    /// A place for one more stream of `client` (when known), anonymous or not.
    fn enter(self: &Arc<Self>, client: Option<IpAddr>, public: bool) -> Result<Place, PipesError> {
        if public && self.public.fetch_add(1, Ordering::AcqRel) >= self.public_max {
            self.public.fetch_sub(1, Ordering::AcqRel);
            return Err(PipesError::PublicStreamsFull { max: self.public_max });
        }
        // Made first, so that a refusal below gives the public place back.
        let mut place = Place { limits: self.clone(), client: None, public };
        if let Some(client) = client {
            let mut open = self.by_client.lock().unwrap_or_else(PoisonError::into_inner);
            let n = open.entry(client).or_insert(0);
            if *n >= self.per_client {
                return Err(PipesError::TooManyStreams { max: self.per_client });
            }
            *n += 1;
            place.client = Some(client);
        }
        Ok(place)
    }
}

/// One open stream's place under [`Limits`]; given back when dropped.
struct Place {
    limits: Arc<Limits>,
    client: Option<IpAddr>,
    public: bool,
}

impl Drop for Place {
    fn drop(&mut self) {
        if self.public {
            self.limits.public.fetch_sub(1, Ordering::AcqRel);
        }
        if let Some(client) = self.client {
            let mut open = self.limits.by_client.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(n) = open.get_mut(&client) {
                *n -= 1;
                if *n == 0 {
                    open.remove(&client);
                }
            }
        }
    }
}

/// Who follows, and what they may see.
struct View {
    /// The deployment whose host was asked, or every one `access` covers.
    deployment: Option<Deployment>,
    access: Option<Access>,
    audience: Audience,
}

impl View {
    fn sees(&self, h: &Happening) -> bool {
        match (&self.deployment, &self.access) {
            (Some(d), _) => *d == h.deployment,
            (None, Some(access)) => access.covers(&h.deployment.user),
            (None, None) => false,
        }
    }
}

/// Whether `req` brings an API token (a browser may bring the `Basic`
/// credentials of a deployment's access rules: those are no token).
fn bearer(req: &api::Request) -> bool {
    req.authorization.as_deref().is_some_and(|a| a.len() > 7 && a[..7].eq_ignore_ascii_case(b"bearer "))
}

/// Whether `req` asks for the event stream.
pub(crate) fn wanted(req: &api::Request) -> bool {
    Endpoint::find(&req.path) == Some(Endpoint::Events)
}

/// What a stream needs besides its request: the fleet, the store and the
/// API's credentials to check who asks, and the limits on open streams.
pub(crate) struct Streams<'a> {
    pub fleet: &'a Arc<Fleet>,
    pub store: &'a Store,
    pub auth: &'a ApiAuth,
    pub limits: &'a Arc<Limits>,
}

/// Checks who asks, then streams events until the client leaves or Pipes stops.
pub(crate) async fn serve(streams: Streams<'_>, client: Option<IpAddr>, session: &mut Session, req: api::Request) -> Result<(), (PipesError, Audience)> {
    let Streams { fleet, store, auth, limits } = streams;
    let public = |e| (e, Audience::Public);
    let view = match &req.deployment {
        Some(d) if !bearer(&req) && req.method == http::Method::GET => {
            // Only for a name a request could start, answered as a request
            // would be, and only to whom the deployment's access rules let in.
            fleet.check_allowed(d).map_err(public)?;
            let rules = fleet.rules(d);
            if !rules.open() {
                match access::judge(fleet.access(), &rules, session.req_header(), client, req.tls).await {
                    Verdict::Pass(_) => {}
                    Verdict::Refused { answer: Refusal::Error(e), .. } => return Err(public(e)),
                    Verdict::Refused { .. } | Verdict::ShareOpened { .. } => {
                        return Err(public(PipesError::AuthenticationRequired { realm: rules.realm.clone(), basic: false, share_expired: false }));
                    }
                }
            }
            fleet.check_followable(d).await.map_err(public)?;
            View { deployment: Some(d.clone()), access: None, audience: Audience::Public }
        }
        _ => {
            let admitted = api::admit(store, auth, &req).await.map_err(public)?;
            View { deployment: req.deployment.clone(), access: Some(admitted.access().clone()), audience: Audience::Operator }
        }
    };
    let _place = limits.enter(client, view.audience == Audience::Public).map_err(public)?;
    // Followed before the snapshot is taken, so nothing falls between them.
    let mut feed = fleet.follow();
    let snapshot = snapshot(fleet, &view).await.map_err(|e| (e, view.audience))?;
    let io = |e: Box<Error>| (PipesError::BadBody { message: e.to_string() }, Audience::Public);
    let mut head = ResponseHeader::build(200, Some(4)).map_err(io)?;
    head.insert_header(http::header::CONTENT_TYPE, "text/event-stream").map_err(io)?;
    head.insert_header(http::header::CACHE_CONTROL, "no-store").map_err(io)?;
    if !session.is_http2() {
        head.insert_header(http::header::TRANSFER_ENCODING, "chunked").map_err(io)?;
    }
    session.write_response_header(Box::new(head), false).await.map_err(io)?;
    let mut out = String::new();
    for (name, data) in snapshot {
        push(&mut out, name, &data);
    }
    if send(session, &mut out).await.is_err() {
        return Ok(());
    }
    let mut quiet = Duration::ZERO;
    loop {
        let next = tokio::select! {
            next = tokio::time::timeout(CHECK, feed.recv()) => next,
            // A GET carries no body: anything but more bytes is the client leaving.
            read = session.read_body_or_idle(true) => match read {
                Ok(_) => continue,
                Err(_) => return Ok(()),
            },
        };
        if fleet.retired() {
            break;
        }
        match next {
            Ok(Ok(h)) if view.sees(&h) => push(&mut out, name(&h), &data(&h, view.audience)),
            Ok(Ok(_)) => continue,
            Ok(Err(RecvError::Lagged(missed))) => push(&mut out, "lagged", &json!({ "missed": missed })),
            Ok(Err(RecvError::Closed)) => break,
            Err(_) => {
                quiet += CHECK;
                if quiet < HEARTBEAT {
                    continue;
                }
                out.push_str(": still here\n\n");
            }
        }
        quiet = Duration::ZERO;
        if send(session, &mut out).await.is_err() {
            return Ok(());
        }
    }
    let _ = session.write_response_body(None, true).await;
    Ok(())
}

/// The state now: one `status` event per deployment in view (the waiting
/// page moves on at once if it is running), or the list on the bare domain.
async fn snapshot(fleet: &Arc<Fleet>, view: &View) -> Result<Vec<(&'static str, Value)>, PipesError> {
    let Some(d) = &view.deployment else {
        let access = view.access.as_ref();
        let list: Vec<Value> = fleet
            .summaries()
            .await?
            .into_iter()
            .filter(|s| access.is_some_and(|a| a.covers(&s.deployment.user)))
            .map(|s| json!({ "deployment": s.deployment.to_string(), "state": s.state.as_str() }))
            .collect();
        return Ok(vec![("deployments", json!({ "deployments": list }))]);
    };
    // The public is told what the table knows, which costs the engine nothing.
    let (state, error) = match view.audience {
        Audience::Public => fleet.table_view(d.as_ref()),
        Audience::Operator => {
            let status = fleet.status(d).await?;
            (status.state, status.last_error)
        }
    };
    let slot = fleet.get(d.as_ref());
    let mut body = json!({
        "deployment": d.to_string(),
        "state": state.as_str(),
        "expected_ms": slot.as_deref().and_then(|s| s.last_start()).map(|t| t.as_millis() as u64),
    });
    if let (Some(e), Some(obj)) = (&error, body.as_object_mut()) {
        obj.insert("error".into(), error_body_for(e, view.audience));
    }
    let mut events = vec![("status", body)];
    if state == State::Running && slot.as_deref().is_some_and(|s| s.upstream().is_some()) {
        events.push(("ready", json!({ "deployment": d.to_string(), "state": State::Running.as_str() })));
    }
    // A follower that arrives during a start hears what it missed of it.
    if state == State::Starting {
        events.extend(fleet.this_start(d).iter().map(|h| (name(h), data(h, view.audience))));
    }
    Ok(events)
}

fn name(h: &Happening) -> &'static str {
    match h.kind {
        HappeningKind::Starting { .. } => "starting",
        HappeningKind::Phase { .. } => "phase",
        HappeningKind::Pulling { .. } => "pulling",
        HappeningKind::Ready { .. } => "ready",
        HappeningKind::Failed { .. } => "failed",
        HappeningKind::Left { .. } => "state",
        HappeningKind::Switched { .. } => "redeployed",
    }
}

/// The data of `h` as `audience` may see it.
fn data(h: &Happening, audience: Audience) -> Value {
    let ms = |d: &Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let mut data = match &h.kind {
        HappeningKind::Starting { expected } => json!({ "state": State::Starting.as_str(), "expected_ms": expected.as_ref().map(ms) }),
        HappeningKind::Phase { phase, took } => json!({ "phase": phase.name(), "ms": ms(took) }),
        HappeningKind::Pulling { done, total } => json!({ "phase": "pull", "done_bytes": done, "total_bytes": total }),
        HappeningKind::Ready { took } => json!({ "state": State::Running.as_str(), "ms": ms(took) }),
        HappeningKind::Failed { error } => json!({ "state": State::Failed.as_str(), "error": error_body_for(error, audience) }),
        HappeningKind::Left { state, why } => json!({ "state": state.as_str(), "why": why }),
        HappeningKind::Switched { digest, rollback } => json!({ "state": State::Running.as_str(), "digest": digest, "rollback": rollback }),
    };
    if let Some(obj) = data.as_object_mut() {
        obj.insert("deployment".into(), json!(h.deployment.to_string()));
        let at = UNIX_EPOCH + Duration::from_millis(h.at_ms);
        obj.insert("at".into(), json!(humantime::format_rfc3339_millis(at).to_string()));
    }
    data
}

/// Appends one event in the stream's format.
fn push(out: &mut String, name: &str, data: &Value) {
    out.push_str("event: ");
    out.push_str(name);
    out.push_str("\ndata: ");
    // Compact JSON holds no newline, so one data line carries it.
    out.push_str(&data.to_string());
    out.push_str("\n\n");
}

async fn send(session: &mut Session, out: &mut String) -> Result<()> {
    let chunk = Bytes::from(std::mem::take(out));
    session.write_response_body(Some(chunk), false).await
}

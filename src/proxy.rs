//! Step 5 of the request path, and the thread through all of them: Pingora's hooks.
//!
//! `request_filter` routes the Host, applies the policy, finds the deployment in
//! the table and, if it is not running, waits for its cold start. `upstream_peer`
//! hands Pingora the container's address. A container that vanished is noticed
//! when connecting to it fails; the request is then retried once after a fresh
//! start, which is safe for every method since nothing was sent yet.
//!
//! Every request holds an [`Activity`] on its upstream until Pipes is done
//! with it (response sent, upgraded connection closed, however it ends), so
//! idle stops and drains see what is open; and counts in [`IN_FLIGHT`], so a
//! stopping Pipes knows when the last one finished.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use pingora::http::RequestHeader;
use pingora::prelude::*;
use pingora::proxy::FailToProxy;
use pingora::upstreams::peer::HttpPeer;
use pingora::ErrorType;

use crate::api;
use crate::auth::ApiAuth;
use crate::error::PipesError;
use crate::fleet::{Activity, Fleet, OpenCount, Slot};
use crate::reply;
use crate::route::{self, Deployment, Domain, Target};
use crate::settings::Settings;
use crate::websocket;

const X_FORWARDED_FOR: http::HeaderName = http::HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: http::HeaderName = http::HeaderName::from_static("x-forwarded-proto");
const HTTP: http::HeaderValue = http::HeaderValue::from_static("http");

/// The Pingora application of Pipes.
pub struct Pipes {
    fleet: Arc<Fleet>,
    domain: Domain,
    api_auth: ApiAuth,
}

impl Pipes {
    /// The proxy for `fleet`, routing as `settings` say.
    pub fn new(fleet: Arc<Fleet>, settings: &Settings) -> Self {
        Pipes { fleet, domain: settings.domain.clone(), api_auth: settings.api_auth.clone() }
    }
}

/// Requests Pipes is handling now, of every kind.
pub static IN_FLIGHT: OpenCount = OpenCount::new();

/// Set once this process hands its sockets to a new one: every answer then
/// closes its connection, so clients move to new connections (which the new
/// process accepts) before this one closes the idle ones.
pub static HANDING_OVER: AtomicBool = AtomicBool::new(false);

/// What one request carries between hooks.
pub struct RequestCtx {
    slot: Option<Arc<Slot>>,
    /// The request, open on its upstream.
    activity: Option<Activity>,
    /// Held while a request that waited for a start reaches the fresh instance.
    warmup: Option<tokio::sync::OwnedSemaphorePermit>,
    /// The address that refused a connection, to recover from in `upstream_peer`.
    refused: Option<SocketAddr>,
    /// Whether this request already restarted its deployment once.
    recovered: bool,
    /// A Pipes error to answer with from `fail_to_proxy`.
    error: Option<PipesError>,
}

impl RequestCtx {
    fn new() -> Self {
        IN_FLIGHT.add(1);
        RequestCtx { slot: None, activity: None, warmup: None, refused: None, recovered: false, error: None }
    }
}

impl Drop for RequestCtx {
    fn drop(&mut self) {
        IN_FLIGHT.add(-1);
    }
}

/// What `request_filter` decided, owned, so the request can be answered.
enum Next {
    Proxy(Arc<Slot>),
    Start(Deployment),
    Api(api::Request),
    Fail(PipesError),
}

#[async_trait]
impl ProxyHttp for Pipes {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        if HANDING_OVER.load(Ordering::Relaxed) {
            session.set_keepalive(None);
        }
        let next = self.decide(session.req_header());
        let slot = match next {
            Next::Proxy(slot) => slot,
            Next::Start(d) => {
                if !self.fleet.allows(d.as_ref()) {
                    return reply_error(session, &PipesError::Forbidden { deployment: d.to_string() }).await;
                }
                self.fleet.slot(d.as_ref())
            }
            Next::Api(mut request) => {
                let answer = match reply::read_body(session, api::MAX_BODY).await {
                    Ok(body) => {
                        request.body = body;
                        api::handle(&self.fleet, &self.api_auth, request).await
                    }
                    Err(e) => Err(e),
                };
                match answer {
                    Ok(json) => reply::json(session, json).await?,
                    Err(e) => reply::error(session, &e).await?,
                }
                return Ok(true);
            }
            Next::Fail(e) => return reply_error(session, &e).await,
        };
        let upstream = match slot.upstream() {
            Some(up) => up,
            None => match self.fleet.ready(&slot).await {
                Ok(up) => {
                    ctx.warmup = up.warmup_permit().await;
                    up
                }
                Err(e) => return reply_error(session, &e).await,
            },
        };
        ctx.activity = Some(slot.begin(upstream));
        if websocket::wanted(session.req_header()) && !session.is_http2() {
            return self.websocket(session, &slot, ctx).await;
        }
        ctx.slot = Some(slot);
        Ok(false)
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut RequestCtx) -> Result<Box<HttpPeer>> {
        if let (Some(refused), Some(slot)) = (ctx.refused.take(), ctx.slot.as_ref()) {
            match self.fleet.recover(slot, refused).await {
                Ok(up) => ctx.activity = Some(slot.begin(up)),
                Err(e) => {
                    let status = e.status();
                    ctx.error = Some(e);
                    return Error::e_explain(ErrorType::HTTPStatus(status), "restarting the deployment failed");
                }
            }
        }
        match &ctx.activity {
            Some(activity) => Ok(activity.upstream().peer()),
            None => Error::e_explain(ErrorType::InternalError, "no upstream chosen"),
        }
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if !ctx.recovered {
            if let Some(activity) = &ctx.activity {
                ctx.recovered = true;
                ctx.refused = Some(activity.upstream().addr);
                e.set_retry(true);
            }
        }
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        _ctx: &mut RequestCtx,
    ) -> Result<()> {
        forwarding_headers(session, upstream_request)
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        _upstream_response: &mut pingora::http::ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // The fresh instance answered this one: let the next waiter in.
        ctx.warmup = None;
        Ok(())
    }

    /// What error logs say of a request: never its query, which may carry a token.
    fn request_summary(&self, session: &Session, _ctx: &RequestCtx) -> String {
        let req = session.req_header();
        let host = req.headers.get(http::header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
        format!("{} {}, Host: {host}", req.method, req.uri.path())
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut RequestCtx) -> FailToProxy {
        let error = ctx.error.take().unwrap_or_else(|| proxy_failure(e, ctx.slot.as_deref()));
        let code = error.status();
        if let Err(write) = reply::error(session, &error).await {
            log::debug!("cannot send the error response: {write}");
        }
        FailToProxy { error_code: code, can_reuse_downstream: false }
    }
}

impl Pipes {
    /// Routes a request without touching the engine: the hot path ends in `Next::Proxy`.
    fn decide(&self, req: &RequestHeader) -> Next {
        // HTTP/2 carries the host in :authority, which lands in the URI.
        let raw = req
            .uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| req.headers.get(http::header::HOST).and_then(|h| h.to_str().ok()));
        let Some(raw) = raw else {
            return Next::Fail(PipesError::NotOurs { host: String::new(), expected: "a Host header".into() });
        };
        let host = route::normalize_host(raw);
        let target = match route::route(&host, &self.domain) {
            Ok(target) => target,
            Err(e) => return Next::Fail(e),
        };
        let path = req.uri.path();
        if route::is_api_path(path) {
            return Next::Api(api::Request {
                deployment: match target {
                    Target::Deployment(d) => Some(d.to_owned()),
                    Target::Bare => None,
                },
                method: req.method.clone(),
                path: path.to_owned(),
                query: req.uri.query().map(str::to_owned),
                authorization: req.headers.get(http::header::AUTHORIZATION).map(|v| v.as_bytes().to_vec()),
                body: Vec::new(),
            });
        }
        let d = match target {
            Target::Deployment(d) => d,
            Target::Bare => return Next::Fail(PipesError::NoDeployment { host: host.into_owned() }),
        };
        match self.fleet.get(d) {
            Some(slot) if self.fleet.allows(d) => Next::Proxy(slot),
            Some(_) => Next::Fail(PipesError::Forbidden { deployment: d.to_string() }),
            None => Next::Start(d.to_owned()),
        }
    }
}

/// What a proxying failure that is not Pipes' own reads as.
fn proxy_failure(e: &Error, slot: Option<&Slot>) -> PipesError {
    let deployment = slot.map_or_else(|| "the deployment".to_owned(), |s| s.deployment.to_string());
    let reason = match e.etype() {
        ErrorType::ConnectTimedout | ErrorType::ConnectRefused | ErrorType::ConnectNoRoute => {
            "its container does not accept connections".to_owned()
        }
        ErrorType::ReadTimedout | ErrorType::WriteTimedout => "its container did not answer in time".to_owned(),
        _ => format!("the connection to its container failed ({})", e.etype().as_str()),
    };
    PipesError::Unservable { deployment, reason }
}

/// Tells the instance who asked and how: `X-Forwarded-For`, `X-Forwarded-Proto`.
fn forwarding_headers(session: &Session, upstream_request: &mut RequestHeader) -> Result<()> {
    if let Some(client) = session.client_addr().and_then(|a| a.as_inet()) {
        let ip = client.ip().to_string();
        match upstream_request.headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
            Some(earlier) => {
                let forwarded = format!("{earlier}, {ip}");
                upstream_request.insert_header(X_FORWARDED_FOR, forwarded)?;
            }
            None => upstream_request.insert_header(X_FORWARDED_FOR, ip)?,
        }
    }
    upstream_request.insert_header(X_FORWARDED_PROTO, HTTP)?;
    Ok(())
}

impl Pipes {
    /// Relays a WebSocket to the deployment of `slot`, restarting it once if
    /// nothing answers at its address (as `fail_to_connect` does for requests).
    async fn websocket(&self, session: &mut Session, slot: &Arc<Slot>, ctx: &mut RequestCtx) -> Result<bool> {
        let mut handshake = session.req_header().clone();
        forwarding_headers(session, &mut handshake)?;
        loop {
            let Some(upstream) = ctx.activity.as_ref().map(|a| a.upstream().clone()) else {
                return Error::e_explain(ErrorType::InternalError, "no upstream chosen");
            };
            let failure = match websocket::relay(session, &slot.deployment.to_string(), &upstream, &handshake).await {
                Ok(()) => return Ok(true),
                Err(failure) => failure,
            };
            let error = match failure {
                websocket::Failure::Refused if !ctx.recovered => {
                    ctx.recovered = true;
                    match self.fleet.recover(slot, upstream.addr).await {
                        Ok(up) => {
                            ctx.activity = Some(slot.begin(up));
                            continue;
                        }
                        Err(e) => e,
                    }
                }
                websocket::Failure::Refused => PipesError::Unservable {
                    deployment: slot.deployment.to_string(),
                    reason: "its container does not accept connections".into(),
                },
                websocket::Failure::Error(e) => e,
            };
            return reply_error(session, &error).await;
        }
    }
}

async fn reply_error(session: &mut Session, error: &PipesError) -> Result<bool> {
    reply::error(session, error).await?;
    Ok(true)
}

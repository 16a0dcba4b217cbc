//! Step 5 of the request path, and the thread through all of them: Pingora's hooks.
//!
//! `request_filter` routes the Host, applies the policy, finds the deployment in
//! the table and, if it is not running, waits for its cold start. `upstream_peer`
//! hands Pingora the container's address. A container that vanished is noticed
//! when connecting to it fails; the request is then retried once after a fresh
//! start, which is safe for every method since nothing was sent yet.

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::proxy::FailToProxy;
use pingora::upstreams::peer::HttpPeer;
use pingora::ErrorType;

use crate::api;
use crate::error::PipesError;
use crate::fleet::{Fleet, Slot, Upstream};
use crate::route::{self, Deployment, Domain, Target};
use crate::security::ApiAuth;
use crate::settings::Settings;

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

/// What one request carries between hooks.
#[derive(Default)]
pub struct RequestCtx {
    slot: Option<Arc<Slot>>,
    upstream: Option<Arc<Upstream>>,
    /// The address that refused a connection, to recover from in `upstream_peer`.
    refused: Option<SocketAddr>,
    /// Whether this request already restarted its deployment once.
    recovered: bool,
    /// A Pipes error to answer with from `fail_to_proxy`.
    error: Option<PipesError>,
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
        RequestCtx::default()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
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
                let answer = match read_body(session, api::MAX_BODY).await {
                    Ok(body) => {
                        request.body = body;
                        api::handle(&self.fleet, &self.api_auth, request).await
                    }
                    Err(e) => Err(e),
                };
                return match answer {
                    Ok(reply) => reply_json(session, reply).await,
                    Err(e) => reply_error(session, &e).await,
                };
            }
            Next::Fail(e) => return reply_error(session, &e).await,
        };
        let upstream = match slot.ready() {
            Some(up) => up,
            None => match self.fleet.ready(&slot).await {
                Ok(up) => up,
                Err(e) => return reply_error(session, &e).await,
            },
        };
        slot.touch();
        ctx.upstream = Some(upstream);
        ctx.slot = Some(slot);
        Ok(false)
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut RequestCtx) -> Result<Box<HttpPeer>> {
        if let (Some(refused), Some(slot)) = (ctx.refused.take(), ctx.slot.as_ref()) {
            match self.fleet.recover(slot, refused).await {
                Ok(up) => ctx.upstream = Some(up),
                Err(e) => {
                    let status = e.status();
                    ctx.error = Some(e);
                    return Error::e_explain(ErrorType::HTTPStatus(status), "restarting the deployment failed");
                }
            }
        }
        match &ctx.upstream {
            Some(up) => Ok(up.peer()),
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
            if let Some(up) = &ctx.upstream {
                ctx.recovered = true;
                ctx.refused = Some(up.addr);
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

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut RequestCtx) -> FailToProxy {
        let error = ctx.error.take().unwrap_or_else(|| proxy_failure(e, ctx.slot.as_deref()));
        let code = error.status();
        if let Err(write) = write_error(session, &error).await {
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
                    Target::Domain => None,
                },
                method: req.method.as_str().to_owned(),
                path: path.to_owned(),
                query: req.uri.query().map(str::to_owned),
                authorization: req.headers.get(http::header::AUTHORIZATION).map(|v| v.as_bytes().to_vec()),
                body: Vec::new(),
            });
        }
        let d = match target {
            Target::Deployment(d) => d,
            Target::Domain => return Next::Fail(PipesError::NoDeployment { host: host.into_owned() }),
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

fn wants_html(req: &RequestHeader) -> bool {
    req.headers
        .get(http::header::ACCEPT)
        .and_then(|a| a.to_str().ok())
        .is_some_and(|a| a.contains("text/html"))
}

async fn reply_error(session: &mut Session, error: &PipesError) -> Result<bool> {
    write_error(session, error).await?;
    Ok(true)
}

async fn write_error(session: &mut Session, error: &PipesError) -> Result<()> {
    let (content_type, body) = if wants_html(session.req_header()) {
        ("text/html; charset=utf-8", error.to_html())
    } else {
        ("application/json", error.to_json().to_string())
    };
    let mut head = ResponseHeader::build(error.status(), Some(4))?;
    if let Some(secs) = error.retry_after() {
        head.insert_header(http::header::RETRY_AFTER, secs.to_string())?;
    }
    if let PipesError::MethodNotAllowed { allow, .. } = error {
        head.insert_header(http::header::ALLOW, *allow)?;
    }
    if matches!(error, PipesError::Unauthorized) {
        head.insert_header(http::header::WWW_AUTHENTICATE, "Bearer realm=\"pipes\"")?;
    }
    write_response(session, head, content_type, body.into()).await
}

/// Reads a request body of at most `limit` bytes.
async fn read_body(session: &mut Session, limit: usize) -> std::result::Result<Vec<u8>, PipesError> {
    let too_large = PipesError::BodyTooLarge { limit };
    let declared = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large);
    }
    let mut body = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > limit {
                    return Err(too_large);
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => return Err(PipesError::BadBody { message: e.to_string() }),
        }
    }
}

async fn reply_json(session: &mut Session, reply: api::Reply) -> Result<bool> {
    let head = ResponseHeader::build(reply.status, Some(4))?;
    let body = serde_json::to_vec_pretty(&reply.body).unwrap_or_default();
    write_response(session, head, "application/json", body.into()).await?;
    Ok(true)
}

async fn write_response(session: &mut Session, mut head: ResponseHeader, content_type: &str, body: Bytes) -> Result<()> {
    head.insert_header(http::header::CONTENT_TYPE, content_type)?;
    head.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    head.insert_header(http::header::CACHE_CONTROL, "no-store")?;
    let head_only = session.req_header().method == http::Method::HEAD;
    session.write_response_header(Box::new(head), head_only).await?;
    if !head_only {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

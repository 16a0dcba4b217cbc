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
use std::time::{Instant, SystemTime};

use async_trait::async_trait;
use http::HeaderValue;
use pingora::http::RequestHeader;
use pingora::prelude::*;
use pingora::proxy::FailToProxy;
use pingora::upstreams::peer::HttpPeer;
use pingora::{ErrorSource, ErrorType};

use crate::access::{self, Check, Verdict};
use crate::access_log::{self, AccessLog};
use crate::api;
use crate::auth::ApiAuth;
use crate::error::PipesError;
use crate::events;
use crate::fleet::{Activity, Admission, Entry, Fleet, OpenCount, Slot};
use crate::forwarded::Trusted;
use crate::reply::{self, Audience};
use crate::route::{self, Hosts, Target};
use crate::settings::Settings;
use crate::store::Store;
use crate::tls::acme::CHALLENGE_PREFIX;
use crate::tls::Acme;
use crate::ui;
use crate::waiting;
use crate::websocket;

/// The Pingora application of Pipes.
pub struct Proxy {
    fleet: Arc<Fleet>,
    hosts: Hosts,
    api_auth: ApiAuth,
    /// Configs and scoped tokens, read by the API.
    store: Store,
    /// How many event streams may be open, shared by every listener.
    stream_limits: Arc<events::Limits>,
    /// `PIPES_KEEPALIVE_TIMEOUT`, in whole seconds as Pingora takes it.
    keepalive_secs: u64,
    /// How long an API request's body may take (`PIPES_HEADER_TIMEOUT`).
    body_timeout: std::time::Duration,
    trusted: Trusted,
    /// `PIPES_UNDERSCORE_HEADERS`: header names with `_` pass.
    underscore_headers: bool,
    /// Answers ACME's HTTP-01 challenges, with on-demand certificates.
    acme: Option<Arc<Acme>>,
    /// `PIPES_HTTPS_REDIRECT`: the HTTPS port plain requests are sent to.
    https_redirect: Option<u16>,
    /// `PIPES_ACCESS_LOG`, when on.
    access_log: Option<Arc<AccessLog>>,
    /// `PIPES_WAITING_PAGE_AFTER`.
    waiting_page_after: Option<std::time::Duration>,
}

impl Proxy {
    /// The proxy for `fleet`, routing as `settings` say.
    pub fn new(
        fleet: Arc<Fleet>,
        store: Store,
        stream_limits: Arc<events::Limits>,
        settings: &Settings,
        acme: Option<Arc<Acme>>,
        access_log: Option<Arc<AccessLog>>,
    ) -> Self {
        Proxy {
            acme,
            access_log,
            https_redirect: settings.https_redirect,
            fleet,
            store,
            stream_limits,
            hosts: settings.hosts.clone(),
            api_auth: settings.api_auth.clone(),
            keepalive_secs: settings.keepalive_timeout.as_secs().max(1),
            body_timeout: settings.connections.header_timeout,
            trusted: settings.trusted_proxies.clone(),
            underscore_headers: settings.underscore_headers,
            waiting_page_after: settings.waiting_page_after,
        }
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
    /// When the request's head was read.
    began: Instant,
    /// Whether it waited for a cold start.
    cold_start: bool,
    /// Whether answers carry `X-Robots-Tag` (the deployment's `noindex`).
    noindex: bool,
    /// The access check that decided, and whether it let the request in.
    access: Option<(&'static str, bool)>,
    /// Cookies the deployment's auth server set, for the answer.
    auth_cookies: Vec<HeaderValue>,
}

impl RequestCtx {
    fn new() -> Self {
        IN_FLIGHT.add(1);
        RequestCtx {
            slot: None,
            activity: None,
            warmup: None,
            refused: None,
            recovered: false,
            error: None,
            began: Instant::now(),
            cold_start: false,
            noindex: false,
            access: None,
            auth_cookies: Vec::new(),
        }
    }
}

impl Drop for RequestCtx {
    fn drop(&mut self) {
        IN_FLIGHT.add(-1);
    }
}

/// What `request_filter` decided, owned, so the request can be answered.
enum Decision {
    /// A deployment's request, allowed by the policy.
    Deployment(Entry),
    Api(api::Request),
    /// The dashboard, on the bare domain as the browser named it.
    Dashboard(String),
    Fail(PipesError),
}

#[async_trait]
impl ProxyHttp for Proxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        // Pingora waits for a kept-alive connection's next request forever;
        // wait PIPES_KEEPALIVE_TIMEOUT (or not at all while handing over).
        if HANDING_OVER.load(Ordering::Relaxed) {
            session.set_keepalive(None);
        } else if session.get_keepalive().is_some() {
            session.set_keepalive(Some(self.keepalive_secs));
        }
        // Requests pipelined behind this one (apt sends them so) are
        // answered after it, in order (RFC 9112 §9.3.2), not dropped.
        session.set_pipelining_enabled(true);
        if let Err(e) = request_target(session.req_header()) {
            return reply_error(session, &e).await;
        }
        let path = session.req_header().uri.path();
        if let Some(name) = path.strip_prefix(ui::UI_PREFIX) {
            let name = name.to_owned();
            return ui::file(session, &name).await;
        }
        if let (Some(acme), Some(token)) = (&self.acme, path.strip_prefix(CHALLENGE_PREFIX)) {
            match acme.key_authorization(token) {
                Some(answer) => reply::text(session, 200, answer).await?,
                None => reply::text(session, 404, "no such challenge\n".to_owned()).await?,
            }
            return Ok(true);
        }
        if let Some(port) = self.https_redirect.filter(|_| !is_tls(session)) {
            return match https_location(session.req_header(), port) {
                Some(location) => reply::redirect(session, &location).await.map(|()| true),
                None => reply_error(session, &PipesError::NotOurs { host: String::new(), expected: "a Host header".into() }).await,
            };
        }
        let entry = match self.decide(session) {
            Decision::Deployment(entry) => entry,
            Decision::Dashboard(domain) => return ui::dashboard(session, &domain, self.hosts.style.pattern()).await,
            Decision::Api(request) if request.method == http::Method::OPTIONS => {
                return match self.dashboard_origin(session.req_header()) {
                    Some(origin) => reply::preflight(session, &origin).await.map(|()| true),
                    None => {
                        reply_error(session, &PipesError::BadRequest { reason: "a CORS request from an origin other than this Pipes' dashboard".into() }).await
                    }
                };
            }
            Decision::Api(request) if events::wanted(&request) => {
                let streams = events::Streams { fleet: &self.fleet, store: &self.store, auth: &self.api_auth, limits: &self.stream_limits };
                let client = self.client(session);
                if let Err((e, audience)) = events::serve(streams, client, session, request).await {
                    reply::error(session, &e, audience, false).await?;
                }
                return Ok(true);
            }
            Decision::Api(request) => {
                // The dashboard on the bare domain calls deployments' hosts.
                let origin = self.dashboard_origin(session.req_header());
                match self.api(session, request).await {
                    Ok(json) => reply::json(session, json, origin.as_deref()).await?,
                    Err((e, audience)) => reply::api_error(session, &e, audience, origin.as_deref()).await?,
                }
                return Ok(true);
            }
            Decision::Fail(e) => return reply_error(session, &e).await,
        };
        // Step 2b, access: an open deployment costs one atomic load here.
        let checked = {
            let rules = entry.rules();
            ctx.noindex = rules.noindex;
            (!rules.open()).then(|| arc_swap::Guard::into_inner(rules))
        };
        if let Some(rules) = checked {
            if !self.judge(session, &entry, rules, ctx).await? {
                return Ok(true);
            }
        }
        let admission = match self.fleet.admit(entry, || self.client(session)) {
            Ok(admission) => admission,
            Err(e) => return reply_error(session, &e).await,
        };
        let (slot, upstream) = match admission {
            Admission::Warm { slot, upstream } => (slot, upstream),
            Admission::Cold(start) => {
                ctx.slot = Some(start.slot().clone());
                ctx.cold_start = true;
                // A browser is shown the waiting page rather than a blank wait.
                let page_after = self.waiting_page_after.filter(|_| waiting::wanted(session.req_header()));
                let started = match page_after {
                    Some(after) => match tokio::time::timeout(after, start.ready()).await {
                        Ok(started) => started,
                        // The start goes on without this request.
                        Err(_) => return waiting::page(session, start.slot(), after).await,
                    },
                    None => start.ready().await,
                };
                match started {
                    Ok(up) => {
                        ctx.warmup = up.warmup_permit().await;
                        (start.slot().clone(), up)
                    }
                    Err(e) => return reply_error(session, &e).await,
                }
            }
        };
        ctx.slot = Some(slot.clone());
        ctx.activity = Some(slot.begin(upstream));
        if websocket::wanted(session.req_header()) && !session.is_http2() {
            return self.websocket(session, &slot, ctx).await;
        }
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

    fn fail_to_connect(&self, _session: &mut Session, _peer: &HttpPeer, ctx: &mut RequestCtx, mut e: Box<Error>) -> Box<Error> {
        if let Some(m) = ctx.slot.as_ref().and_then(|s| s.metrics.as_ref()) {
            m.connect_error();
        }
        if !ctx.recovered {
            if let Some(activity) = &ctx.activity {
                ctx.recovered = true;
                ctx.refused = Some(activity.upstream().addr);
                e.set_retry(true);
            }
        }
        e
    }

    async fn upstream_request_filter(&self, session: &mut Session, upstream_request: &mut RequestHeader, _ctx: &mut RequestCtx) -> Result<()> {
        self.forwarding_headers(session, upstream_request)?;
        canonical_content_length(upstream_request)?;
        origin_form(upstream_request)
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut pingora::http::ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // The fresh instance answered this one: let the next waiter in.
        ctx.warmup = None;
        reply::robots(upstream_response, ctx.noindex)?;
        for cookie in ctx.auth_cookies.drain(..) {
            upstream_response.append_header(http::header::SET_COOKIE, cookie)?;
        }
        Ok(())
    }

    /// Counts the request for metrics and writes its access log line.
    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        // nginx's word for a client that left before an answer.
        let status = session.response_written().map_or(499, |r| r.status.as_u16());
        let took = ctx.began.elapsed();
        if let Some(metrics) = self.fleet.metrics() {
            let counted = ctx.slot.as_ref().and_then(|s| s.metrics.as_ref()).unwrap_or(metrics.none());
            counted.request(status, took);
        }
        if let Some(log) = &self.access_log {
            let req = session.req_header();
            log.log(&access_log::Entry {
                time: access_log::timestamp(SystemTime::now() - took),
                client: self.client(session),
                host: route::strip_port(request_host(req).unwrap_or_default()),
                deployment: ctx.slot.as_ref().map(|s| s.deployment.to_string()),
                method: req.method.as_str(),
                path: req.uri.path(),
                status,
                bytes: session.body_bytes_sent(),
                duration: access_log::seconds(took),
                upstream: ctx.activity.as_ref().map(|a| a.upstream().addr.to_string()),
                cold_start: ctx.cold_start,
                access: ctx.access.map(|(check, _)| check),
                access_allowed: ctx.access.map(|(_, allowed)| allowed),
            });
        }
    }

    /// A client's broken HTTP is its own fault: logged at debug (in
    /// `fail_to_proxy`), not as Pingora's error.
    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, error: &Error) -> bool {
        error.esource() == &ErrorSource::Downstream
    }

    /// What error logs say of a request: never its query, which may carry a token.
    fn request_summary(&self, session: &Session, _ctx: &RequestCtx) -> String {
        let req = session.req_header();
        let host = req.headers.get(http::header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
        format!("{} {}, Host: {host}", req.method, req.uri.path())
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut RequestCtx) -> FailToProxy {
        let error = ctx.error.take().unwrap_or_else(|| proxy_failure(e, ctx.slot.as_deref()));
        if matches!(error, PipesError::BadRequest { .. }) {
            log::debug!("{}: {error}", self.request_summary(session, ctx));
        }
        let code = error.status();
        if let Err(write) = reply::error(session, &error, Audience::Public, true).await {
            log::debug!("cannot send the error response: {write}");
        }
        FailToProxy { error_code: code, can_reuse_downstream: false }
    }
}

impl Proxy {
    /// Routes a request and applies the policy, without touching the engine.
    fn decide(&self, session: &Session) -> Decision {
        let req = session.req_header();
        let raw = match request_host(req) {
            Ok(raw) => raw,
            Err(e) => return Decision::Fail(e),
        };
        let host = route::normalize_host(raw);
        let target = match route::route(&host, &self.hosts) {
            Ok(target) => target,
            Err(e) => return Decision::Fail(e),
        };
        let path = req.uri.path();
        if route::is_api_path(path) {
            return Decision::Api(api::Request {
                deployment: match target {
                    Target::Deployment(d) => Some(d.to_owned()),
                    Target::Bare => None,
                },
                method: req.method.clone(),
                path: path.to_owned(),
                query: req.uri.query().map(str::to_owned),
                authorization: req.headers.get(http::header::AUTHORIZATION).map(|v| v.as_bytes().to_vec()),
                host: raw.to_owned(),
                tls: is_tls(session),
                cross_site: self.cross_site(req),
                has_body: has_body(req),
                content_type: req.headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned),
                body: Vec::new(),
            });
        }
        let d = match target {
            Target::Deployment(d) => d,
            Target::Bare if path == "/" && matches!(req.method, http::Method::GET | http::Method::HEAD) => return Decision::Dashboard(raw.to_owned()),
            Target::Bare => return Decision::Fail(self.hosts.no_deployment(&host)),
        };
        match self.fleet.entry(d) {
            Ok(entry) => Decision::Deployment(entry),
            Err(e) => Decision::Fail(e),
        }
    }

    /// Judges access by a deployment's `rules` (which check something);
    /// `false` when the request was answered instead (refused, or a share
    /// link opened).
    async fn judge(&self, session: &mut Session, entry: &Entry, rules: Arc<access::Rules>, ctx: &mut RequestCtx) -> Result<bool> {
        // Counted and logged as the deployment's, whatever the verdict.
        if let Entry::Known(slot) = entry {
            ctx.slot = Some(slot.clone());
        }
        let client = self.client(session);
        let verdict = access::judge(self.fleet.access(), &rules, session.req_header(), client, is_tls(session)).await;
        match verdict {
            Verdict::Pass(passed) => {
                passed.apply(session.req_header_mut())?;
                ctx.access = passed.by.map(|check| (check.as_str(), true));
                ctx.auth_cookies = passed.set_cookies;
                Ok(true)
            }
            Verdict::ShareOpened { .. } => {
                ctx.access = Some((Check::Share.as_str(), true));
                reply::access(session, verdict, rules.noindex).await.map(|()| false)
            }
            Verdict::Refused { reason, .. } => {
                ctx.access = Some((reason.as_str(), false));
                let counted = entry.metrics().or_else(|| self.fleet.metrics().map(|m| m.other()));
                if let Some(m) = counted {
                    m.access_denied(reason.as_str());
                }
                reply::access(session, verdict, rules.noindex).await.map(|()| false)
            }
        }
    }
}

/// What a proxying failure that is not Pipes' own reads as: the client's
/// fault is a 400, the container's a 502.
fn proxy_failure(e: &Error, slot: Option<&Slot>) -> PipesError {
    if e.esource() == &ErrorSource::Downstream {
        return PipesError::BadRequest { reason: e.etype().as_str().to_lowercase() };
    }
    let deployment = slot.map_or_else(|| "the deployment".to_owned(), |s| s.deployment.to_string());
    let reason = match e.etype() {
        ErrorType::ConnectTimedout | ErrorType::ConnectRefused | ErrorType::ConnectNoRoute => "its container does not accept connections".to_owned(),
        ErrorType::ReadTimedout | ErrorType::WriteTimedout => "its container did not answer in time".to_owned(),
        _ => format!("the connection to its container failed ({})", e.etype().as_str()),
    };
    PipesError::Unservable { deployment, reason }
}

/// Whether the request came over TLS.
fn is_tls(session: &Session) -> bool {
    session.digest().is_some_and(|d| d.ssl_digest.is_some())
}

/// The same URL on https, at `port` (left out when it is 443).
fn https_location(req: &RequestHeader, port: u16) -> Option<String> {
    let host = request_host(req).ok()?;
    let name = route::strip_port(host);
    let target = req.uri.path_and_query().map_or("/", |p| p.as_str());
    Some(match port {
        443 => format!("https://{name}{target}"),
        port => format!("https://{name}:{port}{target}"),
    })
}

/// The host a request names: HTTP/2's `:authority` (or an absolute-form
/// target), else `Host`.
fn request_host(req: &RequestHeader) -> std::result::Result<&str, PipesError> {
    if let Some(authority) = req.uri.authority() {
        return Ok(authority.as_str());
    }
    let host = req.headers.get(http::header::HOST).ok_or_else(|| PipesError::NotOurs { host: String::new(), expected: "a Host header".into() })?;
    std::str::from_utf8(host.as_bytes()).map_err(|_| PipesError::BadName {
        label: String::from_utf8_lossy(host.as_bytes()).into_owned(),
        reason: "a host name is letters, digits, dots and dashes",
    })
}

/// The one `Content-Length` value Pingora framed the body by, where the
/// client wrote several equal ones (`5, 5`) or leading zeros (`05`).
fn canonical_content_length(upstream_request: &mut RequestHeader) -> Result<()> {
    let mut length: Option<u64> = None;
    let mut written = 0;
    for value in upstream_request.headers.get_all(http::header::CONTENT_LENGTH) {
        written += 1;
        for part in value.to_str().unwrap_or("x").split(',') {
            let part = part.trim();
            let n = part.parse::<u64>().ok().filter(|_| part.bytes().all(|b| b.is_ascii_digit()));
            match (n, length) {
                (Some(n), None) => length = Some(n),
                (Some(n), Some(l)) if n == l => {}
                // Pingora refuses conflicting lengths before this; never pass one on.
                _ => return Error::e_explain(ErrorType::InvalidHTTPHeader, "conflicting Content-Length"),
            }
        }
    }
    if let Some(n) = length {
        let canonical = n.to_string();
        let as_written = written == 1 && upstream_request.headers.get(http::header::CONTENT_LENGTH).is_some_and(|v| v.as_bytes() == canonical.as_bytes());
        if !as_written {
            upstream_request.insert_header(http::header::CONTENT_LENGTH, canonical)?;
        }
    }
    Ok(())
}

/// Whether `req` carries a body: a length above zero, or chunks.
fn has_body(req: &RequestHeader) -> bool {
    let length = req.headers.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
    length.is_some_and(|n| n > 0) || req.headers.contains_key(http::header::TRANSFER_ENCODING)
}

/// `Ok` for a request target Pipes serves: origin-form (`/path?q`),
/// absolute-form (`http://host/path`, which a server must accept and Pipes
/// passes on as origin-form), or `*` with `OPTIONS`. Anything else (`a/b`,
/// `?x=1`, `GET *`, an empty target) is refused, never rewritten into
/// another path.
fn request_target(req: &RequestHeader) -> std::result::Result<(), PipesError> {
    let raw = req.raw_path();
    let absolute = |scheme: &[u8]| raw.len() > scheme.len() && raw[..scheme.len()].eq_ignore_ascii_case(scheme);
    let fine = match raw.first() {
        Some(b'/') => true,
        Some(b'*') => raw.len() == 1 && req.method == http::Method::OPTIONS,
        _ => absolute(b"http://") || absolute(b"https://"),
    };
    if fine {
        Ok(())
    } else {
        let shown = String::from_utf8_lossy(&raw[..raw.len().min(64)]).into_owned();
        Err(PipesError::BadRequest { reason: format!("the request target '{shown}' is not origin-form (/path) or absolute-form (http://host/path)") })
    }
}

/// The request line as origin-form (`GET /path?q`): a client may have sent
/// absolute-form (`GET http://host/path`), which is for proxies, not apps.
/// Pingora keeps such a target as written, with the path alone in the URI.
fn origin_form(upstream_request: &mut RequestHeader) -> Result<()> {
    let raw = upstream_request.raw_path();
    if !raw.starts_with(b"/") && raw != b"*" {
        let uri = upstream_request.uri.clone();
        upstream_request.set_uri(uri);
    }
    Ok(())
}

impl Proxy {
    /// The client's address: the peer, or the client behind a trusted proxy.
    fn client(&self, session: &Session) -> Option<std::net::IpAddr> {
        let peer = session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip())?;
        Some(self.trusted.client(peer, session.req_header()))
    }

    /// Tells the instance who asked, and how (see `forwarded`).
    fn forwarding_headers(&self, session: &Session, upstream_request: &mut RequestHeader) -> Result<()> {
        let peer = session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip());
        let req = session.req_header();
        // The client's own Host value is shared, not copied.
        let host = match (req.uri.authority(), req.headers.get(http::header::HOST)) {
            (Some(authority), _) => HeaderValue::from_str(authority.as_str()).unwrap_or(HeaderValue::from_static("")),
            (None, Some(host)) => host.clone(),
            (None, None) => HeaderValue::from_static(""),
        };
        self.trusted.apply(peer, host, is_tls(session), self.underscore_headers, upstream_request)
    }

    /// The `Origin` of a request from this Pipes' dashboard to a
    /// deployment's host: the bare domain the request's host is under.
    fn dashboard_origin(&self, req: &RequestHeader) -> Option<String> {
        let origin = req.headers.get(http::header::ORIGIN)?.to_str().ok()?;
        let origin_host = self.bare_domain_of(origin)?;
        let host = route::normalize_host(request_host(req).ok()?);
        host.strip_suffix(origin_host.as_ref())?.ends_with('.').then(|| origin.to_owned())
    }

    /// The host of `url` (an `Origin` or a `Referer`), lowercased and
    /// without its port, if it is this Pipes' bare domain (the dashboard's).
    fn bare_domain_of<'u>(&self, url: &'u str) -> Option<std::borrow::Cow<'u, str>> {
        let rest = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://"))?;
        let host = route::normalize_host(rest.split(['/', '?', '#']).next().unwrap_or(""));
        matches!(route::route(&host, &self.hosts), Ok(Target::Bare)).then_some(host)
    }

    /// Who sent `req`, when a browser says it is a page of another site:
    /// `Sec-Fetch-Site: cross-site` (sent over HTTPS), an `Origin` other than
    /// the bare domain's (the dashboard's), or a `Referer` from elsewhere
    /// (an image or link over plain HTTP carries only that). `None` for
    /// clients that are no browser.
    fn cross_site(&self, req: &RequestHeader) -> Option<String> {
        let header = |name: &str| req.headers.get(name).and_then(|v| v.to_str().ok());
        let elsewhere = |url: &str| self.bare_domain_of(url).is_none();
        if let Some(origin) = header("origin").filter(|o| elsewhere(o)) {
            return Some(origin.to_owned());
        }
        if header("sec-fetch-site") == Some("cross-site") {
            return Some("a page of another site".to_owned());
        }
        header("referer").filter(|r| elsewhere(r)).map(|r| r.split(['?', '#']).next().unwrap_or(r).to_owned())
    }

    /// Answers an API request: nothing of its body is read before its token
    /// was checked, and the body must arrive within `PIPES_HEADER_TIMEOUT`.
    /// Errors before the token was accepted are the public's; after, the operator's.
    async fn api(&self, session: &mut Session, mut request: api::Request) -> std::result::Result<reply::Json, (PipesError, Audience)> {
        let public = |e| (e, Audience::Public);
        let admitted = api::admit(&self.store, &self.api_auth, &request).await.map_err(public)?;
        let body = tokio::time::timeout(self.body_timeout, reply::read_body(session, api::MAX_BODY));
        let body = body.await.map_err(|_| PipesError::BodyTimeout { timeout: self.body_timeout }).and_then(|b| b);
        request.body = body.map_err(|e| (e, Audience::Operator))?;
        api::answer(&self.fleet, &self.store, admitted, request).await.map_err(|e| (e, Audience::Operator))
    }

    /// Relays a WebSocket to the deployment of `slot`, restarting it once if
    /// nothing answers at its address (as `fail_to_connect` does for requests).
    async fn websocket(&self, session: &mut Session, slot: &Arc<Slot>, ctx: &mut RequestCtx) -> Result<bool> {
        let mut handshake = session.req_header().clone();
        self.forwarding_headers(session, &mut handshake)?;
        origin_form(&mut handshake)?;
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
                websocket::Failure::Refused => {
                    PipesError::Unservable { deployment: slot.deployment.to_string(), reason: "its container does not accept connections".into() }
                }
                websocket::Failure::Error(e) => e,
            };
            return reply_error(session, &error).await;
        }
    }
}

async fn reply_error(session: &mut Session, error: &PipesError) -> Result<bool> {
    reply::error(session, error, Audience::Public, false).await?;
    Ok(true)
}

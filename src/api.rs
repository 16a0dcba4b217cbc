//! The management API at `/__proxyapi`, answered by Pipes and never forwarded.
//!
//! On a deployment's host it shows and steers that deployment and its
//! repository's default config; on the bare domain it lists the fleet. Every
//! call needs a bearer token (see `auth.rs`); a token scoped to users
//! manages only their deployments. [`Endpoint`] is the one list of what
//! exists: dispatch, `Allow` headers and 404 answers come from it, and a test
//! holds `docs/openapi.json` to it.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use http::Method;
use serde_json::{json, Value};

use crate::auth::{Access, ApiAuth};
use crate::config::DeployConfig;
use crate::engine::{short_id, Instance};
use crate::error::PipesError;
use crate::fleet::{Applied, ConfigScope, Fleet, Generation, StartResult, Status, Switch};
use crate::reply::{error_body, Json};
use crate::route::{Deployment, API_PREFIX};
use crate::store::Store;

/// Largest request body the API reads.
pub(crate) const MAX_BODY: usize = 1 << 20;
/// Log lines returned when `tail` is not given, and the most that may be asked.
const DEFAULT_TAIL: usize = 100;
const MAX_TAIL: usize = 10_000;
/// How long a share link opens its deployment when no `ttl` is given.
const DEFAULT_SHARE_TTL: Duration = Duration::from_secs(24 * 3600);
/// bcrypt's cost for hashes the API makes: about 50 ms per check here.
const PASSWORD_COST: u32 = 10;

/// Where an endpoint is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind {
    /// On a deployment's host.
    Deployment,
    /// On the bare domain.
    Bare,
    /// On both.
    Both,
}

impl HostKind {
    /// Whether an endpoint served `self` is served on a host of kind `host`.
    pub fn covers(self, host: HostKind) -> bool {
        self == HostKind::Both || self == host
    }
}

/// Every endpoint of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Container,
    ContainerConfig,
    ContainerStop,
    ContainerRestart,
    ContainerRedeploy,
    ContainerRollback,
    ContainerLogs,
    ContainerShare,
    ContainerShareRevoke,
    RepositoryConfig,
    Deployments,
    RegistryHook,
    Events,
    PasswordHash,
}

impl Endpoint {
    /// All endpoints, in the order the docs list them.
    pub const ALL: [Endpoint; 14] = [
        Endpoint::Container,
        Endpoint::ContainerConfig,
        Endpoint::ContainerStop,
        Endpoint::ContainerRestart,
        Endpoint::ContainerRedeploy,
        Endpoint::ContainerRollback,
        Endpoint::ContainerLogs,
        Endpoint::ContainerShare,
        Endpoint::ContainerShareRevoke,
        Endpoint::RepositoryConfig,
        Endpoint::Deployments,
        Endpoint::RegistryHook,
        Endpoint::Events,
        Endpoint::PasswordHash,
    ];

    /// The full path.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Container => "/__proxyapi/container",
            Endpoint::ContainerConfig => "/__proxyapi/container/config",
            Endpoint::ContainerStop => "/__proxyapi/container/stop",
            Endpoint::ContainerRestart => "/__proxyapi/container/restart",
            Endpoint::ContainerRedeploy => "/__proxyapi/container/redeploy",
            Endpoint::ContainerRollback => "/__proxyapi/container/rollback",
            Endpoint::ContainerLogs => "/__proxyapi/container/logs",
            Endpoint::ContainerShare => "/__proxyapi/container/share",
            Endpoint::ContainerShareRevoke => "/__proxyapi/container/share/revoke",
            Endpoint::PasswordHash => "/__proxyapi/password-hash",
            Endpoint::RepositoryConfig => "/__proxyapi/repository/config",
            Endpoint::Deployments => "/__proxyapi/deployments",
            Endpoint::RegistryHook => "/__proxyapi/hooks/registry",
            Endpoint::Events => "/__proxyapi/events",
        }
    }

    /// The methods it serves (`HEAD` is served wherever `GET` is).
    pub fn methods(self) -> &'static [Method] {
        match self {
            Endpoint::Container => &[Method::GET, Method::DELETE],
            Endpoint::ContainerConfig | Endpoint::RepositoryConfig => &[Method::GET, Method::PUT],
            // The original API stopped on GET; POST is the proper verb.
            Endpoint::ContainerStop => &[Method::GET, Method::POST],
            Endpoint::ContainerRestart
            | Endpoint::ContainerRedeploy
            | Endpoint::ContainerRollback
            | Endpoint::RegistryHook
            | Endpoint::ContainerShare
            | Endpoint::ContainerShareRevoke
            | Endpoint::PasswordHash => &[Method::POST],
            Endpoint::ContainerLogs | Endpoint::Deployments | Endpoint::Events => &[Method::GET],
        }
    }

    /// Whether `method` on it changes something (GET on `container/stop`,
    /// which the original API promised, among them).
    pub fn acts(self, method: &Method) -> bool {
        *method != Method::GET || self == Endpoint::ContainerStop
    }

    /// Which host serves it.
    pub fn on(self) -> HostKind {
        match self {
            Endpoint::Deployments | Endpoint::RegistryHook => HostKind::Bare,
            Endpoint::Events | Endpoint::PasswordHash => HostKind::Both,
            _ => HostKind::Deployment,
        }
    }

    /// The `Allow` header value.
    pub fn allow(self) -> String {
        let mut methods: Vec<&str> = self.methods().iter().map(Method::as_str).collect();
        if self.methods().contains(&Method::GET) {
            methods.insert(1, "HEAD");
        }
        methods.join(", ")
    }

    /// The endpoint at `path`, if any (a trailing slash is ignored).
    pub fn find(path: &str) -> Option<Endpoint> {
        let path = path.strip_suffix('/').filter(|p| p.len() > API_PREFIX.len()).unwrap_or(path);
        Endpoint::ALL.into_iter().find(|e| e.path() == path)
    }
}

/// One API request, owned.
#[derive(Debug)]
pub(crate) struct Request {
    /// The deployment whose host was asked, or `None` for the bare domain.
    pub deployment: Option<Deployment>,
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub authorization: Option<Vec<u8>>,
    /// The host as the client named it (with its port), and whether it came
    /// over TLS: where links to the deployment point.
    pub host: String,
    pub tls: bool,
    /// The page that sent it, when a browser says it is another site's
    /// (its `Origin`, `Sec-Fetch-Site: cross-site` or its `Referer`).
    pub cross_site: Option<String>,
    /// Whether it carries a body, and what `Content-Type` says it is.
    pub has_body: bool,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

/// An API request whose endpoint, method and token were checked, before
/// its body is read: a client without a valid token gets nothing read.
pub(crate) struct Authorized {
    endpoint: Endpoint,
    method: Method,
    access: Access,
}

impl Authorized {
    /// What the token may manage.
    pub(crate) fn access(&self) -> &Access {
        &self.access
    }
}

/// Checks what the request head alone can tell: endpoint, method, token.
pub(crate) async fn admit(store: &Store, auth: &ApiAuth, req: &Request) -> Result<Authorized, PipesError> {
    let on = if req.deployment.is_some() { HostKind::Deployment } else { HostKind::Bare };
    let endpoint = Endpoint::find(&req.path).ok_or_else(|| not_found(&req.path, on, None))?;
    if !endpoint.on().covers(on) {
        return Err(not_found(&req.path, on, Some(endpoint.on())));
    }
    let method = if req.method == Method::HEAD { Method::GET } else { req.method.clone() };
    // HEAD asks what GET would answer; it never acts, even where GET does.
    let head_that_acts = req.method == Method::HEAD && endpoint.acts(&method);
    if !endpoint.methods().contains(&method) || head_that_acts {
        return Err(PipesError::MethodNotAllowed { path: req.path.clone(), allow: endpoint.allow() });
    }
    // A broken tokens.json must not lock the admin out: its tokens are ignored.
    let tokens = store.tokens().await.unwrap_or_else(|e| {
        log::error!("{e}; the tokens it grants are ignored until it is fixed");
        Vec::new()
    });
    // Docker Hub's webhooks cannot send headers: the hook takes `?token=` too.
    let from_query = match (endpoint, &req.authorization) {
        (Endpoint::RegistryHook, None) => query_param(req.query.as_deref(), "token").map(|t| format!("Bearer {t}").into_bytes()),
        _ => None,
    };
    let access = auth.authorize(req.authorization.as_deref().or(from_query.as_deref()), &tokens)?;
    if let Some(d) = &req.deployment {
        access.check(&d.user)?;
    }
    // A web page on another site may not drive the API, whatever the auth mode.
    if let Some(origin) = req.cross_site.as_ref().filter(|_| endpoint.acts(&method)) {
        return Err(PipesError::CrossSite { origin: origin.clone() });
    }
    if req.has_body && !req.content_type.as_deref().is_some_and(is_json) {
        return Err(PipesError::UnsupportedMediaType { given: req.content_type.clone().unwrap_or_default() });
    }
    Ok(Authorized { endpoint, method, access })
}

/// Whether a `Content-Type` says JSON: `application/json`, or a JSON
/// dialect such as the registry's `application/vnd.docker.distribution.events.v1+json`.
fn is_json(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// 404 for `path` asked on a host of kind `on`: the endpoints served there,
/// and where `path` is served if on the other kind of host.
fn not_found(path: &str, on: HostKind, served_on: Option<HostKind>) -> PipesError {
    PipesError::ApiNotFound {
        path: path.to_owned(),
        known: Endpoint::ALL.iter().filter(|e| e.on().covers(on)).map(|e| e.path()).collect(),
        elsewhere: served_on.map(|on| match on {
            HostKind::Bare => "the bare domain (a Host without deployment labels, such as example.com)",
            HostKind::Deployment => "a deployment's host ({tag}.{repo}.{user}.<domain>)",
            HostKind::Both => "every host",
        }),
    }
}

/// Answers an admitted API request, its body read.
pub(crate) async fn answer(fleet: &Arc<Fleet>, store: &Store, admitted: Authorized, req: Request) -> Result<Json, PipesError> {
    let Authorized { endpoint, method, access } = admitted;
    let Some(d) = &req.deployment else {
        return match endpoint {
            Endpoint::RegistryHook => registry_hook(fleet, &access, &req.body).await,
            Endpoint::PasswordHash => password_hash(&req.body).await.map(Json::ok),
            Endpoint::Deployments => deployments(fleet, &access).await.map(Json::ok),
            // The event stream is answered by `events`; the rest is not served here.
            _ => Err(not_found(&req.path, HostKind::Bare, Some(endpoint.on()))),
        };
    };
    match (endpoint, method) {
        (Endpoint::Container, Method::GET) => state(fleet, d).await.map(Json::ok),
        (Endpoint::Container, _) => {
            let keep_volumes = match query_param(req.query.as_deref(), "keep_volumes").as_deref() {
                None | Some("false") => false,
                Some("true") => true,
                Some(other) => return Err(PipesError::BadQuery { parameter: "keep_volumes", message: format!("expected true or false, got '{other}'") }),
            };
            fleet.remove(d, keep_volumes).await?;
            state(fleet, d).await.map(Json::ok)
        }
        (Endpoint::ContainerConfig, Method::GET) => container_config(fleet, d).await.map(Json::ok),
        (Endpoint::ContainerConfig, _) => {
            let config = DeployConfig::from_json(&req.body)?;
            match fleet.change_config(ConfigScope::Tag(d), config).await? {
                Applied::Recreated(start) => started(fleet, d, start, true).await,
                Applied::Pending | Applied::AccessOnly => state(fleet, d).await.map(Json::ok),
            }
        }
        (Endpoint::ContainerStop, _) => {
            fleet.stop(d).await?;
            state(fleet, d).await.map(Json::ok)
        }
        (Endpoint::ContainerRestart, _) => {
            fleet.check_allowed(d)?;
            started(fleet, d, fleet.restart(d).await, false).await
        }
        (Endpoint::ContainerRedeploy, _) => {
            fleet.check_allowed(d)?;
            switched(d, fleet.redeploy(d).await)
        }
        (Endpoint::ContainerRollback, _) => {
            fleet.check_allowed(d)?;
            switched(d, fleet.rollback(d).await)
        }
        (Endpoint::ContainerLogs, _) => logs(fleet, d, req.query.as_deref()).await.map(Json::ok),
        (Endpoint::ContainerShare, _) => {
            fleet.check_allowed(d)?;
            share(fleet, d, &req).map(Json::ok)
        }
        (Endpoint::ContainerShareRevoke, _) => {
            fleet.check_allowed(d)?;
            let before = fleet.access().revoke(d).await?;
            Ok(Json::ok(json!({ "deployment": d.to_string(), "revoked_before": rfc3339_ms(before) })))
        }
        (Endpoint::PasswordHash, _) => password_hash(&req.body).await.map(Json::ok),
        (Endpoint::RepositoryConfig, Method::GET) => repository_config(store, d).await.map(Json::ok),
        (Endpoint::RepositoryConfig, _) => {
            let config = DeployConfig::from_json(&req.body)?;
            fleet.change_config(ConfigScope::Repository(d), config).await?;
            repository_config(store, d).await.map(Json::ok)
        }
        (Endpoint::Deployments | Endpoint::RegistryHook | Endpoint::Events, _) => Err(not_found(&req.path, HostKind::Deployment, Some(endpoint.on()))),
    }
}

/// The answer to a redeploy or rollback: which generation serves now and
/// which is kept. A failure is answered with its status; what served keeps serving.
fn switched(d: &Deployment, switch: Result<Switch, PipesError>) -> Result<Json, PipesError> {
    let generation = |g: &Generation| json!({ "container": g.instance, "digest": g.digest });
    let body = match switch? {
        Switch::Unchanged(now) => json!({
            "deployment": d.to_string(),
            "changed": false,
            "current": generation(&now),
            "previous": null,
        }),
        Switch::Replaced { previous, current } => json!({
            "deployment": d.to_string(),
            "changed": true,
            "current": generation(&current),
            "previous": generation(&previous),
        }),
    };
    Ok(Json::ok(body))
}

/// `POST /__proxyapi/hooks/registry`: a registry's push notification. Every
/// running deployment a push names (and the token covers) is redeployed in
/// the background; one that ran here before and does not run now has the new
/// image pulled in the background, so its next start neither pulls nor wakes
/// the old image. The answer says which, and why the others were not.
async fn registry_hook(fleet: &Arc<Fleet>, access: &Access, body: &[u8]) -> Result<Json, PipesError> {
    let mut pushed = pushes(body, fleet.registry_path())?;
    pushed.sort();
    pushed.dedup();
    let (mut redeploying, mut pulling, mut ignored) = (Vec::new(), Vec::new(), Vec::new());
    for d in pushed {
        let name = d.to_string();
        let reason = if !access.covers(&d.user) {
            Some("this token does not manage its user")
        } else if !fleet.allows(d.as_ref()) {
            Some("not allowed by PIPES_ALLOW")
        } else if fleet.serving(d.as_ref()) {
            redeploying.push(json!(name));
            fleet.redeploy_later(d, "push notification");
            None
        } else if fleet.prepulled_lately(&d) || fleet.has_run(&d).await {
            // Coalesced: at most one pull ahead per deployment at a time.
            pulling.push(json!(name));
            fleet.prepull_later(d);
            None
        } else {
            Some("it never ran here; its first start pulls the image")
        };
        if let Some(reason) = reason {
            ignored.push(json!({ "deployment": name, "reason": reason }));
        }
    }
    Ok(Json { status: 202, body: json!({ "redeploying": redeploying, "pulling": pulling, "ignored": ignored }) })
}

/// The deployments a push notification names: Docker's registry
/// (distribution) sends `{"events": [{"action": "push", "target":
/// {"repository", "tag"}}]}`; Docker Hub sends `{"push_data": {"tag"},
/// "repository": {"repo_name"}}`. A registry behind a path
/// (`PIPES_REGISTRY=host/team`) names repositories `team/user/repo`.
fn pushes(body: &[u8], registry_path: Option<&str>) -> Result<Vec<Deployment>, PipesError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| PipesError::BadJson { message: e.to_string(), line: e.line(), column: e.column() })?;
    let key = |repository: &str, tag: &str| {
        let repository = match registry_path {
            Some(path) => repository.strip_prefix(path)?.strip_prefix('/')?,
            None => repository,
        };
        Deployment::parse(&format!("{repository}:{tag}"))
    };
    if let Some(events) = value.get("events").and_then(Value::as_array) {
        return Ok(events
            .iter()
            .filter(|e| e["action"] == "push")
            .filter_map(|e| key(e["target"]["repository"].as_str()?, e["target"]["tag"].as_str()?))
            .collect());
    }
    if let (Some(repository), Some(tag)) = (value["repository"]["repo_name"].as_str(), value["push_data"]["tag"].as_str()) {
        return Ok(key(repository, tag).into_iter().collect());
    }
    Err(PipesError::InvalidField { field: "events".into(), message: "expected a registry notification ({\"events\": [...]}) or a Docker Hub webhook".into() })
}

/// The answer after an operation that starts the deployment: its state, or
/// the start's failure with whether the config was saved.
async fn started(fleet: &Arc<Fleet>, d: &Deployment, start: StartResult, config_saved: bool) -> Result<Json, PipesError> {
    match start {
        Ok(_) => state(fleet, d).await.map(Json::ok),
        Err(e) => {
            let mut body = error_body(&e);
            if let Some(obj) = body.as_object_mut() {
                obj.insert("config_saved".into(), json!(config_saved));
            }
            Ok(Json { status: e.status(), body })
        }
    }
}

/// `GET container`: what runs for the deployment.
async fn state(fleet: &Arc<Fleet>, d: &Deployment) -> Result<Value, PipesError> {
    let Status {
        deployment,
        state,
        image_ref,
        image,
        allowed,
        instance,
        previous,
        upstream,
        last_request_ms,
        open_connections,
        idle_at_ms,
        idle_timeout,
        config,
        config_pending,
        last_error,
        services,
        volumes,
    } = fleet.status(d).await?;
    let effective = match config {
        Ok(c) => c.to_json(instance.as_ref().and_then(|i| i.port)),
        Err(e) => json!({ "error": error_body(&e) }),
    };
    // What the instance runs, and beside it what a restart would apply.
    let made_from = instance.as_ref().and_then(|i| serde_json::from_str::<Value>(i.config.as_deref()?).ok());
    let (config, config_pending) = match (made_from, config_pending) {
        (Some(running), true) => (running, Some(effective)),
        (None, true) => (Value::Null, Some(effective)),
        (_, false) => (effective, None),
    };
    let mut body = json!({
        "deployment": deployment.to_string(),
        "image": image_ref,
        "image_id": image.as_ref().map(|i| i.id.clone()),
        "image_digest": image.as_ref().and_then(|i| i.digest.clone()),
        "state": state.as_str(),
        "allowed": allowed,
        "container": instance.as_ref().map(container),
        "previous": previous.as_ref().map(container),
        "upstream": upstream.map(|u| u.to_string()),
        "last_request_at": last_request_ms.map(rfc3339_ms),
        "open_connections": open_connections,
        "idle_timeout": idle_timeout.map(|t| humantime::format_duration(t).to_string()),
        "idle_at": idle_at_ms.map(rfc3339_ms),
        "config": config,
        "config_pending": config_pending,
        "services": services.iter().filter_map(|(s, pending)| Some((s.service.clone()?, service(s, *pending)))).collect::<serde_json::Map<_, _>>(),
        "volumes": volumes,
        "expires_at": fleet.expires_at_ms(d).await.map(rfc3339_ms),
    });
    if let (Some(e), Some(obj)) = (last_error, body.as_object_mut()) {
        obj.insert("last_error".into(), error_body(&e));
    }
    Ok(body)
}

/// One generation's container, as `GET container` shows it.
fn container(i: &Instance) -> Value {
    json!({
        "id": i.id,
        "short_id": short_id(&i.id),
        "running": i.running,
        "paused": i.paused,
        "exit_code": i.exit_code,
        "started_at": i.started_at,
        "port": i.port,
        "digest": i.digest,
    })
}

/// One service beside the app, as `GET container` shows it.
fn service(i: &Instance, config_pending: bool) -> Value {
    let state = if i.running {
        "running"
    } else if i.paused {
        "paused"
    } else {
        "stopped"
    };
    let image = i.config.as_deref().and_then(|c| serde_json::from_str::<Value>(c).ok()).and_then(|c| c.get("image").cloned());
    json!({
        "state": state,
        "image": image,
        "container": i.id,
        "short_id": short_id(&i.id),
        "image_digest": i.digest,
        "health": i.health,
        "exit_code": i.exit_code,
        "started_at": i.started_at,
        "config_pending": config_pending,
    })
}

/// `GET container/config`: the tag's own layer, its repository's, and the merge.
async fn container_config(fleet: &Arc<Fleet>, d: &Deployment) -> Result<Value, PipesError> {
    let configs = fleet.configs(d).await?;
    Ok(json!({
        "deployment": d.to_string(),
        "config": configs.own,
        "repository": configs.repository,
        "effective": configs.effective.to_json(None),
    }))
}

async fn repository_config(store: &Store, d: &Deployment) -> Result<Value, PipesError> {
    let config = store.repository(&d.user, &d.repo).await?;
    Ok(json!({ "repository": d.repository(), "config": config }))
}

/// `GET container/logs?tail=N&service=NAME`.
async fn logs(fleet: &Arc<Fleet>, d: &Deployment, query: Option<&str>) -> Result<Value, PipesError> {
    let tail = match query_param(query, "tail") {
        None => DEFAULT_TAIL,
        Some(t) => t
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_TAIL).contains(n))
            .ok_or_else(|| PipesError::BadQuery { parameter: "tail", message: format!("expected a whole number from 1 to {MAX_TAIL}, got '{t}'") })?,
    };
    let service = query_param(query, "service");
    let (id, lines) = fleet.logs(d, tail, service.clone()).await?;
    if let (None, Some(name)) = (&id, &service) {
        return Err(PipesError::BadQuery { parameter: "service", message: format!("{d} has no service '{name}'") });
    }
    Ok(json!({ "deployment": d.to_string(), "service": service, "container": id, "tail": tail, "lines": lines }))
}

/// `POST container/share` with `{"ttl": "24h"}` (the body is optional):
/// a link that opens the deployment without credentials until it expires.
fn share(fleet: &Arc<Fleet>, d: &Deployment, req: &Request) -> Result<Value, PipesError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Ask {
        ttl: Option<crate::config::Span>,
    }
    let ask: Ask = if req.body.is_empty() {
        Ask { ttl: None }
    } else {
        serde_json::from_slice(&req.body).map_err(|e| PipesError::InvalidField { field: "ttl".into(), message: e.to_string() })?
    };
    let ttl = ask.ttl.map_or(DEFAULT_SHARE_TTL, |t| t.0);
    let max = crate::access::share::MAX_TTL;
    if ttl < Duration::from_secs(1) || ttl > max {
        return Err(PipesError::InvalidField { field: "ttl".into(), message: format!("must be from 1s to {}", humantime::format_duration(max)) });
    }
    let (token, expires) = fleet.access().share(d, ttl);
    let scheme = if req.tls { "https" } else { "http" };
    let name = crate::access::share::NAME;
    Ok(json!({
        "deployment": d.to_string(),
        "url": format!("{scheme}://{}/?{name}={token}", req.host),
        "expires": rfc3339_ms(expires),
    }))
}

/// `POST password-hash` with `{"password": "…"}`: its bcrypt hash, for
/// `access.basic` (the dashboard's editor asks; browsers have no bcrypt).
async fn password_hash(body: &[u8]) -> Result<Value, PipesError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Ask {
        password: String,
    }
    let ask: Ask = serde_json::from_slice(body).map_err(|e| PipesError::InvalidField { field: "password".into(), message: e.to_string() })?;
    if ask.password.is_empty() || ask.password.len() > 72 {
        return Err(PipesError::InvalidField { field: "password".into(), message: "must be 1 to 72 bytes (bcrypt reads no more)".into() });
    }
    let hash = tokio::task::spawn_blocking(move || bcrypt::hash(ask.password, PASSWORD_COST)).await;
    let hash = hash.map_err(|e| e.to_string()).and_then(|h| h.map_err(|e| e.to_string()));
    hash.map(|hash| json!({ "hash": hash })).map_err(|detail| PipesError::Engine { action: "hash a password", detail })
}

/// `GET /__proxyapi/deployments` on the bare domain: every deployment the token may see.
async fn deployments(fleet: &Arc<Fleet>, access: &Access) -> Result<Value, PipesError> {
    let list: Vec<Value> = fleet
        .summaries()
        .await?
        .into_iter()
        .filter(|s| access.covers(&s.deployment.user))
        .map(|s| {
            json!({
                "deployment": s.deployment.to_string(),
                "state": s.state.as_str(),
                "container": s.instance_id,
                "upstream": s.upstream.map(|u| u.to_string()),
                "last_request_at": s.last_request_ms.map(rfc3339_ms),
                "services": s.services,
            })
        })
        .collect();
    Ok(json!({ "deployments": list }))
}

/// The first value of query parameter `name`, percent-decoded.
fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

fn rfc3339_ms(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_found_with_or_without_a_trailing_slash() {
        assert_eq!(Endpoint::find("/__proxyapi/container"), Some(Endpoint::Container));
        assert_eq!(Endpoint::find("/__proxyapi/container/"), Some(Endpoint::Container));
        assert_eq!(Endpoint::find("/__proxyapi"), None);
        assert_eq!(Endpoint::find("/__proxyapi/"), None);
        assert_eq!(Endpoint::find("/__proxyapi/containers"), None);
    }

    #[test]
    fn allow_lists_what_is_served() {
        assert_eq!(Endpoint::ContainerConfig.allow(), "GET, HEAD, PUT");
        assert_eq!(Endpoint::Container.allow(), "GET, HEAD, DELETE");
        assert_eq!(Endpoint::ContainerRestart.allow(), "POST");
        for e in Endpoint::ALL {
            assert!(e.path().starts_with(API_PREFIX));
            assert_eq!(Endpoint::find(e.path()), Some(e));
        }
    }

    #[test]
    fn pushes_from_the_registry_and_from_docker_hub() {
        let distribution = br#"{"events":[
            {"action":"push","target":{"mediaType":"application/vnd.docker.distribution.manifest.v2+json",
             "repository":"alice/app","tag":"v1","digest":"sha256:abc"}},
            {"action":"push","target":{"repository":"alice/app","digest":"sha256:blob"}},
            {"action":"pull","target":{"repository":"bob/app","tag":"v1"}},
            {"action":"push","target":{"repository":"Not/Valid","tag":"v1"}}
        ]}"#;
        let keys: Vec<String> = pushes(distribution, None).unwrap().iter().map(|d| d.to_string()).collect();
        assert_eq!(keys, ["alice/app:v1"]);
        let hub = br#"{"push_data":{"tag":"pr-42","pusher":"alice"},"repository":{"repo_name":"alice/app","name":"app"}}"#;
        let keys: Vec<String> = pushes(hub, None).unwrap().iter().map(|d| d.to_string()).collect();
        assert_eq!(keys, ["alice/app:pr-42"]);
        let behind = br#"{"events":[{"action":"push","target":{"repository":"team/alice/app","tag":"v2"}},
                                    {"action":"push","target":{"repository":"other/alice/app","tag":"v2"}}]}"#;
        let keys: Vec<String> = pushes(behind, Some("team")).unwrap().iter().map(|d| d.to_string()).collect();
        assert_eq!(keys, ["alice/app:v2"]);
        assert_eq!(pushes(b"{}", None).unwrap_err().status(), 422);
        assert_eq!(pushes(b"nope", None).unwrap_err().status(), 400);
    }

    #[test]
    fn query_parameters_are_decoded() {
        assert_eq!(query_param(Some("a=1&tail=20"), "tail").as_deref(), Some("20"));
        assert_eq!(query_param(Some("tail"), "tail").as_deref(), Some(""));
        assert_eq!(query_param(Some("tail=%32%30"), "tail").as_deref(), Some("20"));
        assert_eq!(query_param(None, "tail"), None);
    }
}

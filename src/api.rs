//! The management API at `/__proxyapi`, answered by Pipes and never forwarded.
//!
//! On a deployment's host it shows and steers that deployment and its
//! repository's default config; on the bare domain it lists the fleet. Every
//! call needs a bearer token (see [`crate::security::ApiAuth`]); a token scoped
//! to users manages only their deployments. `openapi.json` describes it all, and
//! a test holds that file and [`ROUTES`] to each other.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::config::DeployConfig;
use crate::error::PipesError;
use crate::fleet::{short_id, Fleet, Slot, SlotState};
use crate::route::{Deployment, API_PREFIX};
use crate::security::{Access, ApiAuth};

/// Largest request body the API reads.
pub const MAX_BODY: usize = 1 << 20;
/// Log lines returned when `tail` is not given, and the most that may be asked.
const DEFAULT_TAIL: usize = 100;
const MAX_TAIL: usize = 10_000;

/// Where a route is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum On {
    /// On a deployment's host.
    Deployment,
    /// On the bare domain.
    Domain,
}

/// One API route: its full path, methods and host.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    pub path: &'static str,
    pub methods: &'static [&'static str],
    pub allow: &'static str,
    pub on: On,
}

/// Every route of the API; 404 answers list their paths.
pub const ROUTES: &[Route] = &[
    Route { path: "/__proxyapi/container", methods: &["GET", "DELETE"], allow: "GET, HEAD, DELETE", on: On::Deployment },
    Route { path: "/__proxyapi/container/config", methods: &["GET", "PUT"], allow: "GET, HEAD, PUT", on: On::Deployment },
    Route { path: "/__proxyapi/container/stop", methods: &["GET", "POST"], allow: "GET, POST", on: On::Deployment },
    Route { path: "/__proxyapi/container/restart", methods: &["POST"], allow: "POST", on: On::Deployment },
    Route { path: "/__proxyapi/container/logs", methods: &["GET"], allow: "GET, HEAD", on: On::Deployment },
    Route { path: "/__proxyapi/repository/config", methods: &["GET", "PUT"], allow: "GET, HEAD, PUT", on: On::Deployment },
    Route { path: "/__proxyapi/deployments", methods: &["GET"], allow: "GET, HEAD", on: On::Domain },
];

/// One API request, owned.
#[derive(Debug)]
pub struct Request {
    /// The deployment whose host was asked, or `None` for the bare domain.
    pub deployment: Option<Deployment>,
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub authorization: Option<Vec<u8>>,
    pub body: Vec<u8>,
}

/// A JSON answer of the API.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
}

impl Reply {
    fn ok(body: Value) -> Self {
        Reply { status: 200, body }
    }
}

/// The route for `path`, if any (a trailing slash is ignored).
pub fn find_route(path: &str) -> Option<&'static Route> {
    let path = path.strip_suffix('/').filter(|p| p.len() > API_PREFIX.len()).unwrap_or(path);
    ROUTES.iter().find(|r| r.path == path)
}

/// Answers one API request.
pub async fn handle(fleet: &Arc<Fleet>, auth: &ApiAuth, req: Request) -> Result<Reply, PipesError> {
    let not_found = || PipesError::ApiNotFound { path: req.path.clone() };
    let route = find_route(&req.path).ok_or_else(not_found)?;
    let on = if req.deployment.is_some() { On::Deployment } else { On::Domain };
    if route.on != on {
        return Err(not_found());
    }
    let method = if req.method == "HEAD" && route.methods.contains(&"GET") { "GET" } else { req.method.as_str() };
    if !route.methods.contains(&method) {
        return Err(PipesError::MethodNotAllowed { path: req.path.clone(), allow: route.allow });
    }
    let store = fleet.deployer().store().clone();
    let tokens = fleet.on_control(async move { store.tokens() }).await?;
    let access = auth.authorize(req.authorization.as_deref(), &tokens)?;

    let Some(d) = &req.deployment else {
        return deployments(fleet, &access).await.map(Reply::ok);
    };
    access.check(&d.user)?;
    let endpoint = &route.path[API_PREFIX.len()..];
    match (endpoint, method) {
        ("/container", "GET") => state(fleet, d).await.map(Reply::ok),
        ("/container", "DELETE") => {
            fleet.remove(&fleet.slot(d.as_ref())).await?;
            state(fleet, d).await.map(Reply::ok)
        }
        ("/container/config", "GET") => container_config(fleet, d).await.map(Reply::ok),
        ("/container/config", "PUT") => {
            let config = DeployConfig::from_json(&req.body)?;
            allowed(fleet, d)?;
            let (store, key) = (fleet.deployer().store().clone(), d.clone());
            fleet.on_control(async move { store.put_tag(&key, &config) }).await?;
            log::info!("{d}: config replaced over the API, recreating its container");
            started(fleet, d, fleet.recreate(&fleet.slot(d.as_ref())).await, true).await
        }
        ("/container/stop", _) => {
            fleet.stop(&fleet.slot(d.as_ref())).await?;
            state(fleet, d).await.map(Reply::ok)
        }
        ("/container/restart", _) => {
            allowed(fleet, d)?;
            started(fleet, d, fleet.restart(&fleet.slot(d.as_ref())).await, false).await
        }
        ("/container/logs", _) => logs(fleet, d, req.query.as_deref()).await.map(Reply::ok),
        ("/repository/config", "GET") => repository_config(fleet, d).await.map(Reply::ok),
        ("/repository/config", _) => {
            let config = DeployConfig::from_json(&req.body)?;
            let (store, key) = (fleet.deployer().store().clone(), d.clone());
            fleet.on_control(async move { store.put_repository(&key.user, &key.repo, &config) }).await?;
            fleet.retry_repository(&d.user, &d.repo);
            log::info!("{}: repository config replaced over the API", d.repository());
            repository_config(fleet, d).await.map(Reply::ok)
        }
        _ => Err(not_found()),
    }
}

/// Starting needs the policy's consent, also over the API.
fn allowed(fleet: &Fleet, d: &Deployment) -> Result<(), PipesError> {
    if fleet.allows(d.as_ref()) {
        Ok(())
    } else {
        Err(PipesError::Forbidden { deployment: d.to_string() })
    }
}

/// The answer after an operation that starts the deployment.
async fn started<T>(
    fleet: &Arc<Fleet>,
    d: &Deployment,
    start: Result<T, PipesError>,
    config_saved: bool,
) -> Result<Reply, PipesError> {
    match start {
        Ok(_) => state(fleet, d).await.map(Reply::ok),
        Err(e) => {
            let mut body = e.to_json();
            if let Some(obj) = body.as_object_mut() {
                obj.insert("config_saved".into(), json!(config_saved));
            }
            Ok(Reply { status: e.status(), body })
        }
    }
}

/// `GET container`: what runs for the deployment, from the table and the engine.
async fn state(fleet: &Arc<Fleet>, d: &Deployment) -> Result<Value, PipesError> {
    let slot = fleet.get(d.as_ref());
    let table_state = slot.as_deref().map(Slot::state);
    let engine = fleet.engine().clone();
    let name = engine.container_name(d);
    let image_ref = fleet.deployer().settings().image_ref(d);
    let image_query = image_ref.clone();
    let (container, image) = fleet
        .on_control(async move {
            let container = engine.inspect(&name).await?;
            let image = engine.image(&image_query).await?;
            Ok::<_, PipesError>((container, image))
        })
        .await?;
    let state = match (&table_state, &container) {
        (Some(SlotState::Starting), _) => "starting",
        (_, Some(c)) if c.running => "running",
        (_, Some(_)) => "stopped",
        (_, None) => "absent",
    };
    let config = match fleet.deployer().effective(d) {
        Ok(c) => c.to_json(container.as_ref().and_then(|c| c.port)),
        Err(e) => json!({ "error": e.to_json() }),
    };
    let mut body = json!({
        "deployment": d.to_string(),
        "image": image_ref,
        "image_id": image.as_ref().map(|i| i.id.clone()),
        "image_digest": image.as_ref().and_then(|i| i.digest.clone()),
        "state": state,
        "allowed": fleet.allows(d.as_ref()),
        "container": container.as_ref().map(|c| json!({
            "id": c.id,
            "short_id": short_id(&c.id),
            "running": c.running,
            "exit_code": c.exit_code,
            "started_at": c.started_at,
            "port": c.port,
        })),
        "upstream": match &table_state {
            Some(SlotState::Running(up)) => Some(up.addr.to_string()),
            _ => None,
        },
        "last_request_at": slot.as_deref().and_then(Slot::last_request_ms).map(rfc3339_ms),
        "config": config,
    });
    if let (Some(SlotState::Failed(e)), Some(obj)) = (&table_state, body.as_object_mut()) {
        obj.insert("last_error".into(), e.to_json());
    }
    Ok(body)
}

/// `GET container/config`: the tag's own layer, its repository's, and the merge.
async fn container_config(fleet: &Arc<Fleet>, d: &Deployment) -> Result<Value, PipesError> {
    let store = fleet.deployer().store();
    let own = store.tag(d)?;
    let repository = store.repository(&d.user, &d.repo)?;
    let effective = fleet.deployer().effective(d)?;
    Ok(json!({
        "deployment": d.to_string(),
        "config": own,
        "repository": repository,
        "effective": effective.to_json(None),
    }))
}

async fn repository_config(fleet: &Arc<Fleet>, d: &Deployment) -> Result<Value, PipesError> {
    let config = fleet.deployer().store().repository(&d.user, &d.repo)?;
    Ok(json!({ "repository": d.repository(), "config": config }))
}

/// `GET container/logs?tail=N`.
async fn logs(fleet: &Arc<Fleet>, d: &Deployment, query: Option<&str>) -> Result<Value, PipesError> {
    let tail = match query_param(query, "tail") {
        None => DEFAULT_TAIL,
        Some(t) => t.parse::<usize>().ok().filter(|n| (1..=MAX_TAIL).contains(n)).ok_or_else(|| PipesError::BadQuery {
            parameter: "tail",
            message: format!("expected a whole number from 1 to {MAX_TAIL}, got '{t}'"),
        })?,
    };
    let engine = fleet.engine().clone();
    let name = engine.container_name(d);
    let (id, lines) = fleet
        .on_control(async move {
            match engine.inspect(&name).await? {
                Some(c) => {
                    let lines = engine.log_tail(&c.id, tail).await;
                    Ok((Some(c.id), lines))
                }
                None => Ok((None, Vec::new())),
            }
        })
        .await?;
    Ok(json!({ "deployment": d.to_string(), "container": id, "tail": tail, "lines": lines }))
}

/// `GET /__proxyapi/deployments` on the bare domain: every deployment the token may see.
async fn deployments(fleet: &Arc<Fleet>, access: &Access) -> Result<Value, PipesError> {
    let engine = fleet.engine().clone();
    let containers = fleet.on_control(async move { engine.managed(true).await }).await?;
    let mut keys: Vec<Deployment> = containers.iter().map(|(d, _)| d.clone()).collect();
    keys.extend(fleet.slots().iter().map(|s| s.deployment.clone()));
    keys.sort();
    keys.dedup();
    let mut list = Vec::new();
    for d in keys.iter().filter(|d| access.covers(&d.user)) {
        let slot = fleet.get(d.as_ref());
        let has_container = containers.iter().find(|(c, _)| c == d).map(|(_, id)| id.clone());
        let state = match (slot.as_deref().map(Slot::state), &has_container) {
            (Some(SlotState::Running(_)), _) => "running",
            (Some(SlotState::Starting), _) => "starting",
            (_, Some(_)) => "stopped",
            (_, None) => "absent",
        };
        list.push(json!({
            "deployment": d.to_string(),
            "state": state,
            "container": has_container,
            "upstream": slot.as_deref().and_then(Slot::ready).map(|u| u.addr.to_string()),
            "last_request_at": slot.as_deref().and_then(Slot::last_request_ms).map(rfc3339_ms),
        }));
    }
    Ok(json!({ "deployments": list }))
}

fn query_param<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

fn rfc3339_ms(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_found_with_or_without_a_trailing_slash() {
        assert_eq!(find_route("/__proxyapi/container").unwrap().path, "/__proxyapi/container");
        assert_eq!(find_route("/__proxyapi/container/").unwrap().path, "/__proxyapi/container");
        assert!(find_route("/__proxyapi").is_none());
        assert!(find_route("/__proxyapi/").is_none());
        assert!(find_route("/__proxyapi/containers").is_none());
    }

    #[test]
    fn every_route_allows_what_it_serves() {
        for r in ROUTES {
            for m in r.methods {
                assert!(r.allow.contains(m), "{} {m}", r.path);
            }
        }
    }

    #[test]
    fn query_parameters() {
        assert_eq!(query_param(Some("a=1&tail=20"), "tail"), Some("20"));
        assert_eq!(query_param(Some("tail"), "tail"), Some(""));
        assert_eq!(query_param(None, "tail"), None);
    }
}

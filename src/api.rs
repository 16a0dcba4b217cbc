//! The management API at `/__proxyapi` on each deployment's host.
//!
//! Answered by Pipes itself and never forwarded. Closed unless the operator
//! sets `PIPES_API_TOKEN`; every call needs `Authorization: Bearer <token>`.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::error::PipesError;
use crate::fleet::{short_id, Fleet, Slot, SlotState};
use crate::route::{Deployment, API_PREFIX};

/// Endpoints below `/__proxyapi`, for 404 answers.
pub const ENDPOINTS: &[&str] = &["/__proxyapi/container"];

/// A JSON answer of the API.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    /// Methods the path accepts, sent as `Allow` with a 405.
    pub allow: Option<&'static str>,
}

impl Reply {
    fn ok(body: Value) -> Self {
        Reply { status: 200, body, allow: None }
    }

    fn method_not_allowed(path: &str, allow: &'static str) -> Self {
        Reply {
            status: 405,
            body: json!({
                "error": "method_not_allowed",
                "status": 405,
                "message": format!("{path} accepts {allow}"),
                "allow": allow,
            }),
            allow: Some(allow),
        }
    }
}

/// Answers one API request for deployment `d`.
pub async fn handle(fleet: &Arc<Fleet>, d: &Deployment, method: &str, path: &str) -> Result<Reply, PipesError> {
    let endpoint = path.strip_prefix(API_PREFIX).unwrap_or(path).trim_end_matches('/');
    match endpoint {
        "/container" => match method {
            "GET" | "HEAD" => container_state(fleet, d).await.map(Reply::ok),
            _ => Ok(Reply::method_not_allowed(path, "GET")),
        },
        _ => Err(PipesError::ApiNotFound { path: path.to_owned(), known: ENDPOINTS }),
    }
}

/// `GET container`: what runs for the deployment, from the table and the engine.
async fn container_state(fleet: &Arc<Fleet>, d: &Deployment) -> Result<Value, PipesError> {
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
    });
    if let (Some(SlotState::Failed(e)), Some(obj)) = (&table_state, body.as_object_mut()) {
        obj.insert("last_error".into(), e.to_json());
    }
    Ok(body)
}

fn rfc3339_ms(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

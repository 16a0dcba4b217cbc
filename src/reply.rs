//! How Pipes answers a request itself, rather than a container: errors (JSON
//! for API clients, a short HTML page for browsers) and the API's JSON,
//! written to the Pingora session with the headers each one needs.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use serde_json::{json, Value};

use crate::error::{PipesError, RETRY_AFTER_SECS};

/// A JSON answer of Pipes' own.
#[derive(Debug)]
pub struct Json {
    pub status: u16,
    pub body: Value,
}

impl Json {
    /// `200 OK` with `body`.
    pub fn ok(body: Value) -> Self {
        Json { status: 200, body }
    }
}

/// The JSON body of an error: `error`, `status`, `message` and the fields
/// that explain it.
pub fn error_body(e: &PipesError) -> Value {
    let mut body = json!({
        "error": e.kind(),
        "status": e.status(),
        "message": e.to_string(),
    });
    let extra = match e {
        PipesError::NotOurs { host, expected } => json!({ "host": host, "expected": expected }),
        PipesError::NoDeployment { host } => json!({ "host": host }),
        PipesError::BadName { label, reason } => json!({ "label": label, "reason": reason }),
        PipesError::ApiNotFound { path, known } => json!({ "path": path, "known": known }),
        PipesError::Forbidden { deployment } => json!({ "deployment": deployment, "setting": "PIPES_ALLOW" }),
        PipesError::Unauthorized | PipesError::BadBody { .. } => json!({}),
        PipesError::ApiClosed => json!({ "setting": "PIPES_API_TOKEN" }),
        PipesError::OutOfScope { user } => json!({ "user": user }),
        PipesError::BadJson { line, column, .. } => json!({ "line": line, "column": column }),
        PipesError::UnknownField { field, .. } | PipesError::InvalidField { field, .. } => json!({ "field": field }),
        PipesError::BadQuery { parameter, .. } => json!({ "parameter": parameter }),
        PipesError::BodyTooLarge { limit } => json!({ "limit_bytes": limit }),
        PipesError::MethodNotAllowed { path, allow } => json!({ "path": path, "allow": allow }),
        PipesError::ConfigBroken { file, problem } => json!({ "file": file, "problem": problem }),
        PipesError::TooManyContainers { max } => {
            json!({ "max": max, "setting": "PIPES_MAX_CONTAINERS", "retry_after": RETRY_AFTER_SECS })
        }
        PipesError::ImageNotFound { image } => json!({ "image": image }),
        PipesError::RegistryAuth { registry, user, .. } => json!({ "registry": registry, "user": user }),
        PipesError::Exited { deployment, code, logs } => {
            json!({ "deployment": deployment, "exit_code": code, "logs": logs })
        }
        PipesError::NotReady { deployment, timeout, probed } => json!({
            "deployment": deployment,
            "timeout_ms": u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            "probed": probed,
        }),
        PipesError::EngineUnavailable { .. } => json!({ "retry_after": RETRY_AFTER_SECS }),
        PipesError::Engine { action, .. } => json!({ "action": action }),
        PipesError::Unservable { deployment, .. } | PipesError::NoPreviousGeneration { deployment } => {
            json!({ "deployment": deployment })
        }
    };
    if let (Some(body), Value::Object(extra)) = (body.as_object_mut(), extra) {
        body.extend(extra);
    }
    body
}

/// A short HTML page for browsers.
pub fn error_page(e: &PipesError) -> String {
    let mut page = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{status} {kind}</title></head>\
         <body><h1>{status}</h1><p>{message}</p>",
        status = e.status(),
        kind = e.kind(),
        message = escape_html(&e.to_string()),
    );
    if let PipesError::Exited { logs, .. } = e {
        if !logs.is_empty() {
            page.push_str("<pre>");
            page.push_str(&escape_html(&logs.join("\n")));
            page.push_str("</pre>");
        }
    }
    page.push_str("</body></html>\n");
    page
}

/// Answers with `e`: HTML if the client accepts it, else JSON.
pub async fn error(session: &mut Session, e: &PipesError) -> Result<()> {
    let (content_type, body) = if wants_html(session.req_header()) {
        ("text/html; charset=utf-8", error_page(e))
    } else {
        ("application/json", error_body(e).to_string())
    };
    let mut head = ResponseHeader::build(e.status(), Some(5))?;
    if let Some(secs) = e.retry_after() {
        head.insert_header(http::header::RETRY_AFTER, secs.to_string())?;
    }
    if let PipesError::MethodNotAllowed { allow, .. } = e {
        head.insert_header(http::header::ALLOW, allow.as_str())?;
    }
    if matches!(e, PipesError::Unauthorized) {
        head.insert_header(http::header::WWW_AUTHENTICATE, "Bearer realm=\"pipes\"")?;
    }
    write(session, head, content_type, body.into()).await
}

/// Answers with a JSON reply.
pub async fn json(session: &mut Session, reply: Json) -> Result<()> {
    let head = ResponseHeader::build(reply.status, Some(4))?;
    let body = serde_json::to_vec_pretty(&reply.body).unwrap_or_default();
    write(session, head, "application/json", body.into()).await
}

async fn write(session: &mut Session, mut head: ResponseHeader, content_type: &str, body: Bytes) -> Result<()> {
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

/// Reads a request body of at most `limit` bytes.
pub async fn read_body(session: &mut Session, limit: usize) -> std::result::Result<Vec<u8>, PipesError> {
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

fn wants_html(req: &pingora::http::RequestHeader) -> bool {
    req.headers
        .get(http::header::ACCEPT)
        .and_then(|a| a.to_str().ok())
        .is_some_and(|a| a.contains("text/html"))
}

fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_carry_status_kind_and_facts() {
        let e = PipesError::Forbidden { deployment: "alice/app:v1".into() };
        let body = error_body(&e);
        assert_eq!(body["status"], 403);
        assert_eq!(body["error"], "not_allowed");
        assert_eq!(body["setting"], "PIPES_ALLOW");
        let e = PipesError::ApiNotFound { path: "/__proxyapi/x".into(), known: vec!["/__proxyapi/container"] };
        assert_eq!(error_body(&e)["known"][0], "/__proxyapi/container");
    }

    #[test]
    fn pages_are_escaped() {
        let e = PipesError::Exited { deployment: "a/b:c".into(), code: 1, logs: vec!["<script>".into()] };
        let html = error_page(&e);
        assert!(html.contains("&lt;script&gt;"));
        assert!(!html.contains("<script>"));
    }
}

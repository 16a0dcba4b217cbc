//! How Pipes answers a request itself, rather than a container: errors (JSON
//! for API clients, a short HTML page for browsers) and the API's JSON,
//! written to the Pingora session with the headers each one needs.

use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use serde_json::{json, Value};

use crate::access::{Refusal, Verdict};
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

/// Who an error is written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    /// Anyone who reaches a deployment's host: the kind of failure and a
    /// sentence, no addresses, engine messages or file paths.
    Public,
    /// A caller the API authenticated, or the log: everything.
    Operator,
}

/// What the public is told instead of an error's details, where those
/// would show how Pipes is set up (registry, engine, files, addresses).
fn public_message(e: &PipesError) -> Option<String> {
    Some(match e {
        PipesError::Exited { deployment, code, .. } => format!("the container of {deployment} exited with code {code} while starting"),
        PipesError::EngineUnavailable { .. } => format!("the Docker engine is unavailable; retry in {RETRY_AFTER_SECS} s"),
        PipesError::Engine { action, .. } => format!("the Docker engine failed to {action}"),
        PipesError::RegistryAuth { .. } => "the registry refused the credentials this Pipes uses".to_owned(),
        PipesError::RegistryUnreachable { image, .. } => format!("the registry of {} cannot be reached; the operator is told", without_registry(image)),
        PipesError::ImageNotFound { image } => format!("image {} was not found in the registry", without_registry(image)),
        PipesError::PullTimeout { image, .. } => format!("pulling {} took too long", without_registry(image)),
        PipesError::ConfigBroken { .. } => "a stored config of this deployment cannot be used; the operator is told".to_owned(),
        PipesError::NotReady { deployment, timeout, .. } => {
            format!("the container of {deployment} did not answer within {}", crate::error::DisplayDuration(*timeout))
        }
        PipesError::Unservable { deployment, .. } => format!("{deployment} cannot be served right now"),
        PipesError::ServiceExited { deployment, service, code, .. } => format!("service {service} of {deployment} exited with code {code} while starting"),
        PipesError::ServiceUnhealthy { deployment, service, timeout, .. } => {
            format!("service {service} of {deployment} was not healthy within {}", crate::error::DisplayDuration(*timeout))
        }
        PipesError::ForwardAuthUnavailable { deployment, .. } => format!("the auth server of {deployment} did not answer; retry in {RETRY_AFTER_SECS} s"),
        PipesError::InsufficientStorage { image, .. } => format!("{} cannot be pulled now: the host's disk is nearly full", without_registry(image)),
        _ => return None,
    })
}

/// `PIPES_PUBLIC_LOGS`, set once at start-up.
static PUBLIC_LOGS: AtomicBool = AtomicBool::new(false);

/// Whether anonymous clients are shown the last log lines of a container
/// that failed to start (`PIPES_PUBLIC_LOGS`); operators always are.
pub fn show_logs_to_public(show: bool) {
    PUBLIC_LOGS.store(show, Ordering::Relaxed);
}

fn public_logs() -> bool {
    PUBLIC_LOGS.load(Ordering::Relaxed)
}

/// `user/repo:tag` of an image reference, without the registry in front.
fn without_registry(image: &str) -> &str {
    let mut slashes = image.rmatch_indices('/');
    match (slashes.next(), slashes.next()) {
        (Some(_), Some((i, _))) => &image[i + 1..],
        _ => image,
    }
}

/// The JSON body of an error for `audience`.
pub fn error_body_for(e: &PipesError, audience: Audience) -> Value {
    match (audience, public_message(e)) {
        (Audience::Public, Some(message)) => {
            let mut body = json!({ "error": e.kind(), "status": e.status(), "message": message });
            let extra = match e {
                PipesError::ImageNotFound { image } | PipesError::PullTimeout { image, .. } | PipesError::RegistryUnreachable { image, .. } => {
                    json!({ "image": without_registry(image) })
                }
                PipesError::NotReady { deployment, timeout, .. } => json!({
                    "deployment": deployment,
                    "timeout_ms": u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                }),
                PipesError::Unservable { deployment, .. } => json!({ "deployment": deployment }),
                PipesError::EngineUnavailable { .. } => json!({ "retry_after": RETRY_AFTER_SECS }),
                PipesError::InsufficientStorage { image, .. } => json!({ "image": without_registry(image), "retry_after": RETRY_AFTER_SECS }),
                // What an app prints while crashing (DSNs, addresses) is the operator's.
                PipesError::Exited { deployment, code, logs } => match public_logs() {
                    true => json!({ "deployment": deployment, "exit_code": code, "logs": logs }),
                    false => json!({ "deployment": deployment, "exit_code": code }),
                },
                PipesError::ServiceExited { deployment, service, code, logs } => match public_logs() {
                    true => json!({ "deployment": deployment, "service": service, "exit_code": code, "logs": logs }),
                    false => json!({ "deployment": deployment, "service": service, "exit_code": code }),
                },
                PipesError::ServiceUnhealthy { deployment, service, timeout, .. } => json!({
                    "deployment": deployment,
                    "service": service,
                    "timeout_ms": u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                }),
                _ => json!({}),
            };
            if let (Some(body), Value::Object(extra)) = (body.as_object_mut(), extra) {
                body.extend(extra);
            }
            body
        }
        _ => error_body(e),
    }
}

/// The JSON body of an error, whole: `error`, `status`, `message` and the
/// fields that explain it.
pub fn error_body(e: &PipesError) -> Value {
    let mut body = json!({
        "error": e.kind(),
        "status": e.status(),
        "message": e.to_string(),
    });
    let extra = match e {
        PipesError::NotOurs { host, expected } => json!({ "host": host, "expected": expected }),
        PipesError::NoDeployment { host, .. } => json!({ "host": host }),
        PipesError::BadName { label, reason } => json!({ "label": label, "reason": reason }),
        PipesError::ApiNotFound { path, known, .. } => json!({ "path": path, "known": known }),
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
        PipesError::RegistryUnreachable { image, registry, .. } => json!({ "image": image, "registry": registry, "setting": "PIPES_REGISTRY" }),
        PipesError::Exited { deployment, code, logs } => {
            json!({ "deployment": deployment, "exit_code": code, "logs": logs })
        }
        PipesError::NotReady { deployment, timeout, probed } => json!({
            "deployment": deployment,
            "timeout_ms": u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            "probed": probed,
        }),
        PipesError::ServiceExited { deployment, service, code, logs } => {
            json!({ "deployment": deployment, "service": service, "exit_code": code, "logs": logs })
        }
        PipesError::ServiceUnhealthy { deployment, service, timeout, probed } => json!({
            "deployment": deployment,
            "service": service,
            "timeout_ms": u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            "probed": probed,
        }),
        PipesError::EngineUnavailable { .. } => json!({ "retry_after": RETRY_AFTER_SECS }),
        PipesError::Engine { action, .. } => json!({ "action": action }),
        PipesError::Unservable { deployment, .. } | PipesError::NoPreviousGeneration { deployment } => {
            json!({ "deployment": deployment })
        }
        PipesError::TooManyConnections { max } => {
            json!({ "max": max, "setting": "PIPES_MAX_CONNECTIONS", "retry_after": RETRY_AFTER_SECS })
        }
        PipesError::HeaderTimeout { timeout } => json!({
            "timeout_ms": u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            "setting": "PIPES_HEADER_TIMEOUT",
        }),
        PipesError::HeadersTooLarge { limit } => json!({ "limit_bytes": limit, "setting": "PIPES_MAX_HEADER_SIZE" }),
        PipesError::BodyTimeout { timeout } => json!({
            "timeout_ms": u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            "setting": "PIPES_HEADER_TIMEOUT",
        }),
        PipesError::PullTimeout { image, timeout } => json!({
            "image": image,
            "timeout_ms": u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            "setting": "PIPES_PULL_TIMEOUT",
        }),
        PipesError::TooManyStarts { max } => {
            json!({ "max": max, "setting": "PIPES_MAX_STARTS_PER_CLIENT", "retry_after": RETRY_AFTER_SECS })
        }
        PipesError::TooManyNotRunning { max } => {
            json!({ "max": max, "setting": "PIPES_MAX_NOT_RUNNING", "retry_after": RETRY_AFTER_SECS })
        }
        PipesError::CrossSite { origin } => json!({ "origin": origin }),
        PipesError::UnsupportedMediaType { given } => json!({ "content_type": given, "expected": "application/json" }),
        PipesError::TooManyStreams { max } => {
            json!({ "max": max, "setting": "PIPES_MAX_STREAMS_PER_CLIENT", "retry_after": RETRY_AFTER_SECS })
        }
        PipesError::PublicStreamsFull { max } => {
            json!({ "max": max, "setting": "PIPES_MAX_CONNECTIONS", "retry_after": RETRY_AFTER_SECS })
        }
        PipesError::BadRequest { .. } => json!({}),
        PipesError::AccessDenied { deployment } => json!({ "deployment": deployment }),
        PipesError::AuthenticationRequired { realm, .. } => json!({ "deployment": realm }),
        PipesError::ForwardAuthUnavailable { deployment, .. } => json!({ "deployment": deployment, "retry_after": RETRY_AFTER_SECS }),
        PipesError::InsufficientStorage { image, free, .. } => {
            json!({ "image": image, "free_bytes": free, "setting": "PIPES_DISK_MIN_FREE", "retry_after": RETRY_AFTER_SECS })
        }
    };
    if let (Some(body), Value::Object(extra)) = (body.as_object_mut(), extra) {
        body.extend(extra);
    }
    body
}

/// A short HTML page for browsers (who are the public).
pub fn error_page(e: &PipesError) -> String {
    page(e, public_logs())
}

/// The page for `e`, with a failed start's log lines if `show_logs`.
fn page(e: &PipesError, show_logs: bool) -> String {
    let message = public_message(e).unwrap_or_else(|| e.to_string());
    let mut page = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{status} {kind}</title></head>\
         <body><h1>{status}</h1><p>{message}</p>",
        status = e.status(),
        kind = e.kind(),
        message = escape_html(&message),
    );
    if let PipesError::Exited { logs, .. } | PipesError::ServiceExited { logs, .. } = e {
        if !logs.is_empty() && show_logs {
            page.push_str("<pre>");
            page.push_str(&escape_html(&logs.join("\n")));
            page.push_str("</pre>");
        }
    }
    page.push_str("</body></html>\n");
    page
}

/// A whole HTTP/1.1 response for `e` that closes the connection, for when
/// there is no Pingora session to write it (the connection gate).
pub fn raw(e: &PipesError) -> Vec<u8> {
    let body = error_body(e).to_string();
    let reason = http::StatusCode::from_u16(e.status()).ok().and_then(|s| s.canonical_reason()).unwrap_or("Error");
    let retry = e.retry_after().map(|s| format!("retry-after: {s}\r\n")).unwrap_or_default();
    format!(
        "HTTP/1.1 {} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{retry}\
         cache-control: no-store\r\nconnection: close\r\n\r\n{body}",
        e.status(),
        body.len()
    )
    .into_bytes()
}

/// Answers with `e` for `audience`: HTML if the client accepts it, else
/// JSON. The connection is closed after it if `close`, or if the request's
/// body was not read: either way the answer says `Connection: close`.
pub async fn error(session: &mut Session, e: &PipesError, audience: Audience, close: bool) -> Result<()> {
    let (content_type, body) = if wants_html(session.req_header()) {
        ("text/html; charset=utf-8", error_page(e))
    } else {
        ("application/json", error_body_for(e, audience).to_string())
    };
    if close || !session.is_body_done() {
        session.set_keepalive(None);
    }
    write(session, error_head(e)?, content_type, body.into()).await
}

/// The head of an answer to `e`: its status and the headers it calls for.
fn error_head(e: &PipesError) -> Result<ResponseHeader> {
    let mut head = ResponseHeader::build(e.status(), Some(6))?;
    if let Some(secs) = e.retry_after() {
        head.insert_header(http::header::RETRY_AFTER, secs.to_string())?;
    }
    if let PipesError::MethodNotAllowed { allow, .. } = e {
        head.insert_header(http::header::ALLOW, allow.as_str())?;
    }
    if matches!(e, PipesError::Unauthorized) {
        head.insert_header(http::header::WWW_AUTHENTICATE, "Bearer realm=\"pipes\"")?;
    }
    if let PipesError::AuthenticationRequired { realm, basic: true, .. } = e {
        head.insert_header(http::header::WWW_AUTHENTICATE, format!("Basic realm=\"{realm}\", charset=\"UTF-8\""))?;
    }
    Ok(head)
}

/// Answers with a JSON reply, readable by the dashboard at `cors` if given.
pub async fn json(session: &mut Session, reply: Json, cors: Option<&str>) -> Result<()> {
    let mut head = ResponseHeader::build(reply.status, Some(5))?;
    allow_origin(&mut head, cors)?;
    let body = serde_json::to_vec_pretty(&reply.body).unwrap_or_default();
    write(session, head, "application/json", body.into()).await
}

/// An API failure as JSON (never a page), readable by the dashboard at `cors` if given.
pub async fn api_error(session: &mut Session, e: &PipesError, audience: Audience, cors: Option<&str>) -> Result<()> {
    if !session.is_body_done() {
        session.set_keepalive(None);
    }
    let mut head = error_head(e)?;
    allow_origin(&mut head, cors)?;
    write(session, head, "application/json", error_body_for(e, audience).to_string().into()).await
}

/// The answer to a CORS preflight from the dashboard at `origin`: the
/// methods and headers the API takes. No cookie is ever involved.
pub async fn preflight(session: &mut Session, origin: &str) -> Result<()> {
    let mut head = ResponseHeader::build(204, Some(5))?;
    allow_origin(&mut head, Some(origin))?;
    head.insert_header(http::header::ACCESS_CONTROL_ALLOW_METHODS, "GET, HEAD, PUT, POST, DELETE")?;
    head.insert_header(http::header::ACCESS_CONTROL_ALLOW_HEADERS, "authorization, content-type")?;
    head.insert_header(http::header::ACCESS_CONTROL_MAX_AGE, "600")?;
    session.write_response_header(Box::new(head), true).await
}

fn allow_origin(head: &mut ResponseHeader, cors: Option<&str>) -> Result<()> {
    if let Some(origin) = cors {
        head.insert_header(http::header::ACCESS_CONTROL_ALLOW_ORIGIN, origin)?;
        head.insert_header(http::header::VARY, "origin")?;
    }
    Ok(())
}

/// Answers with plain text.
pub async fn text(session: &mut Session, status: u16, body: String) -> Result<()> {
    let head = ResponseHeader::build(status, Some(4))?;
    write(session, head, "text/plain; charset=utf-8", body.into()).await
}

/// Sends the client to `location` with 308, which keeps method and body.
pub async fn redirect(session: &mut Session, location: &str) -> Result<()> {
    let mut head = ResponseHeader::build(308, Some(5))?;
    head.insert_header(http::header::LOCATION, location)?;
    // The body was not read: the connection cannot carry another request.
    if !session.is_body_done() {
        session.set_keepalive(None);
    }
    write(session, head, "text/plain; charset=utf-8", Bytes::from(format!("{location}\n"))).await
}

/// Answers a request its deployment's access rules did not let through, or
/// a share link opened (the cookie set, the client sent on).
pub async fn access(session: &mut Session, verdict: Verdict, noindex: bool) -> Result<()> {
    match verdict {
        Verdict::Pass(_) => Ok(()),
        Verdict::ShareOpened { location, cookie } => {
            let mut head = ResponseHeader::build(303, Some(6))?;
            head.insert_header(http::header::LOCATION, location.as_str())?;
            head.insert_header(http::header::SET_COOKIE, cookie)?;
            robots(&mut head, noindex)?;
            if !session.is_body_done() {
                session.set_keepalive(None);
            }
            write(session, head, "text/plain; charset=utf-8", Bytes::from(format!("{location}\n"))).await
        }
        Verdict::Refused { answer: Refusal::Error(e), .. } => error(session, &e, Audience::Public, false).await,
        Verdict::Refused { answer: Refusal::Relay(relayed), .. } => {
            // The auth server's answer as it came; only its framing is Pipes'.
            let mut head = ResponseHeader::build(relayed.status, Some(relayed.headers.len() + 4))?;
            let mut content_type = "text/plain; charset=utf-8".to_owned();
            for (name, value) in relayed.headers {
                if name == http::header::CONTENT_TYPE {
                    content_type = value.to_str().unwrap_or(&content_type).to_owned();
                } else {
                    head.append_header(name, value)?;
                }
            }
            robots(&mut head, noindex)?;
            if !session.is_body_done() {
                session.set_keepalive(None);
            }
            write(session, head, &content_type, relayed.body).await
        }
    }
}

/// Adds `X-Robots-Tag: noindex, nofollow` to `head` if `noindex`.
#[inline]
pub fn robots(head: &mut ResponseHeader, noindex: bool) -> Result<()> {
    if noindex {
        head.insert_header("x-robots-tag", "noindex, nofollow")?;
    }
    Ok(())
}

/// Writes a whole answer of Pipes' own: never cached unless `head` says
/// otherwise, never sniffed, and without its body for a HEAD request.
pub(crate) async fn write(session: &mut Session, mut head: ResponseHeader, content_type: &str, body: Bytes) -> Result<()> {
    head.insert_header(http::header::CONTENT_TYPE, content_type)?;
    head.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    if !head.headers.contains_key(http::header::CACHE_CONTROL) {
        head.insert_header(http::header::CACHE_CONTROL, "no-store")?;
    }
    head.insert_header(http::header::X_CONTENT_TYPE_OPTIONS, "nosniff")?;
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
    let declared = session.req_header().headers.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
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

/// Whether the client asks for HTML.
pub(crate) fn wants_html(req: &pingora::http::RequestHeader) -> bool {
    req.headers.get(http::header::ACCEPT).and_then(|a| a.to_str().ok()).is_some_and(|a| a.contains("text/html"))
}

/// `text` safe inside HTML text and attribute values.
pub fn escape_html(text: &str) -> String {
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
        let e = PipesError::ApiNotFound { path: "/__proxyapi/x".into(), known: vec!["/__proxyapi/container"], elsewhere: None };
        assert_eq!(error_body(&e)["known"][0], "/__proxyapi/container");
    }

    #[test]
    fn raw_answers_are_whole_responses_that_close() {
        let raw = String::from_utf8(raw(&PipesError::TooManyConnections { max: 3 })).unwrap();
        assert!(raw.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{raw}");
        assert!(raw.contains("connection: close\r\n") && raw.contains("retry-after: 5\r\n"), "{raw}");
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
        assert_eq!(serde_json::from_str::<Value>(body).unwrap()["setting"], "PIPES_MAX_CONNECTIONS");
    }

    #[test]
    fn the_public_is_not_told_how_pipes_is_set_up() {
        let cases = [
            PipesError::EngineUnavailable { reason: "cannot use unix:///var/run/docker.sock: no such file".into() },
            PipesError::Engine { action: "start a container", detail: "driver failed on /var/lib/docker".into() },
            PipesError::RegistryAuth { registry: "10.1.2.3:5000".into(), user: Some("ci".into()), detail: "denied".into() },
            PipesError::ImageNotFound { image: "10.1.2.3:5000/alice/app:v1".into() },
            PipesError::RegistryUnreachable {
                image: "10.1.2.3:5000/alice/app:v1".into(),
                registry: "10.1.2.3:5000".into(),
                detail: "dial tcp 10.1.2.3:5000: connection refused".into(),
            },
            PipesError::ConfigBroken { file: "repos/alice/app/repository.json".into(), problem: "EOF".into() },
            PipesError::NotReady { deployment: "alice/app:v1".into(), timeout: std::time::Duration::from_secs(5), probed: "GET http://172.17.0.5:80/".into() },
        ];
        for e in cases {
            let public = error_body_for(&e, Audience::Public).to_string() + &error_page(&e);
            for secret in ["docker.sock", "/var/lib", "10.1.2.3", "\"ci\"", "repository.json", "172.17.0.5"] {
                assert!(!public.contains(secret), "{secret} shown to the public: {public}");
            }
            assert_eq!(error_body_for(&e, Audience::Public)["error"], e.kind());
            assert_eq!(error_body_for(&e, Audience::Operator), error_body(&e), "the operator sees everything");
        }
        let e = PipesError::ImageNotFound { image: "10.1.2.3:5000/alice/app:v1".into() };
        assert_eq!(error_body_for(&e, Audience::Public)["image"], "alice/app:v1");
    }

    #[test]
    fn pages_are_escaped() {
        let e = PipesError::Exited { deployment: "a/b:c".into(), code: 1, logs: vec!["<script>".into()] };
        let html = page(&e, true);
        assert!(html.contains("&lt;script&gt;"));
        assert!(!html.contains("<script>"));
    }

    #[test]
    fn a_crash_shows_the_public_its_code_and_kind_not_its_lines() {
        let e = PipesError::Exited { deployment: "a/b:c".into(), code: 3, logs: vec!["DATABASE_URL=postgres://u:hunter2@10.0.0.5/db".into()] };
        let public = error_body_for(&e, Audience::Public);
        assert_eq!((public["error"].as_str(), public["exit_code"].as_i64()), (Some("container_exited"), Some(3)), "{public}");
        let shown = public.to_string() + &error_page(&e);
        assert!(!shown.contains("hunter2") && !shown.contains("10.0.0.5"), "{shown}");
        assert!(error_body_for(&e, Audience::Operator).to_string().contains("hunter2"), "the operator sees them");
        assert!(page(&e, true).contains("hunter2"), "and so does everyone with PIPES_PUBLIC_LOGS");
    }
}

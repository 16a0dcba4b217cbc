//! Pipes' own pages: the waiting page and the dashboard, with their script
//! and style embedded in the binary and served below `/__proxyapi/ui/` on
//! every host. Plain HTML, CSS and JavaScript modules; no third-party
//! resource, no inline script, no cookie.

use bytes::Bytes;
use http::header;
use pingora::http::ResponseHeader;
use pingora::prelude::*;

use crate::reply;

/// Where the embedded files are served.
pub const UI_PREFIX: &str = "/__proxyapi/ui/";

/// The only sources a page of Pipes may use: its own files, and for the
/// dashboard the API on deployments' hosts (`connect`).
fn content_security_policy(connect: &str) -> String {
    format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self' {connect}; img-src 'self'; \
         base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )
}

/// The embedded files: name, type, content.
const FILES: [(&str, &str, &str); 3] = [
    ("wait.js", "text/javascript; charset=utf-8", include_str!("ui/wait.js")),
    ("dashboard.js", "text/javascript; charset=utf-8", include_str!("ui/dashboard.js")),
    ("pipes.css", "text/css; charset=utf-8", include_str!("ui/pipes.css")),
];

/// Answers with one of Pipes' pages: `status`, never cached, its sources
/// limited to its own and `connect`.
pub async fn page(session: &mut Session, status: u16, html: String, connect: &str, retry_after: Option<u64>) -> Result<bool> {
    let mut head = ResponseHeader::build(status, Some(6))?;
    if let Some(secs) = retry_after {
        head.insert_header(header::RETRY_AFTER, secs.to_string())?;
    }
    head.insert_header(header::CONTENT_SECURITY_POLICY, content_security_policy(connect))?;
    reply::write(session, head, "text/html; charset=utf-8", Bytes::from(html)).await?;
    Ok(true)
}

/// `GET /` on the bare domain: the dashboard. It talks to the API of the
/// deployments' hosts under `domain` (`host[:port]` as the browser asked),
/// named by `pattern` (`{tag}.{repo}.{user}` or the flat one).
pub async fn dashboard(session: &mut Session, domain: &str, pattern: &str) -> Result<bool> {
    let connect = format!("http://*.{domain} https://*.{domain}");
    let html = include_str!("ui/dashboard.html").replace("HOST_PATTERN", pattern);
    page(session, 200, html, &connect, None).await
}

/// Serves the embedded file `name` (`wait.js`, `pipes.css`), or 404.
pub async fn file(session: &mut Session, name: &str) -> Result<bool> {
    let Some((_, content_type, content)) = FILES.iter().find(|(n, _, _)| *n == name) else {
        reply::text(session, 404, "no such file\n".to_owned()).await?;
        return Ok(true);
    };
    let mut head = ResponseHeader::build(200, Some(4))?;
    // Files change with the binary; a short cache keeps an upgrade visible.
    head.insert_header(header::CACHE_CONTROL, "public, max-age=300")?;
    reply::write(session, head, content_type, Bytes::from_static(content.as_bytes())).await?;
    Ok(true)
}

//! What a person sees while a deployment starts: a browser navigation that
//! waits longer than `PIPES_WAITING_PAGE_AFTER` gets a small page at once
//! (503, `Retry-After`), which follows the deployment's events and moves on
//! to the app by itself.

use std::time::Duration;

use http::header;
use pingora::http::RequestHeader;
use pingora::prelude::*;

use crate::fleet::Slot;
use crate::reply::{self, escape_html};
use crate::ui::{self, UI_PREFIX};

/// Seconds a browser is told to wait before asking again, should the script not run.
const RETRY_AFTER_SECS: u64 = 2;

/// Whether `req` is a browser navigating to a page: a GET that asks for HTML
/// (or says it navigates). `fetch`, API clients, HEAD and other methods wait
/// for the start instead.
pub fn wanted(req: &RequestHeader) -> bool {
    if req.method != http::Method::GET || req.headers.contains_key(header::UPGRADE) {
        return false;
    }
    match req.headers.get("sec-fetch-mode") {
        Some(mode) => mode.as_bytes() == b"navigate",
        None => reply::wants_html(req),
    }
}

/// Answers with the waiting page of `slot`'s deployment, `waited` into its start.
pub async fn page(session: &mut Session, slot: &Slot, waited: Duration) -> Result<bool> {
    let name = escape_html(&slot.deployment.to_string());
    let expected = match slot.last_start() {
        Some(took) => format!("last start took {:.1} s", took.as_secs_f64()),
        None => String::new(),
    };
    let html = format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Starting {name}</title>
<link rel="stylesheet" href="{UI_PREFIX}pipes.css">
<script type="module" src="{UI_PREFIX}wait.js"></script>
</head>
<body>
<main data-deployment="{name}" data-state="starting" data-elapsed-ms="{elapsed}">
<h1><span class="spinner"></span>Starting {name}</h1>
<p><span data-phase>getting it ready</span> · <span data-elapsed>{elapsed_s:.1} s</span> <span class="muted" data-expected>{expected}</span></p>
<progress hidden></progress>
<div data-failure hidden><p data-message></p><pre hidden></pre></div>
<p class="muted">This page moves on to the app by itself as soon as it answers.</p>
</main>
</body>
</html>
"#,
        elapsed = waited.as_millis(),
        elapsed_s = waited.as_secs_f64(),
    );
    ui::page(session, 503, html, "", Some(RETRY_AFTER_SECS)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build(method, b"/", None).unwrap();
        for (k, v) in headers {
            req.insert_header(k.to_string(), *v).unwrap();
        }
        req
    }

    #[test]
    fn only_browser_navigations_get_the_page() {
        assert!(wanted(&request("GET", &[("sec-fetch-mode", "navigate")])));
        assert!(wanted(&request("GET", &[("accept", "text/html,application/xhtml+xml,*/*;q=0.8")])));
        assert!(!wanted(&request("GET", &[("accept", "text/html"), ("sec-fetch-mode", "cors")])), "fetch waits");
        assert!(!wanted(&request("GET", &[("accept", "application/json")])));
        assert!(!wanted(&request("GET", &[])), "curl waits");
        assert!(!wanted(&request("HEAD", &[("sec-fetch-mode", "navigate")])));
        assert!(!wanted(&request("POST", &[("accept", "text/html")])));
        assert!(!wanted(&request("GET", &[("accept", "text/html"), ("upgrade", "websocket")])));
    }
}

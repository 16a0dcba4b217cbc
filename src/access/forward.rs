//! `access.forward_auth`: ask an auth server about each request, as Traefik's
//! ForwardAuth and nginx's `auth_request` do, so that oauth2-proxy and
//! Authelia work unchanged.
//!
//! The auth server gets `GET url` with the client's `Cookie`,
//! `Authorization` and `Accept`, and `X-Forwarded-Method`, `-Proto`,
//! `-Host`, `-Uri` and `-For`. A 2xx lets the request through, with the
//! configured headers of the answer set on it; any other answer goes to the
//! client as it came (a login redirect works in a browser). No answer within
//! `PIPES_FORWARD_AUTH_TIMEOUT` is a 503: never "let through".

use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request};
use http_body_util::{BodyExt, Empty, Limited};
use pingora::http::RequestHeader;

use crate::config::ForwardAuthConfig;

/// Most of an auth server's answer body relayed to a client.
const MAX_BODY: usize = 64 << 10;

/// One deployment's auth server.
#[derive(Debug)]
pub struct ForwardAuth {
    url: http::Uri,
    copy: Vec<HeaderName>,
}

impl ForwardAuth {
    /// From a checked config (`None` if its URL does not parse after all).
    pub fn new(config: &ForwardAuthConfig) -> Option<Self> {
        let copy = config.copy_headers.iter().filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok()).collect();
        Some(ForwardAuth { url: config.url.parse().ok()?, copy })
    }
}

/// What the auth server said.
pub enum Outcome {
    /// 2xx: each configured header with the auth server's value (`None`:
    /// it sent none, so the client's goes too), and cookies it set.
    Allowed { copy: Vec<(HeaderName, Option<HeaderValue>)>, set_cookies: Vec<HeaderValue> },
    /// Any other answer, to be relayed to the client.
    Refused(Relayed),
    /// No answer in time, or none at all: why.
    Unavailable(String),
}

/// An auth server's answer as the client gets it.
pub struct Relayed {
    pub status: u16,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
}

/// The HTTP client every deployment's auth server is asked through; it
/// keeps connections to them open between requests.
pub struct Client {
    http: crate::outbound::Client<Empty<Bytes>>,
    timeout: Duration,
}

impl Client {
    /// A client giving auth servers `timeout` for a whole answer.
    pub fn new(timeout: Duration) -> Self {
        Client { http: crate::outbound::client(), timeout }
    }

    /// Asks `auth` about the request `req` of `client` (over TLS if `tls`).
    pub async fn ask(&self, auth: &ForwardAuth, req: &RequestHeader, client: Option<IpAddr>, tls: bool) -> Outcome {
        let mut ask = Request::get(auth.url.clone());
        for name in [http::header::COOKIE, http::header::AUTHORIZATION, http::header::ACCEPT] {
            for value in req.headers.get_all(&name) {
                ask = ask.header(&name, value);
            }
        }
        let host = req.uri.authority().map(|a| a.as_str()).or_else(|| req.headers.get(http::header::HOST).and_then(|h| h.to_str().ok())).unwrap_or("");
        ask = ask
            .header("x-forwarded-method", req.method.as_str())
            .header("x-forwarded-proto", if tls { "https" } else { "http" })
            .header("x-forwarded-host", host)
            .header("x-forwarded-uri", req.uri.path_and_query().map_or("/", |p| p.as_str()));
        if let Some(ip) = client {
            ask = ask.header("x-forwarded-for", ip.to_string());
        }
        let ask = match ask.body(Empty::new()) {
            Ok(ask) => ask,
            Err(e) => return Outcome::Unavailable(format!("the request to it cannot be made: {e}")),
        };
        let exchange = async {
            let answer = self.http.request(ask).await.map_err(|e| format!("{e}"))?;
            let (head, body) = answer.into_parts();
            let body = Limited::new(body, MAX_BODY).collect().await.map_err(|e| format!("its answer's body: {e}"))?.to_bytes();
            Ok::<_, String>((head, body))
        };
        let (head, body) = match tokio::time::timeout(self.timeout, exchange).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => return Outcome::Unavailable(e),
            Err(_) => return Outcome::Unavailable(format!("no answer within {}", crate::error::DisplayDuration(self.timeout))),
        };
        if head.status.is_success() {
            let copy = auth.copy.iter().map(|name| (name.clone(), head.headers.get(name).cloned())).collect();
            let set_cookies = head.headers.get_all(http::header::SET_COOKIE).iter().cloned().collect();
            return Outcome::Allowed { copy, set_cookies };
        }
        let headers = head.headers.iter().filter(|(name, _)| relayed(name)).map(|(n, v)| (n.clone(), v.clone())).collect();
        Outcome::Refused(Relayed { status: head.status.as_u16(), headers, body })
    }
}

/// Whether a header of the auth server's answer reaches the client: all
/// but those of that one connection and its framing (written anew).
fn relayed(name: &HeaderName) -> bool {
    !matches!(
        name.as_str(),
        "connection" | "keep-alive" | "transfer-encoding" | "content-length" | "te" | "trailer" | "upgrade" | "proxy-authenticate" | "proxy-connection"
    )
}

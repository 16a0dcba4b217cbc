//! Share links: `?pipes_share=<token>` opens one deployment until the
//! token's expiry, for whoever holds the link, without credentials.
//!
//! A token is `{issued_ms}.{expires_ms}.{mac}`, the MAC being HMAC-SHA256
//! over the deployment's name and both times with a key Pipes keeps in its
//! store (`share.json`, beside the configs; on Swarm in the engine, so every
//! replica accepts every token). Revoking a deployment's links records when:
//! tokens issued before then no longer open it.

use std::collections::BTreeMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use pingora::http::RequestHeader;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// The query parameter of a share link, and the cookie it becomes.
pub const NAME: &str = "pipes_share";

/// The store's document of share keys and revocations.
pub const DOCUMENT: &str = "share.json";

/// The longest a share link may be valid; revocations older than this
/// no longer matter and are dropped.
pub const MAX_TTL: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// The key and the revocations, as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shares {
    /// The HMAC key, hex.
    pub key: String,
    /// Deployment → Unix ms before which its tokens no longer count.
    #[serde(default)]
    pub revoked: BTreeMap<String, u64>,
}

impl Shares {
    /// Shares with a fresh random key and nothing revoked.
    pub fn generate() -> Result<Shares, String> {
        let mut key = [0u8; 32];
        openssl::rand::rand_bytes(&mut key).map_err(|e| format!("no random bytes for the share key: {e}"))?;
        Ok(Shares { key: hex::encode(key), revoked: BTreeMap::new() })
    }

    fn mac(&self, deployment: &str, issued_ms: u64, expires_ms: u64) -> Hmac<Sha256> {
        let key = hex::decode(&self.key).unwrap_or_default();
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key).expect("HMAC takes a key of any length");
        mac.update(deployment.as_bytes());
        mac.update(format!("\n{issued_ms}\n{expires_ms}").as_bytes());
        mac
    }

    /// A token opening `deployment` from `issued_ms` until `expires_ms`.
    pub fn sign(&self, deployment: &str, issued_ms: u64, expires_ms: u64) -> String {
        let tag = self.mac(deployment, issued_ms, expires_ms).finalize().into_bytes();
        format!("{issued_ms}.{expires_ms}.{}", URL_SAFE_NO_PAD.encode(tag))
    }

    /// Whether `token` opens `deployment` at `now_ms`: signed with this key,
    /// not expired, not issued before a revocation.
    pub fn opens(&self, deployment: &str, token: &str, now_ms: u64) -> bool {
        let mut parts = token.splitn(3, '.');
        let (Some(issued), Some(expires), Some(tag)) = (parts.next(), parts.next(), parts.next()) else { return false };
        let (Ok(issued), Ok(expires), Ok(tag)) = (issued.parse::<u64>(), expires.parse::<u64>(), URL_SAFE_NO_PAD.decode(tag)) else {
            return false;
        };
        // Constant-time: a forger learns nothing from how long a wrong MAC takes.
        let signed = self.mac(deployment, issued, expires).verify_slice(&tag).is_ok();
        let revoked = self.revoked.get(deployment).is_some_and(|before| issued < *before);
        signed && now_ms < expires && !revoked
    }
}

/// The share token in the request's `Cookie` headers, if any.
pub fn cookie(req: &RequestHeader) -> Option<&str> {
    cookies(req).find_map(|(name, value)| (name == NAME).then_some(value))
}

/// Every `name=value` pair of the request's `Cookie` headers.
fn cookies(req: &RequestHeader) -> impl Iterator<Item = (&str, &str)> {
    req.headers.get_all(http::header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).filter_map(|pair| pair.trim().split_once('='))
}

/// Removes the share cookie from what is sent upstream: the app never sees it.
pub fn strip_cookie(req: &mut RequestHeader) {
    if cookie(req).is_none() {
        return;
    }
    let rest: Vec<String> = cookies(req).filter(|(name, _)| *name != NAME).map(|(n, v)| format!("{n}={v}")).collect();
    req.remove_header(&http::header::COOKIE);
    if !rest.is_empty() {
        // Every pair came from a valid header value; joined they are one.
        if let Ok(value) = http::HeaderValue::try_from(rest.join("; ")) {
            let _ = req.insert_header(http::header::COOKIE, value);
        }
    }
}

/// The share token of a link's query, and the same path and query without it.
pub fn in_query(req: &RequestHeader) -> Option<(String, String)> {
    let query = req.uri.query()?;
    let mut token = None;
    let mut kept = form_urlencoded::Serializer::new(String::new());
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        if name == NAME {
            token.get_or_insert_with(|| value.into_owned());
        } else {
            kept.append_pair(&name, &value);
        }
    }
    let kept = kept.finish();
    let path = req.uri.path();
    let location = if kept.is_empty() { path.to_owned() } else { format!("{path}?{kept}") };
    token.map(|t| (t, location))
}

/// The `Set-Cookie` value that keeps `token` for this host until it expires.
pub fn set_cookie(token: &str, now_ms: u64, tls: bool) -> String {
    let expires_ms = token.split('.').nth(1).and_then(|e| e.parse::<u64>().ok()).unwrap_or(now_ms);
    let max_age = expires_ms.saturating_sub(now_ms) / 1000;
    let secure = if tls { "; Secure" } else { "" };
    format!("{NAME}={token}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Lax{secure}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_open_their_deployment_until_expiry_or_revocation() {
        let mut shares = Shares::generate().unwrap();
        let token = shares.sign("alice/app:v1", 1_000, 5_000);
        assert!(shares.opens("alice/app:v1", &token, 4_999));
        assert!(!shares.opens("alice/app:v1", &token, 5_000), "expired");
        assert!(!shares.opens("alice/app:v2", &token, 2_000), "another deployment");
        let forged = token.replace("5000", "9000");
        assert!(!shares.opens("alice/app:v1", &forged, 6_000), "a changed expiry breaks the MAC");
        assert!(!Shares::generate().unwrap().opens("alice/app:v1", &token, 2_000), "another key");
        shares.revoked.insert("alice/app:v1".into(), 1_500);
        assert!(!shares.opens("alice/app:v1", &token, 2_000), "revoked");
        assert!(shares.opens("alice/app:v1", &shares.sign("alice/app:v1", 1_600, 5_000), 2_000), "issued after");
        for junk in ["", "1.2", "a.b.c", "1.2.!!!"] {
            assert!(!shares.opens("alice/app:v1", junk, 0), "{junk}");
        }
    }

    #[test]
    fn links_and_cookies() {
        let mut req = RequestHeader::build("GET", b"/page?a=1&pipes_share=1.2.x&b=two%20words", None).unwrap();
        assert_eq!(in_query(&req), Some(("1.2.x".to_owned(), "/page?a=1&b=two+words".to_owned())));
        req.insert_header("cookie", "session=s1; pipes_share=tok; theme=dark").unwrap();
        assert_eq!(cookie(&req), Some("tok"));
        strip_cookie(&mut req);
        assert_eq!(req.headers.get("cookie").unwrap(), "session=s1; theme=dark");
        let mut only = RequestHeader::build("GET", b"/", None).unwrap();
        only.insert_header("cookie", "pipes_share=tok").unwrap();
        strip_cookie(&mut only);
        assert!(only.headers.get("cookie").is_none());
        assert_eq!(in_query(&only), None);
        assert_eq!(set_cookie("1.61000.x", 1_000, true), "pipes_share=1.61000.x; Path=/; Max-Age=60; HttpOnly; SameSite=Lax; Secure");
    }
}

//! Who may open a deployment, as users write it: `access` and `noindex`.
//!
//! A layer's `access` replaces a lower layer's whole (rules from two layers
//! never mix into a set nobody wrote); `PIPES_ACCESS` is the operator's
//! default for deployments whose layers name none.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::{field_error, FieldError};

/// The checks a request must pass, each only where present, in this order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessConfig {
    /// Client addresses or networks (`10.0.0.0/8`, `127.0.0.1`) let in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_ips: Vec<String>,
    /// User → bcrypt hash, as `htpasswd -B` writes it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub basic: BTreeMap<String, String>,
    /// An auth server asked about every request (Traefik's ForwardAuth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward_auth: Option<ForwardAuthConfig>,
}

/// `access.forward_auth`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardAuthConfig {
    /// `http://` or `https://` URL asked with `GET`.
    pub url: String,
    /// Headers of the auth server's 2xx answer set on the upstream request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub copy_headers: Vec<String>,
}

impl AccessConfig {
    /// Whether nothing is checked: every client is let in.
    pub fn is_open(&self) -> bool {
        self.allow_ips.is_empty() && self.basic.is_empty() && self.forward_auth.is_none()
    }

    /// `allow_ips` as networks (an address is a network of one).
    pub fn networks(&self) -> Vec<IpNet> {
        self.allow_ips.iter().filter_map(|s| parse_network(s)).collect()
    }

    /// Checks every value; errors name the field under `access.`.
    pub fn validate(&self) -> Result<(), FieldError> {
        for (i, net) in self.allow_ips.iter().enumerate() {
            if parse_network(net).is_none() {
                return Err(field_error(&format!("access.allow_ips[{i}]"), format!("expected an address or a network such as 10.0.0.0/8, got '{net}'")));
            }
        }
        for (user, hash) in &self.basic {
            if user.is_empty() || user.contains(':') || user.chars().any(char::is_control) {
                return Err(field_error(&format!("access.basic.{user}"), "a user name is non-empty, without ':' or control characters"));
            }
            if !is_bcrypt(hash) {
                return Err(field_error(&format!("access.basic.{user}"), "expected a bcrypt hash ($2y$…, as `htpasswd -nB user` writes), never a password"));
            }
        }
        if let Some(forward) = &self.forward_auth {
            let rest = forward.url.strip_prefix("http://").or_else(|| forward.url.strip_prefix("https://"));
            let valid = rest.is_some_and(|r| !r.is_empty() && !r.starts_with('/')) && forward.url.parse::<http::Uri>().is_ok();
            if !valid {
                return Err(field_error("access.forward_auth.url", format!("expected an http:// or https:// URL, got '{}'", forward.url)));
            }
            for name in &forward.copy_headers {
                if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                    return Err(field_error("access.forward_auth.copy_headers", format!("'{name}' is not a header name")));
                }
            }
        }
        Ok(())
    }
}

/// `10.0.0.0/8` or `10.1.2.3` (a network of one).
fn parse_network(text: &str) -> Option<IpNet> {
    let text = text.trim();
    text.parse::<IpNet>().ok().or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
}

/// Whether `hash` reads as a bcrypt hash: `$2a$`, `$2b$`, `$2x$` or `$2y$`,
/// a cost from 4 to 31, and 53 characters of salt and hash.
fn is_bcrypt(hash: &str) -> bool {
    let Some(rest) = ["$2a$", "$2b$", "$2x$", "$2y$"].iter().find_map(|p| hash.strip_prefix(p)) else {
        return false;
    };
    let Some((cost, rest)) = rest.split_once('$') else { return false };
    let cost_ok = cost.len() == 2 && cost.parse::<u32>().is_ok_and(|c| (4..=31).contains(&c));
    let alphabet = |c: char| c.is_ascii_alphanumeric() || c == '.' || c == '/';
    cost_ok && rest.len() == 53 && rest.chars().all(alphabet)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "$2y$05$Xc4Jq8mXs8rFtqL5l1c0ne6z3hQnYv0Ff0yHh1s8bW3q2lJ4h6m1K";

    #[test]
    fn values_are_checked_and_named() {
        let config = |json: &str| serde_json::from_str::<AccessConfig>(json).unwrap().validate();
        assert!(config(&format!(r#"{{"allow_ips":["10.0.0.0/8","127.0.0.1","::1"],"basic":{{"alice":"{HASH}"}}}}"#)).is_ok());
        assert_eq!(config(r#"{"allow_ips":["10.0.0.0/33"]}"#).unwrap_err().field, "access.allow_ips[0]");
        let plain = config(r#"{"basic":{"alice":"secret"}}"#).unwrap_err();
        assert_eq!(plain.field, "access.basic.alice");
        assert!(plain.message.contains("never a password"));
        assert_eq!(config(&format!(r#"{{"basic":{{"a:b":"{HASH}"}}}}"#)).unwrap_err().field, "access.basic.a:b");
        assert_eq!(config(r#"{"forward_auth":{"url":"ftp://x"}}"#).unwrap_err().field, "access.forward_auth.url");
        assert_eq!(config(r#"{"forward_auth":{"url":"http://a:4180/auth","copy_headers":["X Bad"]}}"#).unwrap_err().field, "access.forward_auth.copy_headers");
        assert!(config(r#"{"forward_auth":{"url":"http://127.0.0.1:4180/oauth2/auth","copy_headers":["X-Auth-Request-User"]}}"#).is_ok());
        assert!(serde_json::from_str::<AccessConfig>(r#"{"allowips":[]}"#).is_err(), "unknown fields are refused");
    }

    #[test]
    fn open_means_nothing_to_check() {
        assert!(AccessConfig::default().is_open());
        assert!(!AccessConfig { allow_ips: vec!["10.0.0.0/8".into()], ..Default::default() }.is_open());
    }
}

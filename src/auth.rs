//! Who may use the management API: the admin token (`PIPES_API_TOKEN`) and
//! tokens scoped to some users' deployments (`tokens.json` in the config dir).
//!
//! Tokens are compared by their SHA-256 in constant time, and every known
//! token is compared, so timing tells nothing of which one matched.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::PipesError;
use crate::secret::Secret;

/// Shortest token accepted, admin or scoped.
pub const MIN_TOKEN_LEN: usize = 16;

/// An API token from `tokens.json`, valid for the deployments of some users.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopedToken {
    pub name: String,
    pub users: Vec<String>,
    digest: [u8; 32],
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    tokens: Vec<TokenEntry>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: String,
    users: Vec<String>,
    /// The token itself; `sha256` keeps it off the disk.
    #[serde(default)]
    token: Option<String>,
    /// Hex SHA-256 of the token.
    #[serde(default)]
    sha256: Option<String>,
}

/// Parses `tokens.json`: `{"tokens": [{"name", "users", "token" | "sha256"}]}`.
pub fn parse_tokens(bytes: &[u8]) -> Result<Vec<ScopedToken>, String> {
    let file: TokenFile = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    file.tokens
        .into_iter()
        .map(|t| {
            let digest = match (&t.token, &t.sha256) {
                (Some(token), None) if token.len() >= MIN_TOKEN_LEN => digest(token.as_bytes()),
                (Some(_), None) => return Err(format!("token '{}' is shorter than {MIN_TOKEN_LEN} characters", t.name)),
                (None, Some(hex)) => {
                    let mut out = [0u8; 32];
                    hex::decode_to_slice(hex.trim(), &mut out).map_err(|_| format!("token '{}': sha256 is not 64 hex digits", t.name))?;
                    out
                }
                _ => return Err(format!("token '{}' needs exactly one of token and sha256", t.name)),
            };
            if t.users.is_empty() {
                return Err(format!("token '{}' names no users", t.name));
            }
            Ok(ScopedToken { name: t.name, users: t.users, digest })
        })
        .collect()
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// How the management API is protected.
#[derive(Debug, Clone)]
pub enum ApiAuth {
    /// Bearer tokens: the admin token (if any) and scoped ones from `tokens.json`.
    Tokens { admin: Option<Secret> },
    /// No check at all, for trusted networks (`PIPES_API_AUTH=none`).
    Off,
}

/// What an API request may manage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Everything.
    All,
    /// The deployments of these users.
    Users(Vec<String>),
}

impl Access {
    /// Whether the deployments of `user` may be managed.
    pub fn covers(&self, user: &str) -> bool {
        match self {
            Access::All => true,
            Access::Users(users) => users.iter().any(|u| u == user),
        }
    }

    /// `Ok` if the deployments of `user` may be managed, else 403.
    pub fn check(&self, user: &str) -> Result<(), PipesError> {
        if self.covers(user) {
            Ok(())
        } else {
            Err(PipesError::OutOfScope { user: user.to_owned() })
        }
    }
}

/// The credentials of an `Authorization: Bearer <token>` header; the scheme
/// is case-insensitive (RFC 9110 §11.1).
pub fn bearer(authorization: &[u8]) -> Option<&[u8]> {
    let space = authorization.iter().position(|&b| b == b' ')?;
    let (scheme, rest) = authorization.split_at(space);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

impl ApiAuth {
    /// Whether requests must present a token at all.
    pub fn required(&self) -> bool {
        matches!(self, ApiAuth::Tokens { .. })
    }

    /// Decides what the `Authorization` header grants.
    pub fn authorize(&self, authorization: Option<&[u8]>, scoped: &[ScopedToken]) -> Result<Access, PipesError> {
        let admin = match self {
            ApiAuth::Off => return Ok(Access::All),
            ApiAuth::Tokens { admin } => admin,
        };
        if admin.is_none() && scoped.is_empty() {
            return Err(PipesError::ApiClosed);
        }
        let presented = digest(authorization.and_then(bearer).ok_or(PipesError::Unauthorized)?);
        let is_admin = admin.as_ref().is_some_and(|a| bool::from(presented.ct_eq(&digest(a.expose().as_bytes()))));
        let mut users = Vec::new();
        for token in scoped {
            if bool::from(presented.ct_eq(&token.digest)) {
                users.extend(token.users.iter().cloned());
            }
        }
        if is_admin {
            Ok(Access::All)
        } else if !users.is_empty() {
            Ok(Access::Users(users))
        } else {
            Err(PipesError::Unauthorized)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scoped() -> Vec<ScopedToken> {
        parse_tokens(
            br#"{"tokens":[
                {"name":"alice-ci","users":["alice"],"token":"alice-token-0123456789"},
                {"name":"team","users":["bob","carol"],"sha256":"8a4cc7ba1e01b2ed43b5ba7b56a4bd1e6d7d3c2bd8b1ac7be4b16b0c02ad1c70"}
            ]}"#,
        )
        .unwrap()
    }

    #[test]
    fn the_api_is_closed_without_tokens() {
        let auth = ApiAuth::Tokens { admin: None };
        assert_eq!(auth.authorize(Some(b"Bearer x"), &[]), Err(PipesError::ApiClosed));
        assert_eq!(ApiAuth::Off.authorize(None, &[]), Ok(Access::All));
    }

    #[test]
    fn the_auth_matrix() {
        let auth = ApiAuth::Tokens { admin: Some(Secret::new("admin-token-0123456789".into())) };
        let tokens = scoped();
        assert_eq!(auth.authorize(None, &tokens), Err(PipesError::Unauthorized));
        assert_eq!(auth.authorize(Some(b"Bearer wrong"), &tokens), Err(PipesError::Unauthorized));
        assert_eq!(auth.authorize(Some(b"admin-token-0123456789"), &tokens), Err(PipesError::Unauthorized));
        assert_eq!(auth.authorize(Some(b"Bearer admin-token-0123456789"), &tokens), Ok(Access::All));
        let alice = auth.authorize(Some(b"Bearer alice-token-0123456789"), &tokens).unwrap();
        assert!(alice.check("alice").is_ok());
        assert_eq!(alice.check("bob"), Err(PipesError::OutOfScope { user: "bob".into() }));
    }

    #[test]
    fn the_scheme_is_case_insensitive() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"BEARER abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer   abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearer "), None);
        assert_eq!(bearer(b"Bearerabc"), None);
    }

    #[test]
    fn hashed_tokens_match_their_token() {
        let hex = hex::encode(digest(b"team-token-0123456789"));
        let file = format!(r#"{{"tokens":[{{"name":"team","users":["bob"],"sha256":"{hex}"}}]}}"#);
        let tokens = parse_tokens(file.as_bytes()).unwrap();
        let auth = ApiAuth::Tokens { admin: None };
        assert_eq!(auth.authorize(Some(b"Bearer team-token-0123456789"), &tokens), Ok(Access::Users(vec!["bob".into()])));
    }

    #[test]
    fn bad_token_files_say_why() {
        let plus = format!("+{}", "a".repeat(63));
        for bad in [
            r#"{"tokens":[{"name":"x","users":["a"]}]}"#.to_owned(),
            r#"{"tokens":[{"name":"x","users":["a"],"token":"short"}]}"#.to_owned(),
            r#"{"tokens":[{"name":"x","users":[],"token":"long-enough-token-123"}]}"#.to_owned(),
            r#"{"tokens":[{"name":"x","users":["a"],"sha256":"zz"}]}"#.to_owned(),
            format!(r#"{{"tokens":[{{"name":"x","users":["a"],"sha256":"{plus}"}}]}}"#),
            r#"{"tokens":[{"name":"x","users":["a"],"token":"long-enough-token-123","extra":1}]}"#.to_owned(),
        ] {
            assert!(parse_tokens(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}

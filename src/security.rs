//! Step 2 of the request path: may this deployment run here?
//!
//! An open proxy that runs any image on request is a hazard, so nothing may be
//! deployed until the operator says what may (`PIPES_ALLOW`).

use std::fmt;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::PipesError;
use crate::route::DeploymentRef;
use crate::settings::Secret;

/// One `PIPES_ALLOW` pattern: `*`, `user/*`, `user/repo`, `user/repo:*` or `user/repo:tag`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowPattern {
    /// Every deployment.
    Any,
    /// Every repository of one user.
    User(String),
    /// Every tag of one repository.
    Repository { user: String, repo: String },
    /// One tag.
    Tag { user: String, repo: String, tag: String },
}

impl AllowPattern {
    /// Parses one pattern; the error says what was expected.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let bad = || format!("'{text}' is not a pattern: expected *, user/*, user/repo, user/repo:* or user/repo:tag");
        if text == "*" {
            return Ok(Self::Any);
        }
        let (user, rest) = text.split_once('/').ok_or_else(bad)?;
        let name_ok = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-.".contains(&b));
        if !name_ok(user) {
            return Err(bad());
        }
        if rest == "*" {
            return Ok(Self::User(user.to_owned()));
        }
        let (repo, tag) = match rest.split_once(':') {
            Some((repo, tag)) => (repo, Some(tag)),
            None => (rest, None),
        };
        if !name_ok(repo) {
            return Err(bad());
        }
        match tag {
            None | Some("*") => Ok(Self::Repository { user: user.to_owned(), repo: repo.to_owned() }),
            Some(tag) if name_ok(tag) => {
                Ok(Self::Tag { user: user.to_owned(), repo: repo.to_owned(), tag: tag.to_owned() })
            }
            Some(_) => Err(bad()),
        }
    }

    /// Whether the pattern covers a deployment.
    pub fn allows(&self, d: DeploymentRef<'_>) -> bool {
        match self {
            Self::Any => true,
            Self::User(user) => user == d.user,
            Self::Repository { user, repo } => user == d.user && repo == d.repo,
            Self::Tag { user, repo, tag } => user == d.user && repo == d.repo && tag == d.tag,
        }
    }
}

impl fmt::Display for AllowPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("*"),
            Self::User(user) => write!(f, "{user}/*"),
            Self::Repository { user, repo } => write!(f, "{user}/{repo}"),
            Self::Tag { user, repo, tag } => write!(f, "{user}/{repo}:{tag}"),
        }
    }
}

/// Which deployments may be started and served.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    allow: Vec<AllowPattern>,
}

impl Policy {
    /// A policy that allows what any of the patterns allows (nothing when empty).
    pub fn new(allow: Vec<AllowPattern>) -> Self {
        Self { allow }
    }

    /// Whether the deployment may run here.
    pub fn allows(&self, d: DeploymentRef<'_>) -> bool {
        self.allow.iter().any(|p| p.allows(d))
    }

    /// The patterns, for start-up logs.
    pub fn patterns(&self) -> &[AllowPattern] {
        &self.allow
    }
}

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
                (Some(token), None) if token.len() >= 16 => digest(token.as_bytes()),
                (Some(_), None) => return Err(format!("token '{}' is shorter than 16 characters", t.name)),
                (None, Some(hex)) => parse_hex_digest(hex).ok_or_else(|| format!("token '{}': sha256 is not 64 hex digits", t.name))?,
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

fn parse_hex_digest(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
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

impl ApiAuth {
    /// Decides what the `Authorization` header grants.
    ///
    /// Tokens are compared by their SHA-256 in constant time, and every known
    /// token is compared, so timing tells nothing of which one matched.
    pub fn authorize(&self, authorization: Option<&[u8]>, scoped: &[ScopedToken]) -> Result<Access, PipesError> {
        let admin = match self {
            ApiAuth::Off => return Ok(Access::All),
            ApiAuth::Tokens { admin } => admin,
        };
        if admin.is_none() && scoped.is_empty() {
            return Err(PipesError::ApiClosed);
        }
        let presented = authorization
            .and_then(|h| h.strip_prefix(b"Bearer ").or_else(|| h.strip_prefix(b"bearer ")))
            .ok_or(PipesError::Unauthorized)?;
        let presented = digest(presented);
        let mut access: Option<Access> = None;
        if let Some(admin) = admin {
            if bool::from(presented.ct_eq(&digest(admin.expose().as_bytes()))) {
                access = Some(Access::All);
            }
        }
        let mut users = Vec::new();
        for token in scoped {
            if bool::from(presented.ct_eq(&token.digest)) {
                users.extend(token.users.iter().cloned());
            }
        }
        match access {
            Some(all) => Ok(all),
            None if !users.is_empty() => Ok(Access::Users(users)),
            None => Err(PipesError::Unauthorized),
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
    fn hashed_tokens_match_their_token() {
        let hex: String = digest(b"team-token-0123456789").iter().map(|b| format!("{b:02x}")).collect();
        let file = format!(r#"{{"tokens":[{{"name":"team","users":["bob"],"sha256":"{hex}"}}]}}"#);
        let tokens = parse_tokens(file.as_bytes()).unwrap();
        let auth = ApiAuth::Tokens { admin: None };
        assert_eq!(auth.authorize(Some(b"Bearer team-token-0123456789"), &tokens), Ok(Access::Users(vec!["bob".into()])));
    }

    #[test]
    fn bad_token_files_say_why() {
        for bad in [
            r#"{"tokens":[{"name":"x","users":["a"]}]}"#,
            r#"{"tokens":[{"name":"x","users":["a"],"token":"short"}]}"#,
            r#"{"tokens":[{"name":"x","users":[],"token":"long-enough-token-123"}]}"#,
            r#"{"tokens":[{"name":"x","users":["a"],"sha256":"zz"}]}"#,
            r#"{"tokens":[{"name":"x","users":["a"],"token":"long-enough-token-123","extra":1}]}"#,
        ] {
            assert!(parse_tokens(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    fn d<'a>(user: &'a str, repo: &'a str, tag: &'a str) -> DeploymentRef<'a> {
        DeploymentRef { user, repo, tag }
    }

    #[test]
    fn nothing_is_allowed_by_default() {
        assert!(!Policy::default().allows(d("alice", "app", "v1")));
    }

    #[test]
    fn patterns_cover_what_they_say() {
        let p = |s: &str| AllowPattern::parse(s).unwrap();
        assert!(p("*").allows(d("a", "b", "c")));
        assert!(p("alice/*").allows(d("alice", "app", "v1")));
        assert!(!p("alice/*").allows(d("bob", "app", "v1")));
        assert!(p("alice/app").allows(d("alice", "app", "v2")));
        assert!(p("alice/app:*").allows(d("alice", "app", "v2")));
        assert!(!p("alice/app").allows(d("alice", "other", "v2")));
        assert!(p("alice/app:v1").allows(d("alice", "app", "v1")));
        assert!(!p("alice/app:v1").allows(d("alice", "app", "v2")));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in ["", "alice", "Alice/*", "alice/", "/app", "alice/app:", "alice/app:v 1", "*/app"] {
            assert!(AllowPattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn patterns_print_as_written() {
        for s in ["*", "alice/*", "alice/app", "alice/app:v1"] {
            assert_eq!(AllowPattern::parse(s).unwrap().to_string(), s);
        }
    }
}

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

/// Checks the management API's bearer token.
///
/// Without a configured token the API is closed. Both sides are hashed before a
/// constant-time comparison, so neither content nor length leaks through timing.
pub fn check_api_token(configured: Option<&Secret>, authorization: Option<&[u8]>) -> Result<(), PipesError> {
    let Some(expected) = configured else {
        return Err(PipesError::ApiClosed);
    };
    let presented = authorization
        .and_then(|h| h.strip_prefix(b"Bearer ").or_else(|| h.strip_prefix(b"bearer ")))
        .ok_or(PipesError::Unauthorized)?;
    let a = Sha256::digest(presented);
    let b = Sha256::digest(expected.expose().as_bytes());
    if bool::from(a.as_slice().ct_eq(b.as_slice())) {
        Ok(())
    } else {
        Err(PipesError::Unauthorized)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_tokens() {
        let token = Secret::new("0123456789abcdef0123".into());
        assert_eq!(check_api_token(None, Some(b"Bearer x")), Err(PipesError::ApiClosed));
        assert_eq!(check_api_token(Some(&token), None), Err(PipesError::Unauthorized));
        assert_eq!(check_api_token(Some(&token), Some(b"Bearer wrong")), Err(PipesError::Unauthorized));
        assert_eq!(check_api_token(Some(&token), Some(b"0123456789abcdef0123")), Err(PipesError::Unauthorized));
        assert_eq!(check_api_token(Some(&token), Some(b"Bearer 0123456789abcdef0123")), Ok(()));
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

//! Step 2 of the request path: may this deployment run here?
//!
//! An open proxy that runs any image on request is a hazard, so nothing may be
//! deployed until the operator says what may (`PIPES_ALLOW`). Patterns are
//! checked with the same rules as host names, so a pattern that can never
//! match a host (`al.ice/*`) is refused at start-up.

use std::fmt;

use crate::route::{check_component, check_tag, DeploymentRef};

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
    /// Parses one pattern; the error says what was expected and why.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text == "*" {
            return Ok(Self::Any);
        }
        let bad = |why: &str| format!("'{text}' is not a pattern ({why}): expected *, user/*, user/repo, user/repo:* or user/repo:tag");
        let (user, rest) = text.split_once('/').ok_or_else(|| bad("no '/'"))?;
        check_component(user).map_err(bad)?;
        if rest == "*" {
            return Ok(Self::User(user.to_owned()));
        }
        let (repo, tag) = match rest.split_once(':') {
            Some((repo, tag)) => (repo, Some(tag)),
            None => (rest, None),
        };
        check_component(repo).map_err(bad)?;
        match tag {
            None | Some("*") => Ok(Self::Repository { user: user.to_owned(), repo: repo.to_owned() }),
            Some(tag) => {
                check_tag(tag).map_err(bad)?;
                Ok(Self::Tag { user: user.to_owned(), repo: repo.to_owned(), tag: tag.to_owned() })
            }
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

    /// Parses a comma-separated list of patterns (`PIPES_ALLOW`).
    pub fn parse(list: &str) -> Result<Self, String> {
        list.split(',').filter(|p| !p.trim().is_empty()).map(AllowPattern::parse).collect::<Result<_, _>>().map(Self::new)
    }

    /// Whether the deployment may run here.
    #[inline]
    pub fn allows(&self, d: DeploymentRef<'_>) -> bool {
        self.allow.iter().any(|p| p.allows(d))
    }

    /// The patterns, for start-up logs.
    pub fn patterns(&self) -> &[AllowPattern] {
        &self.allow
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(p("alice/app:1.2.3").allows(d("alice", "app", "1.2.3")));
        assert!(!p("alice/app:v1").allows(d("alice", "app", "v2")));
    }

    #[test]
    fn patterns_that_no_host_can_match_are_refused() {
        for bad in [
            "",
            "alice",
            "Alice/*",
            "alice/",
            "/app",
            "alice/app:",
            "alice/app:v 1",
            "*/app",
            "al.ice/*",
            "alice/a.pp",
            "-alice/*",
            "alice/app:.v1",
            "alice/app:v1..2",
        ] {
            assert!(AllowPattern::parse(bad).is_err(), "{bad}");
        }
        assert!(AllowPattern::parse("al.ice/*").unwrap_err().contains("al.ice/*"));
    }

    #[test]
    fn lists_parse_and_print_as_written() {
        for s in ["*", "alice/*", "alice/app", "alice/app:v1"] {
            assert_eq!(AllowPattern::parse(s).unwrap().to_string(), s);
        }
        assert_eq!(Policy::parse("alice/*, bob/app ,").unwrap().patterns().len(), 2);
        assert!(Policy::parse("alice/*,nope").is_err());
    }
}

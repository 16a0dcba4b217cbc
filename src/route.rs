//! Step 1 of the request path: which deployment does a Host name?
//!
//! `{tag}.{repo}.{user}.{domain}` names image `user/repo:tag`; `{repo}.{user}.{domain}`
//! names `user/repo:latest`; a tag may hold dots (everything left of `{repo}`).
//! In the flat style (`PIPES_HOST_STYLE=flat`) the same names are one label,
//! `{tag}--{repo}--{user}.{domain}`, so that one wildcard certificate for
//! `*.{domain}` covers every deployment.
//! Parsing borrows from the Host and never allocates on success, so the warm path
//! can look the deployment up without building a `String`.

use std::borrow::Cow;
use std::fmt;

use crate::error::PipesError;

/// The path prefix answered by Pipes itself, on every deployment's host.
pub const API_PREFIX: &str = "/__proxyapi";

/// Tag used when the Host names only `{repo}.{user}`.
pub const DEFAULT_TAG: &str = "latest";

/// How the served domain is recognised in a Host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Domain {
    /// The domain is the last N labels of any Host (`DOMAINLEVELS`).
    Levels(usize),
    /// The domain is exactly this suffix (`PIPES_DOMAIN`), lowercase, no dots at the ends.
    Suffix(String),
}

/// How a deployment's names are laid out in front of the domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HostStyle {
    /// `{tag}.{repo}.{user}.{domain}`: a label each.
    #[default]
    Dotted,
    /// `{tag}--{repo}--{user}.{domain}`: one label, under one wildcard certificate.
    Flat,
}

impl HostStyle {
    /// The names of a deployment as this style writes them, in braces.
    pub fn pattern(self) -> &'static str {
        match self {
            HostStyle::Dotted => "{tag}.{repo}.{user}",
            HostStyle::Flat => "{tag}--{repo}--{user}",
        }
    }

    /// The names of `user/repo:latest` without its tag.
    fn latest_pattern(self) -> &'static str {
        match self {
            HostStyle::Dotted => "{repo}.{user}",
            HostStyle::Flat => "{repo}--{user}",
        }
    }
}

/// How Pipes reads a Host: the domain it serves and the style of the names before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hosts {
    pub domain: Domain,
    pub style: HostStyle,
}

impl Hosts {
    /// The classic layout, `{tag}.{repo}.{user}.{domain}`.
    pub fn dotted(domain: Domain) -> Self {
        Hosts { domain, style: HostStyle::Dotted }
    }

    fn describe(&self) -> String {
        match &self.domain {
            Domain::Levels(n) => format!("a host with a domain of {} after {}", labels(*n), self.style.pattern()),
            Domain::Suffix(s) => format!("a host under .{s}"),
        }
    }

    /// The host name of `d`, where the domain is known (`PIPES_DOMAIN`).
    pub fn name_of(&self, d: &Deployment) -> Option<String> {
        let Domain::Suffix(domain) = &self.domain else { return None };
        let names = self.style.pattern().replace("{tag}", &d.tag).replace("{repo}", &d.repo).replace("{user}", &d.user);
        Some(format!("{names}.{domain}"))
    }

    /// The error for a host that names no deployment, showing this layout.
    pub fn no_deployment(&self, host: &str) -> PipesError {
        let (names, latest) = (self.style.pattern(), self.style.latest_pattern());
        PipesError::NoDeployment { host: host.to_owned(), expected: format!("{names}.<domain> or {latest}.<domain>") }
    }
}

/// "1 label", "2 labels".
fn labels(n: usize) -> String {
    if n == 1 {
        "1 label".to_owned()
    } else {
        format!("{n} labels")
    }
}

impl fmt::Display for Hosts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = self.style.pattern();
        match &self.domain {
            Domain::Levels(n) => write!(f, "{names} under any domain of {}", labels(*n)),
            Domain::Suffix(s) => write!(f, "{names}.{s}"),
        }
    }
}

/// An owned deployment key: image `user/repo:tag`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Deployment {
    pub user: String,
    pub repo: String,
    pub tag: String,
}

/// A deployment key borrowed from a Host. Hashes exactly like [`Deployment`]
/// (`String` hashes as `str`), so it can look one up in a map without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeploymentRef<'a> {
    pub user: &'a str,
    pub repo: &'a str,
    pub tag: &'a str,
}

impl DeploymentRef<'_> {
    /// An owned copy, for the cold path.
    pub fn to_owned(self) -> Deployment {
        Deployment { user: self.user.to_owned(), repo: self.repo.to_owned(), tag: self.tag.to_owned() }
    }
}

impl hashbrown::Equivalent<Deployment> for DeploymentRef<'_> {
    fn equivalent(&self, key: &Deployment) -> bool {
        self.user == key.user && self.repo == key.repo && self.tag == key.tag
    }
}

impl hashbrown::Equivalent<std::sync::Arc<Deployment>> for DeploymentRef<'_> {
    fn equivalent(&self, key: &std::sync::Arc<Deployment>) -> bool {
        self.equivalent(&**key)
    }
}

impl Deployment {
    /// The borrowed form of this key.
    pub fn as_ref(&self) -> DeploymentRef<'_> {
        DeploymentRef { user: &self.user, repo: &self.repo, tag: &self.tag }
    }

    /// `user/repo`, the repository the deployment belongs to.
    pub fn repository(&self) -> String {
        format!("{}/{}", self.user, self.repo)
    }

    /// Parses `user/repo:tag` (tag optional), as stored in container labels.
    pub fn parse(key: &str) -> Option<Deployment> {
        let (user, rest) = key.split_once('/')?;
        let (repo, tag) = rest.split_once(':').unwrap_or((rest, DEFAULT_TAG));
        let d = DeploymentRef { user, repo, tag };
        (check_component(user).is_ok() && check_component(repo).is_ok() && check_tag(tag).is_ok()).then(|| d.to_owned())
    }
}

impl fmt::Display for Deployment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.as_ref().fmt(f)
    }
}

impl fmt::Display for DeploymentRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}:{}", self.user, self.repo, self.tag)
    }
}

/// What a Host addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// The bare domain itself (the fleet-wide API).
    Bare,
    /// One deployment.
    Deployment(DeploymentRef<'a>),
}

/// Lowercases a Host and strips its port and a trailing dot.
///
/// Borrows when the Host is already in normal form, which is the common case.
pub fn normalize_host(raw: &str) -> Cow<'_, str> {
    let host = strip_port(raw.trim());
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

/// `host` without its `:port`; IPv6 literals are kept whole.
pub fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // IPv6 literal: never one of ours, keep it whole for the error message.
        return host;
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// Resolves a normalized Host (see [`normalize_host`]) to what it addresses.
pub fn route<'h>(host: &'h str, hosts: &Hosts) -> Result<Target<'h>, PipesError> {
    let not_ours = || PipesError::NotOurs { host: host.to_owned(), expected: hosts.describe() };
    if host.is_empty() || host.starts_with('[') || host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(not_ours());
    }
    if host.split('.').any(str::is_empty) {
        return Err(PipesError::BadName { label: String::new(), reason: "the host has an empty label ('..')" });
    }
    let names = match &hosts.domain {
        Domain::Suffix(suffix) => {
            if host == suffix {
                return Ok(Target::Bare);
            }
            match host.strip_suffix(suffix.as_str()).and_then(|h| h.strip_suffix('.')) {
                Some(names) => names,
                None => return Err(not_ours()),
            }
        }
        Domain::Levels(levels) => {
            let mut cut = host.len();
            for level in 1..=*levels {
                match host[..cut].rfind('.') {
                    Some(dot) => cut = dot,
                    // The host is exactly the domain.
                    None if level == *levels => return Ok(Target::Bare),
                    None => return Err(not_ours()),
                }
            }
            &host[..cut]
        }
    };
    if names.is_empty() {
        return Ok(Target::Bare);
    }
    let (tag, repo, user) = match hosts.style {
        // names = "{tag...}.{repo}.{user}"
        HostStyle::Dotted => {
            let (rest, user) = names.rsplit_once('.').ok_or_else(|| hosts.no_deployment(host))?;
            match rest.rsplit_once('.') {
                Some((tag, repo)) => (tag, repo, user),
                None => (DEFAULT_TAG, rest, user),
            }
        }
        // names = "{tag}--{repo}--{user}", one label
        HostStyle::Flat => {
            if names.contains('.') {
                return Err(hosts.no_deployment(host));
            }
            let mut parts = names.split("--");
            match (parts.next(), parts.next(), parts.next(), parts.next()) {
                (Some(tag), Some(repo), Some(user), None) => (tag, repo, user),
                (Some(repo), Some(user), None, None) => (DEFAULT_TAG, repo, user),
                (_, None, ..) => return Err(hosts.no_deployment(host)),
                _ => {
                    return Err(PipesError::BadName {
                        label: names.to_owned(),
                        reason: "in flat host names '--' separates tag, repo and user, and appears only there",
                    })
                }
            }
        }
    };
    check_component(user).map_err(|reason| PipesError::BadName { label: user.to_owned(), reason })?;
    check_component(repo).map_err(|reason| PipesError::BadName { label: repo.to_owned(), reason })?;
    check_tag(tag).map_err(|reason| PipesError::BadName { label: tag.to_owned(), reason })?;
    Ok(Target::Deployment(DeploymentRef { user, repo, tag }))
}

/// Whether a request path belongs to the management API.
pub fn is_api_path(path: &str) -> bool {
    path.strip_prefix(API_PREFIX).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

const COMPONENT_RULE: &str = "a repository or user name is lowercase a-z and 0-9, separated by '_', '__' or dashes, starting and ending with a letter or digit";
const TAG_RULE: &str = "a tag is at most 128 of a-z, 0-9, '_', '.' and '-', not starting with '.' or '-'";

/// A path component of a Docker reference, without dots (a DNS label cannot hold one):
/// `[a-z0-9]+(?:(?:_|__|-+)[a-z0-9]+)*`.
pub(crate) fn check_component(label: &str) -> Result<(), &'static str> {
    let bytes = label.as_bytes();
    if bytes.is_empty() {
        return Err("the label is empty");
    }
    if label.len() > 63 {
        return Err("a host label is at most 63 characters");
    }
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return Err(COMPONENT_RULE);
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &label[start..i];
        let ok = sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-');
        if !ok {
            return Err(COMPONENT_RULE);
        }
    }
    Ok(())
}

/// A tag: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}` (lowercase here, since hosts are).
pub(crate) fn check_tag(tag: &str) -> Result<(), &'static str> {
    let bytes = tag.as_bytes();
    if bytes.is_empty() {
        return Err("the tag is empty");
    }
    if bytes.len() > 128 {
        return Err(TAG_RULE);
    }
    let word = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_';
    if !word(bytes[0]) || !bytes.iter().all(|&b| word(b) || b == b'.' || b == b'-') {
        return Err(TAG_RULE);
    }
    if tag.contains("..") {
        return Err("the host has an empty label");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn dep(host: &str, domain: &Domain) -> Result<String, u16> {
        match route(&normalize_host(host), &Hosts::dotted(domain.clone())) {
            Ok(Target::Deployment(d)) => Ok(d.to_string()),
            Ok(Target::Bare) => Ok("<domain>".into()),
            Err(e) => Err(e.status()),
        }
    }

    #[test]
    fn names_users_type() {
        let two = Domain::Levels(2);
        assert_eq!(dep("v1.app.alice.example.com", &two), Ok("alice/app:v1".into()));
        assert_eq!(dep("app.alice.example.com", &two), Ok("alice/app:latest".into()));
        assert_eq!(dep("1.2.3.app.alice.example.com", &two), Ok("alice/app:1.2.3".into()));
        assert_eq!(dep("latest.nginx.library.example.com", &two), Ok("library/nginx:latest".into()));
    }

    #[test]
    fn host_is_lowercased_and_port_stripped() {
        let two = Domain::Levels(2);
        assert_eq!(dep("V1.App.Alice.Example.COM:8080", &two), Ok("alice/app:v1".into()));
        assert_eq!(dep("v1.app.alice.example.com.", &two), Ok("alice/app:v1".into()));
        assert!(matches!(normalize_host("a.b.example.com:80"), Cow::Borrowed("a.b.example.com")));
    }

    #[test]
    fn domain_levels_three() {
        let three = Domain::Levels(3);
        assert_eq!(dep("v1.app.alice.pipe.example.com", &three), Ok("alice/app:v1".into()));
        assert_eq!(dep("app.alice.pipe.example.com", &three), Ok("alice/app:latest".into()));
        assert_eq!(dep("pipe.example.com", &three), Ok("<domain>".into()));
        assert_eq!(dep("example.com", &three), Err(404));
    }

    #[test]
    fn exact_domain_suffix() {
        let d = Domain::Suffix("pipe.example.com".into());
        assert_eq!(dep("v1.app.alice.pipe.example.com", &d), Ok("alice/app:v1".into()));
        assert_eq!(dep("pipe.example.com", &d), Ok("<domain>".into()));
        assert_eq!(dep("v1.app.alice.other.com", &d), Err(404));
        assert_eq!(dep("v1.app.alicepipe.example.com", &d), Err(404));
    }

    #[test]
    fn not_ours_and_no_deployment() {
        let two = Domain::Levels(2);
        assert_eq!(dep("localhost", &two), Err(404));
        assert_eq!(dep("127.0.0.1:8080", &two), Err(404));
        assert_eq!(dep("[::1]:8080", &two), Err(404));
        assert_eq!(dep("", &two), Err(404));
        assert_eq!(dep("alice.example.com", &two), Err(404));
        assert_eq!(dep("example.com", &two), Ok("<domain>".into()));
    }

    #[test]
    fn invalid_names_say_which_label() {
        let two = Domain::Levels(2);
        for host in ["v1.-app.alice.example.com", "v1.app.al!ce.example.com", "v1.a..b.example.com", ".app.alice.example.com", "v1.app_-x.alice.example.com"] {
            let e = route(&normalize_host(host), &Hosts::dotted(two.clone())).unwrap_err();
            assert_eq!(e.status(), 400, "{host}");
        }
        match route("v1.app.al!ce.example.com", &Hosts::dotted(two.clone())) {
            Err(PipesError::BadName { label, .. }) => assert_eq!(label, "al!ce"),
            other => panic!("{other:?}"),
        }
        assert_eq!(dep("-v1.app.alice.example.com", &two), Err(400));
        // Empty labels are never a name, wherever they are.
        assert_eq!(dep("v1..web.alice.example.com", &two), Err(400));
        assert_eq!(dep("v1.web.alice.example.com..", &two), Err(400));
        assert_eq!(dep("v1.web..alice.example.com", &two), Err(400));
        assert_eq!(dep("v1.wéb.alice.example.com", &two), Err(400));
        assert_eq!(dep("a__b.x-y.u_v.example.com", &two), Ok("u_v/x-y:a__b".into()));
    }

    #[test]
    fn flat_names_are_one_label() {
        let flat = Hosts { domain: Domain::Suffix("example.com".into()), style: HostStyle::Flat };
        let dep = |host: &str| match route(&normalize_host(host), &flat) {
            Ok(Target::Deployment(d)) => Ok(d.to_string()),
            Ok(Target::Bare) => Ok("<domain>".into()),
            Err(e) => Err(e.status()),
        };
        assert_eq!(dep("v1--app--alice.example.com"), Ok("alice/app:v1".into()));
        assert_eq!(dep("app--alice.example.com"), Ok("alice/app:latest".into()));
        assert_eq!(dep("pr-42--my-app--alice.example.com"), Ok("alice/my-app:pr-42".into()));
        assert_eq!(dep("example.com"), Ok("<domain>".into()));
        assert_eq!(dep("alice.example.com"), Err(404));
        assert_eq!(dep("v1.app.alice.example.com"), Err(404), "dotted names are not served in the flat style");
        assert_eq!(dep("a--b--c--d.example.com"), Err(400), "ambiguous");
        assert_eq!(dep("v1--app---alice.example.com"), Err(400));
        let e = route("alice.example.com", &flat).unwrap_err();
        assert!(e.to_string().contains("{tag}--{repo}--{user}.<domain>"), "{e}");
    }

    #[test]
    fn api_paths() {
        assert!(is_api_path("/__proxyapi"));
        assert!(is_api_path("/__proxyapi/container"));
        assert!(!is_api_path("/__proxyapix"));
        assert!(!is_api_path("/app/__proxyapi"));
    }

    #[test]
    fn label_keys_round_trip() {
        let d = Deployment::parse("alice/app:1.2.3").unwrap();
        assert_eq!(d.to_string(), "alice/app:1.2.3");
        assert_eq!(Deployment::parse("alice/app").unwrap().tag, "latest");
        assert!(Deployment::parse("alice").is_none());
        assert!(Deployment::parse("Alice/app:v1").is_none());
    }

    #[test]
    fn borrowed_and_owned_keys_hash_alike() {
        use std::hash::BuildHasher;
        let s = hashbrown::DefaultHashBuilder::default();
        let owned = Deployment::parse("alice/app:v1").unwrap();
        assert_eq!(s.hash_one(&owned), s.hash_one(owned.as_ref()));
    }

    proptest! {
        #[test]
        fn parsing_never_panics(host in ".{0,300}", levels in 0usize..5) {
            let host = normalize_host(&host);
            for style in [HostStyle::Dotted, HostStyle::Flat] {
                let _ = route(&host, &Hosts { domain: Domain::Levels(levels), style });
                let _ = route(&host, &Hosts { domain: Domain::Suffix("example.com".into()), style });
            }
        }

        #[test]
        fn parsed_names_are_valid_references(host in "[a-z0-9._-]{1,40}\\.example\\.com") {
            if let Ok(Target::Deployment(d)) = route(&host, &Hosts::dotted(Domain::Levels(2))) {
                let key = d.to_string();
                prop_assert_eq!(Deployment::parse(&key), Some(d.to_owned()));
            }
        }
    }
}

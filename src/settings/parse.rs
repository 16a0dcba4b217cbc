//! Parsers of single values: each says what it expected, in the words of
//! the one line a bad setting prints.

use std::net::SocketAddr;
use std::time::Duration;

use crate::auth::MIN_TOKEN_LEN;
use crate::config::{check_capability, check_cpus, check_memory, AccessConfig, ByteSize, Span, Watch, MIN_WATCH};
use crate::engine::RESERVED_LABELS;
use crate::route::HostStyle;
use crate::secret::Secret;

use super::cli::*;
use super::*;

/// Longest duration a timeout setting may have.
pub(super) const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

pub(super) fn parse_backend(value: &str) -> Result<BackendKind, String> {
    match value {
        "docker" => Ok(BackendKind::Docker),
        "swarm" => Ok(BackendKind::Swarm),
        _ => Err(format!("expected docker or swarm, got '{value}'")),
    }
}

pub(super) fn parse_listen(value: &str) -> Result<Addrs, String> {
    let addrs: Result<Vec<SocketAddr>, _> = value.split(',').map(str::trim).filter(|a| !a.is_empty()).map(|a| a.parse::<SocketAddr>().map_err(|_| a)).collect();
    match addrs {
        Ok(a) if !a.is_empty() => Ok(Addrs(a)),
        Ok(_) => Err("expected at least one address:port, e.g. 0.0.0.0:8080".into()),
        Err(bad) => Err(format!("expected address:port such as 0.0.0.0:8080 or [::]:8080, got '{bad}'")),
    }
}

pub(super) fn parse_port(value: &str) -> Result<u16, String> {
    value.trim().parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| format!("expected a port from 1 to 65535, got '{value}'"))
}

pub(super) fn parse_https_url(value: &str) -> Result<String, String> {
    let url = value.trim();
    let rest = url.strip_prefix("https://").ok_or_else(|| format!("expected an https:// URL (ACME servers speak HTTPS), got '{value}'"))?;
    if rest.is_empty() || rest.starts_with('/') || url.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
        return Err(format!("expected an https:// URL with a host, got '{value}'"));
    }
    Ok(url.to_owned())
}

pub(super) fn parse_email(value: &str) -> Result<String, String> {
    let e = value.trim();
    match e.split_once('@') {
        Some((user, host)) if !user.is_empty() && host.contains('.') && !e.bytes().any(|b| b.is_ascii_whitespace() || b == b',') => Ok(e.to_owned()),
        _ => Err(format!("expected an e-mail address, got '{value}'")),
    }
}

pub(super) fn parse_host_style(value: &str) -> Result<HostStyle, String> {
    match value.trim() {
        "dotted" => Ok(HostStyle::Dotted),
        "flat" => Ok(HostStyle::Flat),
        other => Err(format!("expected dotted or flat, got '{other}'")),
    }
}

pub(super) fn parse_access_log(value: &str) -> Result<AccessLog, String> {
    match value.trim() {
        "off" => Ok(AccessLog::Off),
        "json" => Ok(AccessLog::Json),
        other => Err(format!("expected off or json, got '{other}'")),
    }
}

pub(super) fn parse_levels(value: &str) -> Result<usize, String> {
    value.trim().parse::<usize>().ok().filter(|n| (1..=16).contains(n)).ok_or_else(|| format!("expected a number from 1 to 16, got '{value}'"))
}

pub(super) fn parse_domain(value: &str) -> Result<String, String> {
    let d = value.trim().trim_matches('.').to_ascii_lowercase();
    let label_ok = |l: &str| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if d.split('.').all(label_ok) {
        Ok(d)
    } else {
        Err(format!("expected a domain name such as pipe.example.com, got '{value}'"))
    }
}

pub(super) fn parse_registry(value: &str) -> Result<String, String> {
    let r = value.trim().trim_end_matches('/');
    let ok = !r.is_empty() && !r.contains("://") && !r.starts_with('/') && r.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-:/[]".contains(&b));
    if ok {
        Ok(r.to_owned())
    } else {
        Err(format!("expected host[:port][/path] without scheme, e.g. 127.0.0.1:5000, got '{value}'"))
    }
}

pub(super) fn parse_network(value: &str) -> Result<String, String> {
    let n = value.trim();
    if n.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)) {
        Ok(n.to_owned())
    } else {
        Err(format!("expected a Docker network name, got '{value}'"))
    }
}

pub(super) fn parse_token(value: &str) -> Result<Secret, String> {
    if value.len() < MIN_TOKEN_LEN {
        Err(format!("expected a token of at least {MIN_TOKEN_LEN} characters"))
    } else {
        Ok(Secret::new(value.to_owned()))
    }
}

pub(super) fn parse_secret(value: &str) -> Result<Secret, String> {
    Ok(Secret::new(value.to_owned()))
}

pub(super) fn parse_api_auth(value: &str) -> Result<AuthMode, String> {
    match value.trim() {
        "token" => Ok(AuthMode::Token),
        "none" => Ok(AuthMode::None),
        other => Err(format!("expected token or none, got '{other}'")),
    }
}

pub(super) fn parse_count(value: &str) -> Result<usize, String> {
    value.trim().parse::<usize>().ok().filter(|n| (1..=100_000).contains(n)).ok_or_else(|| format!("expected a whole number from 1 to 100000, got '{value}'"))
}

pub(super) fn parse_memory(value: &str) -> Result<ByteSize, String> {
    ByteSize::parse(value).and_then(check_memory).map_err(|why| format!("expected a size of at least 6m such as 512m, got '{value}' ({why})"))
}

pub(super) fn parse_cpus(value: &str) -> Result<f64, String> {
    value
        .trim()
        .parse::<f64>()
        .map_err(|e| e.to_string())
        .and_then(check_cpus)
        .map_err(|why| format!("expected a number of cores such as 0.5 or 2, got '{value}' ({why})"))
}

pub(super) fn parse_docker_host(value: &str) -> Result<String, String> {
    if ["unix://", "tcp://", "http://"].iter().any(|s| value.starts_with(s)) {
        Ok(value.to_owned())
    } else {
        Err(format!("expected unix:///path or tcp://host:port, got '{value}'"))
    }
}

pub(super) fn parse_bool(value: &str) -> Result<bool, String> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(format!("expected true or false, got '{value}'")),
    }
}

pub(super) fn parse_instance(value: &str) -> Result<String, String> {
    let ok =
        !value.is_empty() && value.len() <= 32 && value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') && !value.starts_with('-');
    if ok {
        Ok(value.to_owned())
    } else {
        Err(format!("expected up to 32 of a-z, 0-9 and '-', got '{value}'"))
    }
}

pub(super) fn parse_labels(value: &str) -> Result<Labels, String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap_or((l, ""));
            let key_ok = !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b));
            if !key_ok {
                Err(format!("expected key=value pairs, got '{l}'"))
            } else if RESERVED_LABELS.contains(&k) {
                Err(format!("label '{k}' is set by Pipes itself"))
            } else {
                Ok((k.to_owned(), v.to_owned()))
            }
        })
        .collect::<Result<_, _>>()
        .map(Labels)
}

/// A duration: seconds, or with a unit (`60s`, `1500ms`, `2m`), up to a day.
pub(super) fn parse_timeout(value: &str) -> Result<Duration, String> {
    Span::parse(value)
        .and_then(|s| s.within(Duration::from_millis(1), MAX_TIMEOUT))
        .map(|s| s.0)
        .map_err(|_| format!("expected a duration such as 60s, 1500ms or 2m (up to 24h), got '{value}'"))
}

/// `PIPES_WAITING_PAGE_AFTER`.
#[derive(Debug, Clone, Copy)]
pub(super) struct WaitingPage(pub(super) Option<Duration>);

pub(super) fn parse_waiting_page(value: &str) -> Result<WaitingPage, String> {
    match value {
        "off" => Ok(WaitingPage(None)),
        "0" | "0s" => Ok(WaitingPage(Some(Duration::ZERO))),
        _ => parse_timeout(value).map(|d| WaitingPage(Some(d))).map_err(|_| format!("expected off or a duration such as 1s or 500ms, got '{value}'")),
    }
}

pub(super) fn parse_capabilities(value: &str) -> Result<Capabilities, String> {
    value.split(',').filter(|c| !c.trim().is_empty()).map(check_capability).collect::<Result<_, _>>().map(Capabilities)
}

pub(super) fn parse_header_size(value: &str) -> Result<ByteSize, String> {
    ByteSize::parse(value)
        .ok()
        .filter(|b| (1 << 10..=16 << 20).contains(&b.0))
        .ok_or_else(|| format!("expected a size from 1k to 16m such as 64k, got '{value}'"))
}

pub(super) fn parse_watch(value: &str) -> Result<Watch, String> {
    let expected = || format!("expected off or a duration of at least 1s such as 5m, got '{value}'");
    match Watch::parse(value).map_err(|_| expected())? {
        Watch::Every(span) => span.within(MIN_WATCH, MAX_TIMEOUT).map(Watch::Every).map_err(|_| expected()),
        Watch::Off => Ok(Watch::Off),
    }
}

/// `PIPES_ACCESS`: a config's `access`, checked as a config's is.
pub(super) fn parse_access(value: &str) -> Result<AccessConfig, String> {
    let access: AccessConfig = serde_json::from_str(value).map_err(|e| format!("expected a config's access as JSON: {e}"))?;
    access.validate().map_err(|e| format!("{}: {}", e.field, e.message))?;
    Ok(access)
}

/// `http://` or `https://` URLs, comma-separated.
#[derive(Debug, Clone)]
pub(super) struct Urls(pub(super) Vec<String>);

/// Each URL of `value` as `fine` takes what follows its scheme, or `expected`.
fn urls(value: &str, fine: impl Fn(&str) -> bool, expected: &str) -> Result<Urls, String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| match u.strip_prefix("http://").or_else(|| u.strip_prefix("https://")) {
            Some(rest) if !rest.starts_with('/') && fine(rest) && u.parse::<http::Uri>().is_ok() => Ok(u.to_owned()),
            _ => Err(format!("expected {expected}, got '{u}'")),
        })
        .collect::<Result<_, _>>()
        .map(Urls)
}

/// `PIPES_FORWARD_AUTH_URLS`: prefixes that end their host, so that
/// `http://auth` cannot admit `http://auth.evil.example`.
pub(super) fn parse_url_prefixes(value: &str) -> Result<Urls, String> {
    urls(value, |rest| rest.contains('/'), "URL prefixes with a path, such as http://127.0.0.1:4180/oauth2/")
}

/// `PIPES_WEBHOOK_URL`: whole URLs.
pub(super) fn parse_webhook_urls(value: &str) -> Result<Urls, String> {
    urls(value, |rest| !rest.is_empty(), "http:// or https:// URLs, comma-separated")
}

/// `PIPES_DISK_MIN_FREE`: `5%`, or a size such as `2GiB`.
pub(super) fn parse_min_free(value: &str) -> Result<MinFree, String> {
    let value = value.trim();
    let expected = || format!("expected a share such as 5% or a size such as 2GiB, got '{value}'");
    match value.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().ok().filter(|p| (0.0..=100.0).contains(p)).map(MinFree::Percent).ok_or_else(expected),
        None => ByteSize::parse(value).map(|b| MinFree::Bytes(b.0)).map_err(|_| expected()),
    }
}

/// `PIPES_IMAGE_KEEP`: a duration from a second to a year.
pub(super) fn parse_image_keep(value: &str) -> Result<Duration, String> {
    Span::parse(value)
        .and_then(|s| s.within(Duration::from_secs(1), crate::config::MAX_EXPIRY))
        .map(|s| s.0)
        .map_err(|_| format!("expected a duration from 1s to 366d such as 24h, got '{value}'"))
}

/// A share such as `85%`.
pub(super) fn parse_share(value: &str) -> Result<f64, String> {
    value
        .trim()
        .strip_suffix('%')
        .and_then(|p| p.trim().parse::<f64>().ok())
        .filter(|p| (0.0..=100.0).contains(p))
        .ok_or_else(|| format!("expected a share such as 85%, got '{value}'"))
}

//! Settings: parsed and validated once at start-up into [`Settings`].
//!
//! Each setting is declared once, as a field of `Cli` (`cli.rs`) with its
//! flag, its environment variable, its default and its parser (`parse.rs`).
//! A flag wins over the variable, which wins over `NAME_FILE` (a file holding
//! the value, as Docker secrets are), which wins over the default; an empty
//! variable counts as unset (`sources.rs`). Values that depend on each other
//! are checked as they are assembled (`validate.rs`). A bad value stops
//! start-up with one line naming the variable and what it expects. Nothing
//! else in Pipes reads the environment.
mod cli;
mod parse;
mod sources;
#[cfg(test)]
mod tests;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::auth::ApiAuth;
use crate::config::{ByteSize, Defaults};
use crate::engine::docker::DockerOptions;
use crate::forwarded::Trusted;
use crate::policy::Policy;
use crate::route::Hosts;

pub use sources::Sources;

/// `PIPES_ACCESS_LOG`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLog {
    Off,
    /// One JSON object per request, a line each, on standard output.
    Json,
}

/// HTTPS: where, and with which certificates.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// `PIPES_TLS_LISTEN`.
    pub listen: Vec<SocketAddr>,
    /// `PIPES_TLS_CERT` and `PIPES_TLS_KEY`.
    pub static_cert: Option<(PathBuf, PathBuf)>,
    /// On-demand certificates, when `PIPES_ACME_DIRECTORY` is set.
    pub acme: Option<AcmeSettings>,
}

/// `PIPES_ACME_*`.
#[derive(Debug, Clone)]
pub struct AcmeSettings {
    pub directory: String,
    pub email: Option<String>,
    /// A CA bundle to trust for the ACME server's HTTPS.
    pub ca: Option<PathBuf>,
    pub max_per_hour: usize,
}

/// `PIPES_METRICS_*`.
#[derive(Debug, Clone)]
pub struct MetricsSettings {
    pub listen: Vec<SocketAddr>,
    pub max_deployments: usize,
}

/// Every setting of Pipes, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: Vec<SocketAddr>,
    /// How Hosts name deployments: the domain and the style.
    pub hosts: Hosts,
    /// Registry prefix, without scheme or trailing slash; `None` is Docker Hub.
    pub registry: Option<String>,
    pub config_dir: PathBuf,
    pub policy: Policy,
    pub api_auth: ApiAuth,
    pub max_containers: usize,
    /// `PIPES_MAX_PAUSED`.
    pub max_paused: usize,
    /// Lowest layer of every deployment's config.
    pub defaults: Defaults,
    pub failure_ttl: Duration,
    /// `PIPES_DRAIN_TIMEOUT`.
    pub drain_timeout: Duration,
    /// What every client connection is held to.
    pub connections: ConnectionLimits,
    /// `PIPES_KEEPALIVE_TIMEOUT`.
    pub keepalive_timeout: Duration,
    /// `PIPES_PULL_TIMEOUT`.
    pub pull_timeout: Duration,
    /// `PIPES_MAX_STARTS_PER_CLIENT`.
    pub max_starts_per_client: usize,
    /// `PIPES_MAX_NOT_RUNNING`.
    pub max_not_running: usize,
    /// `PIPES_MAX_STREAMS_PER_CLIENT`.
    pub max_streams_per_client: usize,
    /// `PIPES_PUBLIC_LOGS`: crash log lines for anonymous clients too.
    pub public_logs: bool,
    /// `PIPES_UNDERSCORE_HEADERS`: header names with `_` reach containers.
    pub underscore_headers: bool,
    /// What no deployment's config may exceed.
    pub ceilings: Ceilings,
    /// `PIPES_TRUSTED_PROXIES`.
    pub trusted_proxies: Trusted,
    /// How access is checked, besides each deployment's rules.
    pub access: AccessSettings,
    /// Signed webhooks, if `PIPES_WEBHOOK_URL` is set.
    pub webhooks: Option<WebhookSettings>,
    /// `PIPES_DISK_MIN_FREE`: below it, nothing is pulled.
    pub disk_min_free: MinFree,
    /// `PIPES_IMAGE_KEEP`: how long a pulled image may go unused.
    pub image_keep: Duration,
    /// `PIPES_DISK_HIGH`, in percent: above it, unused images go at once.
    pub disk_high: f64,
    /// `PIPES_BACKEND`.
    pub backend: BackendKind,
    /// The engine's settings, for either backend.
    pub docker: DockerOptions,
    /// HTTPS, if `PIPES_TLS_LISTEN` is set.
    pub tls: Option<TlsSettings>,
    /// `PIPES_HTTPS_REDIRECT`: the port plain-HTTP requests are sent to.
    pub https_redirect: Option<u16>,
    /// Prometheus metrics, if `PIPES_METRICS_LISTEN` is set.
    pub metrics: Option<MetricsSettings>,
    pub access_log: AccessLog,
    /// `PIPES_WAITING_PAGE_AFTER`: `None` never shows the waiting page.
    pub waiting_page_after: Option<Duration>,
    pub server_conf: Option<PathBuf>,
    pub upgrade: bool,
    pub test: bool,
}

/// `PIPES_FORWARD_AUTH_*` (`PIPES_ACCESS` and `PIPES_NOINDEX` are in
/// [`Defaults`], the lowest config layer).
#[derive(Debug, Clone)]
pub struct AccessSettings {
    /// `PIPES_FORWARD_AUTH_TIMEOUT`.
    pub forward_auth_timeout: Duration,
    /// `PIPES_FORWARD_AUTH_URLS`: what deployments' configs may ask.
    pub forward_auth_urls: Vec<String>,
}

/// Free space a file system must keep: a share of its size, or bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MinFree {
    Percent(f64),
    Bytes(u64),
}

impl MinFree {
    /// Whether `free` bytes of a file system of `total` are less than this.
    pub fn short(self, free: u64, total: u64) -> bool {
        match self {
            MinFree::Percent(p) => (free as f64) < total as f64 * p / 100.0,
            MinFree::Bytes(b) => free < b,
        }
    }
}

impl fmt::Display for MinFree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MinFree::Percent(p) => write!(f, "{p}%"),
            MinFree::Bytes(b) => ByteSize(*b).fmt(f),
        }
    }
}

/// `PIPES_WEBHOOK_*`.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    pub urls: Vec<String>,
    /// The HMAC-SHA256 key of `X-Pipes-Signature`.
    pub secret: crate::secret::Secret,
    /// How deployments' public URLs begin: `https` and the HTTPS port where
    /// TLS is on, else `http` and the first listening port.
    pub scheme: &'static str,
    pub port: u16,
}

/// What no deployment's config may exceed, whoever writes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Ceilings {
    /// `PIPES_MAX_MEMORY`.
    pub memory: ByteSize,
    /// `PIPES_MAX_CPUS`.
    pub cpus: f64,
    /// `PIPES_MAX_PIDS`.
    pub pids: u32,
    /// `PIPES_ALLOWED_CAPABILITIES`: what a config may add to the base set.
    pub capabilities: Vec<String>,
}

/// Capability names.
#[derive(Debug, Clone)]
pub(super) struct Capabilities(pub(super) Vec<String>);

/// The limits every client connection is held to.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// `PIPES_MAX_CONNECTIONS`.
    pub max_connections: usize,
    /// `PIPES_HEADER_TIMEOUT`: from accept to a complete first head.
    pub header_timeout: Duration,
    /// `PIPES_MAX_HEADER_SIZE`.
    pub max_header_size: usize,
}

/// A setting that could not be used: the one line printed before exiting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingError {
    /// The variable (or, for a malformed command line, `pipes`).
    pub name: String,
    pub message: String,
}

impl fmt::Display for SettingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.name, self.message)
    }
}

impl std::error::Error for SettingError {}

pub(super) fn err(name: &str, message: impl Into<String>) -> SettingError {
    SettingError { name: name.to_owned(), message: message.into() }
}

/// What loading the settings ended in, besides settings.
#[derive(Debug)]
pub enum LoadError {
    /// A setting is wrong: print the line, exit 2.
    Setting(SettingError),
    /// `--help` or `--version`: print the text, exit 0.
    Info(String),
}

/// Where deployments run (`PIPES_BACKEND`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// Containers of the local engine, configs in the config dir.
    Docker,
    /// Services of the engine's swarm, configs in Swarm configs: several Pipes may serve them.
    Swarm,
}

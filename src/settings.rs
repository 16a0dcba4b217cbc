//! Settings: parsed and validated once at start-up into [`Settings`].
//!
//! Each setting is declared once, as a field of [`Cli`] with its flag, its
//! environment variable, its default and its parser. A flag wins over the
//! variable, which wins over `NAME_FILE` (a file holding the value, as Docker
//! secrets are), which wins over the default; an empty variable counts as
//! unset. A bad value stops start-up with one line naming the variable and
//! what it expects. Nothing else in Pipes reads the environment.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{ArgAction, CommandFactory, FromArgMatches, Parser};

use crate::auth::{ApiAuth, MIN_TOKEN_LEN};
use crate::config::{check_capability, check_cpus, check_memory, ByteSize, Defaults, IdleAction, Span, Watch, DEFAULT_PIDS, MIN_WATCH};
use crate::engine::docker::DockerOptions;
use crate::engine::{RegistryAuth, RESERVED_LABELS};
use crate::forwarded::Trusted;
use crate::policy::Policy;
use crate::route::{Domain, HostStyle, Hosts};
use crate::secret::Secret;

/// Longest duration a timeout setting may have.
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// The open-files limit assumed when the process's cannot be read.
const DEFAULT_OPEN_FILES: u64 = 1024;
/// Descriptors kept out of `PIPES_MAX_CONNECTIONS`' default.
const RESERVED_FILES: u64 = 64;

/// The command line, which declares every setting.
#[derive(Parser, Debug)]
#[command(
    name = "pipes",
    version,
    about = "Docker auto-deployment edge proxy: {tag}.{repo}.{user}.<domain> serves image user/repo:tag, started on first request.",
    after_help = "Every setting is also read from its environment variable, or from the file named by NAME_FILE \
                  (e.g. DOCKER_AUTH_PASSWORD_FILE=/run/secrets/registry). Flags win over the environment."
)]
struct Cli {
    /// Addresses to listen on, comma-separated
    #[arg(long, env = "PIPES_LISTEN", value_name = "ADDR", default_value = "0.0.0.0:8080", value_parser = parse_listen)]
    listen: Addrs,
    /// Exact domain served, e.g. pipe.example.com; overrides DOMAINLEVELS
    #[arg(long, env = "PIPES_DOMAIN", value_name = "DOMAIN", value_parser = parse_domain)]
    domain: Option<String>,
    /// Number of labels in the domain: 2 for example.com, 3 for pipe.example.com [default: 2]
    #[arg(long, env = "DOMAINLEVELS", value_name = "N", value_parser = parse_levels)]
    domain_levels: Option<usize>,
    /// Registry prefixed to every image, e.g. registry.example.com or 127.0.0.1:5000 [default: Docker Hub]
    #[arg(long, env = "PIPES_REGISTRY", value_name = "HOST[:PORT][/PATH]", value_parser = parse_registry)]
    registry: Option<String>,
    /// Docker network shared by Pipes and its containers; containers are reached by their IP on it
    #[arg(long, env = "PIPES_NETWORK", value_name = "NAME", value_parser = parse_network)]
    network: Option<String>,
    /// Publish container ports on 127.0.0.1 and reach containers there, even where their IPs answer: true or false
    #[arg(long, env = "PIPES_PUBLISH_PORTS", value_name = "BOOL", default_value = "false", value_parser = parse_bool, action = ArgAction::Set)]
    publish_ports: bool,
    /// Where deployments run: docker (containers of this engine) or swarm (services of its swarm; needs PIPES_NETWORK)
    #[arg(long, env = "PIPES_BACKEND", value_name = "BACKEND", default_value = "docker", value_parser = parse_backend)]
    backend: BackendKind,
    /// Directory for deployment configs
    #[arg(long, env = "PIPES_CONFIG_DIR", value_name = "DIR", default_value = "configs")]
    config_dir: PathBuf,
    /// Deployments that may be started, comma-separated: *, user/*, user/repo, user/repo:tag [default: none]
    #[arg(long, env = "PIPES_ALLOW", value_name = "PATTERNS", value_parser = Policy::parse)]
    allow: Option<Policy>,
    /// Bearer token for the management API; prefer PIPES_API_TOKEN_FILE
    #[arg(long, env = "PIPES_API_TOKEN", value_name = "TOKEN", value_parser = parse_token)]
    api_token: Option<Secret>,
    /// API protection: token (bearer tokens) or none (trusted networks only)
    #[arg(long, env = "PIPES_API_AUTH", value_name = "MODE", default_value = "token", value_parser = parse_api_auth)]
    api_auth: AuthMode,
    /// Most containers running at once; more cold starts get 503
    #[arg(long, env = "PIPES_MAX_CONTAINERS", value_name = "N", default_value = "50", value_parser = parse_count)]
    max_containers: usize,
    /// Most image pulls at once
    #[arg(long, env = "PIPES_MAX_PULLS", value_name = "N", default_value = "2", value_parser = parse_count)]
    max_pulls: usize,
    /// Memory limit of containers whose config sets none, e.g. 512m
    #[arg(long, env = "PIPES_DEFAULT_MEMORY", value_name = "SIZE", default_value = "512m", value_parser = parse_memory)]
    default_memory: ByteSize,
    /// CPU limit (cores) of containers whose config sets none
    #[arg(long, env = "PIPES_DEFAULT_CPUS", value_name = "CPUS", default_value = "1", value_parser = parse_cpus)]
    default_cpus: f64,
    /// Docker engine: unix:///path or tcp://host:port
    #[arg(long, env = "DOCKER_HOST", value_name = "URL", default_value = "unix:///var/run/docker.sock", value_parser = parse_docker_host)]
    docker_host: String,
    /// Send registry credentials when pulling: true or false
    #[arg(long, env = "DOCKER_AUTH", value_name = "BOOL", default_value = "false", value_parser = parse_bool, action = ArgAction::Set)]
    docker_auth: bool,
    /// Registry user name
    #[arg(long, env = "DOCKER_AUTH_USERNAME", value_name = "USER")]
    docker_auth_username: Option<String>,
    /// Registry e-mail
    #[arg(long, env = "DOCKER_AUTH_EMAIL", value_name = "EMAIL")]
    docker_auth_email: Option<String>,
    /// Registry password; prefer DOCKER_AUTH_PASSWORD_FILE
    #[arg(long, env = "DOCKER_AUTH_PASSWORD", value_name = "PASSWORD", value_parser = parse_secret)]
    docker_auth_password: Option<Secret>,
    /// Name of this Pipes; containers carry it, so several can share an engine
    #[arg(long, env = "PIPES_INSTANCE", value_name = "NAME", default_value = "pipes", value_parser = parse_instance)]
    instance: String,
    /// Extra labels for created containers, comma-separated key=value
    #[arg(long, env = "PIPES_LABELS", value_name = "K=V,...", value_parser = parse_labels)]
    labels: Option<Labels>,
    /// How long a starting container may take to answer, e.g. 60s, 500ms
    #[arg(long, env = "PIPES_START_TIMEOUT", value_name = "DURATION", default_value = "60s", value_parser = parse_timeout)]
    start_timeout: Duration,
    /// How long a failed start is remembered before it is tried again
    #[arg(long, env = "PIPES_FAILURE_TTL", value_name = "DURATION", default_value = "10s", value_parser = parse_timeout)]
    failure_ttl: Duration,
    /// How often running deployments ask the registry whether their tag moved (off, or e.g. 5m); their config's `watch` wins
    #[arg(long, env = "PIPES_WATCH", value_name = "DURATION|off", default_value = "off", value_parser = parse_watch)]
    watch: Watch,
    /// What an idle container becomes, unless its config says: stop or pause
    #[arg(long, env = "PIPES_IDLE_ACTION", value_name = "ACTION", default_value = "stop", value_parser = IdleAction::parse)]
    idle_action: IdleAction,
    /// How long a container stays paused before it is stopped, unless its config says
    #[arg(long, env = "PIPES_PAUSE_TIMEOUT", value_name = "DURATION", default_value = "1h", value_parser = parse_timeout)]
    pause_timeout: Duration,
    /// Most containers paused at once; past it the longest-paused is stopped [default: PIPES_MAX_CONTAINERS]
    #[arg(long, env = "PIPES_MAX_PAUSED", value_name = "N", value_parser = parse_count)]
    max_paused: Option<usize>,
    /// How long requests and connections in flight may finish when a container is replaced or Pipes stops
    #[arg(long, env = "PIPES_DRAIN_TIMEOUT", value_name = "DURATION", default_value = "30s", value_parser = parse_timeout)]
    drain_timeout: Duration,
    /// How long a new connection may take to send its first request head (or HTTP/2 preface)
    #[arg(long, env = "PIPES_HEADER_TIMEOUT", value_name = "DURATION", default_value = "10s", value_parser = parse_timeout)]
    header_timeout: Duration,
    /// Largest request head accepted, e.g. 64k
    #[arg(long, env = "PIPES_MAX_HEADER_SIZE", value_name = "SIZE", default_value = "64k", value_parser = parse_header_size)]
    max_header_size: ByteSize,
    /// How long a kept-alive connection may stay idle between requests (HTTP/1 and HTTP/2)
    #[arg(long, env = "PIPES_KEEPALIVE_TIMEOUT", value_name = "DURATION", default_value = "60s", value_parser = parse_timeout)]
    keepalive_timeout: Duration,
    /// Most client connections open at once; more are answered 503 and closed [default: a quarter of the open-files limit]
    #[arg(long, env = "PIPES_MAX_CONNECTIONS", value_name = "N", value_parser = parse_count)]
    max_connections: Option<usize>,
    /// How long a pull may take before the start fails (504)
    #[arg(long, env = "PIPES_PULL_TIMEOUT", value_name = "DURATION", default_value = "10m", value_parser = parse_timeout)]
    pull_timeout: Duration,
    /// Most cold starts one client address may have under way; more get 503
    #[arg(long, env = "PIPES_MAX_STARTS_PER_CLIENT", value_name = "N", default_value = "8", value_parser = parse_count)]
    max_starts_per_client: usize,
    /// Most deployments kept in the table that do not run (starting, stopped, failed); requests for more names get 503
    #[arg(long, env = "PIPES_MAX_NOT_RUNNING", value_name = "N", default_value = "1000", value_parser = parse_count)]
    max_not_running: usize,
    /// Highest memory limit any config may set, e.g. 4g [default: the host's memory]
    #[arg(long, env = "PIPES_MAX_MEMORY", value_name = "SIZE", value_parser = parse_memory)]
    max_memory: Option<ByteSize>,
    /// Most processes any config may let a container run
    #[arg(long, env = "PIPES_MAX_PIDS", value_name = "N", default_value = "4096", value_parser = parse_count)]
    max_pids: usize,
    /// Linux capabilities configs may add to the base set, comma-separated (e.g. NET_RAW) [default: none]
    #[arg(long, env = "PIPES_ALLOWED_CAPABILITIES", value_name = "CAPS", value_parser = parse_capabilities)]
    allowed_capabilities: Option<Capabilities>,
    /// Proxies in front of Pipes whose X-Forwarded-* headers are believed, comma-separated addresses or networks
    #[arg(long, env = "PIPES_TRUSTED_PROXIES", value_name = "ADDRS", value_parser = Trusted::parse)]
    trusted_proxies: Option<Trusted>,
    /// Highest CPU limit (cores) any config may set [default: the host's CPUs]
    #[arg(long, env = "PIPES_MAX_CPUS", value_name = "CPUS", value_parser = parse_cpus)]
    max_cpus: Option<f64>,
    /// Addresses to serve HTTPS on, comma-separated, e.g. 0.0.0.0:8443 [default: none]
    #[arg(long, env = "PIPES_TLS_LISTEN", value_name = "ADDR", value_parser = parse_listen)]
    tls_listen: Option<Addrs>,
    /// Certificate chain (PEM) served over HTTPS to names it covers, e.g. a wildcard for the domain
    #[arg(long, env = "PIPES_TLS_CERT", value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of PIPES_TLS_CERT
    #[arg(long, env = "PIPES_TLS_KEY", value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// ACME v2 directory URL: obtain certificates on demand for names no certificate covers
    #[arg(long, env = "PIPES_ACME_DIRECTORY", value_name = "URL", value_parser = parse_https_url)]
    acme_directory: Option<String>,
    /// Contact e-mail of the ACME account
    #[arg(long, env = "PIPES_ACME_EMAIL", value_name = "EMAIL", value_parser = parse_email)]
    acme_email: Option<String>,
    /// CA bundle (PEM) to trust for the ACME server's own HTTPS [default: the public roots]
    #[arg(long, env = "PIPES_ACME_CA", value_name = "FILE")]
    acme_ca: Option<PathBuf>,
    /// Most certificates obtained per hour
    #[arg(long, env = "PIPES_ACME_MAX_PER_HOUR", value_name = "N", default_value = "20", value_parser = parse_count)]
    acme_max_per_hour: usize,
    /// Answer plain-HTTP requests with 308 to the same URL on https: true or false
    #[arg(long, env = "PIPES_HTTPS_REDIRECT", value_name = "BOOL", default_value = "false", value_parser = parse_bool, action = ArgAction::Set)]
    https_redirect: bool,
    /// Port clients reach HTTPS on, for redirects [default: the port of PIPES_TLS_LISTEN, else 443]
    #[arg(long, env = "PIPES_HTTPS_PORT", value_name = "PORT", value_parser = parse_port)]
    https_port: Option<u16>,
    /// Host names: dotted ({tag}.{repo}.{user}.<domain>) or flat ({tag}--{repo}--{user}.<domain>)
    #[arg(long, env = "PIPES_HOST_STYLE", value_name = "STYLE", default_value = "dotted", value_parser = parse_host_style)]
    host_style: HostStyle,
    /// Address to serve Prometheus metrics on at /metrics, e.g. 127.0.0.1:9100 [default: off]
    #[arg(long, env = "PIPES_METRICS_LISTEN", value_name = "ADDR", value_parser = parse_listen)]
    metrics_listen: Option<Addrs>,
    /// Most deployments with their own metric labels; the rest count as deployment="other"
    #[arg(long, env = "PIPES_METRICS_MAX_DEPLOYMENTS", value_name = "N", default_value = "500", value_parser = parse_count)]
    metrics_max_deployments: usize,
    /// Access log on standard output: off or json
    #[arg(long, env = "PIPES_ACCESS_LOG", value_name = "FORMAT", default_value = "off", value_parser = parse_access_log)]
    access_log: AccessLog,
    /// How long a browser's navigation to a starting deployment waits before it is shown the waiting page (off: never)
    #[arg(long, env = "PIPES_WAITING_PAGE_AFTER", value_name = "DURATION|off", default_value = "1s", value_parser = parse_waiting_page)]
    waiting_page_after: WaitingPage,
    /// Pingora server configuration (YAML): threads, grace periods, upgrades
    #[arg(short = 'c', long = "conf", env = "PIPES_SERVER_CONF", value_name = "FILE")]
    server_conf: Option<PathBuf>,
    /// Take over the listening sockets of a running Pipes (zero-downtime upgrade)
    #[arg(short = 'u', long)]
    upgrade: bool,
    /// Check the settings and the server configuration, then exit
    #[arg(short = 't', long)]
    test: bool,
}

/// `PIPES_API_AUTH`.
#[derive(Debug, Clone, Copy)]
enum AuthMode {
    Token,
    None,
}

/// Listening addresses.
#[derive(Debug, Clone)]
struct Addrs(Vec<SocketAddr>);

/// `key=value` labels.
#[derive(Debug, Clone)]
struct Labels(Vec<(String, String)>);

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
    /// What no deployment's config may exceed.
    pub ceilings: Ceilings,
    /// `PIPES_TRUSTED_PROXIES`.
    pub trusted_proxies: Trusted,
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
struct Capabilities(Vec<String>);

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

fn err(name: &str, message: impl Into<String>) -> SettingError {
    SettingError { name: name.to_owned(), message: message.into() }
}

/// Where settings come from besides flags: the environment and the machine.
#[derive(Debug)]
pub struct Sources {
    pub env: HashMap<String, String>,
    /// This machine's host name: a container's id when Pipes runs in one.
    pub hostname: Option<String>,
    /// Whether `/.dockerenv` exists.
    pub in_container: bool,
    /// The soft limit on open files.
    pub open_files: Option<u64>,
    /// The host's memory in bytes.
    pub memory: Option<u64>,
    /// The host's CPUs.
    pub cpus: usize,
}

impl Default for Sources {
    /// No environment, and a machine of 8 GiB and 2 CPUs.
    fn default() -> Self {
        Sources { env: HashMap::new(), hostname: None, in_container: false, open_files: None, memory: Some(8 << 30), cpus: 2 }
    }
}

impl Sources {
    /// The process environment, host name, and whether `/.dockerenv` exists.
    pub fn from_process() -> Self {
        Sources {
            env: std::env::vars().collect(),
            hostname: std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_owned()).filter(|h| !h.is_empty()),
            in_container: std::path::Path::new("/.dockerenv").exists(),
            open_files: std::fs::read_to_string("/proc/self/limits").ok().and_then(|limits| {
                let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
                line.split_whitespace().nth(3)?.parse().ok()
            }),
            memory: std::fs::read_to_string("/proc/meminfo").ok().and_then(|info| {
                let kib: u64 = info.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.split_whitespace().next()?.parse().ok()?;
                kib.checked_mul(1024)
            }),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }

    /// `NAME`, else the contents of the file `NAME_FILE` names (trailing
    /// newline dropped); empty counts as unset.
    fn value(&self, name: &str) -> Result<Option<String>, SettingError> {
        let file_var = format!("{name}_FILE");
        let set = |n: &str| self.env.get(n).filter(|v| !v.trim().is_empty());
        match (set(name), set(&file_var)) {
            (Some(_), Some(_)) => Err(err(name, format!("set either {name} or {file_var}, not both"))),
            (Some(value), None) => Ok(Some(value.clone())),
            (None, Some(path)) => match std::fs::read_to_string(path) {
                Ok(text) => Ok(Some(text.trim_end_matches(['\n', '\r']).to_owned()).filter(|v| !v.trim().is_empty())),
                Err(e) => Err(err(name, format!("{file_var}={path} cannot be read: {e}"))),
            },
            (None, None) => Ok(None),
        }
    }
}

/// What loading the settings ended in, besides settings.
#[derive(Debug)]
pub enum LoadError {
    /// A setting is wrong: print the line, exit 2.
    Setting(SettingError),
    /// `--help` or `--version`: print the text, exit 0.
    Info(String),
}

impl Settings {
    /// Parses the flags and environment of this process.
    pub fn load() -> Result<Settings, LoadError> {
        Settings::from_sources(std::env::args_os(), &Sources::from_process())
    }

    /// Validates flags over environment over defaults.
    pub fn from_sources<I, T>(args: I, src: &Sources) -> Result<Settings, LoadError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let mut first_error = None;
        // The environment reaches clap as defaults from `src` (with the _FILE
        // layer), never from the process, so tests and `_FILE` behave alike.
        let cmd = Cli::command().mut_args(|arg| {
            let Some(name) = arg.get_env().and_then(|e| e.to_str()).map(str::to_owned) else { return arg };
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            let arg = arg.env(None).help(format!("{help} [env: {name}]"));
            match src.value(&name) {
                Ok(Some(value)) => arg.default_value(value).hide_default_value(true),
                Ok(None) => arg,
                Err(e) => {
                    first_error.get_or_insert(e);
                    arg
                }
            }
        });
        if let Some(e) = first_error {
            return Err(LoadError::Setting(e));
        }
        let matches = cmd.try_get_matches_from(args).map_err(clap_error)?;
        let cli = Cli::from_arg_matches(&matches).map_err(clap_error)?;
        Settings::validate(cli, src).map_err(LoadError::Setting)
    }

    /// Checks what involves several settings, and assembles them.
    fn validate(cli: Cli, src: &Sources) -> Result<Settings, SettingError> {
        let domain = match (cli.domain, cli.domain_levels) {
            (Some(d), levels) => {
                let count = d.split('.').count();
                if let Some(n) = levels.filter(|n| *n != count) {
                    return Err(err("DOMAINLEVELS", format!("is {n} but PIPES_DOMAIN '{d}' has {count} labels; set only one of them")));
                }
                Domain::Suffix(d)
            }
            (None, levels) => Domain::Levels(levels.unwrap_or(2)),
        };
        if cli.publish_ports && cli.network.is_some() {
            return Err(err("PIPES_PUBLISH_PORTS", "cannot be true with PIPES_NETWORK: containers on that network are reached at their IP"));
        }
        if cli.backend == BackendKind::Swarm && cli.network.is_none() {
            return Err(err("PIPES_NETWORK", "is required when PIPES_BACKEND=swarm: name the attachable overlay network Pipes and its services share"));
        }
        let api_auth = match cli.api_auth {
            AuthMode::Token => ApiAuth::Tokens { admin: cli.api_token },
            AuthMode::None => ApiAuth::Off,
        };
        let auth = if cli.docker_auth {
            Some(RegistryAuth {
                username: cli.docker_auth_username.ok_or_else(|| err("DOCKER_AUTH_USERNAME", "is required when DOCKER_AUTH=true"))?,
                email: cli.docker_auth_email,
                password: cli.docker_auth_password.ok_or_else(|| err("DOCKER_AUTH_PASSWORD", "is required when DOCKER_AUTH=true"))?,
            })
        } else {
            None
        };
        let ceilings = Ceilings {
            memory: cli.max_memory.or(src.memory.map(ByteSize)).unwrap_or(ByteSize(u64::MAX)),
            cpus: cli.max_cpus.unwrap_or(src.cpus as f64),
            pids: u32::try_from(cli.max_pids).unwrap_or(u32::MAX),
            capabilities: cli.allowed_capabilities.map(|c| c.0).unwrap_or_default(),
        };
        if ceilings.pids < DEFAULT_PIDS {
            return Err(err("PIPES_MAX_PIDS", format!("is {} but containers get {DEFAULT_PIDS} by default; give at least that", ceilings.pids)));
        }
        if cli.default_memory > ceilings.memory {
            return Err(err(
                "PIPES_DEFAULT_MEMORY",
                format!("is {} but PIPES_MAX_MEMORY is {}; the default must fit under the ceiling", cli.default_memory, ceilings.memory),
            ));
        }
        if cli.default_cpus > ceilings.cpus {
            return Err(err(
                "PIPES_DEFAULT_CPUS",
                format!("is {} but PIPES_MAX_CPUS is {}; the default must fit under the ceiling", cli.default_cpus, ceilings.cpus),
            ));
        }
        let static_cert = match (cli.tls_cert, cli.tls_key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            (Some(_), None) => return Err(err("PIPES_TLS_KEY", "is required with PIPES_TLS_CERT")),
            (None, Some(_)) => return Err(err("PIPES_TLS_CERT", "is required with PIPES_TLS_KEY")),
        };
        let acme = cli.acme_directory.map(|directory| AcmeSettings { directory, email: cli.acme_email, ca: cli.acme_ca, max_per_hour: cli.acme_max_per_hour });
        if acme.is_some() && !matches!(domain, Domain::Suffix(_)) {
            // Under DOMAINLEVELS, names under any domain route, and a
            // scanner could have orders placed for domains not the operator's.
            return Err(err("PIPES_ACME_DIRECTORY", "needs PIPES_DOMAIN: certificates are obtained only for names under the operator's domain"));
        }
        let tls = match cli.tls_listen {
            Some(_) if static_cert.is_none() && acme.is_none() => {
                return Err(err("PIPES_TLS_LISTEN", "needs certificates: PIPES_TLS_CERT and PIPES_TLS_KEY, or PIPES_ACME_DIRECTORY"));
            }
            Some(listen) => Some(TlsSettings { listen: listen.0, static_cert, acme }),
            None if acme.is_some() => return Err(err("PIPES_ACME_DIRECTORY", "is set but PIPES_TLS_LISTEN is not; certificates need an HTTPS listener")),
            None if static_cert.is_some() => return Err(err("PIPES_TLS_CERT", "is set but PIPES_TLS_LISTEN is not; say where to serve HTTPS")),
            None => None,
        };
        let https_port = cli.https_port.or_else(|| tls.as_ref().and_then(|t| t.listen.first()).map(SocketAddr::port)).unwrap_or(443);
        let registry_host = match &cli.registry {
            Some(r) => r.split('/').next().unwrap_or(r).to_owned(),
            None => "docker.io".to_owned(),
        };
        Ok(Settings {
            listen: cli.listen.0,
            hosts: Hosts { domain, style: cli.host_style },
            registry: cli.registry,
            config_dir: cli.config_dir,
            policy: cli.allow.unwrap_or_default(),
            api_auth,
            max_containers: cli.max_containers,
            defaults: Defaults {
                memory: cli.default_memory,
                cpus: cli.default_cpus,
                health_timeout: cli.start_timeout,
                watch: cli.watch.interval(),
                idle_action: cli.idle_action,
                pause_timeout: cli.pause_timeout,
            },
            max_paused: cli.max_paused.unwrap_or(cli.max_containers),
            failure_ttl: cli.failure_ttl,
            drain_timeout: cli.drain_timeout,
            connections: ConnectionLimits {
                // Each client connection may hold an upstream one too, and
                // connections past the cap hold one until they are refused;
                // some descriptors stay for the engine, the listeners and logs.
                max_connections: cli.max_connections.unwrap_or_else(|| {
                    let files = src.open_files.unwrap_or(DEFAULT_OPEN_FILES);
                    usize::try_from(files.saturating_sub(RESERVED_FILES) / 4).unwrap_or(usize::MAX).clamp(16, 100_000)
                }),
                header_timeout: cli.header_timeout,
                max_header_size: usize::try_from(cli.max_header_size.0).unwrap_or(usize::MAX),
            },
            keepalive_timeout: cli.keepalive_timeout,
            pull_timeout: cli.pull_timeout,
            max_starts_per_client: cli.max_starts_per_client,
            max_not_running: cli.max_not_running,
            ceilings,
            trusted_proxies: cli.trusted_proxies.unwrap_or_default(),
            backend: cli.backend,
            docker: DockerOptions {
                host: cli.docker_host,
                instance: cli.instance,
                labels: cli.labels.map(|l| l.0).unwrap_or_default(),
                registry_host,
                auth,
                max_pulls: cli.max_pulls,
                network: cli.network,
                publish_ports: cli.publish_ports,
                hostname: src.hostname.clone(),
                in_container: src.in_container,
            },
            tls,
            https_redirect: cli.https_redirect.then_some(https_port),
            metrics: cli.metrics_listen.map(|l| MetricsSettings { listen: l.0, max_deployments: cli.metrics_max_deployments }),
            access_log: cli.access_log,
            waiting_page_after: cli.waiting_page_after.0,
            server_conf: cli.server_conf,
            upgrade: cli.upgrade,
            test: cli.test,
        })
    }
}

/// Where deployments run (`PIPES_BACKEND`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// Containers of the local engine, configs in the config dir.
    Docker,
    /// Services of the engine's swarm, configs in Swarm configs: several Pipes may serve them.
    Swarm,
}

fn parse_backend(value: &str) -> Result<BackendKind, String> {
    match value {
        "docker" => Ok(BackendKind::Docker),
        "swarm" => Ok(BackendKind::Swarm),
        _ => Err(format!("expected docker or swarm, got '{value}'")),
    }
}

/// One line naming the variable, from clap's error.
fn clap_error(e: clap::Error) -> LoadError {
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        return LoadError::Info(e.render().to_string());
    }
    let arg = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        _ => None,
    };
    // "--listen <ADDR>" names the argument whose variable is PIPES_LISTEN.
    let variable = arg.as_deref().and_then(|display| {
        let flag = display.trim_start_matches('-').split([' ', '=']).next().unwrap_or("");
        Cli::command()
            .get_arguments()
            .find(|a| a.get_long() == Some(flag) || a.get_short().is_some_and(|s| s.to_string() == flag))
            .and_then(|a| a.get_env())
            .and_then(|e| e.to_str())
            .map(str::to_owned)
    });
    let message = match std::error::Error::source(&e) {
        Some(source) => source.to_string(),
        None => e.render().to_string().lines().next().unwrap_or("").trim_start_matches("error: ").to_owned(),
    };
    LoadError::Setting(err(variable.as_deref().or(arg.as_deref()).unwrap_or("pipes"), message))
}

fn parse_listen(value: &str) -> Result<Addrs, String> {
    let addrs: Result<Vec<SocketAddr>, _> = value.split(',').map(str::trim).filter(|a| !a.is_empty()).map(|a| a.parse::<SocketAddr>().map_err(|_| a)).collect();
    match addrs {
        Ok(a) if !a.is_empty() => Ok(Addrs(a)),
        Ok(_) => Err("expected at least one address:port, e.g. 0.0.0.0:8080".into()),
        Err(bad) => Err(format!("expected address:port such as 0.0.0.0:8080 or [::]:8080, got '{bad}'")),
    }
}

fn parse_port(value: &str) -> Result<u16, String> {
    value.trim().parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| format!("expected a port from 1 to 65535, got '{value}'"))
}

fn parse_https_url(value: &str) -> Result<String, String> {
    let url = value.trim();
    let rest = url.strip_prefix("https://").ok_or_else(|| format!("expected an https:// URL (ACME servers speak HTTPS), got '{value}'"))?;
    if rest.is_empty() || rest.starts_with('/') || url.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
        return Err(format!("expected an https:// URL with a host, got '{value}'"));
    }
    Ok(url.to_owned())
}

fn parse_email(value: &str) -> Result<String, String> {
    let e = value.trim();
    match e.split_once('@') {
        Some((user, host)) if !user.is_empty() && host.contains('.') && !e.bytes().any(|b| b.is_ascii_whitespace() || b == b',') => Ok(e.to_owned()),
        _ => Err(format!("expected an e-mail address, got '{value}'")),
    }
}

fn parse_host_style(value: &str) -> Result<HostStyle, String> {
    match value.trim() {
        "dotted" => Ok(HostStyle::Dotted),
        "flat" => Ok(HostStyle::Flat),
        other => Err(format!("expected dotted or flat, got '{other}'")),
    }
}

fn parse_access_log(value: &str) -> Result<AccessLog, String> {
    match value.trim() {
        "off" => Ok(AccessLog::Off),
        "json" => Ok(AccessLog::Json),
        other => Err(format!("expected off or json, got '{other}'")),
    }
}

fn parse_levels(value: &str) -> Result<usize, String> {
    value.trim().parse::<usize>().ok().filter(|n| (1..=16).contains(n)).ok_or_else(|| format!("expected a number from 1 to 16, got '{value}'"))
}

fn parse_domain(value: &str) -> Result<String, String> {
    let d = value.trim().trim_matches('.').to_ascii_lowercase();
    let label_ok = |l: &str| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if d.split('.').all(label_ok) {
        Ok(d)
    } else {
        Err(format!("expected a domain name such as pipe.example.com, got '{value}'"))
    }
}

fn parse_registry(value: &str) -> Result<String, String> {
    let r = value.trim().trim_end_matches('/');
    let ok = !r.is_empty() && !r.contains("://") && !r.starts_with('/') && r.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-:/[]".contains(&b));
    if ok {
        Ok(r.to_owned())
    } else {
        Err(format!("expected host[:port][/path] without scheme, e.g. 127.0.0.1:5000, got '{value}'"))
    }
}

fn parse_network(value: &str) -> Result<String, String> {
    let n = value.trim();
    if n.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)) {
        Ok(n.to_owned())
    } else {
        Err(format!("expected a Docker network name, got '{value}'"))
    }
}

fn parse_token(value: &str) -> Result<Secret, String> {
    if value.len() < MIN_TOKEN_LEN {
        Err(format!("expected a token of at least {MIN_TOKEN_LEN} characters"))
    } else {
        Ok(Secret::new(value.to_owned()))
    }
}

fn parse_secret(value: &str) -> Result<Secret, String> {
    Ok(Secret::new(value.to_owned()))
}

fn parse_api_auth(value: &str) -> Result<AuthMode, String> {
    match value.trim() {
        "token" => Ok(AuthMode::Token),
        "none" => Ok(AuthMode::None),
        other => Err(format!("expected token or none, got '{other}'")),
    }
}

fn parse_count(value: &str) -> Result<usize, String> {
    value.trim().parse::<usize>().ok().filter(|n| (1..=100_000).contains(n)).ok_or_else(|| format!("expected a whole number from 1 to 100000, got '{value}'"))
}

fn parse_memory(value: &str) -> Result<ByteSize, String> {
    ByteSize::parse(value).and_then(check_memory).map_err(|why| format!("expected a size of at least 6m such as 512m, got '{value}' ({why})"))
}

fn parse_cpus(value: &str) -> Result<f64, String> {
    value
        .trim()
        .parse::<f64>()
        .map_err(|e| e.to_string())
        .and_then(check_cpus)
        .map_err(|why| format!("expected a number of cores such as 0.5 or 2, got '{value}' ({why})"))
}

fn parse_docker_host(value: &str) -> Result<String, String> {
    if ["unix://", "tcp://", "http://"].iter().any(|s| value.starts_with(s)) {
        Ok(value.to_owned())
    } else {
        Err(format!("expected unix:///path or tcp://host:port, got '{value}'"))
    }
}

fn parse_bool(value: &str) -> Result<bool, String> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(format!("expected true or false, got '{value}'")),
    }
}

fn parse_instance(value: &str) -> Result<String, String> {
    let ok =
        !value.is_empty() && value.len() <= 32 && value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') && !value.starts_with('-');
    if ok {
        Ok(value.to_owned())
    } else {
        Err(format!("expected up to 32 of a-z, 0-9 and '-', got '{value}'"))
    }
}

fn parse_labels(value: &str) -> Result<Labels, String> {
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
fn parse_timeout(value: &str) -> Result<Duration, String> {
    Span::parse(value)
        .and_then(|s| s.within(Duration::from_millis(1), MAX_TIMEOUT))
        .map(|s| s.0)
        .map_err(|_| format!("expected a duration such as 60s, 1500ms or 2m (up to 24h), got '{value}'"))
}

/// `PIPES_WAITING_PAGE_AFTER`.
#[derive(Debug, Clone, Copy)]
struct WaitingPage(Option<Duration>);

fn parse_waiting_page(value: &str) -> Result<WaitingPage, String> {
    match value {
        "off" => Ok(WaitingPage(None)),
        "0" | "0s" => Ok(WaitingPage(Some(Duration::ZERO))),
        _ => parse_timeout(value).map(|d| WaitingPage(Some(d))).map_err(|_| format!("expected off or a duration such as 1s or 500ms, got '{value}'")),
    }
}

fn parse_capabilities(value: &str) -> Result<Capabilities, String> {
    value.split(',').filter(|c| !c.trim().is_empty()).map(check_capability).collect::<Result<_, _>>().map(Capabilities)
}

fn parse_header_size(value: &str) -> Result<ByteSize, String> {
    ByteSize::parse(value)
        .ok()
        .filter(|b| (1 << 10..=16 << 20).contains(&b.0))
        .ok_or_else(|| format!("expected a size from 1k to 16m such as 64k, got '{value}'"))
}

fn parse_watch(value: &str) -> Result<Watch, String> {
    let expected = || format!("expected off or a duration of at least 1s such as 5m, got '{value}'");
    match Watch::parse(value).map_err(|_| expected())? {
        Watch::Every(span) => span.within(MIN_WATCH, MAX_TIMEOUT).map(Watch::Every).map_err(|_| expected()),
        Watch::Off => Ok(Watch::Off),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources(vars: &[(&str, &str)]) -> Sources {
        Sources { env: vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(), ..Sources::default() }
    }

    fn load_with(args: &[&str], vars: &[(&str, &str)]) -> Result<Settings, SettingError> {
        let args = std::iter::once("pipes").chain(args.iter().copied());
        match Settings::from_sources(args, &sources(vars)) {
            Ok(s) => Ok(s),
            Err(LoadError::Setting(e)) => Err(e),
            Err(LoadError::Info(text)) => panic!("unexpected help: {text}"),
        }
    }

    #[test]
    fn https_needs_certificates_and_acme_a_domain() {
        let e = load(&[("PIPES_TLS_LISTEN", "127.0.0.1:8443")]).unwrap_err();
        assert_eq!(e.name, "PIPES_TLS_LISTEN");
        let e = load(&[("PIPES_TLS_LISTEN", "127.0.0.1:8443"), ("PIPES_TLS_CERT", "/c.pem")]).unwrap_err();
        assert_eq!(e.name, "PIPES_TLS_KEY");
        let e = load(&[("PIPES_TLS_CERT", "/c.pem"), ("PIPES_TLS_KEY", "/k.pem")]).unwrap_err();
        assert_eq!(e.name, "PIPES_TLS_CERT");
        let acme = [("PIPES_TLS_LISTEN", "127.0.0.1:8443"), ("PIPES_ACME_DIRECTORY", "https://127.0.0.1:14000/dir")];
        assert_eq!(load(&acme).unwrap_err().name, "PIPES_ACME_DIRECTORY");
        let s = load(&[acme[0], acme[1], ("PIPES_DOMAIN", "example.com"), ("PIPES_HTTPS_REDIRECT", "true")]).unwrap();
        let tls = s.tls.unwrap();
        assert_eq!(tls.acme.unwrap().max_per_hour, 20);
        assert_eq!(s.https_redirect, Some(8443), "redirects go to the HTTPS listener's port");
        let e = load(&[("PIPES_ACME_DIRECTORY", "http://ca.example/dir")]).unwrap_err();
        assert_eq!(e.name, "PIPES_ACME_DIRECTORY");
        assert_eq!(load(&[("PIPES_HTTPS_REDIRECT", "true")]).unwrap().https_redirect, Some(443));
        assert_eq!(load(&[("PIPES_HOST_STYLE", "flat")]).unwrap().hosts.style, HostStyle::Flat);
        assert_eq!(load(&[("PIPES_HOST_STYLE", "wide")]).unwrap_err().name, "PIPES_HOST_STYLE");
        assert_eq!(load(&[("PIPES_ACCESS_LOG", "json")]).unwrap().access_log, AccessLog::Json);
        assert_eq!(load(&[("PIPES_ACCESS_LOG", "yes")]).unwrap_err().name, "PIPES_ACCESS_LOG");
        let metrics = load(&[("PIPES_METRICS_LISTEN", "127.0.0.1:9100")]).unwrap().metrics.unwrap();
        assert_eq!((metrics.listen.len(), metrics.max_deployments), (1, 500));
    }

    fn load(vars: &[(&str, &str)]) -> Result<Settings, SettingError> {
        load_with(&[], vars)
    }

    #[test]
    fn defaults_are_safe() {
        let s = load(&[]).unwrap();
        assert_eq!(s.listen, vec!["0.0.0.0:8080".parse().unwrap()]);
        assert_eq!(s.hosts, Hosts::dotted(Domain::Levels(2)));
        assert_eq!(s.docker.network, None);
        assert!(s.policy.patterns().is_empty(), "nothing may be deployed by default");
        assert!(matches!(s.api_auth, ApiAuth::Tokens { admin: None }));
        assert!(s.docker.auth.is_none());
        assert_eq!(s.defaults.health_timeout, Duration::from_secs(60));
        assert_eq!(s.defaults.memory, ByteSize(512 << 20));
        assert_eq!(s.docker.registry_host, "docker.io");
        assert_eq!(s.defaults.watch, None, "no registry polling unless asked");
        assert_eq!(s.drain_timeout, Duration::from_secs(30));
        assert_eq!(load(&[("PIPES_WATCH", "5m")]).unwrap().defaults.watch, Some(Duration::from_secs(300)));
        assert_eq!(s.connections.header_timeout, Duration::from_secs(10));
        assert_eq!(s.connections.max_header_size, 64 << 10);
    }

    #[test]
    fn ceilings_default_to_the_host_and_bound_the_defaults() {
        let s = load(&[]).unwrap();
        assert_eq!((s.ceilings.memory, s.ceilings.cpus, s.ceilings.pids), (ByteSize(8 << 30), 2.0, 4096));
        assert!(s.ceilings.capabilities.is_empty(), "no capability beyond the base set unless allowed");
        let s = load(&[
            ("PIPES_MAX_MEMORY", "1g"),
            ("PIPES_MAX_CPUS", "0.5"),
            ("PIPES_DEFAULT_CPUS", "0.25"),
            ("PIPES_ALLOWED_CAPABILITIES", "net_raw, CAP_SYS_PTRACE"),
        ])
        .unwrap();
        assert_eq!((s.ceilings.memory, s.ceilings.cpus), (ByteSize(1 << 30), 0.5));
        assert_eq!(s.ceilings.capabilities, ["NET_RAW", "SYS_PTRACE"]);
        assert_eq!(load(&[("PIPES_MAX_PIDS", "100")]).unwrap_err().name, "PIPES_MAX_PIDS");
        assert_eq!(load(&[("PIPES_MAX_MEMORY", "256m")]).unwrap_err().name, "PIPES_DEFAULT_MEMORY");
        assert_eq!(load(&[("PIPES_MAX_CPUS", "0.5")]).unwrap_err().name, "PIPES_DEFAULT_CPUS");
    }

    #[test]
    fn the_connection_cap_follows_the_open_files_limit() {
        let with_files = |n| Sources { open_files: Some(n), ..Sources::default() };
        let cap = |src: &Sources| match Settings::from_sources(["pipes"], src) {
            Ok(s) => s.connections.max_connections,
            Err(e) => panic!("{e:?}"),
        };
        assert_eq!(cap(&with_files(256)), 48, "a quarter of what is left after a reserve");
        assert_eq!(cap(&with_files(1 << 20)), 100_000);
        let mut set = with_files(256);
        set.env.insert("PIPES_MAX_CONNECTIONS".into(), "500".into());
        assert_eq!(cap(&set), 500, "the setting wins");
    }

    #[test]
    fn published_ports_are_asked_for_without_a_network() {
        assert!(!load(&[]).expect("valid").docker.publish_ports, "off by default");
        assert!(load(&[("PIPES_PUBLISH_PORTS", "true")]).expect("valid").docker.publish_ports);
        let e = load(&[("PIPES_PUBLISH_PORTS", "true"), ("PIPES_NETWORK", "pipes")]).unwrap_err();
        assert_eq!(e.name, "PIPES_PUBLISH_PORTS", "{e}");
    }

    #[test]
    fn swarm_needs_the_network_its_services_and_pipes_share() {
        let e = load(&[("PIPES_BACKEND", "swarm")]).unwrap_err();
        assert_eq!(e.name, "PIPES_NETWORK", "{e}");
        let settings = load(&[("PIPES_BACKEND", "swarm"), ("PIPES_NETWORK", "pipes")]).expect("valid");
        assert_eq!((settings.backend, settings.docker.network.as_deref()), (BackendKind::Swarm, Some("pipes")));
        assert_eq!(load(&[]).expect("valid").backend, BackendKind::Docker, "docker by default");
    }

    #[test]
    fn bad_values_name_the_variable_in_one_line() {
        let cases = [
            ("PIPES_LISTEN", "nope"),
            ("DOMAINLEVELS", "zero"),
            ("DOMAINLEVELS", "0"),
            ("PIPES_DOMAIN", "a..b"),
            ("PIPES_REGISTRY", "https://r.example.com"),
            ("PIPES_ALLOW", "alice"),
            ("PIPES_ALLOW", "al.ice/*"),
            ("DOCKER_HOST", "ssh://x"),
            ("DOCKER_AUTH", "maybe"),
            ("PIPES_START_TIMEOUT", "soon"),
            ("PIPES_FAILURE_TTL", "3d"),
            ("PIPES_INSTANCE", "Has Space"),
            ("PIPES_LABELS", "pipes.managed=x"),
            ("PIPES_API_TOKEN", "short"),
            ("PIPES_API_AUTH", "maybe"),
            ("PIPES_MAX_CONTAINERS", "0"),
            ("PIPES_MAX_PULLS", "many"),
            ("PIPES_DEFAULT_MEMORY", "1k"),
            ("PIPES_DEFAULT_CPUS", "-1"),
            ("PIPES_NETWORK", "a b"),
            ("PIPES_WATCH", "often"),
            ("PIPES_WATCH", "100ms"),
            ("PIPES_DRAIN_TIMEOUT", "forever"),
            ("PIPES_HEADER_TIMEOUT", "0"),
            ("PIPES_MAX_HEADER_SIZE", "10"),
            ("PIPES_MAX_CONNECTIONS", "none"),
            ("PIPES_KEEPALIVE_TIMEOUT", "later"),
            ("PIPES_PULL_TIMEOUT", "never"),
            ("PIPES_MAX_STARTS_PER_CLIENT", "0"),
            ("PIPES_MAX_NOT_RUNNING", "-3"),
            ("PIPES_MAX_MEMORY", "1k"),
            ("PIPES_MAX_CPUS", "0"),
            ("PIPES_TRUSTED_PROXIES", "lb.example.com"),
            ("PIPES_ALLOWED_CAPABILITIES", "net raw"),
            ("PIPES_MAX_PIDS", "lots"),
            ("PIPES_BACKEND", "kubernetes"),
        ];
        for (name, value) in cases {
            let e = load(&[(name, value)]).unwrap_err();
            assert_eq!(e.name, name, "{name}={value}: {e}");
            assert!(!e.to_string().contains('\n'), "{e}");
            assert!(!e.message.is_empty(), "{e}");
        }
        // A bad flag names the variable it stands for.
        let e = load_with(&["--listen", "nope"], &[]).unwrap_err();
        assert_eq!(e.name, "PIPES_LISTEN", "{e}");
        assert!(e.message.contains("nope"), "{e}");
        let e = load_with(&["--no-such-flag"], &[]).unwrap_err();
        assert!(!e.to_string().contains('\n'), "{e}");
    }

    #[test]
    fn flags_win_over_environment_and_empty_is_unset() {
        let s = load_with(&["--listen", "127.0.0.1:9000"], &[("PIPES_LISTEN", "0.0.0.0:1")]).unwrap();
        assert_eq!(s.listen, vec!["127.0.0.1:9000".parse().unwrap()]);
        let s = load(&[("PIPES_LISTEN", "127.0.0.1:9001")]).unwrap();
        assert_eq!(s.listen, vec!["127.0.0.1:9001".parse().unwrap()]);
        let s = load(&[("PIPES_ALLOW", " "), ("PIPES_LISTEN", "")]).unwrap();
        assert!(s.policy.patterns().is_empty());
        assert_eq!(s.listen, vec!["0.0.0.0:8080".parse().unwrap()]);
    }

    #[test]
    fn values_can_come_from_files() {
        let dir = std::env::temp_dir().join(format!("pipes-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("password");
        std::fs::write(&file, "s3cret\n").unwrap();
        let path = file.to_str().unwrap();
        let s = load(&[("DOCKER_AUTH", "true"), ("DOCKER_AUTH_USERNAME", "alice"), ("DOCKER_AUTH_PASSWORD_FILE", path)]).unwrap();
        let auth = s.docker.auth.unwrap();
        assert_eq!(auth.password.expose(), "s3cret");
        assert!(!format!("{auth:?}").contains("s3cret"));
        let both = load(&[("DOCKER_AUTH_PASSWORD", "x"), ("DOCKER_AUTH_PASSWORD_FILE", path)]).unwrap_err();
        assert_eq!(both.name, "DOCKER_AUTH_PASSWORD");
        let missing = load(&[("PIPES_API_TOKEN_FILE", "/nonexistent/token")]).unwrap_err();
        assert_eq!(missing.name, "PIPES_API_TOKEN");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn help_names_the_variables_and_hides_their_values() {
        let args = ["pipes", "--help"];
        let text = match Settings::from_sources(args, &sources(&[("PIPES_API_TOKEN", "top-secret-token-123")])) {
            Err(LoadError::Info(text)) => text,
            other => panic!("{other:?}"),
        };
        assert!(text.contains("[env: PIPES_API_TOKEN]"), "{text}");
        assert!(text.contains("[env: DOMAINLEVELS]"), "{text}");
        assert!(!text.contains("top-secret-token-123"), "{text}");
    }

    #[test]
    fn auth_needs_user_and_password() {
        assert_eq!(load(&[("DOCKER_AUTH", "true")]).unwrap_err().name, "DOCKER_AUTH_USERNAME");
        assert!(load(&[("DOCKER_AUTH", "false"), ("DOCKER_AUTH_USERNAME", "a")]).unwrap().docker.auth.is_none());
    }

    #[test]
    fn domain_settings() {
        assert_eq!(load(&[("DOMAINLEVELS", "3")]).unwrap().hosts.domain, Domain::Levels(3));
        assert_eq!(load(&[("PIPES_DOMAIN", "Pipe.Example.com")]).unwrap().hosts.domain, Domain::Suffix("pipe.example.com".into()));
        assert_eq!(load(&[("PIPES_DOMAIN", "pipe.example.com"), ("DOMAINLEVELS", "2")]).unwrap_err().name, "DOMAINLEVELS");
    }

    #[test]
    fn the_registry_names_the_credentials_host() {
        let s = load(&[("PIPES_REGISTRY", "127.0.0.1:5000/")]).unwrap();
        assert_eq!(s.registry.as_deref(), Some("127.0.0.1:5000"));
        assert_eq!(s.docker.registry_host, "127.0.0.1:5000");
        let s = load(&[("PIPES_REGISTRY", "registry.example.com/team")]).unwrap();
        assert_eq!(s.docker.registry_host, "registry.example.com");
    }
}

//! The command line, which declares every setting once: its flag, its
//! environment variable, its default and its parser.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{ArgAction, CommandFactory, Parser};

use crate::config::{AccessConfig, ByteSize, Expiry, IdleAction, Watch};
use crate::forwarded::Trusted;
use crate::policy::Policy;
use crate::route::HostStyle;
use crate::secret::Secret;

use super::parse::*;
use super::*;

/// The command line, which declares every setting.
#[derive(Parser, Debug)]
#[command(
    name = "pipes",
    version,
    about = "Docker auto-deployment edge proxy: {tag}.{repo}.{user}.<domain> serves image user/repo:tag, started on first request.",
    after_help = "Every setting is also read from its environment variable, or from the file named by NAME_FILE \
                  (e.g. DOCKER_AUTH_PASSWORD_FILE=/run/secrets/registry). Flags win over the environment."
)]
pub(super) struct Cli {
    /// Addresses to listen on, comma-separated
    #[arg(long, env = "PIPES_LISTEN", value_name = "ADDR", default_value = "0.0.0.0:8080", value_parser = parse_listen)]
    pub(super) listen: Addrs,
    /// Exact domain served, e.g. pipe.example.com; overrides DOMAINLEVELS
    #[arg(long, env = "PIPES_DOMAIN", value_name = "DOMAIN", value_parser = parse_domain)]
    pub(super) domain: Option<String>,
    /// Number of labels in the domain: 2 for example.com, 3 for pipe.example.com [default: 2]
    #[arg(long, env = "DOMAINLEVELS", value_name = "N", value_parser = parse_levels)]
    pub(super) domain_levels: Option<usize>,
    /// Registry prefixed to every image, e.g. registry.example.com or 127.0.0.1:5000 [default: Docker Hub]
    #[arg(long, env = "PIPES_REGISTRY", value_name = "HOST[:PORT][/PATH]", value_parser = parse_registry)]
    pub(super) registry: Option<String>,
    /// Docker network shared by Pipes and its containers; containers are reached by their IP on it
    #[arg(long, env = "PIPES_NETWORK", value_name = "NAME", value_parser = parse_network)]
    pub(super) network: Option<String>,
    /// Publish container ports on 127.0.0.1 and reach containers there, even where their IPs answer: true or false
    #[arg(long, env = "PIPES_PUBLISH_PORTS", value_name = "BOOL", default_value = "false", value_parser = parse_bool, action = ArgAction::Set)]
    pub(super) publish_ports: bool,
    /// Pass request header names that hold `_` on to containers (dropped by default, as nginx does): true or false
    #[arg(long, env = "PIPES_UNDERSCORE_HEADERS", value_name = "BOOL", default_value = "false", value_parser = parse_bool, action = ArgAction::Set)]
    pub(super) underscore_headers: bool,
    /// Show the last log lines of a container that failed to start to anonymous clients too (502 body, waiting page, event stream): true or false
    #[arg(long, env = "PIPES_PUBLIC_LOGS", value_name = "BOOL", default_value = "false", value_parser = parse_bool, action = ArgAction::Set)]
    pub(super) public_logs: bool,
    /// Where deployments run: docker (containers of this engine) or swarm (services of its swarm; needs PIPES_NETWORK)
    #[arg(long, env = "PIPES_BACKEND", value_name = "BACKEND", default_value = "docker", value_parser = parse_backend)]
    pub(super) backend: BackendKind,
    /// Directory for deployment configs
    #[arg(long, env = "PIPES_CONFIG_DIR", value_name = "DIR", default_value = "configs")]
    pub(super) config_dir: PathBuf,
    /// Deployments that may be started, comma-separated: *, user/*, user/repo, user/repo:tag [default: none]
    #[arg(long, env = "PIPES_ALLOW", value_name = "PATTERNS", value_parser = Policy::parse)]
    pub(super) allow: Option<Policy>,
    /// Bearer token for the management API; prefer PIPES_API_TOKEN_FILE
    #[arg(long, env = "PIPES_API_TOKEN", value_name = "TOKEN", value_parser = parse_token)]
    pub(super) api_token: Option<Secret>,
    /// API protection: token (bearer tokens) or none (trusted networks only)
    #[arg(long, env = "PIPES_API_AUTH", value_name = "MODE", default_value = "token", value_parser = parse_api_auth)]
    pub(super) api_auth: AuthMode,
    /// Most containers running at once; more cold starts get 503
    #[arg(long, env = "PIPES_MAX_CONTAINERS", value_name = "N", default_value = "50", value_parser = parse_count)]
    pub(super) max_containers: usize,
    /// Most image pulls at once
    #[arg(long, env = "PIPES_MAX_PULLS", value_name = "N", default_value = "2", value_parser = parse_count)]
    pub(super) max_pulls: usize,
    /// Memory limit of containers whose config sets none, e.g. 512m
    #[arg(long, env = "PIPES_DEFAULT_MEMORY", value_name = "SIZE", default_value = "512m", value_parser = parse_memory)]
    pub(super) default_memory: ByteSize,
    /// CPU limit (cores) of containers whose config sets none
    #[arg(long, env = "PIPES_DEFAULT_CPUS", value_name = "CPUS", default_value = "1", value_parser = parse_cpus)]
    pub(super) default_cpus: f64,
    /// Docker engine: unix:///path or tcp://host:port
    #[arg(long, env = "DOCKER_HOST", value_name = "URL", default_value = "unix:///var/run/docker.sock", value_parser = parse_docker_host)]
    pub(super) docker_host: String,
    /// Send registry credentials when pulling: true or false
    #[arg(long, env = "DOCKER_AUTH", value_name = "BOOL", default_value = "false", value_parser = parse_bool, action = ArgAction::Set)]
    pub(super) docker_auth: bool,
    /// Registry user name
    #[arg(long, env = "DOCKER_AUTH_USERNAME", value_name = "USER")]
    pub(super) docker_auth_username: Option<String>,
    /// Registry e-mail
    #[arg(long, env = "DOCKER_AUTH_EMAIL", value_name = "EMAIL")]
    pub(super) docker_auth_email: Option<String>,
    /// Registry password; prefer DOCKER_AUTH_PASSWORD_FILE
    #[arg(long, env = "DOCKER_AUTH_PASSWORD", value_name = "PASSWORD", value_parser = parse_secret)]
    pub(super) docker_auth_password: Option<Secret>,
    /// Name of this Pipes; containers carry it, so several can share an engine
    #[arg(long, env = "PIPES_INSTANCE", value_name = "NAME", default_value = "pipes", value_parser = parse_instance)]
    pub(super) instance: String,
    /// Extra labels for created containers, comma-separated key=value
    #[arg(long, env = "PIPES_LABELS", value_name = "K=V,...", value_parser = parse_labels)]
    pub(super) labels: Option<Labels>,
    /// How long a starting container may take to answer, e.g. 60s, 500ms
    #[arg(long, env = "PIPES_START_TIMEOUT", value_name = "DURATION", default_value = "60s", value_parser = parse_timeout)]
    pub(super) start_timeout: Duration,
    /// How long a failed start is remembered before it is tried again
    #[arg(long, env = "PIPES_FAILURE_TTL", value_name = "DURATION", default_value = "10s", value_parser = parse_timeout)]
    pub(super) failure_ttl: Duration,
    /// How often running deployments ask the registry whether their tag moved (off, or e.g. 5m); their config's `watch` wins
    #[arg(long, env = "PIPES_WATCH", value_name = "DURATION|off", default_value = "off", value_parser = parse_watch)]
    pub(super) watch: Watch,
    /// What an idle container becomes, unless its config says: stop or pause
    #[arg(long, env = "PIPES_IDLE_ACTION", value_name = "ACTION", default_value = "stop", value_parser = IdleAction::parse)]
    pub(super) idle_action: IdleAction,
    /// How long a container stays paused before it is stopped, unless its config says
    #[arg(long, env = "PIPES_PAUSE_TIMEOUT", value_name = "DURATION", default_value = "1h", value_parser = parse_timeout)]
    pub(super) pause_timeout: Duration,
    /// Most containers paused at once; past it the longest-paused is stopped [default: PIPES_MAX_CONTAINERS]
    #[arg(long, env = "PIPES_MAX_PAUSED", value_name = "N", value_parser = parse_count)]
    pub(super) max_paused: Option<usize>,
    /// How long requests and connections in flight may finish when a container is replaced or Pipes stops
    #[arg(long, env = "PIPES_DRAIN_TIMEOUT", value_name = "DURATION", default_value = "30s", value_parser = parse_timeout)]
    pub(super) drain_timeout: Duration,
    /// How long a new connection may take to send its first request head (or HTTP/2 preface)
    #[arg(long, env = "PIPES_HEADER_TIMEOUT", value_name = "DURATION", default_value = "10s", value_parser = parse_timeout)]
    pub(super) header_timeout: Duration,
    /// Largest request head accepted, e.g. 64k
    #[arg(long, env = "PIPES_MAX_HEADER_SIZE", value_name = "SIZE", default_value = "64k", value_parser = parse_header_size)]
    pub(super) max_header_size: ByteSize,
    /// How long a kept-alive connection may stay idle between requests (HTTP/1 and HTTP/2)
    #[arg(long, env = "PIPES_KEEPALIVE_TIMEOUT", value_name = "DURATION", default_value = "60s", value_parser = parse_timeout)]
    pub(super) keepalive_timeout: Duration,
    /// Most client connections open at once; more are answered 503 and closed [default: a quarter of the open-files limit]
    #[arg(long, env = "PIPES_MAX_CONNECTIONS", value_name = "N", value_parser = parse_count)]
    pub(super) max_connections: Option<usize>,
    /// How long a pull may take before the start fails (504)
    #[arg(long, env = "PIPES_PULL_TIMEOUT", value_name = "DURATION", default_value = "10m", value_parser = parse_timeout)]
    pub(super) pull_timeout: Duration,
    /// Most cold starts one client address may have under way; more get 503
    #[arg(long, env = "PIPES_MAX_STARTS_PER_CLIENT", value_name = "N", default_value = "8", value_parser = parse_count)]
    pub(super) max_starts_per_client: usize,
    /// Most event streams one client address may have open; more get 429
    #[arg(long, env = "PIPES_MAX_STREAMS_PER_CLIENT", value_name = "N", default_value = "8", value_parser = parse_count)]
    pub(super) max_streams_per_client: usize,
    /// Most deployments kept in the table that do not run (starting, stopped, failed); requests for more names get 503
    #[arg(long, env = "PIPES_MAX_NOT_RUNNING", value_name = "N", default_value = "1000", value_parser = parse_count)]
    pub(super) max_not_running: usize,
    /// Highest memory limit any config may set, e.g. 4g [default: the host's memory]
    #[arg(long, env = "PIPES_MAX_MEMORY", value_name = "SIZE", value_parser = parse_memory)]
    pub(super) max_memory: Option<ByteSize>,
    /// Most processes any config may let a container run
    #[arg(long, env = "PIPES_MAX_PIDS", value_name = "N", default_value = "4096", value_parser = parse_count)]
    pub(super) max_pids: usize,
    /// Linux capabilities configs may add to the base set, comma-separated (e.g. NET_RAW) [default: none]
    #[arg(long, env = "PIPES_ALLOWED_CAPABILITIES", value_name = "CAPS", value_parser = parse_capabilities)]
    pub(super) allowed_capabilities: Option<Capabilities>,
    /// Proxies in front of Pipes whose X-Forwarded-* headers are believed, comma-separated addresses or networks
    #[arg(long, env = "PIPES_TRUSTED_PROXIES", value_name = "ADDRS", value_parser = Trusted::parse)]
    pub(super) trusted_proxies: Option<Trusted>,
    /// Access of deployments whose configs name none, as a config's `access` in JSON (e.g. {"basic":{"alice":"$2y$…"}}) [default: open]
    #[arg(long, env = "PIPES_ACCESS", value_name = "JSON", value_parser = parse_access)]
    pub(super) access: Option<AccessConfig>,
    /// Answers from deployments carry X-Robots-Tag: noindex, nofollow unless their config says otherwise: true or false
    #[arg(long, env = "PIPES_NOINDEX", value_name = "BOOL", default_value = "true", value_parser = parse_bool, action = ArgAction::Set)]
    pub(super) noindex: bool,
    /// How long an auth server (access.forward_auth) may take to answer; a slower or unreachable one is a 503
    #[arg(long, env = "PIPES_FORWARD_AUTH_TIMEOUT", value_name = "DURATION", default_value = "5s", value_parser = parse_timeout)]
    pub(super) forward_auth_timeout: Duration,
    /// Remove deployments no request reached for this long (containers, services, volumes, tag config, images), unless their config says otherwise: never or a duration such as 14d
    #[arg(long, env = "PIPES_EXPIRE_AFTER", value_name = "DURATION|never", default_value = "never", value_parser = Expiry::parse)]
    pub(super) expire_after: Expiry,
    /// How long an image Pipes pulled may go unused by any container before it is removed, e.g. 24h
    #[arg(long, env = "PIPES_IMAGE_KEEP", value_name = "DURATION", default_value = "24h", value_parser = parse_image_keep)]
    pub(super) image_keep: Duration,
    /// Share of the engine's disk in use above which images Pipes pulled and nothing uses are removed at once, least recently used first
    #[arg(long, env = "PIPES_DISK_HIGH", value_name = "SHARE", default_value = "85%", value_parser = parse_share)]
    pub(super) disk_high: f64,
    /// Free space the engine's disk must keep: below it, no image is pulled (507); running deployments keep serving. A share (5%) or a size (2GiB)
    #[arg(long, env = "PIPES_DISK_MIN_FREE", value_name = "SHARE|SIZE", default_value = "5%", value_parser = parse_min_free)]
    pub(super) disk_min_free: MinFree,
    /// URLs every happening (starting, ready, failed, stopped, …) is POSTed to as signed JSON, comma-separated [default: none]
    #[arg(long, env = "PIPES_WEBHOOK_URL", value_name = "URLS", value_parser = parse_webhook_urls)]
    pub(super) webhook_url: Option<Urls>,
    /// Key of the webhooks' X-Pipes-Signature (HMAC-SHA256); prefer PIPES_WEBHOOK_SECRET_FILE
    #[arg(long, env = "PIPES_WEBHOOK_SECRET", value_name = "SECRET", value_parser = parse_token)]
    pub(super) webhook_secret: Option<Secret>,
    /// URL prefixes deployments' configs may name as access.forward_auth.url, comma-separated [default: none; PIPES_ACCESS may name any]
    #[arg(long, env = "PIPES_FORWARD_AUTH_URLS", value_name = "URLS", value_parser = parse_url_prefixes)]
    pub(super) forward_auth_urls: Option<Urls>,
    /// Highest CPU limit (cores) any config may set [default: the host's CPUs]
    #[arg(long, env = "PIPES_MAX_CPUS", value_name = "CPUS", value_parser = parse_cpus)]
    pub(super) max_cpus: Option<f64>,
    /// Addresses to serve HTTPS on, comma-separated, e.g. 0.0.0.0:8443 [default: none]
    #[arg(long, env = "PIPES_TLS_LISTEN", value_name = "ADDR", value_parser = parse_listen)]
    pub(super) tls_listen: Option<Addrs>,
    /// Certificate chain (PEM) served over HTTPS to names it covers, e.g. a wildcard for the domain
    #[arg(long, env = "PIPES_TLS_CERT", value_name = "FILE")]
    pub(super) tls_cert: Option<PathBuf>,
    /// Private key (PEM) of PIPES_TLS_CERT
    #[arg(long, env = "PIPES_TLS_KEY", value_name = "FILE")]
    pub(super) tls_key: Option<PathBuf>,
    /// ACME v2 directory URL: obtain certificates on demand for names no certificate covers
    #[arg(long, env = "PIPES_ACME_DIRECTORY", value_name = "URL", value_parser = parse_https_url)]
    pub(super) acme_directory: Option<String>,
    /// Contact e-mail of the ACME account
    #[arg(long, env = "PIPES_ACME_EMAIL", value_name = "EMAIL", value_parser = parse_email)]
    pub(super) acme_email: Option<String>,
    /// CA bundle (PEM) to trust for the ACME server's own HTTPS [default: the public roots]
    #[arg(long, env = "PIPES_ACME_CA", value_name = "FILE")]
    pub(super) acme_ca: Option<PathBuf>,
    /// Most certificates obtained per hour
    #[arg(long, env = "PIPES_ACME_MAX_PER_HOUR", value_name = "N", default_value = "20", value_parser = parse_count)]
    pub(super) acme_max_per_hour: usize,
    /// Answer plain-HTTP requests with 308 to the same URL on https: true or false
    #[arg(long, env = "PIPES_HTTPS_REDIRECT", value_name = "BOOL", default_value = "false", value_parser = parse_bool, action = ArgAction::Set)]
    pub(super) https_redirect: bool,
    /// Port clients reach HTTPS on, for redirects [default: the port of PIPES_TLS_LISTEN, else 443]
    #[arg(long, env = "PIPES_HTTPS_PORT", value_name = "PORT", value_parser = parse_port)]
    pub(super) https_port: Option<u16>,
    /// Host names: dotted ({tag}.{repo}.{user}.<domain>) or flat ({tag}--{repo}--{user}.<domain>)
    #[arg(long, env = "PIPES_HOST_STYLE", value_name = "STYLE", default_value = "dotted", value_parser = parse_host_style)]
    pub(super) host_style: HostStyle,
    /// Address to serve Prometheus metrics on at /metrics, e.g. 127.0.0.1:9100 [default: off]
    #[arg(long, env = "PIPES_METRICS_LISTEN", value_name = "ADDR", value_parser = parse_listen)]
    pub(super) metrics_listen: Option<Addrs>,
    /// Most deployments with their own metric labels; the rest count as deployment="other"
    #[arg(long, env = "PIPES_METRICS_MAX_DEPLOYMENTS", value_name = "N", default_value = "500", value_parser = parse_count)]
    pub(super) metrics_max_deployments: usize,
    /// Access log on standard output: off or json
    #[arg(long, env = "PIPES_ACCESS_LOG", value_name = "FORMAT", default_value = "off", value_parser = parse_access_log)]
    pub(super) access_log: AccessLog,
    /// How long a browser's navigation to a starting deployment waits before it is shown the waiting page (off: never)
    #[arg(long, env = "PIPES_WAITING_PAGE_AFTER", value_name = "DURATION|off", default_value = "1s", value_parser = parse_waiting_page)]
    pub(super) waiting_page_after: WaitingPage,
    /// Pingora server configuration (YAML): threads, grace periods, upgrades
    #[arg(short = 'c', long = "conf", env = "PIPES_SERVER_CONF", value_name = "FILE")]
    pub(super) server_conf: Option<PathBuf>,
    /// Take over the listening sockets of a running Pipes (zero-downtime upgrade)
    #[arg(short = 'u', long)]
    pub(super) upgrade: bool,
    /// Check the settings and the server configuration, then exit
    #[arg(short = 't', long)]
    pub(super) test: bool,
}

/// `PIPES_API_AUTH`.
#[derive(Debug, Clone, Copy)]
pub(super) enum AuthMode {
    Token,
    None,
}

/// Listening addresses.
#[derive(Debug, Clone)]
pub(super) struct Addrs(pub(super) Vec<SocketAddr>);

/// `key=value` labels.
#[derive(Debug, Clone)]
pub(super) struct Labels(pub(super) Vec<(String, String)>);

/// One line naming the variable, from clap's error.
pub(super) fn clap_error(e: clap::Error) -> LoadError {
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

//! Settings: parsed and validated once at start-up into [`Settings`].
//!
//! Each setting comes from a command-line flag, else its environment variable,
//! else `NAME_FILE` (a file holding the value, as Docker secrets are), else its
//! default. A bad value stops start-up with one line naming the variable and
//! what it expects. Nothing else in Pipes reads the environment.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::route::Domain;
use crate::config::{ByteSize, Defaults};
use crate::security::{AllowPattern, ApiAuth, Policy};

/// Command-line flags; each mirrors an environment variable.
#[derive(Parser, Debug, Default)]
#[command(
    name = "pipes",
    version,
    about = "Docker auto-deployment edge proxy: {tag}.{repo}.{user}.<domain> serves image user/repo:tag, started on first request.",
    after_help = "Every setting is also read from its environment variable, or from the file named by NAME_FILE \
                  (e.g. DOCKER_AUTH_PASSWORD_FILE=/run/secrets/registry). Flags win over the environment."
)]
pub struct Cli {
    /// Addresses to listen on, comma-separated [env: PIPES_LISTEN] [default: 0.0.0.0:8080]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Exact domain served, e.g. pipe.example.com; overrides DOMAINLEVELS [env: PIPES_DOMAIN]
    #[arg(long, value_name = "DOMAIN")]
    pub domain: Option<String>,
    /// Number of labels in the domain: 2 for example.com, 3 for pipe.example.com [env: DOMAINLEVELS] [default: 2]
    #[arg(long, value_name = "N")]
    pub domain_levels: Option<String>,
    /// Registry prefixed to every image, e.g. registry.example.com or 127.0.0.1:5000 [env: PIPES_REGISTRY] [default: Docker Hub]
    #[arg(long, value_name = "HOST[:PORT][/PATH]")]
    pub registry: Option<String>,
    /// Docker network shared by Pipes and its containers; containers are reached by their IP on it [env: PIPES_NETWORK]
    #[arg(long, value_name = "NAME")]
    pub network: Option<String>,
    /// Directory for deployment configs [env: PIPES_CONFIG_DIR] [default: ./configs]
    #[arg(long, value_name = "DIR")]
    pub config_dir: Option<String>,
    /// Deployments that may be started, comma-separated: *, user/*, user/repo, user/repo:tag [env: PIPES_ALLOW] [default: none]
    #[arg(long, value_name = "PATTERNS")]
    pub allow: Option<String>,
    /// Bearer token for the management API; prefer PIPES_API_TOKEN_FILE [env: PIPES_API_TOKEN]
    #[arg(long, value_name = "TOKEN")]
    pub api_token: Option<String>,
    /// API protection: token (bearer tokens) or none (trusted networks only) [env: PIPES_API_AUTH] [default: token]
    #[arg(long, value_name = "MODE")]
    pub api_auth: Option<String>,
    /// Most containers running at once; more cold starts get 503 [env: PIPES_MAX_CONTAINERS] [default: 50]
    #[arg(long, value_name = "N")]
    pub max_containers: Option<String>,
    /// Most image pulls at once [env: PIPES_MAX_PULLS] [default: 2]
    #[arg(long, value_name = "N")]
    pub max_pulls: Option<String>,
    /// Memory limit of containers whose config sets none, e.g. 512m [env: PIPES_DEFAULT_MEMORY] [default: 512m]
    #[arg(long, value_name = "SIZE")]
    pub default_memory: Option<String>,
    /// CPU limit (cores) of containers whose config sets none [env: PIPES_DEFAULT_CPUS] [default: 1]
    #[arg(long, value_name = "CPUS")]
    pub default_cpus: Option<String>,
    /// Docker engine: unix:///path or tcp://host:port [env: DOCKER_HOST] [default: unix:///var/run/docker.sock]
    #[arg(long, value_name = "URL")]
    pub docker_host: Option<String>,
    /// Send registry credentials when pulling: true or false [env: DOCKER_AUTH] [default: false]
    #[arg(long, value_name = "BOOL")]
    pub docker_auth: Option<String>,
    /// Registry user name [env: DOCKER_AUTH_USERNAME]
    #[arg(long, value_name = "USER")]
    pub docker_auth_username: Option<String>,
    /// Registry e-mail [env: DOCKER_AUTH_EMAIL]
    #[arg(long, value_name = "EMAIL")]
    pub docker_auth_email: Option<String>,
    /// Registry password; prefer DOCKER_AUTH_PASSWORD_FILE [env: DOCKER_AUTH_PASSWORD]
    #[arg(long, value_name = "PASSWORD")]
    pub docker_auth_password: Option<String>,
    /// Name of this Pipes; containers carry it, so several can share an engine [env: PIPES_INSTANCE] [default: pipes]
    #[arg(long, value_name = "NAME")]
    pub instance: Option<String>,
    /// Extra labels for created containers, comma-separated key=value [env: PIPES_LABELS]
    #[arg(long, value_name = "K=V,...")]
    pub labels: Option<String>,
    /// How long a starting container may take to answer, e.g. 60s, 500ms [env: PIPES_START_TIMEOUT] [default: 60s]
    #[arg(long, value_name = "DURATION")]
    pub start_timeout: Option<String>,
    /// How long a failed start is remembered before it is tried again [env: PIPES_FAILURE_TTL] [default: 10s]
    #[arg(long, value_name = "DURATION")]
    pub failure_ttl: Option<String>,
    /// Pingora server configuration (YAML): threads, grace periods, upgrades [env: PIPES_SERVER_CONF]
    #[arg(short = 'c', long = "conf", value_name = "FILE")]
    pub server_conf: Option<String>,
    /// Take over the listening sockets of a running Pipes (zero-downtime upgrade)
    #[arg(short = 'u', long)]
    pub upgrade: bool,
    /// Check the settings and the server configuration, then exit
    #[arg(short = 't', long)]
    pub test: bool,
}

/// A value that must never be printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: String) -> Self {
        Secret(value)
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Credentials for the registry (`DOCKER_AUTH*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryAuth {
    pub username: String,
    pub email: Option<String>,
    pub password: Secret,
}

/// How Pipes reaches the containers it starts; decided at start-up (see `server`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    /// The container port is published on 127.0.0.1 with a random host port.
    Published,
    /// The container joins this network and is reached at its IP there.
    Network(String),
}

/// Every setting of Pipes, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: Vec<SocketAddr>,
    pub domain: Domain,
    /// Registry prefix, without scheme or trailing slash; `None` is Docker Hub.
    pub registry: Option<String>,
    /// Network named by `PIPES_NETWORK`.
    pub network: Option<String>,
    /// This machine's host name: a container's id when Pipes runs in one.
    pub hostname: Option<String>,
    /// Whether `/.dockerenv` exists (a hint only: sandboxes have it too).
    pub in_container: bool,
    pub config_dir: PathBuf,
    pub policy: Policy,
    pub api_token: Option<Secret>,
    pub api_auth: ApiAuth,
    pub max_containers: usize,
    pub max_pulls: usize,
    /// Lowest layer of every deployment's config.
    pub defaults: Defaults,
    pub docker_host: String,
    pub registry_auth: Option<RegistryAuth>,
    pub instance: String,
    pub labels: Vec<(String, String)>,
    pub start_timeout: Duration,
    pub failure_ttl: Duration,
    pub server_conf: Option<PathBuf>,
    pub upgrade: bool,
    pub test: bool,
}

/// A setting that could not be used: the one line printed before exiting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingError {
    pub name: &'static str,
    pub message: String,
}

impl fmt::Display for SettingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.name, self.message)
    }
}

impl std::error::Error for SettingError {}

/// Where settings come from besides flags: the environment and the machine.
#[derive(Default)]
pub struct Sources {
    pub env: HashMap<String, String>,
    pub hostname: Option<String>,
    pub in_container: bool,
}

impl Sources {
    /// The process environment, host name, and whether `/.dockerenv` exists.
    pub fn from_process() -> Self {
        Sources {
            env: std::env::vars().collect(),
            hostname: std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_owned()).filter(|h| !h.is_empty()),
            in_container: std::path::Path::new("/.dockerenv").exists(),
        }
    }

    /// `NAME`, else the contents of the file `NAME_FILE` names (trailing newline dropped).
    fn get(&self, name: &'static str) -> Result<Option<String>, SettingError> {
        let file_var = format!("{name}_FILE");
        match (self.env.get(name), self.env.get(&file_var)) {
            (Some(_), Some(_)) => Err(SettingError {
                name,
                message: format!("set either {name} or {file_var}, not both"),
            }),
            (Some(value), None) => Ok(Some(value.clone())),
            (None, Some(path)) => match std::fs::read_to_string(path) {
                Ok(text) => Ok(Some(text.trim_end_matches(['\n', '\r']).to_owned())),
                Err(e) => Err(SettingError { name, message: format!("{file_var}={path} cannot be read: {e}") }),
            },
            (None, None) => Ok(None),
        }
    }
}

fn err(name: &'static str, message: impl Into<String>) -> SettingError {
    SettingError { name, message: message.into() }
}

impl Settings {
    /// Parses flags and environment of this process.
    pub fn load() -> Result<Settings, SettingError> {
        Settings::from_sources(Cli::parse(), &Sources::from_process())
    }

    /// Validates flags over environment over defaults.
    pub fn from_sources(cli: Cli, src: &Sources) -> Result<Settings, SettingError> {
        // A flag wins over the environment; an empty environment value counts as unset.
        let pick = |flag: Option<String>, name: &'static str| -> Result<Option<String>, SettingError> {
            match flag {
                Some(v) => Ok(Some(v)),
                None => Ok(src.get(name)?.filter(|v| !v.trim().is_empty())),
            }
        };

        let listen = parse_listen(&pick(cli.listen, "PIPES_LISTEN")?.unwrap_or_else(|| "0.0.0.0:8080".into()))?;
        let domain = parse_domain(pick(cli.domain, "PIPES_DOMAIN")?, pick(cli.domain_levels, "DOMAINLEVELS")?)?;
        let registry = pick(cli.registry, "PIPES_REGISTRY")?.map(|r| parse_registry(&r)).transpose()?;
        let network = pick(cli.network, "PIPES_NETWORK")?;
        if let Some(n) = &network {
            if !n.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)) {
                return Err(err("PIPES_NETWORK", format!("expected a Docker network name, got '{n}'")));
            }
        }
        let config_dir = PathBuf::from(pick(cli.config_dir, "PIPES_CONFIG_DIR")?.unwrap_or_else(|| "configs".into()));
        let policy = match pick(cli.allow, "PIPES_ALLOW")? {
            Some(list) => Policy::new(
                list.split(',')
                    .filter(|p| !p.trim().is_empty())
                    .map(AllowPattern::parse)
                    .collect::<Result<_, _>>()
                    .map_err(|m| err("PIPES_ALLOW", m))?,
            ),
            None => Policy::default(),
        };
        let api_token = pick(cli.api_token, "PIPES_API_TOKEN")?.map(Secret);
        if api_token.as_ref().is_some_and(|t| t.0.len() < 16) {
            return Err(err("PIPES_API_TOKEN", "expected a token of at least 16 characters"));
        }
        let api_auth = match pick(cli.api_auth, "PIPES_API_AUTH")?.as_deref().map(str::trim) {
            None | Some("token") => ApiAuth::Tokens { admin: api_token.clone() },
            Some("none") => ApiAuth::Off,
            Some(other) => return Err(err("PIPES_API_AUTH", format!("expected token or none, got '{other}'"))),
        };
        let max_containers = parse_count("PIPES_MAX_CONTAINERS", pick(cli.max_containers, "PIPES_MAX_CONTAINERS")?, 50)?;
        let max_pulls = parse_count("PIPES_MAX_PULLS", pick(cli.max_pulls, "PIPES_MAX_PULLS")?, 2)?;
        let memory = match pick(cli.default_memory, "PIPES_DEFAULT_MEMORY")? {
            Some(m) => ByteSize::parse(&m)
                .ok()
                .filter(|b| b.0 >= 6 << 20)
                .ok_or_else(|| err("PIPES_DEFAULT_MEMORY", format!("expected a size of at least 6m such as 512m, got '{m}'")))?,
            None => ByteSize(512 << 20),
        };
        let cpus = match pick(cli.default_cpus, "PIPES_DEFAULT_CPUS")? {
            Some(c) => c
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|c| *c > 0.0 && *c <= 1024.0)
                .ok_or_else(|| err("PIPES_DEFAULT_CPUS", format!("expected a number of cores such as 0.5 or 2, got '{c}'")))?,
            None => 1.0,
        };
        let docker_host = pick(cli.docker_host, "DOCKER_HOST")?.unwrap_or_else(|| "unix:///var/run/docker.sock".into());
        if !(docker_host.starts_with("unix://") || docker_host.starts_with("tcp://") || docker_host.starts_with("http://")) {
            return Err(err("DOCKER_HOST", format!("expected unix:///path or tcp://host:port, got '{docker_host}'")));
        }
        let registry_auth = parse_auth(
            pick(cli.docker_auth, "DOCKER_AUTH")?,
            pick(cli.docker_auth_username, "DOCKER_AUTH_USERNAME")?,
            pick(cli.docker_auth_email, "DOCKER_AUTH_EMAIL")?,
            pick(cli.docker_auth_password, "DOCKER_AUTH_PASSWORD")?,
        )?;
        let instance = pick(cli.instance, "PIPES_INSTANCE")?.unwrap_or_else(|| "pipes".into());
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 32
                && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !s.starts_with('-')
        };
        if !name_ok(&instance) {
            return Err(err("PIPES_INSTANCE", format!("expected up to 32 of a-z, 0-9 and '-', got '{instance}'")));
        }
        let labels = parse_labels(pick(cli.labels, "PIPES_LABELS")?.as_deref().unwrap_or(""))?;
        let start_timeout = parse_duration("PIPES_START_TIMEOUT", pick(cli.start_timeout, "PIPES_START_TIMEOUT")?, 60_000)?;
        let defaults = Defaults { memory, cpus, health_timeout: start_timeout };
        let failure_ttl = parse_duration("PIPES_FAILURE_TTL", pick(cli.failure_ttl, "PIPES_FAILURE_TTL")?, 10_000)?;
        let server_conf = pick(cli.server_conf, "PIPES_SERVER_CONF")?.map(PathBuf::from);

        Ok(Settings {
            listen,
            domain,
            registry,
            network,
            hostname: src.hostname.clone(),
            in_container: src.in_container,
            config_dir,
            policy,
            api_token,
            api_auth,
            max_containers,
            max_pulls,
            defaults,
            docker_host,
            registry_auth,
            instance,
            labels,
            start_timeout,
            failure_ttl,
            server_conf,
            upgrade: cli.upgrade,
            test: cli.test,
        })
    }

    /// The full reference of a deployment's image, registry included.
    pub fn image_ref(&self, d: &crate::route::Deployment) -> String {
        match &self.registry {
            Some(r) => format!("{r}/{}/{}:{}", d.user, d.repo, d.tag),
            None => format!("{}/{}:{}", d.user, d.repo, d.tag),
        }
    }

    /// The registry host as the engine names it in credentials.
    pub fn registry_host(&self) -> &str {
        match &self.registry {
            Some(r) => r.split('/').next().unwrap_or(r),
            None => "docker.io",
        }
    }
}

fn parse_listen(value: &str) -> Result<Vec<SocketAddr>, SettingError> {
    let addrs: Result<Vec<SocketAddr>, _> = value
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(|a| a.parse::<SocketAddr>().map_err(|_| a))
        .collect();
    match addrs {
        Ok(a) if !a.is_empty() => Ok(a),
        Ok(_) => Err(err("PIPES_LISTEN", "expected at least one address:port, e.g. 0.0.0.0:8080")),
        Err(bad) => Err(err("PIPES_LISTEN", format!("expected address:port such as 0.0.0.0:8080 or [::]:8080, got '{bad}'"))),
    }
}

fn parse_domain(domain: Option<String>, levels: Option<String>) -> Result<Domain, SettingError> {
    let levels = match levels {
        Some(l) => Some(
            l.trim()
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=16).contains(n))
                .ok_or_else(|| err("DOMAINLEVELS", format!("expected a number from 1 to 16, got '{l}'")))?,
        ),
        None => None,
    };
    match domain {
        Some(d) => {
            let d = d.trim().trim_matches('.').to_ascii_lowercase();
            let label_ok = |l: &str| {
                !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            };
            if !d.split('.').all(label_ok) {
                return Err(err("PIPES_DOMAIN", format!("expected a domain name such as pipe.example.com, got '{d}'")));
            }
            let count = d.split('.').count();
            if let Some(n) = levels.filter(|n| *n != count) {
                return Err(err(
                    "DOMAINLEVELS",
                    format!("is {n} but PIPES_DOMAIN '{d}' has {count} labels; set only one of them"),
                ));
            }
            Ok(Domain::Suffix(d))
        }
        None => Ok(Domain::Levels(levels.unwrap_or(2))),
    }
}

fn parse_registry(value: &str) -> Result<String, SettingError> {
    let r = value.trim().trim_end_matches('/');
    let ok = !r.is_empty()
        && !r.contains("://")
        && !r.starts_with('/')
        && r.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-:/[]".contains(&b));
    if ok {
        Ok(r.to_owned())
    } else {
        Err(err("PIPES_REGISTRY", format!("expected host[:port][/path] without scheme, e.g. 127.0.0.1:5000, got '{value}'")))
    }
}

fn parse_auth(
    enabled: Option<String>,
    username: Option<String>,
    email: Option<String>,
    password: Option<String>,
) -> Result<Option<RegistryAuth>, SettingError> {
    let enabled = match enabled.as_deref().map(|v| v.trim().to_ascii_lowercase()) {
        None => false,
        Some(v) if ["true", "1", "yes", "on"].contains(&v.as_str()) => true,
        Some(v) if ["false", "0", "no", "off"].contains(&v.as_str()) => false,
        Some(v) => return Err(err("DOCKER_AUTH", format!("expected true or false, got '{v}'"))),
    };
    if !enabled {
        return Ok(None);
    }
    let username = username.ok_or_else(|| err("DOCKER_AUTH_USERNAME", "is required when DOCKER_AUTH=true"))?;
    let password = password.ok_or_else(|| err("DOCKER_AUTH_PASSWORD", "is required when DOCKER_AUTH=true"))?;
    Ok(Some(RegistryAuth { username, email, password: Secret(password) }))
}

fn parse_labels(value: &str) -> Result<Vec<(String, String)>, SettingError> {
    value
        .split(',')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap_or((l, ""));
            let key_ok = !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b));
            if !key_ok {
                Err(err("PIPES_LABELS", format!("expected key=value pairs, got '{l}'")))
            } else if crate::engine::RESERVED_LABELS.contains(&k) {
                Err(err("PIPES_LABELS", format!("label '{k}' is set by Pipes itself")))
            } else {
                Ok((k.to_owned(), v.to_owned()))
            }
        })
        .collect()
}

fn parse_count(name: &'static str, value: Option<String>, default: usize) -> Result<usize, SettingError> {
    match value {
        None => Ok(default),
        Some(v) => v
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=100_000).contains(n))
            .ok_or_else(|| err(name, format!("expected a whole number from 1 to 100000, got '{v}'"))),
    }
}

fn parse_duration(name: &'static str, value: Option<String>, default_ms: u64) -> Result<Duration, SettingError> {
    let Some(value) = value else {
        return Ok(Duration::from_millis(default_ms));
    };
    let v = value.trim();
    // A bare number is seconds.
    let parsed = match v.parse::<u64>() {
        Ok(secs) => Ok(Duration::from_secs(secs)),
        Err(_) => humantime::parse_duration(v),
    };
    match parsed {
        Ok(d) if d > Duration::ZERO && d <= Duration::from_secs(24 * 3600) => Ok(d),
        _ => Err(err(name, format!("expected a duration such as 60s, 1500ms or 2m (up to 24h), got '{value}'"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources(vars: &[(&str, &str)]) -> Sources {
        Sources { env: vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(), ..Sources::default() }
    }

    fn load(vars: &[(&str, &str)]) -> Result<Settings, SettingError> {
        Settings::from_sources(Cli::default(), &sources(vars))
    }

    #[test]
    fn defaults_are_safe() {
        let s = load(&[]).unwrap();
        assert_eq!(s.listen, vec!["0.0.0.0:8080".parse().unwrap()]);
        assert_eq!(s.domain, Domain::Levels(2));
        assert_eq!(s.network, None);
        assert!(s.policy.patterns().is_empty(), "nothing may be deployed by default");
        assert!(s.api_token.is_none());
        assert!(s.registry_auth.is_none());
        assert_eq!(s.start_timeout, Duration::from_secs(60));
    }

    #[test]
    fn bad_values_name_the_variable() {
        let cases = [
            ("PIPES_LISTEN", "nope"),
            ("DOMAINLEVELS", "zero"),
            ("DOMAINLEVELS", "0"),
            ("PIPES_REGISTRY", "https://r.example.com"),
            ("PIPES_ALLOW", "alice"),
            ("DOCKER_HOST", "ssh://x"),
            ("DOCKER_AUTH", "maybe"),
            ("PIPES_START_TIMEOUT", "soon"),
            ("PIPES_INSTANCE", "Has Space"),
            ("PIPES_LABELS", "pipes.managed=x"),
            ("PIPES_API_TOKEN", "short"),
            ("PIPES_API_AUTH", "maybe"),
            ("PIPES_MAX_CONTAINERS", "0"),
            ("PIPES_MAX_PULLS", "many"),
            ("PIPES_DEFAULT_MEMORY", "1k"),
            ("PIPES_DEFAULT_CPUS", "-1"),
        ];
        for (name, value) in cases {
            let e = load(&[(name, value)]).unwrap_err();
            assert_eq!(e.name, name, "{name}={value}: {e}");
            assert!(!e.to_string().contains('\n'));
        }
    }

    #[test]
    fn flags_win_over_environment() {
        let cli = Cli { listen: Some("127.0.0.1:9000".into()), ..Cli::default() };
        let s = Settings::from_sources(cli, &sources(&[("PIPES_LISTEN", "0.0.0.0:1")])).unwrap();
        assert_eq!(s.listen, vec!["127.0.0.1:9000".parse().unwrap()]);
    }

    #[test]
    fn values_can_come_from_files() {
        let dir = std::env::temp_dir().join(format!("pipes-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("password");
        std::fs::write(&file, "s3cret\n").unwrap();
        let path = file.to_str().unwrap();
        let s = load(&[
            ("DOCKER_AUTH", "true"),
            ("DOCKER_AUTH_USERNAME", "alice"),
            ("DOCKER_AUTH_PASSWORD_FILE", path),
        ])
        .unwrap();
        let auth = s.registry_auth.unwrap();
        assert_eq!(auth.password.expose(), "s3cret");
        assert!(!format!("{auth:?}").contains("s3cret"));
        let both = load(&[("DOCKER_AUTH_PASSWORD", "x"), ("DOCKER_AUTH_PASSWORD_FILE", path)]).unwrap_err();
        assert_eq!(both.name, "DOCKER_AUTH_PASSWORD");
        let missing = load(&[("PIPES_API_TOKEN_FILE", "/nonexistent/token")]).unwrap_err();
        assert_eq!(missing.name, "PIPES_API_TOKEN");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn auth_needs_user_and_password() {
        assert_eq!(load(&[("DOCKER_AUTH", "true")]).unwrap_err().name, "DOCKER_AUTH_USERNAME");
        assert!(load(&[("DOCKER_AUTH", "false"), ("DOCKER_AUTH_USERNAME", "a")]).unwrap().registry_auth.is_none());
    }

    #[test]
    fn domain_settings() {
        assert_eq!(load(&[("DOMAINLEVELS", "3")]).unwrap().domain, Domain::Levels(3));
        assert_eq!(
            load(&[("PIPES_DOMAIN", "Pipe.Example.com")]).unwrap().domain,
            Domain::Suffix("pipe.example.com".into())
        );
        assert_eq!(load(&[("PIPES_DOMAIN", "pipe.example.com"), ("DOMAINLEVELS", "2")]).unwrap_err().name, "DOMAINLEVELS");
    }

    #[test]
    fn network_names_are_checked() {
        assert_eq!(load(&[("PIPES_NETWORK", "pipes-net")]).unwrap().network.as_deref(), Some("pipes-net"));
        assert_eq!(load(&[("PIPES_NETWORK", "a b")]).unwrap_err().name, "PIPES_NETWORK");
    }

    #[test]
    fn image_refs_carry_the_registry() {
        let d = crate::route::Deployment::parse("alice/app:v1").unwrap();
        assert_eq!(load(&[]).unwrap().image_ref(&d), "alice/app:v1");
        let s = load(&[("PIPES_REGISTRY", "127.0.0.1:5000/")]).unwrap();
        assert_eq!(s.image_ref(&d), "127.0.0.1:5000/alice/app:v1");
        assert_eq!(s.registry_host(), "127.0.0.1:5000");
    }
}

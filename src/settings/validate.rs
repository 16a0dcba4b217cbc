//! From flags, environment and defaults to one validated [`Settings`]:
//! values that depend on each other are checked here, once.

use std::ffi::OsString;
use std::net::SocketAddr;

use clap::{CommandFactory, FromArgMatches};

use crate::auth::ApiAuth;
use crate::config::{ByteSize, Defaults, DEFAULT_PIDS};
use crate::engine::docker::DockerOptions;
use crate::engine::RegistryAuth;
use crate::route::{Domain, Hosts};

use super::cli::*;
use super::*;

/// The open-files limit assumed when the process's cannot be read.
const DEFAULT_OPEN_FILES: u64 = 1024;
/// Descriptors kept out of `PIPES_MAX_CONNECTIONS`' default.
const RESERVED_FILES: u64 = 64;

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
        let (scheme, port) = match &tls {
            Some(_) => ("https", https_port),
            None => ("http", cli.listen.0.first().map_or(80, SocketAddr::port)),
        };
        let webhooks = match (cli.webhook_url, cli.webhook_secret) {
            (Some(urls), Some(secret)) => Some(WebhookSettings { urls: urls.0, secret, scheme, port }),
            // Unsigned, a receiver could not tell Pipes from anyone who knows its URL.
            (Some(_), None) => return Err(err("PIPES_WEBHOOK_SECRET", "is required with PIPES_WEBHOOK_URL: receivers check every delivery's signature")),
            (None, Some(_)) => return Err(err("PIPES_WEBHOOK_URL", "is required with PIPES_WEBHOOK_SECRET: say where to send webhooks")),
            (None, None) => None,
        };
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
                access: cli.access.unwrap_or_default(),
                noindex: cli.noindex,
                expire_after: cli.expire_after.after(),
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
            max_streams_per_client: cli.max_streams_per_client,
            public_logs: cli.public_logs,
            underscore_headers: cli.underscore_headers,
            ceilings,
            trusted_proxies: cli.trusted_proxies.unwrap_or_default(),
            webhooks,
            disk_min_free: cli.disk_min_free,
            image_keep: cli.image_keep,
            disk_high: cli.disk_high,
            access: AccessSettings {
                forward_auth_timeout: cli.forward_auth_timeout,
                forward_auth_urls: cli.forward_auth_urls.map(|u| u.0).unwrap_or_default(),
            },
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

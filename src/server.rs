//! Wiring: the control runtime, the backend, the fleet, and the Pingora
//! server with its services around them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pingora::apps::HttpServerOptions;
use pingora::proxy::http_proxy;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{ExecutionPhase, RunArgs, Server};
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use tokio::sync::broadcast;

use crate::access_log;
use crate::auth::ApiAuth;
use crate::connection::Gate;
use crate::engine::docker::Docker;
use crate::engine::swarm::Swarm;
use crate::engine::Backend;
use crate::fleet::{Fleet, Janitor, Watcher};
use crate::proxy::{Proxy, HANDING_OVER, IN_FLIGHT};
use crate::scrape::Scrape;
use crate::settings::BackendKind;
use crate::settings::{AccessLog, Settings};
use crate::store::{Store, SwarmConfigs};
use crate::tls::acme::Renewals;
use crate::tls::{Acme, Tls};
use crate::webhooks::Webhooks;
use crate::websocket;

/// Seconds Pingora gives runtimes to end after the drain, before it exits.
const SHUTDOWN_TIMEOUT_SECS: u64 = 1;
/// How long before the drain timeout WebSockets are sent their close frame.
const WEBSOCKET_CLOSE_LEAD: Duration = Duration::from_millis(500);

/// Why Pipes could not start.
pub type StartError = Box<dyn std::error::Error + Send + Sync>;

/// Serves until a signal stops the process.
pub fn run(settings: Settings) -> Result<(), StartError> {
    let conf = server_conf(&settings)?;
    if settings.test {
        println!("pipes: settings and server configuration are valid");
        return Ok(());
    }
    if !settings.upgrade {
        check_listeners(&settings)?;
    }
    crate::reply::show_logs_to_public(settings.public_logs);

    // Cold starts and backend calls live on their own runtime: a slow pull
    // never occupies a proxy thread, and the engine connection has one home.
    let control = tokio::runtime::Builder::new_multi_thread().worker_threads(1).thread_name("pipes-control").enable_all().build()?;
    let (backend, store): (Arc<dyn Backend>, Store) = match settings.backend {
        BackendKind::Docker => (Arc::new(control.block_on(Docker::connect(&settings.docker))), Store::dir(settings.config_dir.clone())),
        BackendKind::Swarm => {
            let swarm = Arc::new(Swarm::new(&settings.docker));
            (swarm.clone(), Store::new(Arc::new(SwarmConfigs::new(swarm.moby().clone()))))
        }
    };
    let fleet = Arc::new(Fleet::new(&settings, backend, store.clone(), control.handle().clone()));
    match control.block_on(fleet.describe_backend()) {
        Ok(description) => log::info!("{description}"),
        Err(e) => log::warn!("{e}; deployments answer 503 until the engine answers"),
    }
    for problem in control.block_on(store.check()) {
        log::error!("{problem}");
    }
    if let Err(e) = control.block_on(fleet.load_access()) {
        log::warn!("{e}; every deployment answers 503 until its access rules can be read");
    }
    match control.block_on(fleet.claim(settings.upgrade)) {
        Ok(None) => {}
        Ok(Some(holder)) => {
            return Err(
                format!("another Pipes of instance '{}' runs ({holder}); stop it, or give this one another PIPES_INSTANCE", settings.docker.instance).into()
            )
        }
        Err(e) => log::warn!("cannot check that no other Pipes of instance '{}' runs: {e}", settings.docker.instance),
    }
    match control.block_on(fleet.adopt()) {
        Ok(n) => log::info!("adopted {n} container(s) of instance '{}'", settings.docker.instance),
        Err(e) => log::warn!("cannot adopt running containers yet: {e}"),
    }
    log_summary(&settings);

    let opt = Opt { upgrade: settings.upgrade, ..Opt::default() };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();
    // Two Pingora apps behind each gate: HTTP/1, and HTTP/2 without TLS
    // (over TLS, either speaks HTTP/2 when ALPN chose it).
    let access_log = match settings.access_log {
        AccessLog::Json => Some(Arc::new(access_log::AccessLog::start()?)),
        AccessLog::Off => None,
    };
    let stream_limits = Arc::new(crate::events::Limits::new(&settings));
    let app = |h2c: bool, acme: Option<Arc<Acme>>| {
        let mut app = http_proxy(&server.configuration, Proxy::new(fleet.clone(), store.clone(), stream_limits.clone(), &settings, acme, access_log.clone()));
        let mut options = HttpServerOptions::default();
        options.h2c = h2c;
        options.h2_idle_timeout = Some(settings.keepalive_timeout);
        app.server_options = Some(options);
        app
    };
    let acme = match settings.tls.as_ref().and_then(|t| t.acme.as_ref()) {
        Some(acme) => Some(Acme::new(acme, &settings.config_dir, fleet.clone(), settings.hosts.clone(), control.handle().clone())?),
        None => None,
    };
    let gate = Gate::new(app(false, acme.clone()), app(true, acme.clone()), settings.connections);
    if let Some(tls_settings) = &settings.tls {
        let tls = Arc::new(Tls::new(tls_settings, acme.clone())?);
        let mut https = Service::new("Pipes HTTPS".to_owned(), gate.with_tls(app(false, acme.clone()), app(true, acme.clone()), tls));
        for addr in &tls_settings.listen {
            https.add_tcp(&addr.to_string());
        }
        server.add_service(https);
    }
    if let (Some(metrics_settings), Some(metrics)) = (&settings.metrics, fleet.metrics()) {
        let scrape = Scrape { metrics: metrics.clone(), fleet: fleet.clone(), acme: acme.clone(), access_log: access_log.clone(), connections: gate.places() };
        let mut endpoint = Service::new("Pipes metrics".to_owned(), scrape);
        for addr in &metrics_settings.listen {
            endpoint.add_tcp(&addr.to_string());
        }
        server.add_service(endpoint);
    }
    let mut proxy = Service::new("Pipes".to_owned(), gate);
    for addr in &settings.listen {
        proxy.add_tcp(&addr.to_string());
    }
    server.add_service(proxy);
    if let Some(acme) = acme {
        server.add_service(background_service("certificate renewals", Renewals(acme)));
    }
    server.add_service(background_service("fleet upkeep", Janitor::new(fleet.clone())));
    server.add_service(background_service("engine events", Watcher::new(fleet.clone())));
    if let Some(webhooks) = &settings.webhooks {
        server.add_service(background_service("webhooks", Webhooks::new(fleet.clone(), webhooks, &settings)));
    }
    let fleet_at_exit = fleet.clone();
    exit_when_drained(server.watch_execution_phase(), fleet, settings.drain_timeout);
    server.run(RunArgs::default());
    fleet_at_exit.release_claim();
    // The control runtime outlives the server: in-flight starts end with it.
    drop(control);
    Ok(())
}

/// Binds every listening address once and lets go: Pingora binds them again
/// on threads of its own, where a failure is a panic that leaves the process
/// running and serving nothing. An upgrade takes its sockets over instead.
fn check_listeners(settings: &Settings) -> Result<(), StartError> {
    let tls = settings.tls.iter().flat_map(|t| t.listen.iter().map(|a| (a, "PIPES_TLS_LISTEN")));
    let metrics = settings.metrics.iter().flat_map(|m| m.listen.iter().map(|a| (a, "PIPES_METRICS_LISTEN")));
    let all = settings.listen.iter().map(|a| (a, "PIPES_LISTEN")).chain(tls).chain(metrics);
    for (addr, setting) in all {
        std::net::TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr} ({setting}): {e}"))?;
    }
    Ok(())
}

/// Pingora's configuration: the YAML file if given, with Pipes' shutdown defaults.
fn server_conf(settings: &Settings) -> Result<ServerConf, StartError> {
    let mut conf = match &settings.server_conf {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| format!("PIPES_SERVER_CONF: cannot read {}: {e}", path.display()))?;
            ServerConf::from_yaml(&text).map_err(|e| format!("PIPES_SERVER_CONF: {}: {e}", path.display()))?
        }
        None => ServerConf { threads: std::thread::available_parallelism().map_or(1, |n| n.get()), ..ServerConf::default() },
    };
    if conf.daemon {
        return Err("the server configuration asks for daemon: true; run Pipes under a supervisor instead".into());
    }
    // After SIGTERM or SIGQUIT the listeners close at once and Pingora waits
    // its grace period for what is in flight: that wait is PIPES_DRAIN_TIMEOUT,
    // cut short by `exit_when_drained`.
    let drain = settings.drain_timeout.as_secs_f64().ceil() as u64;
    if let Some(yaml) = conf.grace_period_seconds.filter(|g| *g != drain) {
        log::warn!("grace_period_seconds: {yaml} in the server configuration is replaced by PIPES_DRAIN_TIMEOUT ({drain} s)");
    }
    conf.grace_period_seconds = Some(drain);
    conf.graceful_shutdown_timeout_seconds.get_or_insert(SHUTDOWN_TIMEOUT_SECS);
    Ok(conf)
}

/// Watches Pingora's shutdown: when the process hands over (SIGQUIT) or
/// stops (SIGTERM) its fleet retires, and once the listeners are closed the
/// process exits as soon as no request is in flight, rather than after the
/// whole grace period. Shortly before the drain timeout, WebSockets still
/// open are closed with 1001.
fn exit_when_drained(mut phases: broadcast::Receiver<ExecutionPhase>, fleet: Arc<Fleet>, drain: Duration) {
    let watch = move || {
        loop {
            match phases.blocking_recv() {
                Ok(ExecutionPhase::GracefulUpgradeTransferringFds) => {
                    fleet.retire();
                    HANDING_OVER.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(ExecutionPhase::GracefulTerminate) => fleet.retire(),
                Ok(ExecutionPhase::ShutdownGracePeriod) => break,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
        fleet.retire();
        let began = Instant::now();
        let close_at = drain.saturating_sub(WEBSOCKET_CLOSE_LEAD);
        let mut reported = 0;
        loop {
            let open = IN_FLIGHT.total();
            if open == 0 {
                break;
            }
            if began.elapsed() >= close_at {
                websocket::going_away();
            }
            if open != reported {
                log::info!("draining: {open} request(s) in flight");
                reported = open;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        log::info!("every request in flight finished after {:?}; exiting", began.elapsed());
        fleet.release_claim();
        std::process::exit(0);
    };
    if let Err(e) = std::thread::Builder::new().name("pipes-drain".into()).spawn(watch) {
        log::warn!("cannot watch the shutdown, stopping will wait the whole PIPES_DRAIN_TIMEOUT: {e}");
    }
}

fn log_summary(settings: &Settings) {
    let addrs = |list: &[std::net::SocketAddr]| list.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ");
    log::info!("listening on {} for {}", addrs(&settings.listen), settings.hosts);
    if let Some(tls) = &settings.tls {
        let on_demand = tls.acme.as_ref().map(|a| format!("; certificates on demand from {}", a.directory)).unwrap_or_default();
        log::info!("HTTPS on {}{on_demand}", addrs(&tls.listen));
    }
    if let Some(port) = settings.https_redirect {
        log::info!("plain-HTTP requests are redirected to https (port {port})");
    }
    if let Some(metrics) = &settings.metrics {
        log::info!("Prometheus metrics on {} at /metrics", addrs(&metrics.listen));
    }
    let allowed: Vec<String> = settings.policy.patterns().iter().map(|p| p.to_string()).collect();
    if allowed.is_empty() {
        log::warn!("PIPES_ALLOW is empty: no deployment may be started until the operator allows some");
    } else {
        log::info!("deployments allowed: {}", allowed.join(", "));
    }
    match &settings.api_auth {
        ApiAuth::Off => log::warn!("management API open to anyone who can reach Pipes (PIPES_API_AUTH=none)"),
        ApiAuth::Tokens { admin: None } => log::info!(
            "management API needs a token that tokens.json in the config dir grants; \
             PIPES_API_TOKEN sets an admin token"
        ),
        ApiAuth::Tokens { admin: Some(_) } => log::info!("management API needs a bearer token"),
    }
    log::info!("configs in {}", settings.config_dir.display());
    let limits = &settings.connections;
    log::info!(
        "at most {} client connections; each sends its first request head within {} ({} bytes at most)",
        limits.max_connections,
        humantime::format_duration(limits.header_timeout),
        limits.max_header_size
    );
    // Each tag check is a manifest GET at the registry, which Docker Hub counts as a pull.
    if let (None, Some(every)) = (&settings.registry, settings.defaults.watch) {
        if every < Duration::from_secs(300) {
            log::warn!(
                "PIPES_WATCH={} against Docker Hub: every check of every running deployment counts as a pull \
                 (100 per 6 hours anonymous); prefer 5m or more, or Docker Hub's webhook",
                humantime::format_duration(every)
            );
        }
    }
}

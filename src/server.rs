//! Wiring: the control runtime, the fleet, and the Pingora server around them.

use std::convert::Infallible;
use std::sync::Arc;

use pingora::apps::HttpServerOptions;
use pingora::proxy::http_proxy_service;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;

use crate::engine::Engine;
use crate::fleet::Fleet;
use crate::proxy::Pipes;
use crate::security::ApiAuth;
use crate::settings::{Reach, Settings};

/// Seconds between SIGTERM and closing the listeners (Pingora's default is 300).
const GRACE_PERIOD_SECS: u64 = 1;
/// Longest wait for requests in flight after the listeners closed.
const SHUTDOWN_TIMEOUT_SECS: u64 = 3;

/// How often containers are checked against their idle timeout.
const IDLE_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// Idle deployments are dropped from the table every this many checks.
const SWEEP_EVERY_TICKS: u64 = 60;

/// Why Pipes could not start.
pub type StartError = Box<dyn std::error::Error + Send + Sync>;

/// Serves until a signal stops the process.
pub fn run(settings: Settings) -> Result<Infallible, StartError> {
    let conf = server_conf(&settings)?;
    if settings.test {
        println!("pipes: settings and server configuration are valid");
        std::process::exit(0);
    }
    let settings = Arc::new(settings);

    // Cold starts and engine calls live on their own runtime: a slow pull never
    // occupies a proxy thread, and the engine connection has one home.
    let control = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("pipes-control")
        .enable_all()
        .build()?;
    let reach = control.block_on(decide_reach(&settings));
    let fleet = Arc::new(Fleet::new(settings.clone(), Engine::new(&settings, reach), control.handle().clone()));
    for problem in fleet.deployer().store().check() {
        log::error!("{problem}");
    }
    match control.block_on(fleet.adopt()) {
        Ok(n) => log::info!("adopted {n} container(s) of instance '{}'", settings.instance),
        Err(e) => log::warn!("cannot adopt running containers yet: {e}"),
    }
    log_summary(&settings, fleet.engine().reach());
    let sweeper = fleet.clone();
    control.spawn(async move {
        let mut every = tokio::time::interval(IDLE_CHECK_INTERVAL);
        for tick in 1u64.. {
            every.tick().await;
            sweeper.stop_idle();
            if tick % SWEEP_EVERY_TICKS == 0 {
                let dropped = sweeper.sweep();
                if dropped > 0 {
                    log::debug!("dropped {dropped} idle deployment(s) from the table");
                }
            }
        }
    });

    let opt = Opt { upgrade: settings.upgrade, ..Opt::default() };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();
    let mut proxy = http_proxy_service(&server.configuration, Pipes::new(fleet, &settings));
    if let Some(app) = proxy.app_logic_mut() {
        // Accept HTTP/2 without TLS (prior knowledge) beside HTTP/1.
        let mut options = HttpServerOptions::default();
        options.h2c = true;
        app.server_options = Some(options);
    }
    for addr in &settings.listen {
        proxy.add_tcp(&addr.to_string());
    }
    server.add_service(proxy);
    // The control runtime must outlive the server, which never returns.
    let _control = control;
    server.run_forever()
}

/// How Pipes reaches its containers: over `PIPES_NETWORK` if named; over a network
/// of its own container if the engine runs Pipes itself (127.0.0.1 is then not
/// the host's); else at ports published on 127.0.0.1.
async fn decide_reach(settings: &Settings) -> Reach {
    if let Some(network) = &settings.network {
        return Reach::Network(network.clone());
    }
    let engine = Engine::new(settings, Reach::Published);
    match engine.version().await {
        Ok(version) => log::info!("Docker engine {version} at {}", settings.docker_host),
        Err(e) => log::warn!("{e}; deployments answer 503 until the engine answers"),
    }
    let own = match &settings.hostname {
        Some(hostname) => engine.networks_of(hostname).await,
        None => Ok(None),
    };
    match own {
        Ok(Some(networks)) => {
            let network = if networks.iter().any(|n| n == "bridge") {
                "bridge".to_owned()
            } else {
                networks.into_iter().next().unwrap_or_else(|| "bridge".to_owned())
            };
            log::info!("Pipes runs in a container of this engine: joining its containers on network '{network}'");
            Reach::Network(network)
        }
        Ok(None) => Reach::Published,
        Err(_) if settings.in_container => Reach::Network("bridge".to_owned()),
        Err(_) => Reach::Published,
    }
}

/// Pingora's configuration: the YAML file if given, with Pipes' shutdown defaults.
fn server_conf(settings: &Settings) -> Result<ServerConf, StartError> {
    let mut conf = match &settings.server_conf {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("PIPES_SERVER_CONF: cannot read {}: {e}", path.display()))?;
            ServerConf::from_yaml(&text).map_err(|e| format!("PIPES_SERVER_CONF: {}: {e}", path.display()))?
        }
        None => ServerConf {
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            ..ServerConf::default()
        },
    };
    if conf.daemon {
        return Err("the server configuration asks for daemon: true; run Pipes under a supervisor instead".into());
    }
    conf.grace_period_seconds.get_or_insert(GRACE_PERIOD_SECS);
    conf.graceful_shutdown_timeout_seconds.get_or_insert(SHUTDOWN_TIMEOUT_SECS);
    Ok(conf)
}

fn log_summary(settings: &Settings, reach: &Reach) {
    let listen: Vec<String> = settings.listen.iter().map(|a| a.to_string()).collect();
    log::info!("listening on {} for {}", listen.join(", "), settings.domain);
    match reach {
        Reach::Published => log::info!("containers are reached on 127.0.0.1 at published ports"),
        Reach::Network(n) => log::info!("containers are reached at their IP on network '{n}'"),
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
            "management API closed but to tokens that tokens.json in the config dir grants; \
             PIPES_API_TOKEN sets an admin token"
        ),
        ApiAuth::Tokens { admin: Some(_) } => log::info!("management API needs a bearer token"),
    }
    log::info!("configs in {}", settings.config_dir.display());
}

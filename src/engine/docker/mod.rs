//! The Docker backend: each deployment is one container of the local engine.
//!
//! Containers are named `{instance}.{user}.{repo}.{tag}.{generation}`, the
//! generation being the first 12 hex digits of the image's digest; the engine
//! refuses a second container of a name, so two starts (or two Pipes of one
//! instance) can never make two containers of one generation. They carry
//! Pipes' labels ([`super::RESERVED_LABELS`] and `PIPES_LABELS`), which is how
//! a restarted Pipes finds them again.
//!
//! How containers are reached ([`Reach`]) is decided once, when connecting:
//! over `PIPES_NETWORK` if named; over a network of Pipes' own container if
//! the engine runs Pipes itself (127.0.0.1 is then not the host's); else, with
//! the engine on this host's socket and its bridges this host's interfaces
//! (not rootless, not in a VM), at their IP on this instance's own network;
//! else, or with `PIPES_PUBLISH_PORTS`, at ports published on 127.0.0.1. A
//! published port is served by the engine's port proxy, a process of its own
//! that every request then crosses twice: on a two-core machine it spent more
//! CPU per request than Pipes.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerStateStatusEnum, ContainerSummary, ContainerSummaryStateEnum, EndpointSettings, HealthStatusEnum,
    HostConfig, Mount, MountType, NetworkCreateRequest, NetworkingConfig, PortBinding, RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptions, ListContainersOptions, RemoveContainerOptions, RestartContainerOptions, StopContainerOptions, WaitContainerOptions,
};
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use tokio::sync::OnceCell;

use super::moby::events::event_of;
use super::moby::logs::log_options;
use super::moby::{grace_secs, health_config, Moby, NetworkKind};
use super::{
    generation_of, short_id, Backend, Claims, Event, Images, Instance, Pausing, Spec, LABEL_CONFIG, LABEL_CONFIG_HASH, LABEL_DEPLOYMENT, LABEL_DIGEST,
    LABEL_IDENTITY, LABEL_PORT, LABEL_SERVICE,
};
use crate::config::Restart;
use crate::error::PipesError;
use crate::route::Deployment;

pub use super::moby::DockerOptions;

mod claim;
use claim::Holder;

/// How Pipes reaches the containers it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    /// The container port is published on 127.0.0.1 with a random host port.
    Published,
    /// The container is on this instance's own network, a bridge of this
    /// host, and reached at its IP there.
    Bridge,
    /// The container joins this network and is reached at its IP there.
    Network(String),
}

/// The local Docker engine as a [`Backend`].
///
/// The connection is made on first use and kept, so Pipes starts (and answers
/// 503) while the engine is down, and picks it up once it answers.
#[derive(Clone)]
pub struct Docker {
    moby: Moby,
    reach: Reach,
    /// Set once this instance's own network exists (published or bridge mode).
    network: Arc<OnceCell<()>>,
    /// This process, as its claim on the instance name records it.
    holder: Holder,
    hostname: Option<String>,
    in_container: bool,
}

impl Docker {
    /// A backend for the engine at `options.host`, not yet connected, reaching
    /// containers as `reach` says.
    pub fn new(options: &DockerOptions, reach: Reach) -> Docker {
        Docker {
            moby: Moby::new(options),
            reach,
            network: Arc::new(OnceCell::new()),
            holder: Holder::me(options.hostname.as_deref()),
            hostname: options.hostname.clone(),
            in_container: options.in_container,
        }
    }

    /// A backend for the engine at `options.host`, with the way to reach
    /// containers decided by asking the engine (see the module docs).
    pub async fn connect(options: &DockerOptions) -> Docker {
        let probe = Docker::new(options, Reach::Published);
        let reach = match &options.network {
            Some(network) => Reach::Network(network.clone()),
            None => probe.own_network(options).await,
        };
        Docker { reach, ..probe }
    }

    /// The network of Pipes' own container, if the engine runs Pipes itself.
    async fn own_network(&self, options: &DockerOptions) -> Reach {
        let own = match &options.hostname {
            Some(hostname) => self.networks_of(hostname).await,
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
            Ok(None) if options.publish_ports => Reach::Published,
            Ok(None) => self.bridge_or_published().await,
            Err(_) if options.in_container => Reach::Network("bridge".to_owned()),
            Err(_) => Reach::Published,
        }
    }

    /// [`Reach::Bridge`] when the engine listens on this host's socket, is
    /// not rootless, and its default bridge is an interface of this host:
    /// its bridges are then this host's and containers answer at their IP.
    /// A rootless engine, or one in a VM, keeps its bridges in a network
    /// namespace of its own: [`Reach::Published`] then, as for an engine
    /// elsewhere.
    async fn bridge_or_published(&self) -> Reach {
        if !self.moby.host().starts_with("unix://") {
            return Reach::Published;
        }
        let Ok(docker) = self.docker().await else { return Reach::Published };
        let rootless = match docker.info().await {
            Ok(info) => info.security_options.unwrap_or_default().iter().any(|o| o.contains("rootless")),
            Err(_) => return Reach::Published,
        };
        let Ok(bridge) = docker.inspect_network("bridge", None).await else { return Reach::Published };
        let interface = bridge.options.and_then(|mut o| o.remove("com.docker.network.bridge.name")).unwrap_or_else(|| "docker0".to_owned());
        if !rootless && std::path::Path::new("/sys/class/net").join(&interface).exists() {
            Reach::Bridge
        } else {
            Reach::Published
        }
    }

    /// The client, connected and speaking an API version the engine knows.
    pub(super) async fn docker(&self) -> Result<&bollard::Docker, PipesError> {
        self.moby.client().await
    }

    /// The networks of container `name`, or `None` if the engine has no such container.
    async fn networks_of(&self, name: &str) -> Result<Option<Vec<String>>, PipesError> {
        match self.docker().await?.inspect_container(name, None).await {
            Ok(c) => Ok(Some(c.network_settings.and_then(|n| n.networks).map(|n| n.into_keys().collect()).unwrap_or_default())),
            Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => Ok(None),
            Err(e) => Err(self.moby.fail("inspect a container", e)),
        }
    }

    /// The container name of a generation: unique per instance, deployment
    /// and digest. Images without a digest (built locally) share the bare
    /// name. A service's is unique per deployment and service: a generation
    /// is hex digits, never `svc-`.
    fn container_name(&self, spec: &Spec) -> String {
        let d = &spec.deployment;
        match (&spec.service, &spec.digest) {
            (Some(service), _) => format!("{}.{}.{}.{}.svc-{service}", self.moby.instance(), d.user, d.repo, d.tag),
            (None, Some(digest)) => format!("{}.{}.{}.{}.{}", self.moby.instance(), d.user, d.repo, d.tag, generation_of(digest)),
            (None, None) => format!("{}.{}.{}.{}", self.moby.instance(), d.user, d.repo, d.tag),
        }
    }

    /// Containers of this instance, optionally only those of one deployment.
    async fn containers(&self, d: Option<&Deployment>) -> Result<Vec<ContainerSummary>, PipesError> {
        let mut labels = self.moby.instance_filter();
        labels.extend(d.map(|d| format!("{LABEL_DEPLOYMENT}={d}")));
        let options = ListContainersOptions { all: true, filters: Some(HashMap::from([("label".to_string(), labels)])), ..Default::default() };
        self.docker().await?.list_containers(Some(options)).await.map_err(|e| self.moby.fail("list containers", e))
    }

    /// Inspects a container by name or id; `None` when it does not exist or is
    /// not a deployment of Pipes.
    async fn inspect(&self, name: &str) -> Result<Option<Instance>, PipesError> {
        match self.docker().await?.inspect_container(name, None).await {
            Ok(c) => Ok(self.instance_of(c)),
            Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => Ok(None),
            Err(e) => Err(self.moby.fail("inspect a container", e)),
        }
    }

    fn instance_of(&self, c: ContainerInspectResponse) -> Option<Instance> {
        let state = c.state.unwrap_or_default();
        // A container on its way out (`docker rm -f`) is as good as absent.
        if matches!(state.status, Some(ContainerStateStatusEnum::REMOVING | ContainerStateStatusEnum::DEAD)) {
            return None;
        }
        let labels = c.config.and_then(|cfg| cfg.labels).unwrap_or_default();
        let net = c.network_settings.unwrap_or_default();
        // The engine calls a paused container running; Pipes does not.
        let paused = state.paused.unwrap_or(false);
        let running = state.running.unwrap_or(false) && !paused;
        // The engine reports a zero time for a container that never ran.
        let started_at = state.started_at.filter(|s| !s.starts_with("0001-"));
        let exit_code = (!running && !paused && started_at.is_some()).then(|| state.exit_code.unwrap_or(0));
        let health = state.health.and_then(|h| h.status).filter(|s| !matches!(s, HealthStatusEnum::EMPTY | HealthStatusEnum::NONE)).map(|s| s.to_string());
        let seen = Seen { id: c.id?, running, paused, exit_code, started_at, health };
        self.facts(
            seen,
            &labels,
            |port| {
                let bindings = net.ports.as_ref()?.get(&format!("{port}/tcp"))?.as_ref()?;
                bindings.iter().find_map(|b| b.host_port.as_deref()?.parse().ok())
            },
            |network| net.networks.as_ref()?.get(network)?.ip_address.as_deref()?.parse().ok(),
        )
        .map(|i| Instance { image_id: c.image, ..i })
    }

    /// An instance from `docker ps` facts, which lack the start time.
    fn instance_of_summary(&self, c: ContainerSummary) -> Option<Instance> {
        if matches!(c.state, Some(ContainerSummaryStateEnum::REMOVING | ContainerSummaryStateEnum::DEAD)) {
            return None;
        }
        let labels = c.labels.unwrap_or_default();
        let running = c.state == Some(ContainerSummaryStateEnum::RUNNING);
        let paused = c.state == Some(ContainerSummaryStateEnum::PAUSED);
        // "Exited (3) 5 minutes ago"
        let exit_code = c.status.as_deref().and_then(|s| s.strip_prefix("Exited (")).and_then(|s| s.split(')').next()).and_then(|n| n.parse().ok());
        let ports = c.ports.unwrap_or_default();
        let networks = c.network_settings.and_then(|n| n.networks).unwrap_or_default();
        let seen = Seen { id: c.id?, running, paused, exit_code, started_at: None, health: None };
        self.facts(
            seen,
            &labels,
            |port| ports.iter().find(|p| p.private_port == port).and_then(|p| p.public_port),
            |network| networks.get(network)?.ip_address.as_deref()?.parse().ok(),
        )
        .map(|i| Instance { image_id: c.image_id, ..i })
    }

    /// An instance from what the engine says of a container; `None` if the
    /// container is not a deployment of Pipes.
    fn facts(
        &self,
        seen: Seen,
        labels: &HashMap<String, String>,
        host_port: impl FnOnce(u16) -> Option<u16>,
        network_ip: impl Fn(&str) -> Option<IpAddr>,
    ) -> Option<Instance> {
        let Seen { id, running, paused, exit_code, started_at, health } = seen;
        let deployment = Deployment::parse(labels.get(LABEL_DEPLOYMENT)?)?;
        let service = labels.get(LABEL_SERVICE).cloned();
        let port: Option<u16> = labels.get(LABEL_PORT).and_then(|p| p.parse().ok());
        // A paused container keeps its address for when it is thawed. A
        // service, and an app with services, is reached on its deployment's
        // network (port 0: no port to reach).
        let address = match (port.filter(|p| *p != 0), running || paused) {
            (Some(port), true) => match &self.reach {
                Reach::Published => host_port(port).map(|host_port| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), host_port)),
                reach => {
                    let usual = match (reach, &service) {
                        (_, Some(_)) => None,
                        (Reach::Network(name), None) => network_ip(name),
                        _ => network_ip(&self.instance_network()),
                    };
                    usual.or_else(|| network_ip(&self.moby.deployment_network(&deployment))).map(|ip| SocketAddr::new(ip, port))
                }
            },
            _ => None,
        };
        Some(Instance {
            id,
            deployment,
            service,
            running,
            paused,
            exit_code: exit_code.filter(|_| !running && !paused),
            spec_hash: labels.get(LABEL_CONFIG_HASH).cloned(),
            identity: labels.get(LABEL_IDENTITY).cloned(),
            port,
            started_at,
            address,
            digest: labels.get(LABEL_DIGEST).cloned(),
            image_id: None,
            config: labels.get(LABEL_CONFIG).cloned(),
            health,
        })
    }

    fn create_body(&self, spec: &Spec) -> ContainerCreateBody {
        let port_key = format!("{}/tcp", spec.port);
        let has_port = spec.port != 0;
        let mut host_config = HostConfig {
            // A fork bomb stays in its container; root in it cannot gain more.
            pids_limit: Some(i64::from(spec.pids)),
            cap_drop: Some(vec!["ALL".into()]),
            cap_add: Some(spec.capabilities.clone()),
            security_opt: Some(vec!["no-new-privileges:true".into()]),
            ..HostConfig::default()
        };
        if matches!(self.reach, Reach::Published) && has_port {
            let binding = PortBinding { host_ip: Some("127.0.0.1".into()), host_port: Some(String::new()) };
            host_config.port_bindings = Some(HashMap::from([(port_key.clone(), Some(vec![binding]))]));
        }
        // A service lives on its deployment's network alone, known by its
        // name, and so does an app with services: Pipes reaches that network
        // as it reaches its own (from this host's bridges, at a published
        // port, or by joining it), and the deployment is isolated there. An
        // app without services is on the network Pipes reaches it by.
        let (network, endpoint) = match (&spec.service, &self.reach) {
            (Some(name), _) => {
                (self.moby.deployment_network(&spec.deployment), EndpointSettings { aliases: Some(vec![name.clone()]), ..EndpointSettings::default() })
            }
            (None, _) if spec.network => (self.moby.deployment_network(&spec.deployment), EndpointSettings::default()),
            (None, Reach::Published | Reach::Bridge) => (self.instance_network(), EndpointSettings::default()),
            (None, Reach::Network(name)) => (name.clone(), EndpointSettings::default()),
        };
        host_config.network_mode = Some(network.clone());
        let networking = Some(NetworkingConfig { endpoints_config: Some(HashMap::from([(network, endpoint)])) });
        host_config.mounts = Some(
            spec.volumes
                .iter()
                .map(|(name, path)| Mount {
                    target: Some(path.clone()),
                    source: Some(self.moby.volume_name(&spec.deployment, name)),
                    typ: Some(MountType::VOLUME),
                    ..Mount::default()
                })
                .collect(),
        );
        host_config.memory = i64::try_from(spec.memory_bytes).ok();
        host_config.nano_cpus = Some((spec.cpus * 1e9).round() as i64);
        host_config.restart_policy = Some(RestartPolicy {
            name: Some(match spec.restart {
                Restart::No => RestartPolicyNameEnum::NO,
                Restart::OnFailure => RestartPolicyNameEnum::ON_FAILURE,
                Restart::Always => RestartPolicyNameEnum::ALWAYS,
                Restart::UnlessStopped => RestartPolicyNameEnum::UNLESS_STOPPED,
            }),
            maximum_retry_count: None,
        });
        ContainerCreateBody {
            image: Some(spec.image.clone()),
            labels: Some(self.moby.labels(spec)),
            env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            cmd: spec.cmd.clone(),
            exposed_ports: has_port.then(|| vec![port_key]),
            host_config: Some(host_config),
            networking_config: networking,
            healthcheck: spec.health_cmd.as_deref().map(health_config),
            ..Default::default()
        }
    }

    /// Pipes' own container when it runs in one of this engine's and
    /// reaches containers on a network: it joins each deployment's network
    /// to check its services.
    fn pipes_container(&self) -> Option<&str> {
        match (&self.reach, &self.hostname) {
            (Reach::Network(_), Some(me)) => Some(me),
            _ => None,
        }
    }

    /// `d`'s app instances, or its services, inspected: the start time tells
    /// the generations apart, the health state how a service is.
    async fn inspected(&self, d: &Deployment, services: bool) -> Result<Vec<Instance>, PipesError> {
        let mut instances = Vec::new();
        for c in self.containers(Some(d)).await? {
            let is_service = c.labels.as_ref().is_some_and(|l| l.contains_key(LABEL_SERVICE));
            if let (Some(id), true) = (c.id, is_service == services) {
                instances.extend(self.inspect(&id).await?);
            }
        }
        Ok(instances)
    }

    /// Waits (a while at most) until the container `name` is removed.
    async fn until_removed(&self, name: &str) {
        let Ok(docker) = self.docker().await else { return };
        let options = WaitContainerOptions { condition: "removed".into() };
        let mut wait = docker.wait_container(name, Some(options));
        let _ = tokio::time::timeout(REMOVAL_WAIT, wait.next()).await;
    }

    /// The network of this instance's containers in published and bridge mode.
    fn instance_network(&self) -> String {
        format!("pipes-{}", self.moby.instance())
    }

    /// Makes this instance's own network if it is missing: a bridge without
    /// inter-container traffic, so one deployment cannot call another past
    /// Pipes (Docker's default bridge lets them). Published ports reach
    /// containers on it as on any bridge.
    async fn ensure_network(&self) -> Result<(), PipesError> {
        if !matches!(self.reach, Reach::Published | Reach::Bridge) {
            return Ok(());
        }
        self.network
            .get_or_try_init(|| async {
                let docker = self.docker().await?;
                let name = self.instance_network();
                match docker.inspect_network(&name, None).await {
                    Ok(_) => return Ok(()),
                    Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => {}
                    Err(e) => return Err(self.moby.fail("inspect a network", e)),
                }
                let labels = self.moby.own_labels();
                let request = NetworkCreateRequest {
                    name: name.clone(),
                    driver: Some("bridge".into()),
                    options: Some(HashMap::from([("com.docker.network.bridge.enable_icc".into(), "false".into())])),
                    labels: Some(labels),
                    ..Default::default()
                };
                match docker.create_network(request).await {
                    Ok(_) => {
                        log::info!("created network {name} for this instance's containers (no traffic between them)");
                        Ok(())
                    }
                    // Made meanwhile by another Pipes of this instance.
                    Err(DockerError::DockerResponseServerError { status_code: 409, .. }) => Ok(()),
                    Err(e) => Err(self.moby.fail("create a network", e)),
                }
            })
            .await
            .map(|_| ())
    }

    /// Starts a container (a running one is left as it is).
    async fn start_container(&self, id: &str) -> Result<(), PipesError> {
        match self.docker().await?.start_container(id, None).await {
            Ok(()) | Err(DockerError::DockerResponseServerError { status_code: 304, .. }) => Ok(()),
            Err(e) => Err(self.moby.fail("start a container", e)),
        }
    }
}

#[async_trait]
impl Backend for Docker {
    async fn describe(&self) -> Result<String, PipesError> {
        let v = self.docker().await?.version().await.map_err(|e| self.moby.fail("read its version", e))?;
        let reach = match &self.reach {
            Reach::Published => "containers are reached on 127.0.0.1 at published ports".to_owned(),
            Reach::Bridge => format!("containers are reached at their IP on this instance's network '{}'", self.instance_network()),
            Reach::Network(n) => format!("containers are reached at their IP on network '{n}'"),
        };
        let live_restore = self.docker().await?.info().await.map_err(|e| self.moby.fail("read its state", e))?.live_restore_enabled.unwrap_or(false);
        let restart = if live_restore {
            "live-restore on: deployments keep running while the engine restarts"
        } else {
            "live-restore off: an engine restart stops every deployment (README: Upgrading the engine)"
        };
        Ok(format!("Docker engine {} (API {}) at {}; {reach}; {restart}", v.version.unwrap_or_default(), v.api_version.unwrap_or_default(), self.moby.host()))
    }

    async fn list(&self) -> Result<Vec<Instance>, PipesError> {
        Ok(self.containers(None).await?.into_iter().filter_map(|c| self.instance_of_summary(c)).collect())
    }

    async fn instances(&self, d: &Deployment) -> Result<Vec<Instance>, PipesError> {
        self.inspected(d, false).await
    }

    async fn services(&self, d: &Deployment) -> Result<Vec<Instance>, PipesError> {
        self.inspected(d, true).await
    }

    async fn volumes(&self, d: &Deployment) -> Result<Vec<String>, PipesError> {
        self.moby.deployment_volumes(d).await
    }

    async fn remove_shared(&self, d: &Deployment, keep_volumes: bool) -> Result<(), PipesError> {
        self.moby.remove_shared(d, keep_volumes, self.pipes_container()).await
    }

    fn images(&self) -> &dyn Images {
        &self.moby
    }

    async fn create(&self, spec: &Spec) -> Result<Instance, PipesError> {
        if !spec.network {
            self.ensure_network().await?;
        }
        self.moby.ensure_shared(spec, NetworkKind::Bridge, self.pipes_container()).await?;
        let name = self.container_name(spec);
        // Another attempt only after a same-named container left: removed by
        // Pipes (made from another spec) or by someone else.
        for _ in 0..3 {
            let options = CreateContainerOptions { name: Some(name.clone()), ..Default::default() };
            match self.docker().await?.create_container(Some(options), self.create_body(spec)).await {
                Ok(created) => {
                    log::info!("{}: created container {} ({} port {})", spec.deployment, short_id(&created.id), spec.image, spec.port);
                    return Ok(Instance::created(created.id, spec));
                }
                Err(DockerError::DockerResponseServerError { status_code: 409, .. }) => {
                    let Some(existing) = self.inspect(&name).await? else {
                        // The name's holder is being removed: wait for it, then create.
                        self.until_removed(&name).await;
                        continue;
                    };
                    if existing.deployment != spec.deployment || existing.service != spec.service {
                        return Err(PipesError::Engine { action: "create a container", detail: format!("name {name} is taken by another container") });
                    }
                    if existing.spec_hash.as_deref() == Some(spec.hash.as_str()) {
                        // Another Pipes made it first, or it is a generation coming back.
                        return Ok(existing);
                    }
                    log::info!("{}: replacing container {} made from another config", spec.deployment, short_id(&existing.id));
                    self.remove(&existing.id).await?;
                }
                Err(e) => return Err(self.moby.fail("create a container", e)),
            }
        }
        Err(PipesError::Engine { action: "create a container", detail: format!("name {name} stays taken") })
    }

    async fn start(&self, id: &str) -> Result<Instance, PipesError> {
        self.start_container(id).await?;
        self.inspect(id)
            .await?
            .ok_or_else(|| PipesError::Engine { action: "start a container", detail: format!("container {} vanished after start", short_id(id)) })
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<(), PipesError> {
        let options = StopContainerOptions { t: Some(grace_secs(grace)), ..Default::default() };
        match self.docker().await?.stop_container(id, Some(options)).await {
            Ok(()) | Err(DockerError::DockerResponseServerError { status_code: 304 | 404, .. }) => Ok(()),
            Err(e) => Err(self.moby.fail("stop a container", e)),
        }
    }

    async fn restart(&self, id: &str, grace: Duration) -> Result<(), PipesError> {
        let options = RestartContainerOptions { t: Some(grace_secs(grace)), ..Default::default() };
        self.docker().await?.restart_container(id, Some(options)).await.map_err(|e| self.moby.fail("restart a container", e))
    }

    async fn remove(&self, id: &str) -> Result<(), PipesError> {
        let options = RemoveContainerOptions { force: true, ..Default::default() };
        match self.docker().await?.remove_container(id, Some(options)).await {
            Ok(()) | Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => Ok(()),
            Err(e) => Err(self.moby.fail("remove a container", e)),
        }
    }

    async fn exited(&self, id: &str) -> Result<i64, PipesError> {
        let options = WaitContainerOptions { condition: "not-running".into() };
        match self.docker().await?.wait_container(id, Some(options)).next().await {
            Some(Ok(r)) => Ok(r.status_code),
            Some(Err(DockerError::DockerContainerWaitError { code, .. })) => Ok(code),
            Some(Err(e)) => Err(self.moby.fail("watch a container", e)),
            None => Err(PipesError::Engine { action: "watch a container", detail: "no answer".into() }),
        }
    }

    async fn logs(&self, id: &str, lines: usize) -> Vec<String> {
        let Ok(docker) = self.docker().await else { return Vec::new() };
        self.moby.last_lines(docker.logs(id, Some(log_options(lines))), lines).await
    }

    fn events(&self, since_nano: Option<i64>) -> BoxStream<'static, Result<Event, PipesError>> {
        self.moby.container_events(since_nano, event_of)
    }

    fn pausing(&self) -> Option<&dyn Pausing> {
        Some(self)
    }

    fn claims(&self) -> Option<&dyn Claims> {
        Some(self)
    }
}

#[async_trait]
impl Pausing for Docker {
    async fn pause(&self, id: &str) -> Result<(), PipesError> {
        self.docker().await?.pause_container(id).await.map_err(|e| self.moby.fail("pause a container", e))
    }

    async fn unpause(&self, id: &str) -> Result<Instance, PipesError> {
        self.docker().await?.unpause_container(id).await.map_err(|e| self.moby.fail("unpause a container", e))?;
        self.inspect(id).await?.ok_or_else(|| PipesError::Engine { action: "unpause a container", detail: format!("container {} vanished", short_id(id)) })
    }
}

#[async_trait]
impl Claims for Docker {
    async fn claim(&self, beside: bool) -> Result<Option<String>, PipesError> {
        self.claim_instance(beside).await
    }

    async fn release(&self) {
        self.release_instance().await
    }
}

/// Longest wait for a container being removed to be gone.
const REMOVAL_WAIT: Duration = Duration::from_secs(10);

/// What the engine said of a container's state, by either of its views
/// (inspect, or the list).
struct Seen {
    id: String,
    running: bool,
    paused: bool,
    exit_code: Option<i64>,
    started_at: Option<String>,
    health: Option<String>,
}

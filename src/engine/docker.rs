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
use bollard::auth::DockerCredentials;
use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerStateStatusEnum, ContainerSummary, ContainerSummaryStateEnum, EndpointSettings, HostConfig,
    NetworkCreateRequest, NetworkingConfig, PortBinding, RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, EventsOptions, ListContainersOptions, LogsOptions, RemoveContainerOptions, RestartContainerOptions,
    StopContainerOptions, WaitContainerOptions,
};
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use tokio::sync::{OnceCell, Semaphore};

use super::{
    generation_of, short_id, Backend, Event, EventKind, Image, Instance, Progress, RegistryAuth, Spec, LABEL_CONFIG, LABEL_CONFIG_HASH, LABEL_DEPLOYMENT,
    LABEL_DIGEST, LABEL_INSTANCE, LABEL_MANAGED, LABEL_PORT,
};
use crate::config::Restart;
use crate::error::PipesError;
use crate::route::{Deployment, DEFAULT_TAG};
use crate::secret::Secret;

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

/// What the Docker backend is configured with (from the settings).
#[derive(Debug, Clone)]
pub struct DockerOptions {
    /// `DOCKER_HOST`: `unix://…` or `tcp://…`.
    pub host: String,
    /// `PIPES_INSTANCE`, carried by every container as a label and in its name.
    pub instance: String,
    /// `PIPES_LABELS`.
    pub labels: Vec<(String, String)>,
    /// The registry host credentials are for (`docker.io` for Docker Hub).
    pub registry_host: String,
    pub auth: Option<RegistryAuth>,
    /// `PIPES_MAX_PULLS`.
    pub max_pulls: usize,
    /// `PIPES_NETWORK`.
    pub network: Option<String>,
    /// `PIPES_PUBLISH_PORTS`: published ports even where containers' IPs answer.
    pub publish_ports: bool,
    /// This machine's host name: a container's id when Pipes runs in one.
    pub hostname: Option<String>,
    /// Whether `/.dockerenv` exists (a hint only: sandboxes have it too).
    pub in_container: bool,
}

/// The local Docker engine as a [`Backend`].
///
/// The connection is made on first use and kept, so Pipes starts (and answers
/// 503) while the engine is down, and picks it up once it answers.
#[derive(Clone)]
pub struct Docker {
    host: String,
    client: Arc<OnceCell<bollard::Docker>>,
    reach: Reach,
    instance: String,
    extra_labels: Vec<(String, String)>,
    credentials: Option<DockerCredentials>,
    registry_host: String,
    /// Scrubbed from every message that leaves this module.
    password: Option<Secret>,
    /// Caps pulls under way at once (`PIPES_MAX_PULLS`).
    pulls: Arc<Semaphore>,
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
        let credentials = options.auth.as_ref().map(|a| DockerCredentials {
            username: Some(a.username.clone()),
            password: Some(a.password.expose().to_owned()),
            email: a.email.clone(),
            serveraddress: Some(options.registry_host.clone()),
            ..Default::default()
        });
        Docker {
            host: options.host.clone(),
            client: Arc::new(OnceCell::new()),
            reach,
            instance: options.instance.clone(),
            extra_labels: options.labels.clone(),
            credentials,
            registry_host: options.registry_host.clone(),
            password: options.auth.as_ref().map(|a| a.password.clone()),
            pulls: Arc::new(Semaphore::new(options.max_pulls)),
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
        if !self.host.starts_with("unix://") {
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
        self.client
            .get_or_try_init(|| async {
                let docker = bollard::Docker::connect_with_host(&self.host)
                    .map_err(|e| PipesError::EngineUnavailable { reason: format!("cannot use {}: {e}", self.host) })?;
                // Older engines (API 1.41) reject newer version prefixes outright.
                docker.negotiate_version().await.map_err(|e| PipesError::EngineUnavailable { reason: format!("no answer from {}: {e}", self.host) })
            })
            .await
    }

    /// The networks of container `name`, or `None` if the engine has no such container.
    async fn networks_of(&self, name: &str) -> Result<Option<Vec<String>>, PipesError> {
        match self.docker().await?.inspect_container(name, None).await {
            Ok(c) => Ok(Some(c.network_settings.and_then(|n| n.networks).map(|n| n.into_keys().collect()).unwrap_or_default())),
            Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => Ok(None),
            Err(e) => Err(self.fail("inspect a container", e)),
        }
    }

    /// The container name of a generation: unique per instance, deployment
    /// and digest. Images without a digest (built locally) share the bare name.
    fn container_name(&self, spec: &Spec) -> String {
        let d = &spec.deployment;
        match &spec.digest {
            Some(digest) => format!("{}.{}.{}.{}.{}", self.instance, d.user, d.repo, d.tag, generation_of(digest)),
            None => format!("{}.{}.{}.{}", self.instance, d.user, d.repo, d.tag),
        }
    }

    /// Containers of this instance, optionally only those of one deployment.
    async fn containers(&self, d: Option<&Deployment>) -> Result<Vec<ContainerSummary>, PipesError> {
        let mut labels = vec![format!("{LABEL_MANAGED}=true"), format!("{LABEL_INSTANCE}={}", self.instance)];
        labels.extend(d.map(|d| format!("{LABEL_DEPLOYMENT}={d}")));
        let options = ListContainersOptions { all: true, filters: Some(HashMap::from([("label".to_string(), labels)])), ..Default::default() };
        self.docker().await?.list_containers(Some(options)).await.map_err(|e| self.fail("list containers", e))
    }

    /// The labels a new container of `spec` carries.
    pub(super) fn labels(&self, spec: &Spec) -> HashMap<String, String> {
        let mut labels: HashMap<String, String> = self.extra_labels.iter().cloned().collect();
        labels.insert(LABEL_MANAGED.into(), "true".into());
        labels.insert(LABEL_INSTANCE.into(), self.instance.clone());
        labels.insert(LABEL_DEPLOYMENT.into(), spec.deployment.to_string());
        labels.insert(LABEL_CONFIG_HASH.into(), spec.hash.clone());
        labels.insert(LABEL_PORT.into(), spec.port.to_string());
        labels.insert(LABEL_CONFIG.into(), spec.config.clone());
        if let Some(digest) = &spec.digest {
            labels.insert(LABEL_DIGEST.into(), digest.clone());
        }
        labels
    }

    /// Inspects a container by name or id; `None` when it does not exist or is
    /// not a deployment of Pipes.
    async fn inspect(&self, name: &str) -> Result<Option<Instance>, PipesError> {
        match self.docker().await?.inspect_container(name, None).await {
            Ok(c) => Ok(self.instance_of(c)),
            Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => Ok(None),
            Err(e) => Err(self.fail("inspect a container", e)),
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
        let seen = Seen { id: c.id?, running, paused, exit_code, started_at };
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
        let seen = Seen { id: c.id?, running, paused, exit_code, started_at: None };
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
        network_ip: impl FnOnce(&str) -> Option<IpAddr>,
    ) -> Option<Instance> {
        let Seen { id, running, paused, exit_code, started_at } = seen;
        let deployment = Deployment::parse(labels.get(LABEL_DEPLOYMENT)?)?;
        let port: Option<u16> = labels.get(LABEL_PORT).and_then(|p| p.parse().ok());
        // A paused container keeps its address for when it is thawed.
        let address = match (port, running || paused) {
            (Some(port), true) => match &self.reach {
                Reach::Published => host_port(port).map(|host_port| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), host_port)),
                Reach::Bridge => network_ip(&self.instance_network()).map(|ip| SocketAddr::new(ip, port)),
                Reach::Network(name) => network_ip(name).map(|ip| SocketAddr::new(ip, port)),
            },
            _ => None,
        };
        Some(Instance {
            id,
            deployment,
            running,
            paused,
            exit_code: exit_code.filter(|_| !running && !paused),
            spec_hash: labels.get(LABEL_CONFIG_HASH).cloned(),
            port,
            started_at,
            address,
            digest: labels.get(LABEL_DIGEST).cloned(),
            image_id: None,
            config: labels.get(LABEL_CONFIG).cloned(),
        })
    }

    fn create_body(&self, spec: &Spec) -> ContainerCreateBody {
        let port_key = format!("{}/tcp", spec.port);
        let mut host_config = HostConfig {
            // A fork bomb stays in its container; root in it cannot gain more.
            pids_limit: Some(i64::from(spec.pids)),
            cap_drop: Some(vec!["ALL".into()]),
            cap_add: Some(spec.capabilities.clone()),
            security_opt: Some(vec!["no-new-privileges:true".into()]),
            ..HostConfig::default()
        };
        let network = match &self.reach {
            Reach::Published => {
                let binding = PortBinding { host_ip: Some("127.0.0.1".into()), host_port: Some(String::new()) };
                host_config.port_bindings = Some(HashMap::from([(port_key.clone(), Some(vec![binding]))]));
                self.instance_network()
            }
            Reach::Bridge => self.instance_network(),
            Reach::Network(name) => name.clone(),
        };
        host_config.network_mode = Some(network.clone());
        let networking = Some(NetworkingConfig { endpoints_config: Some(HashMap::from([(network, EndpointSettings::default())])) });
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
            labels: Some(self.labels(spec)),
            env: Some(spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            cmd: spec.cmd.clone(),
            exposed_ports: Some(vec![port_key]),
            host_config: Some(host_config),
            networking_config: networking,
            ..Default::default()
        }
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
        format!("pipes-{}", self.instance)
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
                    Err(e) => return Err(self.fail("inspect a network", e)),
                }
                let mut labels: HashMap<String, String> = self.extra_labels.iter().cloned().collect();
                labels.insert(LABEL_MANAGED.into(), "true".into());
                labels.insert(LABEL_INSTANCE.into(), self.instance.clone());
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
                    Err(e) => Err(self.fail("create a network", e)),
                }
            })
            .await
            .map(|_| ())
    }

    /// Starts a container (a running one is left as it is).
    async fn start_container(&self, id: &str) -> Result<(), PipesError> {
        match self.docker().await?.start_container(id, None).await {
            Ok(()) | Err(DockerError::DockerResponseServerError { status_code: 304, .. }) => Ok(()),
            Err(e) => Err(self.fail("start a container", e)),
        }
    }

    fn pull_failure(&self, reference: &str, e: DockerError) -> PipesError {
        let message = match &e {
            DockerError::DockerResponseServerError { message, .. } => message.clone(),
            DockerError::DockerStreamError { error } => error.clone(),
            _ => return self.fail("pull an image", e),
        };
        let lower = message.to_ascii_lowercase();
        let detail = self.scrub(&message);
        if ["unauthorized", "authentication required", "no basic auth credentials", "incorrect username or password"].iter().any(|m| lower.contains(m)) {
            PipesError::RegistryAuth { registry: self.registry_host.clone(), user: self.credentials.as_ref().and_then(|c| c.username.clone()), detail }
        } else if ["manifest unknown", "not found", "name unknown", "does not exist", "pull access denied"].iter().any(|m| lower.contains(m)) {
            PipesError::ImageNotFound { image: reference.to_owned() }
        } else if UNREACHABLE.iter().any(|m| lower.contains(m)) {
            PipesError::RegistryUnreachable { image: reference.to_owned(), registry: self.registry_host.clone(), detail }
        } else {
            PipesError::Engine { action: "pull an image", detail }
        }
    }

    /// One pull of `reference`, telling `progress` how far it got.
    async fn pull_once(&self, reference: &str, progress: &Progress<'_>) -> Result<(), PipesError> {
        let _place = self.pulls.acquire().await.map_err(|_| PipesError::EngineUnavailable { reason: "Pipes is shutting down".into() })?;
        let (repo, tag) = split_reference(reference);
        let options = CreateImageOptions { from_image: Some(repo.to_owned()), tag: Some(tag.to_owned()), ..Default::default() };
        let mut stream = self.docker().await?.create_image(Some(options), None, self.credentials.clone());
        // Bytes done and in all per layer, as the engine reports downloads.
        let mut layers: HashMap<String, (u64, u64)> = HashMap::new();
        while let Some(item) = stream.next().await {
            let info = item.map_err(|e| self.pull_failure(reference, e))?;
            let (Some(id), Some(detail)) = (info.id, info.progress_detail) else { continue };
            if info.status.as_deref() != Some("Downloading") {
                continue;
            }
            let (done, total) = (detail.current.unwrap_or(0).max(0) as u64, detail.total.unwrap_or(0).max(0) as u64);
            layers.insert(id, (done, total));
            let (done, total) = layers.values().fold((0, 0), |(d, t), (ld, lt)| (d + ld, t + lt));
            progress(done, total);
        }
        Ok(())
    }

    /// The last `lines` lines of a log stream, passwords scrubbed.
    pub(super) async fn last_lines(
        &self,
        mut stream: impl futures_util::Stream<Item = Result<bollard::container::LogOutput, DockerError>> + Unpin,
        lines: usize,
    ) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(Ok(chunk)) = stream.next().await {
            let text = String::from_utf8_lossy(&chunk.into_bytes()).into_owned();
            out.extend(text.lines().map(|l| self.scrub(l)));
        }
        let keep = out.len().saturating_sub(lines);
        out.drain(..keep);
        out
    }

    /// The registry credentials, as the engine takes them.
    pub(super) fn credentials(&self) -> Option<DockerCredentials> {
        self.credentials.clone()
    }

    /// The Pipes instance name (`PIPES_INSTANCE`).
    pub(super) fn instance(&self) -> &str {
        &self.instance
    }

    /// The engine's address, for messages.
    pub(super) fn host(&self) -> &str {
        &self.host
    }

    /// Turns an engine error into what a client sees.
    pub(super) fn fail(&self, action: &'static str, e: DockerError) -> PipesError {
        match e {
            DockerError::DockerResponseServerError { message, .. } => PipesError::Engine { action, detail: self.scrub(&message) },
            DockerError::DockerStreamError { error } => PipesError::Engine { action, detail: self.scrub(&error) },
            DockerError::JsonDataError { .. } | DockerError::JsonSerdeError { .. } => PipesError::Engine { action, detail: self.scrub(&e.to_string()) },
            other => PipesError::EngineUnavailable { reason: format!("cannot {action}: {}", self.scrub(&other.to_string())) },
        }
    }

    pub(super) fn scrub(&self, text: &str) -> String {
        match &self.password {
            Some(p) => p.scrub(text),
            None => text.to_owned(),
        }
    }
}

#[async_trait]
impl Backend for Docker {
    async fn describe(&self) -> Result<String, PipesError> {
        let v = self.docker().await?.version().await.map_err(|e| self.fail("read its version", e))?;
        let reach = match &self.reach {
            Reach::Published => "containers are reached on 127.0.0.1 at published ports".to_owned(),
            Reach::Bridge => format!("containers are reached at their IP on this instance's network '{}'", self.instance_network()),
            Reach::Network(n) => format!("containers are reached at their IP on network '{n}'"),
        };
        Ok(format!("Docker engine {} (API {}) at {}; {reach}", v.version.unwrap_or_default(), v.api_version.unwrap_or_default(), self.host))
    }

    async fn list(&self) -> Result<Vec<Instance>, PipesError> {
        Ok(self.containers(None).await?.into_iter().filter_map(|c| self.instance_of_summary(c)).collect())
    }

    async fn instances(&self, d: &Deployment) -> Result<Vec<Instance>, PipesError> {
        let mut instances = Vec::new();
        for id in self.containers(Some(d)).await?.into_iter().filter_map(|c| c.id) {
            // Inspected for the start time, which tells the generations apart.
            instances.extend(self.inspect(&id).await?);
        }
        Ok(instances)
    }

    async fn image(&self, reference: &str) -> Result<Option<Image>, PipesError> {
        match self.docker().await?.inspect_image(reference).await {
            Ok(img) => {
                let mut exposed_tcp: Vec<u16> =
                    img.config.and_then(|c| c.exposed_ports).unwrap_or_default().iter().filter_map(|p| p.strip_suffix("/tcp")?.parse().ok()).collect();
                exposed_tcp.sort_unstable();
                exposed_tcp.dedup();
                // "registry/user/repo@sha256:…", one per repository the image was pulled from.
                let name = split_reference(reference).0;
                let repo_digests = img.repo_digests.unwrap_or_default();
                let digest = repo_digests
                    .iter()
                    .find(|d| d.split_once('@').is_some_and(|(n, _)| n == name))
                    .or(repo_digests.first())
                    .and_then(|d| d.split_once('@'))
                    .map(|(_, digest)| digest.to_owned());
                Ok(Some(Image { id: img.id.unwrap_or_default(), digest, exposed_tcp }))
            }
            Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => Ok(None),
            Err(e) => Err(self.fail("inspect an image", e)),
        }
    }

    async fn pull(&self, reference: &str, progress: &Progress<'_>) -> Result<Image, PipesError> {
        // The tag can be removed here between the pull and the look at its
        // result (`docker rmi` by hand, a clean-up): pull once more then.
        for _ in 0..2 {
            self.pull_once(reference, progress).await?;
            if let Some(image) = self.image(reference).await? {
                return Ok(image);
            }
            log::info!("{reference} was removed here right after it was pulled: pulling it again");
        }
        Err(PipesError::Engine { action: "pull an image", detail: format!("{reference} is missing after the pull") })
    }

    async fn registry_digest(&self, reference: &str) -> Result<String, PipesError> {
        let answer = self.docker().await?.inspect_registry_image(reference, self.credentials.clone()).await.map_err(|e| self.pull_failure(reference, e))?;
        answer.descriptor.digest.ok_or_else(|| PipesError::Engine { action: "ask the registry for a digest", detail: format!("no digest for {reference}") })
    }

    async fn create(&self, spec: &Spec) -> Result<Instance, PipesError> {
        self.ensure_network().await?;
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
                    if existing.spec_hash.as_deref() == Some(spec.hash.as_str()) {
                        // Another Pipes made it first, or it is a generation coming back.
                        return Ok(existing);
                    }
                    log::info!("{}: replacing container {} made from another config", spec.deployment, short_id(&existing.id));
                    self.remove(&existing.id).await?;
                }
                Err(e) => return Err(self.fail("create a container", e)),
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

    async fn pause(&self, id: &str) -> Result<(), PipesError> {
        self.docker().await?.pause_container(id).await.map_err(|e| self.fail("pause a container", e))
    }

    async fn unpause(&self, id: &str) -> Result<Instance, PipesError> {
        self.docker().await?.unpause_container(id).await.map_err(|e| self.fail("unpause a container", e))?;
        self.inspect(id).await?.ok_or_else(|| PipesError::Engine { action: "unpause a container", detail: format!("container {} vanished", short_id(id)) })
    }

    async fn claim(&self, beside: bool) -> Result<Option<String>, PipesError> {
        self.claim_instance(beside).await
    }

    async fn release(&self) {
        self.release_instance().await
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<(), PipesError> {
        let options = StopContainerOptions { t: Some(grace_secs(grace)), ..Default::default() };
        match self.docker().await?.stop_container(id, Some(options)).await {
            Ok(()) | Err(DockerError::DockerResponseServerError { status_code: 304 | 404, .. }) => Ok(()),
            Err(e) => Err(self.fail("stop a container", e)),
        }
    }

    async fn restart(&self, id: &str, grace: Duration) -> Result<(), PipesError> {
        let options = RestartContainerOptions { t: Some(grace_secs(grace)), ..Default::default() };
        self.docker().await?.restart_container(id, Some(options)).await.map_err(|e| self.fail("restart a container", e))
    }

    async fn remove(&self, id: &str) -> Result<(), PipesError> {
        let options = RemoveContainerOptions { force: true, ..Default::default() };
        match self.docker().await?.remove_container(id, Some(options)).await {
            Ok(()) | Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => Ok(()),
            Err(e) => Err(self.fail("remove a container", e)),
        }
    }

    async fn exited(&self, id: &str) -> Result<i64, PipesError> {
        let options = WaitContainerOptions { condition: "not-running".into() };
        match self.docker().await?.wait_container(id, Some(options)).next().await {
            Some(Ok(r)) => Ok(r.status_code),
            Some(Err(DockerError::DockerContainerWaitError { code, .. })) => Ok(code),
            Some(Err(e)) => Err(self.fail("watch a container", e)),
            None => Err(PipesError::Engine { action: "watch a container", detail: "no answer".into() }),
        }
    }

    async fn logs(&self, id: &str, lines: usize) -> Vec<String> {
        let Ok(docker) = self.docker().await else { return Vec::new() };
        self.last_lines(docker.logs(id, Some(log_options(lines))), lines).await
    }

    fn events(&self, since_nano: Option<i64>) -> BoxStream<'static, Result<Event, PipesError>> {
        let this = self.clone();
        let options = EventsOptions {
            // The engine takes seconds with a fractional part.
            since: since_nano.map(since_param),
            until: None,
            filters: Some(HashMap::from([
                ("type".to_string(), vec!["container".to_string()]),
                ("label".to_string(), vec![format!("{LABEL_INSTANCE}={}", self.instance)]),
            ])),
        };
        futures_util::stream::once(async move {
            match this.docker().await {
                Ok(client) => {
                    let fail = this.clone();
                    client
                        .events(Some(options))
                        .filter_map(move |item| {
                            let event = match item {
                                Ok(message) => event_of(message).map(Ok),
                                Err(e) => Some(Err(fail.fail("watch events", e))),
                            };
                            std::future::ready(event)
                        })
                        .boxed()
                }
                Err(e) => futures_util::stream::once(std::future::ready(Err(e))).boxed(),
            }
        })
        .flatten()
        .boxed()
    }
}

/// An event Pipes cares about, from the engine's message.
pub(super) fn event_of(message: bollard::models::EventMessage) -> Option<Event> {
    let action = message.action?;
    let actor = message.actor?;
    let attributes = actor.attributes.unwrap_or_default();
    let kind = match action.as_str() {
        "start" => EventKind::Started,
        "die" => EventKind::Died(attributes.get("exitCode").and_then(|c| c.parse().ok())),
        "stop" => EventKind::Stopped,
        "kill" => EventKind::Killed,
        "oom" => EventKind::OutOfMemory,
        "destroy" => EventKind::Destroyed,
        "pause" => EventKind::Paused,
        "unpause" => EventKind::Unpaused,
        other => EventKind::Health(other.strip_prefix("health_status: ")?.to_owned()),
    };
    Some(Event {
        id: actor.id?,
        deployment: attributes.get(LABEL_DEPLOYMENT).and_then(|d| Deployment::parse(d)),
        kind,
        time_nano: message.time_nano.or(message.time.map(|t| t.saturating_mul(1_000_000_000))).unwrap_or(0),
    })
}

/// What the engine says when it cannot reach a registry at all.
const UNREACHABLE: [&str; 8] = [
    "dial tcp",
    "connection refused",
    "no such host",
    "i/o timeout",
    "tls handshake timeout",
    "client.timeout exceeded",
    "network is unreachable",
    "server gave http response to https client",
];

/// Longest wait for a container being removed to be gone.
const REMOVAL_WAIT: Duration = Duration::from_secs(10);

/// What a log request asks for: both streams, the last `lines` lines.
pub(super) fn log_options(lines: usize) -> LogsOptions {
    LogsOptions { stdout: true, stderr: true, tail: lines.to_string(), ..Default::default() }
}

/// An events `since` as the engine takes it: seconds with a fractional part.
pub(super) fn since_param(nanos: i64) -> String {
    format!("{}.{:09}", nanos.div_euclid(1_000_000_000), nanos.rem_euclid(1_000_000_000))
}

/// The engine takes whole seconds.
pub(super) fn grace_secs(grace: Duration) -> i32 {
    i32::try_from(grace.as_secs()).unwrap_or(i32::MAX)
}

/// Splits `registry/user/repo:tag` into `registry/user/repo` and `tag`.
fn split_reference(reference: &str) -> (&str, &str) {
    let last_slash = reference.rfind('/').map_or(0, |i| i + 1);
    match reference[last_slash..].rfind(':') {
        Some(colon) => (&reference[..last_slash + colon], &reference[last_slash + colon + 1..]),
        None => (reference, DEFAULT_TAG),
    }
}

/// What the engine said of a container's state, by either of its views
/// (inspect, or the list).
struct Seen {
    id: String,
    running: bool,
    paused: bool,
    exit_code: Option<i64>,
    started_at: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_split_at_the_tag_not_the_port() {
        assert_eq!(split_reference("127.0.0.1:5000/a/b:v1"), ("127.0.0.1:5000/a/b", "v1"));
        assert_eq!(split_reference("a/b:1.2.3"), ("a/b", "1.2.3"));
        assert_eq!(split_reference("127.0.0.1:5000/a/b"), ("127.0.0.1:5000/a/b", "latest"));
    }
}

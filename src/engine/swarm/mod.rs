//! The Swarm backend (`PIPES_BACKEND=swarm`): each generation of a deployment
//! is one Swarm service, and several Pipes (replicas of one `PIPES_INSTANCE`)
//! serve the same services with no state of their own.
//!
//! - Services are named after instance, deployment and generation
//!   ([`service_name`]); the engine refuses a second service of a name, so
//!   replicas that cold-start one deployment at once make one service and the
//!   others adopt it. They carry Pipes' labels ([`super::RESERVED_LABELS`]),
//!   their containers too (task containers do not inherit service labels).
//! - Stopping is scaling to 0 replicas and starting scaling to 1, with
//!   version-checked updates; a service is removed only as a generation is.
//! - Deployments join `PIPES_NETWORK`, an attachable overlay network Pipes
//!   is on too, in `dnsrr` endpoint mode: Pipes reaches the running task at
//!   its own IP (from its container on this node, else as `tasks.<service>`
//!   in the engine's DNS), never through a virtual IP (which needs IPVS).
//! - Activity is shared through the service: each replica writes the time it
//!   last had something open on it into a label of its own
//!   (`pipes.active.<replica>`), and a replica stops an idle service only if
//!   no other replica's label is within the idle timeout, asked twice a
//!   settling period apart, and only with the version it read last.
//! - Configs and scoped tokens are Swarm configs (`store/swarm.rs`), on the
//!   same engine connection ([`Swarm::moby`]).
//! - Images are pulled, and digests asked, by the engine Pipes talks to (a
//!   manager), with the registry credentials passed on to the service
//!   (`X-Registry-Auth`), so every node can pull the pinned digest.
//!
//! - Services beside a deployment (a database, a cache) are Swarm services
//!   too, on the deployment's own attachable overlay network, known there by
//!   their names; the app joins both networks. Each replica's container
//!   joins the deployment's network to check them (whichever replica made
//!   it), and leaves it when they are removed. A service (or app) with volumes
//!   is pinned to the node of the engine Pipes talks to, where its volumes
//!   are made.
//!
//! Swarm cannot pause a service (it offers no [`Pausing`](super::Pausing)):
//! `idle_action: pause` stops it instead.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bollard::errors::Error as DockerError;
use bollard::models::{Service, ServiceSpec, Task, TaskState};
use bollard::query_parameters::{EventsOptions, ListServicesOptions, ListTasksOptions, UpdateServiceOptions};
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use hickory_resolver::TokioResolver;

use super::moby::events::{since_param, time_nano};
use super::moby::logs::log_options;
use super::moby::{DockerOptions, Moby, NetworkKind};
use super::{
    short_id, Backend, Event, EventKind, Images, Instance, Quiet, Replicas, Spec, LABEL_CONFIG, LABEL_CONFIG_HASH, LABEL_DEPLOYMENT, LABEL_DIGEST,
    LABEL_IDENTITY, LABEL_INSTANCE, LABEL_PORT, LABEL_SERVICE,
};
use crate::clock::unix_ms as now_ms;
use crate::error::PipesError;
use crate::route::Deployment;
use service::{
    alive, created, deployment_of, ended, has_health_check, is_service, replicas, restore_health_check, running_task, runs, scale_to_zero, service_label,
    service_spec, task_event,
};

mod service;
mod tasks;

pub use service::service_name;

/// Label holding the id of the local image a service was made from.
const LABEL_IMAGE_ID: &str = "pipes.image-id";
/// Prefix of the labels in which each replica records its last activity.
const LABEL_ACTIVE: &str = "pipes.active.";
/// The label the engine puts on a task's container naming its service.
const LABEL_SERVICE_ID: &str = "com.docker.swarm.service.id";

/// How long a replica waits between its two looks at the others' activity
/// before an idle stop: longer than it takes a replica to report activity
/// after a quiet spell (one check of the janitor, and the write).
const SETTLE: Duration = Duration::from_secs(3);
/// Longest wait for a scaled-up service's task to run or fail.
const START_WAIT: Duration = Duration::from_secs(300);
/// Longest wait, once its task runs, for its address in the engine's DNS.
const DNS_WAIT: Duration = Duration::from_secs(10);
/// How often a starting or stopping service is looked at.
const POLL: Duration = Duration::from_millis(100);
/// Activity labels of replicas silent this long are dropped on the next write.
const FORGET_REPLICA_MS: u64 = 24 * 3600 * 1000;
/// Attempts at a version-checked update before giving up on it.
const UPDATE_ATTEMPTS: usize = 5;

/// Where a task's container is, as this node's engine sees it.
enum Local {
    /// Running here, at this IP on `PIPES_NETWORK`.
    At(std::net::IpAddr),
    /// Here, and it exited with this code.
    Exited(i64),
    /// On another node (or not to be told here): the engine's DNS is asked.
    Elsewhere,
}

/// The engine's swarm as a [`Backend`].
#[derive(Clone)]
pub struct Swarm {
    /// The engine: client, images, pulls, digests, logs.
    moby: Moby,
    /// `PIPES_NETWORK`.
    network: String,
    /// This replica, in its activity label: the container's host name, or
    /// host and process id when it runs as a plain process.
    replica: String,
    /// Resolves `tasks.<service>` through the engine's DNS (the container's
    /// `/etc/resolv.conf`).
    resolver: Arc<Mutex<Option<TokioResolver>>>,
    /// Deployments (and the service beside one, if it is one) of services
    /// seen, by service id: a removed service's event names only its id.
    known: Arc<Mutex<HashMap<String, Known>>>,
    /// Pipes' own container, when it runs in one: it joins deployments'
    /// networks to check their services.
    container: Option<String>,
    /// This engine's node id in the swarm.
    node: Arc<tokio::sync::OnceCell<String>>,
}

impl Swarm {
    /// The swarm of the engine at `options.host`, its deployments on
    /// `options.network` (required for this backend).
    pub fn new(options: &DockerOptions) -> Swarm {
        let network = options.network.clone().unwrap_or_default();
        let replica = match &options.hostname {
            Some(h) => h.clone(),
            None => format!("pid-{}", std::process::id()),
        };
        let replica = replica.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c.to_ascii_lowercase() } else { '-' }).collect();
        Swarm {
            moby: Moby::new(options),
            network,
            replica,
            resolver: Arc::new(Mutex::new(None)),
            known: Arc::new(Mutex::new(HashMap::new())),
            container: options.hostname.clone().filter(|_| options.in_container),
            node: Arc::new(tokio::sync::OnceCell::new()),
        }
    }

    async fn client(&self) -> Result<&bollard::Docker, PipesError> {
        self.moby.client().await
    }

    /// The engine it talks to, to share with the config store
    /// (`store::SwarmConfigs`).
    pub fn moby(&self) -> &Moby {
        &self.moby
    }

    /// This instance's services, optionally only those of one deployment.
    async fn swarm_services(&self, d: Option<&Deployment>) -> Result<Vec<Service>, PipesError> {
        let mut labels = self.moby.instance_filter();
        labels.extend(d.map(|d| format!("{LABEL_DEPLOYMENT}={d}")));
        let options = ListServicesOptions { filters: Some(HashMap::from([("label".to_owned(), labels)])), ..Default::default() };
        let services = self.client().await?.list_services(Some(options)).await.map_err(|e| self.moby.fail("list services", e))?;
        let mut known = self.known.lock().unwrap_or_else(PoisonError::into_inner);
        for s in &services {
            if let (Some(id), Some(d)) = (&s.id, deployment_of(s)) {
                known.insert(id.clone(), (d, service_label(s)));
            }
        }
        Ok(services)
    }

    /// The tasks of the services `ids`, by service id.
    async fn tasks(&self, ids: &[String]) -> Result<HashMap<String, Vec<Task>>, PipesError> {
        let mut by_service: HashMap<String, Vec<Task>> = HashMap::new();
        if ids.is_empty() {
            return Ok(by_service);
        }
        let options = ListTasksOptions { filters: Some(HashMap::from([("service".to_owned(), ids.to_vec())])) };
        for task in self.client().await?.list_tasks(Some(options)).await.map_err(|e| self.moby.fail("list tasks", e))? {
            if let Some(service) = task.service_id.clone() {
                by_service.entry(service).or_default().push(task);
            }
        }
        Ok(by_service)
    }

    /// A service by id or name; `None` when it does not exist.
    async fn service(&self, id: &str) -> Result<Option<Service>, PipesError> {
        match self.client().await?.inspect_service(id, None).await {
            Ok(s) => Ok(Some(s)),
            Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => Ok(None),
            Err(e) => Err(self.moby.fail("inspect a service", e)),
        }
    }

    /// The instance a service is, from it and its tasks, without its address.
    fn instance_of(&self, service: &Service, tasks: &[Task]) -> Option<Instance> {
        let labels = service.spec.as_ref()?.labels.as_ref()?;
        let deployment = deployment_of(service)?;
        let running_task = running_task(tasks);
        let running = replicas(service) > 0 && running_task.is_some();
        // The latest task that ran tells how it last ended.
        let last = tasks
            .iter()
            .filter(|t| t.status.as_ref().and_then(|s| s.container_status.as_ref()).and_then(|c| c.container_id.as_ref()).is_some())
            .max_by_key(|t| created(t));
        let started_at = running_task.or(last).and_then(|t| t.status.as_ref()?.timestamp.clone());
        // How it ended, once its last task did (a task on its way has not).
        let exit_code = match (running, last.filter(|t| ended(t)).and_then(|t| t.status.as_ref())) {
            (false, Some(status)) => status.container_status.as_ref().and_then(|c| c.exit_code).or(Some(0)),
            _ => None,
        };
        Some(Instance {
            id: service.id.clone()?,
            deployment,
            service: labels.get(LABEL_SERVICE).cloned(),
            running,
            paused: false,
            exit_code,
            spec_hash: labels.get(LABEL_CONFIG_HASH).cloned(),
            identity: labels.get(LABEL_IDENTITY).cloned(),
            port: labels.get(LABEL_PORT).and_then(|p| p.parse().ok()),
            started_at,
            address: None,
            digest: labels.get(LABEL_DIGEST).cloned(),
            image_id: labels.get(LABEL_IMAGE_ID).cloned(),
            config: labels.get(LABEL_CONFIG).cloned(),
            // Swarm calls a task with a health check running once it is healthy.
            health: has_health_check(service).then(|| if running { "healthy" } else { "starting" }.to_owned()),
        })
    }

    /// `instance` with the address of its running `task`: read from the
    /// task's container when it runs on this node; else looked up in the
    /// engine's DNS, waiting a while (a task is named there shortly after it
    /// runs), and taken only if it is that task's ([`Swarm::task_address`]):
    /// the DNS also names tasks that are still stopping.
    async fn addressed(&self, mut instance: Instance, name: &str, task: Option<&Task>) -> Instance {
        let Some(port) = instance.port.filter(|p| *p != 0 && instance.running) else { return instance };
        // A service is on its deployment's network only; a replica that did
        // not make that network joins it here, to check the service.
        let network = match instance.service {
            Some(_) => self.moby.deployment_network(&instance.deployment),
            None => self.network.clone(),
        };
        if let (Some(_), Some(me)) = (&instance.service, &self.container) {
            if let Err(e) = self.moby.join(&network, me, "join Pipes to a deployment's network").await {
                log::warn!("{}: Pipes cannot join network {network} to check its services there: {e}", instance.deployment);
            }
        }
        match self.local(task, &network).await {
            Local::At(ip) => {
                instance.address = Some(SocketAddr::new(ip, port));
                return instance;
            }
            // The swarm has not noticed yet: its container already exited.
            Local::Exited(code) => {
                instance.running = false;
                instance.exit_code = Some(code);
                return instance;
            }
            Local::Elsewhere => {}
        }
        let Some(task) = task.and_then(|t| t.id.as_deref()) else { return instance };
        // An app with services is on its deployment's network too.
        let networks = match instance.service {
            Some(_) => vec![network.clone()],
            None => vec![network.clone(), self.moby.deployment_network(&instance.deployment)],
        };
        let deadline = Instant::now() + DNS_WAIT;
        loop {
            match self.task_address(name, &networks, task).await {
                Some(ip) => {
                    instance.address = Some(SocketAddr::new(ip, port));
                    return instance;
                }
                None if Instant::now() < deadline => tokio::time::sleep(POLL).await,
                None => {
                    log::warn!("{}: the engine's DNS does not name task {task} of {name}: is Pipes on network '{network}'?", instance.deployment);
                    return instance;
                }
            }
        }
    }

    /// Where `task`'s container answers on `network`, if it is on this node.
    async fn local(&self, task: Option<&Task>, network: &str) -> Local {
        let (Some(task), Some(node)) = (task, self.node_id().await) else { return Local::Elsewhere };
        let container = task.status.as_ref().and_then(|s| s.container_status.as_ref()?.container_id.clone());
        let (Some(container), true) = (container, task.node_id.as_deref() == Some(node.as_str())) else { return Local::Elsewhere };
        let Ok(client) = self.client().await else { return Local::Elsewhere };
        let Ok(inspected) = client.inspect_container(&container, None).await else { return Local::Elsewhere };
        let state = inspected.state.unwrap_or_default();
        if !state.running.unwrap_or(false) {
            return Local::Exited(state.exit_code.unwrap_or(0));
        }
        let ip = inspected.network_settings.and_then(|n| n.networks?.get(network)?.ip_address.as_deref()?.parse().ok());
        ip.map_or(Local::Elsewhere, Local::At)
    }

    /// This engine's node id in the swarm (asked once).
    async fn node_id(&self) -> Option<String> {
        self.node
            .get_or_try_init(|| async {
                let info = self.client().await?.info().await.map_err(|e| self.moby.fail("read its state", e))?;
                info.swarm.and_then(|s| s.node_id).ok_or(PipesError::EngineUnavailable { reason: "the engine is in no swarm".into() })
            })
            .await
            .ok()
            .cloned()
    }

    /// Every instance of the services listed, addressed when `address`.
    async fn instances_of(&self, services: Vec<Service>, address: bool) -> Result<Vec<Instance>, PipesError> {
        let ids: Vec<String> = services.iter().filter_map(|s| s.id.clone()).collect();
        let tasks = self.tasks(&ids).await?;
        let mut instances = Vec::new();
        for service in &services {
            let own = service.id.as_ref().and_then(|id| tasks.get(id)).map(Vec::as_slice).unwrap_or_default();
            let Some(instance) = self.instance_of(service, own) else { continue };
            let name = service.spec.as_ref().and_then(|s| s.name.clone()).unwrap_or_default();
            instances.push(if address { self.addressed(instance, &name, running_task(own)).await } else { instance });
        }
        Ok(instances)
    }

    /// The service `id` as an instance, addressed; an error if it is gone.
    async fn instance(&self, id: &str, action: &'static str) -> Result<Instance, PipesError> {
        let service = self.service(id).await?.ok_or_else(|| PipesError::Engine { action, detail: format!("service {} vanished", short_id(id)) })?;
        self.instances_of(vec![service], true)
            .await?
            .pop()
            .ok_or_else(|| PipesError::Engine { action, detail: format!("service {} is not a deployment of Pipes", short_id(id)) })
    }

    /// Applies `change` to the service's spec and writes it, if `change`
    /// says so, at the version it was read at; reads again and retries when
    /// another replica wrote first. `change` returns whether to write.
    async fn update(&self, id: &str, action: &'static str, mut change: impl FnMut(&mut ServiceSpec) -> bool) -> Result<(), PipesError> {
        for _ in 0..UPDATE_ATTEMPTS {
            let Some(service) = self.service(id).await? else { return Ok(()) };
            let (Some(mut spec), Some(version)) = (service.spec, service.version.and_then(|v| v.index)) else { return Ok(()) };
            if !change(&mut spec) {
                return Ok(());
            }
            if self.write(id, spec, version, action).await? {
                return Ok(());
            }
        }
        Err(PipesError::Engine { action, detail: format!("service {} kept changing under Pipes", short_id(id)) })
    }

    /// Writes `spec` at `version`; `false` when another write came first.
    async fn write(&self, id: &str, mut spec: ServiceSpec, version: u64, action: &'static str) -> Result<bool, PipesError> {
        restore_health_check(&mut spec);
        let options = UpdateServiceOptions { version: i32::try_from(version).unwrap_or(i32::MAX), ..Default::default() };
        match self.client().await?.update_service(id, spec, options, None).await {
            Ok(_) => Ok(true),
            Err(DockerError::DockerResponseServerError { message, .. }) if message.contains("out of sequence") => Ok(false),
            Err(e) => Err(self.moby.fail(action, e)),
        }
    }

    /// Waits until the service's task runs (then it is returned addressed),
    /// or its latest task ended (returned not running, with its exit code).
    /// Tasks in `before` (those there before a start asked for a new one)
    /// are not its answer.
    async fn until_settled(&self, id: &str, before: &[String]) -> Result<Instance, PipesError> {
        let deadline = Instant::now() + START_WAIT;
        loop {
            let service = self
                .service(id)
                .await?
                .ok_or_else(|| PipesError::Engine { action: "start a service", detail: format!("service {} vanished", short_id(id)) })?;
            let tasks = self.tasks(&[id.to_owned()]).await?.into_values().flatten();
            let tasks: Vec<Task> = tasks.filter(|t| t.id.as_ref().is_none_or(|t| !before.contains(t))).collect();
            // The newest task: a failed one is told to shut down at once,
            // whether or not the restart policy replaces it.
            let newest = tasks.iter().max_by_key(|t| created(t));
            if let Some(TaskState::REJECTED) = newest.and_then(|t| t.status.as_ref()?.state) {
                let why = newest.and_then(|t| t.status.as_ref()?.err.clone()).unwrap_or_default();
                return Err(PipesError::Engine { action: "start a service", detail: self.moby.scrub(&why) });
            }
            if tasks.iter().any(runs) || newest.is_some_and(ended) || Instant::now() >= deadline {
                let name = service.spec.as_ref().and_then(|s| s.name.clone()).unwrap_or_default();
                let Some(instance) = self.instance_of(&service, &tasks) else {
                    return Err(PipesError::Engine { action: "start a service", detail: format!("service {} is not a deployment of Pipes", short_id(id)) });
                };
                return Ok(self.addressed(instance, &name, running_task(&tasks)).await);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The activity labels of the other replicas: the latest, in Unix ms.
    fn latest_elsewhere(&self, spec: &ServiceSpec) -> u64 {
        let own = format!("{LABEL_ACTIVE}{}", self.replica);
        spec.labels.iter().flatten().filter(|(k, _)| k.starts_with(LABEL_ACTIVE) && **k != own).filter_map(|(_, v)| v.parse().ok()).max().unwrap_or(0)
    }
}

#[async_trait]
impl Backend for Swarm {
    async fn describe(&self) -> Result<String, PipesError> {
        let docker = self.client().await?;
        let info = docker.info().await.map_err(|e| self.moby.fail("read its state", e))?;
        let swarm = info.swarm.unwrap_or_default();
        if !swarm.control_available.unwrap_or(false) {
            return Err(PipesError::EngineUnavailable {
                reason: format!("PIPES_BACKEND=swarm needs a swarm manager, and the engine at {} is not one", self.moby.host()),
            });
        }
        let network = docker.inspect_network(&self.network, None).await.map_err(|e| self.moby.fail("inspect PIPES_NETWORK", e))?;
        if network.driver.as_deref() != Some("overlay") || network.attachable != Some(true) {
            return Err(PipesError::EngineUnavailable {
                reason: format!("PIPES_NETWORK '{}' must be an attachable overlay network (docker network create -d overlay --attachable)", self.network),
            });
        }
        Ok(format!(
            "Docker Swarm (engine {}, {} node(s)) at {}; deployments are services on network '{}', reached at their tasks' IPs; this replica is '{}'; live-restore is not available in swarm mode: an engine restart stops this node's tasks",
            info.server_version.unwrap_or_default(),
            swarm.nodes.unwrap_or(0),
            self.moby.host(),
            self.network,
            self.replica
        ))
    }

    async fn list(&self) -> Result<Vec<Instance>, PipesError> {
        let services = self.swarm_services(None).await?;
        self.instances_of(services, false).await
    }

    async fn instances(&self, d: &Deployment) -> Result<Vec<Instance>, PipesError> {
        let services = self.swarm_services(Some(d)).await?.into_iter().filter(|s| !is_service(s)).collect();
        self.instances_of(services, true).await
    }

    fn images(&self) -> &dyn Images {
        &self.moby
    }

    async fn services(&self, d: &Deployment) -> Result<Vec<Instance>, PipesError> {
        let services = self.swarm_services(Some(d)).await?.into_iter().filter(is_service).collect();
        self.instances_of(services, true).await
    }

    async fn volumes(&self, d: &Deployment) -> Result<Vec<String>, PipesError> {
        self.moby.deployment_volumes(d).await
    }

    async fn remove_shared(&self, d: &Deployment, keep_volumes: bool) -> Result<(), PipesError> {
        self.moby.remove_shared(d, keep_volumes, self.container.as_deref()).await
    }

    async fn create(&self, spec: &Spec) -> Result<Instance, PipesError> {
        self.moby.ensure_shared(spec, NetworkKind::Overlay, self.container.as_deref()).await?;
        // Volumes are made on this engine's node: what mounts them runs there.
        let pin = match spec.volumes.is_empty() {
            true => None,
            false => Some(self.node_id().await.ok_or_else(|| PipesError::EngineUnavailable { reason: "the engine names no node of its swarm".into() })?),
        };
        let service_spec = service_spec(&self.moby, &self.network, spec, pin.as_deref());
        let name = service_spec.name.clone().unwrap_or_default();
        for _ in 0..3 {
            let created = self.client().await?.create_service(service_spec.clone(), self.moby.credentials()).await;
            match created {
                Ok(answer) => {
                    let id = answer.id.unwrap_or_else(|| name.clone());
                    log::info!("{}: created service {name} ({} port {})", spec.deployment, spec.image, spec.port);
                    self.known.lock().unwrap_or_else(PoisonError::into_inner).insert(id.clone(), (spec.deployment.clone(), spec.service.clone()));
                    return Ok(Instance::created(id, spec));
                }
                Err(DockerError::DockerResponseServerError { status_code: 409, .. }) => {
                    // The engine is the lock: another replica made it first, or it is a generation coming back.
                    let Some(existing) = self.service(&name).await? else { continue };
                    let id = existing.id.clone().unwrap_or_else(|| name.clone());
                    if existing.spec.as_ref().and_then(|s| s.labels.as_ref()?.get(LABEL_CONFIG_HASH)) == Some(&spec.hash) {
                        return self.instance(&id, "create a service").await;
                    }
                    log::info!("{}: replacing service {name} made from another config", spec.deployment);
                    self.remove(&id).await?;
                }
                Err(e) => return Err(self.moby.fail("create a service", e)),
            }
        }
        Err(PipesError::Engine { action: "create a service", detail: format!("name {name} stays taken") })
    }

    async fn start(&self, id: &str) -> Result<Instance, PipesError> {
        // Read anew on every attempt: another replica may be starting it too.
        for _ in 0..UPDATE_ATTEMPTS {
            let Some(service) = self.service(id).await? else {
                return Err(PipesError::Engine { action: "start a service", detail: format!("service {} vanished", short_id(id)) });
            };
            let tasks = self.tasks(&[id.to_owned()]).await?.into_values().flatten().collect::<Vec<_>>();
            let (Some(mut spec), Some(version)) = (service.spec, service.version.and_then(|v| v.index)) else { break };
            let mode = spec.mode.get_or_insert_with(Default::default).replicated.get_or_insert_with(Default::default);
            let change = if mode.replicas.unwrap_or(0) == 0 {
                mode.replicas = Some(1);
                true
            } else if !tasks.is_empty() && !tasks.iter().any(alive) {
                // Scaled up, but its tasks ended and none is coming: a new task.
                let task = spec.task_template.get_or_insert_with(Default::default);
                task.force_update = Some(task.force_update.unwrap_or(0) + 1);
                true
            } else {
                // A task is on its way (another replica scaled it up): waited for, not replaced.
                false
            };
            if !change {
                return self.until_settled(id, &[]).await;
            }
            if self.write(id, spec, version, "start a service").await? {
                let before: Vec<String> = tasks.into_iter().filter_map(|t| t.id).collect();
                return self.until_settled(id, &before).await;
            }
        }
        Err(PipesError::Engine { action: "start a service", detail: format!("service {} kept changing under Pipes", short_id(id)) })
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<(), PipesError> {
        self.update(id, "stop a service", |spec| scale_to_zero(spec, grace)).await
    }

    /// Replicas of one instance serve the same services on purpose: there is
    /// nothing to claim.
    /// Replaces its task, and returns once the new one runs (or ended), as
    /// the engine's restart of a container does.
    async fn restart(&self, id: &str, grace: Duration) -> Result<(), PipesError> {
        let before: Vec<String> = self.tasks(&[id.to_owned()]).await?.into_values().flatten().filter_map(|t| t.id).collect();
        self.update(id, "restart a service", |spec| {
            let task = spec.task_template.get_or_insert_with(Default::default);
            task.force_update = Some(task.force_update.unwrap_or(0) + 1);
            task.container_spec.get_or_insert_with(Default::default).stop_grace_period = Some(grace.as_nanos() as i64);
            true
        })
        .await?;
        self.until_settled(id, &before).await.map(drop)
    }

    async fn remove(&self, id: &str) -> Result<(), PipesError> {
        match self.client().await?.delete_service(id).await {
            Ok(()) | Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => Ok(()),
            Err(e) => Err(self.moby.fail("remove a service", e)),
        }
    }

    async fn exited(&self, id: &str) -> Result<i64, PipesError> {
        loop {
            let Some(service) = self.service(id).await? else { return Ok(0) };
            let tasks = self.tasks(&[id.to_owned()]).await?.into_values().flatten().collect::<Vec<_>>();
            match self.instance_of(&service, &tasks) {
                Some(i) if i.running => tokio::time::sleep(POLL * 5).await,
                Some(i) => return Ok(i.exit_code.unwrap_or(0)),
                None => return Ok(0),
            }
        }
    }

    async fn logs(&self, id: &str, lines: usize) -> Vec<String> {
        let Ok(docker) = self.client().await else { return Vec::new() };
        self.moby.last_lines(docker.service_logs(id, Some(log_options(lines))), lines).await
    }

    /// Containers of this node's tasks (start, die, …, named by their
    /// service), services scaled or removed anywhere in the swarm, and
    /// services whose running task changed on any node (listed every second).
    fn events(&self, since_nano: Option<i64>) -> BoxStream<'static, Result<Event, PipesError>> {
        let tasks = self.moby.container_events(since_nano, task_event);
        let options =
            EventsOptions { since: since_nano.map(since_param), until: None, filters: Some(HashMap::from([("type".to_owned(), vec!["service".to_owned()])])) };
        // A service event names only the service: one this replica has not
        // seen yet is looked up (they are few; the stream is its own).
        let this = self.clone();
        let services = self.moby.events(options, move |message| {
            let this = this.clone();
            async move { this.service_event(message).await }
        });
        futures_util::stream::select_all([tasks, services, self.task_changes()]).boxed()
    }

    fn replicas(&self) -> Option<&dyn Replicas> {
        Some(self)
    }
}

#[async_trait]
impl Replicas for Swarm {
    async fn share_activity(&self, id: &str, at_ms: u64) -> Result<(), PipesError> {
        let own = format!("{LABEL_ACTIVE}{}", self.replica);
        self.update(id, "share activity", |spec| {
            let labels = spec.labels.get_or_insert_with(Default::default);
            if labels.get(&own).and_then(|v| v.parse::<u64>().ok()).is_some_and(|v| v >= at_ms) {
                return false;
            }
            labels.retain(|k, v| !k.starts_with(LABEL_ACTIVE) || v.parse::<u64>().is_ok_and(|v| at_ms.saturating_sub(v) < FORGET_REPLICA_MS));
            labels.insert(own.clone(), at_ms.to_string());
            true
        })
        .await
    }

    async fn quiet_elsewhere(&self, id: &str, idle: Duration) -> Result<Quiet, PipesError> {
        let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
        // Twice, a settling period apart: a replica busy just before the
        // first look has reported it by the second.
        for look in 0..2 {
            if look > 0 {
                tokio::time::sleep(SETTLE).await;
            }
            let Some(service) = self.service(id).await? else { return Ok(Quiet::Since(0)) };
            let latest = service.spec.as_ref().map(|s| self.latest_elsewhere(s)).unwrap_or(0);
            if now_ms().saturating_sub(latest) < idle_ms {
                return Ok(Quiet::Busy(latest));
            }
            if look > 0 {
                return Ok(Quiet::Since(service.version.and_then(|v| v.index).unwrap_or(0)));
            }
        }
        Ok(Quiet::Since(0))
    }

    async fn stop_quiet(&self, id: &str, grace: Duration, since: u64) -> Result<bool, PipesError> {
        let Some(service) = self.service(id).await? else { return Ok(true) };
        let (Some(mut spec), Some(version)) = (service.spec, service.version.and_then(|v| v.index)) else { return Ok(true) };
        // Any write since the look at the others (an activity report among
        // them) means it is not known to be idle.
        if version != since {
            return Ok(false);
        }
        scale_to_zero(&mut spec, grace);
        self.write(id, spec, version, "stop a service").await
    }
}

impl Swarm {
    /// A service of this instance scaled or removed.
    async fn service_event(&self, message: bollard::models::EventMessage) -> Option<Event> {
        let actor = message.actor?;
        let id = actor.id?;
        let attributes = actor.attributes.unwrap_or_default();
        let kind = match message.action.as_deref()? {
            "remove" => EventKind::Destroyed,
            "update" => match attributes.get("replicas.new")?.parse::<u64>().ok()? {
                0 => EventKind::Stopped,
                _ => EventKind::Started,
            },
            _ => return None,
        };
        let (deployment, service) = match kind {
            EventKind::Destroyed => self.known.lock().unwrap_or_else(PoisonError::into_inner).remove(&id)?,
            _ => self.known_service(&id).await?,
        };
        // Services go only with their deployment: whichever replica removes
        // it removes the network next, which no replica may still be on.
        if let (EventKind::Destroyed, Some(_), Some(me)) = (&kind, &service, &self.container) {
            self.moby.leave(&self.moby.deployment_network(&deployment), me).await;
        }
        let time_nano = time_nano(message.time_nano, message.time);
        Some(Event { id, deployment: Some(deployment), service, kind, time_nano })
    }
}

/// A service's deployment, and the service beside it that it is, if one.
type Known = (Deployment, Option<String>);

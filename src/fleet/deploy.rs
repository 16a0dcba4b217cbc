//! Step 4 of the request path: a cold start, from nothing to an answering
//! instance — and every other operation on a deployment's instance.
//!
//! Start a stopped instance of ours, or pull the image if it is missing and
//! run a new instance, then probe it until it answers, watching for it to exit
//! meanwhile. A deployment has generations, one instance per image digest its
//! tag named: a redeploy makes the next one beside the current, a rollback
//! starts the one before. The backend decides what an instance is; this file
//! decides when one is started, replaced, stopped or given up on.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::Mutex;

use super::feed::{Feed, HappeningKind};
use super::probe;
use super::slot::Upstream;
use crate::config::{check_capability, ByteSize, Defaults, DeployConfig, Effective, Pull, BASE_CAPABILITIES};
use crate::engine::{current, generation_of, short_id, Backend, Image, Instance, Spec};
use crate::error::PipesError;
use crate::metrics::{Metrics, Phase};
use crate::policy::Policy;
use crate::route::Deployment;
use crate::settings::{Ceilings, MinFree, Settings};
use crate::store::Store;

/// Lines of an instance's log shown when it exits while starting.
const LOG_LINES: usize = 20;
/// Container port when neither config nor image names one.
const DEFAULT_PORT: u16 = 80;
/// Longest wait for an instance reported started to be called running.
const STARTED_WAIT: Duration = Duration::from_secs(10);
/// How long an instance gets to stop before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a never-ready instance gets to stop: it never served anyone.
pub(super) const NEVER_READY_GRACE: Duration = Duration::from_secs(2);
/// Pull progress is told at most this often.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// Starts and operates deployments on the backend.
pub struct Deployer {
    backend: Arc<dyn Backend>,
    store: Store,
    /// `PIPES_REGISTRY`: prefix of every image reference; `None` is Docker Hub.
    registry: Option<String>,
    defaults: Defaults,
    ceilings: Ceilings,
    max_containers: usize,
    pull_timeout: Duration,
    /// `PIPES_ALLOW`: which images services may run.
    policy: Policy,
    /// Instances admitted and not yet started.
    starting: Arc<AtomicUsize>,
    /// Serializes admission, so two starts cannot both take the last place.
    admission: Mutex<()>,
    /// Where cold-start phases are timed, when metrics are on.
    pub(super) metrics: Option<Arc<Metrics>>,
    /// Where phases and pull progress are told as they happen.
    feed: Feed,
    /// `PIPES_DISK_MIN_FREE`, and where the engine keeps images (asked once).
    pub(super) disk_min_free: MinFree,
    pub(super) engine_dir: tokio::sync::OnceCell<Option<std::path::PathBuf>>,
    /// `PIPES_IMAGE_KEEP` and `PIPES_DISK_HIGH`; the record of pulled images
    /// is changed by one at a time, pulls waiting to be written in it.
    pub(super) image_keep: Duration,
    pub(super) disk_high: f64,
    pub(super) images_record: tokio::sync::Mutex<()>,
    pub(super) pulled: std::sync::Mutex<Vec<(String, String, u64)>>,
}

/// Places among `PIPES_MAX_CONTAINERS`, held from admission until the
/// instances run (the backend counts them from then on).
pub(super) struct ContainerPlaces(Arc<AtomicUsize>, usize);

impl Drop for ContainerPlaces {
    fn drop(&mut self) {
        self.0.fetch_sub(self.1, Ordering::AcqRel);
    }
}

impl Deployer {
    /// A deployer on `backend` with the configs in `store`.
    pub fn new(backend: Arc<dyn Backend>, store: Store, settings: &Settings, metrics: Option<Arc<Metrics>>, feed: Feed) -> Self {
        Deployer {
            backend,
            store,
            registry: settings.registry.clone(),
            defaults: settings.defaults.clone(),
            ceilings: settings.ceilings.clone(),
            max_containers: settings.max_containers,
            pull_timeout: settings.pull_timeout,
            policy: settings.policy.clone(),
            starting: Arc::new(AtomicUsize::new(0)),
            admission: Mutex::new(()),
            metrics,
            feed,
            disk_min_free: settings.disk_min_free,
            engine_dir: tokio::sync::OnceCell::new(),
            image_keep: settings.image_keep,
            disk_high: settings.disk_high,
            images_record: tokio::sync::Mutex::new(()),
            pulled: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Times `step` as cold-start `phase` of `d`, and tells the feed.
    pub(super) async fn timed<T>(&self, d: &Deployment, phase: Phase, step: impl Future<Output = T>) -> T {
        let began = Instant::now();
        let out = step.await;
        let took = began.elapsed();
        if let Some(m) = &self.metrics {
            m.phase(&phase, took);
        }
        self.feed.tell(d, HappeningKind::Phase { phase, took });
        out
    }

    /// Pulls `image_ref` for `d` within `PIPES_PULL_TIMEOUT`, telling the
    /// feed how far it got (at most every [`PROGRESS_EVERY`]).
    pub(super) async fn pull_image(&self, d: &Deployment, image_ref: &str) -> Result<Image, PipesError> {
        self.room_to_pull(image_ref).await?;
        let last = std::sync::Mutex::new(None::<Instant>);
        let progress = |done: u64, total: u64| {
            let mut last = last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.is_none_or(|at| at.elapsed() >= PROGRESS_EVERY) || done == total {
                *last = Some(Instant::now());
                self.feed.tell(d, HappeningKind::Pulling { done, total });
            }
        };
        let image = self
            .timed(d, Phase::Pull, tokio::time::timeout(self.pull_timeout, self.backend.images().pull(image_ref, &progress)))
            .await
            .map_err(|_| PipesError::PullTimeout { image: image_ref.to_owned(), timeout: self.pull_timeout })??;
        self.record_pull(image_ref, &image).await;
        Ok(image)
    }

    /// Pipes' own defaults, the lowest config layer.
    pub fn defaults(&self) -> &Defaults {
        &self.defaults
    }

    /// The backend it deploys on.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// The stored configs.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// `PIPES_ALLOW`.
    pub(super) fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The full reference of a deployment's image, registry included.
    pub fn image_ref(&self, d: &Deployment) -> String {
        match &self.registry {
            Some(r) => format!("{r}/{}/{}:{}", d.user, d.repo, d.tag),
            None => format!("{}/{}:{}", d.user, d.repo, d.tag),
        }
    }

    /// The path part of `PIPES_REGISTRY`, if it has one.
    pub fn registry_path(&self) -> Option<&str> {
        self.registry.as_deref()?.split_once('/').map(|(_, path)| path)
    }

    /// The config `d` runs with: its own over its repository's over the defaults.
    pub async fn effective(&self, d: &Deployment) -> Result<Effective, PipesError> {
        let tag = self.store.tag(d).await?;
        let repository = self.store.repository(&d.user, &d.repo).await?;
        Ok(Effective::merge(tag.as_ref(), repository.as_ref(), &self.defaults))
    }

    /// `Ok` if `config` (its services' too) stays under the operator's
    /// ceilings (`PIPES_MAX_MEMORY`, `PIPES_MAX_CPUS`, …), else 422 naming
    /// the field.
    pub fn check_ceilings(&self, config: &DeployConfig) -> Result<(), PipesError> {
        self.check_limits("", config.memory, config.cpus, config.pids)?;
        for (name, service) in &config.services {
            self.check_limits(&format!("services.{name}."), service.memory, service.cpus, service.pids)?;
        }
        for cap in config.capabilities.iter().flatten() {
            let name = check_capability(cap).unwrap_or_else(|_| cap.clone());
            if !self.ceilings.capabilities.contains(&name) {
                return Err(PipesError::InvalidField {
                    field: "capabilities".into(),
                    message: format!("{name} is not among the capabilities this Pipes allows (PIPES_ALLOWED_CAPABILITIES)"),
                });
            }
        }
        Ok(())
    }

    /// Brings `d` to a running, answering instance and returns where it answers.
    ///
    /// The current generation is used if it runs; thawed if it is paused, or
    /// started if it is stopped, when it was made from the current config and
    /// from the image the tag names here now; otherwise a new instance is made
    /// from the image (pulled when missing, or always if the config says so).
    pub async fn deploy(&self, d: &Deployment) -> Result<Upstream, PipesError> {
        let config = self.effective(d).await?;
        self.within_ceilings(d, &config)?;
        let image_ref = self.image_ref(d);
        let instances = self.backend.instances(d).await?;
        let fresh = config.pull == Pull::Always;
        let current = current(&instances).filter(|i| i.running || !self.outdated(d, i, &config));
        // The app's image is pulled beside its services' when it will be needed.
        let app_image = (current.is_none() && !fresh).then_some(image_ref.as_str());
        self.services_up(d, &config, app_image).await?;
        let instance = match current {
            Some(i) if i.running => i.clone(),
            Some(i) => match self.newer_local_image(&image_ref, i).await? {
                Some(newer) => {
                    log::info!("{d}: the tag names {newer} here since instance {} was made: making a new generation", short_id(&i.id));
                    if i.paused {
                        self.stop_instance(&i.id).await?;
                    }
                    self.run(d, &image_ref, &config, fresh, true).await?
                }
                None => {
                    let admitted = self.admit(1).await?;
                    let woken = if i.paused {
                        log::info!("{d}: thawing its paused instance {}", short_id(&i.id));
                        self.timed(d, Phase::Start, self.thaw(&i.id)).await
                    } else {
                        log::info!("{d}: starting its stopped instance {}", short_id(&i.id));
                        self.timed(d, Phase::Start, self.backend.start(&i.id)).await
                    };
                    drop(admitted);
                    match woken {
                        // A thawed instance was answering when it froze: a connection is proof enough.
                        Ok(woken) if i.paused && woken.running => return self.connected(d, &woken, &config).await,
                        Ok(woken) => woken,
                        // It may have been removed since it was listed: make a new one.
                        Err(e) => {
                            log::info!("{d}: instance {} did not start ({e}); making a new one", short_id(&i.id));
                            self.run(d, &image_ref, &config, fresh, true).await?
                        }
                    }
                }
            },
            None => self.run(d, &image_ref, &config, fresh, true).await?,
        };
        self.answering(d, &instance, &config).await
    }

    /// The image the tag names here now, when it is not the one `instance`
    /// was made from (the tag moved and was pulled since): a stopped or
    /// paused instance of an older image is not woken.
    async fn newer_local_image(&self, image_ref: &str, instance: &Instance) -> Result<Option<String>, PipesError> {
        let Some(local) = self.backend.images().image(image_ref).await? else { return Ok(None) };
        Ok(match &instance.image_id {
            Some(made_from) if *made_from != local.id => Some(local.digest.unwrap_or(local.id)),
            _ => None,
        })
    }

    /// The upstream of a started instance, once it answers.
    async fn answering(&self, d: &Deployment, instance: &Instance, config: &Effective) -> Result<Upstream, PipesError> {
        let addr = self.address(d, instance).await?;
        self.until_ready(d, &instance.id, addr, config).await?;
        Ok(upstream_of(instance, addr, Some(config)))
    }

    /// The upstream of a thawed instance, once it accepts a connection.
    async fn connected(&self, d: &Deployment, instance: &Instance, config: &Effective) -> Result<Upstream, PipesError> {
        let addr = self.address(d, instance).await?;
        let probed = self.timed(d, Phase::Probe, probe::until_connects(addr, config.health_timeout)).await;
        if !probed {
            return Err(PipesError::NotReady { deployment: d.to_string(), timeout: config.health_timeout, probed: format!("connect {addr}") });
        }
        Ok(upstream_of(instance, addr, Some(config)))
    }

    /// Where a started instance answers; the exit failure if it does not run.
    async fn address(&self, d: &Deployment, instance: &Instance) -> Result<SocketAddr, PipesError> {
        if !instance.running {
            let code = instance.exit_code.unwrap_or(0);
            return Err(self.exit_failure(d, &instance.id, code).await);
        }
        instance.address.ok_or_else(|| PipesError::Unservable {
            deployment: d.to_string(),
            reason: "the running instance has no address Pipes can reach (is PIPES_NETWORK shared with Pipes?)".into(),
        })
    }

    /// The upstream of `d`'s current generation if it runs, without probing:
    /// for taking over what a previous Pipes left running.
    pub async fn running(&self, d: &Deployment) -> Result<Option<Upstream>, PipesError> {
        let instances = self.backend.instances(d).await?;
        let Some((instance, addr)) = current(&instances).filter(|i| i.running).and_then(|i| Some((i, i.address?))) else {
            return Ok(None);
        };
        let config = self.effective(d).await.ok();
        Ok(Some(upstream_of(instance, addr, config.as_ref())))
    }

    /// The upstream of `d`'s current generation once it answers, if that runs
    /// and is not `serving`: one made by another Pipes (a redeploy through
    /// another replica), or started by hand. `started` was just reported
    /// started; a backend may call it running only a moment later (a Swarm
    /// task runs after its container starts), so that is waited for.
    pub async fn newer_running(&self, d: &Deployment, serving: &str, started: &str) -> Result<Option<Upstream>, PipesError> {
        let deadline = tokio::time::Instant::now() + STARTED_WAIT;
        let instances = loop {
            let instances = self.backend.instances(d).await?;
            let settled = instances.iter().find(|i| i.id == started).is_none_or(|i| i.running || i.exit_code.is_some());
            if settled || tokio::time::Instant::now() >= deadline {
                break instances;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        let Some(instance) = current(&instances).filter(|i| i.running && i.id != serving) else { return Ok(None) };
        let config = self.effective(d).await?;
        self.answering(d, instance, &config).await.map(Some)
    }

    /// 422 naming `{prefix}memory` (cpus, pids) when above its ceiling.
    fn check_limits(&self, prefix: &str, memory: Option<ByteSize>, cpus: Option<f64>, pids: Option<u32>) -> Result<(), PipesError> {
        let over = |field: &str, value: String, ceiling: String, setting: &str| PipesError::InvalidField {
            field: format!("{prefix}{field}"),
            message: format!("{value} is more than {ceiling}, the most this Pipes allows ({setting})"),
        };
        if let Some(memory) = memory.filter(|m| *m > self.ceilings.memory) {
            return Err(over("memory", memory.to_string(), self.ceilings.memory.to_string(), "PIPES_MAX_MEMORY"));
        }
        if let Some(cpus) = cpus.filter(|c| *c > self.ceilings.cpus) {
            return Err(over("cpus", cpus.to_string(), self.ceilings.cpus.to_string(), "PIPES_MAX_CPUS"));
        }
        if let Some(pids) = pids.filter(|p| *p > self.ceilings.pids) {
            return Err(over("pids", pids.to_string(), self.ceilings.pids.to_string(), "PIPES_MAX_PIDS"));
        }
        Ok(())
    }

    /// An effective config above the ceilings (stored before they were
    /// lowered) is not run.
    fn within_ceilings(&self, d: &Deployment, config: &Effective) -> Result<(), PipesError> {
        let layer = DeployConfig {
            memory: Some(config.memory),
            cpus: Some(config.cpus),
            pids: Some(config.pids),
            capabilities: Some(config.capabilities.clone()),
            ..DeployConfig::default()
        };
        self.check_ceilings(&layer)
            .and_then(|()| {
                config.services.iter().try_for_each(|s| self.check_limits(&format!("services.{}.", s.name), Some(s.memory), Some(s.cpus), Some(s.pids)))
            })
            .map_err(|e| PipesError::Unservable {
                deployment: d.to_string(),
                reason: format!("its config asks for more than this Pipes allows: {e}; replace the config"),
            })
    }

    /// Pulls if missing (or always when `fresh`), then runs an instance of
    /// the image's generation. A place among `PIPES_MAX_CONTAINERS` is taken
    /// (when `admit`) only once the image is known to exist, so names of
    /// images that do not exist never hold one.
    async fn run(&self, d: &Deployment, image_ref: &str, config: &Effective, fresh: bool, admit: bool) -> Result<Instance, PipesError> {
        let local = if fresh { None } else { self.backend.images().image(image_ref).await? };
        let image = match local {
            Some(image) => image,
            None => {
                log::info!("{d}: pulling {image_ref}");
                self.pull_image(d, image_ref).await?
            }
        };
        let port = match config.port {
            Some(port) => port,
            None => image_port(d, &image)?,
        };
        let spec = Spec {
            deployment: d.clone(),
            service: None,
            image: image_ref.to_owned(),
            port,
            hash: config.spec_hash(image_ref, port),
            identity: config.identity(image_ref, port),
            env: config.env.clone(),
            cmd: config.cmd.clone(),
            memory_bytes: config.memory.0,
            cpus: config.cpus,
            restart: config.restart,
            digest: image.digest,
            image_id: image.id,
            pids: config.pids,
            capabilities: {
                let mut caps: Vec<String> = BASE_CAPABILITIES.iter().map(|c| c.to_string()).collect();
                caps.extend(config.capabilities.iter().cloned());
                caps.sort();
                caps.dedup();
                caps
            },
            config: config.to_json(Some(port)).to_string(),
            volumes: config.volumes.clone(),
            network: !config.services.is_empty(),
            health_cmd: None,
        };
        let admitted = if admit { Some(self.admit(1).await?) } else { None };
        let instance = self.timed(d, Phase::Create, self.backend.create(&spec)).await?;
        let instance = if instance.running { instance } else { self.timed(d, Phase::Start, self.backend.start(&instance.id)).await? };
        drop(admitted);
        Ok(instance)
    }

    /// Pulls the image `d`'s tag names in the registry now; its digest.
    pub async fn pull(&self, d: &Deployment) -> Result<String, PipesError> {
        let image_ref = self.image_ref(d);
        let image = self.pull_image(d, &image_ref).await?;
        Ok(image.digest.unwrap_or(image.id))
    }

    /// Makes a new generation from what the tag names in the registry now,
    /// and returns it answering, or `None` when the tag still names `serving`.
    /// A generation that fails to answer is removed, with its log lines in
    /// the error: whatever serves now keeps serving.
    pub async fn next_generation(&self, d: &Deployment, serving: Option<&str>) -> Result<Option<Upstream>, PipesError> {
        let image_ref = self.image_ref(d);
        let digest = self.backend.images().registry_digest(&image_ref).await?;
        if serving == Some(digest.as_str()) {
            return Ok(None);
        }
        let config = self.effective(d).await?;
        self.within_ceilings(d, &config)?;
        log::info!("{d}: the tag now names {}", generation_of(&digest));
        self.services_up(d, &config, None).await?;
        // A new generation replaces one: it takes no place of its own.
        let instance = self.run(d, &image_ref, &config, true, false).await?;
        if serving.is_some() && instance.digest.as_deref() == serving {
            // The tag moved back between the question and the pull.
            return Ok(None);
        }
        match self.answering(d, &instance, &config).await {
            Ok(upstream) => Ok(Some(upstream)),
            Err(e) => {
                log::warn!("{d}: new generation {} failed, removing it: {e}", short_id(&instance.id));
                if let Err(remove) = self.backend.remove(&instance.id).await {
                    log::warn!("{d}: cannot remove failed instance {}: {remove}", short_id(&instance.id));
                }
                Err(e)
            }
        }
    }

    /// Starts the generation kept before the current one and returns it
    /// answering; `current` is the instance serving now, if any.
    pub async fn previous_generation(&self, d: &Deployment, current_id: Option<&str>) -> Result<Upstream, PipesError> {
        let instances = self.backend.instances(d).await?;
        let current_id = current_id.map(str::to_owned).or_else(|| current(&instances).map(|i| i.id.clone()));
        let previous = instances
            .iter()
            .filter(|i| Some(&i.id) != current_id.as_ref())
            .max_by_key(|i| i.started())
            .ok_or_else(|| PipesError::NoPreviousGeneration { deployment: d.to_string() })?;
        log::info!("{d}: rolling back to instance {}", short_id(&previous.id));
        let config = self.effective(d).await?;
        self.services_up(d, &config, None).await?;
        let started = self.backend.start(&previous.id).await?;
        self.answering(d, &started, &config).await
    }

    /// Removes generations beyond the current one, the one before it, and
    /// those still draining.
    pub async fn prune(&self, d: &Deployment, current_id: &str, draining: &[String]) {
        let Ok(instances) = self.backend.instances(d).await else { return };
        let previous = instances.iter().filter(|i| i.id != current_id).max_by_key(|i| i.started()).map(|i| i.id.clone());
        for old in instances {
            let keep = old.id == current_id || Some(&old.id) == previous.as_ref() || draining.contains(&old.id);
            if !keep {
                log::info!("{d}: removing old generation {}", short_id(&old.id));
                if let Err(e) = self.backend.remove(&old.id).await {
                    log::warn!("{d}: cannot remove old generation {}: {e}", short_id(&old.id));
                }
            }
        }
    }

    /// Places for `n` more running instances, unless that would pass
    /// `PIPES_MAX_CONTAINERS` with those that run or are starting already.
    pub(super) async fn admit(&self, n: usize) -> Result<ContainerPlaces, PipesError> {
        if n == 0 {
            return Ok(ContainerPlaces(self.starting.clone(), 0));
        }
        let _one_at_a_time = self.admission.lock().await;
        let running = self.backend.list().await?.iter().filter(|i| i.running).count();
        if running + self.starting.load(Ordering::Acquire) + n > self.max_containers {
            return Err(PipesError::TooManyContainers { max: self.max_containers });
        }
        self.starting.fetch_add(n, Ordering::AcqRel);
        Ok(ContainerPlaces(self.starting.clone(), n))
    }

    /// Probes until the instance answers; fails if it exits or the timeout passes.
    async fn until_ready(&self, d: &Deployment, id: &str, addr: SocketAddr, config: &Effective) -> Result<(), PipesError> {
        self.timed(d, Phase::Probe, self.until_answering(d, id, addr, config)).await
    }

    async fn until_answering(&self, d: &Deployment, id: &str, addr: SocketAddr, config: &Effective) -> Result<(), PipesError> {
        let (path, timeout) = (config.health_path.as_str(), config.health_timeout);
        tokio::select! {
            biased;
            exit = self.backend.exited(id) => match exit {
                Ok(code) => Err(self.exit_failure(d, id, code).await),
                // Losing the watch is no failure of the instance: keep probing.
                Err(e) => {
                    log::warn!("{d}: cannot watch instance {}: {e}", short_id(id));
                    self.probe_until(d, id, addr, path, timeout).await
                }
            },
            ready = self.probe_until(d, id, addr, path, timeout) => ready,
        }
    }

    /// The failure of an instance that exited while starting, with its last
    /// log lines, each once: an instance started again keeps what its
    /// earlier runs printed, which would repeat the same crash.
    async fn exit_failure(&self, d: &Deployment, id: &str, code: i64) -> PipesError {
        PipesError::Exited { deployment: d.to_string(), code, logs: self.last_logs(id).await }
    }

    /// The last lines `id` wrote, each once.
    pub(super) async fn last_logs(&self, id: &str) -> Vec<String> {
        let mut seen = std::collections::HashSet::new();
        self.backend.logs(id, LOG_LINES).await.into_iter().filter(|l| seen.insert(l.clone())).collect()
    }

    async fn probe_until(&self, d: &Deployment, id: &str, addr: SocketAddr, path: &str, timeout: Duration) -> Result<(), PipesError> {
        if probe::until_answers(addr, path, timeout).await {
            return Ok(());
        }
        // An instance that never answers is stopped, so it does not hold
        // resources; it stays for its logs and is started again on demand.
        let (backend, id) = (self.backend.clone(), id.to_owned());
        tokio::spawn(async move {
            if let Err(e) = backend.stop(&id, NEVER_READY_GRACE).await {
                log::warn!("cannot stop never-ready instance {}: {e}", short_id(&id));
            }
        });
        Err(PipesError::NotReady { deployment: d.to_string(), timeout, probed: format!("GET http://{addr}{path}") })
    }

    /// Stops `d`'s running instances and its services, and keeps them.
    pub async fn stop(&self, d: &Deployment) -> Result<(), PipesError> {
        for i in self.backend.instances(d).await?.iter().filter(|i| i.running) {
            self.backend.stop(&i.id, STOP_GRACE).await?;
        }
        self.stop_services(d).await
    }

    /// Stops `instance_id`, keeping it (a drained or idle generation).
    pub async fn stop_instance(&self, instance_id: &str) -> Result<(), PipesError> {
        self.backend.stop(instance_id, STOP_GRACE).await
    }

    /// Stops an idle instance of `d`, and then its services, unless another
    /// Pipes served it since `quiet` ([`crate::engine::Replicas::stop_quiet`]);
    /// whether it stopped it.
    pub async fn stop_idle_instance(&self, d: &Deployment, instance_id: &str, quiet: u64) -> Result<bool, PipesError> {
        let stopped = match self.backend.replicas() {
            Some(replicas) => replicas.stop_quiet(instance_id, STOP_GRACE, quiet).await?,
            None => self.backend.stop(instance_id, STOP_GRACE).await.map(|()| true)?,
        };
        if stopped {
            self.stop_services(d).await?;
        }
        Ok(stopped)
    }

    /// Thaws a paused instance; only a backend that pauses has them.
    pub(super) async fn thaw(&self, instance_id: &str) -> Result<Instance, PipesError> {
        match self.backend.pausing() {
            Some(pausing) => pausing.unpause(instance_id).await,
            None => Err(PipesError::Engine { action: "thaw an instance", detail: "this backend cannot pause or thaw".into() }),
        }
    }

    /// Removes every generation of `d`'s app; its services stay.
    pub async fn remove(&self, d: &Deployment) -> Result<(), PipesError> {
        for i in self.backend.instances(d).await? {
            self.backend.remove(&i.id).await?;
        }
        Ok(())
    }

    /// Restarts `d`'s current generation if it runs; removes its instances
    /// instead when its config changed since it was made, so that the next
    /// start makes one from the config now (as a config PUT does).
    pub async fn restart(&self, d: &Deployment) -> Result<(), PipesError> {
        let config = self.effective(d).await;
        // A service's config change is applied here, its volumes kept.
        if let Ok(config) = &config {
            self.replace_outdated_services(d, config).await?;
        }
        let Some(i) = current(&self.backend.instances(d).await?).cloned() else { return Ok(()) };
        // A config changed since the instance was made is applied by making it anew.
        if let Ok(config) = config {
            if self.outdated(d, &i, &config) {
                log::info!("{d}: its config changed since instance {} was made: recreating it", short_id(&i.id));
                return self.remove(d).await;
            }
        }
        if i.running {
            self.backend.restart(&i.id, STOP_GRACE).await
        } else {
            Ok(())
        }
    }

    /// Whether `instance` was made with another config than `config`, the
    /// effective one now: a restart applies it. Told by the config's
    /// identity, never by how the API shows it.
    pub fn outdated(&self, d: &Deployment, instance: &Instance, config: &Effective) -> bool {
        let Some(made_on) = instance.port else { return false };
        let port = config.port.unwrap_or(made_on);
        match &instance.identity {
            Some(identity) => *identity != config.identity(&self.image_ref(d), port),
            // Made before Pipes recorded identities: only what the spec hash covers can be told.
            None => instance.spec_hash.as_deref() != Some(&config.spec_hash(&self.image_ref(d), port)),
        }
    }

    /// The current generation of `d` and the one kept before it.
    pub async fn generations(&self, d: &Deployment) -> Result<(Option<Instance>, Option<Instance>), PipesError> {
        let instances = self.backend.instances(d).await?;
        let now = current(&instances).cloned();
        let previous = instances.into_iter().filter(|i| Some(&i.id) != now.as_ref().map(|n| &n.id)).max_by_key(|i| i.started());
        Ok((now, previous))
    }

    /// The last `lines` lines of `d`'s current generation, with its id.
    pub async fn logs(&self, d: &Deployment, lines: usize) -> Result<(Option<String>, Vec<String>), PipesError> {
        match current(&self.backend.instances(d).await?) {
            Some(i) => {
                let lines = self.backend.logs(&i.id, lines).await;
                Ok((Some(i.id.clone()), lines))
            }
            None => Ok((None, Vec::new())),
        }
    }
}

/// Where `instance` answers, with what its config says of idleness and watching.
fn upstream_of(instance: &Instance, addr: SocketAddr, config: Option<&Effective>) -> Upstream {
    let mut upstream = Upstream::new(instance.id.clone(), addr, instance.digest.clone());
    upstream.idle_timeout = config.and_then(|c| c.idle_timeout);
    if let Some(c) = config {
        upstream.idle_action = c.idle_action;
        upstream.pause_timeout = c.pause_timeout;
    }
    upstream.watch = config.and_then(|c| c.watch);
    upstream
}

/// The container port the image implies: its single exposed TCP port, else 80.
fn image_port(d: &Deployment, image: &Image) -> Result<u16, PipesError> {
    match image.exposed_tcp.as_slice() {
        [] => Ok(DEFAULT_PORT),
        [port] => Ok(*port),
        several => Err(PipesError::Unservable {
            deployment: d.to_string(),
            reason: format!(
                "the image exposes several ports ({}); choose one with the deployment's `port` setting",
                several.iter().map(u16::to_string).collect::<Vec<_>>().join(", ")
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(ports: &[u16]) -> Image {
        Image { id: "sha256:x".into(), digest: None, exposed_tcp: ports.to_vec(), size: 0 }
    }

    #[test]
    fn port_comes_from_the_image_else_80() {
        let d = Deployment::parse("a/b:c").unwrap();
        assert_eq!(image_port(&d, &image(&[])).unwrap(), 80);
        assert_eq!(image_port(&d, &image(&[3000])).unwrap(), 3000);
        let e = image_port(&d, &image(&[80, 443])).unwrap_err();
        assert!(e.to_string().contains("80, 443"), "{e}");
    }
}

//! Step 4 of the request path: a cold start, from nothing to an answering
//! instance — and every other operation on a deployment's instance.
//!
//! Start a stopped instance of ours, or pull the image if it is missing and
//! run a new instance, then probe it until it answers, watching for it to exit
//! meanwhile. The backend decides what an instance is; this file decides when
//! one is started, replaced, stopped or given up on.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

use super::probe;
use super::slot::Upstream;
use crate::config::{Defaults, Effective, Pull};
use crate::engine::{short_id, Backend, Image, Instance, Spec};
use crate::error::PipesError;
use crate::route::Deployment;
use crate::settings::Settings;
use crate::store::Store;

/// Lines of an instance's log shown when it exits while starting.
const LOG_LINES: usize = 20;
/// Container port when neither config nor image names one.
const DEFAULT_PORT: u16 = 80;
/// How long an instance gets to stop before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a never-ready instance gets to stop: it never served anyone.
const NEVER_READY_GRACE: Duration = Duration::from_secs(2);

/// Starts and operates deployments on the backend.
pub struct Deployer {
    backend: Arc<dyn Backend>,
    store: Store,
    /// `PIPES_REGISTRY`: prefix of every image reference; `None` is Docker Hub.
    registry: Option<String>,
    defaults: Defaults,
    max_containers: usize,
    /// Instances admitted and not yet started.
    starting: Arc<AtomicUsize>,
    /// Serializes admission, so two starts cannot both take the last place.
    admission: Mutex<()>,
}

/// A place among `PIPES_MAX_CONTAINERS`, held from admission until the
/// instance runs (the backend counts it from then on).
struct Admitted(Arc<AtomicUsize>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Deployer {
    /// A deployer on `backend` with the configs in `store`.
    pub fn new(backend: Arc<dyn Backend>, store: Store, settings: &Settings) -> Self {
        Deployer {
            backend,
            store,
            registry: settings.registry.clone(),
            defaults: settings.defaults.clone(),
            max_containers: settings.max_containers,
            starting: Arc::new(AtomicUsize::new(0)),
            admission: Mutex::new(()),
        }
    }

    /// The backend it deploys on.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// The stored configs.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The full reference of a deployment's image, registry included.
    pub fn image_ref(&self, d: &Deployment) -> String {
        match &self.registry {
            Some(r) => format!("{r}/{}/{}:{}", d.user, d.repo, d.tag),
            None => format!("{}/{}:{}", d.user, d.repo, d.tag),
        }
    }

    /// The config `d` runs with: its own over its repository's over the defaults.
    pub async fn effective(&self, d: &Deployment) -> Result<Effective, PipesError> {
        let tag = self.store.tag(d).await?;
        let repository = self.store.repository(&d.user, &d.repo).await?;
        Ok(Effective::merge(tag.as_ref(), repository.as_ref(), &self.defaults))
    }

    /// Brings `d` to a running, answering instance and returns where it answers.
    pub async fn deploy(&self, d: &Deployment) -> Result<Upstream, PipesError> {
        let config = self.effective(d).await?;
        let image_ref = self.image_ref(d);
        let instance = match self.backend.instance(d).await? {
            Some(i) if i.running => i,
            Some(i) if i.port.is_some_and(|p| i.spec_hash.as_deref() == Some(&config.spec_hash(&image_ref, p))) => {
                let admitted = self.admit().await?;
                log::info!("{d}: starting its stopped instance {}", short_id(&i.id));
                let started = self.backend.start(&i.id).await?;
                drop(admitted);
                started
            }
            Some(i) => {
                let admitted = self.admit().await?;
                log::info!("{d}: replacing instance {} made from another config", short_id(&i.id));
                self.backend.remove(&i.id).await?;
                self.run(d, &image_ref, &config, admitted).await?
            }
            None => {
                let admitted = self.admit().await?;
                self.run(d, &image_ref, &config, admitted).await?
            }
        };
        if !instance.running {
            let code = instance.exit_code.unwrap_or(0);
            return Err(self.exit_failure(d, &instance.id, code).await);
        }
        let addr = instance.address.ok_or_else(|| PipesError::Unservable {
            deployment: d.to_string(),
            reason: "the running instance has no address Pipes can reach (is PIPES_NETWORK shared with Pipes?)".into(),
        })?;
        self.until_ready(d, &instance.id, addr, &config).await?;
        Ok(Upstream::new(addr, config.idle_timeout))
    }

    /// Pulls if needed, then runs a new instance of `d`.
    async fn run(&self, d: &Deployment, image_ref: &str, config: &Effective, admitted: Admitted) -> Result<Instance, PipesError> {
        let local = match config.pull {
            Pull::Always => None,
            Pull::Missing => self.backend.image(image_ref).await?,
        };
        let image = match local {
            Some(image) => image,
            None => {
                log::info!("{d}: pulling {image_ref}");
                self.backend.pull(image_ref).await?
            }
        };
        let port = match config.port {
            Some(port) => port,
            None => image_port(d, &image)?,
        };
        let spec = Spec {
            deployment: d.clone(),
            image: image_ref.to_owned(),
            port,
            hash: config.spec_hash(image_ref, port),
            env: config.env.clone(),
            cmd: config.cmd.clone(),
            memory_bytes: config.memory.0,
            cpus: config.cpus,
            restart: config.restart,
        };
        let instance = self.backend.run(&spec).await?;
        drop(admitted);
        Ok(instance)
    }

    /// A place for one more running instance, unless `PIPES_MAX_CONTAINERS`
    /// run or are starting already.
    async fn admit(&self) -> Result<Admitted, PipesError> {
        let _one_at_a_time = self.admission.lock().await;
        let running = self.backend.list().await?.iter().filter(|i| i.running).count();
        if running + self.starting.load(Ordering::Acquire) >= self.max_containers {
            return Err(PipesError::TooManyContainers { max: self.max_containers });
        }
        self.starting.fetch_add(1, Ordering::AcqRel);
        Ok(Admitted(self.starting.clone()))
    }

    /// Probes until the instance answers; fails if it exits or the timeout passes.
    async fn until_ready(&self, d: &Deployment, id: &str, addr: SocketAddr, config: &Effective) -> Result<(), PipesError> {
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

    /// The failure of an instance that exited while starting, with its last log lines.
    async fn exit_failure(&self, d: &Deployment, id: &str, code: i64) -> PipesError {
        let logs = self.backend.logs(id, LOG_LINES).await;
        PipesError::Exited { deployment: d.to_string(), code, logs }
    }

    async fn probe_until(
        &self,
        d: &Deployment,
        id: &str,
        addr: SocketAddr,
        path: &str,
        timeout: Duration,
    ) -> Result<(), PipesError> {
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

    /// Stops `d`'s instance and keeps it.
    pub async fn stop(&self, d: &Deployment) -> Result<(), PipesError> {
        match self.backend.instance(d).await? {
            Some(i) => self.backend.stop(&i.id, STOP_GRACE).await,
            None => Ok(()),
        }
    }

    /// Stops and removes `d`'s instance.
    pub async fn remove(&self, d: &Deployment) -> Result<(), PipesError> {
        match self.backend.instance(d).await? {
            Some(i) => self.backend.remove(&i.id).await,
            None => Ok(()),
        }
    }

    /// Restarts `d`'s instance if it runs.
    pub async fn restart(&self, d: &Deployment) -> Result<(), PipesError> {
        match self.backend.instance(d).await? {
            Some(i) if i.running => self.backend.restart(&i.id, STOP_GRACE).await,
            _ => Ok(()),
        }
    }

    /// The last `lines` lines of `d`'s instance, with its id.
    pub async fn logs(&self, d: &Deployment, lines: usize) -> Result<(Option<String>, Vec<String>), PipesError> {
        match self.backend.instance(d).await? {
            Some(i) => {
                let lines = self.backend.logs(&i.id, lines).await;
                Ok((Some(i.id), lines))
            }
            None => Ok((None, Vec::new())),
        }
    }
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
        Image { id: "sha256:x".into(), digest: None, exposed_tcp: ports.to_vec() }
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

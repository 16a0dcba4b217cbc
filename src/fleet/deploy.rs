//! Step 4 of the request path: a cold start, from nothing to an answering container.
//!
//! Start a stopped container of ours, or pull the image if it is missing,
//! create the container (labelled, under a name unique to the deployment),
//! start it, and probe it until it answers, watching for it to exit meanwhile.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Mutex;

use super::probe;
use super::Upstream;
use crate::config::{Effective, Pull};
use crate::engine::{Container, ContainerSpec, Engine, Image};
use crate::error::PipesError;
use crate::route::Deployment;
use crate::settings::Settings;
use crate::store::Store;

/// Lines of a container's log shown when it exits while starting.
const LOG_LINES: usize = 20;
/// Container port when neither config nor image names one.
const DEFAULT_PORT: u16 = 80;
/// Seconds a never-ready container gets to stop before it is killed.
const STOP_GRACE_SECS: i32 = 2;

/// Starts deployments on the engine.
pub struct Deployer {
    engine: Engine,
    settings: Arc<Settings>,
    store: Store,
    /// Containers admitted and not yet started.
    starting: Arc<AtomicUsize>,
    /// Serializes admission, so two starts cannot both take the last place.
    admission: Mutex<()>,
}

/// A place among `PIPES_MAX_CONTAINERS`, held from admission until the
/// container runs (the engine counts it from then on).
struct Admitted(Arc<AtomicUsize>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Deployer {
    /// A deployer using `engine` with `settings`.
    pub fn new(engine: Engine, settings: Arc<Settings>) -> Self {
        let store = Store::new(settings.config_dir.clone());
        Deployer { engine, settings, store, starting: Arc::new(AtomicUsize::new(0)), admission: Mutex::new(()) }
    }

    /// The engine it deploys on.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The settings it deploys with.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The stored configs.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The config `d` runs with: its own over its repository's over the defaults.
    pub fn effective(&self, d: &Deployment) -> Result<Effective, PipesError> {
        let tag = self.store.tag(d)?;
        let repository = self.store.repository(&d.user, &d.repo)?;
        Ok(Effective::merge(tag.as_ref(), repository.as_ref(), &self.settings.defaults))
    }

    /// Brings `d` to a running, answering container and returns where it answers.
    pub async fn deploy(&self, d: &Deployment) -> Result<Upstream, PipesError> {
        let config = self.effective(d)?;
        let image_ref = self.settings.image_ref(d);
        let name = self.engine.container_name(d);
        let container = match self.engine.inspect(&name).await? {
            Some(c) if c.running => c,
            Some(c) if c.port.is_some_and(|p| c.config_hash.as_deref() == Some(&config.spec_hash(&image_ref, p))) => {
                let admitted = self.admit().await?;
                log::info!("{d}: starting its stopped container {}", super::short_id(&c.id));
                self.start(&c.id, admitted).await?
            }
            Some(c) => {
                let admitted = self.admit().await?;
                log::info!("{d}: replacing container {} made from another config", super::short_id(&c.id));
                self.engine.remove(&c.id).await?;
                self.create(d, &name, &image_ref, &config, admitted).await?
            }
            None => {
                let admitted = self.admit().await?;
                self.create(d, &name, &image_ref, &config, admitted).await?
            }
        };
        if !container.running {
            return Err(self.exited(d, &container.id, container.exit_code).await);
        }
        let addr = container.address.ok_or_else(|| PipesError::Unservable {
            deployment: d.to_string(),
            reason: "the running container has no address Pipes can reach (is PIPES_NETWORK shared with Pipes?)".into(),
        })?;
        self.until_ready(d, &container.id, addr, &config).await?;
        Ok(Upstream::new(container.id, addr, config.idle_timeout))
    }

    /// Pulls if needed, creates and starts a new container of `d`.
    async fn create(
        &self,
        d: &Deployment,
        name: &str,
        image_ref: &str,
        config: &Effective,
        admitted: Admitted,
    ) -> Result<Container, PipesError> {
        let local = match config.pull {
            Pull::Always => None,
            Pull::Missing => self.engine.image(image_ref).await?,
        };
        let image = match local {
            Some(image) => image,
            None => {
                log::info!("{d}: pulling {image_ref}");
                self.engine.pull(image_ref).await?;
                self.engine.image(image_ref).await?.ok_or_else(|| PipesError::Engine {
                    action: "pull an image",
                    detail: format!("{image_ref} is missing after the pull"),
                })?
            }
        };
        let port = match config.port {
            Some(port) => port,
            None => image_port(d, &image)?,
        };
        let hash = config.spec_hash(image_ref, port);
        let spec = ContainerSpec {
            name: name.to_owned(),
            image: image_ref.to_owned(),
            port,
            labels: self.engine.labels(d, &hash, port),
            env: config.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            cmd: config.cmd.clone(),
            memory_bytes: config.memory.0,
            cpus: config.cpus,
            restart: config.restart,
        };
        let id = match self.engine.create(&spec).await? {
            Some(id) => id,
            // Another Pipes created it first: use that one, never a second.
            None => {
                let c = self.engine.inspect(name).await?.ok_or_else(|| PipesError::Engine {
                    action: "create a container",
                    detail: format!("name {name} is taken but no such container exists"),
                })?;
                if c.running {
                    return Ok(c);
                }
                c.id
            }
        };
        log::info!("{d}: created container {} ({image_ref} port {port})", super::short_id(&id));
        self.start(&id, admitted).await
    }

    /// A place for one more running container, unless `PIPES_MAX_CONTAINERS`
    /// run or are starting already.
    async fn admit(&self) -> Result<Admitted, PipesError> {
        let _one_at_a_time = self.admission.lock().await;
        let running = self.engine.managed(false).await?.len();
        if running + self.starting.load(Ordering::Acquire) >= self.settings.max_containers {
            return Err(PipesError::TooManyContainers { max: self.settings.max_containers });
        }
        self.starting.fetch_add(1, Ordering::AcqRel);
        Ok(Admitted(self.starting.clone()))
    }

    /// Starts an admitted container and inspects it.
    async fn start(&self, id: &str, admitted: Admitted) -> Result<Container, PipesError> {
        self.engine.start(id).await?;
        drop(admitted);
        self.engine.inspect(id).await?.ok_or_else(|| PipesError::Engine {
            action: "start a container",
            detail: format!("container {} vanished after start", super::short_id(id)),
        })
    }

    /// Probes until the container answers; fails if it exits or the timeout passes.
    async fn until_ready(&self, d: &Deployment, id: &str, addr: SocketAddr, config: &Effective) -> Result<(), PipesError> {
        let (path, timeout) = (config.health_path.as_str(), config.health_timeout);
        tokio::select! {
            biased;
            exit = self.engine.exited(id) => match exit {
                Ok(code) => Err(self.exited(d, id, code).await),
                // Losing the watch is no failure of the container: keep probing.
                Err(e) => {
                    log::warn!("{d}: cannot watch container {}: {e}", super::short_id(id));
                    self.probe_until(d, id, addr, path, timeout).await
                }
            },
            ready = self.probe_until(d, id, addr, path, timeout) => ready,
        }
    }

    /// The failure of a container that exited while starting, with its last log lines.
    async fn exited(&self, d: &Deployment, id: &str, code: i64) -> PipesError {
        let logs = self.engine.log_tail(id, LOG_LINES).await;
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
        // A container that never answers is stopped, so it does not hold
        // resources; it stays for its logs and is started again on demand.
        let engine = self.engine.clone();
        let id_owned = id.to_owned();
        tokio::spawn(async move {
            if let Err(e) = engine.stop(&id_owned, STOP_GRACE_SECS).await {
                log::warn!("cannot stop never-ready container {}: {e}", super::short_id(&id_owned));
            }
        });
        Err(PipesError::NotReady { deployment: d.to_string(), timeout, probed: format!("GET http://{addr}{path}") })
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

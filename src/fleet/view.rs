//! What the API, the dashboard and metrics read of the fleet: states,
//! statuses and lists, from the table alone or with the backend and store.

use std::net::SocketAddr;
use std::time::Duration;

use super::{Fleet, Slot};
use crate::config::{DeployConfig, Effective};
use crate::engine::{Image, Instance};
use crate::error::PipesError;
use crate::route::{Deployment, DeploymentRef};

/// What a deployment is doing, as the API and its users see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Its instance runs.
    Running,
    /// A start is under way.
    Starting,
    /// Its instance is paused: it holds its memory, and the next request
    /// thaws it in milliseconds.
    Paused,
    /// Its instance exists and does not run.
    Stopped,
    /// It has no instance.
    Absent,
    /// Its last start failed (remembered for `PIPES_FAILURE_TTL`).
    Failed,
    /// Its instance was just removed: told as it happens; a status read
    /// afterwards says `absent`.
    Removed,
}

impl State {
    /// The one rule for every view: a start under way wins, then the backend's
    /// word on the instance, then a remembered failure.
    fn of(slot: Option<&Slot>, instance: Option<&Instance>, failed: bool) -> State {
        if slot.is_some_and(Slot::starting) {
            return State::Starting;
        }
        match instance {
            Some(i) if i.running => State::Running,
            Some(i) if i.paused => State::Paused,
            _ if failed => State::Failed,
            Some(_) => State::Stopped,
            None => State::Absent,
        }
    }

    /// The name the API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Running => "running",
            State::Starting => "starting",
            State::Paused => "paused",
            State::Stopped => "stopped",
            State::Absent => "absent",
            State::Failed => "failed",
            State::Removed => "removed",
        }
    }
}

/// Everything known of one deployment.
#[derive(Debug)]
pub struct Status {
    pub deployment: Deployment,
    pub state: State,
    /// The full image reference.
    pub image_ref: String,
    /// The image as the backend has it locally.
    pub image: Option<Image>,
    pub allowed: bool,
    /// The current generation.
    pub instance: Option<Instance>,
    /// The generation kept for a rollback.
    pub previous: Option<Instance>,
    /// Where requests go, if the table has an upstream.
    pub upstream: Option<SocketAddr>,
    pub last_request_ms: Option<u64>,
    /// Requests, upgraded connections and streams open on the upstream.
    pub open_connections: usize,
    /// When it counts as idle (Unix ms): `None` while something is open or
    /// without an idle timeout.
    pub idle_at_ms: Option<u64>,
    pub idle_timeout: Option<Duration>,
    /// The effective config, or why it cannot be read.
    pub config: Result<Effective, PipesError>,
    /// The current generation was made from another config than the
    /// effective one (a restart applies it).
    pub config_pending: bool,
    /// The failure of the last start, while it is remembered.
    pub last_error: Option<PipesError>,
    /// The services beside the app, with whether each was made from another
    /// config than the effective one.
    pub services: Vec<(Instance, bool)>,
    /// The backend's names of its volumes.
    pub volumes: Vec<String>,
}

/// One line of the fleet's list.
#[derive(Debug)]
pub struct Summary {
    pub deployment: Deployment,
    pub state: State,
    pub instance_id: Option<String>,
    pub upstream: Option<SocketAddr>,
    pub last_request_ms: Option<u64>,
    /// How many services it has beside its app.
    pub services: usize,
}

/// A deployment's config layers and their merge.
#[derive(Debug)]
pub struct Configs {
    pub own: Option<DeployConfig>,
    pub repository: Option<DeployConfig>,
    pub effective: Effective,
}

impl Fleet {
    /// The state of `slot` as the table alone tells it, without asking the
    /// backend: `stopped` covers deployments whose instance is stopped or
    /// gone. For metrics, read at every scrape.
    pub fn table_state(&self, slot: &Slot) -> State {
        if slot.upstream().is_some() {
            State::Running
        } else if slot.starting() {
            State::Starting
        } else if slot.failure(self.failure_ttl).is_some() {
            State::Failed
        } else {
            State::Stopped
        }
    }

    /// The state of `d` and its remembered failure as the table alone tells
    /// them, without asking the backend (see [`Fleet::table_state`]).
    pub fn table_view(&self, d: DeploymentRef<'_>) -> (State, Option<PipesError>) {
        match self.get(d) {
            Some(slot) => (self.table_state(&slot), slot.failure(self.failure_ttl)),
            None => match self.missing(d) {
                Some(e) => (State::Failed, Some(e)),
                None => (State::Stopped, None),
            },
        }
    }

    /// What the backend says it is, for the start-up log.
    pub async fn describe_backend(&self) -> Result<String, PipesError> {
        let deployer = self.deployer.clone();
        self.on_control(async move { deployer.backend().describe().await }).await
    }

    /// Everything known of `d`, from the table, the backend and the store.
    pub async fn status(&self, d: &Deployment) -> Result<Status, PipesError> {
        let (deployer, key) = (self.deployer.clone(), d.clone());
        let ((instance, previous), image, config, services, volumes) = self
            .on_control(async move {
                let generations = deployer.generations(&key).await?;
                let image = deployer.backend().images().image(&deployer.image_ref(&key)).await?;
                let services = deployer.backend().services(&key).await?;
                let volumes = deployer.backend().volumes(&key).await?;
                Ok((generations, image, deployer.effective(&key).await, services, volumes))
            })
            .await?;
        let services = services
            .into_iter()
            .map(|s| {
                let pending = config.as_ref().is_ok_and(|c| self.deployer.service_outdated(&s, c));
                (s, pending)
            })
            .collect();
        let slot = self.get(d.as_ref());
        let upstream = slot.as_deref().and_then(Slot::upstream);
        let last_error = slot.as_deref().and_then(|s| s.failure(self.failure_ttl)).or_else(|| self.missing(d.as_ref()));
        let config_pending = match (&instance, &config) {
            (Some(i), Ok(c)) => self.deployer.outdated(d, i, c),
            _ => false,
        };
        Ok(Status {
            deployment: d.clone(),
            state: State::of(slot.as_deref(), instance.as_ref(), last_error.is_some()),
            image_ref: self.deployer.image_ref(d),
            image,
            allowed: self.allows(d.as_ref()),
            instance,
            previous,
            upstream: upstream.as_ref().map(|u| u.addr),
            last_request_ms: slot.as_deref().and_then(Slot::last_request_ms),
            open_connections: upstream.as_ref().map_or(0, |u| u.open()),
            idle_at_ms: upstream.as_ref().and_then(|u| slot.as_deref()?.idle_at_ms(u)),
            idle_timeout: upstream.as_ref().and_then(|u| u.idle_timeout),
            config,
            config_pending,
            last_error,
            services,
            volumes,
        })
    }

    /// Every deployment with an instance or a place in the table, sorted.
    pub async fn summaries(&self) -> Result<Vec<Summary>, PipesError> {
        let deployer = self.deployer.clone();
        let instances = self.on_control(async move { deployer.backend().list().await }).await?;
        let mut keys: Vec<Deployment> = instances.iter().map(|i| i.deployment.clone()).collect();
        keys.extend(self.slots().iter().map(|s| s.deployment.clone()));
        keys.sort();
        keys.dedup();
        Ok(keys
            .into_iter()
            .map(|d| {
                let slot = self.get(d.as_ref());
                let mine: Vec<Instance> = instances.iter().filter(|i| i.deployment == d && i.service.is_none()).cloned().collect();
                let services = instances.iter().filter(|i| i.deployment == d && i.service.is_some()).count();
                let instance = crate::engine::current(&mine);
                // A name whose image the registry did not have says so, as `GET container` does.
                let failed = slot.as_deref().and_then(|s| s.failure(self.failure_ttl)).is_some() || self.missing(d.as_ref()).is_some();
                Summary {
                    state: State::of(slot.as_deref(), instance, failed),
                    instance_id: instance.map(|i| i.id.clone()),
                    upstream: slot.as_deref().and_then(Slot::upstream).map(|u| u.addr),
                    last_request_ms: slot.as_deref().and_then(Slot::last_request_ms),
                    services,
                    deployment: d,
                }
            })
            .collect())
    }

    /// `d`'s own config, its repository's, and what they merge to.
    pub async fn configs(&self, d: &Deployment) -> Result<Configs, PipesError> {
        let store = self.deployer.store();
        Ok(Configs { own: store.tag(d).await?, repository: store.repository(&d.user, &d.repo).await?, effective: self.deployer.effective(d).await? })
    }
}

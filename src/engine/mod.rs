//! The backend seam: what the fleet needs from whatever runs deployments.
//!
//! [`Backend`] is deliberately narrow and speaks of intent — the instances of
//! a deployment, an image's facts, run this spec, stop, restart, remove, wait
//! for an exit, logs — so that a backend other than Docker's containers (for
//! example Swarm services) is one more module beside [`docker`], and the fleet
//! does not change. Every backend failure reaches the fleet as a
//! [`PipesError`] that already says what failed; registry passwords never
//! appear in one.

pub mod docker;
#[cfg(test)]
pub mod fake;
pub mod swarm;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures_util::stream::BoxStream;

use crate::config::Restart;
use crate::error::PipesError;
use crate::route::Deployment;
use crate::secret::Secret;

/// Label set to `true` on every instance Pipes creates.
pub const LABEL_MANAGED: &str = "pipes.managed";
/// Label naming the Pipes instance (`PIPES_INSTANCE`) that owns an instance.
pub const LABEL_INSTANCE: &str = "pipes.instance";
/// Label holding the deployment key `user/repo:tag`.
pub const LABEL_DEPLOYMENT: &str = "pipes.deployment";
/// Label holding the hash of the spec an instance was made from.
pub const LABEL_CONFIG_HASH: &str = "pipes.config-hash";
/// Label holding the container port Pipes proxies to.
pub const LABEL_PORT: &str = "pipes.port";
/// Label holding the image digest (`sha256:…`) an instance was made from.
pub const LABEL_DIGEST: &str = "pipes.digest";
/// Label holding the effective config an instance was made from (JSON).
pub const LABEL_CONFIG: &str = "pipes.config";

/// Labels Pipes sets itself, which `PIPES_LABELS` may not override.
pub const RESERVED_LABELS: [&str; 7] = [LABEL_MANAGED, LABEL_INSTANCE, LABEL_DEPLOYMENT, LABEL_CONFIG_HASH, LABEL_PORT, LABEL_DIGEST, LABEL_CONFIG];

/// How often a Pipes renews its claim on its instance name ([`Backend::claim`]).
pub const CLAIM_RENEW_EVERY: Duration = Duration::from_secs(20);

/// Told how far a pull got: bytes done and in all, over the layers so far.
pub type Progress<'a> = dyn Fn(u64, u64) + Send + Sync + 'a;

/// The first 12 characters of an instance id, as `docker ps` shows it.
pub fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// One instance of a deployment as the backend knows it: a container, or a
/// service with its task.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    /// The backend's id of the instance.
    pub id: String,
    pub deployment: Deployment,
    /// It runs and is not paused: it answers.
    pub running: bool,
    /// It is frozen (paused): it holds its memory and answers nothing until
    /// unpaused.
    pub paused: bool,
    /// How it last exited; `None` while it runs or before it ever ran.
    pub exit_code: Option<i64>,
    /// The hash of the [`Spec`] it was made from (`None` if not made by Pipes' rules).
    pub spec_hash: Option<String>,
    /// The container port Pipes proxies to.
    pub port: Option<u16>,
    /// When it last started (RFC 3339), as the backend reports it.
    pub started_at: Option<String>,
    /// Where it answers, if it runs and Pipes can reach it.
    pub address: Option<SocketAddr>,
    /// The image digest (`sha256:…`) it was made from, if known.
    pub digest: Option<String>,
    /// The id of the local image it was made from, if known.
    pub image_id: Option<String>,
    /// The effective config it was made from, as the API shows it (JSON);
    /// `None` for instances made before Pipes kept it.
    pub config: Option<String>,
}

impl Instance {
    /// An instance just made from `spec` under `id`, not started yet.
    pub fn created(id: String, spec: &Spec) -> Instance {
        Instance {
            id,
            deployment: spec.deployment.clone(),
            running: false,
            paused: false,
            exit_code: None,
            spec_hash: Some(spec.hash.clone()),
            port: Some(spec.port),
            started_at: None,
            address: None,
            digest: spec.digest.clone(),
            image_id: Some(spec.image_id.clone()),
            config: Some(spec.config.clone()),
        }
    }

    /// When it last started, for telling generations apart; `None` if it never ran.
    pub fn started(&self) -> Option<SystemTime> {
        self.started_at.as_deref().and_then(|s| humantime::parse_rfc3339_weak(s.trim_end_matches('Z')).ok())
    }

    /// The generation: the first 12 hex digits of its digest.
    pub fn generation(&self) -> Option<&str> {
        self.digest.as_deref().map(generation_of)
    }
}

/// The generation name of a digest: its first 12 hex digits, as in short ids.
pub fn generation_of(digest: &str) -> &str {
    let hex = digest.rsplit(':').next().unwrap_or(digest);
    hex.get(..12).unwrap_or(hex)
}

/// Which of a deployment's instances is its current generation: the running
/// one started last, else the one started last. A generation started by
/// hand (`docker start`) or by a rollback becomes current that way, with no
/// state outside the backend.
pub fn current(instances: &[Instance]) -> Option<&Instance> {
    let last_started = |a: &&Instance, b: &&Instance| a.started().cmp(&b.started());
    instances.iter().filter(|i| i.running).max_by(last_started).or_else(|| instances.iter().max_by(last_started))
}

/// What Pipes needs to know of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub id: String,
    /// The registry digest (`sha256:…`) of the reference it was pulled by, if any.
    pub digest: Option<String>,
    /// Exposed TCP ports, sorted.
    pub exposed_tcp: Vec<u16>,
}

/// Everything an instance is made from; the backend adds its own names and labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub deployment: Deployment,
    /// The full image reference, registry included.
    pub image: String,
    pub port: u16,
    /// A short hash of everything below; an instance with another hash was
    /// made from another spec and is replaced, not started.
    pub hash: String,
    pub env: BTreeMap<String, String>,
    pub cmd: Option<Vec<String>>,
    pub memory_bytes: u64,
    pub cpus: f64,
    pub restart: Restart,
    /// The image's digest (`sha256:…`): the generation this instance is.
    pub digest: Option<String>,
    /// The local image's id, which the instance is made from.
    pub image_id: String,
    /// Most processes the instance may run.
    pub pids: u32,
    /// The Linux capabilities it keeps; all others are dropped.
    pub capabilities: Vec<String>,
    /// The effective config it is made from, as the API shows it (JSON):
    /// kept with the instance, so what runs can be told from what is
    /// configured now.
    pub config: String,
}

/// Something the backend did to one of this Pipes' instances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The instance's id.
    pub id: String,
    pub deployment: Option<Deployment>,
    pub kind: EventKind,
    /// When, in nanoseconds since the Unix epoch (to resume after it).
    pub time_nano: i64,
}

/// What happened to an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    Started,
    /// It stopped running, with its exit code if known.
    Died(Option<i64>),
    Stopped,
    Killed,
    OutOfMemory,
    Destroyed,
    /// It was frozen: it answers nothing until unpaused.
    Paused,
    /// It was thawed.
    Unpaused,
    /// Its health check reported this status.
    Health(String),
}

impl EventKind {
    /// Whether the instance no longer answers after this.
    pub fn ends_it(&self) -> bool {
        matches!(self, EventKind::Died(_) | EventKind::Stopped | EventKind::Killed | EventKind::OutOfMemory | EventKind::Destroyed | EventKind::Paused)
    }
}

/// What the other Pipes serving an instance did lately, asked before an idle stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quiet {
    /// One of them had something open on it at this time (Unix ms), within
    /// the idle timeout: it is not idle.
    Busy(u64),
    /// None did: it may be stopped, unless something changes before
    /// [`Backend::stop_quiet`] is given this token.
    Since(u64),
}

/// Credentials for the registry (`DOCKER_AUTH*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryAuth {
    pub username: String,
    pub email: Option<String>,
    pub password: Secret,
}

/// Where deployments run. Implementations keep their own connection and
/// conventions (names, labels, networks); the fleet holds one as a trait object.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// What this backend is, where it is and how it reaches deployments, for
    /// the start-up log; an error when it cannot be reached.
    async fn describe(&self) -> Result<String, PipesError>;

    /// Every instance of this Pipes (`PIPES_INSTANCE`), running or not.
    async fn list(&self) -> Result<Vec<Instance>, PipesError>;

    /// Every instance (generation) of `d`, running or not.
    async fn instances(&self, d: &Deployment) -> Result<Vec<Instance>, PipesError>;

    /// The image `reference` as the backend has it locally, if it does.
    async fn image(&self, reference: &str) -> Result<Option<Image>, PipesError>;

    /// Pulls `reference` with the configured credentials, then its facts.
    async fn pull(&self, reference: &str, progress: &Progress<'_>) -> Result<Image, PipesError>;

    /// The digest (`sha256:…`) the registry holds for `reference` now, asked
    /// with the configured credentials, without pulling.
    async fn registry_digest(&self, reference: &str) -> Result<String, PipesError>;

    /// Creates an instance from `spec` (one per deployment and digest),
    /// not started. If that instance exists already (another Pipes won the
    /// race, or a rollback target), it is returned as it is (maybe running)
    /// when it was made from the same spec, and replaced when not: there is
    /// never a second.
    async fn create(&self, spec: &Spec) -> Result<Instance, PipesError>;

    /// Starts a stopped instance and returns it as it then is.
    async fn start(&self, id: &str) -> Result<Instance, PipesError>;

    /// Whether it can freeze instances ([`Backend::pause`]); one that cannot
    /// stops idle ones whose `idle_action` is `pause`.
    fn pauses(&self) -> bool {
        true
    }

    /// Freezes a running instance (it keeps its memory and answers nothing).
    async fn pause(&self, id: &str) -> Result<(), PipesError>;

    /// Thaws a paused instance and returns it, running.
    async fn unpause(&self, id: &str) -> Result<Instance, PipesError>;

    /// Stops an instance, giving it `grace` before it is killed; a stopped or
    /// vanished one is left as it is.
    async fn stop(&self, id: &str, grace: Duration) -> Result<(), PipesError>;

    /// Claims this Pipes' instance name (`PIPES_INSTANCE`) for as long as the
    /// process lives, renewing the claim when called again. Returns who holds
    /// it when another live Pipes does, unless `beside`: an upgrade's
    /// hand-over runs beside the Pipes it replaces.
    async fn claim(&self, beside: bool) -> Result<Option<String>, PipesError>;

    /// Lets this process' claim go.
    async fn release(&self);

    /// Whether other Pipes serve this Pipes' instances too (Swarm replicas):
    /// activity is then shared ([`Backend::share_activity`]) and an idle stop
    /// asks the others first ([`Backend::quiet_elsewhere`]).
    fn shared(&self) -> bool {
        false
    }

    /// Records, for the other Pipes serving `id`, that this one had
    /// something open on it at `at_ms` (Unix ms).
    async fn share_activity(&self, _id: &str, _at_ms: u64) -> Result<(), PipesError> {
        Ok(())
    }

    /// Whether any other Pipes serving `id` had something open on it within
    /// `idle`. Alone, always quiet.
    async fn quiet_elsewhere(&self, _id: &str, _idle: Duration) -> Result<Quiet, PipesError> {
        Ok(Quiet::Since(0))
    }

    /// Stops `id` as [`Backend::stop`] does, unless another Pipes recorded
    /// activity on it since [`Backend::quiet_elsewhere`] gave `since`;
    /// whether it stopped it.
    async fn stop_quiet(&self, id: &str, grace: Duration, _since: u64) -> Result<bool, PipesError> {
        self.stop(id, grace).await.map(|()| true)
    }

    /// Restarts an instance, giving it `grace` to stop.
    async fn restart(&self, id: &str, grace: Duration) -> Result<(), PipesError>;

    /// Removes an instance, running or not; a vanished one is no error.
    async fn remove(&self, id: &str) -> Result<(), PipesError>;

    /// Resolves when the instance is not running, with its exit code.
    async fn exited(&self, id: &str) -> Result<i64, PipesError>;

    /// The last `lines` lines the instance wrote (empty when unavailable).
    async fn logs(&self, id: &str, lines: usize) -> Vec<String>;

    /// What happens to this Pipes' instances from now on (or since
    /// `since_nano`), as it happens. The stream ends when the connection
    /// does; the caller reconnects.
    fn events(&self, since_nano: Option<i64>) -> BoxStream<'static, Result<Event, PipesError>>;
}

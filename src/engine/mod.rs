//! The backend seam: what the fleet needs from whatever runs deployments.
//!
//! [`Backend`] (in `backend.rs`) is deliberately narrow and speaks of intent —
//! the instances of a deployment, an image's facts, run this spec, stop,
//! restart, remove, wait for an exit, logs, events — so that another backend
//! is one more module beside [`docker`] and [`swarm`], and the fleet does not
//! change. What only some backends can do (pause, share activity between
//! replicas, claim the instance name) are capabilities a backend offers or
//! not. Every backend failure reaches the fleet as a
//! [`PipesError`](crate::error::PipesError) that
//! already says what failed; registry passwords never appear in one.
//!
//! `moby` is what both backends on Docker's engine API share; `fake` is an
//! in-memory backend for tests. `tests/it/contract.rs` holds every backend to
//! the same behaviour.

mod backend;
pub mod docker;
pub mod fake;
pub mod moby;
pub mod swarm;

pub use backend::{Backend, Claims, Images, Pausing, Replicas};

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use crate::config::Restart;
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
/// Label holding the identity of that config ([`Spec::identity`]).
pub const LABEL_IDENTITY: &str = "pipes.config-identity";

/// Label naming the service an instance is, beside its deployment's app.
pub const LABEL_SERVICE: &str = "pipes.service";
/// Label naming a deployment's volume as its config does.
pub const LABEL_VOLUME: &str = "pipes.volume";

/// Labels Pipes sets itself, which `PIPES_LABELS` may not override.
pub const RESERVED_LABELS: [&str; 10] =
    [LABEL_MANAGED, LABEL_INSTANCE, LABEL_DEPLOYMENT, LABEL_CONFIG_HASH, LABEL_PORT, LABEL_DIGEST, LABEL_CONFIG, LABEL_IDENTITY, LABEL_SERVICE, LABEL_VOLUME];

/// How often a Pipes renews its claim on its instance name ([`Claims::claim`]).
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
    /// The service it is, beside the deployment's app; `None` for the app.
    pub service: Option<String>,
    /// It runs and is not paused: it answers.
    pub running: bool,
    /// It is frozen (paused): it holds its memory and answers nothing until
    /// unpaused.
    pub paused: bool,
    /// How it last exited; `None` while it runs or before it ever ran.
    pub exit_code: Option<i64>,
    /// The hash of the [`Spec`] it was made from (`None` if not made by Pipes' rules).
    pub spec_hash: Option<String>,
    /// The identity of the whole config it was made with ([`Spec::identity`]);
    /// `None` for instances made before Pipes recorded it.
    pub identity: Option<String>,
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
    /// What its health check says (`starting`, `healthy`, `unhealthy`),
    /// when it has one the backend runs ([`Spec::health_cmd`]).
    pub health: Option<String>,
}

impl Instance {
    /// An instance just made from `spec` under `id`, not started yet.
    pub fn created(id: String, spec: &Spec) -> Instance {
        Instance {
            id,
            deployment: spec.deployment.clone(),
            service: spec.service.clone(),
            running: false,
            paused: false,
            exit_code: None,
            spec_hash: Some(spec.hash.clone()),
            identity: Some(spec.identity.clone()),
            port: Some(spec.port),
            started_at: None,
            address: None,
            digest: spec.digest.clone(),
            image_id: Some(spec.image_id.clone()),
            config: Some(spec.config.clone()),
            health: None,
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
    /// Bytes it takes on the engine's disk.
    pub size: u64,
}

/// Everything an instance is made from; the backend adds its own names and labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub deployment: Deployment,
    /// The service this instance is, reached by that name on the
    /// deployment's own network; `None` for the app.
    pub service: Option<String>,
    /// The full image reference, registry included.
    pub image: String,
    pub port: u16,
    /// A short hash of everything below; an instance with another hash was
    /// made from another spec and is replaced, not started.
    pub hash: String,
    /// The identity of the whole effective config the instance serves
    /// with: its spec and what Pipes applies at its start (probe, idle,
    /// pause, pulls, tag watching). Another one now means a change is pending.
    pub identity: String,
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
    /// The deployment's volumes it mounts: volume name → mount path. A
    /// volume outlives instances; it goes with the deployment.
    pub volumes: BTreeMap<String, String>,
    /// Whether it joins the deployment's own network (the deployment has
    /// services); a service always does.
    pub network: bool,
    /// A command the backend runs in the instance, again and again: exit 0
    /// means healthy ([`Instance::health`]).
    pub health_cmd: Option<Vec<String>>,
}

/// Something the backend did to one of this Pipes' instances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The instance's id.
    pub id: String,
    pub deployment: Option<Deployment>,
    /// The service the instance is; `None` for the app.
    pub service: Option<String>,
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
    /// [`Replicas::stop_quiet`] is given this token.
    Since(u64),
}

/// Credentials for the registry (`DOCKER_AUTH*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryAuth {
    pub username: String,
    pub email: Option<String>,
    pub password: Secret,
}

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

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;

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

/// Labels Pipes sets itself, which `PIPES_LABELS` may not override.
pub const RESERVED_LABELS: [&str; 5] = [LABEL_MANAGED, LABEL_INSTANCE, LABEL_DEPLOYMENT, LABEL_CONFIG_HASH, LABEL_PORT];

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
    pub running: bool,
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
}

/// What Pipes needs to know of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub id: String,
    /// The registry digest (`name@sha256:…`), if it came from a registry.
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

    /// The instance of `d`, if one exists.
    async fn instance(&self, d: &Deployment) -> Result<Option<Instance>, PipesError>;

    /// The image `reference` as the backend has it locally, if it does.
    async fn image(&self, reference: &str) -> Result<Option<Image>, PipesError>;

    /// Pulls `reference` with the configured credentials, then its facts.
    async fn pull(&self, reference: &str) -> Result<Image, PipesError>;

    /// Creates an instance from `spec` and starts it. If the deployment's
    /// instance exists already (another Pipes won the race), that one is
    /// started and returned instead: there is never a second.
    async fn run(&self, spec: &Spec) -> Result<Instance, PipesError>;

    /// Starts a stopped instance and returns it as it then is.
    async fn start(&self, id: &str) -> Result<Instance, PipesError>;

    /// Stops an instance, giving it `grace` before it is killed; a stopped or
    /// vanished one is left as it is.
    async fn stop(&self, id: &str, grace: Duration) -> Result<(), PipesError>;

    /// Restarts an instance, giving it `grace` to stop.
    async fn restart(&self, id: &str, grace: Duration) -> Result<(), PipesError>;

    /// Removes an instance, running or not; a vanished one is no error.
    async fn remove(&self, id: &str) -> Result<(), PipesError>;

    /// Resolves when the instance is not running, with its exit code.
    async fn exited(&self, id: &str) -> Result<i64, PipesError>;

    /// The last `lines` lines the instance wrote (empty when unavailable).
    async fn logs(&self, id: &str, lines: usize) -> Vec<String>;
}

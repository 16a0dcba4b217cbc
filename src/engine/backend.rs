//! The seam itself: [`Backend`], what every backend implements, and the
//! capabilities a backend may add ([`Pausing`], [`Replicas`], [`Claims`]).
//!
//! A new backend (Podman, Kubernetes) implements the fifteen methods of
//! [`Backend`] — facts, the lifecycle of an instance, its exit, logs and
//! events, a deployment's services, network and volumes, and where its
//! [`Images`] come from — and passes the contract tests in `tests/it/contract.rs`. Whatever it
//! cannot do it simply does not offer: the fleet asks for each capability and
//! does without it (an idle deployment is stopped instead of paused; no
//! activity is shared; no claim guards the instance name).

use std::time::Duration;

use async_trait::async_trait;
use futures_util::stream::BoxStream;

use super::{Event, Image, Instance, Progress, Quiet, Spec};
use crate::error::PipesError;
use crate::route::Deployment;

/// Where deployments run. Implementations keep their own connection and
/// conventions (names, labels, networks); the fleet holds one as a trait object.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// What this backend is, where it is and how it reaches deployments, for
    /// the start-up log; an error when it cannot be reached.
    async fn describe(&self) -> Result<String, PipesError>;

    /// Every instance of this Pipes (`PIPES_INSTANCE`), running or not,
    /// services among them.
    async fn list(&self) -> Result<Vec<Instance>, PipesError>;

    /// Every instance (generation) of `d`'s app, running or not; never a
    /// service.
    async fn instances(&self, d: &Deployment) -> Result<Vec<Instance>, PipesError>;

    /// The services beside `d`'s app ([`Instance::service`]), running or not.
    async fn services(&self, d: &Deployment) -> Result<Vec<Instance>, PipesError>;

    /// The backend's names of `d`'s volumes.
    async fn volumes(&self, d: &Deployment) -> Result<Vec<String>, PipesError>;

    /// Removes what `d`'s instances shared: its own network, and its volumes
    /// unless `keep_volumes`. Called once its instances are removed; what is
    /// already gone is no error.
    async fn remove_shared(&self, d: &Deployment, keep_volumes: bool) -> Result<(), PipesError>;

    /// Where its images come from and are kept.
    fn images(&self) -> &dyn Images;

    /// Creates an instance from `spec` (one per deployment and digest, or
    /// per deployment and service), not started; its deployment's network
    /// and volumes are made first when it needs them. If that instance exists already (another Pipes won the
    /// race, or a rollback target), it is returned as it is (maybe running)
    /// when it was made from the same spec, and replaced when not: there is
    /// never a second.
    async fn create(&self, spec: &Spec) -> Result<Instance, PipesError>;

    /// Starts a stopped instance (a running one is left as it is) and
    /// returns it as it then is.
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

    /// What happens to this Pipes' instances as it happens: from the
    /// stream's first poll on, or from `since_nano` (nanoseconds since the
    /// epoch) when given. The stream ends when the connection does; the
    /// caller reconnects, asking from the last event it saw.
    fn events(&self, since_nano: Option<i64>) -> BoxStream<'static, Result<Event, PipesError>>;

    /// Freezing instances, if this backend can.
    fn pausing(&self) -> Option<&dyn Pausing> {
        None
    }

    /// Activity shared with the other Pipes serving the same instances, if
    /// there can be others (Swarm replicas).
    fn replicas(&self) -> Option<&dyn Replicas> {
        None
    }

    /// A claim on the instance name, if this backend keeps one.
    fn claims(&self) -> Option<&dyn Claims> {
        None
    }
}

/// Images: what is here, what the registry has, and pulls. Both engine
/// backends share one implementation (`engine/moby`).
#[async_trait]
pub trait Images: Send + Sync {
    /// The image `reference` as the backend has it locally, if it does.
    async fn image(&self, reference: &str) -> Result<Option<Image>, PipesError>;

    /// Pulls `reference` with the configured credentials, then its facts.
    async fn pull(&self, reference: &str, progress: &Progress<'_>) -> Result<Image, PipesError>;

    /// The digest (`sha256:…`) the registry holds for `reference` now, asked
    /// with the configured credentials, without pulling.
    async fn registry_digest(&self, reference: &str) -> Result<String, PipesError>;
    /// Removes the image `reference` (a tag, or `name@digest`) unless a
    /// container uses it, anyone's; whether it was removed.
    async fn remove_unused(&self, reference: &str) -> Result<bool, PipesError>;
    /// The ids of the images containers use, anyone's containers, running or not.
    async fn in_use(&self) -> Result<std::collections::HashSet<String>, PipesError>;
    /// The directory the engine keeps images in, where this process can see
    /// it (a local engine, Pipes beside it); `None` where it cannot.
    async fn store_dir(&self) -> Result<Option<std::path::PathBuf>, PipesError> {
        Ok(None)
    }
}

/// A backend that freezes instances: they keep their memory and answer
/// nothing until thawed, in milliseconds.
#[async_trait]
pub trait Pausing: Send + Sync {
    /// Freezes a running instance.
    async fn pause(&self, id: &str) -> Result<(), PipesError>;

    /// Thaws a paused instance and returns it, running.
    async fn unpause(&self, id: &str) -> Result<Instance, PipesError>;
}

/// A backend whose instances other Pipes serve too: each reports its
/// activity, and an idle stop asks the others first.
#[async_trait]
pub trait Replicas: Send + Sync {
    /// Records, for the other Pipes serving `id`, that this one had
    /// something open on it at `at_ms` (Unix ms).
    async fn share_activity(&self, id: &str, at_ms: u64) -> Result<(), PipesError>;

    /// Whether any other Pipes serving `id` had something open on it within
    /// `idle`.
    async fn quiet_elsewhere(&self, id: &str, idle: Duration) -> Result<Quiet, PipesError>;

    /// Stops `id` as [`Backend::stop`] does, unless another Pipes recorded
    /// activity on it since [`Replicas::quiet_elsewhere`] gave `since`;
    /// whether it stopped it.
    async fn stop_quiet(&self, id: &str, grace: Duration, since: u64) -> Result<bool, PipesError>;
}

/// A backend that guards the instance name (`PIPES_INSTANCE`): two live
/// Pipes of one name would adopt, stop and replace each other's instances.
#[async_trait]
pub trait Claims: Send + Sync {
    /// Claims the name for as long as the process lives, renewing the claim
    /// when called again. Returns who holds it when another live Pipes
    /// does, unless `beside`: an upgrade's hand-over runs beside the Pipes
    /// it replaces.
    async fn claim(&self, beside: bool) -> Result<Option<String>, PipesError>;

    /// Lets this process' claim go.
    async fn release(&self);
}

//! What both backends on Docker's engine API share (Moby's, whether the
//! engine runs containers or a swarm): the connection, made on first use and
//! kept; engine errors turned into [`PipesError`]s with the registry password
//! scrubbed; the labels every instance carries; images and pulls
//! (`images.rs`); events (`events.rs`); logs (`logs.rs`); a deployment's
//! network and volumes (`shared.rs`).
//!
//! [`Docker`](super::docker::Docker) and [`Swarm`](super::swarm::Swarm) each
//! hold a [`Moby`]; neither borrows from the other.

pub(super) mod events;
mod images;
pub(super) mod logs;
mod shared;

pub use shared::NetworkKind;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bollard::auth::DockerCredentials;
use bollard::errors::Error as DockerError;
use bollard::models::HealthConfig;
use sha2::{Digest as _, Sha256};
use tokio::sync::{OnceCell, Semaphore};

use super::{
    RegistryAuth, Spec, LABEL_CONFIG, LABEL_CONFIG_HASH, LABEL_DEPLOYMENT, LABEL_DIGEST, LABEL_IDENTITY, LABEL_INSTANCE, LABEL_MANAGED, LABEL_PORT,
    LABEL_SERVICE,
};
use crate::error::PipesError;
use crate::secret::Secret;

/// What a backend on Docker's engine is configured with (from the settings).
#[derive(Debug, Clone)]
pub struct DockerOptions {
    /// `DOCKER_HOST`: `unix://…` or `tcp://…`.
    pub host: String,
    /// `PIPES_INSTANCE`, carried by every instance as a label and in its name.
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

/// One engine, as both backends speak to it. Cheap to clone: clones share
/// the connection and the pull limit.
#[derive(Clone)]
pub struct Moby {
    host: String,
    client: Arc<OnceCell<bollard::Docker>>,
    instance: String,
    extra_labels: Vec<(String, String)>,
    credentials: Option<DockerCredentials>,
    registry_host: String,
    /// Scrubbed from every message that leaves the engine modules.
    password: Option<Secret>,
    /// Caps pulls under way at once (`PIPES_MAX_PULLS`).
    pulls: Arc<Semaphore>,
    /// Held while a deployment's network is looked for and made.
    making_shared: Arc<tokio::sync::Mutex<()>>,
}

impl Moby {
    /// The engine at `options.host`, not yet connected.
    pub fn new(options: &DockerOptions) -> Moby {
        let credentials = options.auth.as_ref().map(|a| DockerCredentials {
            username: Some(a.username.clone()),
            password: Some(a.password.expose().to_owned()),
            email: a.email.clone(),
            serveraddress: Some(options.registry_host.clone()),
            ..Default::default()
        });
        Moby {
            host: options.host.clone(),
            client: Arc::new(OnceCell::new()),
            instance: options.instance.clone(),
            extra_labels: options.labels.clone(),
            credentials,
            registry_host: options.registry_host.clone(),
            password: options.auth.as_ref().map(|a| a.password.clone()),
            pulls: Arc::new(Semaphore::new(options.max_pulls)),
            making_shared: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// The client, connected and speaking an API version the engine knows.
    pub async fn client(&self) -> Result<&bollard::Docker, PipesError> {
        self.client
            .get_or_try_init(|| async {
                let docker = bollard::Docker::connect_with_host(&self.host)
                    .map_err(|e| PipesError::EngineUnavailable { reason: format!("cannot use {}: {e}", self.host) })?;
                // Older engines (API 1.41) reject newer version prefixes outright.
                docker.negotiate_version().await.map_err(|e| PipesError::EngineUnavailable { reason: format!("no answer from {}: {e}", self.host) })
            })
            .await
    }

    /// The engine's address, for messages.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The Pipes instance name (`PIPES_INSTANCE`).
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The registry credentials, as the engine takes them.
    pub fn credentials(&self) -> Option<DockerCredentials> {
        self.credentials.clone()
    }

    /// The labels of everything this instance makes besides its instances
    /// (networks, configs): `PIPES_LABELS`, managed, instance.
    pub fn own_labels(&self) -> HashMap<String, String> {
        let mut labels: HashMap<String, String> = self.extra_labels.iter().cloned().collect();
        labels.insert(LABEL_MANAGED.into(), "true".into());
        labels.insert(LABEL_INSTANCE.into(), self.instance.clone());
        labels
    }

    /// The labels a new instance of `spec` carries.
    pub fn labels(&self, spec: &Spec) -> HashMap<String, String> {
        let mut labels = self.own_labels();
        labels.insert(LABEL_DEPLOYMENT.into(), spec.deployment.to_string());
        labels.insert(LABEL_CONFIG_HASH.into(), spec.hash.clone());
        labels.insert(LABEL_PORT.into(), spec.port.to_string());
        labels.insert(LABEL_CONFIG.into(), spec.config.clone());
        labels.insert(LABEL_IDENTITY.into(), spec.identity.clone());
        if let Some(digest) = &spec.digest {
            labels.insert(LABEL_DIGEST.into(), digest.clone());
        }
        if let Some(service) = &spec.service {
            labels.insert(LABEL_SERVICE.into(), service.clone());
        }
        labels
    }

    /// The label filter that finds what this instance made.
    pub fn instance_filter(&self) -> Vec<String> {
        vec![format!("{LABEL_MANAGED}=true"), format!("{LABEL_INSTANCE}={}", self.instance)]
    }

    /// Turns an engine error into what a client sees.
    pub fn fail(&self, action: &'static str, e: DockerError) -> PipesError {
        match e {
            DockerError::DockerResponseServerError { message, .. } => PipesError::Engine { action, detail: self.scrub(&message) },
            DockerError::DockerStreamError { error } => PipesError::Engine { action, detail: self.scrub(&error) },
            DockerError::JsonDataError { .. } | DockerError::JsonSerdeError { .. } => PipesError::Engine { action, detail: self.scrub(&e.to_string()) },
            other => PipesError::EngineUnavailable { reason: format!("cannot {action}: {}", self.scrub(&other.to_string())) },
        }
    }

    /// `text` without the registry password.
    pub fn scrub(&self, text: &str) -> String {
        match &self.password {
            Some(p) => p.scrub(text),
            None => text.to_owned(),
        }
    }
}

/// Whether the engine answered "no such object".
pub fn not_found(e: &DockerError) -> bool {
    matches!(e, DockerError::DockerResponseServerError { status_code: 404, .. })
}

/// The engine takes whole seconds.
pub fn grace_secs(grace: Duration) -> i32 {
    i32::try_from(grace.as_secs()).unwrap_or(i32::MAX)
}

/// The engine's health check running `cmd`: every 250 ms while the
/// instance starts (Pipes waits on it), every second after.
pub fn health_config(cmd: &[String]) -> HealthConfig {
    const MS: i64 = 1_000_000;
    HealthConfig {
        test: Some(std::iter::once("CMD".to_owned()).chain(cmd.iter().cloned()).collect()),
        // Engines before API 1.44 know no start interval: the interval is short.
        interval: Some(1_000 * MS),
        timeout: Some(5_000 * MS),
        retries: Some(3),
        start_period: Some(600_000 * MS),
        start_interval: Some(250 * MS),
    }
}

/// `wanted` when it is a DNS label, else its cleaned start and a hash.
pub fn dns_name(wanted: &str) -> String {
    let clean: String = wanted.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c.to_ascii_lowercase() } else { '-' }).collect();
    if clean == wanted && clean.len() <= 63 {
        return clean;
    }
    let hash = hex::encode(&Sha256::digest(wanted.as_bytes())[..5]);
    let start = clean.get(..52).unwrap_or(&clean).trim_end_matches('-');
    format!("{start}-{hash}")
}

//! The Docker engine, as Pipes uses it: find, pull, create, start, watch.
//!
//! Every engine failure is turned into a [`PipesError`] here, with the action
//! that failed, so callers never see a raw engine error. Registry passwords are
//! scrubbed from every message that leaves this module.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use bollard::auth::DockerCredentials;
use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, EndpointSettings, HostConfig, NetworkingConfig, PortBinding,
    RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, ListContainersOptions, LogsOptions, RemoveContainerOptions,
    RestartContainerOptions, StopContainerOptions, WaitContainerOptions,
};
use bollard::Docker;
use futures_util::StreamExt;
use tokio::sync::{OnceCell, Semaphore};

use crate::config::Restart;
use crate::error::PipesError;
use crate::route::Deployment;
use crate::settings::{Reach, Settings};

/// Label set to `true` on every container Pipes creates.
pub const LABEL_MANAGED: &str = "pipes.managed";
/// Label naming the Pipes instance that owns a container.
pub const LABEL_INSTANCE: &str = "pipes.instance";
/// Label holding the deployment key `user/repo:tag`.
pub const LABEL_DEPLOYMENT: &str = "pipes.deployment";
/// Label holding the hash of what the container was created from.
pub const LABEL_CONFIG_HASH: &str = "pipes.config-hash";
/// Label holding the container port Pipes proxies to.
pub const LABEL_PORT: &str = "pipes.port";

/// Labels Pipes sets on its containers, which `PIPES_LABELS` may not override.
pub const RESERVED_LABELS: [&str; 5] = [LABEL_MANAGED, LABEL_INSTANCE, LABEL_DEPLOYMENT, LABEL_CONFIG_HASH, LABEL_PORT];

/// What Pipes knows of one of its containers after inspecting it.
#[derive(Debug, Clone)]
pub struct Container {
    pub id: String,
    pub running: bool,
    pub exit_code: i64,
    pub config_hash: Option<String>,
    /// The container port Pipes proxies to.
    pub port: Option<u16>,
    pub started_at: Option<String>,
    /// Where the container answers, if it runs and can be reached.
    pub address: Option<SocketAddr>,
}

/// What Pipes needs to know of an image.
#[derive(Debug, Clone)]
pub struct Image {
    pub id: String,
    pub digest: Option<String>,
    /// Exposed TCP ports, sorted.
    pub exposed_tcp: Vec<u16>,
}

/// Everything a container is created from.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    pub port: u16,
    pub labels: HashMap<String, String>,
    pub env: Vec<String>,
    pub cmd: Option<Vec<String>>,
    pub memory_bytes: u64,
    pub cpus: f64,
    pub restart: Restart,
}

/// A connection to the Docker engine, with Pipes' conventions.
///
/// The connection is made on first use and kept, so Pipes starts (and answers
/// 503) while the engine is down, and picks it up once it answers.
#[derive(Clone)]
pub struct Engine {
    host: String,
    client: Arc<OnceCell<Docker>>,
    reach: Reach,
    instance: String,
    extra_labels: Vec<(String, String)>,
    credentials: Option<DockerCredentials>,
    /// Secret to scrub from messages.
    password: Option<String>,
    registry: String,
    /// Caps pulls under way at once (`PIPES_MAX_PULLS`).
    pulls: Arc<Semaphore>,
}

impl Engine {
    /// An engine at `DOCKER_HOST`, not yet connected, reaching containers as `reach` says.
    pub fn new(settings: &Settings, reach: Reach) -> Engine {
        let credentials = settings.registry_auth.as_ref().map(|a| DockerCredentials {
            username: Some(a.username.clone()),
            password: Some(a.password.expose().to_owned()),
            email: a.email.clone(),
            serveraddress: Some(settings.registry_host().to_owned()),
            ..Default::default()
        });
        Engine {
            host: settings.docker_host.clone(),
            client: Arc::new(OnceCell::new()),
            reach,
            instance: settings.instance.clone(),
            extra_labels: settings.labels.clone(),
            credentials,
            password: settings.registry_auth.as_ref().map(|a| a.password.expose().to_owned()),
            registry: settings.registry_host().to_owned(),
            pulls: Arc::new(Semaphore::new(settings.max_pulls)),
        }
    }

    /// The client, connected and speaking an API version the engine knows.
    async fn docker(&self) -> Result<&Docker, PipesError> {
        self.client
            .get_or_try_init(|| async {
                let docker = Docker::connect_with_host(&self.host).map_err(|e| PipesError::EngineUnavailable {
                    reason: format!("cannot use {}: {e}", self.host),
                })?;
                // Older engines (API 1.41) reject newer version prefixes outright.
                docker.negotiate_version().await.map_err(|e| PipesError::EngineUnavailable {
                    reason: format!("no answer from {}: {e}", self.host),
                })
            })
            .await
    }

    /// The engine's version string, for the start-up log.
    pub async fn version(&self) -> Result<String, PipesError> {
        let v = self.docker().await?.version().await.map_err(|e| self.fail("read its version", e))?;
        Ok(format!("{} (API {})", v.version.unwrap_or_default(), v.api_version.unwrap_or_default()))
    }

    /// The networks of container `name`, or `None` if the engine has no such container.
    pub async fn networks_of(&self, name: &str) -> Result<Option<Vec<String>>, PipesError> {
        match self.docker().await?.inspect_container(name, None).await {
            Ok(c) => Ok(Some(
                c.network_settings.and_then(|n| n.networks).map(|n| n.into_keys().collect()).unwrap_or_default(),
            )),
            Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => Ok(None),
            Err(e) => Err(self.fail("inspect a container", e)),
        }
    }

    /// How containers are reached from here.
    pub fn reach(&self) -> &Reach {
        &self.reach
    }

    /// The deterministic container name of a deployment. Creating by name makes
    /// a second container for one deployment impossible, even across restarts.
    pub fn container_name(&self, d: &Deployment) -> String {
        format!("{}.{}.{}.{}", self.instance, d.user, d.repo, d.tag)
    }

    /// The labels a new container of `d` carries.
    pub fn labels(&self, d: &Deployment, config_hash: &str, port: u16) -> HashMap<String, String> {
        let mut labels: HashMap<String, String> = self.extra_labels.iter().cloned().collect();
        labels.insert(LABEL_MANAGED.into(), "true".into());
        labels.insert(LABEL_INSTANCE.into(), self.instance.clone());
        labels.insert(LABEL_DEPLOYMENT.into(), d.to_string());
        labels.insert(LABEL_CONFIG_HASH.into(), config_hash.into());
        labels.insert(LABEL_PORT.into(), port.to_string());
        labels
    }

    /// Containers of this instance (running ones only unless `all`): deployments and ids.
    pub async fn managed(&self, all: bool) -> Result<Vec<(Deployment, String)>, PipesError> {
        let filters = HashMap::from([(
            "label".to_string(),
            vec![format!("{LABEL_MANAGED}=true"), format!("{LABEL_INSTANCE}={}", self.instance)],
        )]);
        let options = ListContainersOptions { all, filters: Some(filters), ..Default::default() };
        let list = self.docker().await?.list_containers(Some(options)).await.map_err(|e| self.fail("list containers", e))?;
        Ok(list
            .into_iter()
            .filter_map(|c| {
                let d = Deployment::parse(c.labels.as_ref()?.get(LABEL_DEPLOYMENT)?)?;
                Some((d, c.id?))
            })
            .collect())
    }

    /// Inspects a container by name or id; `None` when it does not exist.
    pub async fn inspect(&self, name: &str) -> Result<Option<Container>, PipesError> {
        match self.docker().await?.inspect_container(name, None).await {
            Ok(c) => Ok(Some(self.container_facts(c))),
            Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => Ok(None),
            Err(e) => Err(self.fail("inspect a container", e)),
        }
    }

    fn container_facts(&self, c: ContainerInspectResponse) -> Container {
        let state = c.state.unwrap_or_default();
        let labels = c.config.as_ref().and_then(|cfg| cfg.labels.clone()).unwrap_or_default();
        let running = state.running.unwrap_or(false);
        let port: Option<u16> = labels.get(LABEL_PORT).and_then(|p| p.parse().ok());
        let net = c.network_settings.unwrap_or_default();
        let address = match (&self.reach, port, running) {
            (_, None, _) | (_, _, false) => None,
            (Reach::Published, Some(port), true) => net
                .ports
                .as_ref()
                .and_then(|ports| ports.get(&format!("{port}/tcp")))
                .and_then(|b| b.as_ref())
                .and_then(|bindings| bindings.iter().find_map(|b| b.host_port.as_deref()?.parse::<u16>().ok()))
                .map(|host_port| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), host_port)),
            (Reach::Network(name), Some(port), true) => net
                .networks
                .as_ref()
                .and_then(|n| n.get(name))
                .and_then(|ep| ep.ip_address.as_deref())
                .and_then(|ip| ip.parse::<IpAddr>().ok())
                .map(|ip| SocketAddr::new(ip, port)),
        };
        Container {
            id: c.id.unwrap_or_default(),
            running,
            exit_code: state.exit_code.unwrap_or(0),
            config_hash: labels.get(LABEL_CONFIG_HASH).cloned(),
            port,
            started_at: state.started_at,
            address,
        }
    }

    /// Inspects a local image; `None` when the engine does not have it.
    pub async fn image(&self, reference: &str) -> Result<Option<Image>, PipesError> {
        match self.docker().await?.inspect_image(reference).await {
            Ok(img) => {
                let mut exposed_tcp: Vec<u16> = img
                    .config
                    .and_then(|c| c.exposed_ports)
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|p| p.strip_suffix("/tcp")?.parse().ok())
                    .collect();
                exposed_tcp.sort_unstable();
                exposed_tcp.dedup();
                Ok(Some(Image {
                    id: img.id.unwrap_or_default(),
                    digest: img.repo_digests.and_then(|d| d.into_iter().next()),
                    exposed_tcp,
                }))
            }
            Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => Ok(None),
            Err(e) => Err(self.fail("inspect an image", e)),
        }
    }

    /// Pulls an image, with the configured registry credentials, waiting for a
    /// free place when `PIPES_MAX_PULLS` pulls are under way.
    pub async fn pull(&self, reference: &str) -> Result<(), PipesError> {
        let _place = self.pulls.acquire().await.map_err(|_| PipesError::EngineUnavailable {
            reason: "Pipes is shutting down".into(),
        })?;
        let (repo, tag) = split_reference(reference);
        let options = CreateImageOptions {
            from_image: Some(repo.to_owned()),
            tag: Some(tag.to_owned()),
            ..Default::default()
        };
        let mut progress = self.docker().await?.create_image(Some(options), None, self.credentials.clone());
        while let Some(item) = progress.next().await {
            if let Err(e) = item {
                return Err(self.pull_failure(reference, e));
            }
        }
        Ok(())
    }

    fn pull_failure(&self, reference: &str, e: DockerError) -> PipesError {
        let message = match &e {
            DockerError::DockerResponseServerError { message, .. } => message.clone(),
            DockerError::DockerStreamError { error } => error.clone(),
            _ => return self.fail("pull an image", e),
        };
        let lower = message.to_ascii_lowercase();
        let detail = self.scrub(&message);
        if ["unauthorized", "authentication required", "no basic auth credentials", "incorrect username or password"]
            .iter()
            .any(|m| lower.contains(m))
        {
            PipesError::RegistryAuth {
                registry: self.registry.clone(),
                user: self.credentials.as_ref().and_then(|c| c.username.clone()),
                detail,
            }
        } else if ["manifest unknown", "not found", "name unknown", "does not exist", "pull access denied"]
            .iter()
            .any(|m| lower.contains(m))
        {
            PipesError::ImageNotFound { image: reference.to_owned() }
        } else {
            PipesError::Engine { action: "pull an image", detail }
        }
    }

    /// Creates a container; `Ok(None)` when one of that name exists already.
    pub async fn create(&self, spec: &ContainerSpec) -> Result<Option<String>, PipesError> {
        let port_key = format!("{}/tcp", spec.port);
        let mut host_config = HostConfig::default();
        let mut networking = None;
        match &self.reach {
            Reach::Published => {
                let binding = PortBinding { host_ip: Some("127.0.0.1".into()), host_port: Some(String::new()) };
                host_config.port_bindings = Some(HashMap::from([(port_key.clone(), Some(vec![binding]))]));
            }
            Reach::Network(name) => {
                host_config.network_mode = Some(name.clone());
                networking = Some(NetworkingConfig {
                    endpoints_config: Some(HashMap::from([(name.clone(), EndpointSettings::default())])),
                });
            }
        }
        host_config.memory = i64::try_from(spec.memory_bytes).ok();
        host_config.nano_cpus = Some((spec.cpus * 1e9).round() as i64);
        host_config.restart_policy = Some(RestartPolicy {
            name: Some(match spec.restart {
                Restart::No => RestartPolicyNameEnum::NO,
                Restart::OnFailure => RestartPolicyNameEnum::ON_FAILURE,
                Restart::Always => RestartPolicyNameEnum::ALWAYS,
                Restart::UnlessStopped => RestartPolicyNameEnum::UNLESS_STOPPED,
            }),
            maximum_retry_count: None,
        });
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            labels: Some(spec.labels.clone()),
            env: Some(spec.env.clone()),
            cmd: spec.cmd.clone(),
            exposed_ports: Some(vec![port_key]),
            host_config: Some(host_config),
            networking_config: networking,
            ..Default::default()
        };
        let options = CreateContainerOptions { name: Some(spec.name.clone()), ..Default::default() };
        match self.docker().await?.create_container(Some(options), body).await {
            Ok(created) => Ok(Some(created.id)),
            Err(DockerError::DockerResponseServerError { status_code: 409, .. }) => Ok(None),
            Err(e) => Err(self.fail("create a container", e)),
        }
    }

    /// Starts a container (a running one is left as it is).
    pub async fn start(&self, id: &str) -> Result<(), PipesError> {
        match self.docker().await?.start_container(id, None).await {
            Ok(()) | Err(DockerError::DockerResponseServerError { status_code: 304, .. }) => Ok(()),
            Err(e) => Err(self.fail("start a container", e)),
        }
    }

    /// Restarts a container, giving it `grace_secs` to stop.
    pub async fn restart(&self, id: &str, grace_secs: i32) -> Result<(), PipesError> {
        let options = RestartContainerOptions { t: Some(grace_secs), ..Default::default() };
        self.docker().await?.restart_container(id, Some(options)).await.map_err(|e| self.fail("restart a container", e))
    }

    /// Stops a container, giving it `grace_secs` before it is killed.
    pub async fn stop(&self, id: &str, grace_secs: i32) -> Result<(), PipesError> {
        let options = StopContainerOptions { t: Some(grace_secs), ..Default::default() };
        match self.docker().await?.stop_container(id, Some(options)).await {
            Ok(()) | Err(DockerError::DockerResponseServerError { status_code: 304 | 404, .. }) => Ok(()),
            Err(e) => Err(self.fail("stop a container", e)),
        }
    }

    /// Removes a container, running or not.
    pub async fn remove(&self, id: &str) -> Result<(), PipesError> {
        let options = RemoveContainerOptions { force: true, ..Default::default() };
        match self.docker().await?.remove_container(id, Some(options)).await {
            Ok(()) | Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => Ok(()),
            Err(e) => Err(self.fail("remove a container", e)),
        }
    }

    /// Resolves when the container is not running, with its exit code.
    pub async fn exited(&self, id: &str) -> Result<i64, PipesError> {
        let options = WaitContainerOptions { condition: "not-running".into() };
        match self.docker().await?.wait_container(id, Some(options)).next().await {
            Some(Ok(r)) => Ok(r.status_code),
            Some(Err(DockerError::DockerContainerWaitError { code, .. })) => Ok(code),
            Some(Err(e)) => Err(self.fail("watch a container", e)),
            None => Err(PipesError::Engine { action: "watch a container", detail: "no answer".into() }),
        }
    }

    /// The last `lines` lines the container wrote to stdout and stderr.
    pub async fn log_tail(&self, id: &str, lines: usize) -> Vec<String> {
        let options = LogsOptions { stdout: true, stderr: true, tail: lines.to_string(), ..Default::default() };
        let mut out = Vec::new();
        let Ok(docker) = self.docker().await else {
            return out;
        };
        let mut stream = docker.logs(id, Some(options));
        while let Some(Ok(chunk)) = stream.next().await {
            let text = String::from_utf8_lossy(&chunk.into_bytes()).into_owned();
            out.extend(text.lines().map(|l| self.scrub(l)));
        }
        let keep = out.len().saturating_sub(lines);
        out.drain(..keep);
        out
    }

    /// Turns an engine error into what a client sees.
    fn fail(&self, action: &'static str, e: DockerError) -> PipesError {
        match e {
            DockerError::DockerResponseServerError { message, .. } => {
                PipesError::Engine { action, detail: self.scrub(&message) }
            }
            DockerError::DockerStreamError { error } => PipesError::Engine { action, detail: self.scrub(&error) },
            DockerError::JsonDataError { .. } | DockerError::JsonSerdeError { .. } => {
                PipesError::Engine { action, detail: self.scrub(&e.to_string()) }
            }
            other => PipesError::EngineUnavailable { reason: format!("cannot {action}: {}", self.scrub(&other.to_string())) },
        }
    }

    fn scrub(&self, text: &str) -> String {
        match &self.password {
            Some(p) if !p.is_empty() => text.replace(p.as_str(), "***"),
            _ => text.to_owned(),
        }
    }
}

/// Splits `registry/user/repo:tag` into `registry/user/repo` and `tag`.
fn split_reference(reference: &str) -> (&str, &str) {
    let last_slash = reference.rfind('/').map_or(0, |i| i + 1);
    match reference[last_slash..].rfind(':') {
        Some(colon) => (&reference[..last_slash + colon], &reference[last_slash + colon + 1..]),
        None => (reference, crate::route::DEFAULT_TAG),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_split_at_the_tag_not_the_port() {
        assert_eq!(split_reference("127.0.0.1:5000/a/b:v1"), ("127.0.0.1:5000/a/b", "v1"));
        assert_eq!(split_reference("a/b:1.2.3"), ("a/b", "1.2.3"));
        assert_eq!(split_reference("127.0.0.1:5000/a/b"), ("127.0.0.1:5000/a/b", "latest"));
    }
}

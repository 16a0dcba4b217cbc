//! What a deployment's containers share, on either backend: its own
//! network, on which the app and its services reach each other by service
//! name and no other deployment reaches them, and its volumes, which outlive
//! every container and go only with the deployment.

use std::collections::HashMap;
use std::time::Duration;

use bollard::errors::Error as DockerError;
use bollard::models::{NetworkConnectRequest, NetworkCreateRequest, NetworkDisconnectRequest, VolumeCreateRequest};
use bollard::query_parameters::{ListVolumesOptions, RemoveVolumeOptions};

use super::{dns_name, Moby};
use crate::engine::{Spec, LABEL_DEPLOYMENT, LABEL_VOLUME};
use crate::error::PipesError;
use crate::route::Deployment;

/// How long a network or volume still in use (its containers on their way
/// out) is asked again to go.
const IN_USE_WAIT: Duration = Duration::from_secs(20);

/// The kind of network a deployment gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkKind {
    /// A bridge of this engine (the Docker backend).
    Bridge,
    /// An attachable overlay across the swarm (the Swarm backend).
    Overlay,
}

impl Moby {
    /// The name of `d`'s own network: a DNS label, as a swarm's names are.
    pub fn deployment_network(&self, d: &Deployment) -> String {
        dns_name(&format!("pipes-{}-{}-{}-{}", self.instance, d.user, d.repo, d.tag))
    }

    /// The engine's name of `d`'s volume `name`: instance, deployment, volume.
    pub fn volume_name(&self, d: &Deployment, name: &str) -> String {
        format!("{}.{}.{}.{}.{}", self.instance, d.user, d.repo, d.tag, name)
    }

    /// The labels of what `d`'s containers share.
    fn shared_labels(&self, d: &Deployment) -> HashMap<String, String> {
        let mut labels = self.own_labels();
        labels.insert(LABEL_DEPLOYMENT.into(), d.to_string());
        labels
    }

    /// Makes what `spec` needs of its deployment: the network of `kind`
    /// (when it joins it), which `me` (Pipes' own container, if it runs in
    /// one) joins too, to check services there, and its volumes. Both are idempotent, so concurrent
    /// starts and other Pipes of this instance may race; in this process
    /// they are made one at a time, since engines before API 1.44 make a
    /// second network of a name when asked.
    pub async fn ensure_shared(&self, spec: &Spec, kind: NetworkKind, me: Option<&str>) -> Result<(), PipesError> {
        let docker = self.client().await?;
        let d = &spec.deployment;
        if spec.network {
            let _one_at_a_time = self.making_shared.lock().await;
            let name = self.deployment_network(d);
            match docker.inspect_network(&name, None).await {
                Ok(_) => {}
                Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => {
                    let (driver, attachable) = match kind {
                        NetworkKind::Bridge => ("bridge", None),
                        NetworkKind::Overlay => ("overlay", Some(true)),
                    };
                    // Containers on it talk to each other (the app to its database).
                    let request = NetworkCreateRequest {
                        name: name.clone(),
                        driver: Some(driver.into()),
                        attachable,
                        labels: Some(self.shared_labels(d)),
                        ..Default::default()
                    };
                    match docker.create_network(request).await {
                        Ok(_) => log::info!("{d}: created network {name} for the deployment and its services"),
                        Err(DockerError::DockerResponseServerError { status_code: 409, .. }) => {}
                        Err(e) => return Err(self.fail("create a network", e)),
                    }
                }
                Err(e) => return Err(self.fail("inspect a network", e)),
            }
            // Without it a service's TCP check cannot pass: said, not fatal.
            if let Some(Err(e)) = match me {
                Some(me) => Some(self.join(&name, me, "join Pipes to a deployment's network").await),
                None => None,
            } {
                log::warn!("{d}: Pipes cannot join network {name} to check its services there: {e}");
            }
        }
        for name in spec.volumes.keys() {
            let mut labels = self.shared_labels(d);
            labels.insert(LABEL_VOLUME.into(), name.clone());
            let request = VolumeCreateRequest { name: Some(self.volume_name(d, name)), labels: Some(labels), ..Default::default() };
            // Creating a volume that exists returns it as it is.
            docker.create_volume(request).await.map_err(|e| self.fail("create a volume", e))?;
        }
        Ok(())
    }

    /// Connects `container` to `network`; joined already is no error.
    pub async fn join(&self, network: &str, container: &str, action: &'static str) -> Result<(), PipesError> {
        let request = NetworkConnectRequest { container: container.to_owned(), endpoint_config: None };
        match self.client().await?.connect_network(network, request).await {
            Ok(()) | Err(DockerError::DockerResponseServerError { status_code: 403 | 409, .. }) => Ok(()),
            Err(e) => Err(self.fail(action, e)),
        }
    }

    /// Disconnects `container` from `network`, if it is on it.
    pub async fn leave(&self, network: &str, container: &str) {
        let request = NetworkDisconnectRequest { container: container.to_owned(), force: Some(true) };
        if let Ok(docker) = self.client().await {
            let _ = docker.disconnect_network(network, request).await;
        }
    }

    /// The engine's names of `d`'s volumes.
    pub async fn deployment_volumes(&self, d: &Deployment) -> Result<Vec<String>, PipesError> {
        let mut labels = self.instance_filter();
        labels.push(format!("{LABEL_DEPLOYMENT}={d}"));
        let options = ListVolumesOptions { filters: Some(HashMap::from([("label".to_string(), labels)])) };
        let listed = self.client().await?.list_volumes(Some(options)).await.map_err(|e| self.fail("list volumes", e))?;
        let mut names: Vec<String> = listed.volumes.unwrap_or_default().into_iter().map(|v| v.name).collect();
        names.sort();
        Ok(names)
    }

    /// Removes `d`'s network (`me` leaving it first) and, unless
    /// `keep_volumes`, its volumes; each asked again while its last
    /// containers are on their way out.
    pub async fn remove_shared(&self, d: &Deployment, keep_volumes: bool, me: Option<&str>) -> Result<(), PipesError> {
        let docker = self.client().await?;
        let network = self.deployment_network(d);
        if let Some(me) = me {
            self.leave(&network, me).await;
        }
        self.until_gone("remove a network", || docker.remove_network(&network)).await?;
        if !keep_volumes {
            for volume in self.deployment_volumes(d).await? {
                self.until_gone("remove a volume", || docker.remove_volume(&volume, None::<RemoveVolumeOptions>)).await?;
            }
        }
        Ok(())
    }

    /// Runs `remove` until it succeeds or finds nothing; a 409 (in use)
    /// is asked again for a while.
    async fn until_gone<F, Fut>(&self, action: &'static str, remove: F) -> Result<(), PipesError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<(), DockerError>>,
    {
        let deadline = tokio::time::Instant::now() + IN_USE_WAIT;
        loop {
            match remove().await {
                Ok(()) | Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => return Ok(()),
                // A swarm's network just removed is still named here for a moment.
                Err(DockerError::DockerResponseServerError { message, .. }) if message.ends_with("not found") => return Ok(()),
                Err(DockerError::DockerResponseServerError { status_code: 409 | 403, .. }) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(self.fail(action, e)),
            }
        }
    }
}

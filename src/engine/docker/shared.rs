//! What a deployment's containers share on Docker: its own network, on
//! which the app and its services reach each other by service name and no
//! other deployment reaches them, and its volumes, which outlive every
//! container and go only with the deployment.

use std::collections::HashMap;

use bollard::errors::Error as DockerError;
use bollard::models::{EndpointSettings, NetworkConnectRequest, NetworkCreateRequest, NetworkDisconnectRequest, VolumeCreateRequest};
use bollard::query_parameters::{ListVolumesOptions, RemoveVolumeOptions};

use super::{Docker, Reach};
use crate::engine::{Spec, LABEL_DEPLOYMENT, LABEL_VOLUME};
use crate::error::PipesError;
use crate::route::Deployment;

impl Docker {
    /// The name of `d`'s own network.
    pub(super) fn deployment_network(&self, d: &Deployment) -> String {
        format!("pipes-{}.{}.{}.{}", self.moby.instance(), d.user, d.repo, d.tag)
    }

    /// The engine's name of `d`'s volume `name`: instance, deployment, volume.
    pub(super) fn volume_name(&self, d: &Deployment, name: &str) -> String {
        format!("{}.{}.{}.{}.{}", self.moby.instance(), d.user, d.repo, d.tag, name)
    }

    /// The labels of what `d`'s containers share.
    fn shared_labels(&self, d: &Deployment) -> HashMap<String, String> {
        let mut labels = self.moby.own_labels();
        labels.insert(LABEL_DEPLOYMENT.into(), d.to_string());
        labels
    }

    /// Makes what `spec` needs of its deployment: the network (when it joins
    /// it) and its volumes. Both are idempotent, so concurrent starts and
    /// other Pipes of this instance may race.
    pub(super) async fn ensure_shared(&self, spec: &Spec) -> Result<(), PipesError> {
        let docker = self.docker().await?;
        let d = &spec.deployment;
        if spec.network {
            let _one_at_a_time = self.making_networks.lock().await;
            let name = self.deployment_network(d);
            match docker.inspect_network(&name, None).await {
                Ok(_) => {}
                Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => {
                    // Containers on it talk to each other (the app to its database).
                    let request =
                        NetworkCreateRequest { name: name.clone(), driver: Some("bridge".into()), labels: Some(self.shared_labels(d)), ..Default::default() };
                    match docker.create_network(request).await {
                        Ok(_) => log::info!("{d}: created network {name} for the deployment and its services"),
                        Err(DockerError::DockerResponseServerError { status_code: 409, .. }) => {}
                        Err(e) => return Err(self.moby.fail("create a network", e)),
                    }
                }
                Err(e) => return Err(self.moby.fail("inspect a network", e)),
            }
            self.join_own_container(&name).await?;
        }
        for name in spec.volumes.keys() {
            let mut labels = self.shared_labels(d);
            labels.insert(LABEL_VOLUME.into(), name.clone());
            let request = VolumeCreateRequest { name: Some(self.volume_name(d, name)), labels: Some(labels), ..Default::default() };
            // Creating a volume that exists returns it as it is.
            docker.create_volume(request).await.map_err(|e| self.moby.fail("create a volume", e))?;
        }
        Ok(())
    }

    /// When Pipes runs in a container of this engine, joins it to `network`:
    /// it probes services there. Joined already is no error.
    async fn join_own_container(&self, network: &str) -> Result<(), PipesError> {
        let (Reach::Network(_), Some(me)) = (&self.reach, &self.hostname) else { return Ok(()) };
        let request = NetworkConnectRequest { container: me.clone(), endpoint_config: None };
        match self.docker().await?.connect_network(network, request).await {
            Ok(()) | Err(DockerError::DockerResponseServerError { status_code: 403 | 409, .. }) => Ok(()),
            Err(e) => Err(self.moby.fail("join Pipes to a deployment's network", e)),
        }
    }

    /// Connects the app's container `id` to `d`'s network.
    pub(super) async fn join_deployment_network(&self, id: &str, d: &Deployment) -> Result<(), PipesError> {
        let request = NetworkConnectRequest { container: id.to_owned(), endpoint_config: Some(EndpointSettings::default()) };
        match self.docker().await?.connect_network(&self.deployment_network(d), request).await {
            Ok(()) | Err(DockerError::DockerResponseServerError { status_code: 403 | 409, .. }) => Ok(()),
            Err(e) => Err(self.moby.fail("connect a container to its deployment's network", e)),
        }
    }

    /// The engine's names of `d`'s volumes.
    pub(super) async fn deployment_volumes(&self, d: &Deployment) -> Result<Vec<String>, PipesError> {
        let mut labels = self.moby.instance_filter();
        labels.push(format!("{LABEL_DEPLOYMENT}={d}"));
        let options = ListVolumesOptions { filters: Some(HashMap::from([("label".to_string(), labels)])) };
        let listed = self.docker().await?.list_volumes(Some(options)).await.map_err(|e| self.moby.fail("list volumes", e))?;
        let mut names: Vec<String> = listed.volumes.unwrap_or_default().into_iter().map(|v| v.name).collect();
        names.sort();
        Ok(names)
    }

    /// Removes `d`'s network (leaving it first if Pipes joined it) and,
    /// unless `keep_volumes`, its volumes.
    pub(super) async fn remove_deployment_shared(&self, d: &Deployment, keep_volumes: bool) -> Result<(), PipesError> {
        let docker = self.docker().await?;
        let network = self.deployment_network(d);
        if let (Reach::Network(_), Some(me)) = (&self.reach, &self.hostname) {
            let request = NetworkDisconnectRequest { container: me.clone(), force: Some(true) };
            let _ = docker.disconnect_network(&network, request).await;
        }
        match docker.remove_network(&network).await {
            Ok(()) | Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => {}
            Err(e) => return Err(self.moby.fail("remove a network", e)),
        }
        if !keep_volumes {
            for volume in self.deployment_volumes(d).await? {
                match docker.remove_volume(&volume, None::<RemoveVolumeOptions>).await {
                    Ok(()) | Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => {}
                    Err(e) => return Err(self.moby.fail("remove a volume", e)),
                }
            }
        }
        Ok(())
    }
}

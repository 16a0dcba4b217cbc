//! Configs and scoped tokens as Swarm configs, for the Swarm backend: every
//! replica of an instance reads the same documents.
//!
//! A Swarm config cannot be changed, so each write creates the document's
//! next version (names are unique, so two writers cannot both make one
//! version) and then removes the older ones; a reader takes the newest.

use std::collections::HashMap;

use async_trait::async_trait;
use base64::Engine as _;
use bollard::errors::Error as DockerError;
use bollard::models::ConfigSpec;
use bollard::query_parameters::ListConfigsOptions;
use sha2::{Digest as _, Sha256};

use super::{broken, Storage};
use crate::engine::moby::Moby;
use crate::error::PipesError;

/// Label naming the stored document a Swarm config holds a version of.
const LABEL_STORE: &str = "pipes.store";
/// Label holding that version's number.
const LABEL_STORE_VERSION: &str = "pipes.store-version";
/// Attempts at a version-checked update before giving up on it.
const UPDATE_ATTEMPTS: usize = 5;

/// The Swarm configs of one instance (`PIPES_INSTANCE`).
#[derive(Clone)]
pub struct SwarmConfigs {
    moby: Moby,
}

impl SwarmConfigs {
    /// The configs on the swarm `moby` talks to.
    pub fn new(moby: Moby) -> SwarmConfigs {
        SwarmConfigs { moby }
    }

    /// The Swarm configs holding versions of document `name`, newest first.
    async fn versions(&self, name: &str) -> Result<Vec<(u64, bollard::models::Config)>, PipesError> {
        let mut labels = self.moby.instance_filter();
        labels.push(format!("{LABEL_STORE}={name}"));
        let options = ListConfigsOptions { filters: Some(HashMap::from([("label".to_owned(), labels)])) };
        let configs = self.moby.client().await?.list_configs(Some(options)).await.map_err(|e| self.moby.fail("list Swarm configs", e))?;
        let mut versions: Vec<(u64, bollard::models::Config)> = configs
            .into_iter()
            .filter_map(|c| {
                let labels = c.spec.as_ref()?.labels.as_ref()?;
                (labels.get(LABEL_STORE)? == name).then_some(())?;
                Some((labels.get(LABEL_STORE_VERSION)?.parse().ok()?, c))
            })
            .collect();
        versions.sort_by_key(|v| std::cmp::Reverse(v.0));
        Ok(versions)
    }
}

#[async_trait]
impl Storage for SwarmConfigs {
    async fn read(&self, name: &str) -> Result<Option<Vec<u8>>, PipesError> {
        // The newest version; one removed between the listing and the read
        // was replaced by a newer one, so list again.
        for _ in 0..UPDATE_ATTEMPTS {
            let Some((_, config)) = self.versions(name).await?.into_iter().next() else { return Ok(None) };
            let data = match config.spec.as_ref().and_then(|s| s.data.clone()) {
                Some(data) => data,
                None => match self.moby.client().await?.inspect_config(config.id.as_deref().unwrap_or_default()).await {
                    Ok(c) => c.spec.and_then(|s| s.data).unwrap_or_default(),
                    Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => continue,
                    Err(e) => return Err(self.moby.fail("read a Swarm config", e)),
                },
            };
            return base64::engine::general_purpose::STANDARD.decode(data).map(Some).map_err(|e| broken(name, format!("its Swarm config is not base64: {e}")));
        }
        Err(broken(name, "its Swarm configs kept changing while read"))
    }

    async fn write(&self, name: &str, bytes: Vec<u8>) -> Result<(), PipesError> {
        let data = base64::engine::general_purpose::STANDARD.encode(&bytes);
        for _ in 0..UPDATE_ATTEMPTS {
            let versions = self.versions(name).await?;
            let next = versions.first().map_or(1, |(v, _)| v + 1);
            let mut labels: HashMap<String, String> =
                self.moby.instance_filter().iter().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
            labels.insert(LABEL_STORE.into(), name.to_owned());
            labels.insert(LABEL_STORE_VERSION.into(), next.to_string());
            let hash = hex::encode(&Sha256::digest(format!("{}/{name}", self.moby.instance()).as_bytes())[..8]);
            let spec = ConfigSpec { name: Some(format!("pipes-{hash}-{next}")), labels: Some(labels), data: Some(data.clone()), templating: None };
            match self.moby.client().await?.create_config(spec).await {
                Ok(_) => {
                    // Older versions go once the new one is readable; a failure leaves an extra old one, never none.
                    for (_, old) in versions {
                        if let Some(id) = old.id {
                            if let Err(e) = self.moby.client().await?.delete_config(&id).await {
                                log::debug!("cannot remove an old version of {name}: {e}");
                            }
                        }
                    }
                    return Ok(());
                }
                // Another replica wrote this version first: ours goes after it.
                Err(DockerError::DockerResponseServerError { status_code: 409, .. }) => continue,
                Err(e) => return Err(broken(name, format!("cannot be written: {}", self.moby.fail("create a Swarm config", e)))),
            }
        }
        Err(broken(name, "cannot be written: other replicas kept writing it"))
    }

    async fn remove(&self, name: &str) -> Result<(), PipesError> {
        for (_, version) in self.versions(name).await? {
            let Some(id) = version.id else { continue };
            match self.moby.client().await?.delete_config(&id).await {
                Ok(()) | Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => {}
                Err(e) => return Err(broken(name, format!("cannot be removed: {}", self.moby.fail("remove a Swarm config", e)))),
            }
        }
        Ok(())
    }

    async fn configs(&self) -> Result<Vec<String>, PipesError> {
        let options = ListConfigsOptions { filters: Some(HashMap::from([("label".to_owned(), self.moby.instance_filter())])) };
        let configs = self.moby.client().await?.list_configs(Some(options)).await.map_err(|e| self.moby.fail("list Swarm configs", e))?;
        let mut names: Vec<String> =
            configs.iter().filter_map(|c| c.spec.as_ref()?.labels.as_ref()?.get(LABEL_STORE).cloned()).filter(|n| n.starts_with("repos/")).collect();
        names.sort();
        names.dedup();
        Ok(names)
    }
}

//! Images and pulls, by the engine Pipes talks to, with the configured
//! credentials; a failure says whether the registry refused, lacked the
//! image or could not be reached.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use bollard::errors::Error as DockerError;
use bollard::query_parameters::{CreateImageOptions, ListContainersOptions, RemoveImageOptions};
use futures_util::StreamExt;

use super::{not_found, Moby};
use crate::engine::{Image, Images, Progress};
use crate::error::PipesError;
use crate::route::DEFAULT_TAG;

/// What the engine says when it cannot reach a registry at all.
const UNREACHABLE: [&str; 8] = [
    "dial tcp",
    "connection refused",
    "no such host",
    "i/o timeout",
    "tls handshake timeout",
    "client.timeout exceeded",
    "network is unreachable",
    "server gave http response to https client",
];

#[async_trait]
impl Images for Moby {
    /// The image `reference` as the engine has it locally, if it does.
    async fn image(&self, reference: &str) -> Result<Option<Image>, PipesError> {
        match self.client().await?.inspect_image(reference).await {
            Ok(img) => {
                let mut exposed_tcp: Vec<u16> =
                    img.config.and_then(|c| c.exposed_ports).unwrap_or_default().iter().filter_map(|p| p.strip_suffix("/tcp")?.parse().ok()).collect();
                exposed_tcp.sort_unstable();
                exposed_tcp.dedup();
                // "registry/user/repo@sha256:…", one per repository the image was pulled from.
                let name = split_reference(reference).0;
                let repo_digests = img.repo_digests.unwrap_or_default();
                let digest = repo_digests
                    .iter()
                    .find(|d| d.split_once('@').is_some_and(|(n, _)| n == name))
                    .or(repo_digests.first())
                    .and_then(|d| d.split_once('@'))
                    .map(|(_, digest)| digest.to_owned());
                let size = img.size.and_then(|s| u64::try_from(s).ok()).unwrap_or(0);
                Ok(Some(Image { id: img.id.unwrap_or_default(), digest, exposed_tcp, size }))
            }
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(self.fail("inspect an image", e)),
        }
    }

    /// Pulls `reference`, then its facts.
    async fn pull(&self, reference: &str, progress: &Progress<'_>) -> Result<Image, PipesError> {
        // The tag can be removed here between the pull and the look at its
        // result (`docker rmi` by hand, a clean-up): pull once more then.
        for _ in 0..2 {
            self.pull_once(reference, progress).await?;
            if let Some(image) = self.image(reference).await? {
                return Ok(image);
            }
            log::info!("{reference} was removed here right after it was pulled: pulling it again");
        }
        Err(PipesError::Engine { action: "pull an image", detail: format!("{reference} is missing after the pull") })
    }

    /// The digest the registry holds for `reference` now, without pulling.
    async fn registry_digest(&self, reference: &str) -> Result<String, PipesError> {
        let answer = self.client().await?.inspect_registry_image(reference, self.credentials()).await.map_err(|e| self.pull_failure(reference, e))?;
        answer.descriptor.digest.ok_or_else(|| PipesError::Engine { action: "ask the registry for a digest", detail: format!("no digest for {reference}") })
    }

    async fn store_dir(&self) -> Result<Option<std::path::PathBuf>, PipesError> {
        if !self.host().starts_with("unix://") {
            return Ok(None);
        }
        let info = self.client().await?.info().await.map_err(|e| self.fail("read its facts", e))?;
        // In a container, the host's path is not this process's.
        Ok(info.docker_root_dir.map(std::path::PathBuf::from).filter(|dir| dir.is_dir()))
    }

    async fn in_use(&self) -> Result<HashSet<String>, PipesError> {
        let options = ListContainersOptions { all: true, ..Default::default() };
        let containers = self.client().await?.list_containers(Some(options)).await.map_err(|e| self.fail("list containers", e))?;
        Ok(containers.into_iter().filter_map(|c| c.image_id).collect())
    }

    async fn remove_unused(&self, reference: &str) -> Result<bool, PipesError> {
        // Without force the engine refuses an image a container uses (409).
        match self.client().await?.remove_image(reference, None::<RemoveImageOptions>, None).await {
            Ok(_) => Ok(true),
            Err(DockerError::DockerResponseServerError { status_code: 409, .. }) => Ok(false),
            Err(e) if not_found(&e) => Ok(false),
            Err(e) => Err(self.fail("remove an image", e)),
        }
    }
}

impl Moby {
    /// One pull of `reference`, within `PIPES_MAX_PULLS`, telling `progress`
    /// how far it got.
    async fn pull_once(&self, reference: &str, progress: &Progress<'_>) -> Result<(), PipesError> {
        let _place = self.pulls.acquire().await.map_err(|_| PipesError::EngineUnavailable { reason: "Pipes is shutting down".into() })?;
        let (repo, tag) = split_reference(reference);
        let options = CreateImageOptions { from_image: Some(repo.to_owned()), tag: Some(tag.to_owned()), ..Default::default() };
        let mut stream = self.client().await?.create_image(Some(options), None, self.credentials());
        // Bytes done and in all per layer, as the engine reports downloads.
        let mut layers: HashMap<String, (u64, u64)> = HashMap::new();
        while let Some(item) = stream.next().await {
            let info = item.map_err(|e| self.pull_failure(reference, e))?;
            let (Some(id), Some(detail)) = (info.id, info.progress_detail) else { continue };
            if info.status.as_deref() != Some("Downloading") {
                continue;
            }
            let (done, total) = (detail.current.unwrap_or(0).max(0) as u64, detail.total.unwrap_or(0).max(0) as u64);
            layers.insert(id, (done, total));
            let (done, total) = layers.values().fold((0, 0), |(d, t), (ld, lt)| (d + ld, t + lt));
            progress(done, total);
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
        if ["unauthorized", "authentication required", "no basic auth credentials", "incorrect username or password"].iter().any(|m| lower.contains(m)) {
            PipesError::RegistryAuth { registry: self.registry_host.clone(), user: self.credentials.as_ref().and_then(|c| c.username.clone()), detail }
        } else if ["manifest unknown", "not found", "name unknown", "does not exist", "pull access denied"].iter().any(|m| lower.contains(m)) {
            PipesError::ImageNotFound { image: reference.to_owned() }
        } else if UNREACHABLE.iter().any(|m| lower.contains(m)) {
            PipesError::RegistryUnreachable { image: reference.to_owned(), registry: self.registry_host.clone(), detail }
        } else {
            PipesError::Engine { action: "pull an image", detail }
        }
    }
}

/// Splits `registry/user/repo:tag` into `registry/user/repo` and `tag`.
fn split_reference(reference: &str) -> (&str, &str) {
    let last_slash = reference.rfind('/').map_or(0, |i| i + 1);
    match reference[last_slash..].rfind(':') {
        Some(colon) => (&reference[..last_slash + colon], &reference[last_slash + colon + 1..]),
        None => (reference, DEFAULT_TAG),
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

//! Where configs and scoped tokens are kept: [`Store`] reads and writes them
//! as Pipes means them, over a [`Storage`] of named documents — the config
//! dir ([`Dir`], `PIPES_CONFIG_DIR`, `/configs` in the image) with the Docker
//! backend, Swarm configs in the engine with the Swarm backend.
//!
//! ```text
//! repos/{user}/{repo}/repository.json   default for every tag of user/repo
//! repos/{user}/{repo}/tags/{tag}.json    one tag's own config
//! tokens.json                            API tokens scoped to users
//! share.json                             the key share links are signed with
//! ```
//!
//! In the config dir, writes go to a temporary file that is synced, renamed
//! over the old one and the directory synced: a crash at any moment leaves the
//! old file or the new one, never a torn one. A document that cannot be read
//! is reported with its name and never replaced, except by an explicit PUT.

mod dir;
mod swarm;

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;

use crate::auth::{self, ScopedToken};
use crate::config::DeployConfig;
use crate::error::PipesError;
use crate::route::Deployment;

pub use dir::{write_atomic, Dir};
pub use swarm::SwarmConfigs;

const TOKENS: &str = "tokens.json";

/// Named documents (names as in the module docs), each replaced whole and
/// atomically: a reader sees the old one or the new one.
#[async_trait]
pub trait Storage: Send + Sync + 'static {
    /// The document `name`, if there is one.
    async fn read(&self, name: &str) -> Result<Option<Vec<u8>>, PipesError>;
    /// Replaces (or creates) the document `name`.
    async fn write(&self, name: &str, bytes: Vec<u8>) -> Result<(), PipesError>;
    /// The names of every config document (`repos/…`).
    async fn configs(&self) -> Result<Vec<String>, PipesError>;
    /// Removes the document `name`, if there is one.
    async fn remove(&self, name: &str) -> Result<(), PipesError>;
}

/// Which layer a stored config is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layer {
    /// A tag's own config.
    Tag(Deployment),
    /// The default of a repository: user and repository.
    Repository(String, String),
}

impl Layer {
    /// The layer a document's name stores, if it names one.
    fn of(name: &str) -> Option<Layer> {
        let rest = name.strip_prefix("repos/")?;
        let (user, rest) = rest.split_once('/')?;
        let (repo, rest) = rest.split_once('/')?;
        if rest == "repository.json" {
            return Some(Layer::Repository(user.to_owned(), repo.to_owned()));
        }
        let tag = rest.strip_prefix("tags/")?.strip_suffix(".json")?;
        Deployment::parse(&format!("{user}/{repo}:{tag}")).map(Layer::Tag)
    }
}

/// Configs and tokens, over whichever [`Storage`] the backend keeps them in.
#[derive(Clone)]
pub struct Store {
    storage: Arc<dyn Storage>,
}

impl Store {
    /// The store over `storage`.
    pub fn new(storage: Arc<dyn Storage>) -> Self {
        Store { storage }
    }

    /// The store in the config dir `dir` (created on first write).
    pub fn dir(dir: impl Into<PathBuf>) -> Self {
        Store::new(Arc::new(Dir::new(dir)))
    }

    /// The default config of `user/repo`, if one is stored.
    pub async fn repository(&self, user: &str, repo: &str) -> Result<Option<DeployConfig>, PipesError> {
        self.read_config(&repository_name(user, repo)).await
    }

    /// The tag's own config, if one is stored.
    pub async fn tag(&self, d: &Deployment) -> Result<Option<DeployConfig>, PipesError> {
        self.read_config(&tag_name(d)).await
    }

    /// Replaces the default config of `user/repo`.
    pub async fn put_repository(&self, user: &str, repo: &str, config: DeployConfig) -> Result<(), PipesError> {
        self.write_config(&repository_name(user, repo), &config).await
    }

    /// Removes the tag's own config (its repository's stays).
    pub async fn remove_tag(&self, d: &Deployment) -> Result<(), PipesError> {
        self.storage.remove(&tag_name(d)).await
    }

    /// Replaces the tag's own config.
    pub async fn put_tag(&self, d: &Deployment, config: DeployConfig) -> Result<(), PipesError> {
        self.write_config(&tag_name(d), &config).await
    }

    /// Scoped API tokens from `tokens.json` (none if there is none).
    pub async fn tokens(&self) -> Result<Vec<ScopedToken>, PipesError> {
        match self.storage.read(TOKENS).await? {
            Some(bytes) => auth::parse_tokens(&bytes).map_err(|problem| broken(TOKENS, problem)),
            None => Ok(Vec::new()),
        }
    }

    /// Every stored config layer, each read or why it cannot be.
    pub async fn layers(&self) -> Result<Vec<(Layer, Result<DeployConfig, PipesError>)>, PipesError> {
        let mut layers = Vec::new();
        for name in self.storage.configs().await? {
            if let Some(layer) = Layer::of(&name) {
                let config = self.read_config(&name).await.and_then(|c| c.ok_or_else(|| broken(&name, "removed while being read")));
                layers.push((layer, config));
            }
        }
        Ok(layers)
    }

    /// Another JSON document kept beside the configs (`share.json`,
    /// `activity.json`, `images.json`), if there is one.
    pub async fn document<T: serde::de::DeserializeOwned>(&self, name: &str) -> Result<Option<T>, PipesError> {
        match self.storage.read(name).await? {
            Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| broken(name, e.to_string())),
            None => Ok(None),
        }
    }

    /// Replaces (or creates) the JSON document `name` beside the configs.
    pub async fn put_document<T: serde::Serialize>(&self, name: &str, value: &T) -> Result<(), PipesError> {
        let bytes = serde_json::to_vec_pretty(value).map_err(|e| broken(name, e.to_string()))?;
        self.storage.write(name, bytes).await
    }

    /// Checks every stored config at start-up: returns the broken ones.
    pub async fn check(&self) -> Vec<PipesError> {
        let names = match self.storage.configs().await {
            Ok(names) => names,
            Err(e) => return vec![e],
        };
        let mut problems = Vec::new();
        for name in names {
            if let Err(e) = self.read_config(&name).await {
                problems.push(e);
            }
        }
        problems
    }

    async fn read_config(&self, name: &str) -> Result<Option<DeployConfig>, PipesError> {
        match self.storage.read(name).await? {
            Some(bytes) => DeployConfig::from_json(&bytes).map(Some).map_err(|e| broken(name, e.to_string())),
            None => Ok(None),
        }
    }

    async fn write_config(&self, name: &str, config: &DeployConfig) -> Result<(), PipesError> {
        let mut bytes = serde_json::to_vec_pretty(config).map_err(|e| broken(name, e.to_string()))?;
        bytes.push(b'\n');
        self.storage.write(name, bytes).await
    }
}

fn repository_name(user: &str, repo: &str) -> String {
    format!("repos/{user}/{repo}/repository.json")
}

fn tag_name(d: &Deployment) -> String {
    format!("repos/{}/{}/tags/{}.json", d.user, d.repo, d.tag)
}

/// A stored document that cannot be read or written, by its name.
pub fn broken(name: &str, problem: impl Into<String>) -> PipesError {
    PipesError::ConfigBroken { file: name.to_owned(), problem: problem.into() }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    fn temp_store(name: &str) -> (Store, PathBuf) {
        let dir = std::env::temp_dir().join(format!("pipes-store-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        (Store::dir(dir.clone()), dir)
    }

    #[tokio::test]
    async fn configs_round_trip_and_missing_is_none() {
        let (store, dir) = temp_store("roundtrip");
        let d = Deployment::parse("alice/app:1.2.3").unwrap();
        assert_eq!(store.tag(&d).await.unwrap(), None);
        let config = DeployConfig::from_json(br#"{"port":8080,"env":{"A":"1"}}"#).unwrap();
        store.put_tag(&d, config.clone()).await.unwrap();
        store.put_repository("alice", "app", DeployConfig::default()).await.unwrap();
        assert_eq!(store.tag(&d).await.unwrap(), Some(config));
        assert_eq!(store.repository("alice", "app").await.unwrap(), Some(DeployConfig::default()));
        assert!(store.check().await.is_empty());
        assert!(dir.join("repos/alice/app/tags/1.2.3.json").exists());
        fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn broken_files_are_reported_and_kept() {
        let (store, dir) = temp_store("broken");
        let d = Deployment::parse("alice/app:v1").unwrap();
        store.put_tag(&d, DeployConfig::default()).await.unwrap();
        let path = dir.join("repos/alice/app/tags/v1.json");
        fs::write(&path, b"{\"port\": 80,").unwrap();
        let stale = dir.join("repos/alice/app/tags/.v1.json.tmp-1-1");
        fs::write(&stale, b"{").unwrap();

        let problems = store.check().await;
        assert_eq!(problems.len(), 1, "{problems:?}");
        match &problems[0] {
            PipesError::ConfigBroken { file, .. } => assert_eq!(file, "repos/alice/app/tags/v1.json"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(store.tag(&d).await, Err(PipesError::ConfigBroken { .. })));
        assert_eq!(fs::read(&path).unwrap(), b"{\"port\": 80,", "never replaced silently");
        assert!(!stale.exists(), "temporary leftovers are removed");
        fs::remove_dir_all(dir).unwrap();
    }
}

//! Where configs and scoped tokens are kept: [`Store`] reads and writes them
//! as Pipes means them, over a [`Storage`] of named documents — the config
//! dir ([`Dir`], `PIPES_CONFIG_DIR`, `/configs` in the image) with the Docker
//! backend, Swarm configs in the engine with the Swarm backend.
//!
//! ```text
//! repos/{user}/{repo}/repository.json   default for every tag of user/repo
//! repos/{user}/{repo}/tags/{tag}.json    one tag's own config
//! tokens.json                            API tokens scoped to users
//! ```
//!
//! In the config dir, writes go to a temporary file that is synced, renamed
//! over the old one and the directory synced: a crash at any moment leaves the
//! old file or the new one, never a torn one. A document that cannot be read
//! is reported with its name and never replaced, except by an explicit PUT.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;

use crate::auth::{self, ScopedToken};
use crate::config::DeployConfig;
use crate::error::PipesError;
use crate::route::Deployment;

const TOKENS: &str = "tokens.json";
/// Temporary files carry this marker; stale ones are removed at start.
const TEMP_MARKER: &str = ".tmp-";

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

/// The config dir. Its file work runs on tokio's blocking pool, so no proxy
/// or control thread ever waits on the disk.
#[derive(Debug, Clone)]
pub struct Dir {
    dir: Arc<PathBuf>,
}

impl Dir {
    /// The config dir `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Dir { dir: Arc::new(dir.into()) }
    }

    /// Runs file work on the blocking pool.
    async fn blocking<T, F>(&self, work: F) -> Result<T, PipesError>
    where
        F: FnOnce(&Dir) -> Result<T, PipesError> + Send + 'static,
        T: Send + 'static,
    {
        let dir = self.clone();
        tokio::task::spawn_blocking(move || work(&dir)).await.unwrap_or_else(|e| Err(broken("", format!("the file task failed: {e}"))))
    }

    /// Every config file's name; removes temporary files that interrupted
    /// writes left behind.
    fn config_files(&self) -> Vec<String> {
        let mut names = Vec::new();
        let mut stack = vec![self.dir.join("repos")];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = fs::read_dir(&dir) else { continue };
            for entry in entries.flatten() {
                let path = entry.path();
                let name = entry.file_name().to_string_lossy().into_owned();
                if path.is_dir() {
                    stack.push(path);
                } else if name.contains(TEMP_MARKER) {
                    match fs::remove_file(&path) {
                        Ok(()) => log::info!("removed {} left by an interrupted write", path.display()),
                        Err(e) => log::warn!("cannot remove {}: {e}", path.display()),
                    }
                } else if name.ends_with(".json") {
                    names.push(path.strip_prefix(self.dir.as_path()).unwrap_or(&path).display().to_string());
                }
            }
        }
        names.sort();
        names
    }
}

#[async_trait]
impl Storage for Dir {
    async fn read(&self, name: &str) -> Result<Option<Vec<u8>>, PipesError> {
        let name = name.to_owned();
        self.blocking(move |d| match fs::read(d.dir.join(&name)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(broken(&name, e.to_string())),
        })
        .await
    }

    async fn write(&self, name: &str, bytes: Vec<u8>) -> Result<(), PipesError> {
        let name = name.to_owned();
        self.blocking(move |d| write_atomic(&d.dir.join(&name), &bytes).map_err(|e| broken(&name, format!("cannot be written: {e}")))).await
    }

    async fn configs(&self) -> Result<Vec<String>, PipesError> {
        self.blocking(|d| Ok(d.config_files())).await
    }
}

/// Writes `bytes` to `path` so that readers (and crashes) see the old content or
/// the new, never a mix: temp file, fsync, rename, fsync of the directory.
/// Only the owner may read it: configs hold environment secrets, and keys
/// are stored the same way.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().ok_or_else(|| io::Error::other("no parent directory"))?;
    fs::create_dir_all(dir)?;
    let name = path.file_name().ok_or_else(|| io::Error::other("no file name"))?.to_string_lossy();
    let temp = dir.join(format!(".{name}{TEMP_MARKER}{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
    let written = (|| {
        let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temp, path)?;
        File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    written
}

#[cfg(test)]
mod tests {
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

//! Configs on disk, under the config dir (`PIPES_CONFIG_DIR`, `/configs` in the image).
//!
//! ```text
//! {dir}/repos/{user}/{repo}/repository.json   default for every tag of user/repo
//! {dir}/repos/{user}/{repo}/tags/{tag}.json    one tag's own config
//! {dir}/tokens.json                            API tokens scoped to users
//! ```
//!
//! Writes go to a temporary file that is synced, renamed over the old one and
//! the directory synced: a crash at any moment leaves the old file or the new
//! one, never a torn one. A file that cannot be read is reported with its path
//! and never replaced, except by an explicit PUT.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::auth::{self, ScopedToken};
use crate::config::DeployConfig;
use crate::error::PipesError;
use crate::route::Deployment;

const REPOSITORY_FILE: &str = "repository.json";
const TOKENS_FILE: &str = "tokens.json";
/// Temporary files carry this marker; stale ones are removed at start.
const TEMP_MARKER: &str = ".tmp-";

/// The config dir. Every method is async and does its file work on tokio's
/// blocking pool, so no proxy or control thread ever waits on the disk.
#[derive(Debug, Clone)]
pub struct Store {
    dir: Arc<PathBuf>,
}

impl Store {
    /// The store in `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Store { dir: Arc::new(dir.into()) }
    }

    /// The default config of `user/repo`, if one is stored.
    pub async fn repository(&self, user: &str, repo: &str) -> Result<Option<DeployConfig>, PipesError> {
        let path = self.repository_path(user, repo);
        self.blocking(move |s| s.read_config(&path)).await
    }

    /// The tag's own config, if one is stored.
    pub async fn tag(&self, d: &Deployment) -> Result<Option<DeployConfig>, PipesError> {
        let path = self.tag_path(d);
        self.blocking(move |s| s.read_config(&path)).await
    }

    /// Replaces the default config of `user/repo`.
    pub async fn put_repository(&self, user: &str, repo: &str, config: DeployConfig) -> Result<(), PipesError> {
        let path = self.repository_path(user, repo);
        self.blocking(move |s| s.write_config(&path, &config)).await
    }

    /// Replaces the tag's own config.
    pub async fn put_tag(&self, d: &Deployment, config: DeployConfig) -> Result<(), PipesError> {
        let path = self.tag_path(d);
        self.blocking(move |s| s.write_config(&path, &config)).await
    }

    /// Scoped API tokens from `tokens.json` (none if the file does not exist).
    pub async fn tokens(&self) -> Result<Vec<ScopedToken>, PipesError> {
        self.blocking(|s| {
            let path = s.dir.join(TOKENS_FILE);
            match fs::read(&path) {
                Ok(bytes) => auth::parse_tokens(&bytes).map_err(|problem| s.broken(&path, problem)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
                Err(e) => Err(s.broken(&path, e.to_string())),
            }
        })
        .await
    }

    /// Checks every stored file at start-up: returns the broken ones, and
    /// removes temporary files that interrupted writes left behind.
    pub async fn check(&self) -> Vec<PipesError> {
        self.blocking(|s| Ok(s.check_files())).await.unwrap_or_else(|e| vec![e])
    }

    /// Runs file work on the blocking pool.
    async fn blocking<T, F>(&self, work: F) -> Result<T, PipesError>
    where
        F: FnOnce(&Store) -> Result<T, PipesError> + Send + 'static,
        T: Send + 'static,
    {
        let store = self.clone();
        tokio::task::spawn_blocking(move || work(&store))
            .await
            .unwrap_or_else(|e| Err(PipesError::ConfigBroken { file: String::new(), problem: format!("the file task failed: {e}") }))
    }

    fn repository_dir(&self, user: &str, repo: &str) -> PathBuf {
        self.dir.join("repos").join(user).join(repo)
    }

    fn repository_path(&self, user: &str, repo: &str) -> PathBuf {
        self.repository_dir(user, repo).join(REPOSITORY_FILE)
    }

    fn tag_path(&self, d: &Deployment) -> PathBuf {
        self.repository_dir(&d.user, &d.repo).join("tags").join(format!("{}.json", d.tag))
    }

    fn check_files(&self) -> Vec<PipesError> {
        let mut problems = Vec::new();
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
                    if let Err(e) = self.read_config(&path) {
                        problems.push(e);
                    }
                }
            }
        }
        problems
    }

    fn read_config(&self, path: &Path) -> Result<Option<DeployConfig>, PipesError> {
        match fs::read(path) {
            Ok(bytes) => DeployConfig::from_json(&bytes).map(Some).map_err(|e| self.broken(path, e.to_string())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.broken(path, e.to_string())),
        }
    }

    fn write_config(&self, path: &Path, config: &DeployConfig) -> Result<(), PipesError> {
        let mut bytes = serde_json::to_vec_pretty(config).map_err(|e| self.broken(path, e.to_string()))?;
        bytes.push(b'\n');
        write_atomic(path, &bytes).map_err(|e| PipesError::ConfigBroken { file: self.relative(path), problem: format!("cannot be written: {e}") })
    }

    fn broken(&self, path: &Path, problem: String) -> PipesError {
        PipesError::ConfigBroken { file: self.relative(path), problem }
    }

    /// Paths in messages are relative to the config dir: users need no more.
    fn relative(&self, path: &Path) -> String {
        path.strip_prefix(self.dir.as_path()).unwrap_or(path).display().to_string()
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
        (Store::new(dir.clone()), dir)
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

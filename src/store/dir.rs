//! The config dir (`PIPES_CONFIG_DIR`) as a [`Storage`]: one file a
//! document, written atomically.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;

use super::{broken, Storage};
use crate::error::PipesError;

/// Temporary files carry this marker; stale ones are removed at start.
const TEMP_MARKER: &str = ".tmp-";

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

    async fn remove(&self, name: &str) -> Result<(), PipesError> {
        let name = name.to_owned();
        self.blocking(move |d| {
            let path = d.dir.join(&name);
            match fs::remove_file(&path) {
                Ok(()) => path.parent().map_or(Ok(()), |dir| File::open(dir).and_then(|f| f.sync_all())),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(e),
            }
            .map_err(|e| broken(&name, format!("cannot be removed: {e}")))
        })
        .await
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

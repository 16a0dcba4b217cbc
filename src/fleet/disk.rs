//! The disk guard: while the file system the engine keeps images on has
//! less free space than `PIPES_DISK_MIN_FREE`, no image is pulled (507
//! `insufficient_storage`), so a full disk cannot take the engine down with
//! every deployment on it. Running deployments keep serving, and stopped
//! ones whose image is here still start: only pulls are refused.

use super::Deployer;
use crate::error::PipesError;

impl Deployer {
    /// The free and whole space of the engine's image store, where this
    /// process can see it (a local engine); `None` where it cannot.
    pub(super) async fn engine_disk(&self) -> Option<(u64, u64)> {
        let dir = self
            .engine_dir
            .get_or_init(|| async {
                let dir = self.backend().images().store_dir().await.ok().flatten();
                match &dir {
                    Some(dir) => log::info!("the engine keeps images in {}: pulls stop below PIPES_DISK_MIN_FREE ({}) free", dir.display(), self.disk_min_free),
                    None => log::info!("the engine's image store is not visible here: PIPES_DISK_MIN_FREE is not checked"),
                }
                dir
            })
            .await;
        crate::host::disk_space(dir.as_deref()?)
    }

    /// `Ok` if pulling `image_ref` leaves the engine's disk its
    /// `PIPES_DISK_MIN_FREE`; else 507.
    pub(super) async fn room_to_pull(&self, image_ref: &str) -> Result<(), PipesError> {
        let Some((free, total)) = self.engine_disk().await else { return Ok(()) };
        if let Some(m) = &self.metrics {
            m.disk_free(free);
        }
        if self.disk_min_free.short(free, total) {
            let e = PipesError::InsufficientStorage { image: image_ref.to_owned(), free, min_free: self.disk_min_free.to_string() };
            log::warn!("{e}");
            return Err(e);
        }
        Ok(())
    }
}

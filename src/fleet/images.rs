//! Image collection: images Pipes pulled (recorded in `images.json` in the
//! store as they are pulled) that no container uses — anyone's container,
//! running or not, the rollback generation's among them — are removed once
//! unused for `PIPES_IMAGE_KEEP`, and at once, least recently used first,
//! while the engine's disk is fuller than `PIPES_DISK_HIGH`. An image Pipes
//! did not pull is never touched.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, PoisonError};

use serde::{Deserialize, Serialize};

use super::{Deployer, Fleet};
use crate::clock::unix_ms;
use crate::engine::Image;
use crate::error::PipesError;

/// The store's document of images Pipes pulled, by image id.
const RECORD: &str = "images.json";

/// One image Pipes pulled.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Pulled {
    /// The references it was pulled by.
    references: BTreeSet<String>,
    /// Bytes on the engine's disk.
    #[serde(default)]
    size: u64,
    /// Since when no container uses it (Unix ms); `None` while one does.
    #[serde(default)]
    unused_since_ms: Option<u64>,
}

type Record = BTreeMap<String, Pulled>;

impl Deployer {
    async fn read_images(&self) -> Result<Record, PipesError> {
        Ok(self.store().document(RECORD).await?.unwrap_or_default())
    }

    async fn write_images(&self, record: &Record) -> Result<(), PipesError> {
        self.store().put_document(RECORD, record).await
    }

    /// Records that Pipes pulled `image` by `reference`, so that collection
    /// may remove it once nothing uses it. Never waits for a collection
    /// under way (a start calls this): that pass writes it down at its end.
    pub(super) async fn record_pull(&self, reference: &str, image: &Image) {
        self.pulled.lock().unwrap_or_else(PoisonError::into_inner).push((reference.to_owned(), image.id.clone(), image.size));
        let Ok(_one) = self.images_record.try_lock() else { return };
        let recorded = async {
            let mut record = self.read_images().await?;
            self.note_pulls(&mut record);
            self.write_images(&record).await
        };
        if let Err(e) = recorded.await {
            log::warn!("{reference}: pulled, but not recorded for collection: {e}");
        }
    }

    /// Adds the pulls waiting to be recorded to `record`.
    fn note_pulls(&self, record: &mut Record) {
        for (reference, id, size) in self.pulled.lock().unwrap_or_else(PoisonError::into_inner).drain(..) {
            let entry = record.entry(id).or_default();
            entry.references.insert(reference);
            entry.size = size;
        }
    }
}

impl Fleet {
    /// The one flow of image collection; how many images it removed.
    pub async fn collect_images(self: &Arc<Self>) -> Result<usize, PipesError> {
        let deployer = self.deployer.clone();
        self.on_control(async move { collect(&deployer).await }).await
    }
}

async fn collect(deployer: &Deployer) -> Result<usize, PipesError> {
    let _one = deployer.images_record.lock().await;
    let mut record = deployer.read_images().await?;
    let before = record.clone();
    deployer.note_pulls(&mut record);
    let images = deployer.backend().images();
    let in_use = images.in_use().await?;
    let now = unix_ms();
    // Forget what is gone (removed by hand, by expiry); mark what is unused.
    let mut gone = Vec::new();
    for (id, pulled) in record.iter_mut() {
        if images.image(id).await?.is_none() {
            gone.push(id.clone());
        } else if in_use.contains(id) {
            pulled.unused_since_ms = None;
        } else {
            pulled.unused_since_ms.get_or_insert(now);
        }
    }
    for id in gone {
        record.remove(&id);
    }
    let keep = u64::try_from(deployer.image_keep.as_millis()).unwrap_or(u64::MAX);
    let mut unused: Vec<(u64, String)> = record.iter().filter_map(|(id, p)| Some((p.unused_since_ms?, id.clone()))).collect();
    unused.sort();
    let mut removed = 0;
    for (since, id) in unused {
        let reason = if now.saturating_sub(since) >= keep {
            "unused"
        } else if deployer
            .engine_disk()
            .await
            .is_some_and(|(free, total)| total > 0 && (total - free.min(total)) as f64 * 100.0 > deployer.disk_high * total as f64)
        {
            "disk"
        } else {
            continue;
        };
        let Some(pulled) = record.get(&id).cloned() else { continue };
        // Its tags first, then the image: an image with several tags goes only with the last.
        for reference in &pulled.references {
            let _ = images.remove_unused(reference).await;
        }
        let _ = images.remove_unused(&id).await;
        if images.image(&id).await?.is_none() {
            log::info!("removed image {} ({}), unused by any container: {reason}", pulled.references.iter().next().map_or(id.as_str(), String::as_str), id);
            record.remove(&id);
            removed += 1;
            if let Some(m) = &deployer.metrics {
                m.image_removed(reason);
            }
        }
    }
    if let Some(m) = &deployer.metrics {
        let used = record.values().filter(|p| p.unused_since_ms.is_none()).count();
        m.images(used, record.len() - used, record.values().map(|p| p.size).sum());
    }
    // Pulls made during this pass are written with it.
    deployer.note_pulls(&mut record);
    if record != before {
        deployer.write_images(&record).await?;
    }
    Ok(removed)
}

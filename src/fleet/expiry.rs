//! Expiry: a deployment no request reached for its `expire_after`
//! (`PIPES_EXPIRE_AFTER`) is removed whole — every generation, its
//! services, network and volumes, its tag config (never its repository's)
//! and its images where nothing else uses them — and comes back as new on
//! its next request.
//!
//! When each deployment was last asked for is kept in the store
//! (`activity.json`), so that it survives a restart of Pipes and, on Swarm,
//! counts every replica's requests: each merges what it saw into it, the
//! latest time winning. A deployment first seen with nothing recorded (made
//! before, or configured and never asked for) counts from then.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use super::{Fleet, HappeningKind, State, EXPIRED};
use crate::clock::unix_ms;
use crate::config::Effective;
use crate::error::PipesError;
use crate::route::Deployment;
use crate::store::{Layer, Store};

/// How often an image the expired deployment used is asked to go, half a
/// second apart, while a container still uses it.
const IMAGE_TRIES: usize = 10;

/// The store's document of last requests: `user/repo:tag` → Unix ms.
const ACTIVITY: &str = "activity.json";

type Record = BTreeMap<String, u64>;

async fn read_record(store: &Store) -> Result<Record, PipesError> {
    Ok(store.document(ACTIVITY).await?.unwrap_or_default())
}

impl Fleet {
    /// The one flow of expiry: records the last requests seen here, then
    /// removes every deployment unused for its `expire_after` with nothing
    /// open on it. How many were removed.
    pub async fn expire_unused(self: &Arc<Self>) -> Result<usize, PipesError> {
        let expirable = self.expirable().await?;
        if expirable.is_empty() {
            return Ok(0);
        }
        let store = self.deployer.store().clone();
        let mut record = read_record(&store).await?;
        let mut seen = Record::new();
        for slot in self.table.load().values() {
            if let Some(last) = slot.last_request_ms() {
                seen.insert(slot.deployment.to_string(), last);
            }
        }
        let now = unix_ms();
        let mut expired = BTreeSet::new();
        // Only deployments that expire are recorded.
        let mut considered = BTreeSet::new();
        for (d, after) in expirable {
            let key = d.to_string();
            considered.insert(key.clone());
            let last = *seen.entry(key.clone()).or_insert_with(|| record.get(&key).copied().unwrap_or(now));
            let last = last.max(record.get(&key).copied().unwrap_or(0));
            let busy = self.get(d.as_ref()).is_some_and(|s| s.starting() || s.upstream().is_some_and(|u| u.open() > 0));
            if !busy && Duration::from_millis(now.saturating_sub(last)) >= after {
                match self.expire(&d).await {
                    Ok(()) => {
                        expired.insert(key);
                    }
                    Err(e) => log::warn!("{d}: unused for {}, but cannot be removed: {e}", humantime::format_duration(after)),
                }
            }
        }
        // Merged into what is stored now: another replica may have written meanwhile.
        let mut changed = !expired.is_empty();
        for (key, at) in seen.into_iter().filter(|(key, _)| considered.contains(key)) {
            let newer = record.get(&key).is_none_or(|stored| *stored < at);
            if newer && !expired.contains(&key) {
                record.insert(key, at);
                changed = true;
            }
        }
        if changed {
            let mut stored = read_record(&store).await?;
            for (key, at) in record {
                let entry = stored.entry(key).or_insert(at);
                *entry = (*entry).max(at);
            }
            stored.retain(|key, _| !expired.contains(key));
            store.put_document(ACTIVITY, &stored).await?;
        }
        Ok(expired.len())
    }

    /// When `d` expires, in Unix ms, if its config says it does: for the API.
    pub async fn expires_at_ms(&self, d: &Deployment) -> Option<u64> {
        let after = self.deployer.effective(d).await.ok()?.expire_after?;
        let stored = read_record(self.deployer.store()).await.ok()?.get(&d.to_string()).copied();
        let here = self.get(d.as_ref()).and_then(|s| s.last_request_ms());
        let last = stored.max(here)?;
        Some(last.saturating_add(u64::try_from(after.as_millis()).unwrap_or(u64::MAX)))
    }

    /// Deployments there is something of to remove (instances on the
    /// engine, or a tag config) whose config says they expire, and after
    /// how long. Nothing is asked of the engine where no config (and not
    /// `PIPES_EXPIRE_AFTER`) says anything expires.
    async fn expirable(&self) -> Result<Vec<(Deployment, Duration)>, PipesError> {
        let (mut tags, mut repositories) = (BTreeMap::new(), BTreeMap::new());
        for (layer, config) in self.deployer.store().layers().await? {
            // A config that cannot be read keeps its deployment: nothing is removed on a guess.
            let Ok(config) = config else { continue };
            match layer {
                Layer::Tag(d) => tags.insert(d, config),
                Layer::Repository(user, repo) => repositories.insert(format!("{user}/{repo}"), config),
            };
        }
        let defaults = self.deployer.defaults();
        let any = defaults.expire_after.is_some() || tags.values().chain(repositories.values()).any(|c| c.expire_after.is_some());
        if !any {
            return Ok(Vec::new());
        }
        let deployer = self.deployer.clone();
        let instances = self.on_control(async move { deployer.backend().list().await }).await?;
        let mut found: BTreeSet<Deployment> = instances.into_iter().map(|i| i.deployment).collect();
        found.extend(tags.keys().cloned());
        Ok(found
            .into_iter()
            .filter_map(|d| {
                let after = Effective::merge(tags.get(&d), repositories.get(&d.repository()), defaults).expire_after?;
                Some((d, after))
            })
            .collect())
    }

    /// Removes everything of `d`, as its expiry.
    async fn expire(self: &Arc<Self>, d: &Deployment) -> Result<(), PipesError> {
        let deployer = self.deployer.clone();
        let key = d.clone();
        let images = self
            .on_control(async move {
                let mut images = vec![deployer.image_ref(&key)];
                images.extend(deployer.backend().instances(&key).await?.into_iter().filter_map(|i| i.image_id));
                if let Ok(config) = deployer.effective(&key).await {
                    images.extend(config.services.iter().map(|s| deployer.image_ref(&s.image)));
                }
                Ok(images)
            })
            .await?;
        self.operate(d, |deployer, d| async move { deployer.remove_all(&d, false).await }).await?;
        self.deployer.store().remove_tag(d).await?;
        self.access.forget_tag(d);
        self.reapply_access(|x| x == d);
        let deployer = self.deployer.clone();
        let removed = self
            .on_control(async move {
                let mut removed = 0;
                for image in images {
                    // One a container uses (anyone's) stays. A swarm removes
                    // a service's tasks after the service, so its image is
                    // asked for again for a few seconds.
                    for _ in 0..IMAGE_TRIES {
                        match deployer.backend().images().remove_unused(&image).await {
                            Ok(true) => {
                                removed += 1;
                                break;
                            }
                            Ok(false) if deployer.backend().images().image(&image).await.ok().flatten().is_some() => {
                                tokio::time::sleep(Duration::from_millis(500)).await
                            }
                            _ => break,
                        }
                    }
                }
                Ok(removed)
            })
            .await
            .unwrap_or(0);
        log::info!("{d}: no request for its expire_after: removed, with {removed} image(s) nothing else used");
        if let Some(m) = self.metrics.as_ref() {
            m.expired();
        }
        self.feed.tell(d, HappeningKind::Left { state: State::Removed, why: EXPIRED });
        Ok(())
    }
}

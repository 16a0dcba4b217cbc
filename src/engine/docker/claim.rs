//! One live Pipes per instance name on an engine.
//!
//! Two Pipes with the same `PIPES_INSTANCE` would adopt, stop and replace
//! each other's containers. Each Pipes therefore holds a claim on its name:
//! a volume (the one engine object that needs no image) labelled with who
//! holds it, made anew every [`CLAIM_RENEW_EVERY`] and removed on exit. A claim
//! counts as live while its holder demonstrably runs: its container runs, or
//! its process exists (same host and process namespace), or, where neither
//! can be seen, it was renewed within [`STALE_AFTER`].

use std::collections::HashMap;
use std::time::Duration;

use bollard::models::VolumeCreateRequest;
use bollard::query_parameters::{ListVolumesOptions, RemoveVolumeOptions};

use super::Docker;
use crate::clock::wall;
use crate::engine::{short_id, CLAIM_RENEW_EVERY};
use crate::error::PipesError;

/// A claim not renewed for this long is stale, where nothing else tells.
const STALE_AFTER: Duration = Duration::from_secs(3 * CLAIM_RENEW_EVERY.as_secs());

const LABEL_CLAIM: &str = "pipes.claim";
const LABEL_RUN: &str = "pipes.claim.run";
const LABEL_AT: &str = "pipes.claim.at";
const LABEL_CONTAINER: &str = "pipes.claim.container";
const LABEL_PROCESS: &str = "pipes.claim.process";
const LABEL_HOST: &str = "pipes.claim.host";

/// Who this process is, as a claim records it.
#[derive(Debug, Clone)]
pub struct Holder {
    /// Unique to this process.
    pub run: String,
    pid: u32,
    /// The host's boot id and this process' pid namespace: a pid means this
    /// process only where both are the same.
    process: String,
    hostname: String,
}

impl Holder {
    /// This process.
    pub fn me(hostname: Option<&str>) -> Holder {
        let pid = std::process::id();
        let nanos = wall().as_nanos();
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
        let pid_ns = std::fs::read_link("/proc/self/ns/pid").map(|p| p.display().to_string()).unwrap_or_default();
        Holder {
            run: format!("{pid:x}{:x}", nanos & 0xffff_ffff_ffff),
            pid,
            process: format!("{pid}@{}@{}", boot.trim(), pid_ns),
            hostname: hostname.unwrap_or("unknown").to_owned(),
        }
    }
}

impl Docker {
    /// See [`crate::engine::Claims::claim`].
    pub(super) async fn claim_instance(&self, beside: bool) -> Result<Option<String>, PipesError> {
        let docker = self.docker().await?;
        let filters = HashMap::from([("label".to_string(), vec![format!("{LABEL_CLAIM}={}", self.moby.instance())])]);
        let volumes = docker.list_volumes(Some(ListVolumesOptions { filters: Some(filters) })).await.map_err(|e| self.moby.fail("list volumes", e))?;
        let own_container = self.own_container().await;
        let mut held_by = None;
        for volume in volumes.volumes.unwrap_or_default() {
            let labels = &volume.labels;
            let mine = labels.get(LABEL_RUN) == Some(&self.holder.run);
            if mine {
                continue;
            }
            match self.live(labels, own_container.as_deref()).await {
                Some(holder) => held_by = held_by.or(Some(holder)),
                None => self.drop_volume(&volume.name).await,
            }
        }
        if let (Some(holder), false) = (&held_by, beside) {
            return Ok(Some(holder.clone()));
        }
        self.renew(own_container).await?;
        Ok(None)
    }

    /// Who holds the claim `labels` describe, if that Pipes still runs.
    async fn live(&self, labels: &HashMap<String, String>, own_container: Option<&str>) -> Option<String> {
        let host = labels.get(LABEL_HOST).map_or("?", String::as_str);
        if let Some(container) = labels.get(LABEL_CONTAINER).filter(|c| !c.is_empty()) {
            // A container that runs is live; this one restarted is not another Pipes.
            let running = match self.docker().await.ok()?.inspect_container(container, None).await {
                Ok(c) => c.state.and_then(|s| s.running).unwrap_or(false),
                Err(_) => false,
            };
            return (running && Some(container.as_str()) != own_container).then(|| format!("container {} on host {host}", short_id(container)));
        }
        let process = labels.get(LABEL_PROCESS)?;
        if let Some((pid, namespace)) = process.split_once('@') {
            if namespace == self.holder.process.split_once('@').map_or("", |(_, n)| n) {
                let exists = std::path::Path::new(&format!("/proc/{pid}")).exists();
                return (exists && pid != self.holder.pid.to_string()).then(|| format!("process {pid} on this host"));
            }
        }
        let at: u64 = labels.get(LABEL_AT)?.parse().ok()?;
        let age = wall().as_secs().saturating_sub(at);
        (age < STALE_AFTER.as_secs()).then(|| format!("process on host {host}, seen {age} s ago"))
    }

    /// Makes this process' claim anew and removes its older volumes.
    async fn renew(&self, own_container: Option<String>) -> Result<(), PipesError> {
        let docker = self.docker().await?;
        let at = wall().as_secs();
        let name = format!("{}.claim.{}.{at}", self.moby.instance(), self.holder.run);
        let mut labels: HashMap<String, String> = self.moby.own_labels();
        labels.insert(LABEL_CLAIM.into(), self.moby.instance().to_owned());
        labels.insert(LABEL_RUN.into(), self.holder.run.clone());
        labels.insert(LABEL_AT.into(), at.to_string());
        labels.insert(LABEL_CONTAINER.into(), own_container.unwrap_or_default());
        labels.insert(LABEL_PROCESS.into(), self.holder.process.clone());
        labels.insert(LABEL_HOST.into(), self.holder.hostname.clone());
        let request = VolumeCreateRequest { name: Some(name.clone()), labels: Some(labels), ..Default::default() };
        docker.create_volume(request).await.map_err(|e| self.moby.fail("create a volume", e))?;
        for old in self.own_volumes().await? {
            if old != name {
                self.drop_volume(&old).await;
            }
        }
        Ok(())
    }

    /// See [`crate::engine::Backend::release`].
    pub(super) async fn release_instance(&self) {
        for name in self.own_volumes().await.unwrap_or_default() {
            self.drop_volume(&name).await;
        }
    }

    async fn own_volumes(&self) -> Result<Vec<String>, PipesError> {
        let filters = HashMap::from([("label".to_string(), vec![format!("{LABEL_RUN}={}", self.holder.run)])]);
        let volumes =
            self.docker().await?.list_volumes(Some(ListVolumesOptions { filters: Some(filters) })).await.map_err(|e| self.moby.fail("list volumes", e))?;
        Ok(volumes.volumes.unwrap_or_default().into_iter().map(|v| v.name).collect())
    }

    async fn drop_volume(&self, name: &str) {
        if let Ok(docker) = self.docker().await {
            // Gone already is as good as removed; anything else is retried at the next renewal.
            let _ = docker.remove_volume(name, None::<RemoveVolumeOptions>).await;
        }
    }

    /// The id of the container this Pipes runs in, if the engine runs it.
    async fn own_container(&self) -> Option<String> {
        let hostname = self.hostname.as_deref().filter(|_| self.in_container)?;
        let c = self.docker().await.ok()?.inspect_container(hostname, None).await.ok()?;
        (c.config?.hostname.as_deref() == Some(hostname)).then_some(c.id).flatten()
    }
}

//! Every layer merged: what a deployment runs with, and the hashes that tell
//! whether an instance was made from it.

use std::collections::BTreeMap;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::*;

/// Pipes' own defaults, the lowest layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Defaults {
    pub memory: ByteSize,
    pub cpus: f64,
    pub health_timeout: Duration,
    /// `PIPES_WATCH`: how often running deployments check their tag.
    pub watch: Option<Duration>,
    /// `PIPES_IDLE_ACTION`.
    pub idle_action: IdleAction,
    /// `PIPES_PAUSE_TIMEOUT`.
    pub pause_timeout: Duration,
    /// `PIPES_ACCESS`: the access of deployments whose layers name none.
    pub access: AccessConfig,
    /// `PIPES_NOINDEX`.
    pub noindex: bool,
    /// `PIPES_EXPIRE_AFTER`.
    pub expire_after: Option<Duration>,
}

/// Everything a deployment runs with, all layers merged.
#[derive(Debug, Clone, PartialEq)]
pub struct Effective {
    /// Set by a config; otherwise the image decides.
    pub port: Option<u16>,
    pub env: BTreeMap<String, String>,
    pub cmd: Option<Vec<String>>,
    pub memory: ByteSize,
    pub cpus: f64,
    pub health_path: String,
    pub health_timeout: Duration,
    pub idle_timeout: Option<Duration>,
    pub idle_action: IdleAction,
    pub pause_timeout: Duration,
    pub restart: Restart,
    pub pull: Pull,
    pub watch: Option<Duration>,
    pub pids: u32,
    /// Capabilities added to [`BASE_CAPABILITIES`].
    pub capabilities: Vec<String>,
    /// The services beside the app, by name.
    pub services: Vec<Service>,
    /// The app's volumes: volume name → mount path.
    pub volumes: BTreeMap<String, String>,
    /// Who may open it.
    pub access: AccessConfig,
    pub noindex: bool,
    /// The happenings sent as webhooks; `None`: all.
    pub notify: Option<Vec<String>>,
    /// How long it may go without a request before it is removed.
    pub expire_after: Option<Duration>,
}

impl Effective {
    /// Merges the tag's layer over the repository's over `defaults`.
    pub fn merge(tag: Option<&DeployConfig>, repository: Option<&DeployConfig>, defaults: &Defaults) -> Effective {
        let empty = DeployConfig::default();
        let c = tag.unwrap_or(&empty).over(repository.unwrap_or(&empty));
        let health = c.health.unwrap_or_default();
        Effective {
            port: c.port,
            env: c.env,
            cmd: c.cmd,
            memory: c.memory.unwrap_or(defaults.memory),
            cpus: c.cpus.unwrap_or(defaults.cpus),
            health_path: health.path.unwrap_or_else(|| "/".to_owned()),
            health_timeout: health.timeout.map_or(defaults.health_timeout, |s| s.0),
            idle_timeout: c.idle_timeout.map(|s| s.0),
            idle_action: c.idle_action.unwrap_or(defaults.idle_action),
            pause_timeout: c.pause_timeout.map_or(defaults.pause_timeout, |s| s.0),
            restart: c.restart.unwrap_or(Restart::No),
            pull: c.pull.unwrap_or(Pull::Missing),
            watch: match c.watch {
                Some(w) => w.interval(),
                None => defaults.watch,
            },
            pids: c.pids.unwrap_or(DEFAULT_PIDS),
            capabilities: c.capabilities.unwrap_or_default().iter().filter_map(|n| check_capability(n).ok()).collect(),
            services: c.services.iter().filter_map(|(name, s)| Service::merge(name, s, defaults.memory, defaults.cpus)).collect(),
            volumes: c.volumes,
            access: c.access.unwrap_or_else(|| defaults.access.clone()),
            noindex: c.noindex.unwrap_or(defaults.noindex),
            notify: c.notify,
            expire_after: c.expire_after.map_or(defaults.expire_after, Expiry::after),
        }
    }

    /// The service called `name`, if there is one.
    pub fn service(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.name == name)
    }

    /// The effective config as the API shows it, with the port the image chose.
    pub fn to_json(&self, port: Option<u16>) -> serde_json::Value {
        serde_json::json!({
            "port": self.port.or(port),
            "env": self.env,
            "cmd": self.cmd,
            "memory": ByteSize(self.memory.0).to_string(),
            "cpus": self.cpus,
            "health": { "path": self.health_path, "timeout": Span(self.health_timeout).to_string() },
            "idle_timeout": self.idle_timeout.map(|d| Span(d).to_string()),
            "idle_action": self.idle_action.as_str(),
            "pause_timeout": Span(self.pause_timeout).to_string(),
            "restart": self.restart.as_str(),
            "pull": match self.pull { Pull::Missing => "missing", Pull::Always => "always" },
            "watch": self.watch.map_or_else(|| "off".to_owned(), |d| Span(d).to_string()),
            "pids": self.pids,
            "capabilities": self.capabilities,
            "services": self.services.iter().map(|s| (s.name.clone(), s.to_json())).collect::<serde_json::Map<_, _>>(),
            "volumes": self.volumes,
            "access": self.access,
            "noindex": self.noindex,
            "notify": self.notify.as_deref().unwrap_or(&WEBHOOK_EVENTS.map(str::to_owned)[..]),
            "expire_after": self.expire_after.map_or_else(|| "never".to_owned(), |d| Span(d).to_string()),
        })
    }

    /// A short, stable hash of what the container is created from; a container
    /// whose label differs was made from another image reference or config.
    pub fn spec_hash(&self, image_ref: &str, port: u16) -> String {
        let mut h = Sha256::new();
        h.update(image_ref);
        h.update([0]);
        h.update(port.to_be_bytes());
        hash_map(&mut h, &self.env);
        for arg in self.cmd.iter().flatten() {
            h.update(arg);
            h.update([0]);
        }
        h.update([1]);
        h.update(self.memory.0.to_be_bytes());
        h.update(self.cpus.to_bits().to_be_bytes());
        h.update(self.restart.as_str());
        h.update(self.pids.to_be_bytes());
        for cap in &self.capabilities {
            h.update(cap);
            h.update([0]);
        }
        // Volumes and the deployment's own network (it has services) are
        // part of what a container is made with; hashed only when present,
        // so containers made before they existed keep their hash.
        if !self.volumes.is_empty() || !self.services.is_empty() {
            hash_map(&mut h, &self.volumes);
            h.update([!self.services.is_empty() as u8]);
        }
        short(h)
    }

    /// The hash of what a service's container is made from: another one
    /// means its config changed (a restart applies it).
    pub fn service_hash(&self, service: &Service, image_ref: &str) -> String {
        let mut h = Sha256::new();
        h.update(image_ref);
        h.update([0]);
        hash_map(&mut h, &service.env);
        for arg in service.cmd.iter().flatten() {
            h.update(arg);
            h.update([0]);
        }
        h.update([1]);
        hash_map(&mut h, &service.volumes);
        match &service.check {
            Check::Running => h.update([0]),
            Check::Tcp(port) => h.update(port.to_be_bytes()),
            Check::Cmd(cmd) => cmd.iter().for_each(|a| {
                h.update(a);
                h.update([2]);
            }),
        }
        h.update(service.memory.0.to_be_bytes());
        h.update(service.cpus.to_bits().to_be_bytes());
        h.update(service.pids.to_be_bytes());
        short(h)
    }

    /// A short, stable hash of everything this config makes an instance
    /// serve with: its spec ([`Effective::spec_hash`]) and what Pipes applies
    /// when it starts (probe, idle, pause, pulls, tag watching). An instance
    /// made with another is running an older config: a restart applies the
    /// change. Independent of how the API names or shows the fields.
    pub fn identity(&self, image_ref: &str, port: u16) -> String {
        let mut h = Sha256::new();
        h.update(self.spec_hash(image_ref, port));
        h.update([0]);
        h.update(&self.health_path);
        h.update([0]);
        h.update(self.health_timeout.as_nanos().to_be_bytes());
        h.update(self.idle_timeout.map_or(u128::MAX, |d| d.as_nanos()).to_be_bytes());
        h.update(self.idle_action.as_str());
        h.update([0]);
        h.update(self.pause_timeout.as_nanos().to_be_bytes());
        h.update([matches!(self.pull, Pull::Always) as u8]);
        h.update(self.watch.map_or(u128::MAX, |d| d.as_nanos()).to_be_bytes());
        short(h)
    }
}

/// Every key and value of `map`, each ended, and the map's end.
fn hash_map(h: &mut Sha256, map: &BTreeMap<String, String>) {
    for (k, v) in map {
        h.update(k);
        h.update([0]);
        h.update(v);
        h.update([0]);
    }
    h.update([1]);
}

/// The first 8 bytes of a hash, in hex: enough to tell configs apart.
fn short(h: Sha256) -> String {
    h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
}

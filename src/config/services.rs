//! Services beside a deployment: what users write (`services`, `volumes`),
//! how it is checked, and what a service runs with once merged.
//!
//! A service is a container of its own image on the deployment's own
//! network, reached by its name. Services start before the app, in the
//! order `depends_on` gives (in parallel where it gives none), and each is
//! ready when its health check passes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{check_cpus, check_memory, check_span, field_error, ByteSize, FieldError, Span, DEFAULT_PIDS, MIN_PIDS};
use crate::route::Deployment;

/// How long a service may take to become healthy unless its config says.
pub const SERVICE_HEALTH_TIMEOUT: Duration = Duration::from_secs(60);

/// One service as users write it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// `user/repo:tag`, pulled from `PIPES_REGISTRY` like a deployment's.
    pub image: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Arguments after the image's entrypoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// Volume name → mount path; the volume belongs to the deployment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub volumes: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<ServiceHealth>,
    /// Services that must be healthy before this one starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<ByteSize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u32>,
}

/// When a service counts as ready: a TCP port accepts, or a command run in
/// its container exits 0.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceHealth {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// How long it may take (default 60 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Span>,
}

/// A service's readiness check, merged.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Check {
    /// Ready once its container runs.
    Running,
    /// Ready once this port accepts a connection.
    Tcp(u16),
    /// Ready once this command, run in its container, exits 0.
    Cmd(Vec<String>),
}

/// A service with every default applied: what it runs with.
#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub name: String,
    pub image: Deployment,
    pub env: BTreeMap<String, String>,
    pub cmd: Option<Vec<String>>,
    pub volumes: BTreeMap<String, String>,
    pub check: Check,
    pub timeout: Duration,
    pub depends_on: Vec<String>,
    pub memory: ByteSize,
    pub cpus: f64,
    pub pids: u32,
}

impl Service {
    /// `config` (checked) with the operator's default memory and CPUs.
    pub(super) fn merge(name: &str, config: &ServiceConfig, memory: ByteSize, cpus: f64) -> Option<Service> {
        let health = config.health.clone().unwrap_or_default();
        Some(Service {
            name: name.to_owned(),
            image: Deployment::parse(&config.image)?,
            env: config.env.clone(),
            cmd: config.cmd.clone(),
            volumes: config.volumes.clone(),
            check: match (health.tcp, health.cmd) {
                (Some(port), _) => Check::Tcp(port),
                (None, Some(cmd)) => Check::Cmd(cmd),
                (None, None) => Check::Running,
            },
            timeout: health.timeout.map_or(SERVICE_HEALTH_TIMEOUT, |s| s.0),
            depends_on: config.depends_on.clone(),
            memory: config.memory.unwrap_or(memory),
            cpus: config.cpus.unwrap_or(cpus),
            pids: config.pids.unwrap_or(DEFAULT_PIDS),
        })
    }

    /// As the API shows it.
    pub fn to_json(&self) -> serde_json::Value {
        let health = match &self.check {
            Check::Running => serde_json::json!({ "timeout": Span(self.timeout).to_string() }),
            Check::Tcp(port) => serde_json::json!({ "tcp": port, "timeout": Span(self.timeout).to_string() }),
            Check::Cmd(cmd) => serde_json::json!({ "cmd": cmd, "timeout": Span(self.timeout).to_string() }),
        };
        serde_json::json!({
            "image": self.image.to_string(),
            "env": self.env,
            "cmd": self.cmd,
            "volumes": self.volumes,
            "health": health,
            "depends_on": self.depends_on,
            "memory": self.memory.to_string(),
            "cpus": self.cpus,
            "pids": self.pids,
        })
    }
}

/// Whether `name` is a DNS label: what the app resolves the service by.
pub(super) fn check_service_name(name: &str) -> Result<(), String> {
    let bytes = name.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 63
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-';
    if ok {
        Ok(())
    } else {
        Err(format!("'{name}' is not a DNS label: 1 to 63 of a-z, 0-9 and '-', not starting or ending with '-'"))
    }
}

/// Checks a `volumes` map: names the engine takes, absolute mount paths.
pub(super) fn check_volumes(field: &str, volumes: &BTreeMap<String, String>) -> Result<(), FieldError> {
    for (name, path) in volumes {
        let good_name = !name.is_empty()
            && name.len() <= 63
            && name.as_bytes()[0].is_ascii_alphanumeric()
            && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'));
        if !good_name {
            return Err(field_error(&format!("{field}.{name}"), "a volume name is 1 to 63 of a-z, 0-9, '_' and '-', starting with a letter or digit"));
        }
        if !path.starts_with('/') || path == "/" || path.contains(['\0', ',', ':']) || path.split('/').any(|p| p == "..") {
            return Err(field_error(&format!("{field}.{name}"), "a mount path is absolute, not '/', without '..', ',', ':' or NUL"));
        }
    }
    Ok(())
}

impl ServiceConfig {
    /// Checks the values serde cannot, naming fields under `services.{name}`.
    pub(super) fn validate(&self, name: &str) -> Result<(), FieldError> {
        let at = |field: &str| format!("services.{name}.{field}");
        check_service_name(name).map_err(|m| field_error(&format!("services.{name}"), m))?;
        if Deployment::parse(&self.image).is_none() || !self.image.contains(':') {
            return Err(field_error(&at("image"), format!("'{}' is not user/repo:tag", self.image)));
        }
        for (key, value) in &self.env {
            if key.is_empty() || key.contains(['=', '\0']) || value.contains('\0') {
                return Err(field_error(&at(&format!("env.{key}")), "a variable name is non-empty, without '=' or NUL; a value without NUL"));
            }
        }
        if self.cmd.as_ref().is_some_and(|c| c.is_empty() || c.iter().any(|a| a.contains('\0'))) {
            return Err(field_error(&at("cmd"), "give at least one argument without NUL, or leave cmd out"));
        }
        check_volumes(&at("volumes"), &self.volumes)?;
        if let Some(health) = &self.health {
            match (&health.tcp, &health.cmd) {
                (Some(_), Some(_)) => return Err(field_error(&at("health"), "give either tcp or cmd, not both")),
                (Some(0), _) => return Err(field_error(&at("health.tcp"), "must be from 1 to 65535")),
                (_, Some(cmd)) if cmd.is_empty() || cmd.iter().any(|a| a.contains('\0')) => {
                    return Err(field_error(&at("health.cmd"), "give at least one argument without NUL"))
                }
                _ => {}
            }
            check_span(&at("health.timeout"), health.timeout, Duration::from_millis(100))?;
        }
        if let Some(memory) = self.memory {
            check_memory(memory).map_err(|m| field_error(&at("memory"), m))?;
        }
        if let Some(cpus) = self.cpus {
            check_cpus(cpus).map_err(|m| field_error(&at("cpus"), m))?;
        }
        if self.pids.is_some_and(|p| p < MIN_PIDS) {
            return Err(field_error(&at("pids"), format!("must be at least {MIN_PIDS}")));
        }
        Ok(())
    }
}

/// Checks that every `depends_on` of `graph` (service name → the services
/// it depends on) names a service and that they form no cycle; the
/// services in waves: each wave's dependencies are all in earlier waves,
/// so a wave starts in parallel.
pub fn start_order<'a>(graph: &[(&'a str, &'a [String])]) -> Result<Vec<Vec<&'a str>>, FieldError> {
    for (name, deps) in graph {
        if let Some(dep) = deps.iter().find(|d| !graph.iter().any(|(n, _)| n == d)) {
            return Err(field_error(&format!("services.{name}.depends_on"), format!("'{dep}' is not a service of this deployment")));
        }
    }
    let mut placed: BTreeSet<&str> = BTreeSet::new();
    let mut waves = Vec::new();
    while placed.len() < graph.len() {
        let wave: Vec<&str> =
            graph.iter().filter(|(name, deps)| !placed.contains(name) && deps.iter().all(|d| placed.contains(d.as_str()))).map(|(name, _)| *name).collect();
        if wave.is_empty() {
            let left: Vec<&str> = graph.iter().map(|(n, _)| *n).filter(|n| !placed.contains(n)).collect();
            return Err(field_error("services", format!("depends_on makes a cycle among {}", left.join(", "))));
        }
        placed.extend(&wave);
        waves.push(wave);
    }
    Ok(waves)
}

/// [`start_order`] of a config's services, as written.
pub fn check_order(services: &BTreeMap<String, ServiceConfig>) -> Result<(), FieldError> {
    let graph: Vec<(&str, &[String])> = services.iter().map(|(n, s)| (n.as_str(), s.depends_on.as_slice())).collect();
    start_order(&graph).map(drop)
}

//! A deployment's configuration: what users write, how it is checked, and how
//! the layers merge.
//!
//! Effective config = per-tag config over per-repository default over Pipes'
//! defaults over what the image says. A layer sets only the fields it names;
//! `env` and `health` merge key by key.
//!
//! `values.rs` holds the kinds of value a field takes (sizes, durations,
//! policies) and their limits; `effective.rs` the merge of every layer into
//! what a deployment runs with.

mod access;
mod effective;
mod services;
#[cfg(test)]
mod tests;
mod values;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::PipesError;

pub use access::{AccessConfig, ForwardAuthConfig};
pub use effective::{Defaults, Effective};
pub use services::{check_order, start_order, Check, Service, ServiceConfig, ServiceHealth, SERVICE_HEALTH_TIMEOUT};
pub use values::*;

/// One layer of configuration, as stored and as sent to the API.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployConfig {
    /// Container port to proxy to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Environment variables of the container.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Command (arguments after the image's entrypoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// Memory limit: bytes, or a string such as `512m` or `1GiB`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<ByteSize>,
    /// CPU limit in cores, e.g. `0.5`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// Readiness probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
    /// Stop (or pause) the container after this long with nothing open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Span>,
    /// What an idle container becomes: `stop` or `pause`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_action: Option<IdleAction>,
    /// How long a paused container stays paused before it is stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_timeout: Option<Span>,
    /// The engine's restart policy for the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<Restart>,
    /// When to pull the image before creating a container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull: Option<Pull>,
    /// How often a running deployment asks the registry whether its tag moved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watch: Option<Watch>,
    /// Most processes (and threads) the container may run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u32>,
    /// Linux capabilities to add to the base set (`NET_RAW`, …), each one
    /// the operator allows (`PIPES_ALLOWED_CAPABILITIES`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Vec<String>>,
    /// Services beside the app (databases, caches), by name: each reached
    /// by its name on the deployment's own network.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub services: BTreeMap<String, ServiceConfig>,
    /// The app's volumes: volume name → mount path.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub volumes: BTreeMap<String, String>,
    /// Who may open the deployment; replaces a lower layer's whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<AccessConfig>,
    /// Whether answers carry `X-Robots-Tag: noindex, nofollow`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noindex: Option<bool>,
    /// Which happenings are sent as webhooks (`PIPES_WEBHOOK_URL`); all if unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<Vec<String>>,
    /// Remove the deployment (containers, services, volumes, tag config,
    /// images) after this long without a request: a duration, or `never`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire_after: Option<Expiry>,
}

/// The happenings webhooks tell, as `notify` names them.
pub const WEBHOOK_EVENTS: [&str; 9] = ["starting", "ready", "failed", "stopped", "paused", "redeployed", "rolled_back", "expired", "deleted"];

/// A field whose value is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

pub(crate) fn field_error(field: &str, message: impl Into<String>) -> FieldError {
    FieldError { field: field.to_owned(), message: message.into() }
}

impl DeployConfig {
    /// Parses a JSON body: 400 for bad JSON or an unknown field (naming it),
    /// 422 for a wrong type or value (naming the field).
    pub fn from_json(body: &[u8]) -> Result<DeployConfig, PipesError> {
        let mut de = serde_json::Deserializer::from_slice(body);
        let parsed: Result<DeployConfig, _> = serde_path_to_error::deserialize(&mut de);
        let config = parsed.map_err(|e| {
            let field = e.path().to_string();
            let inner = e.into_inner();
            let (line, column) = (inner.line(), inner.column());
            let message = strip_position(&inner.to_string());
            match inner.classify() {
                serde_json::error::Category::Data => match message.strip_prefix("unknown field `") {
                    Some(rest) => {
                        let name = rest.split('`').next().unwrap_or(rest);
                        let field = if field == "." || field.is_empty() {
                            name.to_owned()
                        } else {
                            // The path ends at the unknown field itself.
                            field.clone()
                        };
                        // serde names the field again; the error names it once.
                        let expected = rest.split_once("`, ").map_or("not a config field", |(_, expected)| expected);
                        PipesError::UnknownField { field, message: expected.to_owned() }
                    }
                    None => PipesError::InvalidField { field, message },
                },
                _ => PipesError::BadJson { message, line, column },
            }
        })?;
        // Anything after the object (`{} x`, `{}{}`) is malformed too.
        de.end().map_err(|e| PipesError::BadJson { message: strip_position(&e.to_string()), line: e.line(), column: e.column() })?;
        config.validate().map_err(|e| PipesError::InvalidField { field: e.field, message: e.message })?;
        Ok(config)
    }

    /// This layer without what takes effect without its instance (`access`,
    /// `noindex`, `notify`, `expire_after`): what an instance is made and run from.
    pub fn instance_fields(&self) -> DeployConfig {
        DeployConfig { access: None, noindex: None, notify: None, expire_after: None, ..self.clone() }
    }

    /// Checks the values serde cannot: ranges, paths, names.
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.port == Some(0) {
            return Err(field_error("port", "must be from 1 to 65535"));
        }
        for (key, value) in &self.env {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(field_error(&format!("env.{key}"), "a variable name is non-empty, without '=' or NUL"));
            }
            if value.contains('\0') {
                return Err(field_error(&format!("env.{key}"), "a value may not contain NUL"));
            }
        }
        if let Some(cmd) = &self.cmd {
            if cmd.is_empty() {
                return Err(field_error("cmd", "give at least one argument, or leave cmd out"));
            }
            if cmd.iter().any(|a| a.contains('\0')) {
                return Err(field_error("cmd", "an argument may not contain NUL"));
            }
        }
        if let Some(memory) = self.memory {
            check_memory(memory).map_err(|m| field_error("memory", m))?;
        }
        if let Some(cpus) = self.cpus {
            check_cpus(cpus).map_err(|m| field_error("cpus", m))?;
        }
        if let Some(health) = &self.health {
            if let Some(path) = &health.path {
                if !path.starts_with('/') || path.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
                    return Err(field_error("health.path", "must start with '/' and hold no spaces or control characters"));
                }
            }
            check_span("health.timeout", health.timeout, Duration::from_millis(100))?;
        }
        check_span("idle_timeout", self.idle_timeout, Duration::from_secs(1))?;
        check_span("pause_timeout", self.pause_timeout, Duration::from_secs(1))?;
        if let Some(Watch::Every(span)) = self.watch {
            check_span("watch", Some(span), MIN_WATCH)?;
        }
        if self.pids.is_some_and(|p| p < MIN_PIDS) {
            return Err(field_error("pids", format!("must be at least {MIN_PIDS}")));
        }
        for cap in self.capabilities.iter().flatten() {
            check_capability(cap).map_err(|m| field_error("capabilities", m))?;
        }
        for (name, service) in &self.services {
            service.validate(name)?;
        }
        services::check_volumes("volumes", &self.volumes)?;
        if let Some(access) = &self.access {
            access.validate()?;
        }
        for event in self.notify.iter().flatten() {
            if !WEBHOOK_EVENTS.contains(&event.as_str()) {
                return Err(field_error("notify", format!("'{event}' is no happening webhooks tell; they are {}", WEBHOOK_EVENTS.join(", "))));
            }
        }
        Ok(())
    }

    /// This layer over `lower`: fields set here win; `env`, `health`,
    /// `services` and `volumes` merge by key; `access` is replaced whole.
    pub fn over(&self, lower: &DeployConfig) -> DeployConfig {
        let health = match (&self.health, &lower.health) {
            (Some(h), Some(l)) => Some(Health { path: h.path.clone().or(l.path.clone()), timeout: h.timeout.or(l.timeout) }),
            (h, l) => h.clone().or(l.clone()),
        };
        DeployConfig {
            port: self.port.or(lower.port),
            env: merged(&lower.env, &self.env),
            cmd: self.cmd.clone().or(lower.cmd.clone()),
            memory: self.memory.or(lower.memory),
            cpus: self.cpus.or(lower.cpus),
            health,
            idle_timeout: self.idle_timeout.or(lower.idle_timeout),
            idle_action: self.idle_action.or(lower.idle_action),
            pause_timeout: self.pause_timeout.or(lower.pause_timeout),
            restart: self.restart.or(lower.restart),
            pull: self.pull.or(lower.pull),
            watch: self.watch.or(lower.watch),
            pids: self.pids.or(lower.pids),
            capabilities: self.capabilities.clone().or(lower.capabilities.clone()),
            // A service of a name is replaced whole; volumes merge by name.
            services: merged(&lower.services, &self.services),
            volumes: merged(&lower.volumes, &self.volumes),
            access: self.access.clone().or(lower.access.clone()),
            noindex: self.noindex.or(lower.noindex),
            notify: self.notify.clone().or(lower.notify.clone()),
            expire_after: self.expire_after.or(lower.expire_after),
        }
    }
}

/// `upper` over `lower`, key by key.
fn merged<V: Clone>(lower: &BTreeMap<String, V>, upper: &BTreeMap<String, V>) -> BTreeMap<String, V> {
    let mut all = lower.clone();
    all.extend(upper.iter().map(|(k, v)| (k.clone(), v.clone())));
    all
}

fn check_span(field: &str, span: Option<Span>, min: Duration) -> Result<(), FieldError> {
    match span {
        Some(span) => span.within(min, MAX_DURATION).map(drop).map_err(|m| field_error(field, m)),
        None => Ok(()),
    }
}

/// serde_json appends " at line L column C"; the position is reported apart.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

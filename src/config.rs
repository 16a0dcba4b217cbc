//! A deployment's configuration: what users write, how it is checked, and how
//! the layers merge.
//!
//! Effective config = per-tag config over per-repository default over Pipes'
//! defaults over what the image says. A layer sets only the fields it names;
//! `env` and `health` merge key by key.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::error::PipesError;

/// Docker refuses memory limits below 6 MiB.
const MIN_MEMORY: u64 = 6 << 20;
const MIN_CPUS: f64 = 0.01;
const MAX_CPUS: f64 = 1024.0;
const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);
/// Shortest interval between two digest checks of one tag.
pub const MIN_WATCH: Duration = Duration::from_secs(1);

/// A memory limit the engine honours, or why not. A value too large for the
/// engine's signed 64-bit field would otherwise become "no limit".
pub fn check_memory(size: ByteSize) -> Result<ByteSize, String> {
    if size.0 < MIN_MEMORY {
        Err("must be at least 6m (the engine's minimum)".into())
    } else if i64::try_from(size.0).is_err() {
        Err("is more than the engine can set; give a size such as 512m or 8g".into())
    } else {
        Ok(size)
    }
}

/// A CPU limit in cores the engine honours, or why not. The engine counts in
/// billionths of a core and reads 0 as "no limit"; it takes no less than 0.01.
pub fn check_cpus(cpus: f64) -> Result<f64, String> {
    if (MIN_CPUS..=MAX_CPUS).contains(&cpus) {
        Ok(cpus)
    } else {
        Err(format!("must be from {MIN_CPUS} to {MAX_CPUS}"))
    }
}

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
}

/// The capabilities every container keeps, all others dropped: what common
/// images need to start as root and step down (nginx, databases' entrypoints)
/// and to bind ports below 1024.
pub const BASE_CAPABILITIES: [&str; 7] = ["CHOWN", "DAC_OVERRIDE", "FOWNER", "KILL", "NET_BIND_SERVICE", "SETGID", "SETUID"];
/// Processes a container may run unless its config says otherwise.
pub const DEFAULT_PIDS: u32 = 512;
const MIN_PIDS: u32 = 16;

/// Whether `name` reads as a Linux capability (`NET_RAW`; `CAP_` may be left out).
pub fn check_capability(name: &str) -> Result<String, String> {
    let name = name.trim().to_ascii_uppercase();
    let name = name.strip_prefix("CAP_").unwrap_or(&name).to_owned();
    if !name.is_empty() && name.len() <= 32 && name.bytes().all(|b| b.is_ascii_uppercase() || b == b'_') {
        Ok(name)
    } else {
        Err(format!("'{name}' is not a capability name such as NET_RAW"))
    }
}

/// Whether and how often the tag is watched for a new digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watch {
    Off,
    Every(Span),
}

impl Watch {
    /// Parses `off` or a duration.
    pub fn parse(text: &str) -> Result<Watch, String> {
        match text.trim() {
            "off" => Ok(Watch::Off),
            t => Span::parse(t).map(Watch::Every).map_err(|_| format!("'{text}' is neither off nor a duration such as 30s or 5m")),
        }
    }

    /// The interval, if watching.
    pub fn interval(self) -> Option<Duration> {
        match self {
            Watch::Off => None,
            Watch::Every(span) => Some(span.0),
        }
    }
}

impl fmt::Display for Watch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Watch::Off => f.write_str("off"),
            Watch::Every(span) => span.fmt(f),
        }
    }
}

impl Serialize for Watch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Watch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = number_or_text(d, "\"off\" or a duration such as \"30s\"")?;
        Watch::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Readiness probe settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// Path probed with GET until it answers below 500.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// How long a starting container may take to answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Span>,
}

/// The engine's restart policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Restart {
    No,
    OnFailure,
    Always,
    UnlessStopped,
}

impl Restart {
    /// The engine's name of the policy.
    pub fn as_str(self) -> &'static str {
        match self {
            Restart::No => "no",
            Restart::OnFailure => "on-failure",
            Restart::Always => "always",
            Restart::UnlessStopped => "unless-stopped",
        }
    }
}

/// What an idle container becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdleAction {
    /// Stopped: its memory is freed; the next request starts it (hundreds of ms).
    Stop,
    /// Paused (cgroup freezer): its memory stays; the next request thaws it
    /// (tens of ms).
    Pause,
}

impl IdleAction {
    /// The name configs use.
    pub fn as_str(self) -> &'static str {
        match self {
            IdleAction::Stop => "stop",
            IdleAction::Pause => "pause",
        }
    }

    /// Parses `stop` or `pause`.
    pub fn parse(text: &str) -> Result<IdleAction, String> {
        match text.trim() {
            "stop" => Ok(IdleAction::Stop),
            "pause" => Ok(IdleAction::Pause),
            other => Err(format!("expected stop or pause, got '{other}'")),
        }
    }
}

/// When the image is pulled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Pull {
    /// Only when the engine does not have the image.
    Missing,
    /// Before every new container.
    Always,
}

/// A size in bytes, written as a number or with a unit (`512m`, `1.5g`, `256MiB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses `1024`, `512k`, `512m`, `1g`, `1.5g`, `256MiB`, `1GB` (binary units).
    pub fn parse(text: &str) -> Result<ByteSize, String> {
        let t = text.trim().to_ascii_lowercase();
        let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
        let (number, unit) = t.split_at(split);
        let factor: u64 = match unit.trim() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            "t" | "tb" | "tib" => 1 << 40,
            _ => return Err(format!("'{text}' is not a size: expected bytes or a number with k, m, g or t")),
        };
        let value: f64 = number.parse().map_err(|_| format!("'{text}' is not a size"))?;
        let bytes = value * factor as f64;
        if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
            return Err(format!("'{text}' is out of range"));
        }
        Ok(ByteSize(bytes.round() as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        for (unit, size) in [("g", 1u64 << 30), ("m", 1 << 20), ("k", 1 << 10)] {
            if b >= size && b.is_multiple_of(size) {
                return write!(f, "{}{unit}", b / size);
            }
        }
        write!(f, "{b}")
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = number_or_text(d, "a non-negative number of bytes or a string such as \"512m\"")?;
        ByteSize::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Reads a JSON number or string as text: both forms mean the same to `parse`.
fn number_or_text<'de, D: Deserializer<'de>>(d: D, expected: &str) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Number(u64),
        Text(String),
    }
    match Raw::deserialize(d).map_err(|_| serde::de::Error::custom(format!("expected {expected}")))? {
        Raw::Number(n) => Ok(n.to_string()),
        Raw::Text(t) => Ok(t),
    }
}

/// A duration, written as seconds or with units (`30s`, `1500ms`, `15m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Span(pub Duration);

impl Span {
    /// Parses a bare number of seconds or a humantime duration.
    pub fn parse(text: &str) -> Result<Span, String> {
        let t = text.trim();
        match t.parse::<u64>() {
            Ok(secs) => Ok(Span(Duration::from_secs(secs))),
            Err(_) => humantime::parse_duration(t).map(Span).map_err(|_| format!("'{text}' is not a duration: expected e.g. 30s, 1500ms or 15m")),
        }
    }
}

impl Span {
    /// The span if it lies within `min..=max`, else why not.
    pub fn within(self, min: Duration, max: Duration) -> Result<Span, String> {
        if self.0 < min || self.0 > max {
            Err(format!("must be from {} to {}", humantime::format_duration(min), humantime::format_duration(max)))
        } else {
            Ok(self)
        }
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl Serialize for Span {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = number_or_text(d, "seconds or a string such as \"30s\"")?;
        Span::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A field whose value is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

fn field_error(field: &str, message: impl Into<String>) -> FieldError {
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
        Ok(())
    }

    /// This layer over `lower`: fields set here win; `env` and `health` merge by key.
    pub fn over(&self, lower: &DeployConfig) -> DeployConfig {
        let mut env = lower.env.clone();
        env.extend(self.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        let health = match (&self.health, &lower.health) {
            (Some(h), Some(l)) => Some(Health { path: h.path.clone().or(l.path.clone()), timeout: h.timeout.or(l.timeout) }),
            (h, l) => h.clone().or(l.clone()),
        };
        DeployConfig {
            port: self.port.or(lower.port),
            env,
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
        }
    }
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
        }
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
        })
    }

    /// A short, stable hash of what the container is created from; a container
    /// whose label differs was made from another image reference or config.
    pub fn spec_hash(&self, image_ref: &str, port: u16) -> String {
        let mut h = Sha256::new();
        h.update(image_ref);
        h.update([0]);
        h.update(port.to_be_bytes());
        for (k, v) in &self.env {
            h.update(k);
            h.update([0]);
            h.update(v);
            h.update([0]);
        }
        h.update([1]);
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
        h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Defaults {
        Defaults {
            memory: ByteSize(512 << 20),
            cpus: 1.0,
            health_timeout: Duration::from_secs(60),
            watch: None,
            idle_action: IdleAction::Stop,
            pause_timeout: Duration::from_secs(3600),
        }
    }

    /// The status and the field named (if any) of the answer to `body`.
    fn status(body: &str) -> (u16, String) {
        match DeployConfig::from_json(body.as_bytes()) {
            Ok(_) => (200, String::new()),
            Err(e @ (PipesError::UnknownField { .. } | PipesError::InvalidField { .. })) => {
                let field = match &e {
                    PipesError::UnknownField { field, .. } | PipesError::InvalidField { field, .. } => field.clone(),
                    _ => unreachable!(),
                };
                (e.status(), field)
            }
            Err(e) => (e.status(), e.to_string()),
        }
    }

    #[test]
    fn a_full_config_round_trips() {
        let body = r#"{"port":8080,"env":{"A":"1"},"cmd":["serve","--fast"],"memory":"256m","cpus":0.5,
            "health":{"path":"/healthz","timeout":"30s"},"idle_timeout":"15m","restart":"on-failure","pull":"always",
            "watch":"30s"}"#;
        let c = DeployConfig::from_json(body.as_bytes()).unwrap();
        assert_eq!(c.memory, Some(ByteSize(256 << 20)));
        assert_eq!(c.idle_timeout, Some(Span(Duration::from_secs(900))));
        let again = DeployConfig::from_json(&serde_json::to_vec(&c).unwrap()).unwrap();
        assert_eq!(again, c);
        assert_eq!(DeployConfig::from_json(b"{}").unwrap(), DeployConfig::default());
    }

    #[test]
    fn bad_json_is_400_with_its_position() {
        let e = DeployConfig::from_json(b"{\n  \"port\": 80,\n  oops\n}").unwrap_err();
        assert_eq!(e.status(), 400);
        match e {
            PipesError::BadJson { line, column, .. } => assert_eq!((line, column), (3, 3)),
            other => panic!("{other}"),
        }
        assert_eq!(status("").0, 400);
        assert_eq!(status("{} x").0, 400, "trailing input");
        assert_eq!(status("{}{}").0, 400, "two objects");
        assert_eq!(status("{} \n").0, 200, "trailing white space is fine");
        assert_eq!(status("[1,2]").0, 422, "a JSON array is valid JSON of the wrong type");
    }

    #[test]
    fn unknown_fields_are_400_and_named() {
        let (code, body) = status(r#"{"port":80,"colour":"red"}"#);
        assert_eq!(code, 400);
        assert_eq!(body, "colour");
        let (code, body) = status(r#"{"health":{"path":"/","interval":"1s"}}"#);
        assert_eq!(code, 400);
        assert!(body.contains("interval"), "{body}");
        let message = DeployConfig::from_json(br#"{"colour":"red"}"#).unwrap_err().to_string();
        assert!(message.starts_with("unknown field 'colour': expected one of `port`"), "{message}");
        assert_eq!(message.matches("colour").count(), 1, "{message}");
    }

    #[test]
    fn wrong_types_and_values_are_422_and_named() {
        for (body, field) in [
            (r#"{"port":"eighty"}"#, "port"),
            (r#"{"port":70000}"#, "port"),
            (r#"{"port":0}"#, "port"),
            (r#"{"memory":-5}"#, "memory"),
            (r#"{"memory":"lots"}"#, "memory"),
            (r#"{"memory":"1k"}"#, "memory"),
            (r#"{"cpus":0}"#, "cpus"),
            (r#"{"cpus":-1}"#, "cpus"),
            (r#"{"cpus":1e-300}"#, "cpus"),
            (r#"{"cpus":2000}"#, "cpus"),
            (r#"{"memory":"9000000t"}"#, "memory"),
            (r#"{"memory":"18446744073709551615"}"#, "memory"),
            (r#"{"idle_timeout":"soon"}"#, "idle_timeout"),
            (r#"{"health":{"timeout":"1ms"}}"#, "health.timeout"),
            (r#"{"health":{"path":"healthz"}}"#, "health.path"),
            (r#"{"restart":"sometimes"}"#, "restart"),
            (r#"{"env":{"A":1}}"#, "env.A"),
            (r#"{"env":{"A=B":"1"}}"#, "env.A=B"),
            (r#"{"cmd":[]}"#, "cmd"),
            (r#"{"watch":"sometimes"}"#, "watch"),
            (r#"{"watch":"10ms"}"#, "watch"),
            (r#"{"pids":3}"#, "pids"),
            (r#"{"pids":-1}"#, "pids"),
            (r#"{"capabilities":["net raw"]}"#, "capabilities"),
        ] {
            let (code, json) = status(body);
            assert_eq!(code, 422, "{body}: {json}");
            assert_eq!(json, field, "{body}");
        }
    }

    #[test]
    fn layers_merge_field_by_field() {
        let repo = DeployConfig::from_json(br#"{"env":{"A":"repo","B":"repo"},"memory":"1g","health":{"path":"/up"}}"#).unwrap();
        let tag = DeployConfig::from_json(br#"{"env":{"B":"tag"},"cpus":2,"health":{"timeout":"5s"}}"#).unwrap();
        let e = Effective::merge(Some(&tag), Some(&repo), &defaults());
        assert_eq!(e.env.get("A").unwrap(), "repo");
        assert_eq!(e.env.get("B").unwrap(), "tag");
        assert_eq!(e.memory, ByteSize(1 << 30));
        assert_eq!(e.cpus, 2.0);
        assert_eq!(e.health_path, "/up");
        assert_eq!(e.health_timeout, Duration::from_secs(5));
        let none = Effective::merge(None, None, &defaults());
        assert_eq!(none.memory, ByteSize(512 << 20));
        assert_eq!(none.health_path, "/");
        assert_eq!(none.pull, Pull::Missing);
        assert_eq!(none.watch, None);
        let watched = Defaults { watch: Some(Duration::from_secs(60)), ..defaults() };
        assert_eq!(Effective::merge(None, None, &watched).watch, Some(Duration::from_secs(60)));
        let off = DeployConfig::from_json(br#"{"watch":"off"}"#).unwrap();
        assert_eq!(Effective::merge(Some(&off), None, &watched).watch, None, "off wins over PIPES_WATCH");
    }

    #[test]
    fn spec_hash_follows_what_makes_the_container() {
        let base = Effective::merge(None, None, &defaults());
        let h = base.spec_hash("a/b:c", 80);
        assert_eq!(h.len(), 16);
        assert_eq!(h, base.spec_hash("a/b:c", 80));
        assert_ne!(h, base.spec_hash("a/b:c", 81));
        let mut env = base.clone();
        env.env.insert("X".into(), "1".into());
        assert_ne!(h, env.spec_hash("a/b:c", 80));
        let mut idle = base.clone();
        idle.idle_timeout = Some(Duration::from_secs(5));
        assert_eq!(h, idle.spec_hash("a/b:c", 80), "idle time does not change the container");
    }

    #[test]
    fn sizes_read_and_print() {
        assert_eq!(ByteSize::parse("512m").unwrap(), ByteSize(512 << 20));
        assert_eq!(ByteSize::parse("1.5g").unwrap(), ByteSize(3 << 29));
        assert_eq!(ByteSize::parse("256MiB").unwrap(), ByteSize(256 << 20));
        assert_eq!(ByteSize::parse("1000").unwrap(), ByteSize(1000));
        assert!(ByteSize::parse("-1m").is_err());
        assert_eq!(ByteSize(512 << 20).to_string(), "512m");
        assert_eq!(ByteSize(1 << 30).to_string(), "1g");
    }
}

//! The kinds of value a config field takes, how each is written, and the
//! limits the engine honours.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Docker refuses memory limits below 6 MiB.
pub(super) const MIN_MEMORY: u64 = 6 << 20;
pub(super) const MIN_CPUS: f64 = 0.01;
pub(super) const MAX_CPUS: f64 = 1024.0;
pub(super) const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);
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

/// The capabilities every container keeps, all others dropped: what common
/// images need to start as root and step down (nginx, databases' entrypoints)
/// and to bind ports below 1024.
pub const BASE_CAPABILITIES: [&str; 7] = ["CHOWN", "DAC_OVERRIDE", "FOWNER", "KILL", "NET_BIND_SERVICE", "SETGID", "SETUID"];
/// Processes a container may run unless its config says otherwise.
pub const DEFAULT_PIDS: u32 = 512;
pub(super) const MIN_PIDS: u32 = 16;

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

/// When a deployment no request reached is removed: `never`, or after a while.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    Never,
    After(Span),
}

/// The longest `expire_after`: a year.
pub const MAX_EXPIRY: Duration = Duration::from_secs(366 * 24 * 3600);

impl Expiry {
    /// Parses `never` or a duration from 1 s to a year.
    pub fn parse(text: &str) -> Result<Expiry, String> {
        match text.trim() {
            "never" => Ok(Expiry::Never),
            t => Span::parse(t)
                .and_then(|s| s.within(Duration::from_secs(1), MAX_EXPIRY))
                .map(Expiry::After)
                .map_err(|_| format!("'{text}' is neither never nor a duration from 1s to 366d such as 14d")),
        }
    }

    /// How long, unless never.
    pub fn after(self) -> Option<Duration> {
        match self {
            Expiry::Never => None,
            Expiry::After(span) => Some(span.0),
        }
    }
}

impl fmt::Display for Expiry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expiry::Never => f.write_str("never"),
            Expiry::After(span) => span.fmt(f),
        }
    }
}

impl Serialize for Expiry {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Expiry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = number_or_text(d, "\"never\" or a duration such as \"14d\"")?;
        Expiry::parse(&text).map_err(serde::de::Error::custom)
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

//! Where settings come from besides flags: the environment (with its
//! `NAME_FILE` layer) and facts of the machine.

use std::collections::HashMap;

use super::*;

/// Where settings come from besides flags: the environment and the machine.
#[derive(Debug)]
pub struct Sources {
    pub env: HashMap<String, String>,
    /// This machine's host name: a container's id when Pipes runs in one.
    pub hostname: Option<String>,
    /// Whether `/.dockerenv` exists.
    pub in_container: bool,
    /// The soft limit on open files.
    pub open_files: Option<u64>,
    /// The host's memory in bytes.
    pub memory: Option<u64>,
    /// The host's CPUs.
    pub cpus: usize,
}

impl Default for Sources {
    /// No environment, and a machine of 8 GiB and 2 CPUs.
    fn default() -> Self {
        Sources { env: HashMap::new(), hostname: None, in_container: false, open_files: None, memory: Some(8 << 30), cpus: 2 }
    }
}

impl Sources {
    /// The process environment, host name, and whether `/.dockerenv` exists.
    pub fn from_process() -> Self {
        Sources {
            env: std::env::vars().collect(),
            hostname: std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_owned()).filter(|h| !h.is_empty()),
            in_container: std::path::Path::new("/.dockerenv").exists(),
            open_files: crate::host::open_files_limit(),
            memory: std::fs::read_to_string("/proc/meminfo").ok().and_then(|info| {
                let kib: u64 = info.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.split_whitespace().next()?.parse().ok()?;
                kib.checked_mul(1024)
            }),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }

    /// `NAME`, else the contents of the file `NAME_FILE` names (trailing
    /// newline dropped); empty counts as unset.
    pub(super) fn value(&self, name: &str) -> Result<Option<String>, SettingError> {
        let file_var = format!("{name}_FILE");
        let set = |n: &str| self.env.get(n).filter(|v| !v.trim().is_empty());
        match (set(name), set(&file_var)) {
            (Some(_), Some(_)) => Err(err(name, format!("set either {name} or {file_var}, not both"))),
            (Some(value), None) => Ok(Some(value.clone())),
            (None, Some(path)) => match std::fs::read_to_string(path) {
                Ok(text) => Ok(Some(text.trim_end_matches(['\n', '\r']).to_owned()).filter(|v| !v.trim().is_empty())),
                Err(e) => Err(err(name, format!("{file_var}={path} cannot be read: {e}"))),
            },
            (None, None) => Ok(None),
        }
    }
}

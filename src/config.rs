//! The daemon's configuration: TOML with built-in defaults, validated once at start.
//!
//! Every key is optional; unknown keys and bad values are rejected naming the key and the
//! line. The engine receives these typed values, never TOML. `config/blocksnap.toml` in the
//! repository mirrors `Config::default()`.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/blocksnap/blocksnap.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("Cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("Invalid config file {path}: `{key}`{line}: {message}")]
    Value {
        path: PathBuf,
        key: String,
        line: String,
        message: String,
    },
}

/// How a volume is exposed to the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Loop,
    Nbd,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Loop => "loop",
            Backend::Nbd => "nbd",
        }
    }
    pub fn parse(s: &str) -> Option<Backend> {
        match s {
            "loop" => Some(Backend::Loop),
            "nbd" => Some(Backend::Nbd),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Zone name reported as `zone_id`; a `-z` given to the control command must equal it.
    pub zone: String,
    /// Where volumes' backing images, the catalog and (by default) the store live.
    pub state_dir: PathBuf,
    /// The control socket.
    pub socket: PathBuf,
    /// Octal permission bits of the control socket.
    pub socket_mode: String,
    /// Group owning the control socket.
    pub socket_group: String,
    /// Members may call every verb ("" = root only).
    pub admin_group: String,
    /// Members may call `describe-*` only ("" = nobody).
    pub reader_group: String,
    pub default_backend: Backend,
    pub store: StoreConfig,
    pub limits: Limits,
    pub nbd: NbdConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// The snapshot store directory ("" = `<state_dir>/store`).
    pub path: PathBuf,
    /// Change-tracking and record granularity for new chains (power of two, 4K..4M).
    pub block_size: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub snapshots_per_volume: u32,
    pub max_chain_length: u32,
    /// Seconds writers may be held at most; past it the daemon thaws and fails the job.
    pub freeze_timeout: f64,
    pub max_concurrent_jobs: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NbdConfig {
    /// The NBD server's unix socket ("" = `nbd.sock` beside the control socket).
    pub socket: PathBuf,
    /// Optional TCP listen address, loopback only (e.g. "127.0.0.1:10809"; "" = off).
    pub tcp: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// error, warn, info, debug or trace.
    pub level: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            zone: "local".into(),
            state_dir: PathBuf::from("/var/lib/blocksnap"),
            socket: PathBuf::from("/run/blocksnap/blocksnap.sock"),
            socket_mode: "0660".into(),
            socket_group: "root".into(),
            admin_group: String::new(),
            reader_group: String::new(),
            default_backend: Backend::Loop,
            store: StoreConfig::default(),
            limits: Limits::default(),
            nbd: NbdConfig::default(),
            log: LogConfig::default(),
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: PathBuf::new(),
            block_size: "16K".into(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            snapshots_per_volume: 15,
            max_chain_length: 32,
            freeze_timeout: 10.0,
            max_concurrent_jobs: 4,
        }
    }
}

impl Default for NbdConfig {
    fn default() -> Self {
        NbdConfig {
            socket: PathBuf::new(),
            tcp: String::new(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
        }
    }
}

impl Config {
    /// Loads `path`; a missing file at the default path means built-in defaults.
    pub fn load(path: &Path, explicit: bool) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(Config::default())
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.into(),
                    source,
                })
            }
        };
        Config::parse(&text, path)
    }

    /// Parses and validates TOML text; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        config.validate(text, path)?;
        Ok(config)
    }

    /// Checks the values serde cannot: ranges, formats, groups' names.
    fn validate(&self, text: &str, path: &Path) -> Result<(), ConfigError> {
        let fail = |key: &str, message: String| {
            let leaf = key.rsplit('.').next().unwrap_or(key);
            let line = text
                .lines()
                .position(|l| {
                    let l = l.trim_start();
                    l.strip_prefix(leaf)
                        .is_some_and(|rest| rest.trim_start().starts_with('='))
                })
                .map(|n| format!(" (line {})", n + 1))
                .unwrap_or_default();
            Err(ConfigError::Value {
                path: path.into(),
                key: key.into(),
                line,
                message,
            })
        };
        if self.zone.is_empty() || self.zone.len() > 64 {
            return fail("zone", "must be 1 to 64 characters".into());
        }
        if !self.state_dir.is_absolute() {
            return fail(
                "state_dir",
                format!("{:?} must be an absolute path", self.state_dir),
            );
        }
        if !self.socket.is_absolute() {
            return fail(
                "socket",
                format!("{:?} must be an absolute path", self.socket),
            );
        }
        if self.socket_mode_bits().is_none() {
            return fail(
                "socket_mode",
                format!(
                    "{:?} is not an octal mode such as \"0660\"",
                    self.socket_mode
                ),
            );
        }
        if !self.store.path.as_os_str().is_empty() && !self.store.path.is_absolute() {
            return fail(
                "store.path",
                format!("{:?} must be an absolute path", self.store.path),
            );
        }
        if let Err(message) = self.block_size_bytes() {
            return fail("store.block_size", message);
        }
        if self.limits.snapshots_per_volume == 0 || self.limits.snapshots_per_volume > 10_000 {
            return fail(
                "limits.snapshots_per_volume",
                "must be between 1 and 10000".into(),
            );
        }
        if self.limits.max_chain_length == 0 || self.limits.max_chain_length > 1_000 {
            return fail(
                "limits.max_chain_length",
                "must be between 1 and 1000".into(),
            );
        }
        if !(self.limits.freeze_timeout > 0.0 && self.limits.freeze_timeout <= 600.0) {
            return fail(
                "limits.freeze_timeout",
                "must be more than 0 and at most 600 seconds".into(),
            );
        }
        if self.limits.max_concurrent_jobs == 0 || self.limits.max_concurrent_jobs > 256 {
            return fail(
                "limits.max_concurrent_jobs",
                "must be between 1 and 256".into(),
            );
        }
        if !self.nbd.socket.as_os_str().is_empty() && !self.nbd.socket.is_absolute() {
            return fail(
                "nbd.socket",
                format!("{:?} must be an absolute path", self.nbd.socket),
            );
        }
        if !self.nbd.tcp.is_empty() {
            match self.nbd.tcp.parse::<std::net::SocketAddr>() {
                Ok(a) if a.ip().is_loopback() => {}
                Ok(_) => {
                    return fail(
                        "nbd.tcp",
                        format!("{} is not a loopback address", self.nbd.tcp),
                    )
                }
                Err(_) => {
                    return fail(
                        "nbd.tcp",
                        format!(
                            "{:?} is not an address such as \"127.0.0.1:10809\"",
                            self.nbd.tcp
                        ),
                    )
                }
            }
        }
        if !["error", "warn", "info", "debug", "trace"].contains(&self.log.level.as_str()) {
            return fail(
                "log.level",
                format!(
                    "{:?} is not one of error, warn, info, debug, trace",
                    self.log.level
                ),
            );
        }
        Ok(())
    }

    pub fn socket_mode_bits(&self) -> Option<u32> {
        let m = u32::from_str_radix(self.socket_mode.trim_start_matches("0o"), 8).ok()?;
        (m <= 0o777).then_some(m)
    }

    /// The store's block size in bytes.
    pub fn block_size_bytes(&self) -> Result<u32, String> {
        let b = crate::api::parse_size(&self.store.block_size)?;
        if !(4096..=4 << 20).contains(&b) || !b.is_power_of_two() {
            return Err(format!(
                "{:?} must be a power of two from 4K to 4M",
                self.store.block_size
            ));
        }
        Ok(b as u32)
    }

    pub fn store_path(&self) -> PathBuf {
        if self.store.path.as_os_str().is_empty() {
            self.state_dir.join("store")
        } else {
            self.store.path.clone()
        }
    }

    pub fn nbd_socket_path(&self) -> PathBuf {
        if self.nbd.socket.as_os_str().is_empty() {
            self.socket.with_file_name("nbd.sock")
        } else {
            self.nbd.socket.clone()
        }
    }

    /// The effective configuration as TOML (for `--check-config`).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn empty_file_is_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
    }

    #[test]
    fn defaults_round_trip_through_toml() {
        let c = Config::default();
        assert_eq!(parse(&c.to_toml()).unwrap(), c);
    }

    #[test]
    fn unknown_keys_are_named_with_their_line() {
        let e = parse("zone = \"a\"\n\n[limits]\nsnapshot_quota = 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("snapshot_quota") && e.contains("line 4"), "{e}");
    }

    #[test]
    fn bad_values_are_named_with_their_line() {
        let e = parse("[limits]\nsnapshots_per_volume = 0\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("limits.snapshots_per_volume") && e.contains("line 2"),
            "{e}"
        );
        let e = parse("[store]\nblock_size = \"3K\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("store.block_size"), "{e}");
        let e = parse("[limits]\nfreeze_timeout = \"ten\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("freeze_timeout"), "{e}");
        let e = parse("[nbd]\ntcp = \"0.0.0.0:10809\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("loopback"), "{e}");
        let e = parse("socket_mode = \"rw\"\n").unwrap_err().to_string();
        assert!(e.contains("socket_mode"), "{e}");
    }
}

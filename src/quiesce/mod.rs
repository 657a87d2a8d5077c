//! quiesce: making a volume's filesystems consistent for a snapshot, and finding who writes.
//!
//! `mountinfo` finds the filesystems mounted from a device, `writers` the processes that hold
//! it open for writing ([`device_use`] gives both), and `freeze` freezes a set of
//! filesystems (once per superblock, inner before outer, journalled before each freeze,
//! never one that holds a protected path) with a watchdog that thaws at `freeze_timeout`;
//! [`thaw_recorded`] undoes at start what a previous run journalled. Every kernel call goes
//! through `crate::sys`; there is no `unsafe` here.

mod devices;
mod freeze;
mod mountinfo;
mod writers;

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use devices::{stat_dev, stat_rdev, DevId};
pub use freeze::{thaw_recorded, FreezeSet, SetThawHandle, Watchdog};
pub use mountinfo::{mounts_of_device, parse_mountinfo, read_mountinfo, Mount};
pub use writers::{open_writers, ProcessInfo};

use crate::api::ErrorKind;
use crate::sys::blkdev::BlkdevError;
use crate::sys::freeze::FreezeError;

/// Errors of mount discovery, the writer scan and freezing.
#[derive(Debug, thiserror::Error)]
pub enum QuiesceError {
    #[error("Cannot read {path}")]
    ReadMountinfo {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Malformed mountinfo line {line}: {reason}")]
    ParseMountinfo { line: usize, reason: &'static str },
    #[error("Cannot look up the device of {path}")]
    Device {
        path: PathBuf,
        #[source]
        source: BlkdevError,
    },
    #[error("{path} is not a block device")]
    NotBlockDevice { path: PathBuf },
    #[error("Cannot scan {path} for open descriptors")]
    ScanProc {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot open mount point {mountpoint}")]
    OpenMountpoint {
        mountpoint: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Mount point {mountpoint} is covered by another mount: the filesystem of device {device} cannot be reached there")]
    Shadowed { mountpoint: PathBuf, device: DevId },
    #[error("Cannot open protected path {path}")]
    OpenProtected {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Refusing to freeze the filesystem at {mountpoint}: it holds {protected}")]
    Protected {
        mountpoint: PathBuf,
        protected: PathBuf,
    },
    #[error("Cannot record {mountpoint} as frozen, so it was not frozen")]
    Journal {
        mountpoint: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("The {fstype} filesystem at {mountpoint} cannot be frozen: only a crash-consistent snapshot is possible")]
    NotSupported {
        mountpoint: PathBuf,
        fstype: String,
        #[source]
        source: FreezeError,
    },
    #[error("The filesystem at {mountpoint} is already frozen by someone else")]
    AlreadyFrozen {
        mountpoint: PathBuf,
        #[source]
        source: FreezeError,
    },
    #[error("Cannot freeze the filesystem at {mountpoint}")]
    Freeze {
        mountpoint: PathBuf,
        #[source]
        source: FreezeError,
    },
    #[error("Cannot thaw: {}", list(.failures))]
    Thaw { failures: Vec<FreezeError> },
    #[error("{cause}; thawing what was already frozen failed too: {}", list(.thaw))]
    ThawFailed {
        #[source]
        cause: Box<QuiesceError>,
        thaw: Vec<FreezeError>,
    },
    #[error("{device} is not mounted but is open for writing by {}: only a crash-consistent snapshot is possible", list_processes(.writers))]
    OpenForWriting {
        device: PathBuf,
        writers: Vec<ProcessInfo>,
    },
    #[error("Filesystems stayed frozen past freeze_timeout ({} ms): the watchdog thawed them after {} ms, so the snapshot is not consistent", .timeout.as_millis(), .held.as_millis())]
    WatchdogFired { timeout: Duration, held: Duration },
}

fn list_processes(writers: &[ProcessInfo]) -> String {
    writers
        .iter()
        .map(ProcessInfo::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn list(errors: &[FreezeError]) -> String {
    errors
        .iter()
        .map(|e| match std::error::Error::source(e) {
            Some(s) => format!("{e}: {s}"),
            None => e.to_string(),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

impl QuiesceError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            QuiesceError::ReadMountinfo { .. }
            | QuiesceError::ScanProc { .. }
            | QuiesceError::OpenProtected { .. }
            | QuiesceError::Journal { .. } => ErrorKind::Io,
            QuiesceError::ParseMountinfo { .. }
            | QuiesceError::Thaw { .. }
            | QuiesceError::ThawFailed { .. } => ErrorKind::Internal,
            QuiesceError::Device { source, .. } => source.kind(),
            QuiesceError::NotBlockDevice { .. } | QuiesceError::Protected { .. } => {
                ErrorKind::InvalidArgument
            }
            QuiesceError::OpenMountpoint { source, .. } => match source.kind() {
                io::ErrorKind::NotFound => ErrorKind::NotFound,
                io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
                _ => ErrorKind::Io,
            },
            QuiesceError::Shadowed { .. }
            | QuiesceError::AlreadyFrozen { .. }
            | QuiesceError::OpenForWriting { .. } => ErrorKind::Busy,
            QuiesceError::NotSupported { .. } | QuiesceError::WatchdogFired { .. } => {
                ErrorKind::Unavailable
            }
            QuiesceError::Freeze { source, .. } => source.kind(),
        }
    }

    /// True when freezing is impossible here and a crash-consistent snapshot is the fallback.
    pub fn is_not_supported(&self) -> bool {
        matches!(self, QuiesceError::NotSupported { .. })
    }
}

/// How a block device is in use: the filesystems mounted from it and the processes (other
/// than this one) holding it open for writing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceUse {
    pub mounts: Vec<Mount>,
    pub writers: Vec<ProcessInfo>,
}

/// Looks up how `device` is in use right now.
pub fn device_use(device: &Path) -> Result<DeviceUse, QuiesceError> {
    let id = stat_rdev(device)?;
    Ok(DeviceUse {
        mounts: mounts_of_device(id.major, id.minor)?,
        writers: open_writers(device)?,
    })
}

impl DeviceUse {
    /// For a device that is not mounted: refuses ([`QuiesceError::OpenForWriting`], naming
    /// the processes) if anyone holds it open for writing.
    pub fn ensure_no_writers(&self, device: &Path) -> Result<(), QuiesceError> {
        if self.writers.is_empty() {
            Ok(())
        } else {
            Err(QuiesceError::OpenForWriting {
                device: device.to_path_buf(),
                writers: self.writers.clone(),
            })
        }
    }
}

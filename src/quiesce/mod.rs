//! TEMP STUB
#![allow(dead_code, unused_variables)]
use crate::api::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::Duration;
pub struct Mount {
    pub mountpoint: PathBuf,
}
pub struct ProcessInfo {
    pub pid: i32,
    pub name: String,
}
#[derive(Debug, thiserror::Error)]
#[error("stub")]
pub struct QuiesceError;
impl QuiesceError {
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::Internal
    }
    pub fn is_not_supported(&self) -> bool {
        false
    }
}
pub fn mounts_of_device(major: u32, minor: u32) -> Result<Vec<Mount>, QuiesceError> {
    Ok(vec![])
}
pub fn open_writers(device: &Path) -> Result<Vec<ProcessInfo>, QuiesceError> {
    Ok(vec![])
}
pub fn thaw_path(p: &Path) -> Result<bool, QuiesceError> {
    Ok(false)
}
pub struct FreezeSet;
pub struct ThawHandle;
pub struct Watchdog;
impl FreezeSet {
    pub fn freeze(
        m: &[Mount],
        p: &[PathBuf],
        j: &mut dyn FnMut(&Path) -> std::io::Result<()>,
    ) -> Result<FreezeSet, QuiesceError> {
        Ok(FreezeSet)
    }
    pub fn thaw(self) -> Result<Duration, QuiesceError> {
        Ok(Duration::ZERO)
    }
    pub fn thaw_handle(&self) -> ThawHandle {
        ThawHandle
    }
    pub fn mountpoints(&self) -> Vec<PathBuf> {
        vec![]
    }
}
impl Watchdog {
    pub fn start(h: ThawHandle, t: Duration) -> Watchdog {
        Watchdog
    }
    pub fn stop(self) -> bool {
        false
    }
}

//! Device numbers of paths: the block device a node stands for (`st_rdev`) and the
//! filesystem a path lives on (`st_dev`).

use std::path::Path;

use super::QuiesceError;
use crate::sys::blkdev::{self, BlkdevError};

pub use crate::sys::blkdev::DevId;

/// The major:minor of the block device node at `path` (following symlinks).
pub fn stat_rdev(path: &Path) -> Result<DevId, QuiesceError> {
    blkdev::rdev_of(path).map_err(|source| match source {
        BlkdevError::NotBlockDevice { path } => QuiesceError::NotBlockDevice { path },
        source => QuiesceError::Device {
            path: path.to_path_buf(),
            source,
        },
    })
}

/// The major:minor of the filesystem holding `path` (following symlinks).
pub fn stat_dev(path: &Path) -> Result<DevId, QuiesceError> {
    blkdev::dev_of(path).map_err(|source| QuiesceError::Device {
        path: path.to_path_buf(),
        source,
    })
}

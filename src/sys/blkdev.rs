//! Block devices: size (BLKGETSIZE64), logical sector size (BLKSSZGET), buffer flush
//! (BLKFLSBUF), and device numbers (`DevId`, from `st_rdev`/`st_dev`).

use std::fmt;
use std::fs;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::api::ErrorKind;

// BLKGETSIZE64 is _IOR(0x12, 114, size_t) but always writes a u64.
nix::ioctl_read_bad!(
    blkgetsize64,
    nix::request_code_read!(0x12, 114, std::mem::size_of::<usize>()),
    u64
);
// BLKSSZGET is _IO(0x12, 104) and writes an int.
nix::ioctl_read_bad!(blksszget, nix::request_code_none!(0x12, 104), libc::c_int);
// BLKFLSBUF is _IO(0x12, 97) and takes no argument.
nix::ioctl_none!(blkflsbuf, 0x12, 97);

/// Errors of block device calls.
#[derive(Debug, thiserror::Error)]
pub enum BlkdevError {
    #[error("{op} failed on block device")]
    Ioctl {
        op: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("Cannot stat {path}")]
    Stat {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a block device")]
    NotBlockDevice { path: PathBuf },
}

impl BlkdevError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            BlkdevError::Ioctl { .. } => ErrorKind::Io,
            BlkdevError::Stat { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                ErrorKind::NotFound
            }
            BlkdevError::Stat { .. } => ErrorKind::Io,
            BlkdevError::NotBlockDevice { .. } => ErrorKind::InvalidArgument,
        }
    }
}

/// Size of the block device open at `fd`, in bytes (BLKGETSIZE64).
pub fn size_bytes(fd: impl AsFd) -> Result<u64, BlkdevError> {
    let mut size: u64 = 0;
    // SAFETY: the fd is valid for the duration of the call (borrowed), and `size` is a live,
    // writable u64, which is exactly what BLKGETSIZE64 writes.
    unsafe { blkgetsize64(fd.as_fd().as_raw_fd(), &mut size) }.map_err(|source| {
        BlkdevError::Ioctl {
            op: "BLKGETSIZE64",
            source,
        }
    })?;
    Ok(size)
}

/// Logical sector size of the block device open at `fd` (BLKSSZGET).
pub fn logical_block_size(fd: impl AsFd) -> Result<u32, BlkdevError> {
    let mut size: libc::c_int = 0;
    // SAFETY: valid borrowed fd; `size` is a live, writable int, which BLKSSZGET writes.
    unsafe { blksszget(fd.as_fd().as_raw_fd(), &mut size) }.map_err(|source| {
        BlkdevError::Ioctl {
            op: "BLKSSZGET",
            source,
        }
    })?;
    u32::try_from(size).map_err(|_| BlkdevError::Ioctl {
        op: "BLKSSZGET",
        source: nix::Error::EINVAL,
    })
}

/// Writes back and drops the buffer cache of the block device open at `fd` (BLKFLSBUF).
pub fn flush_buffers(fd: impl AsFd) -> Result<(), BlkdevError> {
    // SAFETY: valid borrowed fd; BLKFLSBUF takes no argument and touches no user memory.
    unsafe { blkflsbuf(fd.as_fd().as_raw_fd()) }.map_err(|source| BlkdevError::Ioctl {
        op: "BLKFLSBUF",
        source,
    })?;
    Ok(())
}

/// A device number split into major and minor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DevId {
    pub major: u32,
    pub minor: u32,
}

impl DevId {
    pub fn new(major: u32, minor: u32) -> DevId {
        DevId { major, minor }
    }

    /// Splits a kernel `dev_t` as userspace sees it (`st_dev`, `st_rdev`).
    pub fn from_dev_t(dev: u64) -> DevId {
        // The glibc encoding: 12 bits of major and 20 of minor, split across the word.
        let major = ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff);
        let minor = ((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff);
        DevId {
            major: major as u32,
            minor: minor as u32,
        }
    }

    /// The `dev_t` for this major:minor.
    pub fn to_dev_t(self) -> u64 {
        let (major, minor) = (u64::from(self.major), u64::from(self.minor));
        ((major & 0xffff_f000) << 32)
            | ((major & 0x0000_0fff) << 8)
            | ((minor & 0xffff_ff00) << 12)
            | (minor & 0x0000_00ff)
    }
}

impl fmt::Display for DevId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// The device number of the block device node at `path` (`st_rdev`, following symlinks).
pub fn rdev_of(path: &Path) -> Result<DevId, BlkdevError> {
    let meta = fs::metadata(path).map_err(|source| BlkdevError::Stat {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.file_type().is_block_device() {
        return Err(BlkdevError::NotBlockDevice {
            path: path.to_path_buf(),
        });
    }
    Ok(DevId::from_dev_t(meta.rdev()))
}

/// The device number of the filesystem holding `path` (`st_dev`, following symlinks).
pub fn dev_of(path: &Path) -> Result<DevId, BlkdevError> {
    let meta = fs::metadata(path).map_err(|source| BlkdevError::Stat {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(DevId::from_dev_t(meta.dev()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_t_round_trip() {
        for (major, minor) in [
            (7, 0),
            (7, 3),
            (254, 0),
            (259, 1_048_575),
            (4095, 255),
            (0, 42),
        ] {
            let id = DevId::new(major, minor);
            assert_eq!(DevId::from_dev_t(id.to_dev_t()), id);
            assert_eq!(
                id.to_dev_t(),
                nix::sys::stat::makedev(major.into(), minor.into())
            );
        }
    }

    #[test]
    fn rdev_of_refuses_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            rdev_of(&file),
            Err(BlkdevError::NotBlockDevice { .. })
        ));
    }
}

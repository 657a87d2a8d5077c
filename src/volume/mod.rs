//! Volumes on the host: sparse backing images under `state_dir/volumes` and how they are
//! exposed (loop devices here; NBD exports are registered with the daemon's NBD server).
//!
//! Only ids validated by `crate::api` reach `image_path`, so no name can leave the state dir.

use crate::api::ErrorKind;
use crate::failpoint;
use crate::sys::{blkdev, loopdev};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("Cannot create backing image {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot open backing image {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot resize backing image {path}")]
    Resize {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot remove backing image {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Loop(#[from] loopdev::LoopError),
    #[error(transparent)]
    Blkdev(#[from] blkdev::BlkdevError),
}

impl VolumeError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            VolumeError::Loop(e) => e.kind(),
            VolumeError::Blkdev(e) => e.kind(),
            VolumeError::Create { source, .. }
                if source.kind() == std::io::ErrorKind::AlreadyExists =>
            {
                ErrorKind::Busy
            }
            VolumeError::Create { source, .. } | VolumeError::Resize { source, .. }
                if source.raw_os_error() == Some(libc::ENOSPC) =>
            {
                ErrorKind::Unavailable
            }
            _ => ErrorKind::Io,
        }
    }
}

/// `<state_dir>/volumes/<id>.img`.
pub fn image_path(state_dir: &Path, id: &str) -> PathBuf {
    state_dir.join("volumes").join(format!("{id}.img"))
}

fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) => {
            failpoint::check("volume.dir.fsync")?;
            File::open(dir)?.sync_all()
        }
        None => Ok(()),
    }
}

/// Creates a sparse image of `size` bytes, mode 0600; refuses to overwrite anything.
pub fn create_image(path: &Path, size: u64) -> Result<(), VolumeError> {
    let err = |source| VolumeError::Create {
        path: path.into(),
        source,
    };
    failpoint::check("volume.image.create").map_err(err)?;
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    let made = (|| {
        file.set_len(size)?;
        sync_image(&file)?;
        sync_parent(path)
    })();
    if let Err(e) = made {
        // Never leave a half-made image behind: it would block a retry (create_new).
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(err(e));
    }
    Ok(())
}

/// fsyncs an image (data and size). A failure is final: what it covered may be lost.
pub fn sync_image(file: &File) -> std::io::Result<()> {
    failpoint::check("volume.image.fsync")?;
    file.sync_all()
}

/// Opens an image for reading and writing.
pub fn open_image(path: &Path) -> Result<File, VolumeError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| VolumeError::Open {
            path: path.into(),
            source,
        })
}

/// Opens an image read-only (the capture source).
pub fn open_image_ro(path: &Path) -> Result<File, VolumeError> {
    File::open(path).map_err(|source| VolumeError::Open {
        path: path.into(),
        source,
    })
}

/// Sets an open image's length (growing leaves a hole that reads as zeros).
pub fn set_image_len(file: &File, size: u64) -> Result<(), VolumeError> {
    failpoint::check("volume.image.resize")
        .and_then(|()| file.set_len(size))
        .map_err(|source| VolumeError::Resize {
            path: PathBuf::from("(open image)"),
            source,
        })
}

/// Grows an image to `size` bytes.
pub fn grow_image(path: &Path, size: u64) -> Result<(), VolumeError> {
    let err = |source| VolumeError::Resize {
        path: path.into(),
        source,
    };
    let file = OpenOptions::new().write(true).open(path).map_err(err)?;
    failpoint::check("volume.image.resize").map_err(err)?;
    file.set_len(size).map_err(err)?;
    sync_image(&file).map_err(err)
}

/// Removes an image; one that is already gone is fine.
pub fn remove_image(path: &Path) -> Result<(), VolumeError> {
    match std::fs::remove_file(path) {
        Ok(()) => sync_parent(path).map_err(|source| VolumeError::Remove {
            path: path.into(),
            source,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(VolumeError::Remove {
            path: path.into(),
            source,
        }),
    }
}

/// Attaches an image to a free loop device (direct I/O where the filesystem allows it).
pub fn attach_loop(image: &Path) -> Result<String, VolumeError> {
    let a = loopdev::attach(image, true)?;
    tracing::info!(image = %image.display(), device = %a.device.display(), direct_io = a.direct_io, "attached");
    Ok(a.device.to_string_lossy().into_owned())
}

/// Detaches `device` if it is still backed by `image` (a loop number can be reused).
pub fn detach_loop(device: &Path, image: &Path) -> Result<(), VolumeError> {
    match loopdev::detach_backing(device, image)? {
        loopdev::Detach::Detached => {}
        loopdev::Detach::Deferred => {
            tracing::warn!(device = %device.display(), "device still open elsewhere; the kernel detaches it when closed")
        }
    }
    Ok(())
}

/// Tells the loop device its backing image grew.
pub fn refresh_loop_capacity(device: &Path) -> Result<(), VolumeError> {
    loopdev::set_capacity(device)?;
    Ok(())
}

/// The loop device already backed by `image`, if any (adopted after a daemon restart).
pub fn loop_device_for(image: &Path) -> Option<String> {
    loopdev::find_by_backing(image)
        .ok()?
        .into_iter()
        .next()
        .map(|p| p.to_string_lossy().into_owned())
}

/// Drops the block device's cached pages after its backing image was rewritten behind it.
pub fn drop_device_cache(device: &Path) -> Result<(), VolumeError> {
    let f = File::open(device).map_err(|source| VolumeError::Open {
        path: device.into(),
        source,
    })?;
    blkdev::flush_buffers(&f)?;
    Ok(())
}

/// Where filesystems of `device` are mounted (empty when it has none or cannot be read).
pub fn mountpoints(device: &Path) -> Vec<String> {
    mounts(device)
        .into_iter()
        .map(|m| m.mountpoint.to_string_lossy().into_owned())
        .collect()
}

/// The mounts of `device`, one line per mount (bind mounts included).
pub fn mounts(device: &Path) -> Vec<crate::quiesce::Mount> {
    let Ok(dev) = blkdev::rdev_of(device) else {
        return Vec::new();
    };
    crate::quiesce::mounts_of_device(dev.major, dev.minor).unwrap_or_default()
}

/// Processes holding `device` open for writing, as "pid 123 (name)".
pub fn open_writers(device: &Path) -> Vec<String> {
    crate::quiesce::open_writers(device)
        .unwrap_or_default()
        .into_iter()
        .map(|p| format!("pid {} ({})", p.pid, p.name))
        .collect()
}

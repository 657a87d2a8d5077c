//! Filesystem freeze (FIFREEZE) and thaw (FITHAW) with an owning guard.
//!
//! [`freeze`] takes a directory opened *before* the freeze and keeps it: thawing goes through
//! that fd, never through a path (a path lookup or a program run on a frozen filesystem can
//! deadlock). [`Frozen::thaw`] is the normal path, `Drop` thaws as a fallback, and a
//! [`ThawHandle`] lets another thread (a watchdog) thaw: whoever comes first thaws, later
//! calls are no-ops. [`thaw_path`] is for recovery at start, when the guard is long gone:
//! a freeze outlives the process that made it.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::api::ErrorKind;

// Both are _IOWR('X', n, int); the kernel ignores the argument.
nix::ioctl_readwrite!(fifreeze, b'X', 119, libc::c_int);
nix::ioctl_readwrite!(fithaw, b'X', 120, libc::c_int);

/// Errors of freeze and thaw.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    #[error("Filesystem at {mountpoint} cannot be frozen (no freeze support)")]
    NotSupported {
        mountpoint: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("Filesystem at {mountpoint} is already frozen")]
    AlreadyFrozen { mountpoint: PathBuf },
    #[error("Not permitted to freeze or thaw the filesystem at {mountpoint}")]
    PermissionDenied { mountpoint: PathBuf },
    #[error("Cannot freeze the filesystem at {mountpoint}")]
    Freeze {
        mountpoint: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("Cannot thaw the filesystem at {mountpoint}")]
    Thaw {
        mountpoint: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("Filesystem at {mountpoint} was thawed by someone else while we held it frozen")]
    NotFrozen { mountpoint: PathBuf },
    #[error("Cannot open {path} to thaw it")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl FreezeError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            FreezeError::NotSupported { .. } => ErrorKind::Unavailable,
            FreezeError::AlreadyFrozen { .. } => ErrorKind::Busy,
            FreezeError::PermissionDenied { .. } => ErrorKind::PermissionDenied,
            FreezeError::NotFrozen { .. } => ErrorKind::Internal,
            FreezeError::Open { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                ErrorKind::NotFound
            }
            FreezeError::Freeze { .. } | FreezeError::Thaw { .. } | FreezeError::Open { .. } => {
                ErrorKind::Io
            }
        }
    }
}

fn do_fifreeze(file: &File) -> nix::Result<()> {
    let mut unused: libc::c_int = 0;
    // SAFETY: `file` is open for the duration of the call; the kernel ignores the argument,
    // which points at a live int anyway.
    unsafe { fifreeze(file.as_raw_fd(), &mut unused) }.map(drop)
}

fn do_fithaw(file: &File) -> nix::Result<()> {
    let mut unused: libc::c_int = 0;
    // SAFETY: as for FIFREEZE: a valid fd and a live (ignored) int argument.
    unsafe { fithaw(file.as_raw_fd(), &mut unused) }.map(drop)
}

struct Inner {
    /// Opened before the freeze; the only way we touch the frozen filesystem.
    dir: File,
    mountpoint: PathBuf,
    /// True while we hold the filesystem frozen; the lock serialises thaw attempts.
    frozen: Mutex<bool>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, bool> {
        // A panic while holding this lock cannot leave the bool inconsistent.
        self.frozen.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn thaw(&self) -> Result<bool, FreezeError> {
        let mut frozen = self.lock();
        if !*frozen {
            return Ok(false);
        }
        match do_fithaw(&self.dir) {
            Ok(()) => {
                *frozen = false;
                Ok(true)
            }
            Err(nix::Error::EINVAL) => {
                *frozen = false;
                Err(FreezeError::NotFrozen {
                    mountpoint: self.mountpoint.clone(),
                })
            }
            // Stay "frozen" so that a later attempt (Drop, watchdog) tries again.
            Err(nix::Error::EPERM) => Err(FreezeError::PermissionDenied {
                mountpoint: self.mountpoint.clone(),
            }),
            Err(source) => Err(FreezeError::Thaw {
                mountpoint: self.mountpoint.clone(),
                source,
            }),
        }
    }
}

/// A cloneable handle that thaws a frozen filesystem from any thread, at most once.
#[derive(Clone)]
pub struct ThawHandle {
    inner: Arc<Inner>,
}

impl ThawHandle {
    /// Thaws if still frozen: `Ok(true)` if this call thawed, `Ok(false)` if it already was.
    pub fn thaw(&self) -> Result<bool, FreezeError> {
        self.inner.thaw()
    }

    pub fn is_frozen(&self) -> bool {
        *self.inner.lock()
    }

    pub fn mountpoint(&self) -> &Path {
        &self.inner.mountpoint
    }
}

impl std::fmt::Debug for ThawHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThawHandle")
            .field("mountpoint", &self.inner.mountpoint)
            .field("frozen", &self.is_frozen())
            .finish()
    }
}

/// A filesystem we froze. Thaw it with [`Frozen::thaw`]; dropping it thaws as a fallback.
#[derive(Debug)]
#[must_use = "dropping a Frozen thaws the filesystem at once"]
pub struct Frozen {
    handle: ThawHandle,
}

impl Frozen {
    /// Thaws: `Ok(true)` if this call thawed, `Ok(false)` if a [`ThawHandle`] did first.
    pub fn thaw(self) -> Result<bool, FreezeError> {
        self.handle.thaw()
    }

    pub fn thaw_handle(&self) -> ThawHandle {
        self.handle.clone()
    }

    pub fn mountpoint(&self) -> &Path {
        self.handle.mountpoint()
    }

    /// The directory opened before the freeze (safe to fstat; do not write through it).
    pub fn dir(&self) -> &File {
        &self.handle.inner.dir
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        match self.handle.thaw() {
            Ok(_) | Err(FreezeError::NotFrozen { .. }) => {}
            Err(e) => tracing::error!(
                mountpoint = %self.handle.mountpoint().display(),
                error = %e,
                "thaw on drop failed"
            ),
        }
    }
}

/// Freezes the filesystem holding `dir` (an open directory, normally its mountpoint).
///
/// `mountpoint` names it in errors and logs only; it is never looked up. The returned guard
/// keeps `dir` and thaws through it.
pub fn freeze(dir: File, mountpoint: &Path) -> Result<Frozen, FreezeError> {
    let mountpoint = mountpoint.to_path_buf();
    match do_fifreeze(&dir) {
        Ok(()) => Ok(Frozen {
            handle: ThawHandle {
                inner: Arc::new(Inner {
                    dir,
                    mountpoint,
                    frozen: Mutex::new(true),
                }),
            },
        }),
        Err(nix::Error::EBUSY) => Err(FreezeError::AlreadyFrozen { mountpoint }),
        Err(nix::Error::EPERM) => Err(FreezeError::PermissionDenied { mountpoint }),
        Err(source @ (nix::Error::EOPNOTSUPP | nix::Error::ENOTTY)) => {
            Err(FreezeError::NotSupported { mountpoint, source })
        }
        Err(source) => Err(FreezeError::Freeze { mountpoint, source }),
    }
}

/// Thaws the filesystem holding `path`, for recovery after a restart: `Ok(true)` if it was
/// frozen and is now thawed, `Ok(false)` if it was not frozen.
pub fn thaw_path(path: &Path) -> Result<bool, FreezeError> {
    let dir = File::open(path).map_err(|source| FreezeError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    match do_fithaw(&dir) {
        Ok(()) => Ok(true),
        Err(nix::Error::EINVAL) => Ok(false),
        Err(nix::Error::EPERM) => Err(FreezeError::PermissionDenied {
            mountpoint: path.to_path_buf(),
        }),
        Err(source) => Err(FreezeError::Thaw {
            mountpoint: path.to_path_buf(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::test_util::{root_or_skip, write_in_background, ScratchFs};
    use std::time::Duration;

    const MIB: u64 = 1 << 20;

    fn open_dir(path: &Path) -> File {
        File::open(path).unwrap()
    }

    #[test]
    fn write_waits_for_thaw() {
        if !root_or_skip("write_waits_for_thaw") {
            return;
        }
        let fs = ScratchFs::new("ext4", 32 * MIB);
        let frozen = freeze(open_dir(fs.mountpoint()), fs.mountpoint()).unwrap();
        let done = write_in_background(&fs.mountpoint().join("during-freeze"));
        assert!(
            done.recv_timeout(Duration::from_millis(400)).is_err(),
            "a write completed on a frozen filesystem"
        );
        assert!(frozen.thaw().unwrap());
        done.recv_timeout(Duration::from_secs(10))
            .expect("write still blocked after thaw")
            .unwrap();
    }

    #[test]
    fn double_freeze_is_already_frozen() {
        if !root_or_skip("double_freeze_is_already_frozen") {
            return;
        }
        let fs = ScratchFs::new("ext4", 32 * MIB);
        let frozen = freeze(open_dir(fs.mountpoint()), fs.mountpoint()).unwrap();
        let err = freeze(open_dir(fs.mountpoint()), fs.mountpoint()).unwrap_err();
        assert!(matches!(err, FreezeError::AlreadyFrozen { .. }), "{err:?}");
        assert_eq!(err.kind(), ErrorKind::Busy);
        frozen.thaw().unwrap();
    }

    #[test]
    fn thaw_path_reports_whether_it_was_frozen() {
        if !root_or_skip("thaw_path_reports_whether_it_was_frozen") {
            return;
        }
        let fs = ScratchFs::new("ext4", 32 * MIB);
        assert!(!thaw_path(fs.mountpoint()).unwrap());
        // A freeze left behind (as by a crashed daemon) is undone by path.
        let frozen = freeze(open_dir(fs.mountpoint()), fs.mountpoint()).unwrap();
        assert!(thaw_path(fs.mountpoint()).unwrap());
        let err = frozen.thaw().unwrap_err();
        assert!(matches!(err, FreezeError::NotFrozen { .. }), "{err:?}");
    }

    #[test]
    fn drop_thaws() {
        if !root_or_skip("drop_thaws") {
            return;
        }
        let fs = ScratchFs::new("ext4", 32 * MIB);
        let frozen = freeze(open_dir(fs.mountpoint()), fs.mountpoint()).unwrap();
        let handle = frozen.thaw_handle();
        assert!(handle.is_frozen());
        drop(frozen);
        assert!(!handle.is_frozen());
        write_in_background(&fs.mountpoint().join("after-drop"))
            .recv_timeout(Duration::from_secs(10))
            .expect("write blocked after drop")
            .unwrap();
    }

    #[test]
    fn thaw_handle_thaws_once_from_another_thread() {
        if !root_or_skip("thaw_handle_thaws_once_from_another_thread") {
            return;
        }
        let fs = ScratchFs::new("ext4", 32 * MIB);
        let frozen = freeze(open_dir(fs.mountpoint()), fs.mountpoint()).unwrap();
        let handle = frozen.thaw_handle();
        let thawed_there = std::thread::spawn(move || handle.thaw().unwrap())
            .join()
            .unwrap();
        assert!(thawed_there);
        assert!(!frozen.thaw().unwrap(), "second thaw must be a no-op");
        assert!(!thaw_path(fs.mountpoint()).unwrap());
    }
}

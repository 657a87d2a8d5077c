//! Loop devices: attach a regular file through /dev/loop-control and LOOP_CONFIGURE, detach,
//! grow, and find which devices a file backs.
//!
//! Attachments are made without autoclear: a volume stays attached when the daemon stops, and
//! the daemon finds it again at start with [`find_by_backing`]. What the kernel really did is
//! read back rather than assumed: the size through BLKGETSIZE64 and direct I/O through
//! `/sys/block/loopN/loop/dio` (the kernel drops direct I/O silently when the backing
//! filesystem cannot do it at the device's logical block size).

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::Rng;

use super::blkdev::{self, BlkdevError};
use crate::api::ErrorKind;

const LOOP_CONTROL: &str = "/dev/loop-control";

/// How many free numbers we try before giving up when other processes keep taking them.
const MAX_ATTEMPTS: u32 = 16;

/// How long `detach` waits for the kernel to finish tearing a device down.
const DETACH_SETTLE: Duration = Duration::from_secs(1);

/// The kernel ABI of `include/uapi/linux/loop.h`, kept private: callers see safe functions.
mod abi {
    pub const LO_NAME_SIZE: usize = 64;
    pub const LO_KEY_SIZE: usize = 32;
    pub const LO_FLAGS_DIRECT_IO: u32 = 16;

    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct LoopInfo64 {
        pub lo_device: u64,
        pub lo_inode: u64,
        pub lo_rdevice: u64,
        pub lo_offset: u64,
        pub lo_sizelimit: u64,
        pub lo_number: u32,
        pub lo_encrypt_type: u32,
        pub lo_encrypt_key_size: u32,
        pub lo_flags: u32,
        pub lo_file_name: [u8; LO_NAME_SIZE],
        pub lo_crypt_name: [u8; LO_NAME_SIZE],
        pub lo_encrypt_key: [u8; LO_KEY_SIZE],
        pub lo_init: [u64; 2],
    }

    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct LoopConfig {
        pub fd: u32,
        pub block_size: u32,
        pub info: LoopInfo64,
        pub reserved: [u64; 8],
    }

    const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
    const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);

    impl LoopInfo64 {
        pub const fn zeroed() -> LoopInfo64 {
            LoopInfo64 {
                lo_device: 0,
                lo_inode: 0,
                lo_rdevice: 0,
                lo_offset: 0,
                lo_sizelimit: 0,
                lo_number: 0,
                lo_encrypt_type: 0,
                lo_encrypt_key_size: 0,
                lo_flags: 0,
                lo_file_name: [0; LO_NAME_SIZE],
                lo_crypt_name: [0; LO_NAME_SIZE],
                lo_encrypt_key: [0; LO_KEY_SIZE],
                lo_init: [0; 2],
            }
        }
    }

    // The loop ioctls predate the _IO* encoding: their numbers are plain constants.
    nix::ioctl_none_bad!(loop_ctl_get_free, 0x4C82);
    nix::ioctl_write_ptr_bad!(loop_configure, 0x4C0A, LoopConfig);
    nix::ioctl_none_bad!(loop_clr_fd, 0x4C01);
    nix::ioctl_none_bad!(loop_set_capacity, 0x4C07);
    nix::ioctl_read_bad!(loop_get_status64, 0x4C05, LoopInfo64);
}

/// A loop device bound to a backing file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopAttachment {
    /// `/dev/loopN`.
    pub device: PathBuf,
    pub number: u32,
    /// Whether the kernel really does direct I/O to the backing file (read back from sysfs).
    pub direct_io: bool,
}

/// What `detach` achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detach {
    /// The device is free again.
    Detached,
    /// Another process still has the device open (not mounted: that is refused); the kernel
    /// releases it when the last opener closes it.
    Deferred,
}

/// The file behind a loop device, as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingFile {
    pub path: PathBuf,
    /// The file was unlinked after it was attached; `path` is where it used to be.
    pub deleted: bool,
}

/// Errors of loop device calls.
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error("Cannot use {path} as a loop backing file: it is a {file_type}, not a regular file")]
    NotRegularFile { path: PathBuf, file_type: String },
    #[error("Cannot open loop backing file {path}")]
    Backing {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot open {LOOP_CONTROL}")]
    Control {
        #[source]
        source: io::Error,
    },
    #[error("Cannot get a free loop device (LOOP_CTL_GET_FREE)")]
    GetFree {
        #[source]
        source: nix::Error,
    },
    #[error("Cannot open loop device {device}")]
    OpenDevice {
        device: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot attach {path} to {device} (LOOP_CONFIGURE)")]
    Configure {
        path: PathBuf,
        device: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error(
        "Cannot attach {path}: other processes took each of {attempts} free loop devices first"
    )]
    Contended { path: PathBuf, attempts: u32 },
    #[error(
        "Loop device {device} holds {actual} bytes, but its backing file {path} holds {expected}"
    )]
    SizeMismatch {
        device: PathBuf,
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("Loop device {device} is busy: mounted or held exclusively by another user")]
    DeviceBusy { device: PathBuf },
    #[error("Loop device {device} is not attached to any file")]
    NotAttached { device: PathBuf },
    #[error("Loop device {device} is no longer backed by {path}")]
    NotBackedBy { device: PathBuf, path: PathBuf },
    #[error("{device} is not a loop device")]
    NotLoopDevice { device: PathBuf },
    #[error("{op} failed on loop device {device}")]
    Ioctl {
        device: PathBuf,
        op: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("Cannot read {path}")]
    Sysfs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot query loop device {device}")]
    Device {
        device: PathBuf,
        #[source]
        source: BlkdevError,
    },
}

impl LoopError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            LoopError::NotRegularFile { .. } | LoopError::NotLoopDevice { .. } => {
                ErrorKind::InvalidArgument
            }
            LoopError::Backing { source, .. } | LoopError::OpenDevice { source, .. } => {
                io_kind(source)
            }
            LoopError::Control { .. } | LoopError::GetFree { .. } => ErrorKind::Unavailable,
            LoopError::Contended { .. } | LoopError::DeviceBusy { .. } => ErrorKind::Busy,
            LoopError::NotAttached { .. } | LoopError::NotBackedBy { .. } => ErrorKind::NotFound,
            LoopError::SizeMismatch { .. } => ErrorKind::Internal,
            LoopError::Configure { source, .. } | LoopError::Ioctl { source, .. } => match source {
                nix::Error::EBUSY => ErrorKind::Busy,
                nix::Error::EPERM | nix::Error::EACCES => ErrorKind::PermissionDenied,
                _ => ErrorKind::Io,
            },
            LoopError::Sysfs { .. } => ErrorKind::Io,
            LoopError::Device { source, .. } => source.kind(),
        }
    }
}

fn io_kind(err: &io::Error) -> ErrorKind {
    match err.kind() {
        io::ErrorKind::NotFound => ErrorKind::NotFound,
        io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
        _ => ErrorKind::Io,
    }
}

/// Attaches the regular file `backing` to a free loop device, read-write, without autoclear.
///
/// With `direct_io` the device is configured with LO_FLAGS_DIRECT_IO (falling back to
/// buffered I/O if the kernel rejects it); [`LoopAttachment::direct_io`] says what the kernel
/// really does. Numbers taken by another process between LOOP_CTL_GET_FREE and
/// LOOP_CONFIGURE are retried after a short random backoff, a bounded number of times.
pub fn attach(backing: &Path, direct_io: bool) -> Result<LoopAttachment, LoopError> {
    let backing_err = |source| LoopError::Backing {
        path: backing.to_path_buf(),
        source,
    };
    // Check before opening: opening a FIFO or a device node can block or have side effects.
    let meta = fs::metadata(backing).map_err(backing_err)?;
    ensure_regular(backing, &meta)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(backing)
        .map_err(backing_err)?;
    // Check again what we opened, in case the path was swapped in between.
    let meta = file.metadata().map_err(backing_err)?;
    ensure_regular(backing, &meta)?;
    // The device exposes whole 512-byte sectors of the file.
    let expected = meta.len() & !511;

    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .open(LOOP_CONTROL)
        .map_err(|source| LoopError::Control { source })?;

    let mut rng = rand::thread_rng();
    let mut use_dio = direct_io;
    for attempt in 1..=MAX_ATTEMPTS {
        let number = get_free(&control)?;
        let device = device_path(number);
        let dev_file = match OpenOptions::new().read(true).write(true).open(&device) {
            Ok(f) => f,
            // Another process removed the device we were offered; take another one.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                backoff(&mut rng, attempt);
                continue;
            }
            Err(source) => return Err(LoopError::OpenDevice { device, source }),
        };
        let result = match configure(&dev_file, &file, backing, use_dio) {
            Err(nix::Error::EINVAL) if use_dio => {
                // Some kernels refuse direct I/O here instead of dropping it: go buffered.
                use_dio = false;
                configure(&dev_file, &file, backing, false)
            }
            other => other,
        };
        match result {
            Ok(()) => {}
            Err(nix::Error::EBUSY) => {
                tracing::debug!(device = %device.display(), attempt, "loop device taken meanwhile, retrying");
                backoff(&mut rng, attempt);
                continue;
            }
            Err(source) => {
                return Err(LoopError::Configure {
                    path: backing.to_path_buf(),
                    device,
                    source,
                })
            }
        }

        let attachment = LoopAttachment {
            direct_io: read_dio(number, &dev_file, &device),
            device,
            number,
        };
        if direct_io && !attachment.direct_io {
            tracing::info!(
                device = %attachment.device.display(),
                backing = %backing.display(),
                "direct I/O not available on this backing filesystem; using buffered I/O"
            );
        }
        match blkdev::size_bytes(&dev_file) {
            Ok(actual) if actual == expected => return Ok(attachment),
            outcome => {
                // Do not leave a device of the wrong size behind.
                // SAFETY: `dev_file` is an open loop device; LOOP_CLR_FD takes no argument.
                let _ = unsafe { abi::loop_clr_fd(dev_file.as_raw_fd()) };
                return Err(match outcome {
                    Ok(actual) => LoopError::SizeMismatch {
                        device: attachment.device,
                        path: backing.to_path_buf(),
                        expected,
                        actual,
                    },
                    Err(source) => LoopError::Device {
                        device: attachment.device,
                        source,
                    },
                });
            }
        }
    }
    Err(LoopError::Contended {
        path: backing.to_path_buf(),
        attempts: MAX_ATTEMPTS,
    })
}

fn ensure_regular(path: &Path, meta: &fs::Metadata) -> Result<(), LoopError> {
    use std::os::unix::fs::FileTypeExt;
    let ft = meta.file_type();
    if ft.is_file() {
        return Ok(());
    }
    let file_type = if ft.is_dir() {
        "directory"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_fifo() {
        "FIFO"
    } else if ft.is_socket() {
        "socket"
    } else {
        "special file"
    };
    Err(LoopError::NotRegularFile {
        path: path.to_path_buf(),
        file_type: file_type.to_string(),
    })
}

fn backoff(rng: &mut impl Rng, attempt: u32) {
    let ms = rng.gen_range(1..=5 * u64::from(attempt.min(4)));
    std::thread::sleep(Duration::from_millis(ms));
}

fn device_path(number: u32) -> PathBuf {
    PathBuf::from(format!("/dev/loop{number}"))
}

fn get_free(control: &File) -> Result<u32, LoopError> {
    // SAFETY: `control` is an open /dev/loop-control; LOOP_CTL_GET_FREE takes no argument and
    // returns the number in the ioctl's return value.
    let number = unsafe { abi::loop_ctl_get_free(control.as_raw_fd()) }
        .map_err(|source| LoopError::GetFree { source })?;
    u32::try_from(number).map_err(|_| LoopError::GetFree {
        source: nix::Error::EINVAL,
    })
}

/// Every volume's logical block size, whatever its image sits on. With 0 the kernel picks the
/// backing file's direct-I/O alignment, and on xfs that becomes 4096 once a file has shared
/// extents (after the FICLONE of a snapshot, or a restore that shares the store's extents):
/// the same volume would then come back with 4 KiB sectors, and a filesystem made with 1 KiB
/// blocks (mkfs.ext4 on a small volume) or a 512-byte partition table no longer fits it. At
/// 512 the kernel drops direct I/O where the file cannot do it (read back, see the module
/// docs) and the volume keeps its geometry.
const LOGICAL_BLOCK_SIZE: u32 = 512;

fn configure(dev: &File, backing: &File, path: &Path, direct_io: bool) -> nix::Result<()> {
    let mut info = abi::LoopInfo64::zeroed();
    if direct_io {
        info.lo_flags |= abi::LO_FLAGS_DIRECT_IO;
    }
    // lo_file_name is informational (losetup shows it); keep a NUL at the end.
    let name = path.as_os_str().as_bytes();
    let n = name.len().min(abi::LO_NAME_SIZE - 1);
    info.lo_file_name[..n].copy_from_slice(&name[..n]);
    let raw_fd = u32::try_from(backing.as_raw_fd()).map_err(|_| nix::Error::EBADF)?;
    let config = abi::LoopConfig {
        fd: raw_fd,
        block_size: LOGICAL_BLOCK_SIZE,
        info,
        reserved: [0; 8],
    };
    // SAFETY: `dev` is an open loop device, `config` is a fully initialised loop_config that
    // lives across the call (the kernel only reads it), and `backing`'s fd stays open during it.
    unsafe { abi::loop_configure(dev.as_raw_fd(), &config) }?;
    Ok(())
}

fn get_status(dev: impl AsFd) -> nix::Result<abi::LoopInfo64> {
    let mut info = abi::LoopInfo64::zeroed();
    // SAFETY: valid borrowed fd; `info` is a live, writable loop_info64, which the kernel fills.
    unsafe { abi::loop_get_status64(dev.as_fd().as_raw_fd(), &mut info) }?;
    Ok(info)
}

/// Whether the kernel does direct I/O for loopN: sysfs, or the status flags if sysfs is absent.
fn read_dio(number: u32, dev: &File, device: &Path) -> bool {
    let path = format!("/sys/block/loop{number}/loop/dio");
    match fs::read_to_string(&path) {
        Ok(s) => s.trim() == "1",
        Err(e) => {
            tracing::debug!(device = %device.display(), error = %e, "no sysfs dio, asking the device");
            get_status(dev).is_ok_and(|info| info.lo_flags & abi::LO_FLAGS_DIRECT_IO != 0)
        }
    }
}

/// The loop number of a device node (any path to it), checked through sysfs.
fn loop_number(device: &Path) -> Result<u32, LoopError> {
    let id = blkdev::rdev_of(device).map_err(|source| match source {
        BlkdevError::NotBlockDevice { .. } => LoopError::NotLoopDevice {
            device: device.to_path_buf(),
        },
        source => LoopError::Device {
            device: device.to_path_buf(),
            source,
        },
    })?;
    let link = PathBuf::from(format!("/sys/dev/block/{id}"));
    let target = fs::read_link(&link).map_err(|source| LoopError::Sysfs { path: link, source })?;
    target
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("loop"))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| LoopError::NotLoopDevice {
            device: device.to_path_buf(),
        })
}

/// Detaches a loop device (LOOP_CLR_FD).
///
/// Refuses with [`LoopError::DeviceBusy`] while the device is mounted or held exclusively;
/// [`LoopError::NotAttached`] if nothing is attached. If other processes merely have it open,
/// the kernel finishes the detach when they close it: that is [`Detach::Deferred`].
pub fn detach(device: &Path) -> Result<Detach, LoopError> {
    detach_checked(device, None)
}

/// Like [`detach`], but only while `device` is still backed by the file at `backing`
/// ([`LoopError::NotBackedBy`] otherwise). The check goes through the descriptor that
/// detaches, which keeps the device from being detached and reused by others in between.
pub fn detach_backing(device: &Path, backing: &Path) -> Result<Detach, LoopError> {
    let meta = fs::metadata(backing).map_err(|source| LoopError::Backing {
        path: backing.to_path_buf(),
        source,
    })?;
    detach_checked(device, Some((backing, meta.dev(), meta.ino())))
}

fn detach_checked(device: &Path, expect: Option<(&Path, u64, u64)>) -> Result<Detach, LoopError> {
    let number = loop_number(device)?;
    // O_EXCL on a block device fails with EBUSY while a filesystem (or anyone) claims it.
    let dev_file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(device)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            return Err(LoopError::DeviceBusy {
                device: device.to_path_buf(),
            })
        }
        Err(source) => {
            return Err(LoopError::OpenDevice {
                device: device.to_path_buf(),
                source,
            })
        }
    };
    if let Some((path, dev, ino)) = expect {
        match get_status(&dev_file) {
            Ok(info) if (info.lo_device, info.lo_inode) == (dev, ino) => {}
            Ok(_) => {
                return Err(LoopError::NotBackedBy {
                    device: device.to_path_buf(),
                    path: path.to_path_buf(),
                })
            }
            Err(nix::Error::ENXIO) => {
                return Err(LoopError::NotAttached {
                    device: device.to_path_buf(),
                })
            }
            Err(source) => {
                return Err(LoopError::Ioctl {
                    device: device.to_path_buf(),
                    op: "LOOP_GET_STATUS64",
                    source,
                })
            }
        }
    }
    // What the device is attached to now: once sysfs names another file, the number was
    // freed and taken by someone else's attachment, and ours is gone.
    let ours = read_backing(number).ok().flatten();
    // SAFETY: `dev_file` is an open loop device; LOOP_CLR_FD takes no argument.
    match unsafe { abi::loop_clr_fd(dev_file.as_raw_fd()) } {
        Ok(_) => {}
        Err(nix::Error::ENXIO) => {
            return Err(LoopError::NotAttached {
                device: device.to_path_buf(),
            })
        }
        Err(nix::Error::EBUSY) => {
            return Err(LoopError::DeviceBusy {
                device: device.to_path_buf(),
            })
        }
        Err(source) => {
            return Err(LoopError::Ioctl {
                device: device.to_path_buf(),
                op: "LOOP_CLR_FD",
                source,
            })
        }
    }
    // The kernel tears the device down when its last opener (maybe us) closes it.
    drop(dev_file);
    let attached = PathBuf::from(format!("/sys/block/loop{number}/loop"));
    let start = Instant::now();
    while attached.exists() {
        match read_backing(number) {
            Ok(Some(now)) if Some(&now) == ours.as_ref() => {}
            // Unbound, or bound again to another file.
            Ok(_) => break,
            // Unreadable while the kernel tears it down: look again.
            Err(_) => {}
        }
        if start.elapsed() > DETACH_SETTLE {
            return Ok(Detach::Deferred);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(Detach::Detached)
}

/// Tells the kernel that the backing file of `device` changed size (LOOP_SET_CAPACITY) and
/// returns the device's new size in bytes.
pub fn set_capacity(device: &Path) -> Result<u64, LoopError> {
    let dev_file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(device)
        .map_err(|source| LoopError::OpenDevice {
            device: device.to_path_buf(),
            source,
        })?;
    // SAFETY: `dev_file` is an open block device; LOOP_SET_CAPACITY takes no argument.
    unsafe { abi::loop_set_capacity(dev_file.as_raw_fd()) }.map_err(|source| match source {
        nix::Error::ENXIO => LoopError::NotAttached {
            device: device.to_path_buf(),
        },
        nix::Error::ENOTTY | nix::Error::EINVAL => LoopError::NotLoopDevice {
            device: device.to_path_buf(),
        },
        source => LoopError::Ioctl {
            device: device.to_path_buf(),
            op: "LOOP_SET_CAPACITY",
            source,
        },
    })?;
    blkdev::size_bytes(&dev_file).map_err(|source| LoopError::Device {
        device: device.to_path_buf(),
        source,
    })
}

/// The file behind loop device `device`, or `None` if it is not attached.
pub fn backing_file(device: &Path) -> Result<Option<BackingFile>, LoopError> {
    let number = loop_number(device)?;
    let Some(raw) = read_backing(number)? else {
        return Ok(None);
    };
    let suffix = b" (deleted)";
    let bytes = raw.as_os_str().as_bytes();
    let Some(stripped) = bytes.strip_suffix(suffix) else {
        return Ok(Some(BackingFile {
            path: raw,
            deleted: false,
        }));
    };
    // Either the file was unlinked or its name really ends so: the inode tells which.
    let stripped = PathBuf::from(OsString::from_vec(stripped.to_vec()));
    let same_file = match fs::metadata(&raw) {
        Ok(meta) => {
            status_of(device)?.is_some_and(|(dev, ino)| dev == meta.dev() && ino == meta.ino())
        }
        Err(_) => false,
    };
    Ok(Some(if same_file {
        BackingFile {
            path: raw,
            deleted: false,
        }
    } else {
        BackingFile {
            path: stripped,
            deleted: true,
        }
    }))
}

/// `/sys/block/loopN/loop/backing_file` without its newline; `None` when not attached.
fn read_backing(number: u32) -> Result<Option<PathBuf>, LoopError> {
    let path = PathBuf::from(format!("/sys/block/loop{number}/loop/backing_file"));
    match fs::read(&path) {
        Ok(mut bytes) => {
            if bytes.last() == Some(&b'\n') {
                bytes.pop();
            }
            Ok(Some(PathBuf::from(OsString::from_vec(bytes))))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(LoopError::Sysfs { path, source }),
    }
}

/// (st_dev, st_ino) of the backing file as the loop driver recorded it, `None` if detached.
fn status_of(device: &Path) -> Result<Option<(u64, u64)>, LoopError> {
    let dev_file = match File::open(device) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(LoopError::OpenDevice {
                device: device.to_path_buf(),
                source,
            })
        }
    };
    match get_status(&dev_file) {
        Ok(info) => Ok(Some((info.lo_device, info.lo_inode))),
        Err(nix::Error::ENXIO) => Ok(None),
        Err(source) => Err(LoopError::Ioctl {
            device: device.to_path_buf(),
            op: "LOOP_GET_STATUS64",
            source,
        }),
    }
}

/// Every attached loop device with its backing file, sorted by number (for recovery and
/// for finding devices whose backing file is gone).
pub fn attached() -> Result<Vec<(PathBuf, BackingFile)>, LoopError> {
    let mut out = Vec::new();
    for number in loop_numbers()? {
        let device = device_path(number);
        match backing_file(&device) {
            Ok(Some(backing)) => out.push((device, backing)),
            // Detached meanwhile, or its node is gone: nothing to report.
            Ok(None) | Err(LoopError::Device { .. }) | Err(LoopError::Sysfs { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// The numbers of every loop device the kernel knows (attached or not), sorted.
fn loop_numbers() -> Result<Vec<u32>, LoopError> {
    let sys_block = Path::new("/sys/block");
    let entries = fs::read_dir(sys_block).map_err(|source| LoopError::Sysfs {
        path: sys_block.to_path_buf(),
        source,
    })?;
    let mut numbers: Vec<u32> = entries
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("loop"))
                .and_then(|n| n.parse().ok())
        })
        .collect();
    numbers.sort_unstable();
    Ok(numbers)
}

/// Every loop device currently backed by the file at `path` (matched by inode, so another
/// name of the same file matches too), sorted by number.
pub fn find_by_backing(path: &Path) -> Result<Vec<PathBuf>, LoopError> {
    let backing_err = |source| LoopError::Backing {
        path: path.to_path_buf(),
        source,
    };
    let meta = fs::metadata(path).map_err(backing_err)?;
    let canonical = fs::canonicalize(path).map_err(backing_err)?;
    let mut numbers = Vec::new();
    for number in loop_numbers()? {
        let Some(raw) = read_backing(number)? else {
            continue;
        };
        // Cheap filters first (name, then stat of that name), so that unrelated devices are
        // never opened; the loop driver's own record of the inode decides.
        let name_matches = raw == canonical
            || raw
                .as_os_str()
                .as_bytes()
                .strip_suffix(b" (deleted)")
                .is_some_and(|s| s == canonical.as_os_str().as_bytes());
        let inode_matches =
            || fs::metadata(&raw).is_ok_and(|m| m.dev() == meta.dev() && m.ino() == meta.ino());
        if !name_matches && !inode_matches() {
            continue;
        }
        let device = device_path(number);
        if status_of(&device)? == Some((meta.dev(), meta.ino())) {
            numbers.push(number);
        }
    }
    Ok(numbers.into_iter().map(device_path).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::test_util::{mkfs, root_or_skip, sparse_file, LoopGuard, MountGuard};
    use std::sync::{Arc, Barrier};

    const MIB: u64 = 1 << 20;

    fn device_size(device: &Path) -> u64 {
        blkdev::size_bytes(File::open(device).unwrap()).unwrap()
    }

    #[test]
    fn attach_verify_size_find_and_detach() {
        if !root_or_skip("attach_verify_size_find_and_detach") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        // Not a multiple of 512: the device shows whole sectors only.
        let image = sparse_file(&dir.path().join("vol.img"), 64 * MIB + 700);
        let guard = LoopGuard::attach(&image, false);
        let device = guard.device().to_path_buf();
        assert_eq!(
            device,
            PathBuf::from(format!("/dev/loop{}", guard.attachment.number))
        );
        assert_eq!(device_size(&device), 64 * MIB + 512);

        let backing = backing_file(&device).unwrap().unwrap();
        assert_eq!(backing.path, fs::canonicalize(&image).unwrap());
        assert!(!backing.deleted);
        assert_eq!(find_by_backing(&image).unwrap(), vec![device.clone()]);

        // Another name for the same file finds it too.
        let link = dir.path().join("hardlink.img");
        fs::hard_link(&image, &link).unwrap();
        assert_eq!(find_by_backing(&link).unwrap(), vec![device.clone()]);
        assert!(attached()
            .unwrap()
            .iter()
            .any(|(d, b)| d == &device && b.path == fs::canonicalize(&image).unwrap()));

        assert_eq!(guard.detach().unwrap(), Detach::Detached);
        assert!(find_by_backing(&image).unwrap().is_empty());
        let err = detach_backing(&device, &image).unwrap_err();
        assert!(
            matches!(
                err,
                LoopError::NotAttached { .. } | LoopError::NotBackedBy { .. }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn concurrent_attach_gets_distinct_devices() {
        if !root_or_skip("concurrent_attach_gets_distinct_devices") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let threads = 4;
        let barrier = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let image = sparse_file(&dir.path().join(format!("v{i}.img")), 8 * MIB);
                let barrier = Arc::clone(&barrier);
                std::thread::spawn(move || {
                    barrier.wait();
                    LoopGuard::attach(&image, false)
                })
            })
            .collect();
        let guards: Vec<LoopGuard> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let mut devices: Vec<_> = guards.iter().map(|g| g.device().to_path_buf()).collect();
        devices.sort();
        devices.dedup();
        assert_eq!(devices.len(), threads);
        for (i, g) in guards.iter().enumerate() {
            let image = dir.path().join(format!("v{i}.img"));
            assert_eq!(
                find_by_backing(&image).unwrap(),
                vec![g.device().to_path_buf()]
            );
        }
    }

    #[test]
    fn set_capacity_after_growth() {
        if !root_or_skip("set_capacity_after_growth") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let image = sparse_file(&dir.path().join("grow.img"), 16 * MIB);
        let guard = LoopGuard::attach(&image, false);
        File::options()
            .write(true)
            .open(&image)
            .unwrap()
            .set_len(48 * MIB)
            .unwrap();
        assert_eq!(device_size(guard.device()), 16 * MIB);
        assert_eq!(set_capacity(guard.device()).unwrap(), 48 * MIB);
        assert_eq!(device_size(guard.device()), 48 * MIB);
    }

    #[test]
    fn refuses_non_regular_backing() {
        // Refused before any privileged call, so this runs without root too.
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        for (path, what) in [
            (dir.path().to_path_buf(), "directory"),
            (fifo, "FIFO"),
            (PathBuf::from("/dev/null"), "character device"),
        ] {
            match attach(&path, false) {
                Err(e @ LoopError::NotRegularFile { .. }) => {
                    assert!(e.to_string().contains(what), "{e}");
                    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
                }
                other => panic!("{}: expected NotRegularFile, got {other:?}", path.display()),
            }
        }
        let missing = attach(&dir.path().join("missing"), false).unwrap_err();
        assert_eq!(missing.kind(), ErrorKind::NotFound);
    }

    #[test]
    fn direct_io_is_read_back() {
        if !root_or_skip("direct_io_is_read_back") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let image = sparse_file(&dir.path().join("dio.img"), 8 * MIB);
        let other = sparse_file(&dir.path().join("buffered.img"), 8 * MIB);
        let with_dio = LoopGuard::attach(&image, true);
        let sysfs = |n: u32| {
            fs::read_to_string(format!("/sys/block/loop{n}/loop/dio"))
                .unwrap()
                .trim()
                .to_string()
        };
        let n = with_dio.attachment.number;
        assert_eq!(with_dio.attachment.direct_io, sysfs(n) == "1");
        eprintln!("direct I/O on this backing filesystem: {}", sysfs(n));
        let buffered = LoopGuard::attach(&other, false);
        assert!(!buffered.attachment.direct_io);
        assert_eq!(sysfs(buffered.attachment.number), "0");
        // Both keep 512-byte sectors, direct I/O or not (see LOGICAL_BLOCK_SIZE).
        for g in [&with_dio, &buffered] {
            let n = g.attachment.number;
            let lbs = fs::read_to_string(format!("/sys/block/loop{n}/queue/logical_block_size"));
            assert_eq!(lbs.unwrap().trim(), "512");
        }
    }

    #[test]
    fn deleted_backing_file_is_reported() {
        if !root_or_skip("deleted_backing_file_is_reported") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let image = sparse_file(&dir.path().join("gone (deleted)"), 8 * MIB);
        let guard = LoopGuard::attach(&image, false);
        // A name that really ends in " (deleted)" is not mistaken for an unlinked file.
        let b = backing_file(guard.device()).unwrap().unwrap();
        assert_eq!(
            (b.path, b.deleted),
            (fs::canonicalize(&image).unwrap(), false)
        );
        fs::remove_file(&image).unwrap();
        let b = backing_file(guard.device()).unwrap().unwrap();
        assert!(b.deleted);
        assert_eq!(
            b.path,
            fs::canonicalize(dir.path()).unwrap().join("gone (deleted)")
        );
        assert_eq!(guard.detach().unwrap(), Detach::Detached);
    }

    #[test]
    fn detach_refuses_mounted_device() {
        if !root_or_skip("detach_refuses_mounted_device") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let image = sparse_file(&dir.path().join("m.img"), 32 * MIB);
        let guard = LoopGuard::attach(&image, false);
        mkfs("ext4", guard.device());
        {
            let _mount = MountGuard::mount(guard.device(), &dir.path().join("mnt"), "ext4");
            let err = detach(guard.device()).unwrap_err();
            assert!(matches!(err, LoopError::DeviceBusy { .. }), "{err:?}");
            assert_eq!(err.kind(), ErrorKind::Busy);
        }
        // Still attached after the refusal.
        assert_eq!(
            find_by_backing(&image).unwrap(),
            vec![guard.device().to_path_buf()]
        );
        // A device backed by another file is left alone.
        let other = sparse_file(&dir.path().join("other.img"), MIB);
        let err = detach_backing(guard.device(), &other).unwrap_err();
        assert!(matches!(err, LoopError::NotBackedBy { .. }), "{err:?}");
        assert_eq!(
            find_by_backing(&image).unwrap(),
            vec![guard.device().to_path_buf()]
        );
        assert!(matches!(
            detach(Path::new("/dev/null")),
            Err(LoopError::NotLoopDevice { .. })
        ));
    }

    #[test]
    fn detach_while_open_is_deferred_until_close() {
        if !root_or_skip("detach_while_open_is_deferred_until_close") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let image = sparse_file(&dir.path().join("held.img"), 8 * MIB);
        let guard = LoopGuard::attach(&image, false);
        let device = guard.device().to_path_buf();
        let holder = File::open(&device).unwrap();
        assert_eq!(detach_backing(&device, &image).unwrap(), Detach::Deferred);
        drop(holder);
        // The kernel finishes the detach at the last close.
        let start = Instant::now();
        while !find_by_backing(&image).unwrap().is_empty() {
            assert!(start.elapsed() < Duration::from_secs(5), "never detached");
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(guard);
    }
}

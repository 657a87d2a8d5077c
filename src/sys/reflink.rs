//! Reflink copies (FICLONE, FICLONERANGE): the destination shares the source's extents,
//! copy-on-write.
//!
//! Only some filesystems can (xfs with reflink, btrfs); elsewhere the call fails with a
//! [`ReflinkError::NotSupported`] so that callers can fall back to copying.

use std::os::fd::{AsFd, AsRawFd};

use crate::api::ErrorKind;

// FICLONE is _IOW(0x94, 9, int) and takes the source fd by value.
nix::ioctl_write_int_bad!(ficlone_ioctl, nix::request_code_write!(0x94, 9, 4));

/// `struct file_clone_range` of <linux/fs.h>.
#[repr(C)]
pub struct FileCloneRange {
    src_fd: i64,
    src_offset: u64,
    src_length: u64,
    dest_offset: u64,
}
const _: () = assert!(std::mem::size_of::<FileCloneRange>() == 32);

// FICLONERANGE is _IOW(0x94, 13, struct file_clone_range).
nix::ioctl_write_ptr!(ficlonerange_ioctl, 0x94, 13, FileCloneRange);

/// Errors of FICLONE.
#[derive(Debug, thiserror::Error)]
pub enum ReflinkError {
    #[error("Reflink (FICLONE) is not supported here")]
    NotSupported {
        #[source]
        source: nix::Error,
    },
    #[error("Reflink (FICLONE) failed")]
    Clone {
        #[source]
        source: nix::Error,
    },
}

impl ReflinkError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ReflinkError::NotSupported { .. } => ErrorKind::Unavailable,
            ReflinkError::Clone {
                source: nix::Error::ENOSPC | nix::Error::EDQUOT,
            } => ErrorKind::QuotaExceeded,
            ReflinkError::Clone { .. } => ErrorKind::Io,
        }
    }

    /// True when the caller should fall back to copying.
    pub fn is_not_supported(&self) -> bool {
        matches!(self, ReflinkError::NotSupported { .. })
    }
}

/// Makes `dst` (open for writing) a copy-on-write clone of all of `src` (open for reading).
///
/// Different filesystems (EXDEV), filesystems without reflink (EOPNOTSUPP, ENOTTY) and
/// unsuitable files (EINVAL) give [`ReflinkError::NotSupported`].
pub fn ficlone(src: impl AsFd, dst: impl AsFd) -> Result<(), ReflinkError> {
    // SAFETY: both fds are open for the duration of the call; FICLONE takes the source fd as
    // a plain integer and touches no user memory.
    clone_result(unsafe { ficlone_ioctl(dst.as_fd().as_raw_fd(), src.as_fd().as_raw_fd()) })
}

/// Sorts a clone ioctl's failure into "cannot share here" and a real error.
fn clone_result(r: nix::Result<libc::c_int>) -> Result<(), ReflinkError> {
    match r {
        Ok(_) => Ok(()),
        Err(
            source @ (nix::Error::EOPNOTSUPP
            | nix::Error::EXDEV
            | nix::Error::EINVAL
            | nix::Error::ENOTTY),
        ) => Err(ReflinkError::NotSupported { source }),
        Err(source) => Err(ReflinkError::Clone { source }),
    }
}

/// Makes `len` bytes of `dst` at `dst_offset` share the extents of `src` at `src_offset`
/// (FICLONERANGE). Both offsets must be multiples of the filesystem block size, and so must
/// `len` unless the range ends at the end of `src`. Durability: like a write, the clone is
/// made durable by a later `fsync` of `dst` (see the callers).
///
/// Different filesystems (EXDEV), filesystems without reflink (EOPNOTSUPP, ENOTTY) and
/// unsuitable files or misaligned ranges (EINVAL) give [`ReflinkError::NotSupported`].
pub fn ficlone_range(
    src: impl AsFd,
    src_offset: u64,
    len: u64,
    dst: impl AsFd,
    dst_offset: u64,
) -> Result<(), ReflinkError> {
    let arg = FileCloneRange {
        src_fd: i64::from(src.as_fd().as_raw_fd()),
        src_offset,
        src_length: len,
        dest_offset: dst_offset,
    };
    // SAFETY: both fds are open for the duration of the call; `arg` is a properly laid out
    // `struct file_clone_range` that lives across the call and is only read by the kernel.
    clone_result(unsafe { ficlonerange_ioctl(dst.as_fd().as_raw_fd(), &arg) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::test_util::{root_or_skip, ScratchFs};
    use std::fs::File;
    use std::io::{Read, Write};

    const MIB: u64 = 1 << 20;

    fn clone_on(fs: &ScratchFs) -> Result<Vec<u8>, ReflinkError> {
        let src_path = fs.mountpoint().join("src");
        let mut src = File::create(&src_path).unwrap();
        src.write_all(&vec![0xa5; 256 * 1024]).unwrap();
        src.sync_all().unwrap();
        let src = File::open(&src_path).unwrap();
        let dst_path = fs.mountpoint().join("dst");
        let dst = File::create(&dst_path).unwrap();
        ficlone(&src, &dst)?;
        let mut out = Vec::new();
        File::open(&dst_path)
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        Ok(out)
    }

    #[test]
    fn ficlone_works_on_xfs() {
        if !root_or_skip("ficlone_works_on_xfs") {
            return;
        }
        let fs = ScratchFs::new("xfs", 320 * MIB);
        assert_eq!(clone_on(&fs).unwrap(), vec![0xa5; 256 * 1024]);
        // Both files now share their extents, and FIEMAP says so.
        for name in ["src", "dst"] {
            let f = File::open(fs.mountpoint().join(name)).unwrap();
            let extents = crate::sys::fiemap::fiemap(&f, 0, u64::MAX, true).unwrap();
            assert!(!extents.is_empty());
            assert!(extents.iter().all(|e| e.is_shared()), "{name}: {extents:?}");
        }
    }

    #[test]
    fn ficlone_range_shares_aligned_ranges_on_xfs_and_refuses_misaligned_ones() {
        if !root_or_skip("ficlone_range_shares_aligned_ranges_on_xfs") {
            return;
        }
        let fs = ScratchFs::new("xfs", 320 * MIB);
        let src_path = fs.mountpoint().join("src");
        let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&src_path, &data).unwrap();
        let src = File::open(&src_path).unwrap();
        let dst_path = fs.mountpoint().join("dst");
        let dst = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&dst_path)
            .unwrap();
        ficlone_range(&src, 8192, 16384, &dst, 4096).unwrap();
        let mut out = Vec::new();
        File::open(&dst_path)
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out.len(), 4096 + 16384);
        assert!(out[..4096].iter().all(|&b| b == 0));
        assert_eq!(&out[4096..], &data[8192..8192 + 16384]);
        let err = ficlone_range(&src, 100, 4096, &dst, 0).unwrap_err();
        assert!(err.is_not_supported(), "{err:?}");
    }

    #[test]
    fn ficlone_not_supported_on_ext4() {
        if !root_or_skip("ficlone_not_supported_on_ext4") {
            return;
        }
        let fs = ScratchFs::new("ext4", 32 * MIB);
        let err = clone_on(&fs).unwrap_err();
        assert!(err.is_not_supported(), "{err:?}");
    }
}

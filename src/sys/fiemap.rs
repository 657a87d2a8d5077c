//! File extent maps (FS_IOC_FIEMAP): where a file's data lies and which extents it shares
//! with reflinked copies, so that capture can skip what two clones still share.

use std::os::fd::{AsFd, AsRawFd};

use crate::api::ErrorKind;

/// The kernel ABI of `include/uapi/linux/fiemap.h`.
mod abi {
    pub const FIEMAP_FLAG_SYNC: u32 = 0x1;
    /// Extents asked for per call.
    pub const BATCH: usize = 128;

    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct FiemapExtent {
        pub fe_logical: u64,
        pub fe_physical: u64,
        pub fe_length: u64,
        pub fe_reserved64: [u64; 2],
        pub fe_flags: u32,
        pub fe_reserved: [u32; 3],
    }

    /// `struct fiemap` followed by room for BATCH extents (its flexible array member).
    #[repr(C)]
    pub struct FiemapBuf {
        pub fm_start: u64,
        pub fm_length: u64,
        pub fm_flags: u32,
        pub fm_mapped_extents: u32,
        pub fm_extent_count: u32,
        pub fm_reserved: u32,
        pub fm_extents: [FiemapExtent; BATCH],
    }

    pub const HEADER_SIZE: usize = 32;
    const _: () = assert!(std::mem::size_of::<FiemapExtent>() == 56);
    const _: () = assert!(std::mem::offset_of!(FiemapBuf, fm_extents) == HEADER_SIZE);
    const _: () = assert!(std::mem::size_of::<FiemapBuf>() == HEADER_SIZE + 56 * BATCH);

    pub const EMPTY_EXTENT: FiemapExtent = FiemapExtent {
        fe_logical: 0,
        fe_physical: 0,
        fe_length: 0,
        fe_reserved64: [0; 2],
        fe_flags: 0,
        fe_reserved: [0; 3],
    };

    // FS_IOC_FIEMAP is _IOWR('f', 11, struct fiemap): the number encodes the header's size.
    nix::ioctl_readwrite_bad!(
        fs_ioc_fiemap,
        nix::request_code_readwrite!(b'f', 11, HEADER_SIZE),
        FiemapBuf
    );
}

/// The last extent of the file.
pub const EXTENT_LAST: u32 = 0x1;
/// Location not known yet (delayed allocation).
pub const EXTENT_UNKNOWN: u32 = 0x2;
/// Delayed allocation: no location yet.
pub const EXTENT_DELALLOC: u32 = 0x4;
/// Encoded (compressed, ...): offsets inside the extent do not map linearly to the device.
pub const EXTENT_ENCODED: u32 = 0x8;
/// Encrypted data.
pub const EXTENT_DATA_ENCRYPTED: u32 = 0x80;
/// Offsets are not block-aligned.
pub const EXTENT_NOT_ALIGNED: u32 = 0x100;
/// Data stored with the metadata (inline).
pub const EXTENT_DATA_INLINE: u32 = 0x200;
/// Data packed with other files' tails.
pub const EXTENT_DATA_TAIL: u32 = 0x400;
/// Allocated but unwritten: reads as zeroes.
pub const EXTENT_UNWRITTEN: u32 = 0x800;
/// The filesystem merged several extents into this one for the report.
pub const EXTENT_MERGED: u32 = 0x1000;
/// Shared with another file (a reflink or snapshot).
pub const EXTENT_SHARED: u32 = 0x2000;

/// One extent of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Offset in the file, bytes.
    pub logical: u64,
    /// Offset on the device, bytes (0 when unknown).
    pub physical: u64,
    pub length: u64,
    /// `EXTENT_*` flags.
    pub flags: u32,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.logical.saturating_add(self.length)
    }
    pub fn is_shared(&self) -> bool {
        self.flags & EXTENT_SHARED != 0
    }
    pub fn is_unwritten(&self) -> bool {
        self.flags & EXTENT_UNWRITTEN != 0
    }
    /// True when the extent is allocated but unwritten and otherwise plain (no flag but
    /// `LAST`, `MERGED`, `SHARED` and `UNWRITTEN`): its bytes read as zeros.
    pub fn reads_as_zero(&self) -> bool {
        self.is_unwritten()
            && self.flags & !(EXTENT_LAST | EXTENT_MERGED | EXTENT_SHARED | EXTENT_UNWRITTEN) == 0
    }
    /// True when the extent has a known device location that its bytes map to one for one
    /// (offset `x` in the extent lies at `physical + x`) and holds written data: no flag but
    /// `LAST`, `MERGED` and `SHARED` (no delayed, unknown, encoded, encrypted, inline, tail,
    /// unaligned or unwritten extents; unknown future flags count against it too).
    pub fn is_plain(&self) -> bool {
        self.flags & !(EXTENT_LAST | EXTENT_MERGED | EXTENT_SHARED) == 0 && self.physical != 0
    }
}

/// Errors of FS_IOC_FIEMAP.
#[derive(Debug, thiserror::Error)]
pub enum FiemapError {
    #[error("Extent maps (FIEMAP) are not supported here")]
    NotSupported {
        #[source]
        source: nix::Error,
    },
    #[error("FIEMAP failed at offset {offset}")]
    Fiemap {
        offset: u64,
        #[source]
        source: nix::Error,
    },
}

impl FiemapError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            FiemapError::NotSupported { .. } => ErrorKind::Unavailable,
            FiemapError::Fiemap { .. } => ErrorKind::Io,
        }
    }

    /// True when the caller should fall back to comparing data.
    pub fn is_not_supported(&self) -> bool {
        matches!(self, FiemapError::NotSupported { .. })
    }
}

/// The extents of `file` that overlap `[start, start + length)`, in file order. Holes are
/// simply absent. With `sync`, dirty data is written back first so that its extents are
/// real rather than delayed allocations.
pub fn fiemap(
    file: impl AsFd,
    start: u64,
    length: u64,
    sync: bool,
) -> Result<Vec<Extent>, FiemapError> {
    let end = start.saturating_add(length);
    let mut out = Vec::new();
    let mut pos = start;
    let mut buf = Box::new(abi::FiemapBuf {
        fm_start: 0,
        fm_length: 0,
        fm_flags: 0,
        fm_mapped_extents: 0,
        fm_extent_count: 0,
        fm_reserved: 0,
        fm_extents: [abi::EMPTY_EXTENT; abi::BATCH],
    });
    while pos < end {
        buf.fm_start = pos;
        buf.fm_length = end - pos;
        buf.fm_flags = if sync { abi::FIEMAP_FLAG_SYNC } else { 0 };
        buf.fm_mapped_extents = 0;
        buf.fm_extent_count = abi::BATCH as u32;
        // SAFETY: valid borrowed fd; `buf` is a live, writable struct fiemap with room for
        // fm_extent_count extents right after its header, as the kernel requires.
        let res = unsafe { abi::fs_ioc_fiemap(file.as_fd().as_raw_fd(), &mut *buf) };
        match res {
            Ok(_) => {}
            Err(source @ (nix::Error::EOPNOTSUPP | nix::Error::ENOTTY)) => {
                return Err(FiemapError::NotSupported { source })
            }
            Err(source) => {
                return Err(FiemapError::Fiemap {
                    offset: pos,
                    source,
                })
            }
        }
        let mapped = (buf.fm_mapped_extents as usize).min(abi::BATCH);
        if mapped == 0 {
            break;
        }
        let mut last = false;
        for e in &buf.fm_extents[..mapped] {
            out.push(Extent {
                logical: e.fe_logical,
                physical: e.fe_physical,
                length: e.fe_length,
                flags: e.fe_flags,
            });
            last |= e.fe_flags & EXTENT_LAST != 0;
        }
        let next = out.last().map_or(end, Extent::end);
        // Stop at the file's last extent, and never loop on a map that does not advance.
        if last || next <= pos {
            break;
        }
        pos = next;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::unix::fs::FileExt;

    #[test]
    fn maps_data_and_skips_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse");
        let f = File::create(&path).unwrap();
        f.set_len(4 << 20).unwrap();
        f.write_all_at(&[1u8; 65536], 0).unwrap();
        f.write_all_at(&[2u8; 65536], 1 << 20).unwrap();
        let extents = match fiemap(&f, 0, u64::MAX, true) {
            Err(e) if e.is_not_supported() => {
                eprintln!("SKIPPED maps_data_and_skips_holes: no FIEMAP on the temp filesystem");
                return;
            }
            other => other.unwrap(),
        };
        let covered: u64 = extents.iter().map(|e| e.length).sum();
        assert_eq!(covered, 2 * 65536, "{extents:?}");
        assert_eq!(extents[0].logical, 0);
        assert_eq!(extents.last().unwrap().end(), (1 << 20) + 65536);
        assert!(extents.iter().all(|e| !e.is_shared()));
        // A window in the hole maps nothing; one inside the second extent maps it.
        assert!(fiemap(&f, 128 << 10, 512 << 10, false).unwrap().is_empty());
        let inner = fiemap(&f, (1 << 20) + 4096, 4096, false).unwrap();
        assert_eq!(inner.len(), 1);
        assert!(inner[0].logical <= (1 << 20) + 4096 && inner[0].end() >= (1 << 20) + 8192);
    }
}

//! What the NBD server serves: the [`Export`] trait and [`FileExport`], a sparse regular
//! file accessed with positional I/O. Calls here block; the server runs them on each
//! connection's own thread. May call `nix` safe wrappers and `std::fs`, nothing of ours above it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use nix::errno::Errno;
use nix::fcntl::{fallocate, posix_fadvise, FallocateFlags, PosixFadviseAdvice};
use nix::unistd::{lseek, Whence};

use super::NbdError;
use crate::failpoint;

/// One run of bytes with the same allocation status, as `block_status` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    /// Not allocated in the backing store.
    pub hole: bool,
    /// Known to read as zeroes.
    pub zero: bool,
}

/// A byte range served over NBD. Implementations must be safe to call from many threads
/// at once; each call is independent (positional), and `flush` covers every write that
/// returned before it started.
pub trait Export: Send + Sync + 'static {
    fn size(&self) -> u64;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// With `fua`, the data is durable when this returns.
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()>;
    fn flush(&self) -> io::Result<()>;
    /// A hint that the range is no longer needed; its content is unspecified afterwards.
    fn trim(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes the range read as zeroes; `may_trim` allows deallocating it.
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()>;
    /// Allocation status of `[offset, offset + len)`: consecutive extents from `offset`,
    /// covering at most `len` bytes (fewer is allowed; at least one extent).
    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>>;

    /// Zeroes the range only if that is much cheaper than writing zeroes
    /// (`NBD_CMD_FLAG_FAST_ZERO`); otherwise fails with `ErrorKind::Unsupported` without
    /// changing anything. The default cannot do it fast.
    fn write_zeroes_fast(&self, _offset: u64, _len: u64, _may_trim: bool) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }

    /// Whether clients may only read (`NBD_FLAG_READ_ONLY`; writes then fail with EPERM
    /// before reaching the export). The default is read-write.
    fn read_only(&self) -> bool {
        false
    }

    /// A hint to prefetch the range (`NBD_CMD_CACHE`). The default does nothing.
    fn cache(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }

    /// A hint that writes of these `(offset, len)` ranges (received together) follow, so
    /// per-write bookkeeping can be done once for all of them. Failures are left for the
    /// writes themselves to report. The default does nothing.
    fn prepare_writes(&self, _ranges: &[(u64, u64)]) {}

    /// Whether a write of this range would first wait for bookkeeping of its own (a sync
    /// of write intents), so that a server may serve other requests meanwhile and group
    /// such writes with [`prepare_writes`](Self::prepare_writes). The default: never.
    fn write_needs_sync(&self, _offset: u64, _len: u64) -> bool {
        false
    }

    /// [`read_at`](Self::read_at) if it can be done without waiting for the disk (a page
    /// cache hit): `None` when it cannot (`buf` is then unspecified) and the caller should
    /// read where blocking is fine. The default never knows, so always `None`.
    fn read_cached(&self, _buf: &mut [u8], _offset: u64) -> Option<io::Result<()>> {
        None
    }

    /// The open file that holds exactly what [`read_at`](Self::read_at) returns for
    /// `[offset, offset + len)`, at the same offsets, so that a server may send those bytes
    /// straight from the page cache (`crate::sys::splice`) instead of reading them into a
    /// buffer first. `None` (the default) where reads are computed, or for a range that is
    /// not inside the export.
    fn read_file(&self, _offset: u64, _len: u64) -> Option<&File> {
        None
    }
}

/// Longest run of extents one `block_status` call returns; clients ask again for more.
const MAX_EXTENTS: usize = 1024;
/// Chunk used when zeroes must be written as data.
const ZERO_CHUNK: usize = 1024 * 1024;

/// A sparse regular file exported as is. Its size is fixed when opened.
///
/// A failed fsync poisons the export: the kernel may have dropped the dirty pages it
/// covered and a retried fsync can then succeed without them ("fsyncgate"), so every later
/// FLUSH and FUA write fails too, until the export is opened again.
#[derive(Debug)]
pub struct FileExport {
    file: File,
    size: u64,
    path: PathBuf,
    read_only: bool,
    /// The first fsync failure, once there was one.
    fsync_error: OnceLock<String>,
}

impl FileExport {
    /// Opens an existing regular file for reading and writing.
    pub fn open(path: &Path) -> Result<FileExport, NbdError> {
        Self::open_mode(path, false)
    }

    /// Opens an existing regular file read-only; clients see `NBD_FLAG_READ_ONLY`.
    pub fn open_read_only(path: &Path) -> Result<FileExport, NbdError> {
        Self::open_mode(path, true)
    }

    fn open_mode(path: &Path, read_only: bool) -> Result<FileExport, NbdError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| NbdError::OpenBacking {
                path: path.to_path_buf(),
                source,
            })?;
        let meta = file.metadata().map_err(|source| NbdError::OpenBacking {
            path: path.to_path_buf(),
            source,
        })?;
        if !meta.file_type().is_file() {
            return Err(NbdError::NotRegularFile {
                path: path.to_path_buf(),
            });
        }
        Ok(FileExport {
            file,
            size: meta.len(),
            path: path.to_path_buf(),
            read_only,
            fsync_error: OnceLock::new(),
        })
    }

    /// Creates a new sparse file of `size` bytes (refusing to overwrite) and opens it.
    pub fn create(path: &Path, size: u64) -> Result<FileExport, NbdError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| NbdError::OpenBacking {
                path: path.to_path_buf(),
                source,
            })?;
        file.set_len(size).map_err(|source| NbdError::OpenBacking {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(FileExport {
            file,
            size,
            path: path.to_path_buf(),
            read_only: false,
            fsync_error: OnceLock::new(),
        })
    }

    /// The backing file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether an fsync of this export failed (its later flushes all fail).
    pub fn fsync_failed(&self) -> bool {
        self.fsync_error.get().is_some()
    }

    /// `fdatasync`, never retried after a failure: once one failed, this fails for good.
    fn sync(&self) -> io::Result<()> {
        if let Some(first) = self.fsync_error.get() {
            return Err(io::Error::other(format!(
                "an earlier fsync of {} failed ({first}), so the writes it covered may be lost \
                 and no later flush can be trusted (detach and re-attach the volume)",
                self.path.display()
            )));
        }
        let result = failpoint::check("nbd.export.fsync").and_then(|()| self.file.sync_data());
        if let Err(e) = &result {
            let _ = self.fsync_error.set(e.to_string());
            tracing::error!(path = %self.path.display(), error = %e, "fsync of an NBD export failed; every later flush of it fails until it is re-opened");
        }
        result
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64, errno: i32) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::from_raw_os_error(errno)),
        }
    }

    fn fallocate(&self, mode: FallocateFlags, offset: u64, len: u64) -> Result<(), Errno> {
        if len == 0 {
            return Ok(());
        }
        let off = i64::try_from(offset).map_err(|_| Errno::EINVAL)?;
        let len = i64::try_from(len).map_err(|_| Errno::EINVAL)?;
        fallocate(self.file.as_raw_fd(), mode, off, len)
    }

    /// Zeroes with fallocate only; `Err(EOPNOTSUPP)` when the filesystem cannot.
    fn zero_fast(&self, offset: u64, len: u64, may_trim: bool) -> Result<(), Errno> {
        let keep = FallocateFlags::FALLOC_FL_KEEP_SIZE;
        if may_trim {
            match self.fallocate(FallocateFlags::FALLOC_FL_PUNCH_HOLE | keep, offset, len) {
                Err(Errno::EOPNOTSUPP) => {}
                other => return other,
            }
        }
        self.fallocate(FallocateFlags::FALLOC_FL_ZERO_RANGE | keep, offset, len)
    }

    fn seek(&self, offset: u64, whence: Whence) -> Result<Option<u64>, Errno> {
        let off = i64::try_from(offset).map_err(|_| Errno::EINVAL)?;
        match lseek(self.file.as_raw_fd(), off, whence) {
            // No data (or hole) at or after `offset`.
            Err(Errno::ENXIO) => Ok(None),
            Err(e) => Err(e),
            Ok(pos) => Ok(u64::try_from(pos).ok()),
        }
    }
}

impl Export for FileExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64, libc::EINVAL)?;
        self.file.read_exact_at(buf, offset)
    }

    fn read_file(&self, offset: u64, len: u64) -> Option<&File> {
        self.check_range(offset, len, libc::EINVAL).ok()?;
        Some(&self.file)
    }

    fn read_cached(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
        if let Err(e) = self.check_range(offset, buf.len() as u64, libc::EINVAL) {
            return Some(Err(e));
        }
        let mut done = 0;
        while done < buf.len() {
            match crate::sys::uio::pread_nowait(&self.file, &mut buf[done..], offset + done as u64)
            {
                Ok(Some(0)) => return Some(Err(io::ErrorKind::UnexpectedEof.into())),
                Ok(Some(n)) => done += n,
                Ok(None) => return None,
                // No RWF_NOWAIT here: a plain read, as if the data were cached.
                Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                    return Some(
                        self.file
                            .read_exact_at(&mut buf[done..], offset + done as u64),
                    );
                }
                Err(e) => return Some(Err(e)),
            }
        }
        Some(Ok(()))
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.check_writable()?;
        self.check_range(offset, buf.len() as u64, libc::ENOSPC)?;
        failpoint::check("nbd.export.write")?;
        self.file.write_all_at(buf, offset)?;
        if fua {
            self.sync()?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.sync()
    }

    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        self.check_range(offset, len, libc::ENOSPC)?;
        let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        match self.fallocate(mode, offset, len) {
            // Trim is advisory: a filesystem without hole punching keeps the data.
            Ok(()) | Err(Errno::EOPNOTSUPP) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
        self.check_writable()?;
        self.check_range(offset, len, libc::ENOSPC)?;
        match self.zero_fast(offset, len, may_trim) {
            Ok(()) => return Ok(()),
            Err(Errno::EOPNOTSUPP) => {}
            Err(e) => return Err(e.into()),
        }
        let zeroes = vec![0u8; ZERO_CHUNK.min(len as usize)];
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (end - pos).min(zeroes.len() as u64) as usize;
            self.file.write_all_at(&zeroes[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }

    fn write_zeroes_fast(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
        self.check_writable()?;
        self.check_range(offset, len, libc::ENOSPC)?;
        match self.zero_fast(offset, len, may_trim) {
            Err(Errno::EOPNOTSUPP) => Err(io::ErrorKind::Unsupported.into()),
            other => other.map_err(io::Error::from),
        }
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.check_range(offset, len, libc::EINVAL)?;
        let end = offset + len;
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < MAX_EXTENTS {
            let data = match self.seek(pos, Whence::SeekData) {
                Ok(d) => d.unwrap_or(end).min(end),
                // No SEEK_DATA support: everything is (possibly) data.
                Err(Errno::EINVAL) | Err(Errno::EOPNOTSUPP) => {
                    out.push(Extent {
                        len: end - pos,
                        hole: false,
                        zero: false,
                    });
                    break;
                }
                Err(e) => return Err(e.into()),
            };
            if data > pos {
                out.push(Extent {
                    len: data - pos,
                    hole: true,
                    zero: true,
                });
                pos = data;
                continue;
            }
            let hole = self.seek(pos, Whence::SeekHole)?.unwrap_or(end).min(end);
            // A racing write can make SEEK_HOLE land before `pos`; claim one byte of data.
            let hole = hole.max(pos + 1);
            out.push(Extent {
                len: hole - pos,
                hole: false,
                zero: false,
            });
            pos = hole;
        }
        Ok(out)
    }

    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        let off = i64::try_from(offset).map_err(|_| io::Error::from(Errno::EINVAL))?;
        let len = i64::try_from(len).map_err(|_| io::Error::from(Errno::EINVAL))?;
        posix_fadvise(
            self.file.as_raw_fd(),
            off,
            len,
            PosixFadviseAdvice::POSIX_FADV_WILLNEED,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_export_reads_writes_and_maps_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let e = FileExport::create(&path, 4 << 20).unwrap();
        assert_eq!(e.size(), 4 << 20);
        let all = e.block_status(0, 4 << 20).unwrap();
        assert_eq!(all.len(), 1);
        assert!(all[0].hole && all[0].zero);

        e.write_at(&[0xab; 65536], 1 << 20, true).unwrap();
        let map = e.block_status(0, 4 << 20).unwrap();
        assert_eq!(map.iter().map(|x| x.len).sum::<u64>(), 4 << 20);
        assert!(map.iter().any(|x| !x.hole));
        let mut buf = vec![0u8; 65536];
        e.read_at(&mut buf, 1 << 20).unwrap();
        assert!(buf.iter().all(|&b| b == 0xab));

        e.write_zeroes(1 << 20, 4096, false).unwrap();
        e.read_at(&mut buf[..4096], 1 << 20).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0));
        e.trim(1 << 20, 65536).unwrap();
        e.flush().unwrap();

        let err = e.read_at(&mut buf, (4 << 20) - 1).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
        let err = e.write_at(&buf, u64::MAX - 1, false).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
    }

    #[test]
    fn open_refuses_non_regular_files() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            FileExport::open(dir.path()),
            Err(NbdError::NotRegularFile { .. }) | Err(NbdError::OpenBacking { .. })
        ));
        assert!(FileExport::open(&dir.path().join("missing")).is_err());
    }
}

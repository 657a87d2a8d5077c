//! Where the store's blobs live: a small, object-store shaped `Backend` trait, a filesystem
//! backend and an in-memory backend (with fault injection, for crash tests).
//!
//! Keys are `/`-separated relative paths (`snapshots/ss-xxxxxxxx/manifest`). A blob appears
//! under its key only through `BlobWriter::commit`, atomically and durably; dropping a writer
//! without committing discards it. This is exactly what an S3 multipart upload offers, so an
//! object-store backend fits the same trait. Knows nothing of the format above it.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::failpoint;
use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};

/// A streaming writer for one blob; nothing is visible under the key before `commit`.
pub trait BlobWriter: Write + Send {
    /// Makes the blob durable and visible under its key atomically. A failure means the blob
    /// is lost (a failed fsync is never retried).
    fn commit(self: Box<Self>) -> io::Result<()>;

    /// Appends `len` bytes of `src` at `src_offset` by sharing their extents (a reflink,
    /// copy-on-write) instead of copying them, so the blob holds those bytes as if written.
    /// The blob's length so far and `src_offset` must be multiples of 4 KiB, and so must `len`
    /// unless the range ends at the end of `src`. An error of kind `Unsupported` means nothing
    /// was appended and the caller must write the bytes instead (the default: a backend or
    /// filesystem that cannot share extents, another filesystem, a misaligned range).
    fn append_clone(&mut self, _src: &File, _src_offset: u64, _len: u64) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }

    /// Appends `len` zero bytes. A backend that can leave them unwritten (a hole in a file)
    /// does; the default writes them.
    fn append_zeros(&mut self, len: u64) -> io::Result<()> {
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        let mut left = len;
        while left > 0 {
            let n = left.min(ZEROS.len() as u64) as usize;
            self.write_all(&ZEROS[..n])?;
            left -= n as u64;
        }
        Ok(())
    }
}

/// A blob opened by `Backend::open_stream`. It keeps reading the bytes it was opened on even
/// if the key is deleted meanwhile (a fold's old delta generation), like an open file.
pub trait BlobStream: Send + Sync {
    /// Reads exactly `buf.len()` bytes at `offset`; a short blob is `UnexpectedEof`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Makes `len` bytes of `dst` at `dst_offset` share the extents of this blob at `offset`
    /// (a reflink) instead of writing them; `dst`'s `fsync` makes them durable like a write.
    /// Offsets must be multiples of 4 KiB, and `len` too unless the range ends the blob. Kind
    /// `Unsupported` means nothing changed and the caller must write the bytes.
    fn clone_to(&self, offset: u64, len: u64, dst: &File, dst_offset: u64) -> io::Result<()>;
    /// A private copy of this blob that shares all its extents (a reflink into an unnamed
    /// file of the same filesystem, gone when dropped or after a crash), to make `clone_to`s
    /// from while this blob is read: on xfs a clone locks its source file, so clones and
    /// reads of one file wait for each other. `None` (the default) where the blob cannot be
    /// shared that way; the caller then clones from this blob itself.
    fn private_copy(&self) -> io::Result<Option<Box<dyn BlobStream>>> {
        Ok(None)
    }
}

/// `open_stream` of a backend without handles: every read is a `Backend::read_at`, and
/// nothing can be shared.
struct KeyStream<'a, B: ?Sized> {
    backend: &'a B,
    key: String,
}

impl<B: Backend + ?Sized> BlobStream for KeyStream<'_, B> {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.backend.read_at(&self.key, offset, buf)
    }

    fn clone_to(&self, _: u64, _: u64, _: &File, _: u64) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

/// A blob file of `FsBackend` opened once for a stream of reads, and the directory it is in.
struct FsStream {
    file: File,
    dir: PathBuf,
}

impl BlobStream for FsStream {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn clone_to(&self, offset: u64, len: u64, dst: &File, dst_offset: u64) -> io::Result<()> {
        crate::sys::reflink::ficlone_range(&self.file, offset, len, dst, dst_offset)
            .map_err(reflink_io)
    }

    fn private_copy(&self) -> io::Result<Option<Box<dyn BlobStream>>> {
        // O_TMPFILE: an inode without a name in the blob's directory (so on its filesystem),
        // freed on the last close or, after a crash, by the filesystem's own recovery.
        let copy = match OpenOptions::new()
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_TMPFILE)
            .open(&self.dir)
        {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(None),
            Err(e) => return Err(e),
        };
        match crate::sys::reflink::ficlone(&self.file, &copy) {
            Ok(()) => Ok(Some(Box::new(FsStream {
                file: copy,
                dir: self.dir.clone(),
            }))),
            Err(e) if e.is_not_supported() => Ok(None),
            Err(e) => Err(reflink_io(e)),
        }
    }
}

/// The storage a `Store` sits on.
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// Starts writing a blob that will replace `key` on commit.
    fn put(&self, key: &str) -> io::Result<Box<dyn BlobWriter>>;
    /// Reads exactly `buf.len()` bytes at `offset`; a short blob is `UnexpectedEof`.
    fn read_at(&self, key: &str, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Opens blob `key` for a stream of reads in mostly ascending order (restore, verify):
    /// one handle for all of them, so a filesystem keeps its read-ahead going between reads,
    /// which separate `read_at` calls (each opening the blob afresh) cannot. The default reads
    /// through `read_at`.
    fn open_stream<'a>(&'a self, key: &str) -> io::Result<Box<dyn BlobStream + 'a>> {
        Ok(Box::new(KeyStream {
            backend: self,
            key: key.to_string(),
        }))
    }
    /// The blob's length; `NotFound` when absent.
    fn size(&self, key: &str) -> io::Result<u64>;
    /// Every key starting with `prefix`, sorted; includes leftovers of unfinished writes
    /// (for the filesystem backend, `*.tmp-*` files) so that recovery can remove them.
    fn list(&self, prefix: &str) -> io::Result<Vec<String>>;
    /// Removes a blob durably; an absent key is not an error.
    fn delete(&self, key: &str) -> io::Result<()>;

    /// The extents of blob `key` overlapping `len` bytes at `offset`, after writing back any
    /// dirty data; `None` (the default) where blobs are not files of a local filesystem that
    /// reports extents.
    fn extents(&self, _key: &str, _offset: u64, _len: u64) -> io::Result<Option<BlobExtents>> {
        Ok(None)
    }
}

/// Where part of a blob's bytes lie on its filesystem (FIEMAP), for finding extents it shares
/// with another file of the same filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobExtents {
    /// The filesystem's device number (`st_dev`): device offsets compare only within one.
    pub device: u64,
    /// The extents overlapping the range asked for, in file order; holes are absent.
    pub extents: Vec<crate::sys::fiemap::Extent>,
}

/// A reflink error as an `io::Error`: "not supported here" becomes kind `Unsupported`.
fn reflink_io(e: crate::sys::reflink::ReflinkError) -> io::Error {
    use crate::sys::reflink::ReflinkError;
    match e {
        ReflinkError::NotSupported { source } => {
            io::Error::new(io::ErrorKind::Unsupported, source.desc())
        }
        ReflinkError::Clone { source } => io::Error::from(source),
    }
}

/// Reads a whole blob (for small blobs: manifests, block-hash files).
pub fn read_all(b: &dyn Backend, key: &str, limit: u64) -> io::Result<Vec<u8>> {
    let len = b.size(key)?;
    if len > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{key} is {len} bytes, more than the {limit} allowed"),
        ));
    }
    let mut buf = vec![0u8; len as usize];
    b.read_at(key, 0, &mut buf)?;
    Ok(buf)
}

/// Marks a key as a leftover of an unfinished write.
pub const TMP_MARK: &str = ".tmp-";

/// Blobs as files under a root directory: temporary name, fsync, rename, fsync the directory.
#[derive(Debug)]
pub struct FsBackend {
    root: PathBuf,
}

impl FsBackend {
    pub fn new(root: &Path) -> FsBackend {
        FsBackend {
            root: root.to_path_buf(),
        }
    }

    fn path(&self, key: &str) -> io::Result<PathBuf> {
        if key.is_empty()
            || key.starts_with('/')
            || key
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{key:?} is not a valid key"),
            ));
        }
        Ok(self.root.join(key))
    }

    fn walk(&self, dir: &Path, rel: &str, out: &mut Vec<String>) -> io::Result<()> {
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let key = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            if entry.file_type()?.is_dir() {
                self.walk(&entry.path(), &key, out)?;
            } else {
                out.push(key);
            }
        }
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    failpoint::check("store.dir.fsync")?;
    File::open(dir)?.sync_all()
}

/// Creates `dir` (and missing parents) and makes each new entry durable.
fn create_dir_durable(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dir_durable(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(e),
    }
    match dir.parent() {
        Some(parent) => sync_dir(parent),
        None => Ok(()),
    }
}

struct FsWriter {
    file: Option<BufWriter<File>>,
    /// Bytes handed to `write`, and the writeback started behind them.
    written: u64,
    writeback: crate::sys::writeback::Streamer,
    tmp: PathBuf,
    dest: PathBuf,
    /// The backend's root, which an abort never removes.
    root: PathBuf,
}

/// Writeback of a large blob starts every `WRITEBACK_STEP` bytes and is waited for
/// `WRITEBACK_LAG` bytes behind the writer, so the disk writes while the blob streams and
/// `commit`'s fsync is short (durability still comes from that fsync alone).
const WRITEBACK_STEP: u64 = 8 << 20;
const WRITEBACK_LAG: u64 = 64 << 20;

impl FsWriter {
    fn wrote(&mut self, n: usize) {
        self.written += n as u64;
        if let Some(f) = &self.file {
            let on_file = self.written - f.buffer().len() as u64;
            self.writeback.wrote(f.get_ref(), on_file);
        }
    }

    fn file(&mut self) -> io::Result<&mut BufWriter<File>> {
        self.file
            .as_mut()
            .ok_or_else(|| io::Error::other("blob writer already committed"))
    }
}

impl Write for FsWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        failpoint::check("store.blob.write")?;
        let n = self.file()?.write(buf)?;
        self.wrote(n);
        Ok(n)
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        failpoint::check("store.blob.write")?;
        self.file()?.write_all(buf)?;
        self.wrote(buf.len());
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file()?.flush()
    }
}

impl BlobWriter for FsWriter {
    fn append_clone(&mut self, src: &File, src_offset: u64, len: u64) -> io::Result<()> {
        // A cloned write is still a write of this blob: the same failpoint covers it.
        failpoint::check("store.blob.write")?;
        let at = self.written;
        let f = self.file()?;
        f.flush()?;
        let file = f.get_mut();
        crate::sys::reflink::ficlone_range(src, src_offset, len, &*file, at).map_err(reflink_io)?;
        // FICLONERANGE leaves the file offset alone: later writes go after the clone.
        file.seek(SeekFrom::Start(at + len))?;
        self.written += len;
        Ok(())
    }

    fn append_zeros(&mut self, len: u64) -> io::Result<()> {
        failpoint::check("store.blob.write")?;
        let at = self.written;
        let f = self.file()?;
        f.flush()?;
        // Past the end of the file: a hole, which reads as zeros (`commit` sets the length
        // should the blob end in one).
        f.get_mut().seek(SeekFrom::Start(at + len))?;
        self.written += len;
        Ok(())
    }

    fn commit(mut self: Box<Self>) -> io::Result<()> {
        // On any error `Drop` removes the temporary: the data is lost either way.
        let file = self
            .file
            .take()
            .ok_or_else(|| io::Error::other("blob writer already committed"))?;
        let file = file.into_inner().map_err(|e| e.into_error())?;
        if file.metadata()?.len() < self.written {
            file.set_len(self.written)?;
        }
        failpoint::check("store.blob.fsync")?;
        // This fsync also makes extents shared by `append_clone` durable: FICLONERANGE first
        // writes back the source range (xfs and btrfs flush both ranges before remapping), the
        // remap is a metadata change of this inode (xfs logs it in a transaction that this
        // fsync forces to the log; btrfs marks the inode for a full sync after a clone, so its
        // next fsync logs the cloned extents), exactly like allocated extents after a write.
        file.sync_all()?;
        drop(file);
        failpoint::check("store.blob.rename")?;
        fs::rename(&self.tmp, &self.dest)?;
        match self.dest.parent() {
            Some(dir) => sync_dir(dir),
            None => Ok(()),
        }
    }
}

impl Drop for FsWriter {
    fn drop(&mut self) {
        // After a successful commit the temporary no longer exists; otherwise this aborts,
        // and a directory the aborted blob was the only thing in goes with it.
        if fs::remove_file(&self.tmp).is_ok() {
            if let Some(dir) = self.tmp.parent().filter(|d| *d != self.root) {
                let _ = fs::remove_dir(dir);
            }
        }
    }
}

impl Backend for FsBackend {
    fn put(&self, key: &str) -> io::Result<Box<dyn BlobWriter>> {
        let dest = self.path(key)?;
        if let Some(dir) = dest.parent() {
            create_dir_durable(dir)?;
        }
        let tmp = PathBuf::from(format!(
            "{}{TMP_MARK}{:016x}",
            dest.display(),
            rand::random::<u64>()
        ));
        failpoint::check("store.blob.create")?;
        let file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        Ok(Box::new(FsWriter {
            // Small buffer: big writes (delta buffers of 1 MiB) bypass it without a copy.
            file: Some(BufWriter::with_capacity(256 << 10, file)),
            written: 0,
            writeback: crate::sys::writeback::Streamer::new(WRITEBACK_STEP, WRITEBACK_LAG),
            tmp,
            dest,
            root: self.root.clone(),
        }))
    }

    fn read_at(&self, key: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        File::open(self.path(key)?)?.read_exact_at(buf, offset)
    }

    fn open_stream<'a>(&'a self, key: &str) -> io::Result<Box<dyn BlobStream + 'a>> {
        let path = self.path(key)?;
        let file = File::open(&path)?;
        // A larger read-ahead window; only a hint, so a refusal changes nothing.
        let _ = posix_fadvise(
            file.as_raw_fd(),
            0,
            0,
            PosixFadviseAdvice::POSIX_FADV_SEQUENTIAL,
        );
        let dir = path
            .parent()
            .map_or_else(|| self.root.clone(), Path::to_path_buf);
        Ok(Box::new(FsStream { file, dir }))
    }

    fn size(&self, key: &str) -> io::Result<u64> {
        Ok(fs::metadata(self.path(key)?)?.len())
    }

    fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
        // Walk from the deepest directory the prefix names, then filter.
        let dir_part = match prefix.rfind('/') {
            Some(i) => &prefix[..i],
            None => "",
        };
        let start = if dir_part.is_empty() {
            self.root.clone()
        } else {
            self.path(dir_part)?
        };
        let mut out = Vec::new();
        self.walk(&start, dir_part, &mut out)?;
        out.retain(|k| k.starts_with(prefix));
        out.sort();
        Ok(out)
    }

    fn extents(&self, key: &str, offset: u64, len: u64) -> io::Result<Option<BlobExtents>> {
        use crate::sys::fiemap::{fiemap, FiemapError};
        use std::os::unix::fs::MetadataExt;
        let file = File::open(self.path(key)?)?;
        let device = file.metadata()?.dev();
        match fiemap(&file, offset, len, true) {
            Ok(extents) => Ok(Some(BlobExtents { device, extents })),
            Err(FiemapError::NotSupported { .. }) => Ok(None),
            Err(FiemapError::Fiemap { source, .. }) => Err(io::Error::from(source)),
        }
    }

    fn delete(&self, key: &str) -> io::Result<()> {
        let path = self.path(key)?;
        failpoint::check("store.delete")?;
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
        let Some(dir) = path.parent() else {
            return Ok(());
        };
        sync_dir(dir)?;
        // Drop the directory once it is empty (a deleted snapshot leaves nothing behind).
        if dir != self.root && fs::remove_dir(dir).is_ok() {
            if let Some(up) = dir.parent() {
                sync_dir(up)?;
            }
        }
        Ok(())
    }
}

/// Blobs in memory: for fast tests. `fail_after(n)` makes the n-th mutating operation from now
/// (a commit or a delete) and every one after it fail, which is how crash tests stop the store
/// at each step: committed blobs are exactly what a crash would leave behind.
#[derive(Debug, Default)]
pub struct MemBackend {
    blobs: Mutex<BTreeMap<String, Arc<Vec<u8>>>>,
    ops_left: AtomicU64,
}

impl MemBackend {
    pub fn new() -> MemBackend {
        MemBackend {
            blobs: Mutex::default(),
            ops_left: AtomicU64::new(u64::MAX),
        }
    }

    /// Lets `n` more mutating operations succeed, then fails the rest.
    pub fn fail_after(&self, n: u64) {
        self.ops_left.store(n, Ordering::SeqCst);
    }

    /// Stops injecting failures.
    pub fn heal(&self) {
        self.ops_left.store(u64::MAX, Ordering::SeqCst);
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Vec<u8>>>> {
        // A panic while holding this lock can only come from a test; the map stays usable.
        self.blobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn step(&self) -> io::Result<()> {
        let left = self.ops_left.load(Ordering::SeqCst);
        if left == 0 {
            return Err(io::Error::other("injected failure"));
        }
        if left != u64::MAX {
            self.ops_left.store(left - 1, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Replaces a blob's bytes directly (tests corrupt blobs with this).
    pub fn set(&self, key: &str, bytes: Vec<u8>) {
        self.lock().insert(key.to_string(), Arc::new(bytes));
    }

    /// Removes a blob directly (tests simulate lost files with this).
    pub fn remove(&self, key: &str) {
        self.lock().remove(key);
    }

    /// A copy of a blob's bytes.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.lock().get(key).map(|b| b.to_vec())
    }

    /// Total bytes held.
    pub fn total_bytes(&self) -> u64 {
        self.lock().values().map(|b| b.len() as u64).sum()
    }
}

struct MemWriter {
    backend: Arc<MemBackend>,
    key: String,
    buf: Vec<u8>,
}

impl Write for MemWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl BlobWriter for MemWriter {
    fn commit(self: Box<Self>) -> io::Result<()> {
        self.backend.step()?;
        let MemWriter { backend, key, buf } = *self;
        backend.lock().insert(key, Arc::new(buf));
        Ok(())
    }
}

/// `MemBackend` is used through an `Arc` so its writers can reach back into it.
#[derive(Debug, Clone, Default)]
pub struct SharedMem(pub Arc<MemBackend>);

impl SharedMem {
    pub fn new() -> SharedMem {
        SharedMem(Arc::new(MemBackend::new()))
    }
}

impl Backend for SharedMem {
    fn put(&self, key: &str) -> io::Result<Box<dyn BlobWriter>> {
        Ok(Box::new(MemWriter {
            backend: self.0.clone(),
            key: key.to_string(),
            buf: Vec::new(),
        }))
    }

    fn read_at(&self, key: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let blob = self
            .0
            .lock()
            .get(key)
            .cloned()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, key.to_string()))?;
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let end = start.saturating_add(buf.len());
        if end > blob.len() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf.copy_from_slice(&blob[start..end]);
        Ok(())
    }

    fn size(&self, key: &str) -> io::Result<u64> {
        self.0
            .lock()
            .get(key)
            .map(|b| b.len() as u64)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, key.to_string()))
    }

    fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
        Ok(self
            .0
            .lock()
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect())
    }

    fn delete(&self, key: &str) -> io::Result<()> {
        self.0.step()?;
        self.0.lock().remove(key);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exercise(b: &dyn Backend) {
        let mut w = b.put("snapshots/ss-1/blob").unwrap();
        w.write_all(b"hello").unwrap();
        assert!(
            b.size("snapshots/ss-1/blob").is_err(),
            "visible before commit"
        );
        w.commit().unwrap();
        let mut buf = [0u8; 3];
        b.read_at("snapshots/ss-1/blob", 1, &mut buf).unwrap();
        assert_eq!(&buf, b"ell");
        assert!(b.read_at("snapshots/ss-1/blob", 4, &mut buf).is_err());
        let w = b.put("snapshots/ss-2/x").unwrap();
        drop(w);
        assert_eq!(b.list("snapshots/").unwrap(), vec!["snapshots/ss-1/blob"]);
        b.delete("snapshots/ss-1/blob").unwrap();
        b.delete("snapshots/ss-1/blob").unwrap();
        assert!(b.list("snapshots/").unwrap().is_empty());
    }

    #[test]
    fn fs_backend_semantics() {
        let dir = tempfile::tempdir().unwrap();
        let b = FsBackend::new(dir.path());
        exercise(&b);
        assert!(b.put("../escape").is_err());
    }

    #[test]
    fn extents_of_file_blobs_and_none_elsewhere() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let b = FsBackend::new(dir.path());
        let mut w = b.put("snapshots/ss-1/delta.0").unwrap();
        w.write_all(&[7u8; 65536]).unwrap();
        w.commit().unwrap();
        match b.extents("snapshots/ss-1/delta.0", 0, u64::MAX).unwrap() {
            // tmpfs and friends: no extent maps.
            None => eprintln!("SKIPPED the FIEMAP part: no FIEMAP on the temp filesystem"),
            Some(got) => {
                let dev = fs::metadata(dir.path()).unwrap().dev();
                assert_eq!(got.device, dev);
                let covered: u64 = got.extents.iter().map(|e| e.length).sum();
                assert!(covered >= 65536, "{got:?}");
                assert!(got.extents.iter().all(|e| e.is_plain()), "{got:?}");
            }
        }
        assert!(b.extents("snapshots/ss-1/missing", 0, 1).is_err());
        let m = SharedMem::new();
        m.put("a").unwrap().commit().unwrap();
        assert_eq!(m.extents("a", 0, 1).unwrap(), None);
    }

    #[test]
    fn mem_backend_semantics_and_faults() {
        let b = SharedMem::new();
        exercise(&b);
        b.0.fail_after(1);
        b.put("a").unwrap().commit().unwrap();
        assert!(b.put("b").unwrap().commit().is_err());
        assert!(b.delete("a").is_err());
        b.0.heal();
        assert_eq!(b.list("").unwrap(), vec!["a"]);
    }
}

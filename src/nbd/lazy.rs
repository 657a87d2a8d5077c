//! Lazy restore: an [`Export`] that serves a snapshot's image at once while it is copied
//! into a new sparse image in the background.
//!
//! [`LazyExport`] wraps the target image (a [`FileExport`] of the volume's size) and a
//! [`ChainReader`] of the snapshot. The image is cut into granules (a power of two, at
//! least 4 KiB; the store's block size is a good choice). A granule is *hydrated* once the
//! target holds its content; from then on the target alone serves it. Before that:
//! - a read hydrates the granules it touches, then reads the target;
//! - a write hydrates each touched granule with the write merged in (read-modify-write of
//!   the snapshot bytes around it, one target write per granule); a write covering a whole
//!   granule reads nothing from the snapshot;
//! - write-zeroes hydrates partly covered granules first, marks whole ones hydrated;
//!   trim marks whole granules hydrated and leaves partly covered unhydrated ones alone
//!   (trim is advisory);
//! - [`LazyExport::hydrate_next`] is the background job's step: it hydrates the next
//!   unhydrated granules in order, skipping those hydrated already.
//!
//! Hydrating a granule and client I/O on it are serialised by a striped set of mutexes
//! (one stripe per granule at a time; a hydrated bit is never cleared, so I/O on hydrated
//! granules takes no lock). Snapshot bytes are CRC-checked by the reader: a damaged record
//! fails the client's request with EIO, never serves wrong data.
//!
//! # Durability and restart
//! The hydrated set is persisted in a map file beside the image (created durably, with a
//! directory fsync, and only for an image that holds no data yet). Its rule: a bit is set
//! on disk only after the granule's data is durable in the target (fdatasync of the image,
//! then of the map), and every bit a client write depends on is on disk before a FLUSH or
//! FUA write is acknowledged — exactly the writes NBD promises to keep. Bits are written
//! at `flush`, at FUA writes that hydrated a granule, and at the end of every
//! `hydrate_next` step. After a crash, granules whose bit is on disk are kept as they are
//! (with every flushed client write); the others are hydrated again from the snapshot,
//! which is correct because any client write to them was not flushed (NBD lets it be
//! lost), and their stale target bytes are overwritten (zero granules are punched out).
//!
//! Map file layout (integers little-endian):
//! ```text
//! 0     magic "BSLAZYM1"
//! 8     u32 version (1)
//! 12    u32 reserved (0)
//! 16    u64 volume size in bytes
//! 24    u64 granularity in bytes
//! 32    snapshot id, 16 B ASCII, 0-padded
//! 48    u64 inode number of the target image (a map never vouches for another file)
//! 56    4 reserved bytes (0)
//! 60    u32 CRC32 of bytes 0..60
//! 4096  hydrated bits, one per granule, LSB first, in little-endian u64 words
//! ```
//! May call the target export, the store's [`ChainReader`], `std::fs` and `crc32fast`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::export::{Export, Extent, FileExport};
use super::NbdError;
use crate::store::{ChainReader, StoreError};

const MAGIC: &[u8; 8] = b"BSLAZYM1";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 64;
const BITS_AT: u64 = 4096;
/// Granule locks; a granule uses stripe `granule % STRIPES`.
const STRIPES: usize = 256;
/// Longest run of extents one `block_status` call returns.
const MAX_EXTENTS: usize = 1024;

/// Progress of the background hydration after one [`LazyExport::hydrate_next`] step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HydrateStep {
    /// Bytes of the image hydrated so far (by the job, reads, writes, trims and zeroes).
    pub done: u64,
    /// The image size.
    pub total: u64,
    /// Every granule is hydrated and the map says so durably.
    pub finished: bool,
}

/// The persisted map file.
struct MapFile {
    file: File,
    path: PathBuf,
    /// The words as last made durable.
    persisted: Vec<u64>,
}

impl MapFile {
    fn io_err(&self, op: &'static str) -> impl FnOnce(io::Error) -> NbdError + '_ {
        move |source| NbdError::HydrationMap {
            op,
            path: self.path.clone(),
            source,
        }
    }
}

/// An image restored lazily from a snapshot; see the module docs.
pub struct LazyExport {
    target: FileExport,
    source: Arc<ChainReader>,
    size: u64,
    granularity: u64,
    granules: u64,
    /// Hydrated granules: a bit is set once the target holds the granule's data.
    hydrated: Vec<AtomicU64>,
    hydrated_count: AtomicU64,
    hydrated_bytes: AtomicU64,
    /// Bits were set since the map was last made durable.
    unpersisted: AtomicBool,
    stripes: Vec<Mutex<()>>,
    map: Mutex<MapFile>,
    /// Where `hydrate_next` goes on (a granule index).
    cursor: Mutex<u64>,
    /// The target may hold stale bytes in unhydrated granules (reopened after a stop).
    reopened: bool,
}

impl std::fmt::Debug for LazyExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyExport")
            .field("target", &self.target.path())
            .field("source", &self.source.id())
            .field("granularity", &self.granularity)
            .field("hydrated", &self.hydrated_count.load(Ordering::Acquire))
            .field("granules", &self.granules)
            .finish()
    }
}

fn header(size: u64, granularity: u64, source: &ChainReader, ino: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&size.to_le_bytes());
    h[24..32].copy_from_slice(&granularity.to_le_bytes());
    for (o, b) in h[32..48].iter_mut().zip(source.id().as_str().bytes()) {
        *o = b;
    }
    h[48..56].copy_from_slice(&ino.to_le_bytes());
    let crc = crc32fast::hash(&h[..60]);
    h[60..].copy_from_slice(&crc.to_le_bytes());
    h
}

fn source_err(e: StoreError) -> io::Error {
    // The server turns this into EIO; the chain of causes names snapshot and range.
    io::Error::other(e)
}

impl LazyExport {
    /// Serves `source` through `target`, recording hydration in the map file at
    /// `map_path`. A missing or empty map starts from nothing hydrated (the target must
    /// then be a new sparse image); an existing one resumes where it stopped, after
    /// checking it belongs to this snapshot, size and granularity.
    pub fn open(
        target: FileExport,
        source: Arc<ChainReader>,
        map_path: &Path,
        granularity: u64,
    ) -> Result<LazyExport, NbdError> {
        if granularity < 4096 || !granularity.is_power_of_two() {
            return Err(NbdError::BadGranularity { granularity });
        }
        let size = target.size();
        if size != source.size() {
            return Err(NbdError::LazySizeMismatch {
                target: size,
                snapshot: source.size(),
            });
        }
        let path = map_path.to_path_buf();
        let err = |op: &'static str| {
            let path = path.clone();
            move |source| NbdError::HydrationMap { op, path, source }
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(err("open"))?;
        let len = file.metadata().map_err(err("stat"))?.len();
        let granules = size.div_ceil(granularity);
        let nwords = granules.div_ceil(64) as usize;
        // A map left over from another image at this path must not mark its holes hydrated.
        let ino = std::fs::metadata(target.path())
            .map_err(err("stat the image of"))?
            .ino();
        let want = header(size, granularity, &source, ino);
        let mut h = [0u8; HEADER_LEN];
        if len >= HEADER_LEN as u64 {
            file.read_exact_at(&mut h, 0).map_err(err("read"))?;
        }
        let mut words = vec![0u64; nwords];
        // Empty, or created but never initialised: nothing can have been served yet.
        let reopened = !(len < HEADER_LEN as u64 || h.iter().all(|&b| b == 0));
        if !reopened {
            // A lost map over a used image would re-hydrate granules holding flushed
            // writes: a new map is only for an image with no data yet.
            let extents = target
                .block_status(0, size)
                .map_err(err("map the image of"))?;
            if extents.iter().any(|x| !x.hole) {
                return Err(NbdError::HydrationMapCorrupt {
                    path,
                    reason: "it is missing or empty but the image holds data".into(),
                });
            }
            file.set_len(0).map_err(err("size"))?;
            file.set_len(BITS_AT + nwords as u64 * 8)
                .map_err(err("size"))?;
            file.write_all_at(&want, 0).map_err(err("write"))?;
            file.sync_all().map_err(err("sync"))?;
            // The new name must be durable before any write is acknowledged.
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                File::open(parent)
                    .and_then(|d| d.sync_all())
                    .map_err(err("sync the directory of"))?;
            }
        } else {
            let corrupt = |reason: &str| NbdError::HydrationMapCorrupt {
                path: path.clone(),
                reason: reason.to_string(),
            };
            if &h[..8] != MAGIC {
                return Err(corrupt("bad magic"));
            }
            if crc32fast::hash(&h[..60]).to_le_bytes() != h[60..64] {
                return Err(corrupt("header checksum mismatch"));
            }
            if h != want {
                return Err(corrupt(
                    "it belongs to another snapshot, image file, size, granularity or version",
                ));
            }
            if len < BITS_AT + nwords as u64 * 8 {
                return Err(corrupt("file is truncated"));
            }
            let mut bytes = vec![0u8; nwords * 8];
            file.read_exact_at(&mut bytes, BITS_AT)
                .map_err(err("read"))?;
            for (w, chunk) in words.iter_mut().zip(bytes.chunks_exact(8)) {
                let mut a = [0u8; 8];
                a.copy_from_slice(chunk);
                *w = u64::from_le_bytes(a);
            }
            // Bits past the last granule come from a damaged file.
            if granules % 64 != 0 {
                if let Some(last) = words.last_mut() {
                    *last &= (1u64 << (granules % 64)) - 1;
                }
            }
        }
        let count: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
        let mut bytes = count * granularity;
        let last = granules.saturating_sub(1);
        if granules > 0 && words[(last / 64) as usize] & (1 << (last % 64)) != 0 {
            // The last granule may be short.
            bytes -= granules * granularity - size;
        }
        Ok(LazyExport {
            target,
            source,
            size,
            granularity,
            granules,
            hydrated: words.iter().map(|&w| AtomicU64::new(w)).collect(),
            hydrated_count: AtomicU64::new(count),
            hydrated_bytes: AtomicU64::new(bytes),
            unpersisted: AtomicBool::new(false),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            map: Mutex::new(MapFile {
                file,
                path,
                persisted: words,
            }),
            cursor: Mutex::new(0),
            reopened,
        })
    }

    /// The granule size in bytes.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// The snapshot being restored.
    pub fn source(&self) -> &Arc<ChainReader> {
        &self.source
    }

    /// The target image.
    pub fn target(&self) -> &FileExport {
        &self.target
    }

    /// Bytes of the image hydrated so far (durably or not yet).
    pub fn hydrated_bytes(&self) -> u64 {
        self.hydrated_bytes.load(Ordering::Acquire)
    }

    /// Whether every granule is hydrated (the map may still need a `flush` to say so).
    pub fn is_fully_hydrated(&self) -> bool {
        self.hydrated_count.load(Ordering::Acquire) == self.granules
    }

    fn is_hydrated(&self, g: u64) -> bool {
        self.hydrated[(g / 64) as usize].load(Ordering::Acquire) & (1 << (g % 64)) != 0
    }

    /// Sets the bit of `g` (its data is in the target); called with its stripe locked.
    fn mark_hydrated(&self, g: u64) {
        let bit = 1u64 << (g % 64);
        let old = self.hydrated[(g / 64) as usize].fetch_or(bit, Ordering::AcqRel);
        if old & bit == 0 {
            let (s, e) = self.span(g);
            self.hydrated_bytes.fetch_add(e - s, Ordering::AcqRel);
            self.hydrated_count.fetch_add(1, Ordering::AcqRel);
            self.unpersisted.store(true, Ordering::Release);
        }
    }

    fn lock(&self, g: u64) -> MutexGuard<'_, ()> {
        // The guarded data is `()`: a poisoned stripe protects nothing that could be torn.
        self.stripes[(g % STRIPES as u64) as usize]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The byte range of granule `g`.
    fn span(&self, g: u64) -> (u64, u64) {
        let s = g * self.granularity;
        (s, (s + self.granularity).min(self.size))
    }

    /// Granules touched by `[offset, offset + len)`, as `[first, end)`.
    fn granules_of(&self, offset: u64, len: u64) -> (u64, u64) {
        (
            offset / self.granularity,
            (offset + len).div_ceil(self.granularity),
        )
    }

    fn all_hydrated(&self, first: u64, end: u64) -> bool {
        (first..end).all(|g| self.is_hydrated(g))
    }

    /// Hydrates granule `g` with `patch` (bytes at an image offset inside the granule)
    /// written over the snapshot's bytes. Call with the stripe locked and `g` unhydrated.
    /// Returns after the target write; the bit is set (not yet durable).
    fn fill(&self, g: u64, patch: Option<(u64, &[u8])>) -> io::Result<()> {
        let (s, e) = self.span(g);
        let len = e - s;
        let whole_patch = patch.is_some_and(|(off, data)| off == s && data.len() as u64 == len);
        if whole_patch {
            if let Some((_, data)) = patch {
                self.target.write_at(data, s, false)?;
            }
        } else if patch.is_none() && self.source.reads_as_zero(s, len) {
            // The target is sparse; only a reopened one may hold stale bytes here.
            if self.reopened {
                self.target.write_zeroes(s, len, true)?;
            }
        } else {
            let mut buf = vec![0u8; len as usize];
            self.source.read_at(&mut buf, s).map_err(source_err)?;
            if let Some((off, data)) = patch {
                let at = (off - s) as usize;
                buf[at..at + data.len()].copy_from_slice(data);
            }
            self.target.write_at(&buf, s, false)?;
        }
        self.mark_hydrated(g);
        Ok(())
    }

    /// Hydrates every granule of `[offset, offset + len)` not hydrated yet.
    fn hydrate_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let (first, end) = self.granules_of(offset, len);
        for g in first..end {
            if self.is_hydrated(g) {
                continue;
            }
            let _lock = self.lock(g);
            // Re-check under the lock: the hydrator or another request may have won.
            if !self.is_hydrated(g) {
                self.fill(g, None)?;
            }
        }
        Ok(())
    }

    /// Makes every hydrated bit durable: the target first (the bits' data), then the map.
    fn persist(&self) -> Result<(), NbdError> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        // Cleared before the bits are read, so a bit set meanwhile leaves it set again;
        // a swap, so the bits whose flag it takes are visible to the loads below.
        self.unpersisted.swap(false, Ordering::AcqRel);
        let now: Vec<u64> = self
            .hydrated
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect();
        let result = self.write_map(&mut map, &now);
        if result.is_err() {
            self.unpersisted.store(true, Ordering::Release);
        }
        result
    }

    fn write_map(&self, map: &mut MapFile, now: &[u64]) -> Result<(), NbdError> {
        self.target
            .flush()
            .map_err(|source| NbdError::HydrationMap {
                op: "sync the image of",
                path: map.path.clone(),
                source,
            })?;
        if now == map.persisted.as_slice() {
            return Ok(());
        }
        // Write each run of changed words once.
        let mut i = 0;
        while i < now.len() {
            if now[i] == map.persisted[i] {
                i += 1;
                continue;
            }
            let start = i;
            while i < now.len() && now[i] != map.persisted[i] {
                i += 1;
            }
            let bytes: Vec<u8> = now[start..i].iter().flat_map(|w| w.to_le_bytes()).collect();
            crate::failpoint::check("nbd.hydration-map.write")
                .and_then(|()| map.file.write_all_at(&bytes, BITS_AT + start as u64 * 8))
                .map_err(map.io_err("write"))?;
        }
        // A failed sync is not trusted: `persisted` stays as it was, so the next attempt
        // writes every changed word again before syncing.
        crate::failpoint::check("nbd.hydration-map.fsync")
            .and_then(|()| map.file.sync_data())
            .map_err(map.io_err("sync"))?;
        map.persisted.copy_from_slice(now);
        Ok(())
    }

    /// Makes the map durable if bits were set since it last was; else just syncs the image.
    fn flush_all(&self) -> io::Result<()> {
        if self.unpersisted.load(Ordering::Acquire) {
            self.persist().map_err(io::Error::other)
        } else {
            self.target.flush()
        }
    }

    /// One step of the background job: hydrates unhydrated granules in image order until
    /// about `max_bytes` (at least one granule) have been filled or the end is reached,
    /// then makes the step durable. Errors leave the export serving; a later step retries.
    pub fn hydrate_next(&self, max_bytes: u64) -> Result<HydrateStep, NbdError> {
        let mut cursor = self.cursor.lock().unwrap_or_else(|p| p.into_inner());
        let mut filled = 0u64;
        let mut wrapped = false;
        while filled < max_bytes.max(1) && !self.is_fully_hydrated() {
            if *cursor >= self.granules {
                // Granules before the cursor may be unhydrated only if a fill failed.
                if wrapped {
                    break;
                }
                *cursor = 0;
                wrapped = true;
            }
            let g = *cursor;
            if !self.is_hydrated(g) {
                let _lock = self.lock(g);
                if !self.is_hydrated(g) {
                    let (s, e) = self.span(g);
                    self.fill(g, None).map_err(|source| NbdError::Hydrate {
                        start: s,
                        end: e,
                        source,
                    })?;
                    filled += e - s;
                }
            }
            *cursor += 1;
        }
        drop(cursor);
        if self.unpersisted.load(Ordering::Acquire) {
            self.persist()?;
        }
        let finished = self.is_fully_hydrated() && !self.unpersisted.load(Ordering::Acquire);
        Ok(HydrateStep {
            done: self.hydrated_bytes(),
            total: self.size,
            finished,
        })
    }

    /// Allocation status of an unhydrated run `[s, e)`: what the snapshot holds there.
    fn source_status(&self, s: u64, e: u64, out: &mut Vec<Extent>) {
        let mut pos = s;
        while pos < e && out.len() < MAX_EXTENTS {
            let next = ((pos / self.granularity + 1) * self.granularity).min(e);
            let zero = self.source.reads_as_zero(pos, next - pos);
            match out.last_mut() {
                Some(last) if last.zero == zero && last.hole == zero => last.len += next - pos,
                _ => out.push(Extent {
                    len: next - pos,
                    hole: zero,
                    zero,
                }),
            }
            pos = next;
        }
    }
}

fn check_range(offset: u64, len: u64, size: u64, errno: i32) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::from_raw_os_error(errno)),
    }
}

impl Export for LazyExport {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(offset, buf.len() as u64, self.size, libc::EINVAL)?;
        // Hydrating first keeps one source of truth per granule; bits never clear, so
        // the target read needs no lock.
        self.hydrate_range(offset, buf.len() as u64)?;
        self.target.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        check_range(offset, buf.len() as u64, self.size, libc::ENOSPC)?;
        let (first, end) = self.granules_of(offset, buf.len() as u64);
        if self.all_hydrated(first, end) {
            return self.target.write_at(buf, offset, fua);
        }
        let mut newly = false;
        for g in first..end {
            let (s, e) = self.span(g);
            let (ps, pe) = (s.max(offset), e.min(offset + buf.len() as u64));
            let part = &buf[(ps - offset) as usize..(pe - offset) as usize];
            if self.is_hydrated(g) {
                self.target.write_at(part, ps, false)?;
                continue;
            }
            let _lock = self.lock(g);
            if self.is_hydrated(g) {
                self.target.write_at(part, ps, false)?;
            } else {
                self.fill(g, Some((ps, part)))?;
                newly = true;
            }
        }
        if fua {
            // A FUA write to a new granule is durable only with its hydrated bit.
            if newly {
                self.persist().map_err(io::Error::other)?;
            } else {
                self.target.flush()?;
            }
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.flush_all()
    }

    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(offset, len, self.size, libc::ENOSPC)?;
        if len == 0 {
            return Ok(());
        }
        let (first, end) = self.granules_of(offset, len);
        for g in first..end {
            let (s, e) = self.span(g);
            let (ps, pe) = (s.max(offset), e.min(offset + len));
            let whole = ps == s && pe == e;
            if self.is_hydrated(g) {
                self.target.trim(ps, pe - ps)?;
                continue;
            }
            let _lock = self.lock(g);
            if self.is_hydrated(g) {
                self.target.trim(ps, pe - ps)?;
            } else if whole {
                // Its content is unspecified now: zeros (a hole) will do.
                self.target.write_zeroes(s, e - s, true)?;
                self.mark_hydrated(g);
            }
            // A partly trimmed unhydrated granule keeps the snapshot's bytes (advisory).
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
        check_range(offset, len, self.size, libc::ENOSPC)?;
        if len == 0 {
            return Ok(());
        }
        let (first, end) = self.granules_of(offset, len);
        if self.all_hydrated(first, end) {
            return self.target.write_zeroes(offset, len, may_trim);
        }
        for g in first..end {
            let (s, e) = self.span(g);
            let (ps, pe) = (s.max(offset), e.min(offset + len));
            if self.is_hydrated(g) {
                self.target.write_zeroes(ps, pe - ps, may_trim)?;
                continue;
            }
            let _lock = self.lock(g);
            let whole = ps == s && pe == e;
            if !whole && !self.is_hydrated(g) {
                // Partly zeroed: the snapshot's bytes around the zeros must be there first.
                self.fill(g, None)?;
            }
            self.target.write_zeroes(ps, pe - ps, may_trim)?;
            self.mark_hydrated(g);
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        check_range(offset, len, self.size, libc::EINVAL)?;
        let end = offset + len;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < MAX_EXTENTS {
            let g = pos / self.granularity;
            let hydrated = self.is_hydrated(g);
            // The run of granules with the same state.
            let mut run_end = self.span(g).1.min(end);
            while run_end < end && self.is_hydrated(run_end / self.granularity) == hydrated {
                run_end = self.span(run_end / self.granularity).1.min(end);
            }
            if hydrated {
                let got = self.target.block_status(pos, run_end - pos)?;
                let covered: u64 = got.iter().map(|x| x.len).sum();
                out.extend(got);
                if covered < run_end - pos {
                    break;
                }
            } else {
                let before: u64 = out.iter().map(|x| x.len).sum();
                self.source_status(pos, run_end, &mut out);
                let covered = out.iter().map(|x| x.len).sum::<u64>() - before;
                if covered < run_end - pos {
                    break;
                }
            }
            pos = run_end;
        }
        Ok(out)
    }

    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(offset, len, self.size, libc::EINVAL)?;
        // Prefetching a lazily restored range means hydrating it.
        self.hydrate_range(offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::SnapshotId;
    use crate::store::{capture, MemBackend, NoProgress, SharedMem, SnapshotMeta, Store};

    const G: u64 = 65536;
    const MIB: u64 = 1 << 20;

    fn sid(n: u32) -> SnapshotId {
        format!("ss-{n:08}").parse().unwrap()
    }

    fn meta(n: u32, parent: Option<u32>, size: u64) -> SnapshotMeta {
        SnapshotMeta {
            id: sid(n),
            volume_id: "vol-00000001".parse().unwrap(),
            volume_name: "data".into(),
            name: format!("snap {n}"),
            description: String::new(),
            owner: "root".into(),
            parent: parent.map(sid),
            volume_size: size,
            block_size: G as u32,
            snapshot_time: 1_700_000_000,
            freeze_ms: 0,
            consistency: "crash".into(),
        }
    }

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        let mut h = blake3::Hasher::new();
        h.update(&seed.to_le_bytes());
        h.finalize_xof().fill(&mut buf);
        buf
    }

    /// A store holding a full snapshot and an incremental (with zeros over data) of an
    /// image with holes, data and a short last granule; returns the incremental's image.
    struct Fixture {
        dir: tempfile::TempDir,
        store: Store,
        mem: Arc<MemBackend>,
        size: u64,
        image: Vec<u8>,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let size = 4 * MIB + 5000;
        let img = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("source"))
            .unwrap();
        img.set_len(size).unwrap();
        let mem = SharedMem::new();
        let inner = Arc::clone(&mem.0);
        let store = Store::with_backend(Arc::new(mem)).unwrap();
        img.write_all_at(&noise(1_300_000, 1), 10_000).unwrap();
        img.write_all_at(&noise(300_000, 2), 3 * MIB).unwrap();
        capture(&store, meta(1, None, size), &img, &NoProgress).unwrap();
        img.write_all_at(&noise(100_000, 3), 500_000).unwrap();
        img.write_all_at(&vec![0u8; 3 * G as usize], 0).unwrap();
        img.write_all_at(&noise(4000, 4), size - 4000).unwrap();
        capture(&store, meta(2, Some(1), size), &img, &NoProgress).unwrap();
        let mut image = vec![0u8; size as usize];
        img.read_exact_at(&mut image, 0).unwrap();
        Fixture {
            dir,
            store,
            mem: inner,
            size,
            image,
        }
    }

    impl Fixture {
        fn reader(&self) -> Arc<ChainReader> {
            Arc::new(ChainReader::open(&self.store, &sid(2)).unwrap())
        }

        fn create(&self) -> LazyExport {
            let target = FileExport::create(&self.dir.path().join("target"), self.size).unwrap();
            LazyExport::open(target, self.reader(), &self.dir.path().join("map"), G).unwrap()
        }

        fn reopen(&self) -> LazyExport {
            let target = FileExport::open(&self.dir.path().join("target")).unwrap();
            LazyExport::open(target, self.reader(), &self.dir.path().join("map"), G).unwrap()
        }

        fn target_bytes(&self) -> Vec<u8> {
            std::fs::read(self.dir.path().join("target")).unwrap()
        }
    }

    fn read(e: &LazyExport, off: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0xeeu8; len];
        e.read_at(&mut buf, off).unwrap();
        buf
    }

    fn hydrate_all(e: &LazyExport) -> u32 {
        let mut steps = 0;
        loop {
            steps += 1;
            let step = e.hydrate_next(256 * 1024).unwrap();
            assert_eq!(step.total, e.size());
            if step.finished {
                assert_eq!(step.done, e.size());
                return steps;
            }
        }
    }

    #[test]
    fn reads_writes_and_zeroes_keep_the_snapshot_around_them_through_hydration() {
        let f = fixture();
        let e = f.create();
        let mut model = f.image.clone();
        assert_eq!(e.hydrated_bytes(), 0);
        // Unaligned reads across granules, before anything is hydrated.
        assert!(read(&e, 60_000, 200_000) == model[60_000..260_000]);
        assert_eq!(e.hydrated_bytes(), 4 * G);
        // Partial writes into unhydrated granules (one spanning three granules).
        let mut apply = |off: u64, data: &[u8]| {
            e.write_at(data, off, false).unwrap();
            model[off as usize..off as usize + data.len()].copy_from_slice(data);
        };
        apply(5 * G + 100, &noise(10, 5));
        apply(20 * G - 7, &noise(2 * G as usize + 20, 6));
        apply(40 * G, &noise(G as usize, 7));
        // A write into an already hydrated granule, and one in the short last granule.
        apply(70_000, &noise(30, 8));
        apply(f.size - 10, &noise(10, 9));
        // Zeroes: partly over an unhydrated data granule, wholly over another.
        e.write_zeroes(8 * G + 500, 1000, false).unwrap();
        model[(8 * G + 500) as usize..(8 * G + 1500) as usize].fill(0);
        e.write_zeroes(9 * G, G, true).unwrap();
        model[(9 * G) as usize..(10 * G) as usize].fill(0);
        // A whole unhydrated granule trimmed reads as zeros (any content is allowed).
        e.trim(12 * G, G).unwrap();
        model[(12 * G) as usize..(13 * G) as usize].fill(0);
        for (off, len) in [
            (0u64, 300_000usize),
            (5 * G, 3000),
            (19 * G, 3 * G as usize),
        ] {
            assert!(read(&e, off, len) == model[off as usize..off as usize + len]);
        }
        let steps = hydrate_all(&e);
        assert!(steps > 1);
        assert!(e.is_fully_hydrated());
        assert!(f.target_bytes() == model, "target differs after hydration");
        assert!(read(&e, 0, f.size as usize) == model);
        // Done: further steps do nothing and say so.
        let step = e.hydrate_next(1).unwrap();
        assert!(step.finished && step.done == f.size);
    }

    #[test]
    fn zero_granules_stay_holes_and_block_status_follows_the_snapshot() {
        let f = fixture();
        let e = f.create();
        let check = |offset: u64, len: u64| {
            let st = e.block_status(offset, len).unwrap();
            assert_eq!(st.iter().map(|x| x.len).sum::<u64>(), len);
            let mut pos = offset;
            for x in &st {
                let bytes = &f.image[pos as usize..(pos + x.len) as usize];
                assert!(
                    !x.zero || bytes.iter().all(|&b| b == 0),
                    "zero at {pos} has data"
                );
                pos += x.len;
            }
            st
        };
        // Unhydrated: the snapshot's own data and zero ranges.
        let st = check(0, f.size);
        assert!(st.iter().any(|x| x.zero) && st.iter().any(|x| !x.zero));
        e.hydrate_next(2 * MIB).unwrap();
        check(G / 2, f.size - G);
        hydrate_all(&e);
        check(0, f.size);
        // About 1.7 MiB of the 4 MiB snapshot is data; the zero granules were never written.
        use std::os::unix::fs::MetadataExt;
        let allocated = std::fs::metadata(f.dir.path().join("target"))
            .unwrap()
            .blocks()
            * 512;
        assert!(
            allocated < 3 * MIB,
            "zero granules were written: {allocated} bytes"
        );
    }

    #[test]
    fn a_restart_keeps_flushed_writes_and_rehydrates_the_rest() {
        let f = fixture();
        let e = f.create();
        let kept = noise(4096, 10);
        e.write_at(&kept, 2 * G + 4096, false).unwrap();
        // A FUA write to another new granule is durable with its bit at once.
        let fua = noise(512, 11);
        e.write_at(&fua, 30 * G + 1, true).unwrap();
        e.flush().unwrap();
        e.hydrate_next(5 * G).unwrap();
        // Not flushed: these may be lost. One lands in a data granule, one in a zero one.
        e.write_at(&noise(4096, 12), 50 * G, false).unwrap();
        e.write_at(&noise(4096, 13), 2 * MIB + 8192, false).unwrap();
        let done = e.hydrated_bytes();
        let map_path = f.dir.path().join("map");
        // "Crash": nothing of the unflushed bits reaches the map.
        drop(e);
        let e = f.reopen();
        assert!(e.hydrated_bytes() < done);
        let mut model = f.image.clone();
        model[(2 * G + 4096) as usize..(2 * G + 8192) as usize].copy_from_slice(&kept);
        model[(30 * G + 1) as usize..(30 * G + 513) as usize].copy_from_slice(&fua);
        hydrate_all(&e);
        assert!(
            f.target_bytes() == model,
            "a restart lost a flushed write or kept stale bytes"
        );
        drop(e);
        let e = f.reopen();
        assert!(e.is_fully_hydrated());
        assert_eq!(e.hydrated_bytes(), f.size);
        assert!(e.hydrate_next(MIB).unwrap().finished);
        drop(e);
        // The map belongs to this snapshot, size and granularity only.
        let target = FileExport::open(&f.dir.path().join("target")).unwrap();
        let other = Arc::new(ChainReader::open(&f.store, &sid(1)).unwrap());
        let err = LazyExport::open(target, other, &map_path, G).unwrap_err();
        assert!(matches!(err, NbdError::HydrationMapCorrupt { .. }), "{err}");
        let target = FileExport::open(&f.dir.path().join("target")).unwrap();
        let err = LazyExport::open(target, f.reader(), &map_path, 2 * G).unwrap_err();
        assert!(matches!(err, NbdError::HydrationMapCorrupt { .. }), "{err}");
        let target = FileExport::open(&f.dir.path().join("target")).unwrap();
        let err = LazyExport::open(target, f.reader(), &map_path, 3000).unwrap_err();
        assert!(matches!(err, NbdError::BadGranularity { .. }), "{err}");
        // A lost map over an image with data is refused, not started from scratch.
        let moved = f.dir.path().join("map.lost");
        std::fs::rename(&map_path, &moved).unwrap();
        let target = FileExport::open(&f.dir.path().join("target")).unwrap();
        let err = LazyExport::open(target, f.reader(), &map_path, G).unwrap_err();
        assert!(matches!(err, NbdError::HydrationMapCorrupt { .. }), "{err}");
        std::fs::rename(&moved, &map_path).unwrap();
        // A new image put in the old one's place does not inherit its hydrated map.
        let fresh = f.dir.path().join("target.new");
        drop(FileExport::create(&fresh, f.size).unwrap());
        std::fs::rename(&fresh, f.dir.path().join("target")).unwrap();
        let target = FileExport::open(&f.dir.path().join("target")).unwrap();
        let err = LazyExport::open(target, f.reader(), &map_path, G).unwrap_err();
        assert!(matches!(err, NbdError::HydrationMapCorrupt { .. }), "{err}");
        assert_eq!(err.kind(), crate::api::ErrorKind::Corrupt);
    }

    #[test]
    fn a_damaged_snapshot_record_fails_reads_and_hydration_never_serves_wrong_data() {
        let f = fixture();
        let m = f.store.manifest(&sid(1)).unwrap();
        let key = format!("snapshots/{}/{}", m.id, m.delta_file);
        let mut delta = f.mem.get(&key).unwrap();
        // The first record of the full snapshot holds bytes 10_000.. (partly overwritten
        // by the incremental's zeros, still visible from 3 granules on).
        let at = delta.len() / 4;
        delta[at] ^= 1;
        f.mem.set(&key, delta);
        let e = f.create();
        let mut buf = vec![0u8; 4096];
        let mut failed = 0;
        for g in 0..(f.size / G) {
            match e.read_at(&mut buf, g * G) {
                Ok(()) => assert!(buf[..] == f.image[(g * G) as usize..(g * G + 4096) as usize]),
                Err(err) => {
                    failed += 1;
                    assert!(!e.is_hydrated(g));
                    assert_eq!(proto_errno(&err), crate::nbd::proto::EIO);
                }
            }
        }
        assert!(failed > 0, "the damage was not noticed");
        let err = loop {
            match e.hydrate_next(MIB) {
                Ok(step) => assert!(!step.finished),
                Err(err) => break err,
            }
        };
        assert!(matches!(err, NbdError::Hydrate { .. }));
        assert_eq!(err.kind(), crate::api::ErrorKind::Corrupt);
        assert!(!e.is_fully_hydrated());
    }

    fn proto_errno(e: &io::Error) -> u32 {
        crate::nbd::proto::errno_of(e)
    }

    #[test]
    fn a_hydrator_and_concurrent_clients_never_race_on_a_granule() {
        let f = fixture();
        let e = Arc::new(f.create());
        let hydrator = {
            let e = Arc::clone(&e);
            std::thread::spawn(move || hydrate_all(&e))
        };
        // Each client owns a quarter of the image and writes unaligned runs across
        // granule boundaries in it, checking its reads against its own model.
        let quarter = f.size / 4;
        let clients: Vec<_> = (0..4u64)
            .map(|c| {
                let e = Arc::clone(&e);
                let mut model =
                    f.image[(c * quarter) as usize..((c + 1) * quarter) as usize].to_vec();
                std::thread::spawn(move || {
                    let base = c * quarter;
                    let mut x = c + 1;
                    for i in 0..300u64 {
                        x = x
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        let len = 1 + (x >> 40) % 100_000;
                        let off = (x >> 8) % (quarter - len);
                        if i % 3 == 0 {
                            let data = noise(len as usize, x);
                            e.write_at(&data, base + off, false).unwrap();
                            model[off as usize..(off + len) as usize].copy_from_slice(&data);
                        } else {
                            let mut buf = vec![0u8; len as usize];
                            e.read_at(&mut buf, base + off).unwrap();
                            assert!(
                                buf[..] == model[off as usize..(off + len) as usize],
                                "client {c} read {len} bytes at {off} wrong"
                            );
                        }
                    }
                    model
                })
            })
            .collect();
        let mut model = Vec::new();
        for c in clients {
            model.extend(c.join().unwrap());
        }
        model.extend_from_slice(&f.image[model.len()..]);
        hydrator.join().unwrap();
        e.flush().unwrap();
        assert!(e.is_fully_hydrated());
        assert!(
            f.target_bytes() == model,
            "a write was lost or hydration overwrote it"
        );
    }

    /// `cargo test --release --lib bench_lazy -- --ignored --nocapture`
    /// (size in MiB from `BLOCKSNAP_BENCH_MIB`, default 256; store on the filesystem).
    #[test]
    #[ignore = "benchmark: prints timings, takes seconds"]
    fn bench_lazy() {
        use std::time::Instant;
        let mib: u64 = std::env::var("BLOCKSNAP_BENCH_MIB")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(256);
        let size = mib * MIB;
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let img = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("source"))
            .unwrap();
        img.set_len(size).unwrap();
        // Three quarters data in 4 MiB stretches.
        for (i, off) in (0..size).step_by(4 * MIB as usize).enumerate() {
            if i % 4 != 3 {
                img.write_all_at(&noise(4 * MIB as usize, i as u64), off)
                    .unwrap();
            }
        }
        capture(&store, meta(1, None, size), &img, &NoProgress).unwrap();
        let t = Instant::now();
        let reader = Arc::new(ChainReader::open(&store, &sid(1)).unwrap());
        let open = t.elapsed();
        let target = FileExport::create(&dir.path().join("target"), size).unwrap();
        let e = LazyExport::open(target, Arc::clone(&reader), &dir.path().join("map"), G).unwrap();
        // Random 4 KiB client reads of unhydrated granules (each hydrates one granule).
        let t = Instant::now();
        let mut buf = vec![0u8; 4096];
        let n = 2000u64;
        for i in 0..n {
            let off = (i * 7919 * 4096) % (size - 4096);
            e.read_at(&mut buf, off).unwrap();
        }
        let rand = t.elapsed();
        let t = Instant::now();
        let mut steps = 0;
        while !e.hydrate_next(8 * MIB).unwrap().finished {
            steps += 1;
        }
        let hyd = t.elapsed();
        eprintln!(
            "{mib} MiB: reader open {:?}; {n} random 4 KiB reads {:?} ({:?} each); \
             hydration {:?} in {steps} steps of 8 MiB = {:.0} MiB/s",
            open,
            rand,
            rand / n as u32,
            hyd,
            mib as f64 / hyd.as_secs_f64()
        );
    }

    #[test]
    fn lazy_export_is_send_sync() {
        fn send_sync<T: Send + Sync + 'static>() {}
        send_sync::<LazyExport>();
        let _: Option<Arc<dyn Export>> = None::<Arc<LazyExport>>.map(|e| e as Arc<dyn Export>);
    }
}

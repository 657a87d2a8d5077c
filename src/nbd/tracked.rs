//! Changed-block tracking and copy-before-write, as an [`Export`] wrapper.
//!
//! [`TrackedExport`] keeps, in the write path:
//! - a **dirty bitmap** at 4 KiB granularity of blocks written, trimmed or zeroed since
//!   the last committed snapshot (in memory);
//! - a **write-intent bitmap** of 1 MiB regions, persisted like md's: before a write to a
//!   region whose bit is clear is carried out (and so before it is acknowledged), the bit
//!   is written to the bitmap file and `fdatasync`ed. Only the first write to a clean region
//!   pays for the sync. After a crash (even SIGKILL) every block of every set region is
//!   treated as dirty: a superset of the truth, never less.
//! - a **snapshot epoch**: [`TrackedExport::start_epoch`] flushes, then atomically swaps the
//!   dirty set out (writers wait only for that swap) and returns the ranges to stream.
//!   While the epoch is open, the first write to a block not yet streamed copies the old
//!   block aside (to a sparse spill file) so [`TrackedExport::read_snapshot_block`] returns
//!   the point-in-time content. [`TrackedExport::finish_epoch`] either commits (the
//!   persisted intent bits shrink to what is dirty now) or merges the set back.
//!
//! Bitmap file layout (all integers little-endian):
//! ```text
//! 0      magic "BSCBTMAP"
//! 8      u32 version (1)
//! 12     u32 flags: bit 0 CLEAN = the fine bitmap section is exact
//! 16     u64 volume size in bytes
//! 24     u32 block size (4096)
//! 28     u32 region size (1 MiB)
//! 32     u64 generation: snapshots committed with this bitmap
//! 40     u32 CRC32 of the fine bitmap section (valid when CLEAN)
//! 44     16 reserved bytes (zero)
//! 60     u32 CRC32 of bytes 0..60
//! 4096   region bits, one per region, LSB first            (write-intent)
//! 4096 + round_up(region bytes, 4096): block bits, one per 4 KiB block (valid when CLEAN)
//! ```
//! May call the wrapped export, `std::fs` and `crc32fast`; nothing above this module.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::export::{Export, Extent};
use super::NbdError;
use crate::failpoint;

/// Granularity of the dirty bitmap and of copy-before-write.
pub const BLOCK: u64 = 4096;
/// Granularity of the persisted write-intent bitmap.
pub const REGION: u64 = 1024 * 1024;
const BLOCKS_PER_REGION: u64 = REGION / BLOCK;

const MAGIC: &[u8; 8] = b"BSCBTMAP";
const VERSION: u32 = 1;
const FLAG_CLEAN: u32 = 1;
const HEADER_LEN: usize = 64;
const REGIONS_AT: u64 = 4096;

/// A byte range of the volume, 4 KiB aligned (the last one may end at the volume's end).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyRange {
    pub offset: u64,
    pub len: u64,
}

impl DirtyRange {
    /// The same bytes as a `Range`.
    pub fn range(&self) -> std::ops::Range<u64> {
        self.offset..self.offset + self.len
    }
}

/// How the dirty set came to be when the bitmap was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// A new bitmap: nothing is known about earlier changes (take a full snapshot).
    New,
    /// The last stop was clean: the dirty set is exact.
    Clean,
    /// The last stop was not clean: the dirty set was rebuilt from write-intent regions
    /// and is a superset of what changed.
    Crashed,
}

/// Which blocks a snapshot epoch captures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpochScope {
    /// Only blocks dirty since the last committed snapshot (an incremental).
    Dirty,
    /// Every block (a full snapshot, or a rescan after the dirty set was lost).
    All,
}

/// A fixed-size bitmap updated without locks.
struct Bits {
    words: Vec<AtomicU64>,
    len: u64,
}

impl Bits {
    fn new(len: u64) -> Bits {
        let n = len.div_ceil(64) as usize;
        Bits {
            words: (0..n).map(|_| AtomicU64::new(0)).collect(),
            len,
        }
    }

    fn all(len: u64) -> Bits {
        let b = Bits::new(len);
        b.set_range(0, len);
        b
    }

    fn get(&self, i: u64) -> bool {
        self.words[(i / 64) as usize].load(Ordering::Acquire) & (1 << (i % 64)) != 0
    }

    fn set(&self, i: u64) {
        self.words[(i / 64) as usize].fetch_or(1 << (i % 64), Ordering::AcqRel);
    }

    fn clear(&self, i: u64) {
        self.words[(i / 64) as usize].fetch_and(!(1 << (i % 64)), Ordering::AcqRel);
    }

    /// Sets bits `[start, end)`.
    fn set_range(&self, start: u64, end: u64) {
        let mut i = start;
        while i < end {
            let w = i / 64;
            let lo = i % 64;
            let hi = (end - w * 64).min(64);
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            self.words[w as usize].fetch_or(mask, Ordering::AcqRel);
            i = w * 64 + hi;
        }
    }

    /// Whether every bit in `[start, end)` is set.
    fn all_set(&self, start: u64, end: u64) -> bool {
        (start..end).all(|i| self.get(i))
    }

    fn or_from(&self, other: &Bits) {
        for (a, b) in self.words.iter().zip(&other.words) {
            a.fetch_or(b.load(Ordering::Acquire), Ordering::AcqRel);
        }
    }

    /// Runs of set bits as `(first, count)`.
    fn runs(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (wi, w) in self.words.iter().enumerate() {
            let mut word = w.load(Ordering::Acquire);
            while word != 0 {
                let bit = u64::from(word.trailing_zeros());
                let i = wi as u64 * 64 + bit;
                word &= word - 1;
                if i >= self.len {
                    break;
                }
                match out.last_mut() {
                    Some((s, n)) if *s + *n == i => *n += 1,
                    _ => out.push((i, 1)),
                }
            }
        }
        out
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.words.len() * 8);
        for w in &self.words {
            out.extend_from_slice(&w.load(Ordering::Acquire).to_le_bytes());
        }
        out.truncate(self.len.div_ceil(8) as usize);
        out
    }

    fn from_bytes(len: u64, bytes: &[u8]) -> Bits {
        let b = Bits::new(len);
        for (i, chunk) in bytes.chunks(8).enumerate() {
            let mut a = [0u8; 8];
            a[..chunk.len()].copy_from_slice(chunk);
            if let Some(w) = b.words.get(i) {
                w.store(u64::from_le_bytes(a), Ordering::Release);
            }
        }
        // Bits past `len` (from a corrupt or foreign file) are dropped.
        if len % 64 != 0 {
            if let Some(last) = b.words.last() {
                last.fetch_and((1u64 << (len % 64)) - 1, Ordering::AcqRel);
            }
        }
        b
    }
}

/// The persisted bitmap file.
struct BitmapFile {
    file: File,
    path: PathBuf,
    size: u64,
    generation: u64,
}

impl BitmapFile {
    fn fine_at(size: u64) -> u64 {
        REGIONS_AT + regions_of(size).div_ceil(8).next_multiple_of(4096)
    }

    fn io_err(&self, op: &'static str) -> impl FnOnce(io::Error) -> NbdError + '_ {
        move |source| NbdError::Bitmap {
            op,
            path: self.path.clone(),
            source,
        }
    }

    fn header(&self, clean: bool, fine_crc: u32) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&(if clean { FLAG_CLEAN } else { 0 }).to_le_bytes());
        h[16..24].copy_from_slice(&self.size.to_le_bytes());
        h[24..28].copy_from_slice(&(BLOCK as u32).to_le_bytes());
        h[28..32].copy_from_slice(&(REGION as u32).to_le_bytes());
        h[32..40].copy_from_slice(&self.generation.to_le_bytes());
        h[40..44].copy_from_slice(&fine_crc.to_le_bytes());
        let crc = crc32fast::hash(&h[..60]);
        h[60..].copy_from_slice(&crc.to_le_bytes());
        h
    }

    fn write_header(&self, clean: bool, fine_crc: u32) -> Result<(), NbdError> {
        self.write_at(&self.header(clean, fine_crc), 0)
            .map_err(self.io_err("write the header of"))
    }

    fn write_at(&self, bytes: &[u8], offset: u64) -> io::Result<()> {
        failpoint::check("nbd.cbt.write")?;
        self.file.write_all_at(bytes, offset)
    }

    fn sync_io(&self) -> io::Result<()> {
        failpoint::check("nbd.cbt.fsync")?;
        self.file.sync_data()
    }

    fn sync(&self) -> Result<(), NbdError> {
        self.sync_io().map_err(self.io_err("sync"))
    }

    fn write_regions(&self, bits: &Bits) -> Result<(), NbdError> {
        self.write_at(&bits.to_bytes(), REGIONS_AT)
            .map_err(self.io_err("write regions of"))
    }
}

fn intent_err(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(
        e.kind(),
        format!("cannot persist the write intent to {}: {e}", path.display()),
    )
}

fn regions_of(size: u64) -> u64 {
    size.div_ceil(REGION)
}

fn blocks_of(size: u64) -> u64 {
    size.div_ceil(BLOCK)
}

/// Blocks touched by `[offset, offset + len)`, as `[first, end)`.
fn block_span(offset: u64, len: u64) -> (u64, u64) {
    (offset / BLOCK, (offset + len).div_ceil(BLOCK))
}

/// The open copy-before-write epoch.
struct Epoch {
    /// Blocks whose point-in-time content has not been streamed or saved yet.
    pending: Bits,
    /// Blocks saved to the spill file.
    saved: Bits,
    /// The dirty set this epoch took (merged back if the snapshot is abandoned).
    taken: Arc<Bits>,
    spill: File,
    spill_path: PathBuf,
    /// Serialises "copy aside, then let the write through" against snapshot reads.
    copy_lock: Mutex<()>,
}

/// State that writers read and epoch switches replace.
struct Tracking {
    dirty: Arc<Bits>,
    epoch: Option<Arc<Epoch>>,
    /// `close` has written the exact dirty set: later writes are refused (see `close`).
    closed: bool,
}

/// An export whose writes are tracked for incremental snapshots; see the module docs.
pub struct TrackedExport<E: Export> {
    inner: E,
    size: u64,
    state: RwLock<Tracking>,
    /// In-memory mirror of the persisted intent bits: set only once durable.
    intent: Bits,
    bitmap: Mutex<BitmapFile>,
    /// The bitmap file's path, for logs (`<volume id>.cbt` in the daemon).
    bitmap_path: PathBuf,
    /// The file still says CLEAN; the first mutation must clear that first.
    clean_on_disk: AtomicBool,
    recovery: Recovery,
    /// Serialises epoch switches, finishes and `close` (never taken by writers), so the
    /// bitmap file can be written between them without the state lock.
    switch: Mutex<()>,
    #[cfg(test)]
    step_hook: Mutex<Option<StepHook>>,
}

#[cfg(test)]
type StepHook = Box<dyn Fn(FinishStep) + Send + Sync>;

/// Points between the steps of [`TrackedExport::finish_epoch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FinishStep {
    /// On commit, the new generation is durable; nothing else has changed.
    GenerationDurable,
    /// The epoch is closed and writers run again; on commit the in-memory intent has
    /// shrunk but the file's has not.
    WritersResumed,
}

impl<E: Export> TrackedExport<E> {
    /// Wraps `inner`, opening (or creating) its bitmap file at `bitmap_path`.
    pub fn open(inner: E, bitmap_path: &Path) -> Result<TrackedExport<E>, NbdError> {
        let size = inner.size();
        let path = bitmap_path.to_path_buf();
        let err = |op: &'static str| {
            let path = path.clone();
            move |source| NbdError::Bitmap { op, path, source }
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
        let nblocks = blocks_of(size);
        let nregions = regions_of(size);

        let mut h = [0u8; HEADER_LEN];
        if len >= HEADER_LEN as u64 {
            file.read_exact_at(&mut h, 0)
                .map_err(err("read the header of"))?;
        }
        // Empty, or created but never initialised (a crash right after creation).
        if len < HEADER_LEN as u64 || h.iter().all(|&b| b == 0) {
            let bf = BitmapFile {
                file,
                path,
                size,
                generation: 0,
            };
            let fine_len = nblocks.div_ceil(8);
            bf.file.set_len(0).map_err(bf.io_err("size"))?;
            bf.file
                .set_len(BitmapFile::fine_at(size) + fine_len)
                .map_err(bf.io_err("size"))?;
            bf.write_header(false, 0)?;
            bf.sync()?;
            return Ok(Self::assemble(
                inner,
                bf,
                Bits::new(nblocks),
                Bits::new(nregions),
                false,
                Recovery::New,
            ));
        }

        let corrupt = |reason: &str| NbdError::BitmapCorrupt {
            path: path.clone(),
            reason: reason.to_string(),
        };
        let le32 = |at: usize| u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
        let le64 = |at: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&h[at..at + 8]);
            u64::from_le_bytes(a)
        };
        if &h[..8] != MAGIC {
            return Err(corrupt("bad magic"));
        }
        if crc32fast::hash(&h[..60]) != le32(60) {
            return Err(corrupt("header checksum mismatch"));
        }
        if le32(8) != VERSION || le32(24) != BLOCK as u32 || le32(28) != REGION as u32 {
            return Err(corrupt("unsupported version or geometry"));
        }
        if le64(16) != size {
            return Err(NbdError::BitmapSizeMismatch {
                path,
                found: le64(16),
                expected: size,
            });
        }
        if len < BitmapFile::fine_at(size) + nblocks.div_ceil(8) {
            return Err(corrupt("file is truncated"));
        }
        let bf = BitmapFile {
            file,
            path: path.clone(),
            size,
            generation: le64(32),
        };
        let mut region_bytes = vec![0u8; nregions.div_ceil(8) as usize];
        bf.file
            .read_exact_at(&mut region_bytes, REGIONS_AT)
            .map_err(bf.io_err("read regions of"))?;
        let regions = Bits::from_bytes(nregions, &region_bytes);

        if le32(12) & FLAG_CLEAN != 0 {
            let mut fine = vec![0u8; nblocks.div_ceil(8) as usize];
            bf.file
                .read_exact_at(&mut fine, BitmapFile::fine_at(size))
                .map_err(bf.io_err("read blocks of"))?;
            if crc32fast::hash(&fine) != le32(40) {
                return Err(corrupt("block bitmap checksum mismatch"));
            }
            let dirty = Bits::from_bytes(nblocks, &fine);
            return Ok(Self::assemble(
                inner,
                bf,
                dirty,
                regions,
                true,
                Recovery::Clean,
            ));
        }
        // Unclean stop: every block of every region with a write intent may have changed.
        let dirty = Bits::new(nblocks);
        for (first, count) in regions.runs() {
            let end = ((first + count) * BLOCKS_PER_REGION).min(nblocks);
            dirty.set_range(first * BLOCKS_PER_REGION, end);
        }
        Ok(Self::assemble(
            inner,
            bf,
            dirty,
            regions,
            false,
            Recovery::Crashed,
        ))
    }

    fn assemble(
        inner: E,
        bitmap: BitmapFile,
        dirty: Bits,
        intent: Bits,
        clean_on_disk: bool,
        recovery: Recovery,
    ) -> TrackedExport<E> {
        TrackedExport {
            size: inner.size(),
            inner,
            state: RwLock::new(Tracking {
                dirty: Arc::new(dirty),
                epoch: None,
                closed: false,
            }),
            intent,
            bitmap_path: bitmap.path.clone(),
            bitmap: Mutex::new(bitmap),
            clean_on_disk: AtomicBool::new(clean_on_disk),
            recovery,
            switch: Mutex::new(()),
            #[cfg(test)]
            step_hook: Mutex::new(None),
        }
    }

    /// How the dirty set was recovered when the bitmap was opened.
    pub fn recovery(&self) -> Recovery {
        self.recovery
    }

    /// Snapshots committed against this bitmap (a snapshot's manifest can record it).
    pub fn generation(&self) -> u64 {
        self.lock_bitmap().generation
    }

    /// The wrapped export.
    pub fn inner(&self) -> &E {
        &self.inner
    }

    /// Blocks changed since the last committed snapshot, as byte ranges (a peek).
    pub fn dirty_ranges(&self) -> Vec<DirtyRange> {
        let dirty = Arc::clone(&self.read_state().dirty);
        self.ranges_of(&dirty)
    }

    fn ranges_of(&self, bits: &Bits) -> Vec<DirtyRange> {
        bits.runs()
            .into_iter()
            .map(|(first, count)| {
                let offset = first * BLOCK;
                let end = ((first + count) * BLOCK).min(self.size);
                DirtyRange {
                    offset,
                    len: end - offset,
                }
            })
            .collect()
    }

    fn read_state(&self) -> RwLockReadGuard<'_, Tracking> {
        // Poisoning means a writer panicked between two atomic updates; the bitmaps are
        // still a superset, which is what tracking needs.
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_state(&self) -> RwLockWriteGuard<'_, Tracking> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_bitmap(&self) -> MutexGuard<'_, BitmapFile> {
        self.bitmap.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the write intent for `[offset, offset + len)` durable. Cheap when every
    /// region involved is already marked.
    fn persist_intent(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let first = offset / REGION;
        let end = (offset + len).div_ceil(REGION).min(regions_of(self.size));
        self.persist_regions(&[(first, end)])
    }

    /// Makes the write intent for every region span `[first, end)` durable, with one sync.
    fn persist_regions(&self, spans: &[(u64, u64)]) -> io::Result<()> {
        let marked = |spans: &[(u64, u64)]| spans.iter().all(|&(f, e)| self.intent.all_set(f, e));
        if marked(spans) && !self.clean_on_disk.load(Ordering::Acquire) {
            return Ok(());
        }
        let bf = self.lock_bitmap();
        let to_io = |e: NbdError| io::Error::other(e.to_string());
        if self.clean_on_disk.load(Ordering::Acquire) {
            // From now on the block section is stale: say so before anything changes.
            bf.write_header(false, 0).map_err(to_io)?;
            bf.sync().map_err(to_io)?;
            self.clean_on_disk.store(false, Ordering::Release);
        }
        if marked(spans) {
            return Ok(());
        }
        for &(first, end) in spans {
            if first >= end || self.intent.all_set(first, end) {
                continue;
            }
            // Write the affected bytes of the region section with the new bits included.
            let lo = first / 8;
            let hi = (end - 1) / 8;
            let mut bytes = vec![0u8; (hi - lo + 1) as usize];
            for (k, byte) in bytes.iter_mut().enumerate() {
                for bit in 0..8u64 {
                    let r = (lo + k as u64) * 8 + bit;
                    let new = spans.iter().any(|&(f, e)| (f..e).contains(&r));
                    if r < regions_of(self.size) && (self.intent.get(r) || new) {
                        *byte |= 1 << bit;
                    }
                }
            }
            bf.write_at(&bytes, REGIONS_AT + lo)
                .map_err(|e| intent_err(&bf.path, e))?;
        }
        // A failed sync is not trusted to have written anything: the intent bits stay clear
        // in memory, so the next write to these regions writes and syncs them again.
        bf.sync_io().map_err(|e| intent_err(&bf.path, e))?;
        // Only now may other writers skip the sync for these regions.
        for &(first, end) in spans {
            self.intent.set_range(first, end);
        }
        Ok(())
    }

    /// The tracking part of every mutation: persist intent, mark dirty, copy aside what the
    /// open epoch still needs. Returns the read guard to hold across the data write.
    fn before_mutation(&self, offset: u64, len: u64) -> io::Result<RwLockReadGuard<'_, Tracking>> {
        // Under the read lock, so a commit (which shrinks the intent) cannot slip between
        // "intent is durable" and "block is marked dirty".
        let state = self.read_state();
        if state.closed {
            return Err(closed_err());
        }
        self.persist_intent(offset, len)?;
        if len == 0 {
            return Ok(state);
        }
        let (first, end) = block_span(offset, len);
        if let Some(epoch) = &state.epoch {
            self.copy_before_write(epoch, first, end)?;
        }
        state.dirty.set_range(first, end);
        Ok(state)
    }

    fn copy_before_write(&self, epoch: &Epoch, first: u64, end: u64) -> io::Result<()> {
        for b in first..end {
            if !epoch.pending.get(b) {
                continue;
            }
            let _guard = epoch.copy_lock.lock().unwrap_or_else(|p| p.into_inner());
            // Re-check under the lock: a snapshot read or another writer may have won.
            if !epoch.pending.get(b) {
                continue;
            }
            let mut buf = vec![0u8; self.block_len(b) as usize];
            self.inner.read_at(&mut buf, b * BLOCK)?;
            epoch.spill.write_all_at(&buf, b * BLOCK)?;
            epoch.saved.set(b);
            // Cleared last: a writer that sees it clear knows the copy is complete.
            epoch.pending.clear(b);
        }
        Ok(())
    }

    fn block_len(&self, b: u64) -> u64 {
        (self.size - b * BLOCK).min(BLOCK)
    }

    /// Opens a snapshot epoch: flushes, swaps the dirty set out (writers pause only for the
    /// swap) and returns the ranges whose point-in-time content must be streamed with
    /// [`read_snapshot_block`](Self::read_snapshot_block). Copies of overwritten blocks go
    /// to a new sparse file at `spill_path`, removed when the epoch finishes.
    pub fn start_epoch(
        &self,
        scope: EpochScope,
        spill_path: &Path,
    ) -> Result<Vec<DirtyRange>, NbdError> {
        self.start_epoch_aligned(scope, spill_path, BLOCK)
    }

    /// [`start_epoch`](Self::start_epoch) for a consumer that reads whole `align`-byte
    /// blocks (a store block of 64 KiB): every 4 KiB block sharing an `align` block with a
    /// dirty one is protected and returned too, so that the whole `align` block can be read
    /// at its point in time. `align` is a multiple of 4 KiB.
    pub fn start_epoch_aligned(
        &self,
        scope: EpochScope,
        spill_path: &Path,
        align: u64,
    ) -> Result<Vec<DirtyRange>, NbdError> {
        self.start_epoch_timed(scope, spill_path, align)
            .map(|(ranges, _)| ranges)
    }

    /// [`start_epoch_aligned`](Self::start_epoch_aligned), also returning how long writers
    /// were held: from the request for the switch (from then on new writes wait) until they
    /// may resume. The flush before it does not hold writers and is not counted.
    pub fn start_epoch_timed(
        &self,
        scope: EpochScope,
        spill_path: &Path,
        align: u64,
    ) -> Result<(Vec<DirtyRange>, std::time::Duration), NbdError> {
        let group = (align / BLOCK).max(1);
        let _switch = self.lock_switch();
        self.inner
            .flush()
            .map_err(|source| NbdError::Epoch { offset: 0, source })?;
        let spill_err = |source| NbdError::Bitmap {
            op: "create the spill file",
            path: spill_path.to_path_buf(),
            source,
        };
        let spill = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(spill_path)
            .map_err(spill_err)?;
        spill.set_len(self.size).map_err(spill_err)?;
        // Everything that does not depend on the dirty set is prepared before writers
        // are paused; under the lock only the swap and an OR of words remain.
        let nblocks = blocks_of(self.size);
        let fresh = Arc::new(Bits::new(nblocks));
        let saved = Bits::new(nblocks);
        let pending = match scope {
            EpochScope::Dirty => Bits::new(nblocks),
            EpochScope::All => Bits::all(nblocks),
        };
        let held = std::time::Instant::now();
        let mut state = self.write_state();
        if state.epoch.is_some() {
            drop(state);
            let _ = std::fs::remove_file(spill_path);
            return Err(NbdError::EpochOpen);
        }
        let taken = std::mem::replace(&mut state.dirty, fresh);
        // What this epoch streams, fixed while writers are paused (they clear `pending`
        // bits as they copy blocks aside once they resume).
        let streamed = Bits::new(nblocks);
        if scope == EpochScope::Dirty {
            for (first, count) in taken.runs() {
                let start = first / group * group;
                let end = (first + count).div_ceil(group) * group;
                streamed.set_range(start, end.min(nblocks));
            }
            pending.or_from(&streamed);
        }
        state.epoch = Some(Arc::new(Epoch {
            pending,
            saved,
            taken: Arc::clone(&taken),
            spill,
            spill_path: spill_path.to_path_buf(),
            copy_lock: Mutex::new(()),
        }));
        drop(state);
        let held = held.elapsed();
        // `streamed` is ours alone, unlike `pending`, so the ranges are computed unlocked.
        let ranges = match scope {
            EpochScope::Dirty => self.ranges_of(&streamed),
            EpochScope::All => vec![DirtyRange {
                offset: 0,
                len: self.size,
            }],
        };
        Ok((ranges, held))
    }

    /// The open epoch.
    fn open_epoch(&self) -> Result<Arc<Epoch>, NbdError> {
        self.read_state()
            .epoch
            .as_ref()
            .map(Arc::clone)
            .ok_or(NbdError::NoEpoch)
    }

    /// The 4 KiB-granular dirty set the open epoch took at its switch (before any widening
    /// to `align` blocks): every byte changed since the last committed snapshot lies in it.
    pub fn epoch_dirty_ranges(&self) -> Result<Vec<DirtyRange>, NbdError> {
        let epoch = self.open_epoch()?;
        Ok(self.ranges_of(&epoch.taken))
    }

    /// The epoch switch for an incremental snapshot: [`start_epoch`](Self::start_epoch)
    /// with [`EpochScope::Dirty`]. Returns the 4 KiB-granular ranges changed since the last
    /// committed snapshot; stream them with `read_snapshot_block`, then `finish_epoch`.
    pub fn take_dirty_for_snapshot(&self, spill_path: &Path) -> Result<Vec<DirtyRange>, NbdError> {
        self.start_epoch(EpochScope::Dirty, spill_path)
    }

    /// The point-in-time content of the block at `offset` (4 KiB aligned; the last block
    /// may be shorter). Each block of the epoch can be read once; a second read of the same
    /// block, or a block outside the epoch, is `BadBlock`.
    pub fn read_snapshot_block(&self, offset: u64) -> Result<Vec<u8>, NbdError> {
        if offset % BLOCK != 0 || offset >= self.size {
            return Err(NbdError::BadBlock { offset });
        }
        let mut buf = vec![0u8; self.block_len(offset / BLOCK) as usize];
        self.read_snapshot_blocks(offset, &mut buf)?;
        Ok(buf)
    }

    /// The point-in-time content of the consecutive blocks `offset .. offset + buf.len()`
    /// (4 KiB aligned; `buf` a whole number of blocks, or reaching the export's end), with
    /// one read per run of blocks that share a source. Same rules as
    /// [`read_snapshot_block`](Self::read_snapshot_block) for every block; on error no
    /// block is consumed.
    pub fn read_snapshot_blocks(&self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        let end = offset + buf.len() as u64;
        if offset % BLOCK != 0 || end > self.size || (end % BLOCK != 0 && end != self.size) {
            return Err(NbdError::BadBlock { offset });
        }
        let epoch = self.open_epoch()?;
        // Writers wait for `copy_lock` before overwriting a pending block.
        let _guard = epoch.copy_lock.lock().unwrap_or_else(|p| p.into_inner());
        let (first, last) = (offset / BLOCK, end.div_ceil(BLOCK));
        // Which source each block comes from: saved aside (spill) or not overwritten yet.
        let saved = |b: u64| epoch.saved.get(b);
        if let Some(b) = (first..last).find(|&b| !saved(b) && !epoch.pending.get(b)) {
            return Err(NbdError::BadBlock { offset: b * BLOCK });
        }
        let mut b = first;
        while b < last {
            let from_spill = saved(b);
            let mut run_end = b + 1;
            while run_end < last && saved(run_end) == from_spill {
                run_end += 1;
            }
            let lo = ((b - first) * BLOCK) as usize;
            let hi = (((run_end - first) * BLOCK) as usize).min(buf.len());
            let at = b * BLOCK;
            let io = |source| NbdError::Epoch { offset: at, source };
            if from_spill {
                epoch
                    .spill
                    .read_exact_at(&mut buf[lo..hi], at)
                    .map_err(io)?;
            } else {
                self.inner.read_at(&mut buf[lo..hi], at).map_err(io)?;
            }
            b = run_end;
        }
        for b in first..last {
            if saved(b) {
                epoch.saved.clear(b);
            } else {
                epoch.pending.clear(b);
            }
        }
        Ok(())
    }

    /// Closes the epoch. `committed`: the snapshot is durable, so the persisted intent
    /// shrinks to the regions dirty now and the generation advances. Otherwise the dirty
    /// set taken by the epoch is merged back, as if the epoch never happened. Returns the
    /// generation.
    pub fn finish_epoch(&self, committed: bool) -> Result<u64, NbdError> {
        self.finish_epoch_timed(committed)
            .map(|(generation, _)| generation)
    }

    /// [`finish_epoch`](Self::finish_epoch), also returning how long writers were held
    /// (from the request for the state lock until they may resume).
    ///
    /// Writers are held only for in-memory work; the bitmap file is written around it:
    /// 1. (commit) the image is flushed, then the new generation is made durable, writers
    ///    running;
    /// 2. writers held: the epoch is closed and, on commit, the in-memory intent shrinks to
    ///    the regions dirty since the switch (exact: no write is in flight);
    /// 3. (commit) the region section is rewritten from the in-memory intent, writers
    ///    running.
    ///
    /// Why this is crash-safe. The persisted intent always covers the in-memory intent
    /// (bits are set in memory only once durable, and the file is written only from
    /// memory, under the bitmap lock), and a writer skips its intent sync only for a
    /// region set in memory. So a write acknowledged after step 2 is covered on disk
    /// whatever step 3 does, and one acknowledged before it is in the dirty set that step 2
    /// kept in the intent. Step 3 only clears bits, so a torn or lost write of it leaves a
    /// superset. The intent never shrinks on disk before step 1 is durable: a bitmap whose
    /// regions no longer cover the epoch's blocks never carries the generation that a
    /// tracking base (`<generation> <parent>`) written before this epoch names. If step 1
    /// fails the intent is left as it was and the epoch's dirty set is merged back. If the
    /// flush fails the generation stays too (the merged set is still relative to the
    /// tracking base); if the generation's write or step 3 fails it has moved on in memory
    /// all the same (the next snapshot rescans). The flush makes durable every write the
    /// snapshot holds before the intent forgets it (see the comment in the code).
    pub fn finish_epoch_timed(
        &self,
        committed: bool,
    ) -> Result<(u64, std::time::Duration), NbdError> {
        let _switch = self.lock_switch();
        if self.read_state().epoch.is_none() {
            return Err(NbdError::NoEpoch);
        }
        // Every write of the epoch's dirty set returned before the switch, but one that
        // returned while `start_epoch` flushed may not be durable yet, and the snapshot
        // holds it. It must be before the intent forgets it: a power loss could otherwise
        // leave the image without a write that the snapshot has and the next dirty set
        // lacks. A failed flush fails the commit (nothing shrinks; the set is merged back).
        let generation = if committed {
            self.inner
                .flush()
                .map_err(|source| NbdError::Epoch { offset: 0, source })
                .and_then(|()| self.advance_generation())
        } else {
            Ok(self.generation())
        };
        self.step(FinishStep::GenerationDurable);
        let held = std::time::Instant::now();
        let mut state = self.write_state();
        let epoch = state.epoch.take().ok_or(NbdError::NoEpoch)?;
        if committed && generation.is_ok() {
            self.shrink_intent_to(&state.dirty);
        }
        let dirty = Arc::clone(&state.dirty);
        drop(state);
        let held = held.elapsed();
        self.step(FinishStep::WritersResumed);
        let _ = std::fs::remove_file(&epoch.spill_path);
        let result = generation.and_then(|generation| {
            if committed {
                self.write_intent()?;
            }
            Ok(generation)
        });
        // Not on commit (the dirty set then is what changed since the switch). Outside the
        // state lock: writers only ever set bits of the set, and `switch` keeps another
        // epoch from taking it away meanwhile.
        if !committed || result.is_err() {
            dirty.or_from(&epoch.taken);
        }
        let generation = result?;
        tracing::debug!(
            bitmap = %self.bitmap_path.display(),
            committed,
            held_us = held.as_micros() as u64,
            "snapshot epoch finished"
        );
        Ok((generation, held))
    }

    /// Step 1 of a commit: the next generation, durable (the file stays marked not clean:
    /// the block section is only written at close). On failure it has moved on in memory
    /// all the same, so no tracking base can match it.
    fn advance_generation(&self) -> Result<u64, NbdError> {
        let mut bf = self.lock_bitmap();
        bf.generation += 1;
        bf.write_header(false, 0)?;
        bf.sync()?;
        self.clean_on_disk.store(false, Ordering::Release);
        Ok(bf.generation)
    }

    /// Step 2 of a commit, writers held: the in-memory intent becomes the regions of
    /// `dirty`. One pass over the words, no allocation.
    fn shrink_intent_to(&self, dirty: &Bits) {
        let per = (BLOCKS_PER_REGION / 64) as usize;
        let mut regions = dirty.words.chunks(per);
        for w in &self.intent.words {
            let mut word = 0u64;
            for bit in 0..64 {
                match regions.next() {
                    Some(r) if r.iter().any(|b| b.load(Ordering::Acquire) != 0) => word |= 1 << bit,
                    Some(_) => {}
                    None => break,
                }
            }
            w.store(word, Ordering::Release);
        }
    }

    /// Step 3 of a commit: the region section becomes the in-memory intent. Under the
    /// bitmap lock, so no writer's intent sync interleaves (theirs set memory bits only
    /// once durable, so memory never holds a bit the file lacks).
    fn write_intent(&self) -> Result<(), NbdError> {
        let bf = self.lock_bitmap();
        bf.write_regions(&self.intent)?;
        bf.sync()
    }

    fn lock_switch(&self) -> MutexGuard<'_, ()> {
        self.switch.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A test's pause between the steps of `finish_epoch` (to crash or write there).
    #[cfg(test)]
    fn step(&self, step: FinishStep) {
        let hook = self.step_hook.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(hook) = hook.as_ref() {
            hook(step);
        }
    }

    #[cfg(not(test))]
    fn step(&self, _step: FinishStep) {}

    /// Persists the exact dirty set and marks the bitmap clean. Call once the server has
    /// stopped serving this export. Writes after it fail (`ESHUTDOWN`): a connection still
    /// draining requests it had read could otherwise change the image and mark the bitmap
    /// behind the back of the next tracker of the same volume, which trusts the clean
    /// file it opened.
    pub fn close(&self) -> Result<(), NbdError> {
        let _switch = self.lock_switch();
        let mut state = self.write_state();
        state.closed = true;
        let dirty = Bits::new(blocks_of(self.size));
        dirty.or_from(&state.dirty);
        if let Some(epoch) = &state.epoch {
            // An unfinished epoch did not commit: its blocks are still dirty.
            dirty.or_from(&epoch.taken);
        }
        let bytes = dirty.to_bytes();
        let bf = self.lock_bitmap();
        bf.write_at(&bytes, BitmapFile::fine_at(self.size))
            .map_err(bf.io_err("write blocks of"))?;
        bf.sync()?;
        bf.write_header(true, crc32fast::hash(&bytes))?;
        bf.sync()?;
        self.clean_on_disk.store(true, Ordering::Release);
        Ok(())
    }
}

/// What a write to a closed tracker fails with: NBD_ESHUTDOWN to the client (the export
/// is going away: the volume is being detached, or the daemon stops).
fn closed_err() -> io::Error {
    io::Error::from_raw_os_error(libc::ESHUTDOWN)
}

impl<E: Export> Export for TrackedExport<E> {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }

    fn read_cached(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
        self.inner.read_cached(buf, offset)
    }

    // Reads never pass through the tracking: they are the inner export's.
    fn read_file(&self, offset: u64, len: u64) -> Option<&std::fs::File> {
        self.inner.read_file(offset, len)
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        let _state = self.before_mutation(offset, buf.len() as u64)?;
        self.inner.write_at(buf, offset, fua)
    }

    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }

    fn prepare_writes(&self, ranges: &[(u64, u64)]) {
        let spans: Vec<(u64, u64)> = ranges
            .iter()
            .filter(|&&(off, len)| len > 0 && check_range(off, len, self.size).is_ok())
            .map(|&(off, len)| (off / REGION, (off + len).div_ceil(REGION)))
            .collect();
        // As in `before_mutation`: a commit must not shrink the intent meanwhile. A
        // failure here is met again, and reported, by the writes.
        let state = self.read_state();
        if !state.closed {
            let _ = self.persist_regions(&spans);
        }
    }

    fn write_needs_sync(&self, offset: u64, len: u64) -> bool {
        if len == 0 || check_range(offset, len, self.size).is_err() {
            return false;
        }
        let end = (offset + len).div_ceil(REGION);
        self.clean_on_disk.load(Ordering::Acquire) || !self.intent.all_set(offset / REGION, end)
    }

    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(offset, len, self.size)?;
        let _state = self.before_mutation(offset, len)?;
        self.inner.trim(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
        check_range(offset, len, self.size)?;
        let _state = self.before_mutation(offset, len)?;
        self.inner.write_zeroes(offset, len, may_trim)
    }

    fn write_zeroes_fast(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
        check_range(offset, len, self.size)?;
        // Copy-before-write of a large range is not fast; let the client write instead.
        if self.read_state().epoch.is_some() {
            return Err(io::ErrorKind::Unsupported.into());
        }
        let _state = self.before_mutation(offset, len)?;
        self.inner.write_zeroes_fast(offset, len, may_trim)
    }

    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.inner.block_status(offset, len)
    }

    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.cache(offset, len)
    }

    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
}

fn check_range(offset: u64, len: u64, size: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::from_raw_os_error(libc::ENOSPC)),
    }
}

/// Point-in-time hole skipping for a snapshot that streams every block
/// ([`EpochScope::All`]); kept apart from the epoch switch and close.
impl<E: Export> TrackedExport<E> {
    /// The ranges of the open epoch that may hold non-zero point-in-time content, widened to
    /// whole `align`-byte blocks (a multiple of 4 KiB; the last range may end at the
    /// export's end): every other block read as zeros at the switch. Those other blocks are
    /// released: writers no longer save them aside, and a snapshot read of one is
    /// `BadBlock`. Call once, before reading any block of the epoch.
    ///
    /// Why this is the point in time although writers go on: a block that was not zero at
    /// the switch either is still unchanged when the inner export's allocation is walked
    /// (so the walk reports it as data), or a writer changed it before that, and then
    /// copy-before-write saved it first (the saved bit is set before the write goes
    /// through); the saved set is read only after the walk. A hole that a writer filled
    /// before the walk is returned too (its saved copy reads as zeros); one filled after it
    /// is not, and rightly so.
    pub fn epoch_data_ranges(&self, align: u64) -> Result<Vec<DirtyRange>, NbdError> {
        let epoch = self.open_epoch()?;
        let group = (align / BLOCK).max(1);
        let nblocks = blocks_of(self.size);
        let data = Bits::new(nblocks);
        let mark = |start: u64, end: u64| {
            let first = start / BLOCK / group * group;
            let last = end.div_ceil(BLOCK).div_ceil(group) * group;
            data.set_range(first, last.min(nblocks));
        };
        let mut pos = 0u64;
        while pos < self.size {
            let extents = self
                .inner
                .block_status(pos, self.size - pos)
                .map_err(|source| NbdError::Epoch {
                    offset: pos,
                    source,
                })?;
            let before = pos;
            for e in extents {
                let end = (pos + e.len).min(self.size);
                if !e.zero {
                    mark(pos, end);
                }
                pos = end;
            }
            if pos == before {
                // No progress (not allowed by the contract): take the rest as data.
                mark(pos, self.size);
                break;
            }
        }
        // Only after the walk (see above): blocks changed before or during it were saved.
        for (first, count) in epoch.saved.runs() {
            mark(first * BLOCK, (first + count) * BLOCK);
        }
        // Release the rest, under the lock writers take to save a block aside.
        let _guard = epoch.copy_lock.lock().unwrap_or_else(|p| p.into_inner());
        for (i, keep) in data.words.iter().enumerate() {
            let keep = keep.load(Ordering::Acquire);
            epoch.pending.words[i].fetch_and(keep, Ordering::AcqRel);
            epoch.saved.words[i].fetch_and(keep, Ordering::AcqRel);
        }
        Ok(self.ranges_of(&data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::FileExport;

    fn setup(size: u64) -> (tempfile::TempDir, TrackedExport<FileExport>) {
        let dir = tempfile::tempdir().unwrap();
        let inner = FileExport::create(&dir.path().join("img"), size).unwrap();
        let t = TrackedExport::open(inner, &dir.path().join("cbt")).unwrap();
        (dir, t)
    }

    fn reopen(dir: &tempfile::TempDir) -> TrackedExport<FileExport> {
        reopen_in(dir.path())
    }

    /// Opens the files as a daemon restarted after SIGKILL would (what was written is there).
    fn reopen_in(dir: &Path) -> TrackedExport<FileExport> {
        let inner = FileExport::open(&dir.join("img")).unwrap();
        TrackedExport::open(inner, &dir.join("cbt")).unwrap()
    }

    /// Indices of the regions with a dirty block.
    fn dirty_regions(t: &TrackedExport<FileExport>) -> Vec<u64> {
        let mut out: Vec<u64> = Vec::new();
        for d in t.dirty_ranges() {
            for reg in d.offset / REGION..(d.offset + d.len).div_ceil(REGION) {
                if out.last() != Some(&reg) {
                    out.push(reg);
                }
            }
        }
        out
    }

    fn on_step(t: &TrackedExport<FileExport>, hook: impl Fn(FinishStep) + Send + Sync + 'static) {
        *t.step_hook.lock().unwrap() = Some(Box::new(hook));
    }

    fn r(offset: u64, len: u64) -> DirtyRange {
        DirtyRange { offset, len }
    }

    #[test]
    fn bits_runs_and_ranges() {
        let b = Bits::new(200);
        b.set_range(3, 70);
        b.set(130);
        b.set_range(190, 200);
        assert_eq!(b.runs(), vec![(3, 67), (130, 1), (190, 10)]);
        let c = Bits::from_bytes(200, &b.to_bytes());
        assert_eq!(c.runs(), b.runs());
        assert!(b.all_set(3, 70) && !b.all_set(2, 70));
        assert_eq!(Bits::all(65).runs(), vec![(0, 65)]);
    }

    #[test]
    fn writes_trims_and_zeroes_are_tracked_at_4k() {
        let size = 8 * REGION + 1000; // a short last block
        let (_dir, t) = setup(size);
        assert_eq!(t.recovery(), Recovery::New);
        t.write_at(&[1; 10], 5000, false).unwrap();
        t.trim(3 * REGION, 8192).unwrap();
        t.write_zeroes(size - 10, 10, true).unwrap();
        assert_eq!(
            t.dirty_ranges(),
            vec![r(4096, 4096), r(3 * REGION, 8192), r(8 * REGION, 1000)]
        );
        assert!(t.write_at(&[1; 10], size - 5, false).is_err());
    }

    #[test]
    fn clean_close_is_exact_and_crash_is_a_superset() {
        let (dir, t) = setup(4 * REGION);
        t.write_at(&[7; 4096], REGION + 8192, false).unwrap();
        t.close().unwrap();
        drop(t);
        let t = reopen(&dir);
        assert_eq!(t.recovery(), Recovery::Clean);
        assert_eq!(t.dirty_ranges(), vec![r(REGION + 8192, 4096)]);
        // Write again, then "crash" (no close): the whole region is dirty afterwards.
        t.write_at(&[8; 4096], 3 * REGION, false).unwrap();
        drop(t);
        let t = reopen(&dir);
        assert_eq!(t.recovery(), Recovery::Crashed);
        assert_eq!(
            t.dirty_ranges(),
            vec![r(REGION, REGION), r(3 * REGION, REGION)]
        );
    }

    #[test]
    fn prepared_write_intents_are_durable_together() {
        let (dir, t) = setup(20 * REGION);
        assert!(t.write_needs_sync(0, 4096));
        // Empty and out-of-range ranges are ignored.
        t.prepare_writes(&[
            (2 * REGION, 4096),
            (17 * REGION - 4096, 8192),
            (0, 0),
            (u64::MAX - 1, 4096),
        ]);
        assert!(!t.write_needs_sync(2 * REGION + 4096, 4096));
        assert!(!t.write_needs_sync(16 * REGION, 2 * REGION));
        assert!(t.write_needs_sync(0, 4096));
        assert!(t.write_needs_sync(17 * REGION, REGION + 1));
        t.write_at(&[1; 4096], 2 * REGION, false).unwrap();
        // "Crash": every prepared region is dirty afterwards, written to or not.
        drop(t);
        let t = reopen(&dir);
        assert_eq!(t.recovery(), Recovery::Crashed);
        assert_eq!(
            t.dirty_ranges(),
            vec![r(2 * REGION, REGION), r(16 * REGION, 2 * REGION)]
        );
    }

    #[test]
    fn copy_before_write_keeps_the_point_in_time_image() {
        let (dir, t) = setup(2 * REGION);
        t.write_at(&[0xaa; 16384], 0, false).unwrap();
        let ranges = t
            .start_epoch(EpochScope::Dirty, &dir.path().join("spill"))
            .unwrap();
        assert_eq!(ranges, vec![r(0, 16384)]);
        assert!(t.dirty_ranges().is_empty());
        // Overwrite block 1 and part of block 2 while the epoch is open.
        t.write_at(&[0xbb; 6000], 4096, false).unwrap();
        assert!(t.read_snapshot_block(0).unwrap().iter().all(|&b| b == 0xaa));
        assert!(t
            .read_snapshot_block(4096)
            .unwrap()
            .iter()
            .all(|&b| b == 0xaa));
        assert!(t
            .read_snapshot_block(8192)
            .unwrap()
            .iter()
            .all(|&b| b == 0xaa));
        // A block not streamed yet is copied aside on its first overwrite only.
        t.write_at(&[0xcc; 4096], 12288, false).unwrap();
        t.write_at(&[0xdd; 4096], 12288, false).unwrap();
        assert!(t
            .read_snapshot_block(12288)
            .unwrap()
            .iter()
            .all(|&b| b == 0xaa));
        // Streamed blocks are not copied again and cannot be read twice.
        t.write_at(&[0xee; 4096], 0, false).unwrap();
        assert!(matches!(
            t.read_snapshot_block(4096),
            Err(NbdError::BadBlock { .. })
        ));
        assert!(matches!(
            t.read_snapshot_block(REGION),
            Err(NbdError::BadBlock { .. })
        ));
        // The new epoch's dirty set holds exactly the writes made during it.
        assert_eq!(t.dirty_ranges(), vec![r(0, 16384)]);
        assert_eq!(t.finish_epoch(true).unwrap(), 1);
        assert!(!dir.path().join("spill").exists());
        // Only the region still dirty keeps its intent bit: a crash now rebuilds region 0.
        drop(t);
        let t = reopen(&dir);
        assert_eq!(t.recovery(), Recovery::Crashed);
        assert_eq!(t.dirty_ranges(), vec![r(0, REGION)]);
        assert_eq!(t.generation(), 1);
    }

    #[test]
    fn multi_block_snapshot_reads_mix_saved_and_untouched_blocks() {
        let (dir, t) = setup(2 * REGION);
        t.write_at(&[0xaa; 32768], 0, false).unwrap();
        let ranges = t
            .start_epoch(EpochScope::Dirty, &dir.path().join("spill"))
            .unwrap();
        assert_eq!(ranges, vec![r(0, 32768)]);
        // Blocks 2 and 5 are overwritten (saved aside); the others are read in place.
        t.write_at(&[0xbb; 4096], 8192, false).unwrap();
        t.write_at(&[0xcc; 4096], 20480, false).unwrap();
        let mut buf = vec![0u8; 24576];
        t.read_snapshot_blocks(0, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0xaa));
        // Consumed: neither the blocks read nor a range overlapping them reads again, and
        // a failed read consumes nothing.
        assert!(matches!(
            t.read_snapshot_blocks(20480, &mut [0u8; 8192]),
            Err(NbdError::BadBlock { offset: 20480 })
        ));
        assert!(t
            .read_snapshot_block(24576)
            .unwrap()
            .iter()
            .all(|&b| b == 0xaa));
        assert!(matches!(
            t.read_snapshot_blocks(4096, &mut [0u8; 100]),
            Err(NbdError::BadBlock { .. })
        ));
        t.finish_epoch(true).unwrap();
    }

    #[test]
    fn abandoned_epoch_merges_the_dirty_set_back() {
        let (dir, t) = setup(REGION);
        t.write_at(&[1; 4096], 0, false).unwrap();
        t.start_epoch(EpochScope::All, &dir.path().join("spill"))
            .unwrap();
        assert!(matches!(
            t.start_epoch(EpochScope::All, &dir.path().join("spill2")),
            Err(NbdError::EpochOpen)
        ));
        t.write_at(&[2; 4096], 8192, false).unwrap();
        assert_eq!(t.finish_epoch(false).unwrap(), 0);
        assert_eq!(t.dirty_ranges(), vec![r(0, 4096), r(8192, 4096)]);
        assert!(matches!(t.finish_epoch(true), Err(NbdError::NoEpoch)));
    }

    #[test]
    fn commit_keeps_a_superset_on_disk_between_its_steps() {
        let (dir, t) = setup(8 * REGION);
        for reg in 0..3 {
            t.write_at(&[1; 4096], reg * REGION, false).unwrap();
        }
        t.start_epoch(EpochScope::Dirty, &dir.path().join("spill"))
            .unwrap();
        // Since the switch: region 3.
        t.write_at(&[2; 4096], 3 * REGION + 8192, false).unwrap();
        let t = Arc::new(t);
        let weak = Arc::downgrade(&t);
        let path = dir.path().to_path_buf();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = Arc::clone(&seen);
        on_step(&t, move |step| {
            seen2.lock().unwrap().push(step);
            // A crash here: the new generation may be durable, but nothing has shrunk.
            let crashed = reopen_in(&path);
            assert_eq!(crashed.recovery(), Recovery::Crashed);
            assert_eq!(crashed.generation(), 1, "{step:?}");
            assert_eq!(dirty_regions(&crashed), vec![0, 1, 2, 3], "{step:?}");
            if step == FinishStep::WritersResumed {
                // Writers run again while the file still holds the old intent. Region 1 was
                // set in the old intent but is not dirty since the switch, region 5 never
                // was: both writes must make their own intent durable.
                let t = weak.upgrade().unwrap();
                assert!(t.write_needs_sync(REGION, 4096));
                t.write_at(&[3; 4096], REGION + 4096, false).unwrap();
                t.write_at(&[3; 4096], 5 * REGION, false).unwrap();
                assert!(!t.write_needs_sync(3 * REGION, 4096));
                let crashed = reopen_in(&path);
                let got = dirty_regions(&crashed);
                for reg in [1, 3, 5] {
                    assert!(got.contains(&reg), "region {reg} lost: {got:?}");
                }
            }
        });
        assert_eq!(t.finish_epoch(true).unwrap(), 1);
        assert_eq!(
            *seen.lock().unwrap(),
            vec![FinishStep::GenerationDurable, FinishStep::WritersResumed]
        );
        // Done: exactly the regions written since the switch, during the finish included.
        let crashed = reopen(&dir);
        assert_eq!(crashed.generation(), 1);
        assert_eq!(dirty_regions(&crashed), vec![1, 3, 5]);
        drop(crashed);
        *t.step_hook.lock().unwrap() = None;
        // The in-memory intent still matches the file: the next write to region 0 syncs.
        assert!(t.write_needs_sync(0, 4096));
        assert!(!t.write_needs_sync(5 * REGION, 4096));
    }

    #[test]
    fn abandon_keeps_the_intent_and_the_generation() {
        let (dir, t) = setup(4 * REGION);
        t.write_at(&[1; 4096], 0, false).unwrap();
        t.start_epoch(EpochScope::Dirty, &dir.path().join("spill"))
            .unwrap();
        t.write_at(&[2; 4096], 2 * REGION, false).unwrap();
        let path = dir.path().to_path_buf();
        on_step(&t, move |step| {
            let crashed = reopen_in(&path);
            assert_eq!(crashed.generation(), 0, "{step:?}");
            assert_eq!(dirty_regions(&crashed), vec![0, 2], "{step:?}");
        });
        assert_eq!(t.finish_epoch(false).unwrap(), 0);
        assert_eq!(t.dirty_ranges(), vec![r(0, 4096), r(2 * REGION, 4096)]);
        assert!(!dir.path().join("spill").exists());
        assert!(!t.write_needs_sync(0, 4096));
        let crashed = reopen(&dir);
        assert_eq!(crashed.generation(), 0);
        assert_eq!(dirty_regions(&crashed), vec![0, 2]);
    }

    type FlushHook = Arc<Mutex<Option<Box<dyn FnOnce() + Send>>>>;

    /// An image in memory whose durable copy is what the last flush saw: a power loss
    /// keeps only that. `on_flush` runs once, inside the next flush, after the copy (a
    /// write that returns while a flush is under way); `fail_flush` makes flushes fail.
    struct VolatileExport {
        image: Mutex<Vec<u8>>,
        durable: Arc<Mutex<Vec<u8>>>,
        on_flush: FlushHook,
        fail_flush: Arc<AtomicBool>,
    }

    impl VolatileExport {
        fn new(image: Vec<u8>) -> VolatileExport {
            VolatileExport {
                durable: Arc::new(Mutex::new(image.clone())),
                image: Mutex::new(image),
                on_flush: Arc::default(),
                fail_flush: Arc::default(),
            }
        }
    }

    impl Export for VolatileExport {
        fn size(&self) -> u64 {
            self.image.lock().unwrap().len() as u64
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            let image = self.image.lock().unwrap();
            buf.copy_from_slice(&image[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write_at(&self, buf: &[u8], offset: u64, _fua: bool) -> io::Result<()> {
            let mut image = self.image.lock().unwrap();
            image[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&self) -> io::Result<()> {
            if self.fail_flush.load(Ordering::Relaxed) {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            let copy = self.image.lock().unwrap().clone();
            *self.durable.lock().unwrap() = copy;
            let hook = self.on_flush.lock().unwrap().take();
            if let Some(hook) = hook {
                hook();
            }
            Ok(())
        }
        fn trim(&self, _: u64, _: u64) -> io::Result<()> {
            Ok(())
        }
        fn write_zeroes(&self, offset: u64, len: u64, _: bool) -> io::Result<()> {
            self.write_at(&vec![0; len as usize], offset, false)
        }
        fn block_status(&self, _: u64, len: u64) -> io::Result<Vec<Extent>> {
            Ok(vec![Extent {
                len,
                hole: false,
                zero: false,
            }])
        }
    }

    #[test]
    fn a_write_that_returns_during_the_switch_flush_survives_a_power_loss() {
        let dir = tempfile::tempdir().unwrap();
        let size = 4 * REGION;
        let inner = VolatileExport::new(vec![0; size as usize]);
        let (durable, on_flush) = (Arc::clone(&inner.durable), Arc::clone(&inner.on_flush));
        let t = Arc::new(TrackedExport::open(inner, &dir.path().join("cbt")).unwrap());
        let x = 2 * REGION;
        let weak = Arc::downgrade(&t);
        *on_flush.lock().unwrap() = Some(Box::new(move || {
            let t = weak.upgrade().unwrap();
            t.write_at(&[0x5a; 4096], x, false).unwrap();
        }));
        t.start_epoch(EpochScope::All, &dir.path().join("spill"))
            .unwrap();
        // The write returned before the switch: the snapshot holds it.
        assert!(t.read_snapshot_block(x).unwrap().iter().all(|&b| b == 0x5a));
        assert_eq!(t.finish_epoch(true).unwrap(), 1);
        // Power loss: only what was flushed is left, with the bitmap as written.
        let image = durable.lock().unwrap().clone();
        drop(t);
        let t = TrackedExport::open(VolatileExport::new(image.clone()), &dir.path().join("cbt"))
            .unwrap();
        assert_eq!(t.generation(), 1);
        let kept = image[x as usize..(x + 4096) as usize]
            .iter()
            .all(|&b| b == 0x5a);
        let dirty = t.dirty_ranges();
        assert!(
            kept || dirty.iter().any(|d| d.range().contains(&x)),
            "the snapshot holds a write at {x} that the image lost and the dirty set {dirty:?} lacks"
        );
    }

    #[test]
    fn a_failed_flush_fails_the_commit_and_keeps_the_dirty_set() {
        let dir = tempfile::tempdir().unwrap();
        let inner = VolatileExport::new(vec![0; 4 * REGION as usize]);
        let fail = Arc::clone(&inner.fail_flush);
        let t = TrackedExport::open(inner, &dir.path().join("cbt")).unwrap();
        t.write_at(&[1; 4096], REGION, false).unwrap();
        t.start_epoch(EpochScope::Dirty, &dir.path().join("spill"))
            .unwrap();
        t.read_snapshot_block(REGION).unwrap();
        fail.store(true, Ordering::Relaxed);
        assert!(t.finish_epoch(true).is_err());
        assert_eq!(t.generation(), 0);
        assert_eq!(t.dirty_ranges(), vec![r(REGION, 4096)]);
        assert!(!dir.path().join("spill").exists());
    }

    #[test]
    fn a_closed_tracker_refuses_writes_so_a_reopened_bitmap_misses_none() {
        let (dir, t1) = setup(4 * REGION);
        t1.write_at(&[1; 4096], 0, false).unwrap();
        // Detach: closed while a connection may still be draining requests.
        t1.close().unwrap();
        let t2 = reopen(&dir);
        assert_eq!(t2.recovery(), Recovery::Clean);
        let late = REGION + 8192;
        let err = t1.write_at(&[2; 4096], late, false).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ESHUTDOWN));
        assert_eq!(
            t1.write_zeroes(late, 4096, true)
                .unwrap_err()
                .raw_os_error(),
            Some(libc::ESHUTDOWN)
        );
        assert!(t1.trim(late, 4096).is_err());
        t1.prepare_writes(&[(late, 4096)]);
        drop(t1);
        t2.write_at(&[3; 4096], 3 * REGION, false).unwrap();
        t2.close().unwrap();
        drop(t2);
        // The image is unchanged where the late write was refused, and every write that
        // was accepted is in the dirty set.
        let t3 = reopen(&dir);
        let mut buf = vec![0u8; 4096];
        t3.read_at(&mut buf, late).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(t3.dirty_ranges(), vec![r(0, 4096), r(3 * REGION, 4096)]);
    }

    #[test]
    fn writes_racing_commits_stay_covered_after_a_crash() {
        let size = 64 * REGION;
        let (dir, t) = setup(size);
        let t = Arc::new(t);
        let stop = Arc::new(AtomicBool::new(false));
        // (when it started, offset) of every write.
        let writers: Vec<_> = (0..3u64)
            .map(|w| {
                let (t, stop) = (Arc::clone(&t), Arc::clone(&stop));
                std::thread::spawn(move || {
                    let mut log = Vec::new();
                    let mut x = 0x2545_f491_4f6c_dd1du64 ^ (w + 1);
                    while !stop.load(Ordering::Relaxed) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let off = (x % (size / BLOCK)) * BLOCK;
                        let at = std::time::Instant::now();
                        t.write_at(&[w as u8; 4096], off, false).unwrap();
                        log.push((at, off));
                    }
                    log
                })
            })
            .collect();
        let mut switched = std::time::Instant::now();
        for i in 0..20 {
            t.start_epoch(EpochScope::Dirty, &dir.path().join(format!("spill{i}")))
                .unwrap();
            switched = std::time::Instant::now();
            std::thread::sleep(std::time::Duration::from_millis(2));
            t.finish_epoch(true).unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
        stop.store(true, Ordering::Relaxed);
        let log: Vec<(std::time::Instant, u64)> = writers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect();
        // "Crash": every write begun after the last switch (the committed snapshot has
        // the rest) must lie in a region the reopened bitmap calls dirty.
        let crashed = reopen(&dir);
        assert_eq!(crashed.generation(), 20);
        let got = dirty_regions(&crashed);
        let after: Vec<u64> = log
            .iter()
            .filter(|(at, _)| *at > switched)
            .map(|(_, off)| off / REGION)
            .collect();
        assert!(!after.is_empty(), "no write after the last switch");
        for reg in after {
            assert!(got.contains(&reg), "region {reg} lost");
        }
    }

    #[test]
    fn concurrent_writers_never_leak_into_the_snapshot() {
        let blocks = 512u64;
        let (dir, t) = setup(blocks * BLOCK);
        // Before the epoch every block holds its own index.
        for b in 0..blocks {
            t.write_at(&[b as u8; BLOCK as usize], b * BLOCK, false)
                .unwrap();
        }
        let t = Arc::new(t);
        let ranges = t
            .start_epoch(EpochScope::All, &dir.path().join("spill"))
            .unwrap();
        assert_eq!(ranges, vec![r(0, blocks * BLOCK)]);
        let writers: Vec<_> = (0..4u64)
            .map(|w| {
                let t = Arc::clone(&t);
                std::thread::spawn(move || {
                    // Unaligned writes spanning two blocks, from every thread, everywhere.
                    for i in 0..2000u64 {
                        let off = (i * 7919 + w * 104_729) % (blocks * BLOCK - 6000);
                        t.write_at(&[0xf0 | w as u8; 6000], off, false).unwrap();
                    }
                })
            })
            .collect();
        // Stream backwards while the writers go forwards, to meet them in the middle.
        for b in (0..blocks).rev() {
            let got = t.read_snapshot_block(b * BLOCK).unwrap();
            assert!(
                got.iter().all(|&x| x == b as u8),
                "block {b} leaked a write"
            );
        }
        for w in writers {
            w.join().unwrap();
        }
        t.finish_epoch(true).unwrap();
    }

    #[test]
    fn corrupt_or_foreign_bitmaps_are_refused() {
        let (dir, t) = setup(REGION);
        drop(t);
        let inner = FileExport::create(&dir.path().join("other"), 2 * REGION).unwrap();
        assert!(matches!(
            TrackedExport::open(inner, &dir.path().join("cbt")),
            Err(NbdError::BitmapSizeMismatch { .. })
        ));
        let f = OpenOptions::new()
            .write(true)
            .open(dir.path().join("cbt"))
            .unwrap();
        f.write_all_at(&[0xff], 20).unwrap();
        let inner = FileExport::open(&dir.path().join("img")).unwrap();
        let e = TrackedExport::open(inner, &dir.path().join("cbt"))
            .err()
            .unwrap();
        assert_eq!(e.kind(), crate::api::ErrorKind::Corrupt);
        // A truncated file is corrupt too; an all-zero header (never initialised) is new.
        f.write_all_at(&[0], 20).unwrap();
        f.set_len(4096).unwrap();
        let inner = FileExport::open(&dir.path().join("img")).unwrap();
        let e = TrackedExport::open(inner, &dir.path().join("cbt"))
            .err()
            .unwrap();
        assert_eq!(e.kind(), crate::api::ErrorKind::Corrupt);
        f.set_len(0).unwrap();
        f.set_len(8192).unwrap();
        let inner = FileExport::open(&dir.path().join("img")).unwrap();
        let t = TrackedExport::open(inner, &dir.path().join("cbt")).unwrap();
        assert_eq!(t.recovery(), Recovery::New);
    }
}

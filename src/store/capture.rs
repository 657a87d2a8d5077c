//! Capture: turns a point-in-time image (a regular file or a block device) into a snapshot.
//!
//! Change detection compares each block's BLAKE3 with the parent's block-hash list — never a
//! CRC32. Holes (SEEK_DATA/SEEK_HOLE) are not read; all-zero blocks become zero records when
//! the base (the parent's image, or all zeros for a full snapshot) was not zero there.
//! Pipeline: a reader thread issues large sequential preads, the calling thread hashes each
//! chunk's blocks on two threads and feeds changed blocks to the `SnapshotWriter`. When the
//! source is a regular file, data records of at least 64 KiB share its extents (FICLONERANGE)
//! where the store's filesystem allows it, instead of being written; they are read and hashed
//! all the same (see `capture`).

use super::format::HASH_LEN;
use super::hashes::{HashReader, HashWriter, STALE_HASH};
use super::writer::{hash_block, ZERO_HASH};
use super::{Manifest, Progress, SnapshotMeta, SnapshotWriter, Store, StoreError};
use crate::buf::AlignedBuf;
use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
use nix::unistd::{lseek, Whence};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::ops::Range;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex};

/// Bytes read per pread (rounded up to whole blocks). With `BUFFERS` of them in flight, 2 MiB
/// keeps a capture's buffers at 8 MiB (4 MiB put the daemon's peak RSS at 57-62 MiB in
/// bench/snapshot.sh, against a 64 MiB budget; 2 MiB: 42 MiB, no slower).
const CHUNK: u64 = 2 << 20;
/// Bytes of scattered blocks (an incremental's dirty set) read and hashed as one batch.
const SCATTERED_CHUNK: u64 = 1 << 20;
/// Threads that read and hash batches; the capture's own thread records them.
const WORKERS: usize = 2;
/// Batch buffers in flight: being read and hashed, waiting, or being recorded.
const BUFFERS: usize = 4;

/// Captures `source` as a new committed snapshot described by `meta` (see module docs).
#[tracing::instrument(skip_all, fields(snapshot = %meta.id))]
pub fn capture(
    store: &Store,
    meta: SnapshotMeta,
    source: &File,
    progress: &dyn Progress,
) -> Result<Manifest, StoreError> {
    let mut writer = SnapshotWriter::begin(store, meta.clone())?;
    let new = writer.hash_writer()?;
    // After the new files: see `capture_extents`.
    let base = Base::open(store, &meta)?;
    let bs = u64::from(meta.block_size);
    let size = meta.volume_size;
    let src_len = source_len(source)?.min(size);
    // A regular file (the point-in-time clone of a loop volume's image) can share its extents
    // with the delta where the store's filesystem allows it (FICLONERANGE): long data runs are
    // then cloned instead of written. They are still read, for the block hashes and the record
    // CRC32s, which are computed from the bytes read; only the write is saved. A duplicate
    // descriptor, so the delta writer's thread can hold it; without one, bytes are written.
    let is_file = source.metadata().map(|m| m.is_file()).unwrap_or(false);
    if is_file {
        if let Ok(dup) = source.try_clone() {
            writer.set_clone_source(std::sync::Arc::new(dup), src_len)?;
        }
    }
    let ranges = data_ranges(source, src_len, bs, size);
    // One sequential pass: ask for the larger read-ahead window (a hint; failure is harmless).
    let _ = posix_fadvise(
        source.as_raw_fd(),
        0,
        0,
        PosixFadviseAdvice::POSIX_FADV_SEQUENTIAL,
    );
    stream_ranges(
        Streams { base, writer, new },
        &meta,
        source,
        &ranges,
        src_len,
        progress,
    )
}

/// What a capture writes to: the parent's hashes it compares with, the snapshot being
/// written and its new block-hash list.
struct Streams {
    base: Base,
    writer: SnapshotWriter,
    new: HashWriter,
}

/// Streams block-aligned `ranges` of `source` into the snapshot (everything outside them
/// reads as zeros): a reader thread issues large reads ahead of hashing and writing, each
/// block is read once. Then commits.
fn stream_ranges<S: ImageSource + ?Sized>(
    streams: Streams,
    meta: &SnapshotMeta,
    source: &S,
    ranges: &[Range<u64>],
    src_len: u64,
    progress: &dyn Progress,
) -> Result<Manifest, StoreError> {
    let Streams {
        mut base,
        mut writer,
        mut new,
    } = streams;
    let bs = u64::from(meta.block_size);
    let size = meta.volume_size;
    progress.set_total(size);
    let chunk = CHUNK.div_ceil(bs) * bs;
    let mut pos = 0u64;
    read_and_hash(
        source,
        Batches {
            ranges,
            chunk,
            bs,
            src_len,
            parts_of: None,
        },
        None,
        |batch| {
            if progress.cancelled() {
                return Err(StoreError::Cancelled {
                    id: meta.id.clone(),
                });
            }
            for (span, hashes) in batch.spans(bs) {
                let (off, end) = (span.off, span.off + span.buf.len() as u64);
                // Everything between the previous piece and this one is a hole: zeros.
                zero_span(&mut writer, &mut base, &mut new, pos, off, bs, size)?;
                record_scanned(&mut writer, &mut base, &mut new, span, hashes)?;
                progress.advance(end - pos);
                pos = end;
            }
            Ok(())
        },
    )?;
    zero_span(&mut writer, &mut base, &mut new, pos, size, bs, size)?;
    progress.advance(size - pos);
    // The parent's list is trusted only once its checksum is confirmed, before the commit.
    base.finish()?;
    writer.commit_streamed(new)
}

/// How far [`capture_extents`] may trust the byte ranges it is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirtySet {
    /// Exactly the bytes written since the parent (an NBD write-intent bitmap): of a block
    /// they cover only in part, only those bytes are read and stored, and the block's hash
    /// is recorded as not known.
    Exact,
    /// A superset of the bytes that may differ from the parent (extents the image no longer
    /// shares with the chain): every block they touch is read and hashed whole, and only a
    /// block whose hash changed is stored (just its bytes inside the ranges) with its real
    /// hash. Bytes that were stored before but did not change are not stored again.
    Superset,
}

/// Captures a snapshot when the caller knows which byte ranges changed since the parent
/// (a dirty bitmap kept in an NBD write path, or extents no longer shared with the chain).
/// Everything outside `dirty` is, by the caller's promise, byte for byte the parent's.
/// A block that `dirty` covers whole is read, hashed and recorded as a full scan would
/// (unchanged bytes are not stored; all zeros become a zero record). Of a block that `dirty`
/// covers only in part:
/// - [`DirtySet::Exact`]: only the dirty bytes are read and stored (records need not be
///   block-aligned): the rest of the block is the parent's, so the chain still assembles
///   the whole block. Its hash cannot be computed from the bytes read, so the new
///   block-hash list holds [`STALE_HASH`] for it ("not known"): a later full scan re-stores
///   the block, and restore and verify check it by the CRC32s of its records only.
/// - [`DirtySet::Superset`]: the whole block is read and hashed; if its hash differs from
///   the parent's, its bytes inside `dirty` are stored, and its real hash is recorded.
///
/// Blocks the parent did not hold whole (a grown volume) are read and stored whole. Without
/// a parent, the base is an all-zero volume and `dirty` must cover every non-zero byte.
#[tracing::instrument(skip_all, fields(snapshot = %meta.id))]
pub fn capture_extents<S: ImageSource + ?Sized>(
    store: &Store,
    meta: SnapshotMeta,
    source: &S,
    dirty: &[Range<u64>],
    trust: DirtySet,
    progress: &dyn Progress,
) -> Result<Manifest, StoreError> {
    let t0 = std::time::Instant::now();
    // The new files first: the parent's list then loads while the dirty blocks are read,
    // not while the new files' directory is made durable.
    let mut writer = SnapshotWriter::begin(store, meta.clone())?;
    let mut new = writer.hash_writer()?;
    let mut base = Base::open(store, &meta)?;
    let bs = u64::from(meta.block_size);
    let size = meta.volume_size;
    let src_len = source.image_len()?.min(size);
    // The byte-exact dirty set, clipped, sorted and merged.
    let fine = merge_ranges(
        dirty
            .iter()
            .filter(|r| r.start < r.end && r.start < size)
            .map(|r| r.start..r.end.min(size))
            .collect(),
    );
    let held = base.parent_size;
    if let Some(parent_size) = held.filter(|&p| p > size) {
        // The parent's hash of a block that became the short last one would be kept.
        return Err(StoreError::Invalid(format!(
            "snapshot {}: an incremental cannot shrink the volume ({parent_size} bytes in the \
             parent, {size} now)",
            meta.id
        )));
    }
    let reads = match trust {
        DirtySet::Exact => plan_reads(&fine, bs, size, held),
        // Every touched block whole: `plan_reads` of the set widened to whole blocks.
        DirtySet::Superset => {
            let widened: Vec<Range<u64>> = fine
                .iter()
                .map(|r| (r.start / bs * bs)..(r.end.div_ceil(bs) * bs).min(size))
                .collect();
            plan_reads(&merge_ranges(widened), bs, size, held)
        }
    };
    progress.set_total(reads.iter().map(|r| r.end - r.start).sum());
    let chunk = SCATTERED_CHUNK.div_ceil(bs) * bs;
    let opened = t0.elapsed();
    let read_ahead = ReadAhead::default();
    let mut copying = std::time::Duration::ZERO;
    let waited = read_and_hash(
        source,
        Batches {
            ranges: &reads,
            chunk,
            bs,
            src_len,
            parts_of: Some(size),
        },
        Some(&read_ahead),
        |batch| {
            if progress.cancelled() {
                return Err(StoreError::Cancelled {
                    id: meta.id.clone(),
                });
            }
            for (span, hashes) in batch.spans(bs) {
                let (off, len) = (span.off, span.buf.len() as u64);
                // Blocks outside the dirty set keep the parent's hash.
                let t = std::time::Instant::now();
                copy_hashes(&mut base, &mut new, off / bs)?;
                copying += t.elapsed();
                // `plan_reads` reads whole blocks as runs starting at a block boundary and
                // spanning whole blocks (or reaching the end); a part of a block never does.
                if !whole_blocks(off, len, bs, size) {
                    record_part(&mut writer, &mut new, span)?;
                } else if let (DirtySet::Superset, Some(held)) = (trust, held) {
                    let only = Only { fine: &fine, held };
                    record_hashed(&mut writer, &mut base, &mut new, span, hashes, only)?;
                } else {
                    record_scanned(&mut writer, &mut base, &mut new, span, hashes)?;
                }
                progress.advance(len);
            }
            Ok(())
        },
    )?;
    let t = std::time::Instant::now();
    copy_hashes(&mut base, &mut new, size.div_ceil(bs))?;
    base.finish()?;
    copying += t.elapsed();
    let streamed = t0.elapsed();
    let manifest = writer.commit_streamed(new)?;
    tracing::debug!(
        ranges = reads.len(),
        ?opened,
        ?waited,
        ?copying,
        ?streamed,
        total = ?t0.elapsed(),
        "captured the dirty blocks"
    );
    Ok(manifest)
}

/// What an incremental reads of the sorted, merged byte-exact dirty set `fine` of a volume
/// of `size` bytes in blocks of `bs`: sorted, disjoint ranges, each either a run of whole
/// blocks (block-aligned; the last may end at `size`) or the dirty part of one block. A
/// block is read whole when `fine` covers all of it, when there is no parent, or when the
/// parent (of `parent_size` bytes) did not hold it whole — including the parent's short last
/// block once the volume has outgrown it, dirty or not: its stored hash is stale (see
/// `hashes::STALE_HASH`) and it is re-hashed.
pub(super) fn plan_reads(
    fine: &[Range<u64>],
    bs: u64,
    size: u64,
    parent_size: Option<u64>,
) -> Vec<Range<u64>> {
    // Blocks ending past this were not held whole by the parent.
    let held = parent_size.unwrap_or(0);
    let mut touched: Vec<Range<u64>> = fine.to_vec();
    if held % bs != 0 && size > held {
        let start = held / bs * bs;
        touched.push(start..start + 1);
    }
    let touched = merge_ranges(touched);
    let mut reads: Vec<Range<u64>> = Vec::new();
    // Where the last run of whole blocks ends (reads after it are parts of blocks).
    let mut whole_end = None;
    for r in &touched {
        let mut b = r.start / bs;
        while b * bs < r.end {
            let (start, end) = (b * bs, ((b + 1) * bs).min(size));
            b += 1;
            if end > held || covers(fine, start, end) {
                match (reads.last_mut(), whole_end) {
                    // Already read whole (an earlier range touched this block).
                    (Some(_), Some(e)) if e >= end => {}
                    (Some(last), Some(e)) if e == start => {
                        last.end = end;
                        whole_end = Some(end);
                    }
                    _ => {
                        reads.push(start..end);
                        whole_end = Some(end);
                    }
                }
            } else {
                reads.push(r.start.max(start)..r.end.min(end));
                whole_end = None;
            }
        }
    }
    reads
}

/// What of a changed block [`record_hashed`] stores: of a block ending at or before `held`
/// (the parent held it whole), its bytes inside `fine` (sorted, merged); other blocks whole.
struct Only<'a> {
    fine: &'a [Range<u64>],
    held: u64,
}

/// Records the blocks of `span`, whose hashes are already computed, that differ from the
/// base, as [`record_scanned`] does, except that of a changed data block the parent held
/// whole only its bytes inside `only.fine` are stored (the rest is the parent's, by the
/// caller's promise); its hash is still that of the whole block. Appends `hashes` to `new`.
fn record_hashed(
    w: &mut SnapshotWriter,
    base: &mut Base,
    new: &mut HashWriter,
    span: Span<'_>,
    hashes: &[[u8; HASH_LEN]],
    only: Only<'_>,
) -> Result<(), StoreError> {
    let Span { off, buf, bs } = span;
    let first = off / bs;
    for (i, block) in buf.chunks(bs as usize).enumerate() {
        let idx = first + i as u64;
        let h = hashes[i];
        if h == base.get(idx)? {
            continue;
        }
        let start = idx * bs;
        let end = start + block.len() as u64;
        if h == ZERO_HASH {
            w.add_zero(start, block.len() as u64)?;
        } else if end > only.held {
            w.add_data(start, block)?;
        } else {
            // The writer coalesces adjacent pieces into one record.
            let from = only.fine.partition_point(|r| r.end <= start);
            for r in only.fine[from..].iter().take_while(|r| r.start < end) {
                let (s, e) = (r.start.max(start), r.end.min(end));
                w.add_data(s, &buf[(s - off) as usize..(e - off) as usize])?;
            }
        }
    }
    new.push(hashes)
}

/// Records the dirty part of a block read by itself (see [`plan_reads`]): a zero record if
/// it reads as zeros, else its bytes; the block's hash becomes [`STALE_HASH`], not known.
fn record_part(
    w: &mut SnapshotWriter,
    new: &mut HashWriter,
    span: Span<'_>,
) -> Result<(), StoreError> {
    let Span { off, buf, bs } = span;
    // Several parts of one block: the first pushed its hash.
    if new.written() == off / bs {
        new.push(&[STALE_HASH])?;
    }
    if super::writer::is_zero(buf) {
        w.add_zero(off, buf.len() as u64)
    } else {
        w.add_data(off, buf)
    }
}

/// Sorts ranges and merges overlapping or touching ones.
fn merge_ranges(mut ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    ranges.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    merged
}

/// Whether the sorted, merged `ranges` cover all of `[start, end)`.
fn covers(ranges: &[Range<u64>], start: u64, end: u64) -> bool {
    let i = ranges.partition_point(|r| r.end <= start);
    ranges
        .get(i)
        .is_some_and(|r| r.start <= start && r.end >= end)
}

/// A chunk of the image read at `off`, in blocks of `bs` bytes.
struct Span<'a> {
    off: u64,
    buf: &'a [u8],
    bs: u64,
}

/// Appends the base's hashes of the blocks from the writer's position up to `until`.
fn copy_hashes(base: &mut Base, new: &mut HashWriter, until: u64) -> Result<(), StoreError> {
    match &mut base.parent {
        Some(r) => r.copy_to(new, until),
        None => new.push_zeros(until.saturating_sub(new.written())),
    }
}

/// What the new image is compared against: the parent's hashes, or an all-zero volume.
struct Base {
    parent: Option<HashReader>,
    parent_size: Option<u64>,
}

impl Base {
    fn open(store: &Store, meta: &SnapshotMeta) -> Result<Base, StoreError> {
        let Some(parent) = &meta.parent else {
            return Ok(Base {
                parent: None,
                parent_size: None,
            });
        };
        let pm = store.manifest(parent)?;
        if pm.block_size != meta.block_size {
            return Err(StoreError::Invalid(format!(
                "parent {parent} has block size {}, not {}",
                pm.block_size, meta.block_size
            )));
        }
        Ok(Base {
            parent: Some(HashReader::open(store, &pm, meta.volume_size)?),
            parent_size: Some(pm.volume_size),
        })
    }

    fn get(&mut self, i: u64) -> Result<[u8; HASH_LEN], StoreError> {
        match &mut self.parent {
            Some(r) => r.get(i),
            None => Ok(ZERO_HASH),
        }
    }

    fn finish(self) -> Result<(), StoreError> {
        match self.parent {
            Some(r) => r.finish(),
            None => Ok(()),
        }
    }
}

fn source_len(source: &File) -> Result<u64, StoreError> {
    let err = |e| StoreError::Image {
        what: "source image",
        start: 0,
        end: 0,
        source: e,
    };
    let md = source.metadata().map_err(err)?;
    if md.file_type().is_block_device() {
        let mut f = source;
        f.seek(SeekFrom::End(0)).map_err(err)
    } else {
        Ok(md.len())
    }
}

/// Block-aligned ranges that may hold data, from SEEK_DATA/SEEK_HOLE; the whole image when
/// the source cannot tell (block devices, filesystems without support).
fn data_ranges(source: &File, src_len: u64, bs: u64, size: u64) -> Vec<Range<u64>> {
    let fd = source.as_raw_fd();
    let whole = || {
        if src_len == 0 {
            vec![]
        } else {
            std::iter::once(0..(src_len.div_ceil(bs) * bs).min(size)).collect()
        }
    };
    let is_regular = source.metadata().map(|m| m.is_file()).unwrap_or(false);
    if !is_regular {
        return whole();
    }
    let mut out: Vec<Range<u64>> = Vec::new();
    let mut pos = 0u64;
    while pos < src_len {
        let data = match lseek(fd, pos as i64, Whence::SeekData) {
            Ok(d) => d as u64,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(_) => return whole(),
        };
        if data >= src_len {
            break;
        }
        let hole = match lseek(fd, data as i64, Whence::SeekHole) {
            Ok(h) => (h as u64).min(src_len),
            Err(_) => return whole(),
        };
        let start = data / bs * bs;
        let end = (hole.div_ceil(bs) * bs).min(size);
        match out.last_mut() {
            Some(last) if start <= last.end => last.end = last.end.max(end),
            _ => out.push(start..end),
        }
        pos = hole.max(data + 1);
    }
    out
}

/// Blocks in `[from, to)` read as zeros: record a zero extent where the base was not zero.
fn zero_span(
    w: &mut SnapshotWriter,
    base: &mut Base,
    new: &mut HashWriter,
    from: u64,
    to: u64,
    bs: u64,
    size: u64,
) -> Result<(), StoreError> {
    // `from` is a block boundary or the end of the volume.
    let mut b = from.div_ceil(bs);
    let mut batch = Vec::with_capacity(4096);
    while b * bs < to {
        if base.get(b)? != ZERO_HASH {
            let start = b * bs;
            w.add_zero(start, bs.min(size - start))?;
        }
        batch.push(ZERO_HASH);
        if batch.len() == 4096 {
            new.push(&batch)?;
            batch.clear();
        }
        b += 1;
    }
    new.push(&batch)
}

/// Records the blocks of `span`, whose hashes are already computed, that differ from the
/// base (runs of changed data blocks as one slice, all-zero blocks as zero records) and
/// appends `hashes` to `new`.
fn record_scanned(
    w: &mut SnapshotWriter,
    base: &mut Base,
    new: &mut HashWriter,
    span: Span<'_>,
    hashes: &[[u8; HASH_LEN]],
) -> Result<(), StoreError> {
    let Span { off, buf, bs } = span;
    let first = off / bs;
    // Runs of changed data blocks go to the writer as one slice (fewer copies).
    let mut run: Option<(u64, usize, usize)> = None;
    for (i, block) in buf.chunks(bs as usize).enumerate() {
        let idx = first + i as u64;
        let h = hashes[i];
        let was = base.get(idx)?;
        let is_data = h != was && h != ZERO_HASH;
        if !is_data {
            if let Some((start, from, to)) = run.take() {
                w.add_data(start, &buf[from..to])?;
            }
        }
        if h == was {
            continue;
        }
        let start = idx * bs;
        let at = i * bs as usize;
        if h == ZERO_HASH {
            w.add_zero(start, block.len() as u64)?;
        } else {
            match &mut run {
                Some((_, _, to)) => *to = at + block.len(),
                None => run = Some((start, at, at + block.len())),
            }
        }
    }
    if let Some((start, from, to)) = run {
        w.add_data(start, &buf[from..to])?;
    }
    new.push(hashes)
}

/// A point-in-time image that capture reads: a regular file or block device, or anything
/// else that can return the image's bytes at an offset (e.g. an NBD export's snapshot
/// epoch). Reads may come from another thread than the one that captures.
pub trait ImageSource: Sync {
    /// The image's length in bytes; bytes past it read as zeros.
    fn image_len(&self) -> Result<u64, StoreError>;
    /// Fills `buf` with the image's bytes at `off` (`off + buf.len()` is at most the
    /// length). Each byte range is read at most once per capture.
    fn read_image_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()>;
    /// A hint that `[off, off + len)` will be read soon. The default does nothing.
    fn prefetch(&self, _off: u64, _len: u64) {}
}

impl ImageSource for File {
    fn image_len(&self) -> Result<u64, StoreError> {
        source_len(self)
    }

    fn read_image_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        self.read_exact_at(buf, off)
    }

    fn prefetch(&self, off: u64, len: u64) {
        if let (Ok(off), Ok(len)) = (i64::try_from(off), i64::try_from(len)) {
            let _ = posix_fadvise(
                self.as_raw_fd(),
                off,
                len,
                PosixFadviseAdvice::POSIX_FADV_WILLNEED,
            );
        }
    }
}

/// Bytes of scattered ranges that `capture_extents` asks the source to read ahead.
const PREFETCH_WINDOW: u64 = 32 << 20;
/// Ranges longer than this are not read ahead by hand (sequential reads get the kernel's).
const PREFETCH_MAX_RANGE: u64 = 1 << 20;

/// Read-ahead hints for the scattered ranges of an incremental, given from a thread of
/// their own at most [`PREFETCH_WINDOW`] bytes ahead of the reader: scattered blocks then
/// reach the disk as many reads at once instead of one dependent random read per block.
#[derive(Default)]
struct ReadAhead {
    /// Index of the range the reader is at.
    at: std::sync::atomic::AtomicUsize,
    stop: std::sync::atomic::AtomicBool,
}

/// Stops a [`ReadAhead`] when dropped (on every way out of the reader).
struct StopReadAhead<'a>(&'a ReadAhead);

impl Drop for StopReadAhead<'_> {
    fn drop(&mut self) {
        self.0
            .stop
            .store(true, std::sync::atomic::Ordering::Release);
    }
}

impl ReadAhead {
    fn stop_on_drop(&self) -> StopReadAhead<'_> {
        StopReadAhead(self)
    }

    /// A reader is at range `i` (readers may report out of order: the furthest counts).
    fn reached(&self, i: usize) {
        self.at.fetch_max(i, std::sync::atomic::Ordering::AcqRel);
    }

    fn run<S: ImageSource + ?Sized>(&self, source: &S, ranges: &[Range<u64>]) {
        use std::sync::atomic::Ordering;
        let len = |r: &Range<u64>| r.end - r.start;
        // Bytes hinted in `ranges[..next]`, and how far the reader's index was accounted.
        let (mut next, mut hinted, mut passed, mut passed_bytes) = (0usize, 0u64, 0usize, 0u64);
        while next < ranges.len() && !self.stop.load(Ordering::Acquire) {
            let at = self.at.load(Ordering::Acquire);
            if at > next {
                // The reader overtook the hints: everything hinted was read; skip ahead.
                (next, passed, passed_bytes) = (at, at, hinted);
                continue;
            }
            while passed < at {
                if len(&ranges[passed]) <= PREFETCH_MAX_RANGE {
                    passed_bytes += len(&ranges[passed]);
                }
                passed += 1;
            }
            if hinted - passed_bytes >= PREFETCH_WINDOW {
                std::thread::sleep(std::time::Duration::from_micros(200));
                continue;
            }
            let r = &ranges[next];
            if len(r) <= PREFETCH_MAX_RANGE {
                source.prefetch(r.start, len(r));
                hinted += len(r);
            }
            next += 1;
        }
    }
}

/// What [`read_and_hash`] reads: sorted, disjoint `ranges`, each block-aligned (the last may
/// end at the volume's end) or within one block, in batches of about `chunk` bytes (a
/// multiple of `bs`); bytes past `src_len` read as zeros.
struct Batches<'a> {
    ranges: &'a [Range<u64>],
    chunk: u64,
    bs: u64,
    src_len: u64,
    /// `Some(volume size)`: `ranges` may hold parts of blocks ([`plan_reads`]), which are
    /// not hashed; a range is a part unless [`whole_blocks`] says otherwise.
    parts_of: Option<u64>,
}

/// Whether the range `[off, off + len)` of a volume of `size` bytes is a run of whole blocks
/// of `bs` bytes (the last may be short, at the end) rather than a part of one block.
fn whole_blocks(off: u64, len: u64, bs: u64, size: u64) -> bool {
    off % bs == 0 && (len % bs == 0 || off + len == size)
}

/// Cuts [`Batches`] into batches, in order; shared by the workers.
struct Cutter<'a> {
    ranges: &'a [Range<u64>],
    chunk: u64,
    bs: u64,
    /// The range and the offset in it where the next batch starts.
    ri: usize,
    pos: u64,
    next: usize,
}

impl Cutter<'_> {
    /// Fills `pieces` with the next batch's (offset, length) pieces, at most `chunk` bytes
    /// of consecutive ranges; returns the batch's index and the index of its first range.
    fn next_batch(&mut self, pieces: &mut Vec<(u64, u64)>) -> Option<(usize, usize)> {
        pieces.clear();
        while self
            .ranges
            .get(self.ri)
            .is_some_and(|r| self.pos.max(r.start) >= r.end)
        {
            self.ri += 1;
        }
        let first_range = self.ri;
        let mut total = 0u64;
        while let Some(r) = self.ranges.get(self.ri) {
            if total >= self.chunk {
                break;
            }
            self.pos = self.pos.max(r.start);
            // A run of whole blocks is cut at a block boundary (the batch's parts of blocks
            // may have left a room that is not whole blocks); a part of a block is never
            // cut, so a batch may exceed `chunk` by less than a block.
            let room = ((self.chunk - total) / self.bs * self.bs).max(self.bs);
            let len = room.min(r.end - self.pos);
            pieces.push((self.pos, len));
            total += len;
            self.pos += len;
            if self.pos >= r.end {
                self.ri += 1;
            }
        }
        if pieces.is_empty() {
            return None;
        }
        self.next += 1;
        Some((self.next - 1, first_range))
    }
}

/// A batch of the image, read and hashed by a worker: the (offset, length) `pieces`, their
/// bytes one after the other in `buf`, and the hash of each of their blocks (a piece's last
/// block may be short) in `hashes`.
#[derive(Default)]
struct Batch {
    index: usize,
    pieces: Vec<(u64, u64)>,
    buf: AlignedBuf,
    hashes: Vec<[u8; HASH_LEN]>,
}

impl Batch {
    /// Each piece's bytes, with the hashes of its blocks (of `bs` bytes; a short last one).
    fn spans(&self, bs: u64) -> impl Iterator<Item = (Span<'_>, &[[u8; HASH_LEN]])> {
        let per_block = bs as usize;
        self.pieces
            .iter()
            .scan((0usize, 0usize), move |(at, hashed), &(off, len)| {
                let buf = &self.buf[*at..*at + len as usize];
                let n = buf.len().div_ceil(per_block);
                let hashes = &self.hashes[*hashed..*hashed + n];
                *at += buf.len();
                *hashed += n;
                Some((Span { off, buf, bs }, hashes))
            })
    }

    /// Reads the pieces and hashes their blocks (not parts of blocks: see [`Batches`]).
    fn fill<S: ImageSource + ?Sized>(
        &mut self,
        source: &S,
        bs: u64,
        src_len: u64,
        parts_of: Option<u64>,
    ) -> Result<(), StoreError> {
        let total: u64 = self.pieces.iter().map(|&(_, len)| len).sum();
        self.buf.resize_for_overwrite(total as usize);
        let mut at = 0usize;
        for &(off, len) in &self.pieces {
            read_source(source, off, &mut self.buf[at..at + len as usize], src_len)?;
            at += len as usize;
        }
        let mut hashes = std::mem::take(&mut self.hashes);
        hashes.clear();
        let mut at = 0usize;
        for &(off, len) in &self.pieces {
            let piece = &self.buf[at..at + len as usize];
            match parts_of {
                // A part of a block: one slot of no meaning (the recorder ignores it).
                Some(size) if !whole_blocks(off, len, bs, size) => hashes.push(ZERO_HASH),
                _ => hashes.extend(piece.chunks(bs as usize).map(hash_block)),
            }
            at += piece.len();
        }
        self.hashes = hashes;
        Ok(())
    }
}

/// Sets a flag when dropped: tells the workers to stop on every way out of the recorder.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Reads the batches of `what` and hashes their blocks on [`WORKERS`] threads of their own
/// (each block read once, at most [`BUFFERS`] batches in memory) and hands them to `record`
/// on this thread, in image order. With `read_ahead`, a further thread hints the ranges
/// to the source ahead of the workers. Returns how long this thread waited for batches.
fn read_and_hash<S, F>(
    source: &S,
    what: Batches<'_>,
    read_ahead: Option<&ReadAhead>,
    mut record: F,
) -> Result<std::time::Duration, StoreError>
where
    S: ImageSource + ?Sized,
    F: FnMut(&Batch) -> Result<(), StoreError>,
{
    let Batches {
        ranges,
        chunk,
        bs,
        src_len,
        parts_of,
    } = what;
    let cutter = Mutex::new(Cutter {
        ranges,
        chunk,
        bs,
        ri: 0,
        pos: 0,
        next: 0,
    });
    let stop = AtomicBool::new(false);
    // Free buffers; a worker takes one before it claims a batch, so that the batch the
    // recorder waits for always has a buffer.
    let (free_tx, free_rx) = mpsc::channel::<Batch>();
    let free_rx = Mutex::new(free_rx);
    let mut waited = std::time::Duration::ZERO;
    std::thread::scope(|s| -> Result<(), StoreError> {
        // Declared in here: dropped (and the workers released) before the scope joins them.
        let _stop = StopOnDrop(&stop);
        let free_tx = free_tx;
        let _stop_hints = read_ahead.map(ReadAhead::stop_on_drop);
        if let Some(ra) = read_ahead {
            // The read-ahead hints block while the disk's queue is full: a thread of their
            // own keeps the queue full while the workers read and hash.
            s.spawn(move || ra.run(source, ranges));
        }
        for _ in 0..BUFFERS {
            let _ = free_tx.send(Batch::default());
        }
        let (done_tx, done_rx) = mpsc::channel::<Result<Batch, StoreError>>();
        for _ in 0..WORKERS {
            let done_tx = done_tx.clone();
            let (cutter, free_rx, stop) = (&cutter, &free_rx, &stop);
            s.spawn(move || loop {
                if stop.load(Ordering::Acquire) {
                    return;
                }
                let next = free_rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                let Ok(mut batch) = next else { return };
                let claimed = cutter
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .next_batch(&mut batch.pieces);
                let Some((index, first_range)) = claimed else {
                    return;
                };
                batch.index = index;
                if let Some(ra) = read_ahead {
                    ra.reached(first_range);
                }
                let res = batch.fill(source, bs, src_len, parts_of).map(|()| batch);
                let failed = res.is_err();
                if done_tx.send(res).is_err() || failed {
                    return;
                }
            });
        }
        drop(done_tx);
        let mut early: BTreeMap<usize, Batch> = BTreeMap::new();
        let mut next = 0usize;
        loop {
            let batch = match early.remove(&next) {
                Some(b) => b,
                None => {
                    let t = std::time::Instant::now();
                    let got = done_rx.recv();
                    waited += t.elapsed();
                    match got {
                        Ok(Ok(b)) if b.index == next => b,
                        Ok(Ok(b)) => {
                            early.insert(b.index, b);
                            continue;
                        }
                        Ok(Err(e)) => return Err(e),
                        // Every worker is done: every batch was recorded.
                        Err(_) => break,
                    }
                }
            };
            record(&batch)?;
            next += 1;
            let _ = free_tx.send(batch);
        }
        // Workers end early only when told to: anything else is a bug, never a short capture.
        let c = cutter.lock().unwrap_or_else(|e| e.into_inner());
        if next != c.next || c.ri < ranges.len() {
            return Err(StoreError::Invalid(format!(
                "capture workers stopped after {next} of {} batches",
                c.next
            )));
        }
        Ok(())
    })?;
    Ok(waited)
}

/// [`read_image`] for any [`ImageSource`]: bytes past `src_len` read as zeros.
fn read_source<S: ImageSource + ?Sized>(
    source: &S,
    off: u64,
    buf: &mut [u8],
    src_len: u64,
) -> Result<(), StoreError> {
    let avail = src_len.saturating_sub(off).min(buf.len() as u64) as usize;
    let (head, tail) = buf.split_at_mut(avail);
    tail.fill(0);
    if head.is_empty() {
        return Ok(());
    }
    source
        .read_image_at(head, off)
        .map_err(|e| StoreError::Image {
            what: "source image",
            start: off,
            end: off + avail as u64,
            source: e,
        })
}

/// Captures a whole image like [`capture`], when the caller knows where it may hold data:
/// only `data` (byte ranges, widened here to whole blocks) is read; every block outside it
/// is taken to read as zeros (a zero record where the base was not zero). For a source
/// that cannot seek holes itself, such as an NBD snapshot epoch
/// (`TrackedExport::epoch_data_ranges`). Each block is read once, by a reader thread ahead
/// of hashing and writing.
#[tracing::instrument(skip_all, fields(snapshot = %meta.id))]
pub fn capture_ranges<S: ImageSource + ?Sized>(
    store: &Store,
    meta: SnapshotMeta,
    source: &S,
    data: &[Range<u64>],
    progress: &dyn Progress,
) -> Result<Manifest, StoreError> {
    let writer = SnapshotWriter::begin(store, meta.clone())?;
    let new = writer.hash_writer()?;
    // After the new files: see `capture_extents`.
    let base = Base::open(store, &meta)?;
    let bs = u64::from(meta.block_size);
    let size = meta.volume_size;
    let src_len = source.image_len()?.min(size);
    let ranges = merge_ranges(
        data.iter()
            .filter(|r| r.start < r.end && r.start < src_len)
            .map(|r| (r.start / bs * bs)..(r.end.min(src_len).div_ceil(bs) * bs).min(size))
            .collect(),
    );
    stream_ranges(
        Streams { base, writer, new },
        &meta,
        source,
        &ranges,
        src_len,
        progress,
    )
}

//! Restore and verify: reading snapshots back.
//!
//! Restore resolves a chain once into an extent map (newest record wins; memory is one entry
//! per visible piece), then walks it in image order reading each record once, checking its
//! CRC32, and writing through a bounded buffer. A failed check is an error naming the snapshot
//! and byte range; wrong data is never written silently. Checked runs of whole 4 KiB pieces of
//! data records are cloned from the delta (FICLONERANGE) instead of written when the target is
//! a regular file on the store's filesystem (`Out::write_record`). Verify re-reads every byte
//! of a chain and reports every problem it finds instead of stopping at the first.

use super::format::{self, IndexEntry, RecordKind, RECORD_HEADER_LEN};
use super::hashes::STALE_HASH;
use super::{file_key, BlobStream, Manifest, Progress, Store, StoreError};
use crate::api::SnapshotId;
use crate::buf::AlignedBuf;
use crate::failpoint;
use crate::sys::writeback::Streamer;
use nix::fcntl::{fallocate, FallocateFlags};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// How the restore target is prepared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreMode {
    /// The target is new and sparse: zero ranges are skipped and stay holes.
    Fresh,
    /// The target holds old data: every byte not in the image is zeroed (holes punched in
    /// regular files, zeros written on block devices).
    Overwrite,
}

/// One problem found by `verify`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyProblem {
    pub snapshot: SnapshotId,
    /// The file of the snapshot that failed (`manifest`, `delta.N`, `hashes`).
    pub file: String,
    /// The byte range of the volume image affected (the whole image for structural damage).
    pub start: u64,
    pub end: u64,
    pub reason: String,
}

impl std::fmt::Display for VerifyProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} bytes {}..{}: {}",
            self.snapshot, self.file, self.start, self.end, self.reason
        )
    }
}

/// The result of verifying a chain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// The snapshots checked, root first.
    pub checked: Vec<SnapshotId>,
    pub problems: Vec<VerifyProblem>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Where a piece of the image comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Src {
    Zero,
    /// Record `rec` of chain layer `layer`; the piece starts `offset - record.offset` into it.
    Data {
        layer: usize,
        rec: usize,
    },
}

/// A visible piece of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Piece {
    pub offset: u64,
    pub len: u64,
    pub src: Src,
}

/// Merged covered intervals: start → end.
#[derive(Default)]
pub(crate) struct Coverage(BTreeMap<u64, u64>);

impl Coverage {
    /// Calls `f` for each part of `[s, e)` not yet covered, in order.
    pub fn uncovered(&self, s: u64, e: u64, mut f: impl FnMut(u64, u64)) {
        let mut cur = s;
        if let Some((_, &pe)) = self.0.range(..=s).next_back() {
            cur = cur.max(pe);
        }
        for (&cs, &ce) in self.0.range(s..e) {
            if cur >= e {
                break;
            }
            if cs > cur {
                f(cur, cs.min(e));
            }
            cur = cur.max(ce);
        }
        if cur < e {
            f(cur, e);
        }
    }

    pub fn insert(&mut self, s: u64, e: u64) {
        let (mut ns, mut ne) = (s, e);
        if let Some((&ps, &pe)) = self.0.range(..=s).next_back() {
            if pe >= s {
                ns = ps;
                ne = ne.max(pe);
            }
        }
        let inside: Vec<u64> = self.0.range(ns..=ne).map(|(k, _)| *k).collect();
        for k in inside {
            if let Some(v) = self.0.remove(&k) {
                ne = ne.max(v);
            }
        }
        self.0.insert(ns, ne);
    }
}

/// Resolves layers (root first) into visible pieces sorted by offset, clipped to `size`.
pub(crate) fn extent_map(layers: &[Vec<IndexEntry>], size: u64) -> Vec<Piece> {
    let mut covered = Coverage::default();
    let mut pieces = Vec::new();
    for (layer, index) in layers.iter().enumerate().rev() {
        for (rec, e) in index.iter().enumerate() {
            let end = e.end().min(size);
            if e.offset >= end {
                continue;
            }
            let src = match e.kind {
                RecordKind::Data => Src::Data { layer, rec },
                RecordKind::Zero => Src::Zero,
            };
            covered.uncovered(e.offset, end, |s, t| {
                pieces.push(Piece {
                    offset: s,
                    len: t - s,
                    src,
                })
            });
        }
        for e in index {
            covered.insert(e.offset, e.end());
        }
    }
    pieces.sort_by_key(|p| p.offset);
    pieces
}

/// Records read with one pread: `first..end` of a layer's index, in file order in its delta
/// file, read from `pos` (the end of the record before `first`, so that the alignment gaps
/// before each of them are read too).
struct Span {
    layer: usize,
    first: usize,
    end: usize,
    pos: u64,
    buf: Arc<AlignedBuf>,
    /// The hashes of the image blocks that lie wholly inside one data record of the span
    /// (hashed by the read worker), record after record; record `first + i`'s hashes start
    /// at `hashes[hashed[i]]`.
    hashes: Vec<[u8; super::format::HASH_LEN]>,
    hashed: Vec<usize>,
}

/// The restored image's blocks: `bs` bytes each, the last one short when `size` is not a
/// multiple of it (the leaf snapshot's geometry, which `BlockCheck` checks).
#[derive(Debug, Clone, Copy)]
struct Blocks {
    bs: u64,
    size: u64,
}

impl Blocks {
    /// The whole blocks inside the image range `[start, end)`: the first one's offset and
    /// how many.
    fn inside(self, start: u64, end: u64) -> (u64, usize) {
        let first = start.next_multiple_of(self.bs);
        let end = end.min(self.size);
        if first >= end {
            return (first, 0);
        }
        // Up to the image's end the short last block counts too.
        let n = if end == self.size {
            (end - first).div_ceil(self.bs)
        } else {
            (end - first) / self.bs
        };
        (first, n as usize)
    }
}

impl Span {
    /// The hashes the read worker computed for record `rec` (`e`) of this span.
    fn known(&self, rec: usize, e: &IndexEntry, blocks: Blocks) -> Known<'_> {
        let i = rec - self.first;
        let from = self.hashed.get(i).copied().unwrap_or(self.hashes.len());
        let to = self.hashed.get(i + 1).copied().unwrap_or(self.hashes.len());
        Known {
            first: blocks.inside(e.offset, e.end()).0,
            hashes: self.hashes.get(from..to).unwrap_or_default(),
        }
    }
}

/// Hashes the whole blocks of every data record of a span whose records were checked (see
/// [`Span::hashes`]).
fn hash_span(index: &[IndexEntry], span: &mut Span, blocks: Blocks) -> Result<(), StoreError> {
    span.hashes.clear();
    span.hashed.clear();
    for e in &index[span.first..span.end] {
        span.hashed.push(span.hashes.len());
        if e.kind != RecordKind::Data {
            continue;
        }
        let (first, n) = blocks.inside(e.offset, e.end());
        let payload = e.file_pos - span.pos + RECORD_HEADER_LEN;
        for k in 0..n as u64 {
            let at = first + k * blocks.bs;
            let from = (payload + at - e.offset) as usize;
            let len = blocks.bs.min(blocks.size - at) as usize;
            let block = span.buf.get(from..from + len).ok_or_else(|| {
                StoreError::Invalid(format!("restore: block at {at} lies outside its span"))
            })?;
            span.hashes.push(super::writer::hash_block(block));
        }
    }
    Ok(())
}

/// What the reader stage hands the checker, in image order. A span may still be being read
/// by a read worker: its bytes, every record checked, arrive on the receiver. Pieces go in
/// runs (indexes into the restore's pieces), so that a chain's many small pieces cost few
/// hand-offs between threads.
enum Step {
    Span(mpsc::Receiver<Result<Span, StoreError>>),
    Pieces(std::ops::Range<usize>),
}

/// Pieces handed on at once, at most: between the stages, a message per piece made a chain
/// with thousands of small pieces wait on thread wake-ups (each a futex round trip).
const PIECE_RUN: usize = 256;

/// A span to read: `len` bytes of layer `layer`'s delta from `start`, holding records
/// `first..end` of its index.
struct SpanPlan {
    layer: usize,
    first: usize,
    end: usize,
    start: u64,
    len: usize,
}

/// A span read handed to a read worker, with the buffer to read into; the result goes to
/// `done`.
struct ReadJob {
    plan: SpanPlan,
    buf: AlignedBuf,
    done: mpsc::SyncSender<Result<Span, StoreError>>,
}

/// Threads that read spans, so that reads overlap each other (a deeper disk queue, and the
/// kernel's copies out of the page cache on both cores) as well as the checking.
const READ_WORKERS: usize = 2;
/// Bytes of spans read (or being read) ahead of the checker, at least two spans.
const READ_AHEAD: u64 = 8 << 20;

/// The spans a restore reads, in the order the checker needs them, and for each the index
/// of the first piece that reads from it. A span runs over consecutive records of one layer
/// that pieces need, up to the span budget (shared by the layers: each keeps its current
/// span alive in the checker).
fn plan_spans(layers: &[Vec<IndexEntry>], pieces: &[Piece]) -> (Vec<SpanPlan>, Vec<usize>) {
    // Which records some piece reads: only those are fetched.
    let mut needed: Vec<Vec<bool>> = layers.iter().map(|l| vec![false; l.len()]).collect();
    for p in pieces {
        if let Src::Data { layer, rec } = p.src {
            needed[layer][rec] = true;
        }
    }
    let limit = (SPAN_BYTES / layers.len().max(1) as u64).max(MIN_SPAN);
    let mut have: Vec<Option<(usize, usize)>> = vec![None; layers.len()];
    let (mut plans, mut starts) = (Vec::new(), Vec::new());
    for (i, p) in pieces.iter().enumerate() {
        let Src::Data { layer, rec } = p.src else {
            continue;
        };
        if have[layer].is_some_and(|(a, b)| (a..b).contains(&rec)) {
            continue;
        }
        let index = &layers[layer];
        // Records lie in file order, with alignment gaps between some (delta version 2): a
        // span runs from the first header to the last payload's end. The read starts where
        // the previous record ends, so that the alignment gap before the first record is
        // read and checked too.
        let rec_end = |e: &IndexEntry| e.file_pos + RECORD_HEADER_LEN + e.payload_len();
        let start = match rec.checked_sub(1) {
            Some(prev) => rec_end(&index[prev]),
            None => format::DELTA_HEADER_LEN,
        };
        let mut len = rec_end(&index[rec]) - start;
        let mut end = rec + 1;
        while let Some(e) = index.get(end) {
            let grown = rec_end(e) - start;
            if !needed[layer][end] || grown > limit {
                break;
            }
            len = grown;
            end += 1;
        }
        have[layer] = Some((rec, end));
        plans.push(SpanPlan {
            layer,
            first: rec,
            end,
            start,
            len: len as usize,
        });
        starts.push(i);
    }
    (plans, starts)
}

/// Reads a planned span into `buf` (which holds `plan.len` bytes).
fn read_span(
    chain: &[Manifest],
    layers: &[Vec<IndexEntry>],
    streams: &[Option<Box<dyn BlobStream + '_>>],
    plan: &SpanPlan,
    buf: &mut [u8],
) -> Result<(), StoreError> {
    let m = &chain[plan.layer];
    let index = &layers[plan.layer];
    stream(streams, plan.layer)?
        .read_at(plan.start, buf)
        .map_err(|err| match err.kind() {
            std::io::ErrorKind::UnexpectedEof => StoreError::corrupt(
                &m.id,
                &m.delta_file,
                (index[plan.first].offset, index[plan.end - 1].end()),
                "record is truncated",
            ),
            _ => StoreError::backend(&file_key(&m.id, &m.delta_file), err),
        })
}

/// A checked piece for the writer: for a data piece, the span buffer and where its bytes start.
struct Fetched {
    piece: Piece,
    data: Option<(Arc<AlignedBuf>, usize)>,
}

/// Bytes of records read ahead at once (shared by the layers of a chain), and the least.
const SPAN_BYTES: u64 = 4 << 20;
const MIN_SPAN: u64 = 256 << 10;
/// Span buffers the reader keeps for reuse once the checker and writer are done with them.
const SPAN_POOL: usize = 8;

/// The reader's span buffers: a buffer is reused once no stage holds it any more, so a
/// restore does not allocate (and the allocator zero) a fresh span for every read.
#[derive(Default)]
struct SpanPool {
    sent: Vec<Arc<AlignedBuf>>,
}

impl SpanPool {
    /// A buffer of `len` bytes (contents unspecified: the caller overwrites all of it).
    fn take(&mut self, len: usize) -> AlignedBuf {
        let free = self.sent.iter().position(|b| Arc::strong_count(b) == 1);
        let mut buf = match free.map(|i| Arc::try_unwrap(self.sent.swap_remove(i))) {
            Some(Ok(buf)) => buf,
            // None free. (Unwrapping a free one cannot fail: the other stages only drop
            // their references, they never clone them.)
            Some(Err(_)) | None => AlignedBuf::default(),
        };
        buf.resize_for_overwrite(len);
        buf
    }

    /// Remembers a buffer that was sent on, to be reused when the other stages drop it.
    fn sent(&mut self, buf: &Arc<AlignedBuf>) {
        if self.sent.len() < SPAN_POOL {
            self.sent.push(Arc::clone(buf));
        }
    }
}
/// Writeback of the target starts every `WRITEBACK_STEP` bytes and is waited for
/// `WRITEBACK_LAG` behind, so the final fsync is short.
const WRITEBACK_STEP: u64 = 8 << 20;
const WRITEBACK_LAG: u64 = 64 << 20;

/// Checks every record of a span: header against the index, CRC32 over id, range and payload.
fn check_span(m: &Manifest, index: &[IndexEntry], span: &Span) -> Result<(), StoreError> {
    let id = format::id_bytes(&m.id);
    let mut prev_end = 0usize;
    for e in &index[span.first..span.end] {
        let corrupt = |r: String| StoreError::corrupt(&m.id, &m.delta_file, (e.offset, e.end()), r);
        let at = (e.file_pos - span.pos) as usize;
        // The alignment gap between this record and the previous one of the span.
        let gap = span
            .buf
            .get(prev_end.min(at)..at)
            .ok_or_else(|| corrupt("record lies outside its span".into()))?;
        if !super::writer::is_zero(gap) {
            return Err(corrupt(
                "alignment gap before the record is not zero".into(),
            ));
        }
        let end = at + (RECORD_HEADER_LEN + e.payload_len()) as usize;
        let rec = span
            .buf
            .get(at..end)
            .ok_or_else(|| corrupt("record lies outside its span".into()))?;
        format::check_record_header(&rec[..32], e).map_err(|format::FormatError(r)| corrupt(r))?;
        if format::record_crc(&id, e.offset, e.length, e.kind, &rec[32..]) != e.crc {
            return Err(corrupt("record CRC32 mismatch".into()));
        }
        prev_end = end;
    }
    Ok(())
}

/// Where the checker stage of a restore waited (logged at debug level): for the next step
/// from the reader, for a span's bytes, and for room to hand checked pieces to the writer.
#[derive(Debug, Default)]
struct CheckerWaits {
    steps: Duration,
    spans: Duration,
    writer: Duration,
}

/// The checker stage of `assemble`: takes the checked spans in order, checks the assembled
/// blocks, forwards checked pieces.
fn check_steps(
    layers: &[Vec<IndexEntry>],
    pieces: &[Piece],
    blocks: Blocks,
    check: &mut BlockCheck,
    rx: mpsc::Receiver<Result<Step, StoreError>>,
    tx: &mpsc::SyncSender<Result<Vec<Fetched>, StoreError>>,
) -> Result<CheckerWaits, StoreError> {
    let mut waits = CheckerWaits::default();
    let mut spans: Vec<Option<Span>> = layers.iter().map(|_| None).collect();
    loop {
        let t = Instant::now();
        let Ok(step) = rx.recv() else { break };
        waits.steps += t.elapsed();
        match step? {
            Step::Span(read) => {
                let t = Instant::now();
                let span = read.recv().map_err(|_| {
                    StoreError::Invalid("restore: a span read was abandoned".into())
                })??;
                waits.spans += t.elapsed();
                let layer = span.layer;
                spans[layer] = Some(span);
            }
            Step::Pieces(run) => {
                let mut checked = Vec::with_capacity(run.len());
                let run = pieces.get(run).ok_or_else(|| {
                    StoreError::Invalid("restore: a run of pieces out of range".into())
                })?;
                for &p in run {
                    check.zero_until(p.offset)?;
                    let data = match p.src {
                        Src::Zero => {
                            check.zero(p.offset, p.len)?;
                            None
                        }
                        Src::Data { layer, rec } => {
                            let span = spans[layer]
                                .as_ref()
                                .filter(|sp| (sp.first..sp.end).contains(&rec))
                                .ok_or_else(|| {
                                    StoreError::Invalid(format!(
                                        "restore: record {rec} was not read"
                                    ))
                                })?;
                            let e = &layers[layer][rec];
                            let from = (e.file_pos - span.pos + RECORD_HEADER_LEN + p.offset
                                - e.offset) as usize;
                            let known = span.known(rec, e, blocks);
                            check.data(p.offset, &span.buf[from..from + p.len as usize], known)?;
                            Some((span.buf.clone(), from))
                        }
                    };
                    checked.push(Fetched { piece: p, data });
                }
                let t = Instant::now();
                if tx.send(Ok(checked)).is_err() {
                    return Ok(waits);
                }
                waits.writer += t.elapsed();
            }
        }
    }
    // The end of the image, and the hash list's own checksum.
    check.zero_until(blocks.size)?;
    check.finish()?;
    Ok(waits)
}

/// Coalesces contiguous writes into large pwrites; shares extents with the delta where it can.
struct Out<'a> {
    /// `None`: nothing is written (a check-only pass).
    target: Option<&'a File>,
    start: u64,
    buf: Vec<u8>,
    writeback: Streamer,
    /// Each layer's open delta, for `clone_to`; `share`: the target is a regular file and
    /// sharing has not been refused yet; `shared_once`: a clone has succeeded.
    streams: &'a [Option<Box<dyn BlobStream + 'a>>],
    share: bool,
    shared_once: bool,
    /// Clones not yet passed to the cloner thread (see `share_range`), and its channel.
    batch: Vec<PendingClone>,
    cloner: Option<mpsc::SyncSender<Vec<PendingClone>>>,
}

/// A clone `share_range` passed on: `len` bytes of layer `layer`'s delta at `src_off` to `off`.
struct PendingClone {
    layer: usize,
    src_off: u64,
    len: u64,
    off: u64,
}

/// What `Out::send_batch` fails with once the cloner thread has stopped on an error (which
/// `assemble` then reports instead).
const CLONER_STOPPED: &str = "restore: the cloner stopped";

/// Clones passed to the cloner thread at once, and batches waiting for it at most.
const CLONE_BATCH: usize = 64;
const CLONE_QUEUE: usize = 16;

const OUT_BUF: usize = 4 << 20;
const DIRECT_WRITE: usize = 512 << 10;
/// Least run of whole 4 KiB pieces of a record that restore clones instead of writing.
const SHARE_MIN: u64 = 64 << 10;

impl Out<'_> {
    /// Writes `data`, checked bytes of a data record lying at `file_off` of layer `layer`'s
    /// delta, at `off` of the target. Where the target is a regular file on the store's
    /// filesystem and offsets agree modulo 4 KiB (aligned records, delta version 2), the whole
    /// 4 KiB pieces are cloned from the delta (FICLONERANGE) instead of written: committed
    /// blobs are never modified, and the clone comes from the very open file the bytes were
    /// read and checked from, so the shared extents hold exactly those bytes. The final
    /// `sync_all` of the target makes the clones durable like writes (FICLONERANGE on xfs and
    /// btrfs is a logged metadata change of the target inode that its fsync forces out; the
    /// shared blocks themselves are already durable in the committed delta).
    fn write_record(
        &mut self,
        off: u64,
        data: &[u8],
        layer: usize,
        file_off: u64,
    ) -> Result<(), StoreError> {
        let align = format::ALIGN;
        let end = off + data.len() as u64;
        let (a, b) = (off.next_multiple_of(align), end / align * align);
        if !self.share || off % align != file_off % align || b <= a || b - a < SHARE_MIN {
            return self.write(off, data);
        }
        let head = (a - off) as usize;
        self.write(off, &data[..head])?;
        if self.share_range(layer, file_off + (a - off), b - a, a)? {
            self.write(b, &data[(b - off) as usize..])
        } else {
            self.write(a, &data[head..])
        }
    }

    /// Clones `len` bytes of layer `layer`'s delta at `src_off` to the target at `off`; false
    /// when the bytes must be written instead. The first clone is made at once, to learn
    /// whether this filesystem shares extents at all; after it succeeded, clones are passed
    /// in batches to the cloner thread ([`clone_batches`]), which makes them while the reads
    /// go on.
    fn share_range(
        &mut self,
        layer: usize,
        src_off: u64,
        len: u64,
        off: u64,
    ) -> Result<bool, StoreError> {
        let Some(t) = self.target else {
            return Ok(false);
        };
        if self.shared_once {
            self.batch.push(PendingClone {
                layer,
                src_off,
                len,
                off,
            });
            if self.batch.len() >= CLONE_BATCH {
                self.send_batch()?;
            }
            return Ok(true);
        }
        failpoint::check("restore.target.write").map_err(target_err(off, off + len))?;
        match stream(self.streams, layer)?.clone_to(src_off, len, t, off) {
            Ok(()) => {
                self.shared_once = true;
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
                tracing::debug!("restore cannot share extents here ({e}); writing instead");
                self.share = false;
                Ok(false)
            }
            Err(e) => Err(target_err(off, off + len)(e)),
        }
    }

    /// Passes the clones gathered to the cloner thread.
    fn send_batch(&mut self) -> Result<(), StoreError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(CLONE_BATCH));
        match &self.cloner {
            Some(tx) if tx.send(batch).is_ok() => Ok(()),
            // The cloner stopped on an error, which `assemble` reports.
            _ => Err(StoreError::Invalid(CLONER_STOPPED.into())),
        }
    }

    fn write(&mut self, off: u64, data: &[u8]) -> Result<(), StoreError> {
        if self.start + self.buf.len() as u64 != off || self.buf.len() + data.len() > OUT_BUF {
            self.flush()?;
            self.start = off;
        }
        // Whole records go straight to the target; only small pieces are gathered.
        if data.len() >= DIRECT_WRITE {
            self.flush()?;
            return self.pwrite(off, data);
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        if !self.buf.is_empty() {
            let buf = std::mem::take(&mut self.buf);
            let r = self.pwrite(self.start, &buf);
            self.buf = buf;
            r?;
            self.start += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }

    fn pwrite(&mut self, off: u64, data: &[u8]) -> Result<(), StoreError> {
        if let Some(t) = self.target {
            pwrite(t, off, data)?;
            self.writeback
                .wrote_at(t, off + data.len() as u64, data.len() as u64);
        }
        Ok(())
    }

    /// Zeroes `[off, off + len)` of the target (after what is gathered).
    fn zero(&mut self, block_dev: bool, off: u64, len: u64) -> Result<(), StoreError> {
        self.flush()?;
        if let Some(t) = self.target {
            let written = zero_range(t, block_dev, off, len)?;
            self.writeback.wrote_at(t, off + len, written);
        }
        Ok(())
    }
}

/// The cloner stage of `assemble`: makes the clones the writer passes on, in batches, while
/// the reads go on. On xfs a FICLONERANGE locks its source file, so clones from a delta and
/// the read workers' preads of it wait for each other (0.3–0.5 ms a clone during a restore
/// against ~0.02 ms alone). Each clone therefore comes from the layer's private copy of its
/// delta where there is one (`private_copies`), else from the delta itself. Sharing worked
/// for the writer's first clone, so a refusal now is an error like a failed write. Stops
/// early, with nothing more cloned, once `stop` is set (the restore failed). Returns the
/// time spent cloning.
fn clone_batches(
    streams: &[Option<Box<dyn BlobStream + '_>>],
    copies: &[Option<Box<dyn BlobStream>>],
    target: &File,
    batches: mpsc::Receiver<Vec<PendingClone>>,
    stop: &AtomicBool,
) -> Result<Duration, StoreError> {
    let mut busy = Duration::ZERO;
    for batch in batches {
        let t = Instant::now();
        for c in batch {
            if stop.load(Ordering::Acquire) {
                return Ok(busy);
            }
            let source: &dyn BlobStream = match copies.get(c.layer).and_then(Option::as_deref) {
                Some(copy) => copy,
                None => stream(streams, c.layer)?,
            };
            failpoint::check("restore.target.write")
                .and_then(|()| source.clone_to(c.src_off, c.len, target, c.off))
                .map_err(target_err(c.off, c.off + c.len))?;
        }
        busy += t.elapsed();
    }
    Ok(busy)
}

/// A private copy of each delta a clone may come from: the layers with a data piece of at
/// least [`SHARE_MIN`] bytes ([`BlobStream::private_copy`]: a reflink of the whole
/// committed, never modified blob, so its bytes are the ones the reads check). `None` for
/// the other layers; none at all where no copy can be made (no reflink here, or an error,
/// logged): clones then come from the delta itself.
fn private_copies(
    streams: &[Option<Box<dyn BlobStream + '_>>],
    layers: &[Vec<IndexEntry>],
    pieces: &[Piece],
) -> Vec<Option<Box<dyn BlobStream>>> {
    let mut wanted = vec![false; layers.len()];
    for p in pieces {
        if let (Src::Data { layer, .. }, true) = (p.src, p.len >= SHARE_MIN) {
            if let Some(w) = wanted.get_mut(layer) {
                *w = true;
            }
        }
    }
    let mut copies: Vec<Option<Box<dyn BlobStream>>> = Vec::with_capacity(layers.len());
    for (layer, wanted) in wanted.into_iter().enumerate() {
        let copy = match streams.get(layer).and_then(Option::as_deref) {
            Some(delta) if wanted => delta.private_copy().unwrap_or_else(|e| {
                tracing::debug!(layer, "restore clones from the delta itself ({e})");
                None
            }),
            _ => None,
        };
        if wanted && copy.is_none() {
            // No reflink here (or a failure): the other layers' copies would fail alike.
            return Vec::new();
        }
        copies.push(copy);
    }
    copies
}

/// Layer `layer`'s open delta (open for every layer a piece reads from).
fn stream<'s, 'a>(
    streams: &'s [Option<Box<dyn BlobStream + 'a>>],
    layer: usize,
) -> Result<&'s (dyn BlobStream + 'a), StoreError> {
    streams
        .get(layer)
        .and_then(Option::as_deref)
        .ok_or_else(|| StoreError::Invalid(format!("restore: delta of layer {layer} is not open")))
}

fn target_err(start: u64, end: u64) -> impl FnOnce(std::io::Error) -> StoreError {
    move |e| StoreError::Image {
        what: "restore target",
        start,
        end,
        source: e,
    }
}

fn pwrite(target: &File, off: u64, data: &[u8]) -> Result<(), StoreError> {
    let err = target_err(off, off + data.len() as u64);
    failpoint::check("restore.target.write")
        .and_then(|()| target.write_all_at(data, off))
        .map_err(err)
}

/// Zeroes `[off, off+len)` of the target: punch a hole, or write zeros where that is refused.
/// Returns the bytes written (0 for a hole).
fn zero_range(target: &File, block_dev: bool, off: u64, len: u64) -> Result<u64, StoreError> {
    if len == 0 {
        return Ok(0);
    }
    if !block_dev {
        let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        if fallocate(target.as_raw_fd(), mode, off as i64, len as i64).is_ok() {
            return Ok(0);
        }
    }
    let zeros = vec![0u8; (1 << 20).min(len) as usize];
    let mut pos = off;
    while pos < off + len {
        let n = (zeros.len() as u64).min(off + len - pos) as usize;
        pwrite(target, pos, &zeros[..n])?;
        pos += n as u64;
    }
    Ok(len)
}

/// Hashes of whole blocks of one record that a read worker computed: block `first + k * bs`
/// of the image has hash `hashes[k]`.
#[derive(Clone, Copy, Default)]
struct Known<'a> {
    first: u64,
    hashes: &'a [[u8; super::format::HASH_LEN]],
}

impl Known<'_> {
    /// The hash of the whole block at image offset `start` (blocks of `bs` bytes), if known.
    fn get(&self, start: u64, bs: u64) -> Option<[u8; super::format::HASH_LEN]> {
        let k = start.checked_sub(self.first)?;
        if k % bs != 0 {
            return None;
        }
        self.hashes.get(usize::try_from(k / bs).ok()?).copied()
    }
}

/// Tests: the checker panics when it checks data of this snapshot (an id no other test
/// uses), to prove that a checker's panic is raised before the target's tail is touched.
#[cfg(test)]
pub(super) static PANIC_CHECKING: Mutex<Option<SnapshotId>> = Mutex::new(None);

/// Checks a restored image block by block, in order, against the hashes its leaf snapshot
/// recorded at capture time, on the checker thread, so hashing overlaps writing. The read
/// workers hash the blocks that lie inside one record ([`Known`]); the checker hashes the
/// blocks assembled from several pieces.
/// A block recorded as [`STALE_HASH`] (its hash was not known: an incremental stored only
/// part of it, see `capture_extents`) is checked by its records' CRC32s alone.
struct BlockCheck {
    hashes: Option<super::hashes::HashReader>,
    id: SnapshotId,
    block: u64,
    size: u64,
    /// Start of the block being assembled, and its bytes so far.
    start: u64,
    buf: Vec<u8>,
}

impl BlockCheck {
    fn open(store: &Store, leaf: &Manifest) -> Result<BlockCheck, StoreError> {
        Ok(BlockCheck {
            hashes: Some(super::hashes::HashReader::open(
                store,
                leaf,
                leaf.volume_size,
            )?),
            id: leaf.id.clone(),
            block: u64::from(leaf.block_size),
            size: leaf.volume_size,
            start: 0,
            buf: Vec::with_capacity(leaf.block_size as usize),
        })
    }

    fn pos(&self) -> u64 {
        self.start + self.buf.len() as u64
    }

    fn block_len(&self) -> u64 {
        self.block.min(self.size - self.start)
    }

    fn expected(&mut self) -> Result<[u8; super::format::HASH_LEN], StoreError> {
        let i = self.start / self.block;
        match self.hashes.as_mut() {
            Some(h) => h.get(i),
            None => Err(StoreError::Invalid("block check used after finish".into())),
        }
    }

    fn mismatch(&self) -> StoreError {
        let end = self.start + self.block_len();
        StoreError::corrupt(
            &self.id,
            "restored image",
            (self.start, end),
            "restored bytes differ from the hash recorded at capture: the chain's manifests or records do not fit together",
        )
    }

    /// Compares the hash of the block at `start` (computed by `got`, only when the recorded
    /// hash is known) with the one recorded at capture.
    fn check(
        &mut self,
        got: impl FnOnce(&Self) -> [u8; super::format::HASH_LEN],
    ) -> Result<(), StoreError> {
        let recorded = self.expected()?;
        if recorded != STALE_HASH && got(self) != recorded {
            return Err(self.mismatch());
        }
        Ok(())
    }

    /// Compares the assembled block and moves on.
    fn complete(&mut self) -> Result<(), StoreError> {
        self.check(|c| super::writer::hash_block(&c.buf))?;
        self.start += self.block_len();
        self.buf.clear();
        Ok(())
    }

    fn data(&mut self, offset: u64, mut bytes: &[u8], known: Known<'_>) -> Result<(), StoreError> {
        #[cfg(test)]
        if PANIC_CHECKING
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            == Some(&self.id)
        {
            panic!("injected panic of the restore checker");
        }
        if offset != self.pos() {
            return Err(StoreError::Invalid(format!(
                "restore check out of order at {offset}"
            )));
        }
        while !bytes.is_empty() {
            let want = (self.block_len() as usize) - self.buf.len();
            if self.buf.is_empty() && bytes.len() >= want {
                bytes = self.whole_blocks(bytes, known)?;
                continue;
            }
            let n = want.min(bytes.len());
            self.buf.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.buf.len() as u64 == self.block_len() {
                self.complete()?;
            }
        }
        Ok(())
    }

    /// Checks the whole blocks at the front of `bytes` (at least one; the buffer is empty),
    /// taking each block's hash from `known` (the read worker hashed every block that lies
    /// inside one record, so a whole block of one piece always is) or hashing it here;
    /// returns what is left.
    fn whole_blocks<'b>(
        &mut self,
        mut bytes: &'b [u8],
        known: Known<'_>,
    ) -> Result<&'b [u8], StoreError> {
        while self.start < self.size {
            let len = self.block_len() as usize;
            let Some(block) = bytes.get(..len) else { break };
            let hash = known.get(self.start, self.block);
            self.check(|_| hash.unwrap_or_else(|| super::writer::hash_block(block)))?;
            self.start += len as u64;
            bytes = &bytes[len..];
        }
        Ok(bytes)
    }

    fn zero(&mut self, offset: u64, len: u64) -> Result<(), StoreError> {
        if offset != self.pos() {
            return Err(StoreError::Invalid(format!(
                "restore check out of order at {offset}"
            )));
        }
        let end = offset + len;
        while self.pos() < end {
            let want = self.block_len() - self.buf.len() as u64;
            if self.buf.is_empty() && end - self.start >= want {
                // A whole zero block: recorded as the zero sentinel, no hashing needed.
                self.check(|_| super::writer::ZERO_HASH)?;
                self.start += want;
                continue;
            }
            let n = want.min(end - self.pos());
            self.buf.resize(self.buf.len() + n as usize, 0);
            if self.buf.len() as u64 == self.block_len() {
                self.complete()?;
            }
        }
        Ok(())
    }

    /// Treats everything from the current position to `offset` as zeros (an unwritten gap).
    fn zero_until(&mut self, offset: u64) -> Result<(), StoreError> {
        let pos = self.pos();
        if offset > pos {
            self.zero(pos, offset - pos)?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), StoreError> {
        if !self.buf.is_empty() {
            self.complete()?;
        }
        match self.hashes.take() {
            Some(h) => h.finish(),
            None => Ok(()),
        }
    }
}

impl Store {
    /// Writes the point-in-time image of snapshot `id` to `target`.
    #[tracing::instrument(skip_all, fields(snapshot = %id))]
    pub fn restore(
        &self,
        id: &SnapshotId,
        target: &File,
        mode: RestoreMode,
        progress: &dyn Progress,
    ) -> Result<(), StoreError> {
        self.assemble(id, Some(target), mode, progress)
    }

    /// Restores into `target`, or with `None` only assembles and checks the image (verify).
    fn assemble(
        &self,
        id: &SnapshotId,
        target: Option<&File>,
        mode: RestoreMode,
        progress: &dyn Progress,
    ) -> Result<(), StoreError> {
        let chain = self.chain(id)?;
        let leaf = chain
            .last()
            .ok_or_else(|| StoreError::NotFound { id: id.clone() })?;
        let size = leaf.volume_size;
        let layers = chain
            .iter()
            .map(|m| self.delta_index(m))
            .collect::<Result<Vec<_>, _>>()?;
        let pieces = extent_map(&layers, size);
        let blocks = Blocks {
            bs: u64::from(leaf.block_size),
            size,
        };
        // Every restored block is checked against the hash the leaf recorded for it when it
        // was captured: records that are each intact but assembled wrongly (a damaged or
        // edited manifest, a bug in the chain logic) are caught before `Ok` is returned.
        let mut check = BlockCheck::open(self, leaf)?;
        let mut block_dev = false;
        if let Some(target) = target {
            let md = target.metadata().map_err(target_err(0, size))?;
            block_dev = md.file_type().is_block_device();
            if !block_dev {
                target.set_len(size).map_err(target_err(0, size))?;
            }
        }
        // Only an existing target has old bytes to overwrite.
        let mode = if target.is_some() {
            mode
        } else {
            RestoreMode::Fresh
        };
        progress.set_total(size);
        // Every delta a piece reads from, opened once: the reader's preads keep their
        // read-ahead going, and clones come from the same open files the bytes were read from.
        let mut streams: Vec<Option<Box<dyn BlobStream>>> = chain.iter().map(|_| None).collect();
        for p in &pieces {
            if let Src::Data { layer, .. } = p.src {
                if streams[layer].is_none() {
                    let key = file_key(&chain[layer].id, &chain[layer].delta_file);
                    let stream = self
                        .backend()
                        .open_stream(&key)
                        .map_err(|err| StoreError::backend(&key, err))?;
                    streams[layer] = Some(stream);
                }
            }
        }
        // Private copies of the deltas that clones may come from (see `clone_batches`), made
        // before the reads start: on xfs the copy locks the delta for a moment.
        let copies: Vec<Option<Box<dyn BlobStream>>> = match target {
            Some(_) if !block_dev => private_copies(&streams, &layers, &pieces),
            _ => Vec::new(),
        };
        let stop_cloning = AtomicBool::new(false);
        let mut pos = 0u64;
        let (started, mut writer_waited) = (Instant::now(), Duration::ZERO);
        // Three stages, so reading, checking and writing overlap: a reader stage issues large
        // preads of runs of needed records (planned up front, read ahead by two threads, each
        // checking the header and CRC32 of every record it read and hashing the whole blocks
        // inside each), a checker thread compares every block's BLAKE3 with the recorded one
        // (hashing the blocks assembled from several pieces), and this thread writes the
        // checked bytes, passing the ranges it shares with a delta to a cloner thread. Nothing
        // reaches the writer before it has been checked.
        let (checker_waits, cloning) = std::thread::scope(|s| {
            let (span_tx, span_rx) = mpsc::sync_channel::<Result<Step, StoreError>>(2);
            let (tx, rx) = mpsc::sync_channel::<Result<Vec<Fetched>, StoreError>>(4);
            let (chain, layers, pieces, streams) = (&chain, &layers, &pieces, &streams);
            s.spawn(move || {
                if let Err(e) = self.read_spans(chain, layers, pieces, streams, blocks, &span_tx) {
                    let _ = span_tx.send(Err(e));
                }
            });
            let check = &mut check;
            let checker =
                s.spawn(
                    move || match check_steps(layers, pieces, blocks, check, span_rx, &tx) {
                        Ok(waits) => waits,
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            CheckerWaits::default()
                        }
                    },
                );
            // The writer's state lives in this scope: when it ends, even by a panic, its
            // channel to the cloner closes before the scope waits for the cloner.
            let (cloner, clone_tx) = match target {
                Some(t) if !block_dev => {
                    let (clone_tx, clone_rx) = mpsc::sync_channel(CLONE_QUEUE);
                    let (copies, stop) = (&copies, &stop_cloning);
                    let cloner = s.spawn(move || clone_batches(streams, copies, t, clone_rx, stop));
                    (Some(cloner), Some(clone_tx))
                }
                _ => (None, None),
            };
            let mut out = Out {
                target,
                start: 0,
                buf: Vec::with_capacity(OUT_BUF),
                writeback: Streamer::new(WRITEBACK_STEP, WRITEBACK_LAG),
                streams,
                share: target.is_some() && !block_dev,
                shared_once: false,
                batch: Vec::new(),
                cloner: clone_tx,
            };
            let written = (|| -> Result<(), StoreError> {
                loop {
                    let t = Instant::now();
                    let Ok(run) = rx.recv() else { break };
                    writer_waited += t.elapsed();
                    for Fetched { piece: p, data } in run? {
                        if progress.cancelled() {
                            return Err(StoreError::Cancelled { id: id.clone() });
                        }
                        if p.offset > pos && mode == RestoreMode::Overwrite {
                            out.zero(block_dev, pos, p.offset - pos)?;
                        }
                        match data {
                            None => {
                                if mode == RestoreMode::Overwrite {
                                    out.zero(block_dev, p.offset, p.len)?;
                                }
                            }
                            Some((buf, from)) => {
                                let bytes = &buf[from..from + p.len as usize];
                                match p.src {
                                    Src::Data { layer, rec } => {
                                        let e = &layers[layer][rec];
                                        let file_off =
                                            e.file_pos + RECORD_HEADER_LEN + (p.offset - e.offset);
                                        out.write_record(p.offset, bytes, layer, file_off)?;
                                    }
                                    Src::Zero => out.write(p.offset, bytes)?,
                                }
                            }
                        }
                        progress.advance(p.offset + p.len - pos);
                        pos = p.offset + p.len;
                    }
                }
                Ok(())
            })();
            // Stop the checker (its sends fail) and wait for it. Its channel also closes when
            // it panics: that panic must not pass for the end of a complete image, so it is
            // re-raised (the scope re-raises only what it joins itself) before the tail of
            // the target is touched.
            drop(rx);
            let waits = match checker.join() {
                Ok(waits) => waits,
                Err(panic) => std::panic::resume_unwind(panic),
            };
            let written = written.and_then(|()| {
                if pos < size && mode == RestoreMode::Overwrite {
                    out.zero(block_dev, pos, size - pos)?;
                }
                out.flush()?;
                out.send_batch()
            });
            // The cloner ends once it has made every clone it was passed, or at once when
            // the restore failed.
            if written.is_err() {
                stop_cloning.store(true, Ordering::Release);
            }
            drop(out);
            let streamed = started.elapsed();
            let cloned = cloner.map(|c| match c.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            });
            let cloning = match (written, cloned.transpose()) {
                // A failed clone stops the writer with a bare "the cloner stopped".
                (Err(StoreError::Invalid(m)), Err(e)) if m == CLONER_STOPPED => return Err(e),
                (Err(e), _) | (Ok(()), Err(e)) => return Err(e),
                (Ok(()), Ok(cloning)) => cloning,
            };
            Ok::<_, StoreError>((waits, (streamed, cloning)))
        })?;
        let (streamed, cloning) = cloning;
        tracing::debug!(
            ?streamed,
            cloner_tail = ?started.elapsed() - streamed,
            cloner_busy = ?cloning.unwrap_or_default(),
            ?writer_waited,
            checker_waited = ?checker_waits,
            pieces = pieces.len(),
            "restore streamed"
        );
        progress.advance(size - pos);
        let Some(target) = target else { return Ok(()) };
        failpoint::check("restore.target.fsync").map_err(target_err(0, size))?;
        target.sync_all().map_err(target_err(0, size))
    }

    /// The reader stage of `assemble`: sends, in image order, runs of pieces, each piece
    /// preceded by the span of records it reads from when that span is not the last one sent
    /// for its layer. The spans are planned first and read ahead of the pieces by
    /// [`READ_WORKERS`] threads, at most [`READ_AHEAD`] bytes of them waiting for the checker.
    fn read_spans(
        &self,
        chain: &[Manifest],
        layers: &[Vec<IndexEntry>],
        pieces: &[Piece],
        streams: &[Option<Box<dyn BlobStream + '_>>],
        blocks: Blocks,
        tx: &mpsc::SyncSender<Result<Step, StoreError>>,
    ) -> Result<(), StoreError> {
        let (plans, starts) = plan_spans(layers, pieces);
        let limit = plans.iter().map(|p| p.len).max().unwrap_or(0) as u64;
        let ahead = (READ_AHEAD / limit.max(1)).max(2) as usize;
        let pool = Mutex::new(SpanPool::default());
        let (slot_tx, slot_rx) =
            mpsc::sync_channel::<mpsc::Receiver<Result<Span, StoreError>>>(ahead);
        let (job_tx, job_rx) = mpsc::sync_channel::<ReadJob>(0);
        let job_rx = Mutex::new(job_rx);
        std::thread::scope(|s| {
            let pool = &pool;
            // The dispatcher: a slot for each span, in order (bounded: the read-ahead), then
            // the read itself to whichever worker is free.
            s.spawn(move || {
                for plan in plans {
                    let (done, result) = mpsc::sync_channel(1);
                    if slot_tx.send(result).is_err() {
                        return;
                    }
                    let buf = pool
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .take(plan.len);
                    let job = ReadJob { plan, buf, done };
                    if job_tx.send(job).is_err() {
                        return;
                    }
                }
            });
            for _ in 0..READ_WORKERS {
                let job_rx = &job_rx;
                s.spawn(move || loop {
                    let job = job_rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    let Ok(ReadJob {
                        plan,
                        mut buf,
                        done,
                    }) = job
                    else {
                        return;
                    };
                    // Each span's records are checked, and their whole blocks hashed, by the
                    // worker that read them, while the bytes are still in its core's cache,
                    // and on both workers at once.
                    let read = read_span(chain, layers, streams, &plan, &mut buf).and_then(|()| {
                        let buf = Arc::new(buf);
                        pool.lock().unwrap_or_else(|p| p.into_inner()).sent(&buf);
                        let mut span = Span {
                            layer: plan.layer,
                            first: plan.first,
                            end: plan.end,
                            pos: plan.start,
                            buf,
                            hashes: Vec::new(),
                            hashed: Vec::new(),
                        };
                        check_span(&chain[span.layer], &layers[span.layer], &span)?;
                        hash_span(&layers[span.layer], &mut span, blocks)?;
                        Ok(span)
                    });
                    // The receiver may be gone (the restore stopped): nothing to do.
                    let _ = done.send(read);
                });
            }
            // Pieces in order, each new span's slot before the first piece that reads it. On
            // the way out the slots are dropped, which stops the dispatcher and the workers.
            let slots = slot_rx;
            let mut starts = starts.into_iter().peekable();
            let mut i = 0;
            while i < pieces.len() {
                if starts.next_if_eq(&i).is_some() {
                    let Ok(result) = slots.recv() else {
                        return Err(StoreError::Invalid(
                            "restore: the span reader stopped".into(),
                        ));
                    };
                    if tx.send(Ok(Step::Span(result))).is_err() {
                        return Ok(());
                    }
                }
                // A run ends before the next piece that needs a new span.
                let end = starts
                    .peek()
                    .copied()
                    .unwrap_or(pieces.len())
                    .min(i + PIECE_RUN);
                if tx.send(Ok(Step::Pieces(i..end))).is_err() {
                    return Ok(());
                }
                i = end;
            }
            Ok(())
        })
    }

    /// Re-reads every byte of the chain ending at `id` and checks every checksum.
    #[tracing::instrument(skip_all, fields(snapshot = %id))]
    pub fn verify(
        &self,
        id: &SnapshotId,
        progress: &dyn Progress,
    ) -> Result<VerifyReport, StoreError> {
        let mut report = VerifyReport::default();
        let mut chain = Vec::new();
        let mut cur = Some(id.clone());
        while let Some(c) = cur.take() {
            match self.manifest(&c) {
                Ok(m) => {
                    cur = m.parent.clone();
                    if chain.iter().any(|x: &Manifest| x.id == m.id) {
                        report.problems.push(problem(
                            &m.id,
                            "manifest",
                            (0, m.volume_size),
                            "the chain of parents loops",
                        ));
                        break;
                    }
                    chain.push(m);
                }
                Err(StoreError::NotFound { .. }) if &c == id => {
                    return Err(StoreError::NotFound { id: id.clone() })
                }
                Err(StoreError::NotFound { .. }) => {
                    let child = chain
                        .last()
                        .map(|m: &Manifest| (m.id.clone(), m.volume_size));
                    let (cid, size) = child.unwrap_or((id.clone(), 0));
                    report.problems.push(problem(
                        &cid,
                        "manifest",
                        (0, size),
                        &format!("parent {c} is missing"),
                    ));
                }
                Err(StoreError::Corrupt {
                    id,
                    file,
                    start,
                    end,
                    reason,
                }) => {
                    report.problems.push(VerifyProblem {
                        snapshot: id,
                        file,
                        start,
                        end,
                        reason,
                    });
                }
                Err(e) => return Err(e),
            }
        }
        chain.reverse();
        progress.set_total(chain.iter().map(|m| m.delta_len).sum());
        for m in &chain {
            report.checked.push(m.id.clone());
            self.verify_one(m, &mut report.problems, progress)?;
        }
        // Every file is intact on its own; now check that they fit together: the image the
        // chain assembles must match, block by block, the hashes recorded at capture.
        if report.problems.is_empty() {
            match self.assemble(id, None, RestoreMode::Fresh, &super::NoProgress) {
                Ok(()) => {}
                Err(StoreError::Corrupt {
                    id,
                    file,
                    start,
                    end,
                    reason,
                }) => report.problems.push(VerifyProblem {
                    snapshot: id,
                    file,
                    start,
                    end,
                    reason,
                }),
                Err(e) => return Err(e),
            }
        }
        Ok(report)
    }

    fn verify_one(
        &self,
        m: &Manifest,
        problems: &mut Vec<VerifyProblem>,
        progress: &dyn Progress,
    ) -> Result<(), StoreError> {
        let whole = (0, m.volume_size);
        let index = match self.delta_index(m) {
            Ok(index) => Some(index),
            Err(StoreError::Corrupt {
                id,
                file,
                start,
                end,
                reason,
            }) => {
                problems.push(VerifyProblem {
                    snapshot: id,
                    file,
                    start,
                    end,
                    reason,
                });
                None
            }
            Err(e) => return Err(e),
        };
        // One sequential pass: the whole-file BLAKE3 where the manifest recorded one and, when
        // the index is sound, every record's header and CRC32.
        let key = file_key(&m.id, &m.delta_file);
        let len = match self.backend().size(&key) {
            Ok(len) => len,
            // Reported by `delta_index` already.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return self.verify_hashes(m, problems)
            }
            Err(e) => return Err(StoreError::backend(&key, e)),
        };
        // Manifests since version 2 leave `delta_blake3` empty; a recorded one is compared.
        let mut hasher = (!m.delta_blake3.is_empty()).then(blake3::Hasher::new);
        let mut records = index.as_deref().map(|ix| RecordScan::new(m, ix));
        let mut buf = AlignedBuf::zeroed(4 << 20);
        let stream = self
            .backend()
            .open_stream(&key)
            .map_err(|e| StoreError::backend(&key, e))?;
        let mut pos = 0u64;
        while pos < len {
            let n = (buf.len() as u64).min(len - pos) as usize;
            stream
                .read_at(pos, &mut buf[..n])
                .map_err(|e| StoreError::backend(&key, e))?;
            if let Some(h) = &mut hasher {
                h.update(&buf[..n]);
            }
            if let Some(scan) = &mut records {
                scan.feed(pos, &buf[..n], problems, progress);
            }
            pos += n as u64;
        }
        let blake3_differs = match &mut hasher {
            Some(h) => h.finalize().to_hex().as_str() != m.delta_blake3,
            None => false,
        };
        if len != m.delta_len || blake3_differs {
            problems.push(problem(
                &m.id,
                &m.delta_file,
                whole,
                "delta file BLAKE3 or length differs from the manifest",
            ));
        }
        self.verify_hashes(m, problems)
    }

    fn verify_hashes(
        &self,
        m: &Manifest,
        problems: &mut Vec<VerifyProblem>,
    ) -> Result<(), StoreError> {
        match super::hashes::HashReader::open(self, m, m.volume_size).and_then(|r| r.finish()) {
            Ok(()) => {}
            Err(StoreError::Corrupt {
                id, file, reason, ..
            }) => problems.push(VerifyProblem {
                snapshot: id,
                file,
                start: 0,
                end: m.volume_size,
                reason,
            }),
            Err(e) => return Err(e),
        }
        Ok(())
    }
}

/// Checks records while a delta streams past in order (the index says where each one lies).
pub(crate) struct RecordScan<'a> {
    m: &'a Manifest,
    index: &'a [IndexEntry],
    id: [u8; 16],
    next: usize,
    header: Vec<u8>,
    header_ok: bool,
    crc: crc32fast::Hasher,
    left: u64,
    in_payload: bool,
    /// A non-zero byte was seen in the alignment gap before the current record.
    gap_dirty: bool,
}

impl<'a> RecordScan<'a> {
    pub(crate) fn new(m: &'a Manifest, index: &'a [IndexEntry]) -> RecordScan<'a> {
        RecordScan {
            m,
            index,
            id: super::format::id_bytes(&m.id),
            next: 0,
            header: Vec::with_capacity(32),
            header_ok: false,
            crc: crc32fast::Hasher::new(),
            left: 0,
            in_payload: false,
            gap_dirty: false,
        }
    }

    /// Consumes the file bytes at `pos..pos + bytes.len()`.
    pub(crate) fn feed(
        &mut self,
        pos: u64,
        bytes: &[u8],
        problems: &mut Vec<VerifyProblem>,
        progress: &dyn Progress,
    ) {
        let mut p = 0usize;
        while let Some(e) = self.index.get(self.next) {
            if !self.in_payload {
                if p >= bytes.len() {
                    return;
                }
                let at = pos + p as u64;
                if at < e.file_pos {
                    // The delta header (checked by `delta_index`), or an alignment gap before
                    // the record (delta version 2), whose bytes must all be zero.
                    let n = (e.file_pos - at).min((bytes.len() - p) as u64) as usize;
                    let skip = format::DELTA_HEADER_LEN.saturating_sub(at).min(n as u64) as usize;
                    if !super::writer::is_zero(&bytes[p + skip..p + n]) {
                        self.gap_dirty = true;
                    }
                    progress.advance(n as u64);
                    p += n;
                    continue;
                }
                let take = (32 - self.header.len()).min(bytes.len() - p);
                self.header.extend_from_slice(&bytes[p..p + take]);
                p += take;
                if self.header.len() < 32 {
                    return;
                }
                self.header_ok = super::format::check_record_header(&self.header, e).is_ok();
                self.header.clear();
                self.crc = crc32fast::Hasher::new();
                self.crc.update(&self.id);
                self.crc.update(&e.offset.to_le_bytes());
                self.crc.update(&e.length.to_le_bytes());
                self.crc.update(&[e.kind.to_byte()]);
                self.left = e.payload_len();
                self.in_payload = true;
            }
            let take = self.left.min((bytes.len() - p) as u64) as usize;
            self.crc.update(&bytes[p..p + take]);
            p += take;
            self.left -= take as u64;
            if self.left > 0 {
                return;
            }
            let crc = std::mem::replace(&mut self.crc, crc32fast::Hasher::new()).finalize();
            let reason = if std::mem::take(&mut self.gap_dirty) {
                Some("alignment gap before the record is not zero")
            } else if !self.header_ok {
                Some("record header disagrees with the index")
            } else if crc != e.crc {
                Some("record CRC32 mismatch")
            } else {
                None
            };
            if let Some(reason) = reason {
                problems.push(problem(
                    &self.m.id,
                    &self.m.delta_file,
                    (e.offset, e.end()),
                    reason,
                ));
            }
            progress.advance(32 + e.payload_len());
            self.in_payload = false;
            self.next += 1;
        }
    }
}

fn problem(id: &SnapshotId, file: &str, range: (u64, u64), reason: &str) -> VerifyProblem {
    VerifyProblem {
        snapshot: id.clone(),
        file: file.to_string(),
        start: range.0,
        end: range.1,
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(offset: u64, length: u64, kind: RecordKind) -> IndexEntry {
        IndexEntry {
            offset,
            length,
            kind,
            file_pos: 0,
            crc: 0,
        }
    }

    #[test]
    fn span_buffers_are_reused_only_once_no_stage_holds_them() {
        let mut pool = SpanPool::default();
        let first = Arc::new(pool.take(4096));
        // Page-aligned, so the kernel's copy into it runs at full speed.
        assert_eq!(first.as_ptr() as usize % crate::buf::AlignedBuf::ALIGN, 0);
        pool.sent(&first);
        let held = Arc::clone(&first);
        drop(first);
        // Still held by a stage: a new buffer.
        let second = pool.take(100);
        assert_ne!(second.as_ptr(), held.as_ptr());
        assert_eq!(second.len(), 100);
        let at = held.as_ptr();
        drop(held);
        // Free now: the same allocation, at the asked length.
        let again = pool.take(1000);
        assert_eq!(again.as_ptr(), at);
        assert_eq!(again.len(), 1000);
        // Taken out of the pool: not handed out twice.
        let other = pool.take(10);
        assert_ne!(other.as_ptr(), at);
        // The pool keeps at most SPAN_POOL buffers.
        for _ in 0..SPAN_POOL + 3 {
            pool.sent(&Arc::new(AlignedBuf::zeroed(8)));
        }
        assert_eq!(pool.sent.len(), SPAN_POOL);
    }

    #[test]
    fn spans_run_over_needed_records_in_the_order_pieces_read_them() {
        // Layer 0: five 768 KiB data records back to back; record 2 is hidden by layer 1.
        let rlen = 768u64 << 10;
        let rec = |i: u64, file_pos: u64| IndexEntry {
            file_pos,
            ..e(i * rlen, rlen, RecordKind::Data)
        };
        let stride = RECORD_HEADER_LEN + rlen;
        let root: Vec<IndexEntry> = (0..5)
            .map(|i| rec(i, format::DELTA_HEADER_LEN + i * stride))
            .collect();
        let top = vec![rec(2, format::DELTA_HEADER_LEN)];
        let layers = vec![root, top];
        let pieces = extent_map(&layers, 5 * rlen);
        let (plans, starts) = plan_spans(&layers, &pieces);
        let got: Vec<(usize, usize, usize, u64)> = plans
            .iter()
            .map(|p| (p.layer, p.first, p.end, p.start))
            .collect();
        let limit = (SPAN_BYTES / 2).max(MIN_SPAN);
        assert!(
            2 * stride <= limit && 3 * stride > limit,
            "the test assumes 2 records fit"
        );
        assert_eq!(
            got,
            vec![
                // Records 0 and 1 (the budget holds two of them), from the header's end.
                (0, 0, 2, format::DELTA_HEADER_LEN),
                // Layer 1's record, then 3 and 4 from where record 2 ends (its alignment gap).
                (1, 0, 1, format::DELTA_HEADER_LEN),
                (0, 3, 5, format::DELTA_HEADER_LEN + 3 * stride),
            ]
        );
        for (p, &i) in plans.iter().zip(&starts) {
            let end = |r: usize| {
                let x = &layers[p.layer][r];
                x.file_pos + RECORD_HEADER_LEN + x.payload_len()
            };
            assert_eq!(p.len as u64, end(p.end - 1) - p.start);
            // Each span is sent before the first piece that reads from it.
            assert!(
                matches!(pieces[i].src, Src::Data { layer, rec } if layer == p.layer && rec == p.first)
            );
        }
        assert_eq!(starts.len(), 3);
    }

    #[test]
    fn whole_blocks_inside_a_record_and_their_known_hashes() {
        let b = Blocks {
            bs: 16384,
            size: 5 * 16384 + 4096,
        };
        assert_eq!(b.inside(0, 16384), (0, 1));
        assert_eq!(b.inside(4096, 16384), (16384, 0));
        assert_eq!(b.inside(4096, 3 * 16384 + 100), (16384, 2));
        // The short last block is whole up to the image's end, not before it.
        assert_eq!(b.inside(5 * 16384, 5 * 16384 + 4096), (5 * 16384, 1));
        assert_eq!(b.inside(5 * 16384, 5 * 16384 + 2048), (5 * 16384, 0));
        assert_eq!(b.inside(0, u64::MAX), (0, 6));
        let hashes = [[1u8; 32], [2u8; 32]];
        let k = Known {
            first: 16384,
            hashes: &hashes,
        };
        assert_eq!(k.get(16384, 16384), Some([1u8; 32]));
        assert_eq!(k.get(2 * 16384, 16384), Some([2u8; 32]));
        assert_eq!(k.get(3 * 16384, 16384), None);
        assert_eq!(k.get(0, 16384), None);
        assert_eq!(k.get(16384 + 4096, 16384), None);
    }

    #[test]
    fn newest_record_wins() {
        let root = vec![e(0, 100, RecordKind::Data)];
        let mid = vec![e(10, 10, RecordKind::Zero), e(50, 10, RecordKind::Data)];
        let leaf = vec![e(15, 40, RecordKind::Data)];
        let map = extent_map(&[root, mid, leaf], 90);
        let got: Vec<_> = map.iter().map(|p| (p.offset, p.len, p.src)).collect();
        assert_eq!(
            got,
            vec![
                (0, 10, Src::Data { layer: 0, rec: 0 }),
                (10, 5, Src::Zero),
                (15, 40, Src::Data { layer: 2, rec: 0 }),
                (55, 5, Src::Data { layer: 1, rec: 1 }),
                (60, 30, Src::Data { layer: 0, rec: 0 }),
            ]
        );
    }
}

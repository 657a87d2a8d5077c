//! Writing a snapshot: `SnapshotWriter` (begin → add extents → commit or abort), the delta
//! file writer it and the delete-fold share, and block-hash lists.
//!
//! Extents must arrive in ascending order; adjacent ones are coalesced into records of at most
//! `max(block size, 1 MiB)` payload bytes. Commit writes the delta and the block-hash file
//! (at once), then the manifest, each durably; the snapshot exists from the manifest's rename on.

use super::format::{self, IndexEntry, RecordKind, HASH_LEN};
use super::hashes::{HashWriter, STALE_HASH};
use super::{
    backend, delta_name, file_key, now_unix, BlobWriter, Manifest, SnapshotMeta, Store, StoreError,
    HASHES_FILE,
};
use crate::api::SnapshotId;
use crate::buf::AlignedBuf;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;

/// Hash of an all-zero block in block-hash lists.
pub const ZERO_HASH: [u8; HASH_LEN] = [0; HASH_LEN];

/// The BLAKE3 of a block, or `ZERO_HASH` when every byte is zero.
pub fn hash_block(block: &[u8]) -> [u8; HASH_LEN] {
    if is_zero(block) {
        ZERO_HASH
    } else {
        *blake3::hash(block).as_bytes()
    }
}

/// True when every byte is zero (OR-folds 64-byte lanes so the compiler vectorizes it).
pub fn is_zero(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(64);
    let body = chunks
        .by_ref()
        .all(|c| c.iter().fold(0u8, |a, x| a | x) == 0);
    body && chunks.remainder().iter().all(|&x| x == 0)
}

/// One strong hash per block of a snapshot's full point-in-time image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockHashes {
    pub block_size: u32,
    pub volume_size: u64,
    pub hashes: Vec<[u8; HASH_LEN]>,
}

impl BlockHashes {
    /// A list of all-zero blocks for a volume.
    pub fn zeros(block_size: u32, volume_size: u64) -> BlockHashes {
        let n = volume_size.div_ceil(u64::from(block_size)) as usize;
        BlockHashes {
            block_size,
            volume_size,
            hashes: vec![ZERO_HASH; n],
        }
    }

    /// The hash of block `i`, or `ZERO_HASH` beyond the list (a volume that grew reads zeros).
    pub fn get(&self, i: u64) -> [u8; HASH_LEN] {
        usize::try_from(i)
            .ok()
            .and_then(|i| self.hashes.get(i).copied())
            .unwrap_or(ZERO_HASH)
    }

    /// The same list resized for a volume of `volume_size` bytes.
    pub fn resized(&self, volume_size: u64) -> BlockHashes {
        let n = volume_size.div_ceil(u64::from(self.block_size));
        let mut hashes: Vec<_> = (0..n).map(|i| self.get(i)).collect();
        // The old last block may have been short; if it is now longer its hash is stale, and
        // the caller re-hashes it (capture treats it as changed by using a sentinel).
        if self.volume_size % u64::from(self.block_size) != 0 && volume_size > self.volume_size {
            let last = self.volume_size / u64::from(self.block_size);
            if let Some(h) = hashes.get_mut(last as usize) {
                *h = STALE_HASH;
            }
        }
        BlockHashes {
            block_size: self.block_size,
            volume_size,
            hashes,
        }
    }
}

impl Store {
    /// The block-hash list of a committed snapshot, checked against its manifest.
    pub fn block_hashes(&self, m: &Manifest) -> Result<BlockHashes, StoreError> {
        let key = file_key(&m.id, &m.hashes_file);
        let limit = format::hashes_file_len(m.volume_size.div_ceil(u64::from(m.block_size)))
            .unwrap_or(u64::MAX);
        let bytes = match backend::read_all(self.backend(), &key, limit) {
            Ok(b) => b,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::InvalidData
                ) =>
            {
                return Err(StoreError::corrupt(
                    &m.id,
                    &m.hashes_file,
                    (0, 0),
                    e.to_string(),
                ))
            }
            Err(e) => return Err(StoreError::backend(&key, e)),
        };
        let len = bytes.len() as u64;
        let (block_size, volume_size, hashes) = format::decode_hashes(&bytes, &m.id)
            .map_err(|e| StoreError::corrupt(&m.id, &m.hashes_file, (0, len), e.0))?;
        if block_size != m.block_size || volume_size != m.volume_size {
            return Err(StoreError::corrupt(
                &m.id,
                &m.hashes_file,
                (0, len),
                "block-hash file disagrees with the manifest",
            ));
        }
        Ok(BlockHashes {
            block_size,
            volume_size,
            hashes,
        })
    }
}

/// Streams records into a delta blob and finishes it with index and footer. A worker thread
/// writes, so the caller's thread only encodes records.
///
/// With a clone source (`set_clone_source`: the regular file a capture reads, whose offsets
/// are image offsets), `record_cloned` appends a data record whose payload the blob shares
/// with the source (`BlobWriter::append_clone`) instead of writing it; the record CRC32 is
/// still computed by the caller from the bytes it read. Where the backend cannot share
/// extents, the worker reads the range back from the source and writes it, and later records
/// are written (see `clone_works`).
pub(crate) struct DeltaWriter {
    id: [u8; 16],
    key: String,
    pos: u64,
    index: Vec<IndexEntry>,
    payload: u64,
    cur: Vec<u8>,
    tx: Option<mpsc::SyncSender<Chunk>>,
    back: mpsc::Receiver<Vec<u8>>,
    worker: Option<thread::JoinHandle<WorkerResult>>,
    clone_src: Option<Arc<File>>,
    clone_ok: Arc<AtomicBool>,
}

/// What the worker appends to the blob.
enum Chunk {
    Bytes(Vec<u8>),
    /// `len` bytes of the clone source at `offset`.
    Clone {
        src: Arc<File>,
        offset: u64,
        len: u64,
    },
}

type WorkerResult = io::Result<Box<dyn BlobWriter>>;

/// Bytes gathered before a buffer goes to the worker.
const SEND_AT: usize = 1 << 20;
/// Buffers queued for the worker at most. 16 showed no measurable gain over 4 and raised the
/// daemon's peak RSS by ~12 MiB (the budget is 64 MiB).
const QUEUED: usize = 4;

/// What a finished delta looks like, for the manifest.
pub(crate) struct DeltaSummary {
    pub len: u64,
    /// For the manifest's `delta_blake3`: empty since manifest version 2 (see `format`).
    pub blake3: String,
    pub record_count: u64,
    pub payload_bytes: u64,
}

/// Appends `len` bytes of `src` at `offset` to `w`: shared extents when the backend can,
/// otherwise (and from then on, through `ok`) read back and written.
fn append_range(
    w: &mut Box<dyn BlobWriter>,
    src: &File,
    offset: u64,
    len: u64,
    ok: &AtomicBool,
    buf: &mut AlignedBuf,
) -> io::Result<()> {
    if ok.load(Ordering::Relaxed) {
        match w.append_clone(src, offset, len) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                tracing::debug!("extents cannot be shared here ({e}); writing instead");
                ok.store(false, Ordering::Relaxed);
            }
            Err(e) => return Err(e),
        }
    }
    let mut pos = offset;
    while pos < offset + len {
        let n = (offset + len - pos).min(1 << 20) as usize;
        buf.resize_for_overwrite(n);
        src.read_exact_at(buf, pos)?;
        w.write_all(buf)?;
        pos += n as u64;
    }
    Ok(())
}

impl DeltaWriter {
    pub fn create(
        store: &Store,
        id: &SnapshotId,
        generation: u32,
    ) -> Result<DeltaWriter, StoreError> {
        let key = file_key(id, &delta_name(generation));
        let mut w = store
            .backend()
            .put(&key)
            .map_err(|e| StoreError::backend(&key, e))?;
        // Up to SEND_AT * QUEUED bytes wait for the worker: the caller does not stall on a
        // write that waits for the disk (writeback) now and then.
        let (tx, rx) = mpsc::sync_channel::<Chunk>(QUEUED);
        let (back_tx, back) = mpsc::channel::<Vec<u8>>();
        let clone_ok = Arc::new(AtomicBool::new(true));
        let ok = Arc::clone(&clone_ok);
        let worker = thread::Builder::new()
            .name("delta-writer".into())
            .spawn(move || -> WorkerResult {
                let mut scratch = AlignedBuf::default();
                for chunk in rx {
                    match chunk {
                        Chunk::Bytes(buf) => {
                            w.write_all(&buf)?;
                            let _ = back_tx.send(buf);
                        }
                        Chunk::Clone { src, offset, len } => {
                            append_range(&mut w, &src, offset, len, &ok, &mut scratch)?
                        }
                    }
                }
                Ok(w)
            })
            .map_err(|e| StoreError::backend(&key, e))?;
        let mut d = DeltaWriter {
            id: format::id_bytes(id),
            key,
            pos: 0,
            index: Vec::new(),
            payload: 0,
            cur: Vec::with_capacity(SEND_AT + (1 << 16)),
            tx: Some(tx),
            back,
            worker: Some(worker),
            clone_src: None,
            clone_ok,
        };
        d.put(&format::encode_delta_header(id))?;
        Ok(d)
    }

    /// Lets `record_cloned` share extents with `src` (whose offsets are image offsets).
    pub fn set_clone_source(&mut self, src: Arc<File>) {
        self.clone_src = Some(src);
    }

    /// Whether `record_cloned` may be used: a clone source is set and sharing has not failed.
    pub fn clone_works(&self) -> bool {
        self.clone_src.is_some() && self.clone_ok.load(Ordering::Relaxed)
    }

    fn put(&mut self, b: &[u8]) -> Result<(), StoreError> {
        self.pos += b.len() as u64;
        self.cur.extend_from_slice(b);
        if self.cur.len() >= SEND_AT {
            self.send()?;
        }
        Ok(())
    }

    fn send(&mut self) -> Result<(), StoreError> {
        let mut next = self.back.try_recv().unwrap_or_default();
        next.clear();
        let full = std::mem::replace(&mut self.cur, next);
        self.send_chunk(Chunk::Bytes(full))
    }

    fn send_chunk(&mut self, chunk: Chunk) -> Result<(), StoreError> {
        let sent = self.tx.as_ref().map(|tx| tx.send(chunk).is_ok());
        if sent != Some(true) {
            // The worker stopped: its error says why.
            return Err(self.join().err().unwrap_or_else(|| {
                StoreError::backend(&self.key, io::Error::other("delta writer stopped"))
            }));
        }
        Ok(())
    }

    fn join(&mut self) -> Result<Box<dyn BlobWriter>, StoreError> {
        self.tx = None;
        let key = self.key.clone();
        match self.worker.take().map(|h| h.join()) {
            Some(Ok(r)) => r.map_err(|e| StoreError::backend(&key, e)),
            Some(Err(_)) => Err(StoreError::backend(
                &key,
                io::Error::other("delta writer panicked"),
            )),
            None => Err(StoreError::backend(
                &key,
                io::Error::other("delta writer already finished"),
            )),
        }
    }

    /// Writes the alignment gap (zeros) a record needs and returns its header position.
    fn place(&mut self, kind: RecordKind, offset: u64, length: u64) -> Result<u64, StoreError> {
        let at = format::record_pos(format::DELTA_VERSION, self.pos, kind, offset, length);
        let gap = (at - self.pos) as usize;
        if gap > 0 {
            self.put(&[0u8; format::ALIGN as usize][..gap])?;
        }
        Ok(at)
    }

    /// Appends a record; `payload` is empty for a zero record. Ordering is the caller's duty.
    pub fn record(
        &mut self,
        offset: u64,
        length: u64,
        kind: RecordKind,
        payload: &[u8],
    ) -> Result<(), StoreError> {
        let file_pos = self.place(kind, offset, length)?;
        let e = IndexEntry {
            offset,
            length,
            kind,
            file_pos,
            crc: format::record_crc(&self.id, offset, length, kind, payload),
        };
        self.put(&format::encode_record_header(&e))?;
        self.put(payload)?;
        self.payload += payload.len() as u64;
        self.index.push(e);
        Ok(())
    }

    /// Appends a data record of `length` bytes at image `offset` (a multiple of `ALIGN`, and
    /// `length >= ALIGN_MIN_RECORD`, so its payload lands on an `ALIGN` boundary of the file):
    /// the payload is the clone source's bytes at `offset`, shared except for `tail`, the
    /// last `length % ALIGN` bytes, which are written. `payload_crc` is the CRC32 state over
    /// the payload bytes the caller read.
    pub fn record_cloned(
        &mut self,
        offset: u64,
        length: u64,
        payload_crc: crc32fast::Hasher,
        tail: &[u8],
    ) -> Result<(), StoreError> {
        let src = match &self.clone_src {
            Some(src) if offset % format::ALIGN == 0 && length >= format::ALIGN_MIN_RECORD => {
                Arc::clone(src)
            }
            _ => {
                return Err(StoreError::Invalid(format!(
                    "record at {offset}+{length} cannot share extents"
                )))
            }
        };
        let shared = length - tail.len() as u64;
        if shared % format::ALIGN != 0 {
            return Err(StoreError::Invalid(format!(
                "record at {offset}+{length}: tail of {} bytes is not the unaligned end",
                tail.len()
            )));
        }
        let kind = RecordKind::Data;
        let file_pos = self.place(kind, offset, length)?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&self.id);
        crc.update(&offset.to_le_bytes());
        crc.update(&length.to_le_bytes());
        crc.update(&[kind.to_byte()]);
        crc.combine(&payload_crc);
        let e = IndexEntry {
            offset,
            length,
            kind,
            file_pos,
            crc: crc.finalize(),
        };
        self.put(&format::encode_record_header(&e))?;
        debug_assert_eq!(self.pos % format::ALIGN, 0);
        self.send()?;
        self.send_chunk(Chunk::Clone {
            src,
            offset,
            len: shared,
        })?;
        self.pos += shared;
        self.put(tail)?;
        self.payload += length;
        self.index.push(e);
        Ok(())
    }

    /// Writes index and footer and commits the blob durably.
    pub fn finish(mut self) -> Result<DeltaSummary, StoreError> {
        let footer = format::Footer {
            record_count: self.index.len() as u64,
            index_pos: self.pos,
            payload_bytes: self.payload,
        };
        let mut index = Vec::with_capacity(self.index.len() * 32);
        for e in &self.index {
            index.extend_from_slice(&format::encode_index_entry(e));
        }
        self.put(&index)?;
        self.put(&format::encode_footer(&footer, &index))?;
        self.send()?;
        let w = self.join()?;
        let key = self.key.clone();
        w.commit().map_err(|e| StoreError::backend(&key, e))?;
        Ok(DeltaSummary {
            len: self.pos,
            blake3: String::new(),
            record_count: footer.record_count,
            payload_bytes: footer.payload_bytes,
        })
    }
}

impl Drop for DeltaWriter {
    fn drop(&mut self) {
        // Unfinished: stop the worker; dropping its blob writer discards the blob.
        self.tx = None;
        if let Some(h) = self.worker.take() {
            let _ = h.join();
        }
    }
}

/// Writes a block-hash list durably.
pub(crate) fn write_hashes(
    store: &Store,
    id: &SnapshotId,
    h: &BlockHashes,
) -> Result<HashWriter, StoreError> {
    let mut w = HashWriter::create(store, id, h.block_size, h.volume_size)?;
    for chunk in h.hashes.chunks(32 * 1024) {
        w.push(chunk)?;
    }
    Ok(w)
}

enum Pending {
    None,
    /// A data record being gathered; `clone`: it may share extents with the clone source.
    Data {
        offset: u64,
        clone: bool,
    },
    Zero {
        offset: u64,
        len: u64,
    },
}

/// Builds one new snapshot. Dropping it without `commit` discards everything it wrote.
///
/// For a writer that knows its dirty set (an NBD write path), the hash list to commit is the
/// parent's (`Store::block_hashes(..).resized(..)`) with each dirty block replaced by
/// `hash_block` of its new bytes, or by `STALE_HASH` where only part of the block was read;
/// `capture_extents` does exactly that, streaming.
pub struct SnapshotWriter {
    store: Store,
    meta: SnapshotMeta,
    delta: Option<DeltaWriter>,
    pending: Pending,
    /// The pending data record's bytes; once it shares extents (`sharing`), only the bytes
    /// after its last `ALIGN` boundary (the tail that is written).
    buf: Vec<u8>,
    /// Payload bytes of the pending data record, and their CRC32 state (sharing records only).
    plen: u64,
    pcrc: crc32fast::Hasher,
    sharing: bool,
    /// Records ending at or before this image offset may share the clone source's extents.
    clone_limit: u64,
    max_record: u64,
    next_offset: u64,
}

impl SnapshotWriter {
    /// Starts a snapshot; checks the metadata and the parent (same block size, committed).
    pub fn begin(store: &Store, meta: SnapshotMeta) -> Result<SnapshotWriter, StoreError> {
        let bs = meta.block_size;
        if !(4096..=4 << 20).contains(&bs) || !bs.is_power_of_two() {
            return Err(StoreError::Invalid(format!(
                "block size {bs} must be a power of two from 4K to 4M"
            )));
        }
        let dir = super::snap_dir(&meta.id);
        let existing = store
            .backend()
            .list(&dir)
            .map_err(|e| StoreError::backend(&dir, e))?;
        if !existing.is_empty() {
            return Err(StoreError::Exists {
                id: meta.id.clone(),
            });
        }
        if let Some(parent) = &meta.parent {
            let p = store.manifest(parent)?;
            if store.is_deleting(parent)? {
                return Err(StoreError::NotFound { id: parent.clone() });
            }
            if p.block_size != bs {
                return Err(StoreError::Invalid(format!(
                    "parent {parent} has block size {}, not {bs}",
                    p.block_size
                )));
            }
        }
        let delta = DeltaWriter::create(store, &meta.id, 0)?;
        Ok(SnapshotWriter {
            store: store.clone(),
            max_record: u64::from(bs).max(1 << 20),
            meta,
            delta: Some(delta),
            pending: Pending::None,
            buf: Vec::new(),
            plen: 0,
            pcrc: crc32fast::Hasher::new(),
            sharing: false,
            clone_limit: 0,
            next_offset: 0,
        })
    }

    /// The snapshot's id.
    pub fn id(&self) -> &SnapshotId {
        &self.meta.id
    }

    /// Lets long data records share extents with `src` instead of copying its bytes: `src`
    /// must hold the image at the offsets given to `add_data` (the first `src_len` bytes; the
    /// source a capture reads) and must not change until the commit. The bytes given to
    /// `add_data` still make the record CRC32s (and the caller's block hashes), so a source
    /// that changed anyway is caught by restore and verify, never trusted.
    pub(crate) fn set_clone_source(
        &mut self,
        src: Arc<File>,
        src_len: u64,
    ) -> Result<(), StoreError> {
        self.delta()?.set_clone_source(src);
        self.clone_limit = src_len / format::ALIGN * format::ALIGN;
        Ok(())
    }

    /// Whether a data record starting at `offset` may share extents.
    fn may_share(&self, offset: u64) -> bool {
        offset % format::ALIGN == 0
            && offset.saturating_add(self.max_record) <= self.clone_limit
            && self.delta.as_ref().is_some_and(|d| d.clone_works())
    }

    fn check_range(&mut self, offset: u64, len: u64) -> Result<(), StoreError> {
        let end = offset.checked_add(len);
        if offset < self.next_offset || end.is_none_or(|e| e > self.meta.volume_size) {
            return Err(StoreError::Invalid(format!(
                "extent {offset}+{len} is out of order or beyond the volume of {} bytes",
                self.meta.volume_size
            )));
        }
        self.next_offset = offset + len;
        Ok(())
    }

    fn delta(&mut self) -> Result<&mut DeltaWriter, StoreError> {
        self.delta
            .as_mut()
            .ok_or_else(|| StoreError::Invalid("snapshot writer already finished".into()))
    }

    fn flush_pending(&mut self) -> Result<(), StoreError> {
        match std::mem::replace(&mut self.pending, Pending::None) {
            Pending::None => Ok(()),
            Pending::Data { offset, .. } => {
                let buf = std::mem::take(&mut self.buf);
                let crc = std::mem::replace(&mut self.pcrc, crc32fast::Hasher::new());
                let len = std::mem::take(&mut self.plen);
                let r = if std::mem::take(&mut self.sharing) {
                    self.delta()?.record_cloned(offset, len, crc, &buf)
                } else {
                    self.delta()?.record(offset, len, RecordKind::Data, &buf)
                };
                self.buf = buf;
                self.buf.clear();
                r
            }
            Pending::Zero { offset, len } => {
                self.delta()?.record(offset, len, RecordKind::Zero, &[])
            }
        }
    }

    /// Adds bytes of the image at `offset` (after every extent added before).
    pub fn add_data(&mut self, offset: u64, data: &[u8]) -> Result<(), StoreError> {
        if data.is_empty() {
            return Ok(());
        }
        self.check_range(offset, data.len() as u64)?;
        let align = format::ALIGN;
        let mut offset = offset;
        let mut data = data;
        while !data.is_empty() {
            let extends = matches!(self.pending, Pending::Data { offset: o, .. } if o + self.plen == offset)
                && self.plen < self.max_record;
            if !extends {
                self.flush_pending()?;
                // A whole record's worth is written (or shared) straight from the caller's slice.
                if data.len() as u64 >= self.max_record {
                    let take = self.max_record as usize;
                    let piece = &data[..take];
                    if self.may_share(offset) {
                        let mut crc = crc32fast::Hasher::new();
                        crc.update(piece);
                        let tail = &piece[take / align as usize * align as usize..];
                        self.delta()?
                            .record_cloned(offset, take as u64, crc, tail)?;
                    } else {
                        self.delta()?
                            .record(offset, take as u64, RecordKind::Data, piece)?;
                    }
                    offset += take as u64;
                    data = &data[take..];
                    continue;
                }
                let clone = self.may_share(offset);
                self.pending = Pending::Data { offset, clone };
            }
            let room = (self.max_record - self.plen) as usize;
            let take = room.min(data.len());
            let piece = &data[..take];
            let clone = matches!(self.pending, Pending::Data { clone: true, .. });
            if clone {
                self.pcrc.update(piece);
            }
            let new_len = self.plen + take as u64;
            // Record-relative start of the bytes after the last ALIGN boundary.
            let tail_from = new_len / align * align;
            if self.sharing {
                if tail_from > self.plen {
                    self.buf.clear();
                    self.buf
                        .extend_from_slice(&piece[(tail_from - self.plen) as usize..]);
                } else {
                    self.buf.extend_from_slice(piece);
                }
            } else {
                self.buf.extend_from_slice(piece);
                if clone && new_len >= format::ALIGN_MIN_RECORD {
                    // Long enough to be aligned: from now on only the tail is kept.
                    self.sharing = true;
                    self.buf.drain(..tail_from as usize);
                }
            }
            self.plen = new_len;
            offset += take as u64;
            data = &data[take..];
        }
        Ok(())
    }

    /// Records that `len` bytes at `offset` are zero.
    pub fn add_zero(&mut self, offset: u64, len: u64) -> Result<(), StoreError> {
        if len == 0 {
            return Ok(());
        }
        self.check_range(offset, len)?;
        if let Pending::Zero { offset: o, len: l } = &mut self.pending {
            if *o + *l == offset {
                *l += len;
                return Ok(());
            }
        }
        self.flush_pending()?;
        self.pending = Pending::Zero { offset, len };
        Ok(())
    }

    /// Makes the snapshot durable and visible; `hashes` describes its full image.
    pub fn commit(self, hashes: &BlockHashes) -> Result<Manifest, StoreError> {
        let m = &self.meta;
        if hashes.block_size != m.block_size || hashes.volume_size != m.volume_size {
            return Err(StoreError::Invalid(
                "block-hash list does not match the snapshot".into(),
            ));
        }
        let hw = write_hashes(&self.store, &self.meta.id, hashes)?;
        self.commit_streamed(hw)
    }

    /// Starts the block-hash list of this snapshot, to be filled in block order.
    pub(crate) fn hash_writer(&self) -> Result<HashWriter, StoreError> {
        HashWriter::create(
            &self.store,
            &self.meta.id,
            self.meta.block_size,
            self.meta.volume_size,
        )
    }

    /// Like `commit`, with a hash list streamed while the extents were added.
    pub(crate) fn commit_streamed(mut self, hashes: HashWriter) -> Result<Manifest, StoreError> {
        let result = self.commit_inner(hashes);
        if result.is_err() {
            self.discard();
        }
        result
    }

    fn commit_inner(&mut self, hashes: HashWriter) -> Result<Manifest, StoreError> {
        self.flush_pending()?;
        let delta = self
            .delta
            .take()
            .ok_or_else(|| StoreError::Invalid("snapshot writer already finished".into()))?;
        // The delta and the block-hash file are independent blobs: both are committed at
        // once, so that their fsyncs overlap. Either failing fails the commit (the caller
        // discards both; without a manifest neither means anything).
        let hashes_key = file_key(&self.meta.id, HASHES_FILE);
        let (summary, hashed) = thread::scope(|s| {
            let hash_commit = thread::Builder::new()
                .name("hashes-commit".into())
                .spawn_scoped(s, move || hashes.finish());
            let summary = delta.finish();
            let hashed = match hash_commit {
                Ok(h) => h.join().unwrap_or_else(|_| {
                    Err(StoreError::backend(
                        &hashes_key,
                        io::Error::other("block-hash file commit panicked"),
                    ))
                }),
                Err(e) => Err(StoreError::backend(&hashes_key, e)),
            };
            (summary, hashed)
        });
        let summary = summary?;
        hashed?;
        let m = &self.meta;
        let manifest = Manifest {
            id: m.id.clone(),
            volume_id: m.volume_id.clone(),
            volume_name: m.volume_name.clone(),
            name: m.name.clone(),
            description: m.description.clone(),
            owner: m.owner.clone(),
            parent: m.parent.clone(),
            volume_size: m.volume_size,
            block_size: m.block_size,
            snapshot_time: m.snapshot_time,
            create_time: now_unix(),
            freeze_ms: m.freeze_ms,
            consistency: m.consistency.clone(),
            stored_bytes: summary.payload_bytes,
            record_count: summary.record_count,
            generation: 0,
            delta_file: delta_name(0),
            delta_len: summary.len,
            delta_blake3: summary.blake3,
            hashes_file: HASHES_FILE.to_string(),
        };
        let _guard = self.store.lock();
        // The parent may have been deleted while we streamed: then this delta means nothing.
        if let Some(parent) = &manifest.parent {
            if self.store.is_deleting(parent)? {
                return Err(StoreError::NotFound { id: parent.clone() });
            }
            self.store.manifest(parent)?;
        }
        self.store.write_manifest(&manifest)?;
        Ok(manifest)
    }

    /// Removes whatever was written; the snapshot never existed.
    pub fn abort(mut self) {
        self.discard();
    }

    fn discard(&mut self) {
        self.delta = None;
        let dir = super::snap_dir(&self.meta.id);
        // Best effort: what stays behind has no manifest and `recover` removes it.
        if let Ok(keys) = self.store.backend().list(&dir) {
            for k in keys {
                let _ = self.store.backend().delete(&k);
            }
        }
    }
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        if self.delta.is_some() {
            self.discard();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::{Backend, BlobWriter, SharedMem};
    use super::*;

    /// A memory backend whose commit of blobs named `fail` fails, after a pause so that the
    /// other blob's commit runs meanwhile.
    #[derive(Debug)]
    struct FailCommit {
        inner: SharedMem,
        fail: &'static str,
    }

    struct FailWriter(Box<dyn BlobWriter>, bool);

    impl Write for FailWriter {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            self.0.flush()
        }
    }

    impl BlobWriter for FailWriter {
        fn commit(self: Box<Self>) -> io::Result<()> {
            if self.1 {
                thread::sleep(std::time::Duration::from_millis(20));
                return Err(io::Error::other("injected commit failure"));
            }
            self.0.commit()
        }
    }

    impl Backend for FailCommit {
        fn put(&self, key: &str) -> io::Result<Box<dyn BlobWriter>> {
            let fail = key.rsplit('/').next() == Some(self.fail);
            Ok(Box::new(FailWriter(self.inner.put(key)?, fail)))
        }
        fn read_at(&self, key: &str, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            self.inner.read_at(key, offset, buf)
        }
        fn size(&self, key: &str) -> io::Result<u64> {
            self.inner.size(key)
        }
        fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
            self.inner.list(prefix)
        }
        fn delete(&self, key: &str) -> io::Result<()> {
            self.inner.delete(key)
        }
    }

    #[test]
    fn a_failed_commit_of_either_blob_leaves_nothing_behind() {
        for fail in ["delta.0", "hashes", "nothing"] {
            let mem = SharedMem::new();
            let inner = mem.0.clone();
            let store = Store::with_backend(Arc::new(FailCommit { inner: mem, fail })).unwrap();
            let before = inner.total_bytes();
            let size = 1 << 20;
            let mut w = SnapshotWriter::begin(&store, meta(&sid(1), None, size, 4096)).unwrap();
            let data = vec![7u8; 8192];
            w.add_data(4096, &data).unwrap();
            let mut hashes = BlockHashes::zeros(4096, size);
            hashes.hashes[1] = hash_block(&data[..4096]);
            hashes.hashes[2] = hash_block(&data[4096..]);
            let result = w.commit(&hashes);
            if fail == "nothing" {
                result.unwrap();
                assert_eq!(store.list().unwrap().len(), 1);
                continue;
            }
            let err = result.unwrap_err();
            assert!(err.to_string().contains(fail), "{fail}: {err}");
            assert!(store.list().unwrap().is_empty(), "{fail}");
            assert_eq!(inner.total_bytes(), before, "{fail}: blobs left behind");
        }
    }
}

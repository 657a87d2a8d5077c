//! Streaming block-hash lists: a capture reads its parent's list and writes its own one block
//! at a time, in order, so memory does not grow with the volume.
//!
//! The reader checks the file's BLAKE3 trailer only at `finish`; a capture calls `finish`
//! before it commits, so a damaged parent list can never decide what a committed snapshot
//! leaves out.

use super::format::{self, HASHES_HEADER_LEN, HASH_LEN};
use super::writer::{is_zero, ZERO_HASH};
use super::{file_key, BlobWriter, Manifest, Store, StoreError, HASHES_FILE};
use crate::api::SnapshotId;
use std::io::Write;
use std::sync::mpsc;
use std::thread;

/// Hashes loaded per read.
const BATCH: u64 = 32 * 1024;
/// Batches the loader thread reads ahead of the reader.
const AHEAD: usize = 4;

/// Marks a block whose hash is not known: a short last block the volume has outgrown (as a
/// reader sees the list), or, in a stored list, a block an incremental stored only part of
/// (`capture_extents`). It never equals a real hash, so a capture always re-examines the
/// block, and restore checks it by its records' CRC32s alone.
pub const STALE_HASH: [u8; HASH_LEN] = [0xff; HASH_LEN];

/// What the loader thread sends: the next batch of the list's bytes, or why it stopped.
type Loaded = Result<Vec<u8>, StoreError>;

/// The hashes of one snapshot, read in ascending block order. A loader thread reads the
/// list ahead in large batches and checksums it, so that the reader neither waits for the
/// disk nor hashes.
pub(crate) struct HashReader {
    id: SnapshotId,
    key: String,
    count: u64,
    stale: Option<u64>,
    /// The hashes of the blocks from `buf_first` on, as bytes (one batch).
    buf: Vec<u8>,
    buf_first: u64,
    rx: Option<mpsc::Receiver<Loaded>>,
    /// Returns whether the list's checksum matched; `None` when it stopped early (its error,
    /// if any, was sent).
    loader: Option<thread::JoinHandle<Option<bool>>>,
}

impl HashReader {
    /// Opens `m`'s list as seen by a volume of `new_size` bytes (blocks past the old end are
    /// zero).
    pub fn open(store: &Store, m: &Manifest, new_size: u64) -> Result<HashReader, StoreError> {
        let key = file_key(&m.id, &m.hashes_file);
        let corrupt = |r: String| StoreError::corrupt(&m.id, &m.hashes_file, (0, m.volume_size), r);
        let len = match store.backend().size(&key) {
            Ok(l) => l,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(corrupt("block-hash file is missing".into()))
            }
            Err(e) => return Err(StoreError::backend(&key, e)),
        };
        if len < HASHES_HEADER_LEN {
            return Err(corrupt("block-hash file is truncated".into()));
        }
        let mut header = [0u8; HASHES_HEADER_LEN as usize];
        store
            .backend()
            .read_at(&key, 0, &mut header)
            .map_err(|e| StoreError::backend(&key, e))?;
        let (bs, size, count) =
            format::decode_hashes_header(&header, &m.id).map_err(|e| corrupt(e.0))?;
        if bs != m.block_size || size != m.volume_size {
            return Err(corrupt(
                "block-hash file disagrees with the manifest".into(),
            ));
        }
        if format::hashes_file_len(count) != Some(len) {
            return Err(corrupt(
                "block-hash file length does not match its block count".into(),
            ));
        }
        let bs = u64::from(bs);
        let stale = (size % bs != 0 && new_size > size).then_some(size / bs);
        let (tx, rx) = mpsc::sync_channel::<Loaded>(AHEAD);
        let loader = {
            let (store, k) = (store.clone(), key.clone());
            thread::Builder::new()
                .name("hashes-reader".into())
                .spawn(move || load(&store, &k, &header, count, &tx))
                .map_err(|e| StoreError::backend(&key, e))?
        };
        Ok(HashReader {
            id: m.id.clone(),
            key,
            count,
            stale,
            buf: Vec::new(),
            buf_first: 0,
            rx: Some(rx),
            loader: Some(loader),
        })
    }

    /// The first block after the loaded batch.
    fn buf_end(&self) -> u64 {
        self.buf_first + (self.buf.len() / HASH_LEN) as u64
    }

    /// Takes the next batch from the loader; only called while blocks remain.
    fn load_next(&mut self) -> Result<(), StoreError> {
        match self.rx.as_ref().map(|rx| rx.recv()) {
            Some(Ok(Ok(bytes))) => {
                self.buf_first = self.buf_end();
                self.buf = bytes;
                Ok(())
            }
            Some(Ok(Err(e))) => Err(e),
            _ => Err(StoreError::backend(
                &self.key,
                std::io::Error::other("block-hash loader stopped early"),
            )),
        }
    }

    /// Loads batches until block `i` (below `count`, not before the loaded batch) is in.
    fn load_to(&mut self, i: u64) -> Result<(), StoreError> {
        if i < self.buf_first {
            return Err(StoreError::Invalid(format!(
                "block hash {i} requested after {}",
                self.buf_first
            )));
        }
        while i >= self.buf_end() {
            self.load_next()?;
        }
        Ok(())
    }

    /// The hash of block `i`; calls must not go backwards past the loaded batch.
    pub fn get(&mut self, i: u64) -> Result<[u8; HASH_LEN], StoreError> {
        if Some(i) == self.stale {
            return Ok(STALE_HASH);
        }
        if i >= self.count {
            return Ok(ZERO_HASH);
        }
        self.load_to(i)?;
        let at = ((i - self.buf_first) as usize) * HASH_LEN;
        let mut h = [0u8; HASH_LEN];
        h.copy_from_slice(&self.buf[at..at + HASH_LEN]);
        Ok(h)
    }

    /// Appends the hashes of blocks `new.written()..until` to `new` (what `get` returns
    /// for each), whole batches at a time.
    pub fn copy_to(&mut self, new: &mut HashWriter, until: u64) -> Result<(), StoreError> {
        let mut i = new.written();
        while i < until {
            if Some(i) == self.stale {
                new.push(&[STALE_HASH])?;
                i += 1;
                continue;
            }
            if i >= self.count {
                return new.push_zeros(until - i);
            }
            self.load_to(i)?;
            let mut end = until.min(self.buf_end());
            if let Some(stale) = self.stale.filter(|&s| s > i) {
                end = end.min(stale);
            }
            let at = |b: u64| ((b - self.buf_first) as usize) * HASH_LEN;
            new.push_bytes(&self.buf[at(i)..at(end)])?;
            i = end;
        }
        Ok(())
    }

    /// Reads the rest and checks the trailer: only then were the hashes handed out trustworthy.
    pub fn finish(mut self) -> Result<(), StoreError> {
        if let Some(rx) = self.rx.take() {
            for loaded in rx {
                loaded?;
            }
        }
        let matched = match self.loader.take().map(|h| h.join()) {
            Some(Ok(Some(matched))) => matched,
            _ => {
                return Err(StoreError::backend(
                    &self.key,
                    std::io::Error::other("block-hash loader stopped early"),
                ))
            }
        };
        if !matched {
            return Err(StoreError::corrupt(
                &self.id,
                HASHES_FILE,
                (0, self.count),
                "block-hash file checksum mismatch",
            ));
        }
        Ok(())
    }
}

impl Drop for HashReader {
    fn drop(&mut self) {
        // Unfinished: the loader stops at its next send; wait for it (no read outlives us).
        self.rx = None;
        if let Some(h) = self.loader.take() {
            let _ = h.join();
        }
    }
}

/// The loader thread of a [`HashReader`]: sends the `count` hashes after `header` in
/// batches of [`BATCH`], checksumming them, then compares the trailer. Returns whether it
/// matched; `None` when the reader went away or a read failed (the error is sent).
fn load(
    store: &Store,
    key: &str,
    header: &[u8],
    count: u64,
    tx: &mpsc::SyncSender<Loaded>,
) -> Option<bool> {
    let mut hasher = blake3::Hasher::new();
    hasher.update(header);
    let mut first = 0u64;
    let stream = match store.backend().open_stream(key) {
        Ok(stream) => stream,
        Err(e) => {
            let _ = tx.send(Err(StoreError::backend(key, e)));
            return None;
        }
    };
    let read = |at: u64, buf: &mut [u8]| {
        stream
            .read_at(at, buf)
            .map_err(|e| StoreError::backend(key, e))
    };
    while first < count {
        let n = BATCH.min(count - first);
        let mut bytes = vec![0u8; (n as usize) * HASH_LEN];
        if let Err(e) = read(HASHES_HEADER_LEN + first * HASH_LEN as u64, &mut bytes) {
            let _ = tx.send(Err(e));
            return None;
        }
        hasher.update(&bytes);
        tx.send(Ok(bytes)).ok()?;
        first += n;
    }
    let mut trailer = [0u8; HASH_LEN];
    if let Err(e) = read(HASHES_HEADER_LEN + count * HASH_LEN as u64, &mut trailer) {
        let _ = tx.send(Err(e));
        return None;
    }
    Some(hasher.finalize().as_bytes() == &trailer)
}

/// Writes a snapshot's list one batch at a time; commit with `finish`.
pub(crate) struct HashWriter {
    key: String,
    w: Box<dyn BlobWriter>,
    hasher: blake3::Hasher,
    count: u64,
    written: u64,
    bytes: Vec<u8>,
    /// Bytes of the file so far (header and hashes).
    file_pos: u64,
}

impl HashWriter {
    pub fn create(
        store: &Store,
        id: &SnapshotId,
        block_size: u32,
        volume_size: u64,
    ) -> Result<HashWriter, StoreError> {
        let key = file_key(id, HASHES_FILE);
        let w = store
            .backend()
            .put(&key)
            .map_err(|e| StoreError::backend(&key, e))?;
        let count = volume_size.div_ceil(u64::from(block_size));
        let mut hw = HashWriter {
            key,
            w,
            hasher: blake3::Hasher::new(),
            count,
            written: 0,
            bytes: Vec::with_capacity(1 << 20),
            file_pos: 0,
        };
        let header = format::encode_hashes_header(id, block_size, volume_size, count);
        hw.raw(&header)?;
        Ok(hw)
    }

    fn raw(&mut self, b: &[u8]) -> Result<(), StoreError> {
        self.hasher.update(b);
        self.file_pos += b.len() as u64;
        self.w
            .write_all(b)
            .map_err(|e| StoreError::backend(&self.key, e))
    }

    /// Appends the hashes of the next blocks.
    pub fn push(&mut self, hashes: &[[u8; HASH_LEN]]) -> Result<(), StoreError> {
        self.push_bytes(hashes.as_flattened())
    }

    /// Appends hashes given as bytes (a multiple of `HASH_LEN`).
    pub fn push_bytes(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        let n = (bytes.len() / HASH_LEN) as u64;
        if bytes.len() % HASH_LEN != 0 || self.written + n > self.count {
            return Err(StoreError::Invalid("more block hashes than blocks".into()));
        }
        self.written += n;
        self.bytes.extend_from_slice(bytes);
        if self.bytes.len() >= 1 << 20 {
            self.flush()?;
        }
        Ok(())
    }

    /// Appends `n` all-zero block hashes.
    pub fn push_zeros(&mut self, n: u64) -> Result<(), StoreError> {
        static ZEROS: [[u8; HASH_LEN]; 1024] = [ZERO_HASH; 1024];
        let mut left = n;
        while left > 0 {
            let m = left.min(ZEROS.len() as u64);
            self.push(&ZEROS[..m as usize])?;
            left -= m;
        }
        Ok(())
    }

    /// Writes the buffered hashes. Whole 4 KiB pages of the file that hold only zero hashes
    /// (128 blocks reading as zeros: the empty part of a volume) are left as holes where the
    /// backend can: nothing to write back, nothing to read later.
    fn flush(&mut self) -> Result<(), StoreError> {
        let bytes = std::mem::take(&mut self.bytes);
        let r = self.write_sparse(&bytes);
        self.bytes = bytes;
        self.bytes.clear();
        r
    }

    fn write_sparse(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        const PAGE: usize = 4096;
        self.hasher.update(bytes);
        // Up to the first page boundary of the file, then page by page: runs of data pages
        // are written at once, runs of zero pages skipped at once.
        let mut at = (PAGE - (self.file_pos % PAGE as u64) as usize) % PAGE;
        at = at.min(bytes.len());
        let (mut run_start, mut run_zero) = (0usize, false);
        while at < bytes.len() {
            let end = (at + PAGE).min(bytes.len());
            let zero = end - at == PAGE && is_zero(&bytes[at..end]);
            if zero != run_zero && at > run_start {
                self.emit(&bytes[run_start..at], run_zero)?;
                run_start = at;
            }
            run_zero = zero;
            at = end;
        }
        self.emit(&bytes[run_start..], run_zero)
    }

    fn emit(&mut self, bytes: &[u8], zero: bool) -> Result<(), StoreError> {
        let written = if zero {
            self.w.append_zeros(bytes.len() as u64)
        } else {
            self.w.write_all(bytes)
        };
        written.map_err(|e| StoreError::backend(&self.key, e))?;
        self.file_pos += bytes.len() as u64;
        Ok(())
    }

    /// Blocks written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Writes the trailer and commits durably; every block must have its hash.
    pub fn finish(mut self) -> Result<(), StoreError> {
        if self.written != self.count {
            return Err(StoreError::Invalid(format!(
                "{} block hashes for {} blocks",
                self.written, self.count
            )));
        }
        self.flush()?;
        let sum = *self.hasher.finalize().as_bytes();
        self.w
            .write_all(&sum)
            .map_err(|e| StoreError::backend(&self.key, e))?;
        let key = self.key.clone();
        self.w.commit().map_err(|e| StoreError::backend(&key, e))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::{capture, capture_extents, format, DirtySet, NoProgress};
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn copy_to_equals_get_across_batches_a_stale_block_and_growth() {
        let (store, mem) = mem_store();
        let dir = tempfile::tempdir().unwrap();
        // 4 KiB blocks: 51,456 hashes (more than one loader batch), a short last block.
        let size = 201 * MIB + 1000;
        let img = sparse(dir.path(), "img", size);
        for (i, off) in [0, 3 * MIB, 130 * MIB, 200 * MIB, size - 900]
            .into_iter()
            .enumerate()
        {
            scribble(&img, off, 700, i as u64 + 1);
        }
        let m = capture(&store, meta(&sid(1), None, size, 4096), &img, &NoProgress).unwrap();
        // Seen by a volume grown by 3 blocks: the short last block is stale, the rest zero.
        let grown = size + 3 * 4096;
        let count = grown.div_ceil(4096);
        let mut by_get = HashReader::open(&store, &m, grown).unwrap();
        let want: Vec<_> = (0..count).map(|i| by_get.get(i).unwrap()).collect();
        by_get.finish().unwrap();
        assert_eq!(want[(size / 4096) as usize], STALE_HASH);
        assert_eq!(want.iter().filter(|h| **h != ZERO_HASH).count(), 5);
        // Copied in uneven steps, some single blocks pushed by hand, as a capture does.
        let mut r = HashReader::open(&store, &m, grown).unwrap();
        let mut w = HashWriter::create(&store, &sid(2), 4096, grown).unwrap();
        let mut at = 0u64;
        for step in [1, 0, 5000, 40_000, 7, 6440, 3, 1] {
            let until = (at + step).min(count);
            r.copy_to(&mut w, until).unwrap();
            assert_eq!(w.written(), until);
            if until < count {
                w.push(&[r.get(until).unwrap()]).unwrap();
                at = until + 1;
            } else {
                at = until;
            }
        }
        r.copy_to(&mut w, count).unwrap();
        r.finish().unwrap();
        w.finish().unwrap();
        let bytes = mem.get("snapshots/ss-00000002/hashes").unwrap();
        let (_, _, got) = format::decode_hashes(&bytes, &sid(2)).unwrap();
        assert_eq!(got.len(), want.len());
        assert!(got == want, "copied hashes differ from get()");
    }

    #[test]
    fn zero_hashes_of_an_empty_region_are_holes_in_the_file() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // 4 KiB blocks: data at the start and at 300 MiB of a 400 MiB volume, the rest empty.
        let size = 400 * MIB;
        let img = sparse(dir.path(), "img", size);
        scribble(&img, 0, 3 * MIB as usize, 1);
        scribble(&img, 300 * MIB + 5, 10_000, 2);
        let m = capture(&store, meta(&sid(1), None, size, 4096), &img, &NoProgress).unwrap();
        let path = dir.path().join("snapshots/ss-00000001/hashes");
        let md = std::fs::metadata(&path).unwrap();
        // 102,400 hashes: 3.2 MiB long, of which about 24 KiB hold data.
        assert_eq!(md.len(), format::hashes_file_len(size / 4096).unwrap());
        assert!(
            md.blocks() * 512 < 256 << 10,
            "{} bytes allocated",
            md.blocks() * 512
        );
        // It reads back whole, checksum and all; an incremental copies it faithfully.
        let hashes = store.block_hashes(&m).unwrap().hashes;
        assert_eq!(hashes.len(), 102_400);
        assert_eq!(hashes.iter().filter(|h| **h != ZERO_HASH).count(), 768 + 3);
        scribble(&img, 200 * MIB, 4096, 3);
        let dirty = std::slice::from_ref(&(200 * MIB..200 * MIB + 4096));
        let m2 = capture_extents(
            &store,
            meta(&sid(2), Some(&sid(1)), size, 4096),
            &img,
            dirty,
            DirtySet::Exact,
            &NoProgress,
        )
        .unwrap();
        let got = store.block_hashes(&m2).unwrap().hashes;
        assert_eq!(got.iter().filter(|h| **h != ZERO_HASH).count(), 768 + 3 + 1);
        assert!(store.verify(&sid(2), &NoProgress).unwrap().is_ok());
    }

    #[test]
    fn a_damaged_parent_list_fails_an_incremental_and_leaves_no_snapshot() {
        let (store, mem) = mem_store();
        let dir = tempfile::tempdir().unwrap();
        let size = 160 * MIB;
        let img = sparse(dir.path(), "img", size);
        scribble(&img, 5 * MIB, 10_000, 1);
        capture(&store, meta(&sid(1), None, size, 4096), &img, &NoProgress).unwrap();
        // One bit of a hash the incremental only copies (far from the dirty block).
        let key = "snapshots/ss-00000001/hashes";
        let mut b = mem.get(key).unwrap();
        let at = format::HASHES_HEADER_LEN as usize + 40_000 * HASH_LEN + 3;
        b[at] ^= 1;
        mem.set(key, b);
        scribble(&img, 150 * MIB, 4096, 2);
        // A range that did not change, and one that did.
        let dirty = [5 * MIB..5 * MIB + 4096, 150 * MIB..150 * MIB + 4096];
        let err = capture_extents(
            &store,
            meta(&sid(2), Some(&sid(1)), size, 4096),
            &img,
            &dirty,
            DirtySet::Exact,
            &NoProgress,
        )
        .unwrap_err();
        assert_eq!(err.kind(), crate::api::ErrorKind::Corrupt, "{err}");
        assert_eq!(store.list().unwrap().len(), 1);
        assert!(mem.get("snapshots/ss-00000002/manifest").is_none());
        assert!(mem.get("snapshots/ss-00000002/hashes").is_none());
    }
}

//! Streaming block-hash lists: a capture reads its parent's list and writes its own one block
//! at a time, in order, so memory does not grow with the volume.
//!
//! The reader checks the file's BLAKE3 trailer only at `finish`; a capture calls `finish`
//! before it commits, so a damaged parent list can never decide what a committed snapshot
//! leaves out.

use super::format::{self, HASHES_HEADER_LEN, HASH_LEN};
use super::writer::ZERO_HASH;
use super::{file_key, BlobWriter, Manifest, Store, StoreError, HASHES_FILE};
use crate::api::SnapshotId;
use std::io::Write;

/// Hashes loaded per read.
const BATCH: u64 = 32 * 1024;

/// Marks a block whose stored hash is stale (a short last block the volume has outgrown): it
/// never equals a real hash, so the block is always re-examined.
pub const STALE_HASH: [u8; HASH_LEN] = [0xff; HASH_LEN];

/// The hashes of one snapshot, read in ascending block order.
pub(crate) struct HashReader {
    store: Store,
    id: SnapshotId,
    key: String,
    count: u64,
    stale: Option<u64>,
    buf: Vec<[u8; HASH_LEN]>,
    buf_first: u64,
    hasher: blake3::Hasher,
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
        let mut hasher = blake3::Hasher::new();
        hasher.update(&header);
        Ok(HashReader {
            store: store.clone(),
            id: m.id.clone(),
            key,
            count,
            stale,
            buf: Vec::new(),
            buf_first: 0,
            hasher,
        })
    }

    fn load_next(&mut self) -> Result<bool, StoreError> {
        let first = self.buf_first + self.buf.len() as u64;
        let n = BATCH.min(self.count - first);
        if n == 0 {
            return Ok(false);
        }
        let mut bytes = vec![0u8; (n as usize) * HASH_LEN];
        self.store
            .backend()
            .read_at(
                &self.key,
                HASHES_HEADER_LEN + first * HASH_LEN as u64,
                &mut bytes,
            )
            .map_err(|e| StoreError::backend(&self.key, e))?;
        self.hasher.update(&bytes);
        self.buf.clear();
        self.buf.extend(bytes.chunks_exact(HASH_LEN).map(|c| {
            let mut a = [0u8; HASH_LEN];
            a.copy_from_slice(c);
            a
        }));
        self.buf_first = first;
        Ok(true)
    }

    /// The hash of block `i`; calls must not go backwards past the loaded batch.
    pub fn get(&mut self, i: u64) -> Result<[u8; HASH_LEN], StoreError> {
        if Some(i) == self.stale {
            return Ok(STALE_HASH);
        }
        if i >= self.count {
            return Ok(ZERO_HASH);
        }
        if i < self.buf_first {
            return Err(StoreError::Invalid(format!(
                "block hash {i} requested after {}",
                self.buf_first
            )));
        }
        while i >= self.buf_first + self.buf.len() as u64 {
            if !self.load_next()? {
                return Ok(ZERO_HASH);
            }
        }
        Ok(self.buf[(i - self.buf_first) as usize])
    }

    /// Reads the rest and checks the trailer: only then were the hashes handed out trustworthy.
    pub fn finish(mut self) -> Result<(), StoreError> {
        while self.load_next()? {}
        let mut trailer = [0u8; HASH_LEN];
        let at = HASHES_HEADER_LEN + self.count * HASH_LEN as u64;
        self.store
            .backend()
            .read_at(&self.key, at, &mut trailer)
            .map_err(|e| StoreError::backend(&self.key, e))?;
        if self.hasher.finalize().as_bytes() != &trailer {
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

/// Writes a snapshot's list one batch at a time; commit with `finish`.
pub(crate) struct HashWriter {
    key: String,
    w: Box<dyn BlobWriter>,
    hasher: blake3::Hasher,
    count: u64,
    written: u64,
    bytes: Vec<u8>,
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
        };
        let header = format::encode_hashes_header(id, block_size, volume_size, count);
        hw.raw(&header)?;
        Ok(hw)
    }

    fn raw(&mut self, b: &[u8]) -> Result<(), StoreError> {
        self.hasher.update(b);
        self.w
            .write_all(b)
            .map_err(|e| StoreError::backend(&self.key, e))
    }

    /// Appends the hashes of the next blocks.
    pub fn push(&mut self, hashes: &[[u8; HASH_LEN]]) -> Result<(), StoreError> {
        self.written += hashes.len() as u64;
        if self.written > self.count {
            return Err(StoreError::Invalid("more block hashes than blocks".into()));
        }
        for h in hashes {
            self.bytes.extend_from_slice(h);
        }
        if self.bytes.len() >= 1 << 20 {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        let bytes = std::mem::take(&mut self.bytes);
        let r = self.raw(&bytes);
        self.bytes = bytes;
        self.bytes.clear();
        r
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

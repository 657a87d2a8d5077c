//! Random access to a snapshot's point-in-time image, for lazy restore.
//!
//! [`ChainReader`] resolves a chain once into the extent map `restore` uses (newest record
//! wins) and keeps it, with the chain's indexes, in memory: one entry per record and per
//! visible piece, never per byte of the volume. `read_at` serves any byte range: zeros for
//! zero records and never-written bytes, payload bytes for data records. Every record is
//! read whole and its CRC32 checked before any of its bytes are returned, so a damaged
//! record is a `Corrupt` error naming the snapshot and byte range, never wrong data. A small
//! LRU of checked records (bounded in count and bytes) keeps sequential small reads from
//! re-reading a large record each time. Calls the store's record reading only.

use super::format::IndexEntry;
use super::restore::{extent_map, Piece, Src};
use super::{Manifest, Store, StoreError};
use crate::api::SnapshotId;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

/// Most records the cache holds.
const CACHE_RECORDS: usize = 16;
/// Most payload bytes the cache holds; a record bigger than this is not cached.
const CACHE_BYTES: usize = 64 << 20;

/// A checked record: (layer, record index) → record bytes, header included.
struct Cached {
    layer: usize,
    rec: usize,
    bytes: Arc<Vec<u8>>,
}

/// Reads the point-in-time image of one snapshot at any offset. `Send + Sync`: reads may
/// run from many threads at once (they share only the record cache).
pub struct ChainReader {
    store: Store,
    id: SnapshotId,
    size: u64,
    block_size: u32,
    chain: Vec<Manifest>,
    layers: Vec<Vec<IndexEntry>>,
    /// Visible pieces sorted by offset, non-overlapping; gaps read as zeros.
    pieces: Vec<Piece>,
    cache: Mutex<VecDeque<Cached>>,
}

impl std::fmt::Debug for ChainReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainReader")
            .field("id", &self.id)
            .field("size", &self.size)
            .field("layers", &self.chain.len())
            .field("pieces", &self.pieces.len())
            .finish()
    }
}

impl ChainReader {
    /// Resolves the chain ending at `id` (reading and checking every delta index once).
    #[tracing::instrument(skip_all, fields(snapshot = %id))]
    pub fn open(store: &Store, id: &SnapshotId) -> Result<ChainReader, StoreError> {
        let chain = store.chain(id)?;
        let leaf = chain
            .last()
            .ok_or_else(|| StoreError::NotFound { id: id.clone() })?;
        let (size, block_size) = (leaf.volume_size, leaf.block_size);
        let layers = chain
            .iter()
            .map(|m| store.delta_index(m))
            .collect::<Result<Vec<_>, _>>()?;
        let pieces = extent_map(&layers, size);
        Ok(ChainReader {
            store: store.clone(),
            id: id.clone(),
            size,
            block_size,
            chain,
            layers,
            pieces,
            cache: Mutex::new(VecDeque::new()),
        })
    }

    /// The snapshot this reader serves.
    pub fn id(&self) -> &SnapshotId {
        &self.id
    }

    /// The volume size at snapshot time.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The snapshot's store block size.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Index of the first piece ending after `offset`.
    fn first_piece(&self, offset: u64) -> usize {
        self.pieces.partition_point(|p| p.offset + p.len <= offset)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<u64, StoreError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(end),
            _ => Err(StoreError::Invalid(format!(
                "bytes {offset}..+{len} lie outside snapshot {} of {} bytes",
                self.id, self.size
            ))),
        }
    }

    /// Whether `[offset, offset + len)` reads as zeros without reading any record (only
    /// zero records and never-written bytes). Out-of-range bytes count as not zero.
    pub fn reads_as_zero(&self, offset: u64, len: u64) -> bool {
        let Ok(end) = self.check_range(offset, len) else {
            return false;
        };
        self.pieces[self.first_piece(offset)..]
            .iter()
            .take_while(|p| p.offset < end)
            .all(|p| p.src == Src::Zero)
    }

    /// Fills `buf` with the image bytes at `offset..offset + buf.len()`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StoreError> {
        let end = self.check_range(offset, buf.len() as u64)?;
        buf.fill(0);
        for p in self.pieces[self.first_piece(offset)..]
            .iter()
            .take_while(|p| p.offset < end)
        {
            let Src::Data { layer, rec } = p.src else {
                continue;
            };
            let s = p.offset.max(offset);
            let e = (p.offset + p.len).min(end);
            let entry = &self.layers[layer][rec];
            let bytes = self.record(layer, rec)?;
            let from = (super::format::RECORD_HEADER_LEN + s - entry.offset) as usize;
            let to = (s - offset) as usize;
            let n = (e - s) as usize;
            buf[to..to + n].copy_from_slice(&bytes[from..from + n]);
        }
        Ok(())
    }

    fn lock_cache(&self) -> MutexGuard<'_, VecDeque<Cached>> {
        // The cache only holds checked, immutable records: a poisoned one is still sound.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record `rec` of `layer`, read whole and CRC-checked, from the cache if there.
    fn record(&self, layer: usize, rec: usize) -> Result<Arc<Vec<u8>>, StoreError> {
        {
            let mut cache = self.lock_cache();
            if let Some(i) = cache.iter().position(|c| c.layer == layer && c.rec == rec) {
                if let Some(hit) = cache.remove(i) {
                    let bytes = Arc::clone(&hit.bytes);
                    cache.push_front(hit);
                    return Ok(bytes);
                }
            }
        }
        // Read outside the lock: other readers go on meanwhile (two may read one record).
        let mut buf = Vec::new();
        self.store
            .read_record(&self.chain[layer], &self.layers[layer][rec], &mut buf)?;
        let bytes = Arc::new(buf);
        if bytes.len() <= CACHE_BYTES {
            let mut cache = self.lock_cache();
            if !cache.iter().any(|c| c.layer == layer && c.rec == rec) {
                cache.push_front(Cached {
                    layer,
                    rec,
                    bytes: Arc::clone(&bytes),
                });
            }
            let mut total: usize = cache.iter().map(|c| c.bytes.len()).sum();
            while cache.len() > CACHE_RECORDS || total > CACHE_BYTES {
                match cache.pop_back() {
                    Some(old) => total -= old.bytes.len(),
                    None => break,
                }
            }
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::{capture, NoProgress};
    use super::*;
    use std::fs::File;
    use std::os::unix::fs::FileExt;

    const BS: u32 = 65536;
    const MIB: u64 = 1 << 20;

    fn snap(store: &Store, img: &File, n: u32, parent: Option<u32>, size: u64) -> Vec<u8> {
        let parent = parent.map(sid);
        capture(
            store,
            meta(&sid(n), parent.as_ref(), size, BS),
            img,
            &NoProgress,
        )
        .unwrap();
        let mut image = vec![0u8; size as usize];
        img.read_exact_at(&mut image, 0).unwrap();
        image
    }

    /// Deterministic pseudo-random ranges inside `size`, from 1 byte to 300 KB.
    fn ranges(size: u64, n: usize, seed: u64) -> Vec<(u64, usize)> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let len = 1 + ((x >> 33) % 300_000);
                let off = (x >> 11) % (size - len + 1);
                (off, len as usize)
            })
            .collect()
    }

    fn check(reader: &ChainReader, image: &[u8], seed: u64) {
        assert_eq!(reader.size(), image.len() as u64);
        let size = image.len() as u64;
        for (off, len) in ranges(size, 300, seed) {
            let mut buf = vec![0xa5u8; len];
            reader.read_at(&mut buf, off).unwrap();
            let want = &image[off as usize..off as usize + len];
            assert!(buf == want, "{} bytes at {off} differ", len);
        }
        // Sequential 4 KiB reads over everything (the hydrator's pattern, unaligned end).
        let mut pos = 0u64;
        let mut buf = vec![0u8; 4096];
        while pos < size {
            let n = (size - pos).min(4096) as usize;
            reader.read_at(&mut buf[..n], pos).unwrap();
            assert!(
                buf[..n] == image[pos as usize..pos as usize + n],
                "at {pos}"
            );
            pos += n as u64;
        }
    }

    #[test]
    fn random_ranges_equal_the_image_at_snapshot_time_along_a_chain_with_deletes() {
        let (store, _) = mem_store();
        let dir = tempfile::tempdir().unwrap();
        let size = 6 * MIB + 12345;
        let img = sparse(dir.path(), "image", size);
        scribble(&img, 0, 1_500_000, 1);
        scribble(&img, 4 * MIB + 7, 700_000, 2);
        let mut images = vec![snap(&store, &img, 1, None, size)];
        for n in 2..=5u32 {
            scribble(
                &img,
                u64::from(n) * 333_333,
                90_000 + n as usize * 1000,
                10 + n as u64,
            );
            // Zeros over data and a short write near the end.
            img.write_all_at(&vec![0u8; 200_000], u64::from(n) * 1_000_003)
                .unwrap();
            scribble(&img, size - 3000, 100, 20 + n as u64);
            images.push(snap(&store, &img, n, Some(n - 1), size));
        }
        for n in 1..=5u32 {
            let r = ChainReader::open(&store, &sid(n)).unwrap();
            check(&r, &images[n as usize - 1], u64::from(n));
        }
        // Deleting snapshots in the middle and at the root folds them; readers still match.
        store.delete(&sid(3), &NoProgress).unwrap();
        store.delete(&sid(1), &NoProgress).unwrap();
        for n in [2u32, 4, 5] {
            let r = ChainReader::open(&store, &sid(n)).unwrap();
            check(&r, &images[n as usize - 1], 100 + u64::from(n));
        }
        let r = ChainReader::open(&store, &sid(5)).unwrap();
        assert!(r.reads_as_zero(5 * MIB, 4096));
        assert!(!r.reads_as_zero(0, 4096));
        assert!(!r.reads_as_zero(size - 1, 2));
        let mut buf = [0u8; 2];
        assert!(matches!(
            r.read_at(&mut buf, size - 1),
            Err(StoreError::Invalid(_))
        ));
        assert!(matches!(
            ChainReader::open(&store, &sid(3)),
            Err(StoreError::NotFound { .. })
        ));
    }

    #[test]
    fn a_damaged_record_is_an_error_naming_snapshot_and_range_and_the_cache_is_bounded() {
        let (store, mem) = mem_store();
        let dir = tempfile::tempdir().unwrap();
        let size = 40 * MIB;
        let img = sparse(dir.path(), "image", size);
        scribble(&img, 0, size as usize, 1);
        let image = snap(&store, &img, 1, None, size);
        let r = ChainReader::open(&store, &sid(1)).unwrap();
        // Many records read once: the cache never holds more than its bound.
        check(&r, &image, 7);
        let cached = r.lock_cache();
        assert!(cached.len() <= CACHE_RECORDS);
        assert!(cached.iter().map(|c| c.bytes.len()).sum::<usize>() <= CACHE_BYTES);
        drop(cached);
        let m = store.manifest(&sid(1)).unwrap();
        let index = store.delta_index(&m).unwrap();
        let victim = index[3];
        // Flip one payload byte in the middle of record 3 (not cached by a fresh reader).
        let key = super::super::file_key(&m.id, &m.delta_file);
        let mut delta = mem.get(&key).unwrap();
        delta[(victim.file_pos + 32 + victim.length / 2) as usize] ^= 0x40;
        mem.set(&key, delta);
        let r = ChainReader::open(&store, &sid(1)).unwrap();
        let mut buf = vec![0u8; 4096];
        // Bytes outside the damaged record still read fine.
        r.read_at(&mut buf, index[0].offset).unwrap();
        assert!(buf[..] == image[..4096]);
        let err = r.read_at(&mut buf, victim.offset + 4096).unwrap_err();
        match &err {
            StoreError::Corrupt { id, start, end, .. } => {
                assert_eq!(id, &sid(1));
                assert_eq!((*start, *end), (victim.offset, victim.end()));
            }
            other => panic!("not Corrupt: {other:?}"),
        }
        assert_eq!(err.kind(), crate::api::ErrorKind::Corrupt);
        // The damage is reported on every read, never cached as data.
        assert!(r.read_at(&mut buf, victim.offset).is_err());
    }

    #[test]
    fn reader_is_send_sync_and_serves_concurrent_readers() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<ChainReader>();
        let (store, _) = mem_store();
        let dir = tempfile::tempdir().unwrap();
        let size = 8 * MIB;
        let img = sparse(dir.path(), "image", size);
        scribble(&img, MIB, 5 * MIB as usize, 3);
        let image = Arc::new(snap(&store, &img, 1, None, size));
        let r = Arc::new(ChainReader::open(&store, &sid(1)).unwrap());
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let (r, image) = (Arc::clone(&r), Arc::clone(&image));
                std::thread::spawn(move || check(&r, &image, 1000 + t))
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }
}

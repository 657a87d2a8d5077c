//! Helpers shared by the store's tests: sparse image files, metadata, hashing.

use super::*;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;

pub fn sid(n: u32) -> SnapshotId {
    format!("ss-{n:08}").parse().unwrap()
}

pub fn meta(id: &SnapshotId, parent: Option<&SnapshotId>, size: u64, bs: u32) -> SnapshotMeta {
    SnapshotMeta {
        id: id.clone(),
        volume_id: "vol-00000001".parse().unwrap(),
        volume_name: "data".into(),
        name: format!("snap {id}"),
        description: String::new(),
        owner: "root".into(),
        parent: parent.cloned(),
        volume_size: size,
        block_size: bs,
        snapshot_time: 1_700_000_000,
        freeze_ms: 3,
        consistency: "crash".into(),
    }
}

/// A sparse image of `size` bytes.
pub fn sparse(dir: &Path, name: &str, size: u64) -> File {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.join(name))
        .unwrap();
    f.set_len(size).unwrap();
    f
}

/// Writes `len` pseudo-random bytes (from `seed`) at `off`.
pub fn scribble(f: &File, off: u64, len: usize, seed: u64) {
    let mut buf = vec![0u8; len];
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.finalize_xof().fill(&mut buf);
    f.write_all_at(&buf, off).unwrap();
}

/// BLAKE3 of a whole file's contents plus its length.
pub fn digest(f: &File) -> (u64, String) {
    let len = f.metadata().unwrap().len();
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < len {
        let n = (buf.len() as u64).min(len - pos) as usize;
        f.read_exact_at(&mut buf[..n], pos).unwrap();
        h.update(&buf[..n]);
        pos += n as u64;
    }
    (len, h.finalize().to_hex().to_string())
}

/// Restores `id` into a fresh file and returns its digest.
pub fn restored(store: &Store, dir: &Path, id: &SnapshotId) -> Result<(u64, String), StoreError> {
    let f = sparse(dir, &format!("restore-{id}"), 0);
    store.restore(id, &f, RestoreMode::Fresh, &NoProgress)?;
    Ok(digest(&f))
}

pub fn mem_store() -> (Store, Arc<MemBackend>) {
    let mem = SharedMem::new();
    let inner = mem.0.clone();
    (Store::with_backend(Arc::new(mem)).unwrap(), inner)
}

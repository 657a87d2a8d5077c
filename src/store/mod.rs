//! The snapshot store: snapshots as manifests plus deltas of extent records over a `Backend`.
//!
//! Owns the on-disk format (`format`), chains of snapshots, capture (`capture`), change
//! detection from shared extents (`sharing`), writing
//! (`writer`, `hashes`), restore and verify (`restore`), random-access reads for lazy
//! restore (`reader`), delete-with-fold and crash recovery (`delete`), and the blob
//! storage underneath (`backend`). It is fed bytes from a
//! file and writes bytes to a file; it knows nothing of volumes as devices, HTTP, jobs or the
//! catalog, and calls the kernel-wrapper layer only for writeback hints (`sys::writeback`),
//! reflinks (`sys::reflink`) and extent maps (`sys::fiemap`); otherwise it uses `nix`'s safe
//! calls. Every
//! operation is blocking. `recover` must run before other work (at daemon start). Memory does
//! not grow with the volume: captures stream block-hash lists (`hashes`), restores hold the
//! extent map (one entry per visible piece) and a few records.
//!
//! Commit rule: a snapshot exists iff `snapshots/<id>/manifest` decodes and checks; its delta
//! and block-hash file are committed (durably) before the manifest. A `deleting` marker in a
//! snapshot's directory means a delete was committed and `recover()` finishes it.

pub mod backend;
pub mod capture;
mod delete;
pub mod format;
mod hashes;
mod reader;
pub mod restore;
pub mod sharing;
mod writer;

pub use backend::{Backend, BlobExtents, BlobStream, BlobWriter, FsBackend, MemBackend, SharedMem};
pub use capture::{capture, capture_extents, capture_ranges, DirtySet, ImageSource};
pub use delete::RecoveryReport;
pub use reader::ChainReader;
pub use restore::{RestoreMode, VerifyProblem, VerifyReport};
pub use sharing::{changed_by_sharing, ChangedRanges, Sharing};
pub use writer::{hash_block, BlockHashes, SnapshotWriter, ZERO_HASH};

use crate::api::{ErrorKind, SnapshotId, VolumeId};
use format::{FormatError, IndexEntry};
use serde::{Deserialize, Serialize};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// Progress of a long store operation, and its cancellation.
pub trait Progress: Sync {
    fn set_total(&self, bytes: u64);
    fn advance(&self, bytes: u64);
    fn cancelled(&self) -> bool {
        false
    }
}

/// A `Progress` that ignores everything.
pub struct NoProgress;

impl Progress for NoProgress {
    fn set_total(&self, _bytes: u64) {}
    fn advance(&self, _bytes: u64) {}
}

/// Errors of the store. Each names the snapshot and, where known, the file and byte range.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("Snapshot {id} not found")]
    NotFound { id: SnapshotId },
    #[error("Snapshot {id} already exists")]
    Exists { id: SnapshotId },
    #[error("Stored data of snapshot {id} failed its checks in {file} at bytes {start}..{end}: {reason}")]
    Corrupt {
        id: SnapshotId,
        file: String,
        start: u64,
        end: u64,
        reason: String,
    },
    #[error("I/O on {key} of the store failed")]
    Backend {
        key: String,
        #[source]
        source: io::Error,
    },
    #[error("I/O on the {what} at bytes {start}..{end} failed")]
    Image {
        what: &'static str,
        start: u64,
        end: u64,
        #[source]
        source: io::Error,
    },
    #[error("Cannot create the store directory {path}")]
    CreateStore {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a blocksnap store: {reason}")]
    ForeignStore { path: PathBuf, reason: String },
    #[error("Invalid request: {0}")]
    Invalid(String),
    #[error("Operation on snapshot {id} was cancelled")]
    Cancelled { id: SnapshotId },
    #[error("Cannot encode the manifest of snapshot {id}")]
    Encode {
        id: SnapshotId,
        #[source]
        source: serde_json::Error,
    },
}

impl StoreError {
    /// The stable kind that maps to the contract's `ret_code`.
    pub fn kind(&self) -> ErrorKind {
        match self {
            StoreError::NotFound { .. } => ErrorKind::NotFound,
            StoreError::Exists { .. } => ErrorKind::Busy,
            StoreError::Corrupt { .. } => ErrorKind::Corrupt,
            StoreError::Backend { source, .. } if source.kind() == io::ErrorKind::InvalidData => {
                ErrorKind::Corrupt
            }
            StoreError::Backend { .. }
            | StoreError::Image { .. }
            | StoreError::CreateStore { .. } => ErrorKind::Io,
            StoreError::ForeignStore { .. } | StoreError::Invalid(_) => ErrorKind::InvalidArgument,
            StoreError::Cancelled { .. } => ErrorKind::Unavailable,
            StoreError::Encode { .. } => ErrorKind::Internal,
        }
    }

    pub(crate) fn backend(key: &str, source: io::Error) -> StoreError {
        StoreError::Backend {
            key: key.to_string(),
            source,
        }
    }

    pub(crate) fn corrupt(
        id: &SnapshotId,
        file: &str,
        range: (u64, u64),
        reason: impl Into<String>,
    ) -> StoreError {
        StoreError::Corrupt {
            id: id.clone(),
            file: file.to_string(),
            start: range.0,
            end: range.1,
            reason: reason.into(),
        }
    }
}

/// What a caller states about a snapshot it is about to capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotMeta {
    pub id: SnapshotId,
    pub volume_id: VolumeId,
    pub volume_name: String,
    pub name: String,
    pub description: String,
    pub owner: String,
    pub parent: Option<SnapshotId>,
    pub volume_size: u64,
    pub block_size: u32,
    pub snapshot_time: i64,
    pub freeze_ms: u64,
    pub consistency: String,
}

/// A committed snapshot, self-describing: a catalog can be rebuilt from these alone.
/// Root and children are not stored; they are derived by walking `parent`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub id: SnapshotId,
    pub volume_id: VolumeId,
    pub volume_name: String,
    pub name: String,
    pub description: String,
    pub owner: String,
    pub parent: Option<SnapshotId>,
    pub volume_size: u64,
    pub block_size: u32,
    pub snapshot_time: i64,
    pub create_time: i64,
    pub freeze_ms: u64,
    pub consistency: String,
    /// Payload bytes held by this snapshot's own delta.
    pub stored_bytes: u64,
    pub record_count: u64,
    /// Generation of the delta (bumped when a deleted parent is folded in).
    pub generation: u32,
    pub delta_file: String,
    pub delta_len: u64,
    /// BLAKE3 of the whole delta file, hex; empty in manifests written since version 2 (the
    /// delta's own CRCs cover it), compared by verify when present.
    pub delta_blake3: String,
    pub hashes_file: String,
}

impl Manifest {
    /// True for a full snapshot (a delta against nothing).
    pub fn is_full(&self) -> bool {
        self.parent.is_none()
    }
}

pub(crate) const SNAPSHOTS: &str = "snapshots/";
pub(crate) const FORMAT_KEY: &str = "format";

pub(crate) fn snap_dir(id: &SnapshotId) -> String {
    format!("{SNAPSHOTS}{id}/")
}
pub(crate) fn manifest_key(id: &SnapshotId) -> String {
    format!("{SNAPSHOTS}{id}/manifest")
}
pub(crate) fn deleting_key(id: &SnapshotId) -> String {
    format!("{SNAPSHOTS}{id}/deleting")
}
pub(crate) fn file_key(id: &SnapshotId, file: &str) -> String {
    format!("{SNAPSHOTS}{id}/{file}")
}
pub(crate) fn delta_name(generation: u32) -> String {
    format!("delta.{generation}")
}
pub(crate) const HASHES_FILE: &str = "hashes";

/// The snapshot store. Cheap to clone; all clones share one backend, a short lock around
/// metadata changes (commits, attribute changes, a delete's marker and manifest switches) and
/// a lock that lets one delete or recovery run at a time.
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    backend: Arc<dyn Backend>,
    meta_lock: Mutex<()>,
    delete_lock: Mutex<()>,
}

/// Writes the current `format` blob (durably, like every blob).
fn write_format(backend: &dyn Backend) -> Result<(), StoreError> {
    let fail = |e| StoreError::backend(FORMAT_KEY, e);
    let mut w = backend.put(FORMAT_KEY).map_err(fail)?;
    w.write_all(format::FORMAT_FILE_CONTENT).map_err(fail)?;
    w.commit().map_err(fail)
}

impl Store {
    /// Opens (creating if missing) a store directory on the filesystem backend. A directory
    /// that holds something other than a blocksnap store is refused.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let foreign = |reason: String| StoreError::ForeignStore {
            path: path.to_path_buf(),
            reason,
        };
        match std::fs::read_dir(path) {
            Ok(mut entries) => {
                let has_format = path.join(FORMAT_KEY).exists();
                if !has_format && entries.next().is_some() {
                    return Err(foreign("it is not empty and has no format file".into()));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::create_dir_all(path).map_err(|e| StoreError::CreateStore {
                    path: path.to_path_buf(),
                    source: e,
                })?;
            }
            Err(e) => return Err(StoreError::backend(&path.display().to_string(), e)),
        }
        Store::with_backend(Arc::new(FsBackend::new(path))).map_err(|e| match e {
            StoreError::Invalid(reason) => foreign(reason),
            e => e,
        })
    }

    /// Opens a store on any backend; writes the `format` blob to an empty one.
    pub fn with_backend(backend: Arc<dyn Backend>) -> Result<Store, StoreError> {
        match backend::read_all(backend.as_ref(), FORMAT_KEY, 4096) {
            Ok(bytes) if bytes == format::FORMAT_FILE_CONTENT => {}
            Ok(bytes)
                if bytes == format::FORMAT_FILE_V1
                    || bytes == format::FORMAT_FILE_V2
                    || bytes == format::FORMAT_FILE_V3 =>
            {
                // Older files stay readable; mark the store so that a binary knowing only an
                // older version refuses it rather than misreading the manifests (version 2),
                // deltas (delta version 2, alignment gaps) and block-hash lists ("not known"
                // entries) written from now on.
                write_format(backend.as_ref())?;
            }
            Ok(_) => return Err(StoreError::Invalid("unknown format file".into())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let existing = backend
                    .list("")
                    .map_err(|e| StoreError::backend(FORMAT_KEY, e))?;
                if !existing.is_empty() {
                    return Err(StoreError::Invalid(
                        "it holds data but no format file".into(),
                    ));
                }
                write_format(backend.as_ref())?;
            }
            Err(e) => return Err(StoreError::backend(FORMAT_KEY, e)),
        }
        Ok(Store {
            inner: Arc::new(Inner {
                backend,
                meta_lock: Mutex::new(()),
                delete_lock: Mutex::new(()),
            }),
        })
    }

    pub(crate) fn backend(&self) -> &dyn Backend {
        self.inner.backend.as_ref()
    }

    /// Serializes deletes and recovery (one fold at a time); held for their whole duration,
    /// while `lock` is held only around short metadata changes.
    pub(crate) fn delete_lock(&self) -> MutexGuard<'_, ()> {
        self.inner
            .delete_lock
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, ()> {
        // The guarded data is `()`: a poisoned lock protects nothing that could be torn.
        self.inner
            .meta_lock
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Every snapshot id that has a directory in the store (committed or not).
    pub(crate) fn snapshot_dirs(&self) -> Result<Vec<SnapshotId>, StoreError> {
        let keys = self
            .backend()
            .list(SNAPSHOTS)
            .map_err(|e| StoreError::backend(SNAPSHOTS, e))?;
        let mut ids: Vec<SnapshotId> = keys
            .iter()
            .filter_map(|k| k.strip_prefix(SNAPSHOTS)?.split('/').next()?.parse().ok())
            .collect();
        ids.dedup();
        Ok(ids)
    }

    /// Committed snapshots, excluding those whose delete is under way.
    pub fn list(&self) -> Result<Vec<Manifest>, StoreError> {
        let mut out = Vec::new();
        for id in self.snapshot_dirs()? {
            if self.is_deleting(&id)? {
                continue;
            }
            match self.manifest(&id) {
                Ok(m) => out.push(m),
                // Unfinished (no manifest) or damaged: not committed, not listed. `recover`
                // removes the first and reports the second.
                Err(StoreError::NotFound { .. }) | Err(StoreError::Corrupt { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    pub(crate) fn is_deleting(&self, id: &SnapshotId) -> Result<bool, StoreError> {
        let key = deleting_key(id);
        match self.backend().size(&key) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(StoreError::backend(&key, e)),
        }
    }

    /// The manifest of one committed snapshot.
    pub fn manifest(&self, id: &SnapshotId) -> Result<Manifest, StoreError> {
        let key = manifest_key(id);
        let bytes = match backend::read_all(self.backend(), &key, 2 << 20) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound { id: id.clone() })
            }
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                return Err(StoreError::corrupt(id, "manifest", (0, 0), e.to_string()))
            }
            Err(e) => return Err(StoreError::backend(&key, e)),
        };
        let len = bytes.len() as u64;
        let corrupt = |r: String| StoreError::corrupt(id, "manifest", (0, len), r);
        let (version, body) =
            format::decode_manifest_versioned(&bytes).map_err(|FormatError(r)| corrupt(r))?;
        let m: Manifest =
            serde_json::from_slice(body).map_err(|e| corrupt(format!("bad manifest body: {e}")))?;
        // Version 1 always recorded the delta's BLAKE3; an empty one there is a forgery.
        if version == 1 && m.delta_blake3.len() != 64 {
            return Err(corrupt(
                "version-1 manifest without the delta's BLAKE3".into(),
            ));
        }
        if &m.id != id {
            return Err(corrupt(format!("manifest names snapshot {}", m.id)));
        }
        if !(4096..=4 << 20).contains(&m.block_size) || !m.block_size.is_power_of_two() {
            return Err(corrupt(format!("block size {} is invalid", m.block_size)));
        }
        if m.delta_file != delta_name(m.generation) || m.hashes_file != HASHES_FILE {
            return Err(corrupt("manifest names unexpected files".into()));
        }
        Ok(m)
    }

    /// The chain from the root (a full snapshot) to `id`, root first.
    pub fn chain(&self, id: &SnapshotId) -> Result<Vec<Manifest>, StoreError> {
        let mut out = vec![self.manifest(id)?];
        while let Some(parent) = out.last().and_then(|m| m.parent.clone()) {
            if out.len() > 100_000 || out.iter().any(|m| m.id == parent) {
                return Err(StoreError::corrupt(
                    id,
                    "manifest",
                    (0, 0),
                    "the chain of parents loops",
                ));
            }
            let m = match self.manifest(&parent) {
                Ok(m) => m,
                Err(StoreError::NotFound { .. }) => {
                    return Err(StoreError::corrupt(
                        id,
                        "manifest",
                        (0, 0),
                        format!("parent {parent} is missing"),
                    ))
                }
                Err(e) => return Err(e),
            };
            out.push(m);
        }
        out.reverse();
        Ok(out)
    }

    /// Writes a manifest durably (it replaces any previous one atomically).
    pub(crate) fn write_manifest(&self, m: &Manifest) -> Result<(), StoreError> {
        let key = manifest_key(&m.id);
        let body = serde_json::to_vec_pretty(m).map_err(|e| StoreError::Encode {
            id: m.id.clone(),
            source: e,
        })?;
        let bytes = format::encode_manifest(&body);
        let mut w = self
            .backend()
            .put(&key)
            .map_err(|e| StoreError::backend(&key, e))?;
        w.write_all(&bytes)
            .map_err(|e| StoreError::backend(&key, e))?;
        w.commit().map_err(|e| StoreError::backend(&key, e))
    }

    /// Changes a snapshot's name and/or description by an atomic manifest rewrite.
    pub fn set_attributes(
        &self,
        id: &SnapshotId,
        name: Option<&str>,
        description: Option<&str>,
    ) -> Result<Manifest, StoreError> {
        let _guard = self.lock();
        if self.is_deleting(id)? {
            return Err(StoreError::NotFound { id: id.clone() });
        }
        let mut m = self.manifest(id)?;
        if let Some(n) = name {
            m.name = n.to_string();
        }
        if let Some(d) = description {
            m.description = d.to_string();
        }
        self.write_manifest(&m)?;
        Ok(m)
    }

    /// Reads and checks the index of a snapshot's delta.
    pub(crate) fn delta_index(&self, m: &Manifest) -> Result<Vec<IndexEntry>, StoreError> {
        let key = file_key(&m.id, &m.delta_file);
        let file = m.delta_file.as_str();
        let len = match self.backend().size(&key) {
            Ok(l) => l,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::corrupt(
                    &m.id,
                    file,
                    (0, m.volume_size),
                    "delta file is missing",
                ))
            }
            Err(e) => return Err(StoreError::backend(&key, e)),
        };
        // Structural damage affects the whole image; the reason names the file bytes.
        let corrupt = |range: (u64, u64), r: String| {
            let r = format!("{r} (file bytes {}..{})", range.0, range.1);
            StoreError::corrupt(&m.id, file, (0, m.volume_size), r)
        };
        if len != m.delta_len {
            return Err(corrupt(
                (0, len),
                format!("delta is {len} bytes, the manifest says {}", m.delta_len),
            ));
        }
        if len < format::DELTA_HEADER_LEN + format::FOOTER_LEN {
            return Err(corrupt((0, len), "delta file is truncated".into()));
        }
        let read = |pos: u64, buf: &mut [u8]| -> Result<(), StoreError> {
            self.backend()
                .read_at(&key, pos, buf)
                .map_err(|e| StoreError::backend(&key, e))
        };
        let mut header = [0u8; 32];
        read(0, &mut header)?;
        let version = format::decode_delta_header(&header, &m.id)
            .map_err(|FormatError(r)| corrupt((0, 32), r))?;
        let mut footer_bytes = [0u8; 40];
        let fpos = len - format::FOOTER_LEN;
        read(fpos, &mut footer_bytes)?;
        let footer = format::decode_footer(&footer_bytes, len)
            .map_err(|FormatError(r)| corrupt((fpos, len), r))?;
        if footer.record_count != m.record_count || footer.payload_bytes != m.stored_bytes {
            return Err(corrupt(
                (fpos, len),
                "record count or payload size differs from the manifest".into(),
            ));
        }
        let mut index = vec![0u8; (fpos - footer.index_pos) as usize];
        read(footer.index_pos, &mut index)?;
        format::decode_index_versioned(version, &index, &footer_bytes, &footer, m.volume_size)
            .map_err(|FormatError(r)| corrupt((footer.index_pos, len), r))
    }

    /// Reads one record into `buf` (resized), checks its header and CRC32, returns the payload.
    pub(crate) fn read_record<'b>(
        &self,
        m: &Manifest,
        e: &IndexEntry,
        buf: &'b mut Vec<u8>,
    ) -> Result<&'b [u8], StoreError> {
        let key = file_key(&m.id, &m.delta_file);
        let image = (e.offset, e.end());
        let corrupt = |r: String| StoreError::corrupt(&m.id, &m.delta_file, image, r);
        let plen = e.payload_len() as usize;
        buf.resize(format::RECORD_HEADER_LEN as usize + plen, 0);
        self.backend()
            .read_at(&key, e.file_pos, buf)
            .map_err(|err| match err.kind() {
                io::ErrorKind::UnexpectedEof => corrupt("record is truncated".into()),
                _ => StoreError::backend(&key, err),
            })?;
        format::check_record_header(&buf[..32], e).map_err(|FormatError(r)| corrupt(r))?;
        let crc = format::record_crc(
            &format::id_bytes(&m.id),
            e.offset,
            e.length,
            e.kind,
            &buf[32..],
        );
        if crc != e.crc {
            return Err(corrupt("record CRC32 mismatch".into()));
        }
        Ok(&buf[32..])
    }
}

pub(crate) fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod test_util;
#[cfg(test)]
mod tests;

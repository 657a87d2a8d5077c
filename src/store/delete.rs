//! Deleting snapshots anywhere in a chain, and crash recovery.
//!
//! Delete protocol for snapshot S with parent P (or none) and children C…:
//! 1. write the `deleting` marker in S's directory (from here on the delete is committed and
//!    S is no longer listed);
//! 2. for each child C: write a new delta generation holding C's records plus S's records that
//!    C does not overwrite (re-checksummed under C's id), then atomically rewrite C's manifest
//!    with the new delta and `parent = P`, then remove C's old delta;
//! 3. remove S's manifest, then the rest of its directory.
//!
//! A crash anywhere leaves every listed snapshot restorable: a child points either at its old
//! delta and S (still on disk) or at its new delta and P. `recover` removes files no manifest
//! names, removes directories without a manifest (unfinished snapshots) and re-runs step 2–3
//! for every snapshot that has a marker — each step is idempotent. A child's record that fails
//! its CRC stops the fold and withdraws the marker: damaged data is never copied forward.
//!
//! One delete (or recovery) runs at a time; the metadata lock is taken only around the marker
//! and each manifest switch, so other snapshots commit while a fold streams. A restore that
//! reads a child's old delta while it is being replaced fails with an I/O error rather than
//! reading anything wrong; the daemon serializes work per volume, which makes that rare.

use super::backend::TMP_MARK;
use super::format::{IndexEntry, RecordKind};
use super::restore::Coverage;
use super::writer::DeltaWriter;
use super::{
    deleting_key, delta_name, file_key, manifest_key, snap_dir, Manifest, Progress, Store,
    StoreError,
};
use crate::api::SnapshotId;
use std::io::Write;

/// What `recover` found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Unfinished snapshots (no manifest) whose leftovers were removed.
    pub removed: Vec<SnapshotId>,
    /// Interrupted deletes that were finished.
    pub deleted: Vec<SnapshotId>,
    /// Stray files removed from committed snapshots (temporaries, old delta generations).
    pub stale_files: Vec<String>,
    /// Snapshots whose manifest fails its checks; left in place for an operator.
    pub corrupt: Vec<SnapshotId>,
    /// Interrupted deletes that damaged data kept from finishing (rolled back), with why.
    pub failed_deletes: Vec<(SnapshotId, String)>,
}

impl Store {
    /// Deletes a snapshot; its children absorb what they still need from it.
    #[tracing::instrument(skip_all, fields(snapshot = %id))]
    pub fn delete(&self, id: &SnapshotId, progress: &dyn Progress) -> Result<(), StoreError> {
        let _one_delete = self.delete_lock();
        let m = {
            // Under the metadata lock no new child can commit between the checks and the
            // marker; after the marker, commits with this parent are refused.
            let _guard = self.lock();
            let m = self.manifest(id)?;
            // Refuse up front when the fold cannot even start: nothing has changed yet.
            self.delta_index(&m)?;
            for child in self.children(id)? {
                self.delta_index(&child)?;
            }
            if !self.is_deleting(id)? {
                let key = deleting_key(id);
                let mut w = self
                    .backend()
                    .put(&key)
                    .map_err(|e| StoreError::backend(&key, e))?;
                w.write_all(b"deleting\n")
                    .map_err(|e| StoreError::backend(&key, e))?;
                w.commit().map_err(|e| StoreError::backend(&key, e))?;
            }
            m
        };
        self.finish_or_roll_back(&m, progress)
    }

    /// Finishes a delete; when damaged data makes that impossible, withdraws the marker so the
    /// snapshot is listed again (children already folded no longer need it; the rest still do).
    fn finish_or_roll_back(&self, m: &Manifest, progress: &dyn Progress) -> Result<(), StoreError> {
        match self.finish_delete(m, progress) {
            Err(e) if e.kind() == crate::api::ErrorKind::Corrupt => {
                let key = deleting_key(&m.id);
                self.backend()
                    .delete(&key)
                    .map_err(|e| StoreError::backend(&key, e))?;
                Err(e)
            }
            other => other,
        }
    }

    /// Snapshots (committed, including ones being deleted) whose parent is `id`.
    fn children(&self, id: &SnapshotId) -> Result<Vec<Manifest>, StoreError> {
        let mut out = Vec::new();
        for c in self.snapshot_dirs()? {
            match self.manifest(&c) {
                Ok(m) if m.parent.as_ref() == Some(id) => out.push(m),
                Ok(_) | Err(StoreError::NotFound { .. }) => {}
                // A child we cannot read would lose its parent: stop before removing anything.
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    fn finish_delete(&self, m: &Manifest, progress: &dyn Progress) -> Result<(), StoreError> {
        let children = self.children(&m.id)?;
        let index = self.delta_index(m)?;
        progress.set_total(m.delta_len * children.len() as u64 + 1);
        for child in &children {
            self.fold_into(m, &index, child, progress)?;
        }
        // The manifest goes first: from then on the directory is a leftover.
        let key = manifest_key(&m.id);
        {
            let _guard = self.lock();
            self.backend()
                .delete(&key)
                .map_err(|e| StoreError::backend(&key, e))?;
        }
        self.remove_dir(&m.id)?;
        progress.advance(1);
        Ok(())
    }

    fn remove_dir(&self, id: &SnapshotId) -> Result<(), StoreError> {
        let dir = snap_dir(id);
        let keys = self
            .backend()
            .list(&dir)
            .map_err(|e| StoreError::backend(&dir, e))?;
        // The marker last, so an interrupted removal is still recognisable.
        let (marker, rest): (Vec<_>, Vec<_>) =
            keys.into_iter().partition(|k| *k == deleting_key(id));
        for k in rest.into_iter().chain(marker) {
            self.backend()
                .delete(&k)
                .map_err(|e| StoreError::backend(&k, e))?;
        }
        Ok(())
    }

    /// Writes `child`'s next delta generation with `parent`'s visible records folded in and
    /// switches the child's manifest to it.
    fn fold_into(
        &self,
        parent: &Manifest,
        parent_index: &[IndexEntry],
        child: &Manifest,
        progress: &dyn Progress,
    ) -> Result<(), StoreError> {
        let child_index = self.delta_index(child)?;
        let size = child.volume_size;
        let mut covered = Coverage::default();
        for e in &child_index {
            covered.insert(e.offset, e.end());
        }
        // Parent pieces the child does not overwrite: (offset, len, parent record).
        let mut pieces: Vec<(u64, u64, usize)> = Vec::new();
        for (i, e) in parent_index.iter().enumerate() {
            let end = e.end().min(size);
            if e.offset < end {
                covered.uncovered(e.offset, end, |s, t| pieces.push((s, t - s, i)));
            }
        }
        let generation = child.generation + 1;
        let mut out = DeltaWriter::create(self, &child.id, generation)?;
        let (mut pbuf, mut cbuf) = (Vec::new(), Vec::new());
        let mut cached: Option<usize> = None;
        let (mut pi, mut ci) = (0usize, 0usize);
        while pi < pieces.len() || ci < child_index.len() {
            let take_parent = match (pieces.get(pi), child_index.get(ci)) {
                (Some(p), Some(c)) => p.0 < c.offset,
                (Some(_), None) => true,
                _ => false,
            };
            if take_parent {
                let (off, len, rec) = pieces[pi];
                let e = &parent_index[rec];
                match e.kind {
                    RecordKind::Zero => out.record(off, len, RecordKind::Zero, &[])?,
                    RecordKind::Data => {
                        if cached != Some(rec) {
                            self.read_record(parent, e, &mut pbuf)?;
                            cached = Some(rec);
                            progress.advance(32 + e.length);
                        }
                        let from = (32 + off - e.offset) as usize;
                        out.record(off, len, RecordKind::Data, &pbuf[from..from + len as usize])?;
                    }
                }
                pi += 1;
            } else {
                let e = &child_index[ci];
                let payload = self.read_record(child, e, &mut cbuf)?;
                out.record(e.offset, e.length, e.kind, payload)?;
                ci += 1;
            }
        }
        let summary = out.finish()?;
        let old_delta = file_key(&child.id, &child.delta_file);
        let guard = self.lock();
        // Re-read: the child's name or description may have changed during the fold.
        let mut next = self.manifest(&child.id)?;
        if next.generation != child.generation || next.parent.as_ref() != Some(&parent.id) {
            return Err(StoreError::Invalid(format!(
                "snapshot {} changed while {} was folded into it",
                child.id, parent.id
            )));
        }
        next.parent = parent.parent.clone();
        next.generation = generation;
        next.delta_file = delta_name(generation);
        next.delta_len = summary.len;
        next.delta_blake3 = summary.blake3;
        next.record_count = summary.record_count;
        next.stored_bytes = summary.payload_bytes;
        self.write_manifest(&next)?;
        drop(guard);
        self.backend()
            .delete(&old_delta)
            .map_err(|e| StoreError::backend(&old_delta, e))
    }

    /// Brings the store to a consistent state after a crash; call before any other work.
    #[tracing::instrument(skip_all)]
    pub fn recover(&self) -> Result<RecoveryReport, StoreError> {
        let _one_delete = self.delete_lock();
        let guard = self.lock();
        let mut report = RecoveryReport::default();
        let mut pending_deletes = Vec::new();
        // Temporaries of unfinished writes, anywhere in the store.
        let all = self
            .backend()
            .list("")
            .map_err(|e| StoreError::backend("", e))?;
        for k in all.iter().filter(|k| k.contains(TMP_MARK)) {
            self.backend()
                .delete(k)
                .map_err(|e| StoreError::backend(k, e))?;
            report.stale_files.push(k.clone());
        }
        for id in self.snapshot_dirs()? {
            let dir = snap_dir(&id);
            let keys = self
                .backend()
                .list(&dir)
                .map_err(|e| StoreError::backend(&dir, e))?;
            match self.manifest(&id) {
                Ok(m) if self.is_deleting(&id)? => pending_deletes.push(m),
                Ok(m) => {
                    let keep = [
                        manifest_key(&id),
                        file_key(&id, &m.delta_file),
                        file_key(&id, &m.hashes_file),
                    ];
                    for k in &keys {
                        if !keep.contains(k) {
                            self.backend()
                                .delete(k)
                                .map_err(|e| StoreError::backend(k, e))?;
                            report.stale_files.push(k.clone());
                        }
                    }
                }
                Err(StoreError::NotFound { .. }) => {
                    let was_deleting = self.is_deleting(&id)?;
                    self.remove_dir(&id)?;
                    if was_deleting {
                        report.deleted.push(id);
                    } else {
                        report.removed.push(id);
                    }
                }
                Err(StoreError::Corrupt { .. }) => report.corrupt.push(id),
                Err(e) => return Err(e),
            }
        }
        // Folding takes the metadata lock itself, step by step.
        drop(guard);
        for m in pending_deletes {
            match self.finish_or_roll_back(&m, &super::NoProgress) {
                Ok(()) => report.deleted.push(m.id),
                Err(e) if e.kind() == crate::api::ErrorKind::Corrupt => {
                    report.failed_deletes.push((m.id, e.to_string()))
                }
                Err(e) => return Err(e),
            }
        }
        Ok(report)
    }
}

//! Taking one snapshot of a loop volume: quiesce, capture the point-in-time image, stream it
//! into the store, and record the result.
//!
//! Writers are held only while the point-in-time image is made. Where the state dir is on a
//! reflink filesystem (xfs, btrfs) that is one FICLONE of the backing image — milliseconds
//! whatever the size — and the delta is streamed from the clone after the thaw (an incremental
//! reads only the blocks that no longer share extents with the parent's deltas, see
//! `capture_clone`). Elsewhere the
//! only honest option is to read the image while frozen, so `freeze_ms` grows with the data;
//! `freeze_timeout` bounds it: a watchdog thaws and the job fails saying why.

use super::jobs::JobProgress;
use super::manager::Manager;
use crate::api::{ApiError, ErrorKind, SnapshotId, VolumeId};
use crate::catalog::{now, SnapshotRow};
use crate::quiesce::{FreezeSet, QuiesceError, Watchdog};
use crate::store::SnapshotMeta;
use crate::volume;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A reflink clone of a backing image, removed when dropped.
struct ImageClone {
    path: PathBuf,
    file: File,
}

impl Drop for ImageClone {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Tries FICLONE of `image` into the state dir's tmp directory: `None` where the filesystem
/// cannot share extents.
fn reflink_clone(image: &File, tmp_dir: &Path, id: &str) -> Result<Option<ImageClone>, ApiError> {
    let path = tmp_dir.join(format!("{id}.clone"));
    let _ = std::fs::remove_file(&path);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| {
            ApiError::new(
                ErrorKind::Io,
                format!("cannot create {}: {e}", path.display()),
            )
        })?;
    let clone = ImageClone { path, file };
    match crate::sys::reflink::ficlone(image, &clone.file) {
        Ok(()) => Ok(Some(clone)),
        Err(e) if e.is_not_supported() => Ok(None),
        Err(e) => Err(ApiError::new(
            e.kind(),
            format!("cannot clone the backing image: {e}"),
        )),
    }
}

/// Writers held on a volume's filesystems: thawed by `release`, or by `Drop` on any early
/// exit, and by the watchdog at `freeze_timeout` whatever the capture is doing.
struct Hold<'a> {
    manager: &'a Manager,
    set: Option<FreezeSet>,
    watchdog: Option<Watchdog>,
    mountpoints: Vec<PathBuf>,
    timeout: Duration,
}

impl<'a> Hold<'a> {
    fn frozen(&self) -> bool {
        self.set.is_some()
    }

    /// Thaws and returns how long writers were held; fails if the watchdog had to thaw.
    fn release(&mut self) -> Result<u64, ApiError> {
        let Some(set) = self.set.take() else {
            return Ok(0);
        };
        if let Some(w) = self.watchdog.take() {
            w.disarm();
        }
        let thawed = set.thaw();
        for mp in &self.mountpoints {
            let mp = mp.to_string_lossy();
            if let Err(e) = self.manager.with_catalog(|c| c.clear_frozen(&mp)) {
                tracing::error!(mountpoint = %mp, error = %e.message, "cannot clear the freeze journal");
            }
        }
        match thawed {
            Ok(held) => Ok(held.as_millis().max(1) as u64),
            Err(QuiesceError::WatchdogFired { .. }) => Err(ApiError::new(
                ErrorKind::Unavailable,
                format!(
                    "writers were held for the whole freeze_timeout ({:.1}s), so the filesystem was thawed before the point-in-time image was complete and the snapshot was abandoned; put the state dir on a reflink filesystem (xfs, btrfs) for millisecond freezes, or raise limits.freeze_timeout",
                    self.timeout.as_secs_f64()
                ),
            )),
            Err(e) => Err(ApiError::new(
                e.kind(),
                format!("cannot thaw: {}", super::manager::message_chain(&e)),
            )),
        }
    }
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        if self.set.is_some() {
            if let Err(e) = self.release() {
                tracing::error!(error = %e.message, "thaw on an early exit");
            }
        }
    }
}

impl Manager {
    /// Freezes every filesystem mounted from the volume, journalling each first.
    fn hold_writers(
        &self,
        volume_id: &str,
        mounts: &[crate::quiesce::Mount],
        force: bool,
    ) -> Result<Hold<'_>, ApiError> {
        let config = self.config();
        let timeout = Duration::from_secs_f64(config.limits.freeze_timeout);
        let mut hold = Hold {
            manager: self,
            set: None,
            watchdog: None,
            mountpoints: Vec::new(),
            timeout,
        };
        if mounts.is_empty() {
            return Ok(hold);
        }
        let protected = [
            config.state_dir.clone(),
            config.store_path(),
            PathBuf::from("/"),
        ];
        let mut journal = |mp: &Path| -> std::io::Result<()> {
            self.with_catalog(|c| c.record_frozen(&mp.to_string_lossy(), volume_id))
                .map_err(|e| std::io::Error::other(e.message))
        };
        match FreezeSet::freeze(mounts, &protected, &mut journal) {
            Ok(set) => {
                hold.mountpoints = set.mountpoints().into_iter().map(Path::to_path_buf).collect();
                hold.watchdog = Some(set.watchdog(timeout));
                hold.set = Some(set);
                Ok(hold)
            }
            Err(e) if e.is_not_supported() && force => {
                tracing::warn!(volume = volume_id, error = %e, "cannot freeze; taking a crash-consistent snapshot as --force allows");
                Ok(hold)
            }
            Err(e) if e.is_not_supported() => Err(ApiError::busy(format!(
                "cannot freeze the filesystem of volume {volume_id}: {e}; pass --force for a crash-consistent snapshot"
            ))),
            Err(e) => Err(ApiError::new(
                e.kind(),
                format!("cannot freeze volume {volume_id}: {}", super::manager::message_chain(&e)),
            )),
        }
    }

    /// Captures `row` (a pending snapshot) and makes it `available`.
    pub(super) fn take_snapshot(
        &self,
        row: &SnapshotRow,
        block_size: u32,
        force: bool,
        progress: &JobProgress,
    ) -> Result<(), ApiError> {
        let state_dir = self.state_dir();
        let v = self.live_volume(&row.volume_id)?;
        let row = &self.settle_parent(row, &v)?;
        if let Some(tracker) = self.tracker(&v.id) {
            return self.take_nbd_snapshot(row, &v, tracker, block_size, progress);
        }
        if !force {
            self.refuse_open_writers(&v)?;
        }
        let image_path = volume::image_path(&state_dir, &v.id);
        let image =
            volume::open_image_ro(&image_path).map_err(|e| ApiError::from_volume(e, &v.id))?;
        let volume_size = image.metadata().map(|m| m.len()).unwrap_or(v.size_bytes);
        let mounts = if v.attached && v.backend == "loop" && !v.device.is_empty() {
            volume::mounts(Path::new(&v.device))
        } else {
            Vec::new()
        };
        let id: SnapshotId = row.id.parse().map_err(ApiError::bad)?;
        let volume_id: VolumeId = v.id.parse().map_err(ApiError::bad)?;
        let parent = row
            .parent_id
            .as_deref()
            .map(str::parse::<SnapshotId>)
            .transpose()
            .map_err(ApiError::bad)?;

        let mut hold = self.hold_writers(&v.id, &mounts, force)?;
        let consistency = if hold.frozen() { "filesystem" } else { "crash" };
        let snapshot_time = now();
        let mut meta = SnapshotMeta {
            id: id.clone(),
            volume_id,
            volume_name: v.name.clone(),
            name: row.name.clone(),
            description: row.description.clone(),
            owner: row.owner.clone(),
            parent,
            volume_size,
            block_size,
            snapshot_time,
            freeze_ms: 0,
            consistency: consistency.into(),
        };
        let clone = reflink_clone(&image, &state_dir.join("tmp"), &row.id)?;
        let manifest = match &clone {
            Some(clone) => {
                // The clone is the point-in-time image: let writers go, then stream it.
                meta.freeze_ms = hold.release()?;
                self.mark_taken(row, snapshot_time, meta.freeze_ms, consistency)?;
                self.capture_clone(meta, &clone.file, progress)?
            }
            None => {
                // No reflink here: the image must be read while writers are held.
                let captured = crate::store::capture(self.store(), meta, &image, progress);
                let released = hold.release();
                match (captured, released) {
                    (Ok(m), Ok(ms)) => {
                        self.mark_taken(row, snapshot_time, ms, consistency)?;
                        m
                    }
                    (Ok(m), Err(e)) => {
                        let _ = self.store().delete(&m.id, &crate::store::NoProgress);
                        return Err(e);
                    }
                    (Err(e), _) => return Err(e.into()),
                }
            }
        };
        drop(clone);
        self.finish_snapshot(row, &manifest, snapshot_time)
    }

    /// Captures a reflink clone of a loop volume's image. With a parent, shared extents between
    /// the clone and the chain's deltas (which the full capture cloned from the image) tell
    /// which blocks cannot have changed: only the blocks around the rest are read and hashed
    /// (`store::changed_by_sharing`, then `store::capture_extents` with a superset). Where
    /// that cannot tell — no extent maps, the store on another filesystem, an odd parent —
    /// the whole clone is read and hashed as before; the shortcut never fails a snapshot by
    /// itself.
    fn capture_clone(
        &self,
        meta: SnapshotMeta,
        clone: &File,
        progress: &JobProgress,
    ) -> Result<crate::store::Manifest, crate::store::StoreError> {
        use crate::store::Sharing;
        let store = self.store();
        let Some(parent) = meta.parent.clone() else {
            return crate::store::capture(store, meta, clone, progress);
        };
        let t0 = std::time::Instant::now();
        let (id, size, bs) = (meta.id.clone(), meta.volume_size, meta.block_size);
        match crate::store::changed_by_sharing(store, &parent, clone, size, bs) {
            Ok(Sharing::Changed(changed)) => {
                tracing::info!(
                    snapshot = %id,
                    parent = %parent,
                    changed_bytes = changed.changed_bytes(),
                    ranges = changed.ranges.len(),
                    shared_bytes = changed.shared_bytes,
                    zero_bytes = changed.zero_bytes,
                    took = ?t0.elapsed(),
                    "incremental from shared extents: reading only the blocks that may have changed"
                );
                crate::store::capture_extents(
                    store,
                    meta,
                    clone,
                    &changed.ranges,
                    crate::store::DirtySet::Superset,
                    progress,
                )
            }
            Ok(Sharing::Unsupported(why)) => {
                tracing::info!(snapshot = %id, parent = %parent, reason = %why, "shared extents cannot tell what changed; reading the whole image");
                crate::store::capture(store, meta, clone, progress)
            }
            Err(e) => {
                tracing::info!(snapshot = %id, parent = %parent, error = %e, "comparing shared extents failed; reading the whole image");
                crate::store::capture(store, meta, clone, progress)
            }
        }
    }

    /// Makes a captured snapshot `available` and the head of its volume's chain.
    pub(super) fn finish_snapshot(
        &self,
        row: &SnapshotRow,
        manifest: &crate::store::Manifest,
        snapshot_time: i64,
    ) -> Result<(), ApiError> {
        self.with_catalog(|c| {
            if let Some(mut s) = c.snapshot(&row.id)? {
                s.status = "available".into();
                s.size_bytes = manifest.stored_bytes;
                s.virtual_size_bytes = manifest.volume_size;
                s.status_time = now();
                c.upsert_snapshot(&s)?;
            }
            if let Some(mut vol) = c.volume(&row.volume_id)? {
                vol.active_head = Some(row.id.clone());
                vol.last_snapshot_time = Some(snapshot_time);
                c.update_volume(&vol)?;
            }
            Ok(())
        })?;
        tracing::info!(snapshot = %row.id, volume = %row.volume_id, stored = manifest.stored_bytes, "snapshot available");
        Ok(())
    }

    /// Confirms the parent chosen when the request was accepted, now that the job holds the
    /// volume's lock: a delete that ran in between may have removed it, in which case the
    /// volume's current chain head (or a full snapshot) takes its place.
    fn settle_parent(
        &self,
        row: &SnapshotRow,
        v: &crate::catalog::VolumeRow,
    ) -> Result<SnapshotRow, ApiError> {
        let Some(chosen) = row.parent_id.as_deref() else {
            return Ok(row.clone());
        };
        let still_there = self
            .with_catalog(|c| c.snapshot(chosen))?
            .is_some_and(|p| p.status == "available");
        if still_there && v.active_head.as_deref() == Some(chosen) {
            return Ok(row.clone());
        }
        let head = match v.active_head.as_deref() {
            Some(h) => self
                .with_catalog(|c| c.snapshot(h))?
                .filter(|s| s.status == "available"),
            None => None,
        };
        let mut settled = row.clone();
        settled.parent_id = head.map(|h| h.id);
        tracing::info!(snapshot = %row.id, was = chosen, now = ?settled.parent_id, "parent changed while the snapshot waited");
        self.with_catalog(|c| c.upsert_snapshot(&settled))?;
        Ok(settled)
    }

    /// Records that the point-in-time image exists and writers were released.
    pub(super) fn mark_taken(
        &self,
        row: &SnapshotRow,
        snapshot_time: i64,
        freeze_ms: u64,
        consistency: &str,
    ) -> Result<(), ApiError> {
        self.with_catalog(|c| {
            if let Some(mut s) = c.snapshot(&row.id)? {
                s.is_taken = true;
                s.snapshot_time = snapshot_time;
                s.freeze_ms = freeze_ms;
                s.consistency = consistency.into();
                s.status_time = now();
                c.upsert_snapshot(&s)?;
            }
            Ok(())
        })
    }
}

//! Snapshots of NBD volumes: every write passes through the daemon, so no filesystem is
//! frozen and the whole volume need not be read.
//!
//! An epoch switch (flush, swap the dirty set) marks the point in time; writers pause only for
//! the swap. Blocks still to be streamed are protected by copy-before-write in the export's
//! write path, so the snapshot equals the image at the switch while writes go on. With a
//! trusted dirty set (it was tracked since the parent snapshot) only the dirty blocks are
//! read; otherwise every block that held data at the switch is read (holes at the switch are
//! not, even if a writer fills them meanwhile) and compared by hash with the parent's. An
//! incremental reads and stores only the 4 KiB pieces that were written; of a store block
//! written only in part, the block's hash is recorded as not known (`capture_extents`).
//! Copy-before-write protects the dirty set widened to whole store blocks, a superset of
//! what is read. Blocks go from the epoch straight into the store (no scratch copy).

use super::jobs::JobProgress;
use super::manager::{message_chain, Manager};
use crate::api::{ApiError, ErrorKind, SnapshotId, VolumeId};
use crate::catalog::{now, SnapshotRow, VolumeRow};
use crate::nbd::{DirtyRange, EpochScope, FileExport, TrackedExport};
use crate::store::SnapshotMeta;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub type Tracker = TrackedExport<FileExport>;

fn nbd_err(what: &str, e: crate::nbd::NbdError) -> ApiError {
    ApiError::new(e.kind(), format!("{what}: {}", message_chain(&e)))
}

/// `<state_dir>/volumes/<id>.cbt`: the export's persistent dirty bitmap.
pub fn bitmap_path(state_dir: &Path, id: &str) -> PathBuf {
    state_dir.join("volumes").join(format!("{id}.cbt"))
}

/// `<state_dir>/volumes/<id>.cbt-base`: which snapshot the bitmap's dirty set is relative
/// to, as "<generation> <snapshot id>". Absent or stale means "rescan".
fn base_path(state_dir: &Path, id: &str) -> PathBuf {
    state_dir.join("volumes").join(format!("{id}.cbt-base"))
}

fn read_base(state_dir: &Path, id: &str) -> Option<(u64, String)> {
    let text = std::fs::read_to_string(base_path(state_dir, id)).ok()?;
    let (gen, ss) = text.trim().split_once(' ')?;
    Some((gen.parse().ok()?, ss.to_string()))
}

fn write_base(state_dir: &Path, id: &str, generation: u64, ss: &str) -> std::io::Result<()> {
    let path = base_path(state_dir, id);
    let tmp = path.with_extension("cbt-base.tmp");
    std::fs::write(&tmp, format!("{generation} {ss}\n"))?;
    File::open(&tmp)?.sync_all()?;
    crate::failpoint::check("nbd.cbt-base.rename")?;
    std::fs::rename(&tmp, &path)?;
    File::open(path.parent().unwrap_or(Path::new("/")))?.sync_all()
}

/// Forgets the tracked dirty set of a volume whose image is rewritten behind the export
/// (rollback; call it before the first byte changes): the next snapshot rescans. The
/// tracking base goes first and durably: without it the bitmap is never trusted, while a
/// bitmap removed first could be made anew (generation 0 again) under a surviving base.
pub fn forget_tracking(state_dir: &Path, id: &str) -> std::io::Result<()> {
    let gone = |r: std::io::Result<()>| match r {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    };
    let base = base_path(state_dir, id);
    gone(std::fs::remove_file(&base))?;
    File::open(base.parent().unwrap_or(Path::new("/")))?.sync_all()?;
    gone(std::fs::remove_file(bitmap_path(state_dir, id)))
}

/// [`forget_tracking`], as an API error naming the volume.
fn forget_tracking_api(state_dir: &Path, id: &str) -> Result<(), ApiError> {
    forget_tracking(state_dir, id).map_err(|e| {
        ApiError::new(
            ErrorKind::Io,
            format!("cannot forget the dirty bitmap of volume {id}: {e}"),
        )
    })
}

/// Opens the tracked export of a volume's image; a bitmap that cannot be used (damaged, or
/// of another size after a resize) is replaced by a new one, which forces a rescan.
pub fn open_tracker(state_dir: &Path, id: &str, image: &Path) -> Result<Tracker, ApiError> {
    let bitmap = bitmap_path(state_dir, id);
    let open = || -> Result<Tracker, crate::nbd::NbdError> {
        TrackedExport::open(FileExport::open(image)?, &bitmap)
    };
    match open() {
        Ok(t) => Ok(t),
        Err(e) => {
            tracing::warn!(volume = id, error = %message_chain(&e), "dirty bitmap unusable; starting a new one (the next snapshot rescans)");
            forget_tracking_api(state_dir, id)?;
            open().map_err(|e| nbd_err(&format!("cannot open the export of volume {id}"), e))
        }
    }
}

impl Manager {
    /// [`forget_tracking`] of a volume, as an API error naming it.
    pub(super) fn forget_tracking(&self, volume_id: &str) -> Result<(), ApiError> {
        forget_tracking_api(&self.state_dir(), volume_id)
    }

    /// Snapshot of an attached NBD volume through its tracked export.
    pub(super) fn take_nbd_snapshot(
        &self,
        row: &SnapshotRow,
        v: &VolumeRow,
        tracker: Arc<Tracker>,
        block_size: u32,
        progress: &JobProgress,
    ) -> Result<(), ApiError> {
        let state_dir = self.state_dir();
        let size = crate::nbd::Export::size(tracker.as_ref());
        let parent = row
            .parent_id
            .as_deref()
            .map(str::parse::<SnapshotId>)
            .transpose()
            .map_err(ApiError::bad)?;
        let trusted = match (&parent, read_base(&state_dir, &v.id)) {
            (Some(p), Some((gen, base))) => gen == tracker.generation() && base == p.as_str(),
            _ => false,
        };
        let scope = if trusted {
            EpochScope::Dirty
        } else {
            EpochScope::All
        };
        let spill = state_dir.join("tmp").join(format!("{}.cow", row.id));
        let _ = std::fs::remove_file(&spill);
        let snapshot_time = now();
        let t0 = std::time::Instant::now();
        // freeze_ms is how long writers were held: the switch itself, not the flush before
        // it (writes go on during the flush). The protected ranges the switch returns hold
        // all the capture below may read: the dirty set widened to store blocks (Dirty: the
        // volume has its parent's size, as a resize starts a new bitmap, so no block outside
        // the dirty set is read), or everything (All).
        let (_protected, held) = tracker
            .start_epoch_timed(scope, &spill, u64::from(block_size))
            .map_err(|e| {
                nbd_err(
                    &format!("cannot start a snapshot epoch on volume {}", v.id),
                    e,
                )
            })?;
        let freeze_ms = held.as_micros().div_ceil(1000) as u64;
        tracing::debug!(volume = %v.id, ?scope, elapsed = ?t0.elapsed(), held = ?held, "epoch switched");
        let result = (|| {
            self.mark_taken(row, snapshot_time, freeze_ms, "crash")?;
            let meta = SnapshotMeta {
                id: row.id.parse().map_err(ApiError::bad)?,
                volume_id: v.id.parse::<VolumeId>().map_err(ApiError::bad)?,
                volume_name: v.name.clone(),
                name: row.name.clone(),
                description: row.description.clone(),
                owner: row.owner.clone(),
                parent,
                volume_size: size,
                block_size,
                snapshot_time,
                freeze_ms,
                consistency: "crash".into(),
            };
            // Read straight from the epoch into the store, at the point in time.
            let src = tracker.as_ref();
            match scope {
                // Of an incremental only the 4 KiB pieces written since the parent are
                // read and stored: the rest of each block is the parent's.
                EpochScope::Dirty => {
                    let fine = tracker.epoch_dirty_ranges().map_err(|e| {
                        nbd_err(&format!("cannot read the dirty set of volume {}", v.id), e)
                    })?;
                    let dirty: Vec<Range<u64>> = fine.iter().map(DirtyRange::range).collect();
                    Ok(crate::store::capture_extents(
                        self.store(),
                        meta,
                        src,
                        &dirty,
                        crate::store::DirtySet::Exact,
                        progress,
                    )?)
                }
                // Every block, but holes at the switch are not read (see
                // `TrackedExport::epoch_data_ranges`); writers stop saving them aside.
                EpochScope::All => {
                    let data: Vec<Range<u64>> = tracker
                        .epoch_data_ranges(u64::from(block_size))
                        .map_err(|e| {
                            nbd_err(
                                &format!("cannot map the data of volume {} at the switch", v.id),
                                e,
                            )
                        })?
                        .iter()
                        .map(DirtyRange::range)
                        .collect();
                    Ok(crate::store::capture_ranges(
                        self.store(),
                        meta,
                        src,
                        &data,
                        progress,
                    )?)
                }
            }
        })();
        tracing::debug!(volume = %v.id, elapsed = ?t0.elapsed(), "captured");
        match result {
            Ok(manifest) => {
                let generation = tracker
                    .finish_epoch(true)
                    .map_err(|e| nbd_err("cannot close the snapshot epoch", e))?;
                if let Err(e) = write_base(&state_dir, &v.id, generation, &row.id) {
                    // Without the marker the next snapshot rescans: slower, never wrong.
                    // An older marker must not survive either: it names an older parent.
                    tracing::warn!(volume = %v.id, error = %e, "cannot record the tracking base");
                    let _ = std::fs::remove_file(base_path(&state_dir, &v.id));
                }
                tracing::debug!(volume = %v.id, elapsed = ?t0.elapsed(), "epoch closed");
                let done = self.finish_snapshot(row, &manifest, snapshot_time);
                tracing::debug!(volume = %v.id, elapsed = ?t0.elapsed(), "snapshot finished");
                done
            }
            Err(e) => {
                if let Err(e2) = tracker.finish_epoch(false) {
                    tracing::error!(volume = %v.id, error = %message_chain(&e2), "cannot roll the snapshot epoch back");
                }
                Err(e)
            }
        }
    }
}

/// The most bytes of the point-in-time image read at once.
const PIT_CHUNK: usize = 1 << 20;

/// The point-in-time image of a tracked export's open snapshot epoch (each block read at
/// most once, as [`TrackedExport::read_snapshot_blocks`] requires).
impl crate::store::ImageSource for TrackedExport<FileExport> {
    fn image_len(&self) -> Result<u64, crate::store::StoreError> {
        Ok(crate::nbd::Export::size(self))
    }

    fn read_image_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        // A snapshot read holds the lock writers of pending blocks wait for: 1 MiB at a time.
        let mut done = 0;
        for piece in buf.chunks_mut(PIT_CHUNK) {
            self.read_snapshot_blocks(off + done, piece)
                .map_err(|e| std::io::Error::other(message_chain(&e)))?;
            done += piece.len() as u64;
        }
        Ok(())
    }

    fn prefetch(&self, off: u64, len: u64) {
        let _ = crate::nbd::Export::cache(self.inner(), off, len);
    }
}

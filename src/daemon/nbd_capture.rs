//! Snapshots of NBD volumes: every write passes through the daemon, so no filesystem is
//! frozen and the whole volume need not be read.
//!
//! An epoch switch (flush, swap the dirty set) marks the point in time; writers pause only for
//! the swap. Blocks still to be streamed are protected by copy-before-write in the export's
//! write path, so the snapshot equals the image at the switch while writes go on. With a
//! trusted dirty set (it was tracked since the parent snapshot) only the dirty blocks are
//! read; otherwise every block is read and compared by hash with the parent's. The dirty set
//! is widened to whole store blocks for reading and hashing, but an incremental stores only
//! the 4 KiB pieces that were written.

use super::jobs::JobProgress;
use super::manager::{message_chain, Manager};
use crate::api::{ApiError, ErrorKind, SnapshotId, VolumeId};
use crate::catalog::{now, SnapshotRow, VolumeRow};
use crate::nbd::{EpochScope, FileExport, TrackedExport};
use crate::store::{Progress, SnapshotMeta};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
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

/// Forgets the tracked dirty set of a volume whose image was rewritten behind the export
/// (rollback): the next snapshot rescans.
pub fn forget_tracking(state_dir: &Path, id: &str) {
    let _ = std::fs::remove_file(bitmap_path(state_dir, id));
    let _ = std::fs::remove_file(base_path(state_dir, id));
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
            forget_tracking(state_dir, id);
            open().map_err(|e| nbd_err(&format!("cannot open the export of volume {id}"), e))
        }
    }
}

impl Manager {
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
        // freeze_ms is how long writers were held: the switch itself, not the flush before
        // it (writes go on during the flush).
        let (ranges, held) = tracker
            .start_epoch_timed(scope, &spill, u64::from(block_size))
            .map_err(|e| {
                nbd_err(
                    &format!("cannot start a snapshot epoch on volume {}", v.id),
                    e,
                )
            })?;
        let freeze_ms = held.as_micros().div_ceil(1000) as u64;
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
            // Whole store blocks are read at their point in time (each block's hash needs
            // all of it), but of an incremental only the 4 KiB pieces written since the
            // parent are stored: the rest of each block is the parent's.
            let image = self.point_in_time_image(&tracker, &row.id, &ranges, progress)?;
            let fine = match scope {
                EpochScope::Dirty => tracker.epoch_dirty_ranges().map_err(|e| {
                    nbd_err(&format!("cannot read the dirty set of volume {}", v.id), e)
                })?,
                EpochScope::All => ranges.clone(),
            };
            let dirty: Vec<std::ops::Range<u64>> =
                fine.iter().map(|r| r.offset..r.offset + r.len).collect();
            Ok(crate::store::capture_extents(
                self.store(),
                meta,
                &image.file,
                &dirty,
                progress,
            )?)
        })();
        match result {
            Ok(manifest) => {
                let generation = tracker
                    .finish_epoch(true)
                    .map_err(|e| nbd_err("cannot close the snapshot epoch", e))?;
                if let Err(e) = write_base(&state_dir, &v.id, generation, &row.id) {
                    // Without the marker the next snapshot rescans: slower, never wrong.
                    tracing::warn!(volume = %v.id, error = %e, "cannot record the tracking base");
                }
                self.finish_snapshot(row, &manifest, snapshot_time)
            }
            Err(e) => {
                if let Err(e2) = tracker.finish_epoch(false) {
                    tracing::error!(volume = %v.id, error = %message_chain(&e2), "cannot roll the snapshot epoch back");
                }
                Err(e)
            }
        }
    }

    /// Copies the point-in-time content of `ranges` into a sparse scratch image (zero
    /// blocks stay holes) that the store then reads like any image.
    fn point_in_time_image(
        &self,
        tracker: &Tracker,
        id: &str,
        ranges: &[crate::nbd::DirtyRange],
        progress: &JobProgress,
    ) -> Result<Scratch, ApiError> {
        let path = self.state_dir().join("tmp").join(format!("{id}.pit"));
        let _ = std::fs::remove_file(&path);
        let io = |e: std::io::Error| {
            ApiError::new(
                ErrorKind::Io,
                format!("cannot write {}: {e}", path.display()),
            )
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        let scratch = Scratch {
            path: path.clone(),
            file,
        };
        scratch
            .file
            .set_len(crate::nbd::Export::size(tracker))
            .map_err(io)?;
        // The blocks of an incremental are scattered: ask the kernel to read the next ones
        // ahead (a window at a time), so the disk sees many reads at once instead of one
        // dependent random read per block. Only a hint; large ranges are read sequentially
        // and get the kernel's own readahead.
        let inner = tracker.inner();
        let mut buf = Vec::new();
        let mut prefetched = 0;
        let mut window = 0u64;
        for (i, r) in ranges.iter().enumerate() {
            while prefetched < ranges.len() && window < PREFETCH_WINDOW {
                let p = &ranges[prefetched];
                if p.len <= PREFETCH_MAX_RANGE {
                    let _ = crate::nbd::Export::cache(inner, p.offset, p.len);
                    window += p.len;
                }
                prefetched += 1;
            }
            if i < prefetched && r.len <= PREFETCH_MAX_RANGE {
                window = window.saturating_sub(r.len);
            }
            // Big reads for big ranges (a full snapshot is one range); zero blocks stay holes.
            let mut off = r.offset;
            while off < r.offset + r.len {
                if progress.cancelled() {
                    return Err(super::jobs::cancelled_error());
                }
                let len = (r.offset + r.len - off).min(PIT_CHUNK);
                buf.resize(len as usize, 0);
                tracker
                    .read_snapshot_blocks(off, &mut buf)
                    .map_err(|e| nbd_err("cannot read the point-in-time image", e))?;
                write_nonzero(&scratch.file, &buf, off).map_err(io)?;
                off += len;
            }
        }
        Ok(scratch)
    }
}

/// Writes the runs of non-zero 4 KiB blocks of `buf` (image bytes at `offset`) to `file`.
fn write_nonzero(file: &File, buf: &[u8], offset: u64) -> std::io::Result<()> {
    let bs = 4096;
    let mut i = 0;
    while i < buf.len() {
        let nonzero = |j: usize| buf[j..(j + bs).min(buf.len())].iter().any(|b| *b != 0);
        if !nonzero(i) {
            i += bs;
            continue;
        }
        let mut j = i + bs;
        while j < buf.len() && nonzero(j) {
            j += bs;
        }
        let j = j.min(buf.len());
        file.write_all_at(&buf[i..j], offset + i as u64)?;
        i = j;
    }
    Ok(())
}

/// The most bytes of the point-in-time image read (and written to scratch) at once.
const PIT_CHUNK: u64 = 1 << 20;

/// Bytes of scattered dirty ranges read ahead of the copy into the scratch image.
const PREFETCH_WINDOW: u64 = 32 << 20;
/// Ranges longer than this are not read ahead by hand.
const PREFETCH_MAX_RANGE: u64 = 1 << 20;

/// A scratch file removed when dropped.
struct Scratch {
    path: PathBuf,
    file: File,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

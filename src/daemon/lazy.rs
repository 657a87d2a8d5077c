//! Lazy restore (`create-volume-from-snapshot --lazy`): the new NBD volume is attachable at
//! once; a read of a block not yet copied is served from the store, and a job copies
//! ("hydrates") the rest in the background. The volume carries a marker naming its
//! snapshot until hydration is complete and the volume has been detached once; while it
//! has one, snapshots and deletes of it are refused.

use super::jobs::JobProgress;
use super::manager::{message_chain, Manager};
use crate::api::{ApiError, ErrorKind, SnapshotId};
use crate::nbd::{FileExport, LazyExport};
use crate::store::{ChainReader, Progress};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How much one hydration step copies before progress is reported and cancellation checked.
const STEP_BYTES: u64 = 8 << 20;

/// `<state_dir>/volumes/<id>.lazy-src`: the snapshot a lazily restored volume comes from.
pub fn marker_path(state_dir: &Path, id: &str) -> PathBuf {
    state_dir.join("volumes").join(format!("{id}.lazy-src"))
}

fn map_path(state_dir: &Path, id: &str) -> PathBuf {
    state_dir.join("volumes").join(format!("{id}.lazy-map"))
}

/// The snapshot a volume is being lazily restored from, if it is.
pub fn lazy_source(state_dir: &Path, id: &str) -> Option<String> {
    std::fs::read_to_string(marker_path(state_dir, id))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Writes the marker durably before the volume can be attached.
pub fn write_marker(state_dir: &Path, id: &str, snapshot: &str) -> Result<(), ApiError> {
    let path = marker_path(state_dir, id);
    let io = |e: std::io::Error| {
        ApiError::new(
            ErrorKind::Io,
            format!("cannot write {}: {e}", path.display()),
        )
    };
    crate::failpoint::check("lazy.marker.write").map_err(io)?;
    std::fs::write(&path, format!("{snapshot}\n")).map_err(io)?;
    std::fs::File::open(&path)
        .and_then(|f| f.sync_all())
        .map_err(io)?;
    std::fs::File::open(state_dir.join("volumes"))
        .and_then(|d| d.sync_all())
        .map_err(io)
}

/// Removes a finished (or abandoned) lazy restore's marker and map.
pub fn forget(state_dir: &Path, id: &str) {
    let _ = std::fs::remove_file(map_path(state_dir, id));
    let _ = std::fs::remove_file(marker_path(state_dir, id));
}

impl Manager {
    /// The one `LazyExport` of a volume, shared by its NBD export and its hydration job.
    pub(super) fn lazy_export(&self, vid: &str, sid: &str) -> Result<Arc<LazyExport>, ApiError> {
        let mut map = self.lazies().lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = map.get(vid) {
            return Ok(l.clone());
        }
        let state_dir = self.state_dir();
        let snapshot: SnapshotId = sid.parse().map_err(ApiError::bad)?;
        let reader = Arc::new(ChainReader::open(self.store(), &snapshot)?);
        let image = crate::volume::image_path(&state_dir, vid);
        let nbd = |e: crate::nbd::NbdError| {
            ApiError::new(
                e.kind(),
                format!("lazy restore of volume {vid}: {}", message_chain(&e)),
            )
        };
        let target = FileExport::open(&image).map_err(nbd)?;
        let granularity = u64::from(reader.block_size()).max(4096);
        let lazy = Arc::new(
            LazyExport::open(target, reader, &map_path(&state_dir, vid), granularity)
                .map_err(nbd)?,
        );
        map.insert(vid.to_string(), lazy.clone());
        Ok(lazy)
    }

    /// The work of a lazy CreateVolumeFromSnapshot: copy every block not yet hydrated.
    pub(super) fn hydrate(
        &self,
        vid: &str,
        sid: &str,
        progress: &JobProgress,
    ) -> Result<(), ApiError> {
        let lazy = self.lazy_export(vid, sid)?;
        let mut reported = 0;
        loop {
            if progress.cancelled() {
                return Err(super::jobs::cancelled_error());
            }
            let step = match lazy.hydrate_next(STEP_BYTES) {
                Ok(step) => step,
                Err(e) => {
                    // The volume stays served (damaged blocks read as EIO, never as wrong
                    // data) and can be deleted.
                    let _ = self.update_volume(vid, |v| v.transition_status.clear());
                    return Err(ApiError::new(
                        e.kind(),
                        format!(
                            "lazy restore of volume {vid} from {sid}: {}",
                            message_chain(&e)
                        ),
                    ));
                }
            };
            if reported == 0 {
                progress.set_total(step.total);
            }
            progress.advance(step.done.saturating_sub(reported));
            reported = step.done;
            if step.finished {
                break;
            }
        }
        let attached = self
            .with_catalog(|c| c.volume(vid))?
            .is_some_and(|v| v.attached);
        if !attached {
            self.drop_lazy(vid);
        }
        self.update_volume(vid, |v| v.transition_status.clear())?;
        tracing::info!(volume = vid, snapshot = sid, "lazy restore complete");
        Ok(())
    }

    /// Forgets a volume's lazy export once it is fully hydrated and no longer served.
    pub(super) fn drop_lazy(&self, vid: &str) {
        let mut map = self.lazies().lock().unwrap_or_else(|p| p.into_inner());
        let done = map.get(vid).is_some_and(|l| l.is_fully_hydrated());
        if done {
            map.remove(vid);
            forget(&self.state_dir(), vid);
        }
    }
}

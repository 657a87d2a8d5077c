//! Recovery at start: after a crash, a SIGKILL or a reboot the daemon puts everything back
//! into a state it can vouch for before it answers anyone.
//!
//! Order matters: thaw first (writers may be blocked on a filesystem a previous run froze),
//! then the store's own recovery (unfinished snapshots and deletes), then the catalog is made
//! to agree with the store, then interrupted jobs are resumed or failed, and last volumes
//! that were attached are attached again.

use super::jobs::{self, JobProgress};
use super::manager::Manager;
use crate::api::ApiError;
use crate::catalog::{now, Catalog, JobRow, JobStatus, SnapshotRow};
use crate::config::Backend;
use crate::volume;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// Thaws every filesystem the freeze journal says a previous run froze.
pub fn thaw_leftovers(catalog: &Catalog) {
    let rows = match catalog.frozen() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the freeze journal");
            return;
        }
    };
    for row in rows {
        match crate::sys::freeze::thaw_path(std::path::Path::new(&row.mountpoint)) {
            Ok(true) => {
                tracing::warn!(mountpoint = %row.mountpoint, volume = %row.volume_id, "thawed a filesystem left frozen by a previous run")
            }
            Ok(false) => {
                tracing::info!(mountpoint = %row.mountpoint, "journalled freeze was already thawed")
            }
            Err(e) => {
                tracing::error!(mountpoint = %row.mountpoint, error = %e, "cannot thaw a journalled freeze")
            }
        }
        if let Err(e) = catalog.clear_frozen(&row.mountpoint) {
            tracing::error!(error = %e, "cannot clear the freeze journal");
        }
    }
}

pub fn recover(manager: &Arc<Manager>) -> Result<(), ApiError> {
    remove_scratch_leftovers(&manager.state_dir().join("tmp"));
    let report = manager.store().recover()?;
    tracing::info!(?report, "store recovered");
    reconcile_snapshots(manager)?;
    resume_jobs(manager)?;
    reattach(manager);
    Ok(())
}

/// Removes the scratch files of captures a previous run did not finish: reflink clones
/// (`<snapshot>.clone`), NBD copy-on-write spills (`.cow`) and point-in-time images (`.pit`).
/// No capture runs before recovery ends, so none of them is in use; left alone they would
/// hold a volume's worth of space each for good.
fn remove_scratch_leftovers(tmp: &std::path::Path) {
    let entries = match std::fs::read_dir(tmp) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            tracing::error!(dir = %tmp.display(), error = %e, "cannot list the scratch directory");
            return;
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let scratch = path
            .extension()
            .and_then(|x| x.to_str())
            .is_some_and(|x| matches!(x, "clone" | "cow" | "pit"));
        if !scratch || !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {
                tracing::warn!(file = %path.display(), "removed a scratch file left by an interrupted capture")
            }
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "cannot remove a scratch file left by an interrupted capture")
            }
        }
    }
}

/// Makes the catalog agree with the store: partial snapshots go, committed ones the catalog
/// does not know (a lost or older catalog) are adopted.
fn reconcile_snapshots(manager: &Arc<Manager>) -> Result<(), ApiError> {
    let manifests = manager.store().list()?;
    let in_store: HashSet<String> = manifests.iter().map(|m| m.id.to_string()).collect();
    let rows = manager.with_catalog(|c| c.snapshots())?;
    let known: HashSet<String> = rows.iter().map(|r| r.id.clone()).collect();
    for row in &rows {
        if row.status != "available" {
            // An unfinished capture: whatever the store has of it is not trusted.
            tracing::warn!(snapshot = %row.id, volume = %row.volume_id, "removing a snapshot whose capture was interrupted");
            manager.discard_snapshot(&row.id)?;
        } else if !in_store.contains(&row.id) {
            tracing::error!(snapshot = %row.id, "snapshot is in the catalog but not in the store; removing it from the catalog");
            manager.with_catalog(|c| c.delete_snapshot_row(&row.id))?;
        }
    }
    for m in manifests.iter().filter(|m| !known.contains(m.id.as_str())) {
        tracing::warn!(snapshot = %m.id, "adopting a snapshot found in the store");
        let row = SnapshotRow {
            id: m.id.to_string(),
            volume_id: m.volume_id.to_string(),
            volume_name: m.volume_name.clone(),
            name: m.name.clone(),
            description: m.description.clone(),
            status: "available".into(),
            is_taken: true,
            parent_id: m.parent.as_ref().map(|p| p.to_string()),
            size_bytes: m.stored_bytes,
            virtual_size_bytes: m.volume_size,
            snapshot_time: m.snapshot_time,
            create_time: m.create_time,
            status_time: now(),
            freeze_ms: m.freeze_ms,
            consistency: m.consistency.clone(),
            owner: m.owner.clone(),
            job_id: None,
        };
        manager.with_catalog(|c| c.upsert_snapshot(&row))?;
    }
    // A delete the store's recovery finished leaves its volume's chain head on a snapshot
    // that is gone: move the head to the nearest ancestor still there, as delete-snapshots
    // itself does, so that the next incremental builds on what the volume last held.
    let parents: HashMap<&str, Option<&str>> = rows
        .iter()
        .map(|r| (r.id.as_str(), r.parent_id.as_deref()))
        .collect();
    for v in manager.with_catalog(|c| c.volumes())? {
        let Some(head) = v.active_head.as_deref() else {
            continue;
        };
        if in_store.contains(head) {
            continue;
        }
        let mut at = parents.get(head).copied().flatten();
        while let Some(id) = at.filter(|id| !in_store.contains(*id)) {
            at = parents.get(id).copied().flatten();
        }
        let new_head = at.map(String::from);
        tracing::warn!(volume = %v.id, was = head, now = ?new_head, "chain head was deleted; moving it to its nearest remaining ancestor");
        manager.update_volume(&v.id, |r| r.active_head = new_head)?;
    }
    // Parent links follow the store (a delete may have been finished by its recovery).
    for m in &manifests {
        let parent = m.parent.as_ref().map(|p| p.to_string());
        manager.with_catalog(|c| {
            if let Some(mut r) = c.snapshot(m.id.as_str())? {
                if r.parent_id != parent {
                    r.parent_id = parent.clone();
                    c.upsert_snapshot(&r)?;
                }
            }
            Ok(())
        })?;
    }
    Ok(())
}

fn ids_param(job: &JobRow, key: &str) -> Vec<String> {
    job.params
        .get(key)
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Resumes interrupted jobs that can be redone safely, fails the others saying why.
fn resume_jobs(manager: &Arc<Manager>) -> Result<(), ApiError> {
    let unfinished: Vec<JobRow> = manager
        .with_catalog(|c| c.jobs())?
        .into_iter()
        .filter(|j| !j.status.is_finished())
        .collect();
    for mut job in unfinished {
        let resumed: Option<(Vec<String>, jobs::Work)> = match job.action.as_str() {
            "CreateVolumes" => {
                let ids = job.resource_ids.clone();
                let size = ids
                    .first()
                    .and_then(|id| manager.with_catalog(|c| c.volume(id)).ok().flatten())
                    .map(|v| v.size_bytes);
                size.map(|size| {
                    let work_ids = ids.clone();
                    (
                        ids,
                        Box::new(move |m: &Arc<Manager>, p: &JobProgress| {
                            m.create_images(&work_ids, size, p)
                        }) as jobs::Work,
                    )
                })
            }
            "DeleteSnapshots" => Some(per_snapshot(manager, &job, Manager::delete_list)),
            "CreateVolumeFromSnapshot" => {
                let sid = job
                    .params
                    .get("snapshot")
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_string();
                let vid = job
                    .params
                    .get("volume")
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_string();
                if job.params.get("lazy").and_then(|v| v.as_bool()) == Some(true) {
                    // Hydration resumes where its durable map says it stopped.
                    let locks = snapshot_volumes(manager, std::slice::from_ref(&sid));
                    Some((
                        locks,
                        Box::new(move |m: &Arc<Manager>, p: &JobProgress| m.hydrate(&vid, &sid, p))
                            as jobs::Work,
                    ))
                } else {
                    // The same locks as the verb takes: the new volume and the snapshot's
                    // volume, so that a delete resumed at the same time cannot fold the
                    // chain this restore reads.
                    let mut locks = vec![vid.clone()];
                    locks.extend(snapshot_volumes(manager, std::slice::from_ref(&sid)));
                    Some((
                        locks,
                        Box::new(move |m: &Arc<Manager>, p: &JobProgress| {
                            m.restore_new_volume(&vid, &sid, p)
                        }) as jobs::Work,
                    ))
                }
            }
            "ApplySnapshots" => Some(per_snapshot(manager, &job, Manager::apply_list)),
            "VerifySnapshots" => Some(per_snapshot(manager, &job, Manager::verify_list)),
            // A point in time that has passed cannot be captured again.
            _ => None,
        };
        match resumed {
            Some((locks, work)) => {
                tracing::info!(job = %job.id, action = %job.action, "resuming a job interrupted by a restart");
                job.status = JobStatus::Pending;
                job.status_time = now();
                jobs::submit(manager, job, locks, work)?;
            }
            None => {
                tracing::warn!(job = %job.id, action = %job.action, "failing a job interrupted by a restart");
                job.status = JobStatus::Failed;
                job.error = Some(format!(
                    "{} was interrupted by a daemon restart; its partial results were removed",
                    job.action
                ));
                job.error_code = Some(5000);
                job.status_time = now();
                manager.with_catalog(|c| c.upsert_job(&job))?;
            }
        }
    }
    // A volume still `pending` with no job left to finish it never became usable.
    let volumes = manager.with_catalog(|c| c.volumes())?;
    for v in volumes {
        if v.status == "pending" && !manager.jobs().volume_busy(&v.id) {
            tracing::warn!(volume = %v.id, "removing a volume whose creation did not finish");
            let _ = std::fs::remove_file(volume::image_path(&manager.state_dir(), &v.id));
            manager.update_volume(&v.id, |r| {
                r.status = "deleted".into();
                r.transition_status.clear();
            })?;
        } else if !v.transition_status.is_empty()
            && v.status != "pending"
            && !manager.jobs().volume_busy(&v.id)
            && !manager.is_lazy(&v.id)
        {
            manager.update_volume(&v.id, |r| r.transition_status.clear())?;
        }
    }
    Ok(())
}

/// A resumed job over the snapshots in its params, locking their volumes.
fn per_snapshot(
    manager: &Manager,
    job: &JobRow,
    work: fn(&Manager, &[String], &JobProgress) -> Result<(), ApiError>,
) -> (Vec<String>, jobs::Work) {
    let ids = ids_param(job, "snapshots");
    let locks = snapshot_volumes(manager, &ids);
    (
        locks,
        Box::new(move |m: &Arc<Manager>, p: &JobProgress| work(m, &ids, p)),
    )
}

fn snapshot_volumes(manager: &Manager, ids: &[String]) -> Vec<String> {
    ids.iter()
        .filter_map(|id| manager.with_catalog(|c| c.snapshot(id)).ok().flatten())
        .map(|s| s.volume_id)
        .collect()
}

/// Attaches again what was attached: after a daemon restart the loop device is usually still
/// there and is adopted; after a reboot it is configured anew.
fn reattach(manager: &Arc<Manager>) {
    let volumes = match manager.with_catalog(|c| c.volumes()) {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(error = %e.message, "cannot list volumes to re-attach");
            return;
        }
    };
    for v in volumes
        .into_iter()
        .filter(|v| v.attached && v.status != "deleted")
    {
        let image = volume::image_path(&manager.state_dir(), &v.id);
        let device = match Backend::parse(&v.backend) {
            Some(Backend::Loop) => match volume::loop_device_for(&image) {
                Some(d) => Ok(d),
                None => manager.expose(&v),
            },
            _ => manager.expose(&v),
        };
        match device {
            Ok(device) => {
                if device != v.device {
                    tracing::info!(volume = %v.id, device, "re-attached");
                }
                let _ = manager.update_volume(&v.id, |r| {
                    r.device = device;
                    r.status = "in-use".into();
                });
            }
            Err(e) => {
                tracing::error!(volume = %v.id, error = %e.message, "cannot re-attach");
                let _ = manager.update_volume(&v.id, |r| {
                    r.attached = false;
                    r.device.clear();
                    r.status = "available".into();
                });
            }
        }
    }
}

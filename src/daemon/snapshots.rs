//! Snapshot verbs: create, describe, delete, restore into a new volume, apply (roll back),
//! modify attributes and verify. The point-in-time capture itself lives in `capture`.

use super::auth::Caller;
use super::jobs::{self, JobProgress};
use super::manager::{page, Manager};
use super::volumes::{check_name, new_volume_row, parse_backend};
use crate::api::{self, ApiError, ErrorKind};
use crate::catalog::{now, JobRow, SnapshotRow, VolumeRow};
use crate::store::RestoreMode;
use crate::volume;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

const MIB: u64 = 1 << 20;

/// How a snapshot relates to the others, derived from the catalog's parent links.
struct Family<'a> {
    by_id: HashMap<&'a str, &'a SnapshotRow>,
    children: HashMap<&'a str, Vec<&'a str>>,
}

impl<'a> Family<'a> {
    fn new(rows: &'a [SnapshotRow]) -> Family<'a> {
        let by_id: HashMap<&str, &SnapshotRow> = rows.iter().map(|r| (r.id.as_str(), r)).collect();
        let mut children: HashMap<&str, Vec<&str>> = HashMap::new();
        for r in rows {
            if let Some(p) = r.parent_id.as_deref() {
                children.entry(p).or_default().push(r.id.as_str());
            }
        }
        Family { by_id, children }
    }

    /// `id` and its ancestors, newest first (stops at a missing link rather than looping).
    fn ancestry(&self, id: &'a str) -> Vec<&'a SnapshotRow> {
        let mut out = Vec::new();
        let mut cur = self.by_id.get(id).copied();
        while let Some(r) = cur {
            if out.len() > self.by_id.len() {
                break;
            }
            out.push(r);
            cur = r
                .parent_id
                .as_deref()
                .and_then(|p| self.by_id.get(p).copied());
        }
        out
    }

    fn descendants(&self, id: &str) -> usize {
        let mut n = 0;
        let mut stack = vec![id];
        let mut seen = HashSet::new();
        while let Some(x) = stack.pop() {
            for c in self.children.get(x).into_iter().flatten() {
                if seen.insert(*c) {
                    n += 1;
                    stack.push(c);
                }
            }
        }
        n
    }
}

fn mib(bytes: u64) -> u64 {
    bytes.div_ceil(MIB)
}

impl Manager {
    fn snapshot_item(
        &self,
        s: &SnapshotRow,
        fam: &Family<'_>,
        volumes: &HashMap<String, VolumeRow>,
    ) -> api::Snapshot {
        let ancestry = fam.ancestry(&s.id);
        let root = ancestry
            .last()
            .map(|r| r.id.clone())
            .unwrap_or_else(|| s.id.clone());
        let total_size_bytes: u64 = ancestry.iter().map(|r| r.size_bytes).sum();
        let total_count = 1 + fam.descendants(&root) as u64;
        let volume = volumes.get(&s.volume_id);
        let head_chain = volume
            .and_then(|v| v.active_head.as_deref())
            .is_some_and(|head| fam.ancestry(head).iter().any(|r| r.id == s.id));
        let is_head = !fam.children.contains_key(s.id.as_str());
        let latest = volume
            .and_then(|v| v.last_snapshot_time)
            .unwrap_or(s.snapshot_time);
        api::Snapshot {
            snapshot_id: s.id.clone(),
            snapshot_name: s.name.clone(),
            description: s.description.clone(),
            status: s.status.clone(),
            is_taken: i32::from(s.is_taken),
            snapshot_type: i32::from(s.parent_id.is_none()),
            parent_id: s.parent_id.clone().unwrap_or_else(|| "self".into()),
            root_id: root,
            head_chain: i32::from(head_chain),
            is_head: i32::from(is_head),
            total_count,
            size: mib(s.size_bytes),
            total_size: mib(total_size_bytes),
            virtual_size: mib(s.virtual_size_bytes),
            size_bytes: s.size_bytes,
            total_size_bytes,
            virtual_size_bytes: s.virtual_size_bytes,
            snapshot_time: api::format_time(s.snapshot_time),
            create_time: api::format_time(s.create_time),
            status_time: api::format_time(s.status_time),
            lastest_snapshot_time: api::format_time(latest),
            resource: api::Resource {
                resource_id: s.volume_id.clone(),
                resource_name: volume
                    .map(|v| v.name.clone())
                    .unwrap_or_else(|| s.volume_name.clone()),
                resource_type: "volume".into(),
            },
            freeze_ms: s.freeze_ms,
            consistency: s.consistency.clone(),
            visibility: "private".into(),
            provider: "self".into(),
            owner: s.owner.clone(),
            sub_code: 0,
            tags: Vec::new(),
            resource_project_info: Vec::new(),
        }
    }

    pub(super) fn describe_snapshots(
        &self,
        p: api::DescribeSnapshots,
    ) -> Result<serde_json::Value, ApiError> {
        api::IdKind::Snapshot.check_all(&p.snapshots)?;
        api::IdKind::Volume.check_all(p.resource_id.as_slice())?;
        let (rows, volumes) = self.with_catalog(|c| Ok((c.snapshots()?, c.volumes()?)))?;
        let volumes: HashMap<String, VolumeRow> =
            volumes.into_iter().map(|v| (v.id.clone(), v)).collect();
        let fam = Family::new(&rows);
        let word = p.search_word.as_deref().map(str::to_lowercase);
        let matching: Vec<&SnapshotRow> = rows
            .iter()
            .rev()
            .filter(|s| p.snapshots.is_empty() || p.snapshots.contains(&s.id))
            .filter(|s| p.resource_id.as_ref().is_none_or(|r| *r == s.volume_id))
            .filter(|s| {
                p.snapshot_type
                    .is_none_or(|t| (t == 1) == s.parent_id.is_none())
            })
            .filter(|s| p.status.is_empty() || p.status.contains(&s.status))
            .filter(|s| {
                word.as_ref().is_none_or(|w| {
                    s.id.contains(w.as_str())
                        || s.name.to_lowercase().contains(w.as_str())
                        || s.description.to_lowercase().contains(w.as_str())
                })
            })
            .collect();
        let total = matching.len();
        let items: Vec<api::Snapshot> = page(matching, p.offset, p.limit)
            .into_iter()
            .map(|s| self.snapshot_item(s, &fam, &volumes))
            .collect();
        Ok(serde_json::json!({ "snapshot_set": items, "total_count": total }))
    }

    pub(super) fn create_snapshots(
        self: &Arc<Self>,
        p: api::CreateSnapshots,
        caller: &Caller,
    ) -> Result<serde_json::Value, ApiError> {
        let config = self.config();
        if p.resources.is_empty() {
            return Err(ApiError::bad("create-snapshots needs volume ids (-r)"));
        }
        let name = p.snapshot_name.unwrap_or_default();
        check_name(&name)?;
        let block_size = config.block_size_bytes().map_err(ApiError::internal)?;
        let mut seen = HashSet::new();
        let mut plans = Vec::new();
        for id in &p.resources {
            if !seen.insert(id.clone()) {
                return Err(ApiError::bad(format!("volume {id} is named twice")));
            }
            let v = self.live_volume(id)?;
            if v.status == "pending" {
                return Err(ApiError::busy(format!(
                    "volume {} is {} ({})",
                    v.id, v.status, v.transition_status
                )));
            }
            if self.is_lazy(&v.id) {
                return Err(ApiError::busy(format!(
                    "volume {} is served by its lazy restore; once the restore job has ended, detach and attach it once to snapshot it",
                    v.id
                )));
            }
            if !p.force {
                self.refuse_open_writers(&v)?;
            }
            plans.push(v);
        }
        let job_id = api::new_job_id().to_string();
        // Quota and chain decisions and the pending rows are one catalog transaction's worth
        // of work under the catalog lock, so two racing calls cannot both pass the quota.
        let rows = self.with_catalog(|c| {
            let all = c.snapshots()?;
            let fam = Family::new(&all);
            let mut out = Vec::new();
            for v in &plans {
                let count = all.iter().filter(|s| s.volume_id == v.id).count() as u32;
                if count >= config.limits.snapshots_per_volume {
                    return Ok(Err(ApiError::new(
                        ErrorKind::QuotaExceeded,
                        format!(
                            "volume {} has {count} snapshots; the quota is {} (limits.snapshots_per_volume): delete some first",
                            v.id, config.limits.snapshots_per_volume
                        ),
                    )));
                }
                let parent = match (p.is_full, v.active_head.as_deref()) {
                    (Some(1), _) | (_, None) => None,
                    (_, Some(head)) => {
                        let depth = fam.ancestry(head).len() as u32;
                        let usable = fam.by_id.get(head).is_some_and(|h| h.status == "available");
                        (usable && depth < config.limits.max_chain_length).then(|| head.to_string())
                    }
                };
                let t = now();
                let row = SnapshotRow {
                    id: api::new_snapshot_id().to_string(),
                    volume_id: v.id.clone(),
                    volume_name: v.name.clone(),
                    name: name.clone(),
                    description: String::new(),
                    status: "pending".into(),
                    is_taken: false,
                    parent_id: parent,
                    size_bytes: 0,
                    virtual_size_bytes: v.size_bytes,
                    snapshot_time: t,
                    create_time: t,
                    status_time: t,
                    freeze_ms: 0,
                    consistency: "crash".into(),
                    owner: caller.user.clone(),
                    job_id: Some(job_id.clone()),
                };
                c.upsert_snapshot(&row)?;
                out.push(row);
            }
            Ok(Ok(out))
        })??;
        let ids: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
        let volume_ids: Vec<String> = rows.iter().map(|r| r.volume_id.clone()).collect();
        let force = p.force;
        let job = JobRow::new(
            &job_id,
            "CreateSnapshots",
            volume_ids.clone(),
            serde_json::json!({ "snapshots": ids, "force": force }),
        );
        let work_rows = rows.clone();
        jobs::submit(
            self,
            job,
            volume_ids,
            Box::new(move |m: &Arc<Manager>, progress: &JobProgress| {
                let mut failures = Vec::new();
                let mut first_kind = None;
                for row in &work_rows {
                    if let Err(e) = m.take_snapshot(row, block_size, force, progress) {
                        let _ = m.discard_snapshot(&row.id);
                        first_kind.get_or_insert(e.kind);
                        failures.push(format!(
                            "snapshot {} of volume {}: {}",
                            row.id, row.volume_id, e.message
                        ));
                        if progress.is_cancelled() {
                            return Err(jobs::cancelled_error());
                        }
                    }
                }
                match first_kind {
                    None => Ok(()),
                    Some(kind) => Err(ApiError::new(kind, failures.join("; "))),
                }
            }),
        )
        .inspect_err(|_| {
            // No job will ever take these: they must not stay pending.
            for row in &rows {
                let _ = self.discard_snapshot(&row.id);
            }
        })?;
        Ok(serde_json::json!({ "snapshots": ids, "job_id": job_id }))
    }

    /// Removes a snapshot that did not complete: its store leftovers and its row.
    pub(super) fn discard_snapshot(&self, id: &str) -> Result<(), ApiError> {
        if let Ok(sid) = id.parse::<api::SnapshotId>() {
            if self.store().manifest(&sid).is_ok() {
                self.store().delete(&sid, &crate::store::NoProgress)?;
            }
        }
        self.with_catalog(|c| c.delete_snapshot_row(id))
    }

    /// Refuses (2500) an attached, unmounted volume that processes hold open for writing.
    pub(super) fn refuse_open_writers(&self, v: &VolumeRow) -> Result<(), ApiError> {
        if !(v.attached && v.backend == "loop" && !v.device.is_empty()) {
            return Ok(());
        }
        let device = std::path::Path::new(&v.device);
        if !volume::mountpoints(device).is_empty() {
            return Ok(());
        }
        let writers = volume::open_writers(device);
        if writers.is_empty() {
            return Ok(());
        }
        Err(ApiError::busy(format!(
            "volume {} ({}) is not mounted but open for writing by {}; stop them, or pass --force for a crash-consistent snapshot",
            v.id,
            v.device,
            writers.join(", ")
        )))
    }

    pub(super) fn delete_snapshots(
        self: &Arc<Self>,
        p: api::DeleteSnapshots,
    ) -> Result<serde_json::Value, ApiError> {
        let rows = self.available_snapshots(&p.snapshots, "delete-snapshots")?;
        self.submit_snapshot_job("DeleteSnapshots", &rows, Manager::delete_list)
    }

    /// The work of DeleteSnapshots (also resumed at start).
    pub(super) fn delete_list(
        &self,
        ids: &[String],
        progress: &JobProgress,
    ) -> Result<(), ApiError> {
        for id in ids {
            self.delete_snapshot(id, progress)?;
        }
        Ok(())
    }

    /// The work of ApplySnapshots (also resumed at start).
    pub(super) fn apply_list(
        &self,
        ids: &[String],
        progress: &JobProgress,
    ) -> Result<(), ApiError> {
        for id in ids {
            self.apply_snapshot(id, progress)?;
        }
        Ok(())
    }

    /// The snapshots named by a call, each `available`; refuses an empty list.
    fn available_snapshots(
        &self,
        ids: &[String],
        verb: &str,
    ) -> Result<Vec<SnapshotRow>, ApiError> {
        if ids.is_empty() {
            return Err(ApiError::bad(format!("{verb} needs snapshot ids (-s)")));
        }
        ids.iter()
            .map(|id| {
                let s = self.snapshot_row(id)?;
                if s.status != "available" {
                    return Err(ApiError::busy(format!(
                        "snapshot {} is {}; wait for its job to end",
                        s.id, s.status
                    )));
                }
                Ok(s)
            })
            .collect()
    }

    /// Starts a job over `rows` that locks their volumes and runs `work` on their ids.
    fn submit_snapshot_job(
        self: &Arc<Self>,
        action: &str,
        rows: &[SnapshotRow],
        work: fn(&Manager, &[String], &JobProgress) -> Result<(), ApiError>,
    ) -> Result<serde_json::Value, ApiError> {
        let ids: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
        let locks: Vec<String> = rows.iter().map(|r| r.volume_id.clone()).collect();
        let job = JobRow::new(
            &api::new_job_id().to_string(),
            action,
            ids.clone(),
            serde_json::json!({ "snapshots": ids }),
        );
        let work_ids = ids.clone();
        let job_id = jobs::submit(
            self,
            job,
            locks,
            Box::new(move |m: &Arc<Manager>, progress: &JobProgress| work(m, &work_ids, progress)),
        )?;
        Ok(serde_json::json!({ "snapshots": ids, "job_id": job_id }))
    }

    /// Deletes one snapshot from the store (folding it into its children) and the catalog.
    pub(super) fn delete_snapshot(&self, id: &str, progress: &JobProgress) -> Result<(), ApiError> {
        let Some(row) = self.with_catalog(|c| c.snapshot(id))? else {
            return Ok(()); // Already gone: a resumed job finishing its list.
        };
        let sid: api::SnapshotId = id.parse().map_err(ApiError::bad)?;
        match self.store().manifest(&sid) {
            Ok(_) => self.store().delete(&sid, progress)?,
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        self.with_catalog(|c| {
            for mut child in c
                .snapshots()?
                .into_iter()
                .filter(|s| s.parent_id.as_deref() == Some(id))
            {
                child.parent_id = row.parent_id.clone();
                c.upsert_snapshot(&child)?;
            }
            if let Some(mut v) = c.volume(&row.volume_id)? {
                if v.active_head.as_deref() == Some(id) {
                    // The volume still holds what `id` captured; its parent's hashes remain a
                    // correct base for the next incremental.
                    v.active_head = row.parent_id.clone();
                    c.update_volume(&v)?;
                }
            }
            c.delete_snapshot_row(id)
        })
    }

    pub(super) fn create_volume_from_snapshot(
        self: &Arc<Self>,
        p: api::CreateVolumeFromSnapshot,
        caller: &Caller,
    ) -> Result<serde_json::Value, ApiError> {
        let config = self.config();
        let sid = p
            .snapshot
            .ok_or_else(|| ApiError::bad("create-volume-from-snapshot needs a snapshot id (-s)"))?;
        let s = self.snapshot_row(&sid)?;
        if s.status != "available" {
            return Err(ApiError::busy(format!("snapshot {} is {}", s.id, s.status)));
        }
        let name = p.volume_name.unwrap_or_default();
        check_name(&name)?;
        let default_backend = if p.lazy {
            crate::config::Backend::Nbd
        } else {
            config.default_backend
        };
        let backend = parse_backend(p.backend.as_deref(), default_backend)?;
        let vid = api::new_volume_id().to_string();
        if p.lazy {
            if backend != crate::config::Backend::Nbd {
                return Err(ApiError::bad(
                    "--lazy restore needs the nbd backend: reads of blocks not yet copied are served by the daemon",
                ));
            }
            return self.create_lazy_volume(&s, &vid, &name, caller);
        }
        self.with_catalog(|c| {
            c.insert_volume(&new_volume_row(
                &vid,
                &name,
                s.virtual_size_bytes,
                backend,
                &caller.user,
            ))
        })?;
        let job = JobRow::new(
            &api::new_job_id().to_string(),
            "CreateVolumeFromSnapshot",
            vec![vid.clone()],
            serde_json::json!({ "snapshot": s.id, "volume": vid }),
        );
        let (work_vid, work_sid) = (vid.clone(), s.id.clone());
        let job_id = jobs::submit(
            self,
            job,
            vec![vid.clone(), s.volume_id.clone()],
            Box::new(move |m: &Arc<Manager>, progress: &JobProgress| {
                m.restore_new_volume(&work_vid, &work_sid, progress)
            }),
        )
        .inspect_err(|_| {
            // No job will ever fill it: the volume never existed.
            let _ = self.update_volume(&vid, |v| {
                v.status = "deleted".into();
                v.transition_status.clear();
            });
        })?;
        Ok(serde_json::json!({ "volume_id": vid, "job_id": job_id }))
    }

    /// A lazily restored volume: usable at once, hydrated by a background job.
    fn create_lazy_volume(
        self: &Arc<Self>,
        s: &SnapshotRow,
        vid: &str,
        name: &str,
        caller: &Caller,
    ) -> Result<serde_json::Value, ApiError> {
        let state_dir = self.state_dir();
        let image = volume::image_path(&state_dir, vid);
        volume::create_image(&image, s.virtual_size_bytes)
            .map_err(|e| ApiError::from_volume(e, vid))?;
        let mut row = new_volume_row(
            vid,
            name,
            s.virtual_size_bytes,
            crate::config::Backend::Nbd,
            &caller.user,
        );
        row.status = "available".into();
        row.transition_status = "restoring".into();
        let registered = super::lazy::write_marker(&state_dir, vid, &s.id)
            .and_then(|()| self.with_catalog(|c| c.insert_volume(&row)));
        if let Err(e) = registered {
            // No row names them: nothing would ever remove the image and the marker.
            super::lazy::forget(&state_dir, vid);
            let _ = volume::remove_image(&image);
            return Err(e);
        }
        let job = JobRow::new(
            &api::new_job_id().to_string(),
            "CreateVolumeFromSnapshot",
            vec![vid.to_string()],
            serde_json::json!({ "snapshot": s.id, "volume": vid, "lazy": true }),
        );
        let (work_vid, work_sid) = (vid.to_string(), s.id.clone());
        // The new volume itself is not locked: it is attached and used while it hydrates.
        let job_id = jobs::submit(
            self,
            job,
            vec![s.volume_id.clone()],
            Box::new(move |m: &Arc<Manager>, progress: &JobProgress| {
                m.hydrate(&work_vid, &work_sid, progress)
            }),
        )
        .inspect_err(|_| {
            // Without its hydration job the volume would never be complete: it never existed.
            super::lazy::forget(&state_dir, vid);
            let _ = volume::remove_image(&image);
            let _ = self.update_volume(vid, |v| {
                v.status = "deleted".into();
                v.transition_status.clear();
            });
        })?;
        Ok(serde_json::json!({ "volume_id": vid, "job_id": job_id }))
    }

    /// The work of CreateVolumeFromSnapshot: a new sparse image filled from the chain.
    pub(super) fn restore_new_volume(
        &self,
        vid: &str,
        sid: &str,
        progress: &JobProgress,
    ) -> Result<(), ApiError> {
        let image = volume::image_path(&self.state_dir(), vid);
        let result = (|| {
            let s = self.snapshot_row(sid)?;
            let snapshot: api::SnapshotId = sid.parse().map_err(ApiError::bad)?;
            let _ = std::fs::remove_file(&image); // a resumed job starts again from nothing
            volume::create_image(&image, s.virtual_size_bytes)
                .map_err(|e| ApiError::from_volume(e, vid))?;
            let file = volume::open_image(&image).map_err(|e| ApiError::from_volume(e, vid))?;
            self.store()
                .restore(&snapshot, &file, RestoreMode::Fresh, progress)?;
            volume::sync_image(&file).map_err(|e| {
                ApiError::new(
                    ErrorKind::Io,
                    format!("cannot sync {}: {e}", image.display()),
                )
            })?;
            Ok(())
        })();
        match result {
            Ok(()) => {
                self.update_volume(vid, |v| {
                    v.status = "available".into();
                    v.transition_status.clear();
                })?;
                Ok(())
            }
            Err(e) if progress.is_cancelled() => Err(e),
            Err(e) => {
                let _ = std::fs::remove_file(&image);
                let _ = self.update_volume(vid, |v| {
                    v.status = "deleted".into();
                    v.transition_status.clear();
                });
                Err(e)
            }
        }
    }

    pub(super) fn apply_snapshots(
        self: &Arc<Self>,
        p: api::ApplySnapshots,
    ) -> Result<serde_json::Value, ApiError> {
        if p.snapshots.is_empty() {
            return Err(ApiError::bad("apply-snapshots needs snapshot ids (-s)"));
        }
        let mut plans = Vec::new();
        let mut volumes_seen = HashSet::new();
        for id in &p.snapshots {
            let s = self.snapshot_row(id)?;
            if s.status != "available" {
                return Err(ApiError::busy(format!("snapshot {} is {}", s.id, s.status)));
            }
            let v = self.live_volume(&s.volume_id).map_err(|_| {
                ApiError::not_found(format!(
                    "volume {} of snapshot {} no longer exists; use create-volume-from-snapshot",
                    s.volume_id, s.id
                ))
            })?;
            if !volumes_seen.insert(v.id.clone()) {
                return Err(ApiError::bad(format!(
                    "two snapshots of volume {} given",
                    v.id
                )));
            }
            if v.status == "pending" || self.jobs().volume_busy(&v.id) {
                return Err(ApiError::busy(format!("volume {} is busy", v.id)));
            }
            if v.attached && v.backend == "nbd" {
                return Err(ApiError::busy(format!(
                    "volume {} is exported over NBD at {}; detach it before rolling it back",
                    v.id, v.device
                )));
            }
            self.refuse_if_mounted(&v, "roll back")?;
            self.refuse_open_writers(&v)?;
            plans.push((s, v));
        }
        for (_, v) in &plans {
            // Before the job can rewrite any of them (see `apply_snapshot`).
            self.forget_tracking(&v.id)?;
            self.update_volume(&v.id, |r| r.transition_status = "restoring".into())?;
        }
        let ids: Vec<String> = plans.iter().map(|(s, _)| s.id.clone()).collect();
        let locks: Vec<String> = plans.iter().map(|(_, v)| v.id.clone()).collect();
        let job = JobRow::new(
            &api::new_job_id().to_string(),
            "ApplySnapshots",
            locks.clone(),
            serde_json::json!({ "snapshots": ids }),
        );
        let work_ids = ids.clone();
        let job_id = jobs::submit(
            self,
            job,
            locks,
            Box::new(move |m: &Arc<Manager>, progress: &JobProgress| {
                m.apply_list(&work_ids, progress)
            }),
        )
        .inspect_err(|_| {
            for (_, v) in &plans {
                let _ = self.update_volume(&v.id, |r| r.transition_status.clear());
            }
        })?;
        Ok(serde_json::json!({ "snapshots": ids, "job_id": job_id }))
    }

    /// Rolls a volume back in place; resumable (it rewrites every byte of the image).
    pub(super) fn apply_snapshot(&self, sid: &str, progress: &JobProgress) -> Result<(), ApiError> {
        let s = self.snapshot_row(sid)?;
        let v = self.live_volume(&s.volume_id)?;
        let image = volume::image_path(&self.state_dir(), &v.id);
        let result = (|| {
            // The image is rewritten behind any dirty bitmap: the next NBD snapshot must
            // rescan, whatever becomes of this job (forgotten before the first byte changes).
            self.forget_tracking(&v.id)?;
            let snapshot: api::SnapshotId = sid.parse().map_err(ApiError::bad)?;
            let file = volume::open_image(&image).map_err(|e| ApiError::from_volume(e, &v.id))?;
            self.store()
                .restore(&snapshot, &file, RestoreMode::Overwrite, progress)?;
            // The volume keeps its size: anything past the snapshot's end reads as zeros.
            volume::set_image_len(&file, v.size_bytes)
                .map_err(|e| ApiError::from_volume(e, &v.id))?;
            volume::sync_image(&file).map_err(|e| {
                ApiError::new(
                    ErrorKind::Io,
                    format!("cannot sync {}: {e}", image.display()),
                )
            })?;
            if v.attached && v.backend == "loop" {
                volume::drop_device_cache(std::path::Path::new(&v.device))
                    .map_err(|e| ApiError::from_volume(e, &v.id))?;
            }
            Ok(())
        })();
        if result.is_err() && progress.is_cancelled() {
            return result;
        }
        self.update_volume(&v.id, |r| {
            r.transition_status.clear();
            if result.is_ok() {
                r.active_head = Some(sid.to_string());
            }
        })?;
        result
    }

    pub(super) fn modify_snapshot_attributes(
        self: &Arc<Self>,
        p: api::ModifySnapshotAttributes,
    ) -> Result<serde_json::Value, ApiError> {
        let sid = p
            .snapshot
            .ok_or_else(|| ApiError::bad("modify-snapshot-attributes needs a snapshot id (-s)"))?;
        let mut s = self.snapshot_row(&sid)?;
        if p.snapshot_name.is_none() && p.description.is_none() {
            return Err(ApiError::bad(
                "nothing to modify: give -N/--snapshot-name or -D/--description",
            ));
        }
        for text in [&p.snapshot_name, &p.description].into_iter().flatten() {
            check_name(text)?;
        }
        if s.status != "available" {
            return Err(ApiError::busy(format!("snapshot {} is {}", s.id, s.status)));
        }
        let snapshot: api::SnapshotId = sid.parse().map_err(ApiError::bad)?;
        self.store().set_attributes(
            &snapshot,
            p.snapshot_name.as_deref(),
            p.description.as_deref(),
        )?;
        if let Some(n) = p.snapshot_name {
            s.name = n;
        }
        if let Some(d) = p.description {
            s.description = d;
        }
        self.with_catalog(|c| c.upsert_snapshot(&s))?;
        Ok(serde_json::json!({}))
    }

    pub(super) fn verify_snapshots(
        self: &Arc<Self>,
        p: api::VerifySnapshots,
    ) -> Result<serde_json::Value, ApiError> {
        let rows = self.available_snapshots(&p.snapshots, "verify-snapshots")?;
        self.submit_snapshot_job("VerifySnapshots", &rows, Manager::verify_list)
    }

    pub(super) fn verify_list(
        &self,
        ids: &[String],
        progress: &JobProgress,
    ) -> Result<(), ApiError> {
        let mut bad = Vec::new();
        for id in ids {
            let sid: api::SnapshotId = id.parse().map_err(ApiError::bad)?;
            let report = self.store().verify(&sid, progress)?;
            bad.extend(report.problems.iter().map(|p| {
                format!(
                    "snapshot {} ({}) bytes {}..{}: {}",
                    p.snapshot, p.file, p.start, p.end, p.reason
                )
            }));
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(ApiError::new(
                ErrorKind::Corrupt,
                format!("stored data failed its checks: {}", bad.join("; ")),
            ))
        }
    }
}

//! Volume verbs: create, attach, detach, resize, delete.

use super::auth::Caller;
use super::jobs::{self, JobProgress};
use super::manager::{message_chain, Manager};
use crate::api::{self, ApiError};
use crate::catalog::{now, JobRow, VolumeRow};
use crate::config::Backend;
use crate::store::Progress;
use crate::volume;
use std::sync::Arc;

/// The largest volume we create: 64 TiB, far beyond any test but bounded.
const MAX_VOLUME_BYTES: u64 = 64 << 40;
const MAX_COUNT: u32 = 100;
const MAX_NAME: usize = 256;

pub(super) fn check_name(name: &str) -> Result<(), ApiError> {
    if name.len() > MAX_NAME {
        return Err(ApiError::bad(format!(
            "name is longer than {MAX_NAME} bytes"
        )));
    }
    if name.chars().any(|c| c.is_control()) {
        return Err(ApiError::bad("name must not contain control characters"));
    }
    Ok(())
}

pub(super) fn check_size(bytes: u64) -> Result<(), ApiError> {
    if bytes == 0 {
        return Err(ApiError::bad("size must be more than 0"));
    }
    if bytes % 512 != 0 {
        return Err(ApiError::bad(format!(
            "size {bytes} bytes is not a multiple of 512"
        )));
    }
    if bytes > MAX_VOLUME_BYTES {
        return Err(ApiError::bad(format!(
            "size {bytes} bytes is more than the 64 TiB limit"
        )));
    }
    Ok(())
}

pub(super) fn parse_backend(text: Option<&str>, default: Backend) -> Result<Backend, ApiError> {
    match text {
        None | Some("") => Ok(default),
        Some(t) => Backend::parse(t)
            .ok_or_else(|| ApiError::bad(format!("backend {t:?} is not loop or nbd"))),
    }
}

pub(super) fn new_volume_row(
    id: &str,
    name: &str,
    size: u64,
    backend: Backend,
    owner: &str,
) -> VolumeRow {
    let t = now();
    VolumeRow {
        id: id.into(),
        name: name.into(),
        description: String::new(),
        size_bytes: size,
        status: "pending".into(),
        transition_status: "creating".into(),
        backend: backend.as_str().into(),
        device: String::new(),
        attached: false,
        owner: owner.into(),
        create_time: t,
        status_time: t,
        last_snapshot_time: None,
        active_head: None,
    }
}

impl Manager {
    pub(super) fn create_volumes(
        self: &Arc<Self>,
        p: api::CreateVolumes,
        caller: &Caller,
    ) -> Result<serde_json::Value, ApiError> {
        let config = self.config();
        let size = p
            .size
            .ok_or_else(|| ApiError::bad("create-volumes needs a size (-s)"))?
            .0;
        check_size(size)?;
        let count = p.count.unwrap_or(1);
        if count == 0 || count > MAX_COUNT {
            return Err(ApiError::bad(format!(
                "count must be between 1 and {MAX_COUNT}"
            )));
        }
        let name = p.volume_name.unwrap_or_default();
        check_name(&name)?;
        let backend = parse_backend(p.backend.as_deref(), config.default_backend)?;
        let ids: Vec<String> = (0..count)
            .map(|_| api::new_volume_id().to_string())
            .collect();
        self.with_catalog(|c| {
            for id in &ids {
                c.insert_volume(&new_volume_row(id, &name, size, backend, &caller.user))?;
            }
            Ok(())
        })?;
        let job = JobRow::new(
            &api::new_job_id().to_string(),
            "CreateVolumes",
            ids.clone(),
            serde_json::json!({}),
        );
        let work_ids = ids.clone();
        let job_id = jobs::submit(
            self,
            job,
            ids.clone(),
            Box::new(move |m: &Arc<Manager>, progress: &JobProgress| {
                m.create_images(&work_ids, size, progress)
            }),
        )
        .inspect_err(|_| {
            // No job will ever create them: the volumes never existed.
            for id in &ids {
                let _ = self.update_volume(id, |v| {
                    v.status = "deleted".into();
                    v.transition_status.clear();
                });
            }
        })?;
        Ok(serde_json::json!({ "volumes": ids, "job_id": job_id }))
    }

    /// The work of CreateVolumes (also resumed at start): sparse images, then `available`.
    pub(super) fn create_images(
        &self,
        ids: &[String],
        size: u64,
        progress: &JobProgress,
    ) -> Result<(), ApiError> {
        progress.set_total(size * ids.len() as u64);
        let dir = self.state_dir();
        for (i, id) in ids.iter().enumerate() {
            let path = volume::image_path(&dir, id);
            let made = volume::create_image(&path, size)
                .map_err(|e| ApiError::from_volume(e, id))
                .and_then(|()| {
                    self.update_volume(id, |v| {
                        v.status = "available".into();
                        v.transition_status.clear();
                    })
                });
            if let Err(e) = made {
                // This volume and the ones not made yet never existed: none stays pending.
                for rest in &ids[i..] {
                    let _ = volume::remove_image(&volume::image_path(&dir, rest));
                    let _ = self.update_volume(rest, |v| {
                        v.status = "deleted".into();
                        v.transition_status.clear();
                    });
                }
                return Err(e);
            }
            progress.advance(size);
        }
        Ok(())
    }

    /// Loads, changes and stores one volume row (status_time follows status changes).
    pub(super) fn update_volume(
        &self,
        id: &str,
        f: impl FnOnce(&mut VolumeRow),
    ) -> Result<VolumeRow, ApiError> {
        self.with_catalog(|c| {
            let Some(mut v) = c.volume(id)? else {
                return Ok(None);
            };
            let before = (v.status.clone(), v.transition_status.clone());
            f(&mut v);
            if before != (v.status.clone(), v.transition_status.clone()) {
                v.status_time = now();
            }
            c.update_volume(&v)?;
            Ok(Some(v))
        })?
        .ok_or_else(|| ApiError::not_found(format!("volume {id} not found")))
    }

    fn volumes_in_state(&self, ids: &[String], verb: &str) -> Result<Vec<VolumeRow>, ApiError> {
        if ids.is_empty() {
            return Err(ApiError::bad(format!("{verb} needs volume ids (-v)")));
        }
        let rows: Vec<VolumeRow> = ids
            .iter()
            .map(|id| self.live_volume(id))
            .collect::<Result<_, _>>()?;
        for v in &rows {
            if v.status == "pending" {
                return Err(ApiError::busy(format!(
                    "volume {} is {} ({})",
                    v.id, v.status, v.transition_status
                )));
            }
        }
        Ok(rows)
    }

    pub(super) fn attach_volumes(
        self: &Arc<Self>,
        p: api::AttachVolumes,
    ) -> Result<serde_json::Value, ApiError> {
        // Held first, so that the rows checked below are the ones changed.
        let _held = self.hold_volumes(&p.volumes)?;
        let rows = self.volumes_in_state(&p.volumes, "attach-volumes")?;
        for v in &rows {
            if v.attached {
                return Err(ApiError::busy(format!(
                    "volume {} is already attached at {}",
                    v.id, v.device
                )));
            }
        }
        for v in rows {
            let device = self.expose(&v)?;
            self.update_volume(&v.id, |r| {
                r.attached = true;
                r.device = device;
                r.status = "in-use".into();
            })?;
        }
        Ok(serde_json::json!({}))
    }

    /// Exposes a volume through its backend: a loop device or an NBD export. Returns `device`.
    pub(super) fn expose(&self, v: &VolumeRow) -> Result<String, ApiError> {
        let image = volume::image_path(&self.state_dir(), &v.id);
        match Backend::parse(&v.backend) {
            Some(Backend::Nbd) => {
                let state_dir = self.state_dir();
                if let Some(sid) = super::lazy::lazy_source(&state_dir, &v.id) {
                    let lazy = self.lazy_export(&v.id, &sid)?;
                    self.nbd
                        .add_export(&v.id, lazy)
                        .map_err(|e| ApiError::new(e.kind(), format!("volume {}: {e}", v.id)))?;
                    self.connect_kernel_device(&v.id);
                    return Ok(crate::nbd::nbd_uri(&v.id, &self.config().nbd_socket_path()));
                }
                let tracker =
                    Arc::new(super::nbd_capture::open_tracker(&state_dir, &v.id, &image)?);
                self.nbd
                    .add_export(&v.id, tracker.clone())
                    .map_err(|e| ApiError::new(e.kind(), format!("volume {}: {e}", v.id)))?;
                self.set_tracker(&v.id, Some(tracker));
                self.connect_kernel_device(&v.id);
                Ok(crate::nbd::nbd_uri(&v.id, &self.config().nbd_socket_path()))
            }
            _ => volume::attach_loop(&image).map_err(|e| ApiError::from_volume(e, &v.id)),
        }
    }

    /// Where the kernel has the nbd driver, also connects the volume's export to a
    /// /dev/nbdN (kept with the export, disconnected when it is removed). `device` stays
    /// the URI; a failure leaves the volume reachable by it.
    fn connect_kernel_device(&self, id: &str) {
        match self.nbd.connect_kernel_device(id) {
            Ok(Some(dev)) => {
                tracing::info!(volume = id, device = %dev.display(), "volume also attached as a kernel block device");
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(volume = id, error = %message_chain(&e), "cannot connect the volume to the kernel's nbd driver; it stays reachable by URI");
            }
        }
    }

    pub(super) fn detach_volumes(
        self: &Arc<Self>,
        p: api::DetachVolumes,
    ) -> Result<serde_json::Value, ApiError> {
        // No job starts on these volumes until they are detached: a snapshot must not open
        // an epoch on an export whose connections are being waited for. Held first, so
        // that the rows checked below are the ones changed.
        let _held = self.hold_volumes(&p.volumes)?;
        let rows = self.volumes_in_state(&p.volumes, "detach-volumes")?;
        for v in &rows {
            if !v.attached {
                return Err(ApiError::busy(format!("volume {} is not attached", v.id)));
            }
            self.refuse_if_mounted(v, "detach")?;
        }
        for v in rows {
            self.unexpose(&v)?;
            self.update_volume(&v.id, |r| {
                r.attached = false;
                r.device.clear();
                r.status = "available".into();
            })?;
        }
        Ok(serde_json::json!({}))
    }

    pub(super) fn unexpose(&self, v: &VolumeRow) -> Result<(), ApiError> {
        match Backend::parse(&v.backend) {
            Some(Backend::Nbd) => {
                // Returns once the export's connections have ended: nothing they had read
                // can change the image after the volume is detached (or rolled back).
                let removed = self.nbd.remove_export(&v.id);
                // Closed trackers also refuse the writes of a connection still stuck.
                self.set_tracker(&v.id, None);
                self.drop_lazy(&v.id);
                match removed {
                    Err(e @ crate::nbd::NbdError::ExportStillInUse { .. }) => Err(ApiError::new(
                        e.kind(),
                        format!("volume {}: {}", v.id, message_chain(&e)),
                    )),
                    // Not exported (nothing to end), or removed and every connection ended.
                    _ => Ok(()),
                }
            }
            _ => volume::detach_loop(
                std::path::Path::new(&v.device),
                &volume::image_path(&self.state_dir(), &v.id),
            )
            .map_err(|e| ApiError::from_volume(e, &v.id)),
        }
    }

    /// [`jobs::Jobs::hold_volumes`] of the volumes named in a request.
    fn hold_volumes(
        &self,
        ids: &[String],
    ) -> Result<Vec<tokio::sync::OwnedMutexGuard<()>>, ApiError> {
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        self.jobs().hold_volumes(&ids)
    }

    /// Refuses with 2500 naming the mountpoints while any filesystem of the volume is mounted.
    pub(super) fn refuse_if_mounted(&self, v: &VolumeRow, what: &str) -> Result<(), ApiError> {
        if v.attached && v.backend == "loop" && !v.device.is_empty() {
            let mounts = volume::mountpoints(std::path::Path::new(&v.device));
            if !mounts.is_empty() {
                return Err(ApiError::busy(format!(
                    "cannot {what} volume {}: {} is mounted at {}",
                    v.id,
                    v.device,
                    mounts.join(", ")
                )));
            }
        }
        Ok(())
    }

    pub(super) fn resize_volumes(
        self: &Arc<Self>,
        p: api::ResizeVolumes,
    ) -> Result<serde_json::Value, ApiError> {
        let size = p
            .size
            .ok_or_else(|| ApiError::bad("resize-volumes needs a size (-s)"))?
            .0;
        check_size(size)?;
        let _held = self.hold_volumes(&p.volumes)?;
        let rows = self.volumes_in_state(&p.volumes, "resize-volumes")?;
        for v in &rows {
            if size < v.size_bytes {
                return Err(ApiError::bad(format!(
                    "volume {} is {} bytes; volumes only grow (asked for {size})",
                    v.id, v.size_bytes
                )));
            }
            if self.is_lazy(&v.id) {
                return Err(ApiError::busy(format!(
                    "volume {} is served by its lazy restore, which is as large as the snapshot; \
                     once the restore job has ended, detach and attach it once to resize it",
                    v.id
                )));
            }
        }
        for v in rows {
            let image = volume::image_path(&self.state_dir(), &v.id);
            // New connections see the new size: an attached nbd volume's export is removed
            // (its connections ended) before the image grows and registered again after.
            let exported = v.attached && matches!(Backend::parse(&v.backend), Some(Backend::Nbd));
            if exported {
                self.unexpose(&v)?;
            }
            let grown = volume::grow_image(&image, size)
                .map_err(|e| ApiError::from_volume(e, &v.id))
                .and_then(|()| self.update_volume(&v.id, |r| r.size_bytes = size));
            if exported {
                // Exported again even if the image could not grow (at its old size).
                self.expose(&v)?;
            } else if v.attached && grown.is_ok() {
                volume::refresh_loop_capacity(std::path::Path::new(&v.device))
                    .map_err(|e| ApiError::from_volume(e, &v.id))?;
            }
            grown?;
        }
        Ok(serde_json::json!({}))
    }

    pub(super) fn delete_volumes(
        self: &Arc<Self>,
        p: api::DeleteVolumes,
    ) -> Result<serde_json::Value, ApiError> {
        let rows = self.volumes_in_state(&p.volumes, "delete-volumes")?;
        for v in &rows {
            if v.attached {
                return Err(ApiError::busy(format!(
                    "volume {} is attached at {}; detach it first",
                    v.id, v.device
                )));
            }
            if self.jobs().volume_busy(&v.id)
                || self.is_lazy(&v.id) && !v.transition_status.is_empty()
            {
                return Err(ApiError::busy(format!("volume {} has a job running", v.id)));
            }
        }
        for v in rows {
            self.forget_tracking(&v.id)?;
            super::lazy::forget(&self.state_dir(), &v.id);
            let image = volume::image_path(&self.state_dir(), &v.id);
            volume::remove_image(&image).map_err(|e| ApiError::from_volume(e, &v.id))?;
            // The row stays (as `deleted`) so that its snapshots still name their volume.
            self.update_volume(&v.id, |r| {
                r.status = "deleted".into();
                r.transition_status.clear();
                r.active_head = None;
            })?;
        }
        Ok(serde_json::json!({}))
    }
}

impl ApiError {
    pub(super) fn from_volume(e: volume::VolumeError, id: &str) -> ApiError {
        ApiError::new(
            e.kind(),
            format!("volume {id}: {}", super::manager::message_chain(&e)),
        )
    }
}

//! The manager: owner of the catalog, the store and the job runner; dispatches requests.
//!
//! Connection handlers call `handle`; everything that changes state goes through here.
//! Describe calls are answered from the catalog; long work becomes a job.

use super::auth::Caller;
use super::jobs::Jobs;
use super::metrics::Metrics;
use crate::api::{self, ApiError, ErrorKind, Request};
use crate::catalog::{Catalog, CatalogError, JobStatus, SnapshotRow, VolumeRow};
use crate::config::Config;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

/// Joins an error and its sources into one message a person can act on.
pub fn message_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    msg
}

/// True when an error was caused, somewhere down its chain, by a full filesystem.
fn out_of_space(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.raw_os_error() == Some(libc::ENOSPC) {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// Converts a module error with a `kind()` into the wire error. A full filesystem is 5100
/// (the store cannot take more) with a message that says so first.
macro_rules! into_api_error {
    ($($t:ty),*) => {$(
        impl From<$t> for ApiError {
            fn from(e: $t) -> ApiError {
                if out_of_space(&e) {
                    return ApiError::new(ErrorKind::Unavailable, format!("no space left: {}", message_chain(&e)));
                }
                ApiError::new(e.kind(), message_chain(&e))
            }
        }
    )*};
}
into_api_error!(CatalogError, crate::store::StoreError);

pub struct Manager {
    config: RwLock<Arc<Config>>,
    catalog: Mutex<Catalog>,
    store: crate::store::Store,
    jobs: Jobs,
    metrics: Metrics,
    pub(super) nbd: crate::nbd::NbdServer,
    /// The tracked exports of attached NBD volumes, by volume id.
    trackers: Mutex<HashMap<String, Arc<super::nbd_capture::Tracker>>>,
    /// Lazily restored volumes still hydrating (or served since), by volume id.
    lazies: Mutex<HashMap<String, Arc<crate::nbd::LazyExport>>>,
}

impl Manager {
    pub fn new(config: Config, catalog: Catalog, store: crate::store::Store) -> Manager {
        let jobs = Jobs::new(config.limits.max_concurrent_jobs);
        Manager {
            config: RwLock::new(Arc::new(config)),
            catalog: Mutex::new(catalog),
            store,
            jobs,
            metrics: Metrics::default(),
            nbd: crate::nbd::NbdServer::new(),
            trackers: Mutex::new(HashMap::new()),
            lazies: Mutex::new(HashMap::new()),
        }
    }

    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Applies a reloaded config. Paths and the socket cannot change while running.
    pub fn reload(&self, new: Config) -> Result<(), String> {
        let old = self.config();
        if new.state_dir != old.state_dir
            || new.socket != old.socket
            || new.store_path() != old.store_path()
        {
            return Err("state_dir, socket and store.path take effect only after a restart".into());
        }
        if let Ok(mut c) = self.config.write() {
            *c = Arc::new(new);
        }
        Ok(())
    }

    pub fn jobs(&self) -> &Jobs {
        &self.jobs
    }
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
    pub fn store(&self) -> &crate::store::Store {
        &self.store
    }
    pub fn state_dir(&self) -> PathBuf {
        self.config().state_dir.clone()
    }

    /// Runs `f` with the catalog locked, as one transaction; a catalog error becomes the wire
    /// error.
    pub fn with_catalog<T>(
        &self,
        f: impl FnOnce(&Catalog) -> Result<T, CatalogError>,
    ) -> Result<T, ApiError> {
        let catalog = self.catalog.lock().unwrap_or_else(|p| p.into_inner());
        // One transaction per call: a crash never leaves half of a change.
        catalog.atomically(f).map_err(ApiError::from)
    }

    pub(super) fn lazies(&self) -> &Mutex<HashMap<String, Arc<crate::nbd::LazyExport>>> {
        &self.lazies
    }

    /// True while a volume is (or is served as) a lazy restore.
    pub(super) fn is_lazy(&self, volume_id: &str) -> bool {
        super::lazy::lazy_source(&self.state_dir(), volume_id).is_some()
    }

    /// The tracked export of an attached NBD volume.
    pub(super) fn tracker(&self, volume_id: &str) -> Option<Arc<super::nbd_capture::Tracker>> {
        self.trackers.lock().ok()?.get(volume_id).cloned()
    }

    pub(super) fn set_tracker(
        &self,
        volume_id: &str,
        tracker: Option<Arc<super::nbd_capture::Tracker>>,
    ) {
        let mut map = self.trackers.lock().unwrap_or_else(|p| p.into_inner());
        let old = match tracker {
            Some(t) => map.insert(volume_id.to_string(), t),
            None => map.remove(volume_id),
        };
        drop(map);
        if let Some(old) = old {
            if let Err(e) = old.close() {
                tracing::error!(volume = volume_id, error = %message_chain(&e), "cannot persist the dirty bitmap");
            }
        }
    }

    /// Persists every dirty bitmap as clean (after the NBD server stopped serving).
    pub fn close_trackers(&self) {
        let ids: Vec<String> = self
            .trackers
            .lock()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        for id in ids {
            self.set_tracker(&id, None);
        }
    }

    pub fn set_status(&self, status: &str) -> Result<(), ApiError> {
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Status(status)]);
        Ok(())
    }

    /// Dispatches one authorized request.
    pub async fn handle(
        self: &Arc<Self>,
        request: Request,
        caller: &Caller,
    ) -> Result<serde_json::Value, ApiError> {
        let config = self.config();
        if let Some(zone) = request.zone() {
            if zone != config.zone {
                return Err(ApiError::bad(format!(
                    "zone {zone:?} is not this daemon's zone {:?}",
                    config.zone
                )));
            }
        }
        if self.jobs.shutting_down() {
            return Err(ApiError::new(
                ErrorKind::Unavailable,
                "the daemon is shutting down",
            ));
        }
        let m = self.clone();
        let caller = caller.clone();
        // Handlers touch the catalog, /proc and devices: keep them off the async threads.
        tokio::task::spawn_blocking(move || m.dispatch(request, &caller))
            .await
            .map_err(|e| ApiError::internal(format!("request handler panicked: {e}")))?
    }

    fn dispatch(
        self: &Arc<Self>,
        request: Request,
        caller: &Caller,
    ) -> Result<serde_json::Value, ApiError> {
        match request {
            Request::CreateVolumes(p) => self.create_volumes(p, caller),
            Request::DescribeVolumes(p) => self.describe_volumes(p),
            Request::AttachVolumes(p) => self.attach_volumes(p),
            Request::DetachVolumes(p) => self.detach_volumes(p),
            Request::ResizeVolumes(p) => self.resize_volumes(p),
            Request::DeleteVolumes(p) => self.delete_volumes(p),
            Request::CreateSnapshots(p) => self.create_snapshots(p, caller),
            Request::DescribeSnapshots(p) => self.describe_snapshots(p),
            Request::DeleteSnapshots(p) => self.delete_snapshots(p),
            Request::CreateVolumeFromSnapshot(p) => self.create_volume_from_snapshot(p, caller),
            Request::ApplySnapshots(p) => self.apply_snapshots(p),
            Request::ModifySnapshotAttributes(p) => self.modify_snapshot_attributes(p),
            Request::VerifySnapshots(p) => self.verify_snapshots(p),
            Request::DescribeJobs(p) => self.describe_jobs(p),
        }
    }

    // ---- describe

    pub(super) fn volume_item(&self, v: &VolumeRow, config: &Config) -> api::Volume {
        let mountpoints = if v.attached && v.backend == "loop" && !v.device.is_empty() {
            crate::volume::mountpoints(std::path::Path::new(&v.device))
        } else {
            Vec::new()
        };
        api::Volume {
            volume_id: v.id.clone(),
            volume_name: v.name.clone(),
            description: v.description.clone(),
            size: v.size_bytes as f64 / (1u64 << 30) as f64,
            size_bytes: v.size_bytes,
            status: v.status.clone(),
            transition_status: v.transition_status.clone(),
            backend: v.backend.clone(),
            device: v.device.clone(),
            mountpoints,
            create_time: api::format_time(v.create_time),
            status_time: api::format_time(v.status_time),
            lastest_snapshot_time: v.last_snapshot_time.map(api::format_time),
            zone_id: config.zone.clone(),
            owner: v.owner.clone(),
            volume_type: 0,
            sub_code: 0,
            tags: Vec::new(),
            resource_project_info: Vec::new(),
        }
    }

    fn describe_volumes(&self, p: api::DescribeVolumes) -> Result<serde_json::Value, ApiError> {
        api::IdKind::Volume.check_all(&p.volumes)?;
        let config = self.config();
        let rows = self.with_catalog(|c| c.volumes())?;
        let word = p.search_word.as_deref().map(str::to_lowercase);
        let matching: Vec<&VolumeRow> = rows
            .iter()
            .filter(|v| p.volumes.is_empty() || p.volumes.contains(&v.id))
            .filter(|v| {
                if p.status.is_empty() {
                    // Deleted volumes are listed only when asked for by id or by status.
                    v.status != "deleted" || !p.volumes.is_empty()
                } else {
                    p.status.contains(&v.status)
                }
            })
            .filter(|v| {
                word.as_ref().is_none_or(|w| {
                    v.id.contains(w.as_str()) || v.name.to_lowercase().contains(w.as_str())
                })
            })
            .collect();
        let total = matching.len();
        let items: Vec<api::Volume> = page(matching, p.offset, p.limit)
            .into_iter()
            .map(|v| self.volume_item(v, &config))
            .collect();
        Ok(serde_json::json!({ "volume_set": items, "total_count": total }))
    }

    fn describe_jobs(&self, p: api::DescribeJobs) -> Result<serde_json::Value, ApiError> {
        api::IdKind::Job.check_all(&p.jobs)?;
        let rows = self.with_catalog(|c| c.jobs())?;
        let matching: Vec<_> = rows
            .into_iter()
            .map(|j| self.jobs.unrecorded(&j.id).unwrap_or(j))
            .filter(|j| p.jobs.is_empty() || p.jobs.contains(&j.id))
            .filter(|j| p.status.is_empty() || p.status.iter().any(|s| s == j.status.as_str()))
            .collect();
        let total = matching.len();
        let mut items = Vec::new();
        for j in page(matching.iter().rev().collect(), p.offset, p.limit) {
            let (done, total_bytes) = if j.status.is_finished() {
                (j.done_bytes, j.total_bytes)
            } else {
                self.jobs
                    .live_progress(&j.id)
                    .unwrap_or((j.done_bytes, j.total_bytes))
            };
            items.push(api::Job {
                job_id: j.id.clone(),
                job_action: j.action.clone(),
                status: j.status.as_str().to_string(),
                resource_ids: j.resource_ids.clone(),
                progress: api::Progress {
                    done_bytes: done,
                    total_bytes,
                },
                error: j.error.clone(),
                error_code: if j.status == JobStatus::Failed {
                    j.error_code
                } else {
                    None
                },
                create_time: api::format_time(j.create_time),
                status_time: api::format_time(j.status_time),
            });
        }
        Ok(serde_json::json!({ "job_set": items, "total_count": total }))
    }

    /// Looks a volume up by id, refusing malformed ids and unknown or deleted volumes.
    pub(super) fn live_volume(&self, id: &str) -> Result<VolumeRow, ApiError> {
        let id: api::VolumeId = id.parse().map_err(ApiError::bad)?;
        match self.with_catalog(|c| c.volume(id.as_str()))? {
            Some(v) if v.status != "deleted" => Ok(v),
            _ => Err(ApiError::not_found(format!("volume {id} not found"))),
        }
    }

    pub(super) fn snapshot_row(&self, id: &str) -> Result<SnapshotRow, ApiError> {
        let id: api::SnapshotId = id.parse().map_err(ApiError::bad)?;
        self.with_catalog(|c| c.snapshot(id.as_str()))?
            .ok_or_else(|| ApiError::not_found(format!("snapshot {id} not found")))
    }

    pub fn render_metrics(&self) -> String {
        let (volumes, jobs) = self
            .with_catalog(|c| Ok((c.volumes()?, c.jobs()?)))
            .unwrap_or_default();
        let snapshots = self.with_catalog(|c| c.snapshots()).unwrap_or_default();
        let mut by_status: HashMap<String, u64> = HashMap::new();
        for v in &volumes {
            *by_status.entry(v.status.clone()).or_default() += 1;
        }
        let mut jobs_by: HashMap<String, u64> = HashMap::new();
        for j in &jobs {
            *jobs_by.entry(j.status.as_str().to_string()).or_default() += 1;
        }
        let mut snaps_by: HashMap<String, u64> = HashMap::new();
        for s in &snapshots {
            *snaps_by.entry(s.status.clone()).or_default() += 1;
        }
        self.metrics
            .render(&by_status, &jobs_by, &snaps_by, self.jobs.running())
    }
}

/// Applies `offset`/`limit` (QingCloud's default limit is 20, at most 100... we allow 1000).
pub(super) fn page<T>(items: Vec<T>, offset: Option<u64>, limit: Option<u64>) -> Vec<T> {
    let offset = offset.unwrap_or(0) as usize;
    let limit = limit.unwrap_or(1000).min(10_000) as usize;
    items.into_iter().skip(offset).take(limit).collect()
}

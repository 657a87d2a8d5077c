//! Row types of the catalog's tables.

use rusqlite::Row;

#[derive(Debug, Clone, PartialEq)]
pub struct VolumeRow {
    pub id: String,
    pub name: String,
    pub description: String,
    pub size_bytes: u64,
    pub status: String,
    pub transition_status: String,
    pub backend: String,
    pub device: String,
    /// The administrator's wish: re-attached after a restart or reboot when true.
    pub attached: bool,
    pub owner: String,
    pub create_time: i64,
    pub status_time: i64,
    pub last_snapshot_time: Option<i64>,
    /// Newest snapshot of the volume's active chain: the parent of its next incremental.
    pub active_head: Option<String>,
}

impl VolumeRow {
    pub(super) const COLUMNS: &'static str = "id, name, description, size_bytes, status, transition_status,
        backend, device, attached, owner, create_time, status_time, last_snapshot_time, active_head";

    pub(super) fn from_row(r: &Row<'_>) -> rusqlite::Result<VolumeRow> {
        Ok(VolumeRow {
            id: r.get(0)?,
            name: r.get(1)?,
            description: r.get(2)?,
            size_bytes: r.get::<_, i64>(3)? as u64,
            status: r.get(4)?,
            transition_status: r.get(5)?,
            backend: r.get(6)?,
            device: r.get(7)?,
            attached: r.get(8)?,
            owner: r.get(9)?,
            create_time: r.get(10)?,
            status_time: r.get(11)?,
            last_snapshot_time: r.get(12)?,
            active_head: r.get(13)?,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotRow {
    pub id: String,
    pub volume_id: String,
    pub volume_name: String,
    pub name: String,
    pub description: String,
    /// `pending` until committed to the store, then `available`.
    pub status: String,
    pub is_taken: bool,
    pub parent_id: Option<String>,
    pub size_bytes: u64,
    pub virtual_size_bytes: u64,
    pub snapshot_time: i64,
    pub create_time: i64,
    pub status_time: i64,
    pub freeze_ms: u64,
    pub consistency: String,
    pub owner: String,
    pub job_id: Option<String>,
}

impl SnapshotRow {
    pub(super) const COLUMNS: &'static str = "id, volume_id, volume_name, name, description, status,
        is_taken, parent_id, size_bytes, virtual_size_bytes, snapshot_time, create_time, status_time,
        freeze_ms, consistency, owner, job_id";

    pub(super) fn from_row(r: &Row<'_>) -> rusqlite::Result<SnapshotRow> {
        Ok(SnapshotRow {
            id: r.get(0)?,
            volume_id: r.get(1)?,
            volume_name: r.get(2)?,
            name: r.get(3)?,
            description: r.get(4)?,
            status: r.get(5)?,
            is_taken: r.get(6)?,
            parent_id: r.get(7)?,
            size_bytes: r.get::<_, i64>(8)? as u64,
            virtual_size_bytes: r.get::<_, i64>(9)? as u64,
            snapshot_time: r.get(10)?,
            create_time: r.get(11)?,
            status_time: r.get(12)?,
            freeze_ms: r.get::<_, i64>(13)? as u64,
            consistency: r.get(14)?,
            owner: r.get(15)?,
            job_id: r.get(16)?,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStatus {
    Pending,
    Working,
    Successful,
    Failed,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pending => "pending",
            JobStatus::Working => "working",
            JobStatus::Successful => "successful",
            JobStatus::Failed => "failed",
        }
    }
    fn parse(s: &str) -> JobStatus {
        match s {
            "pending" => JobStatus::Pending,
            "working" => JobStatus::Working,
            "successful" => JobStatus::Successful,
            _ => JobStatus::Failed,
        }
    }
    pub fn is_finished(self) -> bool {
        matches!(self, JobStatus::Successful | JobStatus::Failed)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    pub id: String,
    pub action: String,
    pub status: JobStatus,
    pub resource_ids: Vec<String>,
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub error: Option<String>,
    pub error_code: Option<i32>,
    /// What the job needs to be resumed after a restart.
    pub params: serde_json::Value,
    pub create_time: i64,
    pub status_time: i64,
}

impl JobRow {
    pub fn new(
        id: &str,
        action: &str,
        resource_ids: Vec<String>,
        params: serde_json::Value,
    ) -> JobRow {
        let t = super::now();
        JobRow {
            id: id.into(),
            action: action.into(),
            status: JobStatus::Pending,
            resource_ids,
            done_bytes: 0,
            total_bytes: 0,
            error: None,
            error_code: None,
            params,
            create_time: t,
            status_time: t,
        }
    }

    pub(super) const COLUMNS: &'static str =
        "id, action, status, resource_ids, done_bytes, total_bytes,
        error, error_code, params, create_time, status_time";

    pub(super) fn from_row(r: &Row<'_>) -> rusqlite::Result<JobRow> {
        let resources: String = r.get(3)?;
        let params: String = r.get(8)?;
        Ok(JobRow {
            id: r.get(0)?,
            action: r.get(1)?,
            status: JobStatus::parse(&r.get::<_, String>(2)?),
            resource_ids: serde_json::from_str(&resources).unwrap_or_default(),
            done_bytes: r.get::<_, i64>(4)? as u64,
            total_bytes: r.get::<_, i64>(5)? as u64,
            error: r.get(6)?,
            error_code: r.get(7)?,
            params: serde_json::from_str(&params).unwrap_or(serde_json::Value::Null),
            create_time: r.get(9)?,
            status_time: r.get(10)?,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct FrozenRow {
    pub mountpoint: String,
    pub volume_id: String,
    pub since: i64,
}

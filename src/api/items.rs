//! The items of `volume_set`, `snapshot_set` and `job_set`, field for field as the contract
//! (and QingCloud, including its spelling `lastest_snapshot_time`) names them.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Volume {
    pub volume_id: String,
    pub volume_name: String,
    pub description: String,
    /// GiB, may be fractional.
    pub size: f64,
    pub size_bytes: u64,
    pub status: String,
    pub transition_status: String,
    pub backend: String,
    pub device: String,
    pub mountpoints: Vec<String>,
    pub create_time: String,
    pub status_time: String,
    pub lastest_snapshot_time: Option<String>,
    pub zone_id: String,
    pub owner: String,
    pub volume_type: i32,
    pub sub_code: i32,
    pub tags: Vec<serde_json::Value>,
    pub resource_project_info: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resource {
    pub resource_id: String,
    pub resource_name: String,
    pub resource_type: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub snapshot_id: String,
    pub snapshot_name: String,
    pub description: String,
    pub status: String,
    pub is_taken: i32,
    pub snapshot_type: i32,
    pub parent_id: String,
    pub root_id: String,
    pub head_chain: i32,
    pub is_head: i32,
    pub total_count: u64,
    /// MiB stored by this snapshot itself.
    pub size: u64,
    /// MiB stored by its chain up to it.
    pub total_size: u64,
    /// MiB of the volume.
    pub virtual_size: u64,
    pub size_bytes: u64,
    pub total_size_bytes: u64,
    pub virtual_size_bytes: u64,
    pub snapshot_time: String,
    pub create_time: String,
    pub status_time: String,
    pub lastest_snapshot_time: String,
    pub resource: Resource,
    pub freeze_ms: u64,
    pub consistency: String,
    pub visibility: String,
    pub provider: String,
    pub owner: String,
    pub sub_code: i32,
    pub tags: Vec<serde_json::Value>,
    pub resource_project_info: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Progress {
    pub done_bytes: u64,
    pub total_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub job_id: String,
    pub job_action: String,
    pub status: String,
    pub resource_ids: Vec<String>,
    pub progress: Progress,
    pub error: Option<String>,
    /// The failure's `ret_code` when `status` is `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<i32>,
    pub create_time: String,
    pub status_time: String,
}

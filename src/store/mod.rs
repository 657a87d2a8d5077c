//! TEMP STUB (replaced by the store branch)
#![allow(dead_code, unused_variables)]
use crate::api::{ErrorKind, SnapshotId, VolumeId};
use std::fs::File;
use std::path::Path;
#[derive(Debug, thiserror::Error)]
#[error("stub")]
pub struct StoreError;
impl StoreError {
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::Internal
    }
}
pub trait Progress: Sync {
    fn set_total(&self, bytes: u64);
    fn advance(&self, bytes: u64);
    fn cancelled(&self) -> bool {
        false
    }
}
pub struct NoProgress;
impl Progress for NoProgress {
    fn set_total(&self, _: u64) {}
    fn advance(&self, _: u64) {}
}
#[derive(Clone)]
pub struct Store;
#[derive(Debug)]
pub struct RecoveryReport;
pub struct VerifyReport;
impl VerifyReport {
    pub fn problems(&self) -> Vec<String> {
        vec![]
    }
}
pub enum RestoreMode {
    Fresh,
    Overwrite,
}
pub struct Manifest {
    pub id: SnapshotId,
    pub volume_id: VolumeId,
    pub volume_name: String,
    pub name: String,
    pub description: String,
    pub owner: String,
    pub parent: Option<SnapshotId>,
    pub volume_size: u64,
    pub block_size: u32,
    pub snapshot_time: i64,
    pub create_time: i64,
    pub freeze_ms: u64,
    pub consistency: String,
    pub stored_bytes: u64,
}
pub struct SnapshotMeta {
    pub id: SnapshotId,
    pub volume_id: VolumeId,
    pub volume_name: String,
    pub name: String,
    pub description: String,
    pub owner: String,
    pub parent: Option<SnapshotId>,
    pub volume_size: u64,
    pub block_size: u32,
    pub snapshot_time: i64,
    pub freeze_ms: u64,
    pub consistency: String,
}
impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Ok(Store)
    }
    pub fn list(&self) -> Result<Vec<Manifest>, StoreError> {
        Ok(vec![])
    }
    pub fn manifest(&self, id: &SnapshotId) -> Result<Manifest, StoreError> {
        Err(StoreError)
    }
    pub fn recover(&self) -> Result<RecoveryReport, StoreError> {
        Ok(RecoveryReport)
    }
    pub fn set_attributes(
        &self,
        id: &SnapshotId,
        name: Option<&str>,
        description: Option<&str>,
    ) -> Result<Manifest, StoreError> {
        Err(StoreError)
    }
    pub fn delete(&self, id: &SnapshotId, progress: &dyn Progress) -> Result<(), StoreError> {
        Ok(())
    }
    pub fn verify(
        &self,
        id: &SnapshotId,
        progress: &dyn Progress,
    ) -> Result<VerifyReport, StoreError> {
        Ok(VerifyReport)
    }
    pub fn restore(
        &self,
        id: &SnapshotId,
        target: &File,
        mode: RestoreMode,
        progress: &dyn Progress,
    ) -> Result<(), StoreError> {
        Ok(())
    }
}
pub fn capture(
    store: &Store,
    meta: SnapshotMeta,
    source: &File,
    progress: &dyn Progress,
) -> Result<Manifest, StoreError> {
    Err(StoreError)
}

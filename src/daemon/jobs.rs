//! The job runner: long work with an id, persisted state and live progress.
//!
//! A job waits for the locks of every volume it touches (work on one volume is serialized),
//! then for one of `max_concurrent_jobs` slots, then runs its work on a blocking thread.
//! Progress lives in memory while a job runs and is written to the catalog when it ends.
//! On shutdown the running work is asked to stop; its row stays `working` so that the next
//! start resumes or fails it (see `recovery`).

use super::manager::Manager;
use crate::api::{ApiError, ErrorKind};
use crate::catalog::{now, JobRow, JobStatus};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Semaphore;

/// Live progress of a running job; also the store's `Progress`.
#[derive(Debug, Default)]
pub struct JobProgress {
    done: AtomicU64,
    total: AtomicU64,
    cancel: Arc<AtomicBool>,
}

impl JobProgress {
    pub fn get(&self) -> (u64, u64) {
        (
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        )
    }
    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}

impl crate::store::Progress for JobProgress {
    fn set_total(&self, bytes: u64) {
        self.total.store(bytes, Ordering::Relaxed);
        self.done.store(0, Ordering::Relaxed);
    }
    fn advance(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
    }
    fn cancelled(&self) -> bool {
        self.is_cancelled()
    }
}

/// The work of a job: runs on a blocking thread; an error fails the job with its message.
pub type Work =
    Box<dyn FnOnce(&Arc<Manager>, &JobProgress) -> Result<(), ApiError> + Send + 'static>;

pub struct Jobs {
    slots: Arc<Semaphore>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    live: Mutex<HashMap<String, Arc<JobProgress>>>,
    /// Volumes with a job submitted and not yet ended, with how many.
    busy: Mutex<HashMap<String, usize>>,
    /// Set at shutdown: running work stops at its next progress check.
    cancel: Arc<AtomicBool>,
    tracker: tokio_util::task::TaskTracker,
    /// The state of jobs whose last catalog write failed: what `describe-jobs` shows for
    /// them until this process ends (the catalog's row is what the next start sees).
    unrecorded: Mutex<HashMap<String, JobRow>>,
    /// Woken whenever a job ends, and at shutdown: for callers waiting for a job's end.
    ended: tokio::sync::Notify,
}

impl Jobs {
    pub fn new(max_concurrent: u32) -> Jobs {
        Jobs {
            slots: Arc::new(Semaphore::new(max_concurrent.max(1) as usize)),
            locks: Mutex::new(HashMap::new()),
            live: Mutex::new(HashMap::new()),
            busy: Mutex::new(HashMap::new()),
            cancel: Arc::new(AtomicBool::new(false)),
            tracker: tokio_util::task::TaskTracker::default(),
            unrecorded: Mutex::new(HashMap::new()),
            ended: tokio::sync::Notify::new(),
        }
    }

    /// A job's state when the catalog could not be told its latest.
    pub fn unrecorded(&self, job_id: &str) -> Option<JobRow> {
        self.unrecorded.lock().ok()?.get(job_id).cloned()
    }

    /// Writes a job's row; when that fails, keeps the state in memory so that callers waiting
    /// for the job still see it end.
    fn record(&self, manager: &Manager, job: &JobRow) -> Result<(), ApiError> {
        let result = manager.with_catalog(|c| c.upsert_job(job));
        if let Ok(mut u) = self.unrecorded.lock() {
            if result.is_ok() {
                u.remove(&job.id);
            } else {
                u.insert(job.id.clone(), job.clone());
            }
        }
        result
    }

    /// Live (done, total) of a running job.
    pub fn live_progress(&self, job_id: &str) -> Option<(u64, u64)> {
        self.live.lock().ok()?.get(job_id).map(|p| p.get())
    }

    /// True while a job on `volume_id` is waiting or running.
    pub fn volume_busy(&self, volume_id: &str) -> bool {
        self.busy
            .lock()
            .map(|b| b.get(volume_id).is_some_and(|n| *n > 0))
            .unwrap_or(true)
    }

    /// Holds the job locks of `volume_ids` for a change made outside a job (attach,
    /// detach, resize): a job on one of them submitted meanwhile waits until the guards
    /// are dropped. Refused (2500) while a job on one of them waits or runs.
    pub fn hold_volumes(
        &self,
        volume_ids: &[&str],
    ) -> Result<Vec<tokio::sync::OwnedMutexGuard<()>>, ApiError> {
        // Each once (a volume named twice is locked once).
        let ids: std::collections::BTreeSet<&str> = volume_ids.iter().copied().collect();
        ids.into_iter()
            .map(|id| {
                let held = if self.volume_busy(id) {
                    None
                } else {
                    self.lock_for(id).try_lock_owned().ok()
                };
                held.ok_or_else(|| {
                    ApiError::busy(format!(
                        "volume {id} is busy: a job or another change is running on it"
                    ))
                })
            })
            .collect()
    }

    fn mark_busy(&self, keys: &[String], delta: isize) {
        if let Ok(mut busy) = self.busy.lock() {
            for k in keys {
                let n = busy.entry(k.clone()).or_default();
                *n = n.saturating_add_signed(delta);
                if *n == 0 {
                    busy.remove(k);
                }
            }
        }
    }

    /// Waits until `job_id` is no longer waiting or running (it ended, or is unknown), the
    /// daemon shuts down, or `timeout` passes; returns whether it is no longer running. Its
    /// end is in the catalog (or `unrecorded`) by then.
    pub async fn wait_ended(&self, job_id: &str, timeout: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.ended.notified();
            tokio::pin!(notified);
            // Registered before the check, so that an end in between is not missed.
            notified.as_mut().enable();
            let live = self
                .live
                .lock()
                .map(|l| l.contains_key(job_id))
                .unwrap_or(false);
            if !live {
                return true;
            }
            if self.shutting_down() || tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }

    /// A job no longer runs: drops its live progress and wakes those waiting for its end.
    fn forget_live(&self, id: &str) {
        if let Ok(mut live) = self.live.lock() {
            live.remove(id);
        }
        self.ended.notify_waiters();
    }

    pub fn running(&self) -> usize {
        self.live.lock().map(|l| l.len()).unwrap_or(0)
    }

    fn lock_for(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(key.to_string()).or_default().clone()
    }

    /// Asks running work to stop and waits (bounded) for it to do so.
    pub async fn shutdown(&self, grace: std::time::Duration) {
        self.cancel.store(true, Ordering::SeqCst);
        self.ended.notify_waiters();
        self.slots.close();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "jobs still running at shutdown; they are resumed or failed at the next start"
            );
        }
    }

    pub fn shutting_down(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }
}

/// Persists `job` as pending and starts it; `lock_keys` name the volumes it serializes on.
pub fn submit(
    manager: &Arc<Manager>,
    job: JobRow,
    lock_keys: Vec<String>,
    work: Work,
) -> Result<String, ApiError> {
    manager.with_catalog(|c| c.upsert_job(&job))?;
    let id = job.id.clone();
    let m = manager.clone();
    let jobs = manager.jobs();
    let progress = Arc::new(JobProgress {
        cancel: jobs.cancel.clone(),
        ..JobProgress::default()
    });
    if let Ok(mut live) = jobs.live.lock() {
        live.insert(id.clone(), progress.clone());
    }
    let mut keys = lock_keys;
    keys.sort();
    keys.dedup();
    jobs.mark_busy(&keys, 1);
    jobs.tracker.spawn(async move {
        run(m, job, keys, progress, work).await;
    });
    Ok(id)
}

async fn run(
    manager: Arc<Manager>,
    job: JobRow,
    keys: Vec<String>,
    progress: Arc<JobProgress>,
    work: Work,
) {
    run_locked(&manager, job, &keys, progress, work).await;
    manager.jobs().mark_busy(&keys, -1);
}

async fn run_locked(
    manager: &Arc<Manager>,
    mut job: JobRow,
    keys: &[String],
    progress: Arc<JobProgress>,
    work: Work,
) {
    let jobs = manager.jobs();
    // Locks in sorted order: two jobs over the same volumes can never deadlock.
    let mut guards = Vec::with_capacity(keys.len());
    for key in keys {
        guards.push(jobs.lock_for(key).lock_owned().await);
    }
    let permit = jobs.slots.clone().acquire_owned().await;
    if permit.is_err() || jobs.shutting_down() {
        // Shutting down before the work began: the row stays pending for the next start.
        forget(manager, &job.id);
        return;
    }
    job.status = JobStatus::Working;
    job.status_time = now();
    if let Err(e) = jobs.record(manager, &job) {
        tracing::error!(job = %job.id, error = %e.message, "cannot mark job working");
    }
    let _ = manager.set_status(&format!(
        "working: {} {}",
        job.action,
        job.resource_ids.join(",")
    ));
    let m = manager.clone();
    let p = progress.clone();
    let result = tokio::task::spawn_blocking(move || work(&m, &p))
        .await
        .unwrap_or_else(|e| Err(ApiError::internal(format!("job panicked: {e}"))));
    drop(permit);
    drop(guards);
    if result.is_err() && progress.is_cancelled() {
        // Interrupted by shutdown: leave it `working` so that recovery resumes or fails it.
        tracing::info!(job = %job.id, "job interrupted by shutdown");
        forget(manager, &job.id);
        return;
    }
    let (done, total) = progress.get();
    job.total_bytes = total;
    job.done_bytes = done;
    job.status_time = now();
    match result {
        Ok(()) => {
            job.status = JobStatus::Successful;
            job.done_bytes = total.max(done);
            job.total_bytes = job.done_bytes;
            tracing::info!(job = %job.id, action = %job.action, "job successful");
        }
        Err(e) => {
            job.status = JobStatus::Failed;
            job.error = Some(e.message.clone());
            job.error_code = Some(e.kind.ret_code());
            tracing::warn!(job = %job.id, action = %job.action, error = %e.message, "job failed");
        }
    }
    if let Err(e) = jobs.record(manager, &job) {
        tracing::error!(job = %job.id, error = %e.message, "cannot record job result");
    }
    forget(manager, &job.id);
    let _ = manager.set_status("idle");
}

fn forget(manager: &Manager, id: &str) {
    manager.jobs().forget_live(id);
}

/// A failed job's error for work that was stopped by shutdown.
pub fn cancelled_error() -> ApiError {
    ApiError::new(ErrorKind::Unavailable, "the daemon is shutting down")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn volumes_held_outside_a_job_are_refused_to_others_until_released() {
        let jobs = Jobs::new(2);
        // A volume named twice is held once.
        let held = jobs.hold_volumes(&["vol-a", "vol-a", "vol-b"]).unwrap();
        assert_eq!(held.len(), 2);
        assert!(jobs.hold_volumes(&["vol-b"]).is_err());
        assert!(
            jobs.lock_for("vol-a").try_lock().is_err(),
            "a job could start"
        );
        drop(held);
        drop(jobs.hold_volumes(&["vol-a", "vol-b"]).unwrap());
        // A job waiting for its turn counts as running.
        jobs.mark_busy(&["vol-a".to_string()], 1);
        let e = jobs.hold_volumes(&["vol-a"]).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Busy);
        jobs.mark_busy(&["vol-a".to_string()], -1);
        assert!(jobs.hold_volumes(&["vol-a"]).is_ok());
    }

    #[tokio::test]
    async fn wait_ended_returns_at_the_end_or_the_timeout() {
        let jobs = Arc::new(Jobs::new(1));
        // Unknown (or long ended): at once.
        assert!(jobs.wait_ended("j-unknown", Duration::from_secs(5)).await);
        jobs.live
            .lock()
            .unwrap()
            .insert("j-1".into(), Arc::new(JobProgress::default()));
        // Still running: false after the timeout.
        let t = Instant::now();
        assert!(!jobs.wait_ended("j-1", Duration::from_millis(50)).await);
        assert!(t.elapsed() >= Duration::from_millis(50));
        // Ends while waited for: true soon after, long before the timeout.
        let j = jobs.clone();
        let ender = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            j.forget_live("j-1");
        });
        let t = Instant::now();
        assert!(jobs.wait_ended("j-1", Duration::from_secs(10)).await);
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        ender.await.unwrap();
        // Shutting down: a running job's waiters are let go.
        jobs.live
            .lock()
            .unwrap()
            .insert("j-2".into(), Arc::new(JobProgress::default()));
        let j = jobs.clone();
        let stopper = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            j.shutdown(Duration::from_millis(10)).await;
        });
        let t = Instant::now();
        assert!(!jobs.wait_ended("j-2", Duration::from_secs(10)).await);
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        stopper.await.unwrap();
    }
}

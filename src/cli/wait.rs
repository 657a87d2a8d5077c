//! `--wait`: ask `DescribeJobs` until the job the call started has ended, with a progress
//! bar on stderr when stderr is a terminal. Between two asks the daemon's `GET /jobs/wait`
//! holds the call until the job ends (so its end is seen at once), or a daemon without it is
//! polled.

use super::{exit_code, Cli};
use crate::api::{self, response_action, Request};
use crate::client;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// How often the job is polled, at most. A young job is polled sooner: every eighth of its
/// age, at least [`MIN_POLL`] apart, so that a short job is not reported up to a whole
/// interval late.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
const MIN_POLL: Duration = Duration::from_millis(5);

/// How long the daemon may be unreachable (or answer 5100, shutting down) while a job is
/// followed: a restart in the middle of a job resumes or fails it, so keep asking.
const RECONNECT_GRACE: Duration = Duration::from_secs(15);

/// Returns once the job succeeded; a failure (of the job, or of asking about it) is the
/// response to print instead: `{"action", "ret_code", "message", "job_id"}`.
pub(super) async fn wait_for_job(cli: &Cli, action: &str, job_id: &str) -> Result<(), Value> {
    let failure = |ret_code: i64, message: String| {
        json!({
            "action": response_action(action),
            "ret_code": ret_code,
            "message": message,
            "job_id": job_id,
        })
    };
    let bar = Bar::new(job_id);
    let body = Request::DescribeJobs(api::DescribeJobs {
        zone: cli.zone.clone(),
        jobs: vec![job_id.to_string()],
        ..Default::default()
    })
    .to_body();
    let unavailable = i64::from(api::ErrorKind::Unavailable.ret_code());
    // Since when the daemon has been unreachable, if it is.
    let mut unreachable_since: Option<Instant> = None;
    let started = Instant::now();
    // Whether the daemon's `GET /jobs/wait` is used (job ids need no escaping in a query),
    // and whether it already said the job ended.
    let mut server_wait = job_id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-');
    let mut ended_seen = false;
    loop {
        let answer = client::call(&cli.socket, &body).await;
        let retry = match &answer {
            Err(e) => e.kind() == api::ErrorKind::Unavailable,
            Ok(r) => r["ret_code"].as_i64() == Some(unavailable),
        };
        if retry && unreachable_since.get_or_insert_with(Instant::now).elapsed() < RECONNECT_GRACE {
            bar.update("(daemon unreachable, retrying)", &Value::Null);
            tokio::time::sleep(POLL_INTERVAL).await;
            continue;
        }
        if !retry {
            unreachable_since = None;
        }
        let response = match answer {
            Ok(r) => r,
            Err(e) => {
                bar.finish();
                return Err(failure(
                    e.kind().ret_code().into(),
                    format!("Lost track of job {job_id}: {}", e.message()),
                ));
            }
        };
        if exit_code(&response) != 0 {
            bar.finish();
            let code = response["ret_code"].as_i64().unwrap_or(5000);
            let message = response["message"]
                .as_str()
                .unwrap_or("DescribeJobs failed");
            return Err(failure(
                code,
                format!("Cannot follow job {job_id}: {message}"),
            ));
        }
        let job = response["job_set"]
            .as_array()
            .and_then(|set| set.iter().find(|j| j["job_id"] == job_id));
        let Some(job) = job else {
            bar.finish();
            return Err(failure(
                api::ErrorKind::NotFound.ret_code().into(),
                format!("Job {job_id} is not known to the daemon"),
            ));
        };
        match job["status"].as_str().unwrap_or_default() {
            "successful" => {
                bar.finish();
                return Ok(());
            }
            "failed" => {
                bar.finish();
                let code = match job.get("error_code").and_then(Value::as_i64) {
                    Some(c) if c != 0 => c,
                    _ => api::ErrorKind::Internal.ret_code().into(),
                };
                let message = match job["error"].as_str() {
                    Some(e) if !e.is_empty() => e.to_string(),
                    _ => format!("Job {job_id} failed"),
                };
                return Err(failure(code, message));
            }
            status => bar.update(status, &job["progress"]),
        }
        // The daemon answers when the job ends (or after a while, for the progress bar);
        // a daemon without that endpoint is polled.
        if server_wait {
            let ms = if bar.bar.is_some() { 200 } else { 1000 };
            let path = format!("/jobs/wait?job_id={job_id}&timeout_ms={ms}");
            let asked = Instant::now();
            let ended = client::get(&cli.socket, &path)
                .await
                .ok()
                .and_then(|b| serde_json::from_str::<Value>(&b).ok())
                .and_then(|v| v["ended"].as_bool());
            match ended {
                // Ended, or the wait timed out: ask at once. An end that DescribeJobs does
                // not show (the daemon stopping) is not asked about in a tight loop.
                Some(true) if !ended_seen => {
                    ended_seen = true;
                    continue;
                }
                // Timed out: ask again. Answered early without an end (the daemon stopping):
                // poll instead.
                Some(false) if asked.elapsed() >= Duration::from_millis(ms / 2) => continue,
                Some(_) => {}
                None => server_wait = false,
            }
        }
        tokio::time::sleep((started.elapsed() / 8).clamp(MIN_POLL, POLL_INTERVAL)).await;
    }
}

/// The progress bar, drawn only when stderr is a terminal.
struct Bar {
    bar: Option<ProgressBar>,
    job_id: String,
}

impl Bar {
    fn new(job_id: &str) -> Bar {
        if !std::io::stderr().is_terminal() {
            return Bar {
                bar: None,
                job_id: job_id.to_string(),
            };
        }
        // A spinner until the daemon reports how many bytes the job moves, then a bar.
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.set_message(format!("{job_id} pending"));
        bar.enable_steady_tick(Duration::from_millis(100));
        Bar {
            bar: Some(bar),
            job_id: job_id.to_string(),
        }
    }

    fn update(&self, status: &str, progress: &Value) {
        let Some(bar) = &self.bar else { return };
        if progress.is_null() {
            bar.set_message(format!("{} {status}", self.job_id));
            return;
        }
        let done = progress["done_bytes"].as_u64().unwrap_or(0);
        let total = progress["total_bytes"].as_u64().unwrap_or(0);
        if total > 0 && bar.length() != Some(total) {
            if bar.length().is_none() {
                bar.set_style(
                    ProgressStyle::with_template(
                        "{spinner} {msg} [{bar:25}] {bytes}/{total_bytes} ETA {eta}",
                    )
                    .map(|s| s.progress_chars("=> "))
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
            }
            bar.set_length(total);
        }
        bar.set_position(done);
        bar.set_message(format!("{} {status}", self.job_id));
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

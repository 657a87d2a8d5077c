//! Prometheus text metrics served at `GET /metrics`.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::sync::Mutex;

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, i32), u64>>,
}

impl Metrics {
    pub fn count_request(&self, action: &str, ret_code: i32) {
        if let Ok(mut r) = self.requests.lock() {
            *r.entry((action.to_string(), ret_code)).or_default() += 1;
        }
    }

    pub fn render(
        &self,
        volumes: &HashMap<String, u64>,
        jobs: &HashMap<String, u64>,
        snapshots: &HashMap<String, u64>,
        running_jobs: usize,
    ) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP blocksnap_requests_total Control requests by action and ret_code."
        );
        let _ = writeln!(out, "# TYPE blocksnap_requests_total counter");
        if let Ok(r) = self.requests.lock() {
            for ((action, code), n) in r.iter() {
                let _ = writeln!(
                    out,
                    "blocksnap_requests_total{{action=\"{action}\",ret_code=\"{code}\"}} {n}"
                );
            }
        }
        gauge(
            &mut out,
            "blocksnap_volumes",
            "Volumes by status.",
            "status",
            volumes,
            &["pending", "available", "in-use", "deleted"],
        );
        gauge(
            &mut out,
            "blocksnap_jobs",
            "Jobs by status.",
            "status",
            jobs,
            &["pending", "working", "successful", "failed"],
        );
        gauge(
            &mut out,
            "blocksnap_snapshots",
            "Snapshots by status.",
            "status",
            snapshots,
            &["pending", "available"],
        );
        let _ = writeln!(
            out,
            "# HELP blocksnap_jobs_running Jobs holding a worker slot now."
        );
        let _ = writeln!(out, "# TYPE blocksnap_jobs_running gauge");
        let _ = writeln!(out, "blocksnap_jobs_running {running_jobs}");
        out
    }
}

fn gauge(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    values: &HashMap<String, u64>,
    always: &[&str],
) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} gauge");
    let mut all: BTreeMap<&str, u64> = always.iter().map(|k| (*k, 0)).collect();
    for (k, v) in values {
        all.insert(k.as_str(), *v);
    }
    for (k, v) in all {
        let _ = writeln!(out, "{name}{{{label}=\"{k}\"}} {v}");
    }
}

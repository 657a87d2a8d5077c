//! A store on a small filesystem runs out of space during a full snapshot: the job fails
//! quickly with a message about space, earlier snapshots still verify, nothing partial is
//! listed or left behind, and the volume stays usable (mounted and not frozen).

mod common;

use common::{have_tool, root_or_skip, sh, Daemon, Mount, ScratchFs};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Every file under `dir`, relative, sorted (lost+found of ext4 ignored).
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(base: &Path, d: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(d).unwrap() {
            let e = e.unwrap();
            let rel = e.path().strip_prefix(base).unwrap().display().to_string();
            if rel == "lost+found" {
                continue;
            }
            if e.file_type().unwrap().is_dir() {
                out.push(format!("{rel}/"));
                walk(base, &e.path(), out);
            } else {
                out.push(rel);
            }
        }
    }
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Runs `cmd` under `timeout`; true when it finished in time with success.
fn completes_within(cmd: &str, secs: f64) -> bool {
    Command::new("timeout")
        .arg(format!("{secs}"))
        .arg("sh")
        .arg("-c")
        .arg(cmd)
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn full_snapshot_on_a_full_store_fails_cleanly() {
    if !root_or_skip("full_snapshot_on_a_full_store_fails_cleanly") || !have_tool("mkfs.ext4") {
        return;
    }
    scenario(false);
}

#[test]
fn failed_snapshot_leaves_no_empty_directory() {
    if !root_or_skip("failed_snapshot_leaves_no_empty_directory") || !have_tool("mkfs.ext4") {
        return;
    }
    scenario(true);
}

fn scenario(check_dirs: bool) {
    let storefs = ScratchFs::new("ext4", "48M");
    let store = storefs.path().join("store");
    let d = Daemon::start(&format!("[store]\npath = \"{}\"\n", store.display()));
    let vol = d.volume("128M", "enospc");
    let dev = d.attach(&vol);
    sh(&format!("mkfs.ext4 -q -F {}", dev.display()));
    let mnt = Mount::new(&dev, &d.dir.path().join("mnt"));
    let m = mnt.target.display().to_string();
    // A small first snapshot.
    sh(&format!(
        "dd if=/dev/urandom of={m}/small bs=1M count=1 conv=fsync status=none"
    ));
    let v = d.job(&["create-snapshots", "-r", &vol, "-F", "1", "-N", "small"]);
    let small = v["snapshots"][0].as_str().unwrap().to_string();
    let listing = |store: &Path| -> Vec<String> {
        files_under(store)
            .into_iter()
            .filter(|f| check_dirs || !f.ends_with('/') || f == "snapshots/")
            .collect()
    };
    let before = listing(&store);
    // ~100 MiB of random data: cannot fit in a 48 MiB store.
    sh(&format!(
        "dd if=/dev/urandom of={m}/big bs=1M count=100 conv=fsync status=none"
    ));
    let t = Instant::now();
    let v = d.ok(&["create-snapshots", "-r", &vol, "-F", "1", "-N", "too-big"]);
    let big = v["snapshots"][0].as_str().unwrap().to_string();
    let job = d.wait_job(v["job_id"].as_str().unwrap());
    let took = t.elapsed();
    eprintln!("full snapshot on a full store: {job} after {took:?}");
    assert_eq!(job["status"], "failed", "{job}");
    let msg = job["error"].as_str().unwrap_or_default().to_lowercase();
    assert!(
        msg.starts_with("snapshot ") && msg.contains("no space left"),
        "message does not say the store is full: {msg}"
    );
    assert_eq!(
        job["error_code"], 5100,
        "a full store is 5100 (unavailable): {job}"
    );
    assert!(took < Duration::from_secs(60), "took {took:?}");
    // The filesystem is not left frozen.
    assert!(
        completes_within(&format!("echo x > {m}/after && sync -f {m}/after"), 2.0),
        "filesystem is not writable after the failed snapshot"
    );
    // No partial snapshot listed.
    let list = d.ok(&["describe-snapshots", "-r", &vol]);
    for s in list["snapshot_set"].as_array().unwrap() {
        let id = s["snapshot_id"].as_str().unwrap();
        if id == big {
            assert_eq!(s["status"], "deleted", "failed snapshot listed as {s}");
        } else {
            assert_eq!(id, small, "unexpected snapshot {s}");
            assert_eq!(s["status"], "available");
        }
    }
    // The store holds exactly what it held before.
    assert_eq!(listing(&store), before, "leftovers in the store");
    // The older snapshot still verifies.
    d.job(&["verify-snapshots", "-s", &small]);
    drop(mnt);
}

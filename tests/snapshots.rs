//! Snapshot chains on loop volumes: the source documents' session, full + incrementals
//! restoring byte for byte, deletes in the middle of a chain, quota, several volumes, and
//! corruption found by verify and by restore.

mod common;

use common::{root_or_skip, sh, Daemon};
use std::path::Path;

/// Writes `count` blocks of random data of `bs` bytes at random block offsets of `dev`.
fn scribble(dev: &Path, bs: u64, count: u32, span_blocks: u64, seed: u64) {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    for _ in 0..count {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let block = x % span_blocks;
        sh(&format!(
            "dd if=/dev/urandom of={} bs={bs} count=1 seek={block} conv=notrunc,fsync status=none",
            dev.display()
        ));
    }
}

fn snap(d: &Daemon, vol: &str, full: bool, name: &str) -> String {
    let v = d.job(&[
        "create-snapshots",
        "-r",
        vol,
        "-F",
        if full { "1" } else { "0" },
        "-N",
        name,
    ]);
    v["snapshots"][0].as_str().expect("snapshot id").to_string()
}

#[test]
fn seed_session_replayed() {
    if !root_or_skip("seed_session_replayed") {
        return;
    }
    let d = Daemon::start("");
    let vol = d.volume("64M", "test-snap");
    let out = d.ok(&["create-snapshots", "-r", &vol, "-F", "1", "-N", "full-snap"]);
    assert_eq!(out["action"], "CreateSnapshotsResponse");
    let ss = out["snapshots"][0].as_str().unwrap().to_string();
    let job = out["job_id"].as_str().unwrap().to_string();
    assert!(ss.starts_with("ss-") && ss.len() == 11, "{ss}");
    assert!(job.starts_with("j-") && job.len() == 13, "{job}");
    assert_eq!(d.wait_job(&job)["status"], "successful");

    let out = d.ok(&["describe-snapshots", "-n", &ss]);
    assert_eq!(out["action"], "DescribeSnapshotsResponse");
    assert_eq!(out["total_count"], 1);
    let s = &out["snapshot_set"][0];
    assert_eq!(s["status"], "available");
    assert_eq!(s["snapshot_name"], "full-snap");
    assert_eq!(s["parent_id"], "self");
    assert_eq!(s["root_id"], ss.as_str());
    assert_eq!(s["snapshot_type"], 1);
    assert_eq!(s["is_taken"], 1);
    assert_eq!(s["head_chain"], 1);
    assert_eq!(s["is_head"], 1);
    assert_eq!(s["total_count"], 1);
    assert_eq!(s["virtual_size"], 64);
    assert_eq!(s["resource"]["resource_id"], vol.as_str());
    assert_eq!(s["resource"]["resource_name"], "test-snap");
    assert_eq!(s["resource"]["resource_type"], "volume");
    assert_eq!(s["consistency"], "crash");
    assert_eq!(s["freeze_ms"], 0);
    for k in [
        "size",
        "total_size",
        "snapshot_time",
        "create_time",
        "status_time",
        "lastest_snapshot_time",
        "visibility",
        "provider",
        "owner",
        "description",
        "tags",
        "resource_project_info",
        "sub_code",
    ] {
        assert!(s.get(k).is_some(), "missing {k}: {s}");
    }
    assert!(s["snapshot_time"].as_str().unwrap().ends_with('Z'));
    assert!(d.describe_volume(&vol)["lastest_snapshot_time"].is_string());

    let out = d.ok(&["create-volume-from-snapshot", "-s", &ss, "-N", "restore-2"]);
    assert_eq!(out["action"], "CreateVolumeFromSnapshotResponse");
    let rv = out["volume_id"].as_str().unwrap().to_string();
    let v = d.describe_volume(&rv);
    assert_eq!(v["volume_name"], "restore-2");
    assert!(
        v["status"] == "available"
            || (v["status"] == "pending" && v["transition_status"] == "creating"),
        "{v}"
    );
    d.wait_job(out["job_id"].as_str().unwrap());
    assert_eq!(d.describe_volume(&rv)["status"], "available");
    assert_eq!(
        common::sha256(&d.image(&rv)),
        common::sha256(&d.image(&vol))
    );

    let out = d.ok(&["delete-snapshots", "-s", &ss]);
    assert_eq!(out["action"], "DeleteSnapshotsResponse");
    d.wait_job(out["job_id"].as_str().unwrap());
    assert_eq!(d.ok(&["describe-snapshots", "-n", &ss])["total_count"], 0);
}

#[test]
fn full_and_incrementals_restore_byte_for_byte_and_survive_deletes() {
    if !root_or_skip("full_and_incrementals_restore_byte_for_byte_and_survive_deletes") {
        return;
    }
    let d = Daemon::start("");
    let vol = d.volume("64M", "chain");
    let dev = d.attach(&vol);
    let blocks = (64 << 20) / 65536;
    scribble(&dev, 65536, 40, blocks, 1);
    let sha_full = common::sha256(&dev);
    let full = snap(&d, &vol, true, "full");
    scribble(&dev, 4096, 30, (64 << 20) / 4096, 2);
    let sha_inc1 = common::sha256(&dev);
    let inc1 = snap(&d, &vol, false, "inc1");
    sh(&format!(
        "dd if=/dev/zero of={} bs=1M count=4 seek=8 conv=notrunc,fsync status=none",
        dev.display()
    ));
    scribble(&dev, 4096, 30, (64 << 20) / 4096, 3);
    let sha_inc2 = common::sha256(&dev);
    let inc2 = snap(&d, &vol, false, "inc2");

    let s_full = d.describe_snapshot(&full);
    let s1 = d.describe_snapshot(&inc1);
    let s2 = d.describe_snapshot(&inc2);
    assert_eq!(s1["snapshot_type"], 0);
    assert_eq!(s1["parent_id"], full.as_str());
    assert_eq!(s2["parent_id"], inc1.as_str());
    assert_eq!(s2["root_id"], full.as_str());
    assert_eq!(s2["total_count"], 3);
    assert_eq!(s2["is_head"], 1);
    assert_eq!(s1["is_head"], 0);
    assert_eq!(s_full["head_chain"], 1);
    // An incremental stores about what changed: 30 blocks of 64 KiB at most.
    let inc1_bytes = s1["size_bytes"].as_u64().unwrap();
    assert!(
        inc1_bytes <= 30 * 65536,
        "incremental stored {inc1_bytes} bytes"
    );
    assert!(s_full["size_bytes"].as_u64().unwrap() >= 40 * 65536 / 2);
    assert_eq!(
        s2["total_size_bytes"].as_u64().unwrap(),
        s_full["size_bytes"].as_u64().unwrap() + inc1_bytes + s2["size_bytes"].as_u64().unwrap()
    );

    assert_eq!(d.restore_sha(&full), sha_full);
    assert_eq!(d.restore_sha(&inc1), sha_inc1);
    assert_eq!(d.restore_sha(&inc2), sha_inc2);

    // Delete the middle, then the root: the others stay byte-identical.
    d.job(&["delete-snapshots", "-s", &inc1]);
    assert_eq!(d.describe_snapshot(&inc2)["parent_id"], full.as_str());
    assert_eq!(d.restore_sha(&full), sha_full);
    assert_eq!(d.restore_sha(&inc2), sha_inc2);
    d.job(&["delete-snapshots", "-s", &full]);
    let s2 = d.describe_snapshot(&inc2);
    assert_eq!(s2["parent_id"], "self");
    assert_eq!(s2["snapshot_type"], 1);
    assert_eq!(d.restore_sha(&inc2), sha_inc2);

    // Roll the volume back to inc2 after more writes (it is not mounted).
    scribble(&dev, 65536, 10, blocks, 4);
    assert_ne!(common::sha256(&dev), sha_inc2);
    d.job(&["apply-snapshots", "-s", &inc2]);
    assert_eq!(common::sha256(&dev), sha_inc2);
    assert_eq!(d.describe_volume(&vol)["transition_status"], "");
    // The next -F 0 builds on the snapshot rolled back to.
    let after = snap(&d, &vol, false, "after-rollback");
    assert_eq!(d.describe_snapshot(&after)["parent_id"], inc2.as_str());
    d.ok(&["detach-volumes", "-v", &vol]);

    // Snapshots outlive their volume.
    d.ok(&["delete-volumes", "-v", &vol]);
    assert_eq!(d.restore_sha(&inc2), sha_inc2);
    d.fails(&["apply-snapshots", "-s", &inc2], 2100);
}

#[test]
fn quota_chain_length_and_several_volumes() {
    if !root_or_skip("quota_chain_length_and_several_volumes") {
        return;
    }
    let d = Daemon::start("[limits]\nsnapshots_per_volume = 3\nmax_chain_length = 2\n");
    let a = d.volume("16M", "a");
    let b = d.volume("16M", "b");
    let both = d.job(&["create-snapshots", "-r", &format!("{a},{b}"), "-N", "pair"]);
    let ids: Vec<&str> = both["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2);
    for id in &ids {
        assert_eq!(d.describe_snapshot(id)["status"], "available");
    }
    let s2 = snap(&d, &a, false, "two");
    assert_eq!(d.describe_snapshot(&s2)["snapshot_type"], 0);
    // The chain is max_chain_length long: the system starts a new full one.
    let s3 = snap(&d, &a, false, "three");
    assert_eq!(d.describe_snapshot(&s3)["snapshot_type"], 1);
    let e = d.fails(&["create-snapshots", "-r", &a], 2400);
    assert!(e["message"].as_str().unwrap().contains("quota"), "{e}");
    assert_eq!(d.ok(&["describe-snapshots", "-r", &a])["total_count"], 3);
    assert_eq!(
        d.ok(&["describe-snapshots", "-r", &a, "-t", "1"])["total_count"],
        2
    );
    assert_eq!(
        d.ok(&["describe-snapshots", "-W", "pair"])["total_count"],
        2
    );
    d.ok(&[
        "modify-snapshot-attributes",
        "-s",
        &s2,
        "-N",
        "renamed",
        "-D",
        "a description",
    ]);
    let s = d.describe_snapshot(&s2);
    assert_eq!(s["snapshot_name"], "renamed");
    assert_eq!(s["description"], "a description");
    d.fails(&["create-snapshots", "-r", "vol-nothere0"], 2100);
    d.fails(&["create-volume-from-snapshot", "-s", "ss-nothere0"], 2100);
}

#[test]
fn corruption_is_found_by_verify_and_by_restore() {
    if !root_or_skip("corruption_is_found_by_verify_and_by_restore") {
        return;
    }
    let d = Daemon::start("");
    let vol = d.volume("16M", "victim");
    let dev = d.attach(&vol);
    scribble(&dev, 65536, 20, 256, 9);
    let ss = snap(&d, &vol, true, "to-corrupt");
    d.ok(&["detach-volumes", "-v", &vol]);
    d.job(&["verify-snapshots", "-s", &ss]);

    // Flip one byte in the middle of the snapshot's largest file (its data).
    let dir = d.state_dir.join("store/snapshots").join(&ss);
    let largest = std::fs::read_dir(&dir)
        .expect("snapshot dir")
        .filter_map(|e| e.ok())
        .max_by_key(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .expect("a file")
        .path();
    let mut bytes = std::fs::read(&largest).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&largest, &bytes).expect("write");

    let v = d.ok(&["verify-snapshots", "-s", &ss]);
    let j = d.wait_job(v["job_id"].as_str().unwrap());
    assert_eq!(j["status"], "failed", "{j}");
    assert_eq!(j["error_code"], 5300, "{j}");
    let msg = j["error"].as_str().unwrap();
    assert!(msg.contains(&ss), "{msg}");

    let v = d.ok(&["create-volume-from-snapshot", "-s", &ss]);
    let j = d.wait_job(v["job_id"].as_str().unwrap());
    assert_eq!(
        j["status"], "failed",
        "restore of corrupt data must fail: {j}"
    );
    assert_eq!(j["error_code"], 5300, "{j}");
    let rv = v["volume_id"].as_str().unwrap();
    assert_ne!(d.describe_volume(rv)["status"], "available");
}

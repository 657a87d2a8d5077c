//! NBD-backed volumes through the daemon, with real NBD clients: the export works, snapshots
//! need no freeze and store only what changed, and after SIGKILL the next incremental still
//! holds every block written since its parent.

mod common;

use common::{have_tool, qemu_io, root_or_skip, sh, Daemon};

fn tools() -> bool {
    ["qemu-io", "nbdcopy", "nbdinfo"]
        .iter()
        .all(|t| have_tool(t))
}

#[test]
fn nbd_volume_snapshots_store_only_what_changed_and_restore_exactly() {
    if !root_or_skip("nbd_volume_snapshots_store_only_what_changed_and_restore_exactly") || !tools()
    {
        return;
    }
    let d = Daemon::start("");
    let vol = d.job(&[
        "create-volumes",
        "-s",
        "64M",
        "--backend",
        "nbd",
        "-N",
        "exported",
    ]);
    let vol = vol["volumes"][0].as_str().unwrap().to_string();
    d.ok(&["attach-volumes", "-v", &vol]);
    let v = d.describe_volume(&vol);
    assert_eq!(v["backend"], "nbd");
    assert_eq!(v["status"], "in-use");
    let uri = v["device"].as_str().unwrap().to_string();
    assert!(
        uri.starts_with(&format!("nbd+unix:///{vol}?socket=")),
        "{uri}"
    );
    let info = sh(&format!("nbdinfo --json '{uri}'"));
    let info: serde_json::Value = serde_json::from_str(&info).expect("nbdinfo json");
    assert_eq!(info["exports"][0]["export-size"], 64 << 20, "{info}");

    qemu_io(&uri, "write -P 0xaa 0 8M");
    qemu_io(&uri, "write -P 0x55 32M 1M");
    let sha_full = d.export_sha(&uri, "full");
    let full = d.snapshot(&vol, true);
    assert_eq!(full["consistency"], "crash");
    assert!(full["freeze_ms"].as_u64().unwrap() <= 10, "{full}");
    assert_eq!(full["size_bytes"], 9 << 20, "{full}");

    // 4 KiB written: the incremental stores one store block (16 KiB), nothing else.
    qemu_io(&uri, "write -P 0xbb 4M 4k");
    let sha_inc = d.export_sha(&uri, "inc");
    let inc = d.snapshot(&vol, false);
    assert_eq!(inc["snapshot_type"], 0);
    assert_eq!(inc["parent_id"], full["snapshot_id"]);
    assert!(inc["size_bytes"].as_u64().unwrap() <= 16 << 10, "{inc}");
    assert!(inc["freeze_ms"].as_u64().unwrap() <= 10, "{inc}");

    // Discards and zeroes are changes too.
    qemu_io(&uri, "discard 32M 1M");
    qemu_io(&uri, "write -z 0 64k");
    let sha_inc2 = d.export_sha(&uri, "inc2");
    let inc2 = d.snapshot(&vol, false);

    assert_eq!(
        d.restore_sha(full["snapshot_id"].as_str().unwrap()),
        sha_full
    );
    assert_eq!(d.restore_sha(inc["snapshot_id"].as_str().unwrap()), sha_inc);
    assert_eq!(
        d.restore_sha(inc2["snapshot_id"].as_str().unwrap()),
        sha_inc2
    );

    // A restored volume can itself be exported over NBD.
    let r = d.job(&[
        "create-volume-from-snapshot",
        "-s",
        inc["snapshot_id"].as_str().unwrap(),
        "--backend",
        "nbd",
    ]);
    let rv = r["volume_id"].as_str().unwrap().to_string();
    d.ok(&["attach-volumes", "-v", &rv]);
    let ruri = d.nbd_uri(&rv);
    qemu_io(&ruri, "read -P 0xbb 4M 4k");
    qemu_io(&ruri, "read -P 0xaa 0 4M");
    d.ok(&["detach-volumes", "-v", &rv]);
    d.ok(&["detach-volumes", "-v", &vol]);
    // Detached: the export is gone.
    let gone = std::process::Command::new("nbdinfo")
        .arg(&uri)
        .output()
        .expect("nbdinfo");
    assert!(!gone.status.success(), "export still served after detach");
}

#[test]
fn after_sigkill_the_next_incremental_holds_every_write() {
    if !root_or_skip("after_sigkill_the_next_incremental_holds_every_write") || !tools() {
        return;
    }
    let mut d = Daemon::start("");
    let (vol, uri) = d.nbd_volume("32M");
    qemu_io(&uri, "write -P 0x11 0 2M");
    let base = d.snapshot(&vol, true);
    for (i, off) in ["1M", "9M", "17M", "30M"].iter().enumerate() {
        qemu_io(&uri, &format!("write -P 0x{:x} {off} 4k", 0x20 + i));
    }
    d.kill9();
    d.spawn();
    let uri = d.nbd_uri(&vol);
    qemu_io(&uri, "write -P 0x77 20M 4k");
    let sha_now = d.export_sha(&uri, "now");
    let inc = d.snapshot(&vol, false);
    assert_eq!(inc["parent_id"], base["snapshot_id"], "{inc}");
    assert_eq!(d.restore_sha(inc["snapshot_id"].as_str().unwrap()), sha_now);
    d.ok(&["detach-volumes", "-v", &vol]);
}

#[test]
fn rollback_of_an_nbd_volume_needs_a_detach_and_restarts_tracking() {
    if !root_or_skip("rollback_of_an_nbd_volume_needs_a_detach_and_restarts_tracking") || !tools() {
        return;
    }
    let d = Daemon::start("");
    let (vol, uri) = d.nbd_volume("16M");
    qemu_io(&uri, "write -P 0x42 0 1M");
    let s1 = d.snapshot(&vol, true);
    let sha1 = d.export_sha(&uri, "s1");
    qemu_io(&uri, "write -P 0x43 2M 1M");
    let id1 = s1["snapshot_id"].as_str().unwrap();
    d.fails(&["apply-snapshots", "-s", id1], 2500);
    d.ok(&["detach-volumes", "-v", &vol]);
    d.job(&["apply-snapshots", "-s", id1]);
    d.ok(&["attach-volumes", "-v", &vol]);
    let uri = d.nbd_uri(&vol);
    assert_eq!(d.export_sha(&uri, "rolled"), sha1);
    // After the rollback the next incremental is against s1 and restores exactly.
    qemu_io(&uri, "write -P 0x44 8M 4k");
    let sha2 = d.export_sha(&uri, "s2");
    let s2 = d.snapshot(&vol, false);
    assert_eq!(s2["parent_id"], s1["snapshot_id"]);
    assert_eq!(d.restore_sha(s2["snapshot_id"].as_str().unwrap()), sha2);
    d.ok(&["detach-volumes", "-v", &vol]);
    d.ok(&["delete-volumes", "-v", &vol]);
    assert!(!d
        .state_dir
        .join("volumes")
        .join(format!("{vol}.cbt"))
        .exists());
}

#[test]
fn lazy_restore_is_usable_at_once_and_keeps_client_writes() {
    if !root_or_skip("lazy_restore_is_usable_at_once_and_keeps_client_writes") || !tools() {
        return;
    }
    let mut d = Daemon::start("");
    let (vol, uri) = d.nbd_volume("128M");
    qemu_io(&uri, "write -P 0x61 0 48M");
    qemu_io(&uri, "write -P 0x62 100M 8M");
    let ss = d.snapshot(&vol, true);
    let ss = ss["snapshot_id"].as_str().unwrap().to_string();
    d.ok(&["detach-volumes", "-v", &vol]);

    let r = d.ok(&[
        "create-volume-from-snapshot",
        "-s",
        &ss,
        "--lazy",
        "-N",
        "lazy",
    ]);
    let lv = r["volume_id"].as_str().unwrap().to_string();
    let job = r["job_id"].as_str().unwrap().to_string();
    let v = d.describe_volume(&lv);
    assert_eq!(v["backend"], "nbd");
    assert_eq!(v["status"], "available", "{v}");
    // Usable at once: attach, read the snapshot's bytes, write over some of them.
    d.ok(&["attach-volumes", "-v", &lv]);
    let luri = d.nbd_uri(&lv);
    qemu_io(&luri, "read -P 0x62 100M 8M");
    qemu_io(&luri, "write -P 0x63 1M 12k");
    qemu_io(&luri, "flush");
    d.fails(&["create-snapshots", "-r", &lv], 2500);
    let j = d.wait_job(&job);
    assert_eq!(j["status"], "successful", "{j}");
    assert_eq!(j["progress"]["total_bytes"], 128 << 20, "{j}");
    qemu_io(&luri, "read -P 0x61 0 1M");
    qemu_io(&luri, "read -P 0x63 1M 12k");
    qemu_io(&luri, "read -P 0x61 16M 32M");
    qemu_io(&luri, "read -P 0 48M 52M");
    // Still served lazily until detached once; then an ordinary tracked volume.
    d.ok(&["detach-volumes", "-v", &lv]);
    d.ok(&["attach-volumes", "-v", &lv]);
    let luri = d.nbd_uri(&lv);
    let sha = d.export_sha(&luri, "lazy");
    let s2 = d.snapshot(&lv, true);
    assert_eq!(d.restore_sha(s2["snapshot_id"].as_str().unwrap()), sha);
    d.ok(&["detach-volumes", "-v", &lv]);

    // A restart in the middle of hydration resumes it.
    let r = d.ok(&["create-volume-from-snapshot", "-s", &ss, "--lazy"]);
    let lv2 = r["volume_id"].as_str().unwrap().to_string();
    d.kill9();
    d.spawn();
    let jobs = d.ok(&["describe-jobs", "-s", "pending,working"]);
    for j in jobs["job_set"].as_array().unwrap() {
        d.wait_job(j["job_id"].as_str().unwrap());
    }
    let image = d.image(&lv2);
    let v = d.job(&["create-volume-from-snapshot", "-s", &ss]);
    let full = v["volume_id"].as_str().unwrap().to_string();
    assert_eq!(common::sha256(&image), common::sha256(&d.image(&full)));
    d.fails(
        &[
            "create-volume-from-snapshot",
            "-s",
            &ss,
            "--lazy",
            "--backend",
            "loop",
        ],
        1100,
    );
}

#[test]
fn nbd_tcp_listener_on_loopback_serves_the_same_export() {
    if !root_or_skip("nbd_tcp_listener_on_loopback_serves_the_same_export") || !tools() {
        return;
    }
    // A free loopback port (released just before the daemon binds it).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let d = Daemon::start(&format!("[nbd]\ntcp = \"127.0.0.1:{port}\"\n"));
    let (vol, uri) = d.nbd_volume("8M");
    qemu_io(&uri, "write -P 0x5a 1M 64k");
    let tcp = format!("nbd://127.0.0.1:{port}/{vol}");
    assert_eq!(sh(&format!("nbdinfo --size '{tcp}'")).trim(), "8388608");
    assert_eq!(d.export_sha(&tcp, "tcp"), d.export_sha(&uri, "unix"));
    d.ok(&["detach-volumes", "-v", &vol]);
}

#[test]
fn an_attached_nbd_volume_grows_under_its_clients_and_keeps_its_data() {
    if !root_or_skip("an_attached_nbd_volume_grows_under_its_clients_and_keeps_its_data")
        || !tools()
    {
        return;
    }
    let d = Daemon::start("");
    let (vol, uri) = d.nbd_volume("8M");
    qemu_io(&uri, "write -P 0x5a 1M 64k");
    let full = d.snapshot(&vol, true);
    // The export is removed (its connections end first), the image grows, the export is
    // registered again at the new size.
    d.ok(&["resize-volumes", "-v", &vol, "-s", "16M"]);
    assert_eq!(d.describe_volume(&vol)["size_bytes"], 16 << 20);
    let uri = d.nbd_uri(&vol);
    let size = sh(&format!("nbdinfo --size '{uri}'"));
    assert_eq!(size.trim(), (16u64 << 20).to_string());
    qemu_io(&uri, "read -P 0x5a 1M 64k");
    qemu_io(&uri, "write -P 0x6b 12M 64k");
    // The next snapshot of the grown volume holds both.
    let sha = d.export_sha(&uri, "grown");
    let grown = d.snapshot(&vol, false);
    assert_eq!(grown["parent_id"], full["snapshot_id"], "{grown}");
    assert_eq!(d.restore_sha(grown["snapshot_id"].as_str().unwrap()), sha);
    d.ok(&["detach-volumes", "-v", &vol]);
    d.ok(&["attach-volumes", "-v", &vol]);
    qemu_io(&d.nbd_uri(&vol), "read -P 0x6b 12M 64k");
}

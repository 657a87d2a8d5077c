//! Changed-block tracking and copy-before-write behind the NBD server, driven by real
//! clients; and the write-intent bitmap surviving SIGKILL of the serving process.

mod nbd_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blocksnap::nbd::{DirtyRange, EpochScope, Export, FileExport, Recovery, TrackedExport};
use nbd_support::*;

const MIB: u64 = 1 << 20;

fn r(offset: u64, len: u64) -> DirtyRange {
    DirtyRange { offset, len }
}

/// A server whose export is tracked; the test keeps a handle on the tracker.
fn tracked_server(size: u64) -> (Served, Arc<TrackedExport<FileExport>>) {
    let slot: Arc<Mutex<Option<Arc<TrackedExport<FileExport>>>>> = Arc::default();
    let s = {
        let slot = Arc::clone(&slot);
        Served::start_with(size, move |image| {
            let bitmap = image.with_extension("cbt");
            let t =
                Arc::new(TrackedExport::open(FileExport::open(image).unwrap(), &bitmap).unwrap());
            *slot.lock().unwrap() = Some(Arc::clone(&t));
            t as Arc<dyn Export>
        })
    };
    let t = slot.lock().unwrap().take().unwrap();
    (s, t)
}

#[test]
fn dirty_set_and_point_in_time_reads_with_qemu_io() {
    if !have("qemu-io") {
        return;
    }
    let (s, t) = tracked_server(16 * MIB);
    assert_eq!(t.recovery(), Recovery::New);
    qemu_io(
        &s.uri(),
        &[
            "write -P 0x11 0 64k",
            "write -P 0x22 5M 4k",
            "write -z 9M 8k",
            "discard 12M 1M",
        ],
    );
    assert_eq!(
        t.dirty_ranges(),
        vec![
            r(0, 65536),
            r(5 * MIB, 4096),
            r(9 * MIB, 8192),
            r(12 * MIB, MIB)
        ]
    );

    let spill = s.path("spill");
    let ranges = t.start_epoch(EpochScope::Dirty, &spill).unwrap();
    assert_eq!(ranges.len(), 4);
    // Writers carry on during the epoch: overwrite captured blocks and others.
    qemu_io(
        &s.uri(),
        &[
            "write -P 0x99 0 128k",
            "write -P 0x98 5M 4k",
            "write -P 0x97 7M 4k",
        ],
    );
    // The streamed image is the content at the switch, not what is on disk now.
    for off in (0..65536).step_by(4096) {
        let b = t.read_snapshot_block(off).unwrap();
        assert!(b.iter().all(|&x| x == 0x11), "block {off}");
    }
    assert!(t
        .read_snapshot_block(5 * MIB)
        .unwrap()
        .iter()
        .all(|&x| x == 0x22));
    assert!(t
        .read_snapshot_block(9 * MIB)
        .unwrap()
        .iter()
        .all(|&x| x == 0));
    assert!(read_range(&s.image, 0, 4096).iter().all(|&x| x == 0x99));
    assert_eq!(t.finish_epoch(true).unwrap(), 1);
    assert_eq!(
        t.dirty_ranges(),
        vec![r(0, 131072), r(5 * MIB, 4096), r(7 * MIB, 4096)]
    );
    t.close().unwrap();
}

#[test]
fn copy_before_write_under_concurrent_nbdcopy() {
    if !have("nbdcopy") {
        return;
    }
    let (s, t) = tracked_server(32 * MIB);
    // Before: a known image everywhere.
    let before = s.path("before.raw");
    std::fs::write(
        &before,
        (0..32 * MIB)
            .map(|i| (i / 4096 % 251) as u8)
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    run_ok("nbdcopy", &[before.to_str().unwrap(), &s.uri()]);
    let ranges = t.start_epoch(EpochScope::All, &s.path("spill")).unwrap();
    assert_eq!(ranges, vec![r(0, 32 * MIB)]);
    // Overwrite everything through 4 connections while the snapshot is being streamed.
    let after = s.path("after.raw");
    std::fs::write(&after, vec![0x5a; (32 * MIB) as usize]).unwrap();
    let uri = s.uri();
    let after_s = after.to_str().unwrap().to_string();
    let copier = std::thread::spawn(move || run_ok("nbdcopy", &[&after_s, &uri]));
    let expect = std::fs::read(&before).unwrap();
    for off in (0..32 * MIB).step_by(4096) {
        let b = t.read_snapshot_block(off).unwrap();
        assert!(
            b[..] == expect[off as usize..off as usize + 4096],
            "block at {off}"
        );
    }
    copier.join().unwrap();
    assert!(std::fs::read(&s.image).unwrap() == std::fs::read(&after).unwrap());
    t.finish_epoch(true).unwrap();
}

/// Child role for `write_intent_survives_sigkill`: serves a tracked export until killed.
#[test]
fn cbt_child_server() {
    let Ok(dir) = std::env::var("BLOCKSNAP_CBT_CHILD") else {
        return;
    };
    let dir = PathBuf::from(dir);
    let t = TrackedExport::open(
        FileExport::open(&dir.join("image.raw")).unwrap(),
        &dir.join("image.cbt"),
    )
    .unwrap();
    let server = blocksnap::nbd::NbdServer::new();
    server.add_export(EXPORT, Arc::new(t)).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let listener = tokio::net::UnixListener::bind(dir.join("nbd.sock")).unwrap();
        server.serve_unix(listener, std::future::pending()).await;
    });
}

fn wait_for_socket(path: &Path) -> bool {
    for _ in 0..500 {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn write_intent_survives_sigkill() {
    if !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("image.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "cbt_child_server",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("BLOCKSNAP_CBT_CHILD", dir.path())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = ChildGuard(Some(child));
    let sock = dir.path().join("nbd.sock");
    assert!(wait_for_socket(&sock), "child server never listened");
    let uri = blocksnap::nbd::nbd_uri(EXPORT, &sock);
    // Acknowledged writes in three regions (one spans a region boundary).
    qemu_io(
        &uri,
        &[
            "write -P 1 0 4k",
            "write -P 2 10M 8k",
            "write -P 3 33550336 8k",
        ],
    );
    // SIGKILL: no chance to close the bitmap cleanly.
    if let Some(c) = child.0.as_mut() {
        c.kill().unwrap();
        c.wait().unwrap();
    }
    child.0 = None;
    let t = TrackedExport::open(
        FileExport::open(&image).unwrap(),
        &dir.path().join("image.cbt"),
    )
    .unwrap();
    assert_eq!(t.recovery(), Recovery::Crashed);
    let dirty = t.dirty_ranges();
    let covered = |off: u64, len: u64| {
        dirty
            .iter()
            .any(|d| d.offset <= off && off + len <= d.offset + d.len)
    };
    for (off, len) in [
        (0, 4096),
        (10 * MIB, 8192),
        (33550336, 4096),
        (33554432, 4096),
    ] {
        assert!(covered(off, len), "{off}+{len} missing from {dirty:?}");
    }
    // A superset at region granularity, not the whole volume.
    let total: u64 = dirty.iter().map(|d| d.len).sum();
    assert_eq!(total, 4 * MIB, "{dirty:?}");
}

/// The capture path end to end: ext4 on nbdfuse + loop on a tracked export; freeze only
/// for flush + epoch switch, keep writing files while the snapshot is streamed, and the
/// streamed image is a clean filesystem holding exactly the files from before the freeze.
#[test]
fn ext4_snapshot_streamed_while_writers_continue() {
    if !is_root()
        || !have("nbdfuse")
        || !have("losetup")
        || !have("mkfs.ext4")
        || !have("e2fsck")
        || !have("fsfreeze")
    {
        return;
    }
    if !Path::new("/dev/fuse").exists() {
        eprintln!("SKIP: /dev/fuse is not available");
        return;
    }
    let size = 128 * MIB;
    let (s, t) = tracked_server(size);
    let fuse_dir = s.path("fuse");
    let mnt = s.path("mnt");
    std::fs::create_dir(&fuse_dir).unwrap();
    std::fs::create_dir(&mnt).unwrap();
    let pidfile = s.path("nbdfuse.pid");
    let child = Command::new("nbdfuse")
        .arg("-P")
        .arg(&pidfile)
        .arg(&fuse_dir)
        .arg(s.uri())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut fuse = ChildGuard(Some(child));
    let fuse_mount = MountGuard(fuse_dir.clone());
    assert!(wait_for_path(&pidfile, Duration::from_secs(20)));
    let dev = run_ok(
        "losetup",
        &["-f", "--show", fuse_dir.join("nbd").to_str().unwrap()],
    );
    let loop_dev = LoopGuard(dev.trim().to_string());
    run_ok("mkfs.ext4", &["-q", "-F", &loop_dev.0]);
    run_ok("mount", &[&loop_dev.0, mnt.to_str().unwrap()]);
    let mounted = MountGuard(mnt.clone());
    let body = |i: usize| -> Vec<u8> {
        (0..50_000 + i * 1000)
            .map(|b| (b % 253) as u8 ^ i as u8)
            .collect()
    };
    for i in 0..10 {
        std::fs::write(mnt.join(format!("before{i}")), body(i)).unwrap();
    }

    // The freeze window: fsfreeze flushes the fs, start_epoch flushes the export and swaps.
    let frozen_at = std::time::Instant::now();
    run_ok("fsfreeze", &["-f", mnt.to_str().unwrap()]);
    let ranges = t.start_epoch(EpochScope::All, &s.path("spill"));
    run_ok("fsfreeze", &["-u", mnt.to_str().unwrap()]);
    let freeze = frozen_at.elapsed();
    let ranges = ranges.unwrap();
    eprintln!("freeze window (fsfreeze -f .. -u, incl. flush + epoch switch): {freeze:?}");

    // Writers continue: new files and overwrites of old ones while the snapshot streams.
    let mnt2 = mnt.clone();
    let writer = std::thread::spawn(move || {
        for i in 0..10 {
            std::fs::write(mnt2.join(format!("after{i}")), vec![0xee; 200_000]).unwrap();
            std::fs::write(mnt2.join(format!("before{i}")), vec![0xdd; 60_000]).unwrap();
            let _ = Command::new("sync").status();
        }
    });
    let snap = s.path("snapshot.raw");
    let out = std::fs::File::create(&snap).unwrap();
    out.set_len(size).unwrap();
    for range in &ranges {
        let mut off = range.offset;
        while off < range.offset + range.len {
            let block = t.read_snapshot_block(off).unwrap();
            std::os::unix::fs::FileExt::write_all_at(&out, &block, off).unwrap();
            off += block.len() as u64;
        }
    }
    drop(out);
    writer.join().unwrap();
    t.finish_epoch(true).unwrap();
    assert!(
        !t.dirty_ranges().is_empty(),
        "writes after the switch are tracked"
    );
    drop(mounted);
    drop(loop_dev);
    drop(fuse_mount);
    assert!(fuse.wait_for_exit(Duration::from_secs(10)));

    // The point-in-time image: a clean filesystem with the old files, none of the new.
    run_ok("e2fsck", &["-f", "-n", snap.to_str().unwrap()]);
    let snap_dev = run_ok("losetup", &["-f", "--show", "-r", snap.to_str().unwrap()]);
    let snap_loop = LoopGuard(snap_dev.trim().to_string());
    run_ok(
        "mount",
        &["-o", "ro,noload", &snap_loop.0, mnt.to_str().unwrap()],
    );
    let _snap_mount = MountGuard(mnt.clone());
    for i in 0..10 {
        assert!(
            std::fs::read(mnt.join(format!("before{i}"))).unwrap() == body(i),
            "before{i}"
        );
        assert!(
            !mnt.join(format!("after{i}")).exists(),
            "after{i} leaked into the snapshot"
        );
    }
}

//! Snapshots of mounted filesystems: real FIFREEZE on ext4 and xfs, file checksums after
//! restore, a reflink state dir for millisecond freezes, a write issued while frozen, and
//! SIGKILL of the daemon at many points.

mod common;

use common::{have_tool, root_or_skip, sh, writable, Daemon, Mount, ScratchFs};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// sha256 of every regular file under `dir`, by relative path.
fn tree_sums(dir: &Path) -> BTreeMap<String, String> {
    let out = sh(&format!("cd {} && find . -type f -not -path './lost+found/*' -print0 | sort -z | xargs -0 -r sha256sum", dir.display()));
    out.lines()
        .filter_map(|l| {
            l.split_once("  ")
                .map(|(sum, path)| (path.to_string(), sum.to_string()))
        })
        .collect()
}

fn write_files(dir: &Path, prefix: &str, count: usize, kib: usize) {
    std::fs::create_dir_all(dir.join(prefix)).expect("mkdir");
    for i in 0..count {
        sh(&format!(
            "head -c {}K /dev/urandom > {}/{prefix}/f{i}",
            kib,
            dir.display()
        ));
    }
}

/// Restores `ss` into a new volume, checks the filesystem read-only and returns its file sums.
fn restored_sums(d: &Daemon, ss: &str, fstype: &str) -> BTreeMap<String, String> {
    let v = d.job(&["create-volume-from-snapshot", "-s", ss, "-N", "check"]);
    let rv = v["volume_id"].as_str().unwrap().to_string();
    let dev = d.attach(&rv);
    let mnt = d.dir.path().join(format!("check-{ss}"));
    std::fs::create_dir_all(&mnt).expect("mkdir");
    match fstype {
        "xfs" => {
            // A frozen xfs keeps committed changes in its log: replay it by mounting once,
            // as an administrator would, then check the filesystem without modifying it.
            sh(&format!(
                "mount -o nouuid {} {}",
                dev.display(),
                mnt.display()
            ));
            drop(Mount {
                target: mnt.clone(),
            });
            sh(&format!("xfs_repair -n {}", dev.display()));
        }
        _ => {
            sh(&format!("e2fsck -fn {}", dev.display()));
        }
    }
    let mnt = d.dir.path().join(format!("check-{ss}"));
    let opts = if fstype == "xfs" {
        "-o ro,nouuid,norecovery"
    } else {
        "-o ro,noload"
    };
    std::fs::create_dir_all(&mnt).expect("mkdir");
    sh(&format!("mount {opts} {} {}", dev.display(), mnt.display()));
    let m = Mount {
        target: mnt.clone(),
    };
    let sums = tree_sums(&mnt);
    drop(m);
    d.ok(&["detach-volumes", "-v", &rv]);
    d.ok(&["delete-volumes", "-v", &rv]);
    sums
}

fn mounted_chain(fstype: &str, size: &str, state_dir: Option<PathBuf>) {
    let d = match &state_dir {
        Some(s) => Daemon::start_with_state_dir(s, ""),
        None => Daemon::start(""),
    };
    let vol = d.volume(size, fstype);
    let dev = d.attach(&vol);
    let mkfs = if fstype == "xfs" {
        format!("mkfs.xfs -q -f {}", dev.display())
    } else {
        format!("mkfs.ext4 -q -F {}", dev.display())
    };
    sh(&mkfs);
    let mnt = d.dir.path().join("mnt");
    let _mount = Mount::new(&dev, &mnt);
    write_files(&mnt, "a", 20, 256);
    let sums_full = tree_sums(&mnt);
    let v = d.job(&["create-snapshots", "-r", &vol, "-F", "1", "-N", "full"]);
    let full = v["snapshots"][0].as_str().unwrap().to_string();
    let s = d.describe_snapshot(&full);
    assert_eq!(s["consistency"], "filesystem", "{s}");
    assert!(s["freeze_ms"].as_u64().unwrap() >= 1, "{s}");
    assert!(writable(&mnt), "filesystem left frozen");
    write_files(&mnt, "b", 10, 64);
    std::fs::remove_file(mnt.join("a/f3")).expect("rm");
    let sums_inc = tree_sums(&mnt);
    let v = d.job(&["create-snapshots", "-r", &vol, "-F", "0", "-N", "inc"]);
    let inc = v["snapshots"][0].as_str().unwrap().to_string();
    let s = d.describe_snapshot(&inc);
    assert_eq!(s["snapshot_type"], 0);
    assert_eq!(s["consistency"], "filesystem");
    if state_dir.is_some() {
        // On a reflink state dir the freeze is one FICLONE: milliseconds.
        assert!(s["freeze_ms"].as_u64().unwrap() < 1000, "{s}");
    }
    assert_eq!(restored_sums(&d, &full, fstype), sums_full);
    assert_eq!(restored_sums(&d, &inc, fstype), sums_inc);
    // Rollback is refused while mounted.
    let e = d.fails(&["apply-snapshots", "-s", &full], 2500);
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains(mnt.to_str().unwrap()),
        "{e}"
    );
}

#[test]
fn mounted_ext4_chain_restores_identical_files() {
    if !root_or_skip("mounted_ext4_chain_restores_identical_files") {
        return;
    }
    mounted_chain("ext4", "64M", None);
}

#[test]
fn mounted_xfs_chain_restores_identical_files() {
    if !root_or_skip("mounted_xfs_chain_restores_identical_files") || !have_tool("mkfs.xfs") {
        return;
    }
    mounted_chain("xfs", "320M", None);
}

#[test]
fn reflink_state_dir_freezes_for_milliseconds() {
    if !root_or_skip("reflink_state_dir_freezes_for_milliseconds") || !have_tool("mkfs.xfs") {
        return;
    }
    let fs = ScratchFs::new("xfs", "1G");
    mounted_chain("ext4", "128M", Some(fs.path().join("state")));
}

#[test]
fn unmounted_volume_with_a_writer_is_refused_unless_forced() {
    if !root_or_skip("unmounted_volume_with_a_writer_is_refused_unless_forced") {
        return;
    }
    let d = Daemon::start("");
    let vol = d.volume("16M", "busy");
    let dev = d.attach(&vol);
    // A process holding the device open for writing.
    let mut holder = Command::new("sh")
        .arg("-c")
        // `exec` twice: the process we kill is the one holding the device open.
        .arg(format!("exec 3<>{} ; exec sleep 60", dev.display()))
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn holder");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut e = serde_json::Value::Null;
    while Instant::now() < deadline {
        e = d.call(&["create-snapshots", "-r", &vol]);
        if e["ret_code"] == 2500 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let msg = e["message"].as_str().unwrap_or_default().to_string();
    let forced = d.job(&["create-snapshots", "-r", &vol, "--force"]);
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(e["ret_code"], 2500, "{e}");
    assert!(msg.contains(&format!("pid {}", holder.id())), "{msg}");
    let s = d.describe_snapshot(forced["snapshots"][0].as_str().unwrap());
    assert_eq!(s["consistency"], "crash");
    d.ok(&["detach-volumes", "-v", &vol]);
}

/// A writer appends numbered records with fsync, logging each completion outside the volume.
struct Writer {
    child: std::process::Child,
}

impl Writer {
    fn start(file: &Path, log: &Path) -> Writer {
        let script = format!(
            "i=0; while true; do i=$((i+1)); echo $i >> {f}; sync -f {f} || exit 1; echo $i >> {l}; done",
            f = file.display(),
            l = log.display()
        );
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .spawn()
            .expect("writer");
        Writer { child }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_write_issued_while_frozen_lands_after_the_thaw_and_not_in_the_snapshot() {
    if !root_or_skip("a_write_issued_while_frozen_lands_after_the_thaw_and_not_in_the_snapshot") {
        return;
    }
    let d = Daemon::start("");
    let vol = d.volume("256M", "frozen-writes");
    let dev = d.attach(&vol);
    sh(&format!("mkfs.ext4 -q -F {}", dev.display()));
    let mnt = d.dir.path().join("mnt");
    let _mount = Mount::new(&dev, &mnt);
    // Enough data that the copy made while frozen (ext4 state dir: no reflink) takes a while.
    sh(&format!(
        "head -c 160M /dev/urandom > {}/bulk",
        mnt.display()
    ));
    let log = d.dir.path().join("writer.log");
    let writer = Writer::start(&mnt.join("seq"), &log);
    while std::fs::read_to_string(&log)
        .map(|s| s.lines().count())
        .unwrap_or(0)
        < 20
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let v = d.job(&["create-snapshots", "-r", &vol, "-F", "1"]);
    let ss = v["snapshots"][0].as_str().unwrap().to_string();
    let done_after = std::fs::read_to_string(&log).unwrap().lines().count();
    std::thread::sleep(Duration::from_millis(300));
    drop(writer);
    let s = d.describe_snapshot(&ss);
    assert_eq!(s["consistency"], "filesystem");
    assert!(s["freeze_ms"].as_u64().unwrap() > 0);

    // In the snapshot: exactly 1..=k, a prefix; the live file went on past k after the thaw.
    let rv = d.job(&["create-volume-from-snapshot", "-s", &ss]);
    let rv = rv["volume_id"].as_str().unwrap().to_string();
    let rdev = d.attach(&rv);
    let rmnt = d.dir.path().join("restored");
    std::fs::create_dir_all(&rmnt).unwrap();
    sh(&format!(
        "mount -o ro,noload {} {}",
        rdev.display(),
        rmnt.display()
    ));
    let rm = Mount {
        target: rmnt.clone(),
    };
    let in_snapshot: Vec<u64> = std::fs::read_to_string(rmnt.join("seq"))
        .unwrap()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect();
    drop(rm);
    let live: Vec<u64> = std::fs::read_to_string(mnt.join("seq"))
        .unwrap()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect();
    let k = in_snapshot.len() as u64;
    assert!(k >= 20, "snapshot holds {k} records");
    assert_eq!(
        in_snapshot,
        (1..=k).collect::<Vec<_>>(),
        "the snapshot holds a prefix of the writes"
    );
    assert!(live.len() as u64 > k, "writes went on after the thaw");
    assert!(
        done_after as u64 >= k,
        "every write in the snapshot had completed"
    );
    assert!(!in_snapshot.contains(&(k + 1)));
    d.ok(&["detach-volumes", "-v", &rv]);
}

#[test]
fn sigkill_at_many_points_leaves_nothing_frozen_or_partial() {
    if !root_or_skip("sigkill_at_many_points_leaves_nothing_frozen_or_partial") {
        return;
    }
    let mut d = Daemon::start("");
    let vol = d.volume("128M", "crashy");
    let dev = d.attach(&vol);
    sh(&format!("mkfs.ext4 -q -F {}", dev.display()));
    let mnt = d.dir.path().join("mnt");
    let _mount = Mount::new(&dev, &mnt);
    sh(&format!(
        "head -c 48M /dev/urandom > {}/bulk",
        mnt.display()
    ));
    let mut expected: BTreeMap<String, String> = BTreeMap::new();
    let first = d.job(&["create-snapshots", "-r", &vol, "-F", "1"]);
    let first = first["snapshots"][0].as_str().unwrap().to_string();
    expected.insert(first.clone(), String::new());
    let delays = [0u64, 5, 20, 40, 80, 120, 200, 300];
    for (round, delay) in delays.iter().enumerate() {
        sh(&format!(
            "head -c 1M /dev/urandom > {}/r{round}",
            mnt.display()
        ));
        let verb: Vec<String> = match round % 3 {
            0 => vec!["create-snapshots".into(), "-r".into(), vol.clone()],
            1 => vec![
                "create-volume-from-snapshot".into(),
                "-s".into(),
                first.clone(),
            ],
            _ => {
                // Delete the newest snapshot but the first (often in the middle of the chain).
                let all = d.ok(&["describe-snapshots", "-r", &vol, "-s", "available"]);
                let newest = all["snapshot_set"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| s["snapshot_id"].as_str().unwrap().to_string())
                    .find(|s| *s != first);
                match newest {
                    Some(s) => vec!["delete-snapshots".into(), "-s".into(), s],
                    None => vec!["create-snapshots".into(), "-r".into(), vol.clone()],
                }
            }
        };
        let args: Vec<&str> = verb.iter().map(String::as_str).collect();
        let _ = d.call(&args);
        std::thread::sleep(Duration::from_millis(*delay));
        d.kill9();
        d.spawn();
        assert!(
            writable(&mnt),
            "round {round}: filesystem left frozen after restart"
        );
        // Nothing pending remains; all jobs end.
        let snaps = d.ok(&["describe-snapshots", "-r", &vol]);
        for s in snaps["snapshot_set"].as_array().unwrap() {
            assert_eq!(s["status"], "available", "round {round}: {s}");
        }
        let jobs = d.ok(&["describe-jobs"]);
        for j in jobs["job_set"].as_array().unwrap() {
            let j = d.wait_job(j["job_id"].as_str().unwrap());
            assert!(
                j["status"] == "successful" || j["status"] == "failed",
                "{j}"
            );
        }
        assert!(
            std::fs::read_dir(d.state_dir.join("tmp"))
                .unwrap()
                .next()
                .is_none(),
            "round {round}: leftovers in tmp"
        );
    }
    // Every available snapshot verifies and restores.
    let snaps = d.ok(&["describe-snapshots", "-r", &vol]);
    for s in snaps["snapshot_set"].as_array().unwrap() {
        let id = s["snapshot_id"].as_str().unwrap();
        d.job(&["verify-snapshots", "-s", id]);
        let v = d.job(&["create-volume-from-snapshot", "-s", id]);
        let rv = v["volume_id"].as_str().unwrap();
        sh(&format!("e2fsck -fn {}", d.image(rv).display()));
    }
}

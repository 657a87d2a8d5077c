//! The volume life cycle on real loop devices, with a real ext4 mounted on them, across
//! daemon restarts and a simulated reboot.

mod common;

use common::{root_or_skip, sh, Daemon, Mount};
use std::path::Path;

#[test]
fn volume_life_cycle_with_a_mounted_filesystem() {
    if !root_or_skip("volume_life_cycle_with_a_mounted_filesystem") {
        return;
    }
    let mut d = Daemon::start("");
    let vol = d.volume("64M", "life");
    let v = d.describe_volume(&vol);
    assert_eq!(v["status"], "available");
    assert_eq!(v["size_bytes"], 64 << 20);
    assert_eq!(v["size"], 0.0625);
    assert_eq!(v["backend"], "loop");
    assert_eq!(v["volume_name"], "life");
    assert_eq!(v["owner"], "root");
    let image = d.image(&vol);
    let meta = std::fs::metadata(&image).expect("image exists");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o600
    );
    assert!(
        std::os::unix::fs::MetadataExt::blocks(&meta) < 64,
        "image is not sparse"
    );

    let dev = d.attach(&vol);
    assert!(dev.to_string_lossy().starts_with("/dev/loop"), "{dev:?}");
    assert_eq!(d.describe_volume(&vol)["status"], "in-use");
    d.fails(&["attach-volumes", "-v", &vol], 2500);

    sh(&format!("mkfs.ext4 -q -F {}", dev.display()));
    let mnt = d.dir.path().join("mnt");
    let mount = Mount::new(&dev, &mnt);
    std::fs::write(mnt.join("hello"), b"hello world").expect("write");
    sh("sync");
    let v = d.describe_volume(&vol);
    assert_eq!(v["mountpoints"][0], mnt.to_string_lossy().as_ref());

    let e = d.fails(&["detach-volumes", "-v", &vol], 2500);
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains(mnt.to_str().unwrap()),
        "{e}"
    );
    d.fails(&["delete-volumes", "-v", &vol], 2500);

    // Grow: the attached device follows.
    d.ok(&["resize-volumes", "-v", &vol, "-s", "128M"]);
    assert_eq!(d.describe_volume(&vol)["size_bytes"], 128 << 20);
    assert_eq!(
        sh(&format!("blockdev --getsize64 {}", dev.display())).trim(),
        (128u64 << 20).to_string()
    );
    d.fails(&["resize-volumes", "-v", &vol, "-s", "64M"], 1100);

    // A clean restart and a SIGKILL keep the catalog and the attachment.
    d.restart();
    let v = d.describe_volume(&vol);
    assert_eq!(v["status"], "in-use");
    assert_eq!(v["device"], dev.to_string_lossy().as_ref());
    d.kill9();
    d.spawn();
    assert_eq!(
        d.describe_volume(&vol)["device"],
        dev.to_string_lossy().as_ref()
    );
    assert_eq!(
        std::fs::read(mnt.join("hello")).expect("read back"),
        b"hello world"
    );

    drop(mount);
    d.ok(&["detach-volumes", "-v", &vol]);
    let v = d.describe_volume(&vol);
    assert_eq!(v["status"], "available");
    assert_eq!(v["device"], "");
    assert!(!Path::new(&sh("losetup -l -n -O BACK-FILE")).starts_with(&image));

    d.ok(&["delete-volumes", "-v", &vol]);
    assert!(!image.exists());
    assert_eq!(d.describe_volume(&vol)["status"], "deleted");
    let all = d.ok(&["describe-volumes"]);
    assert_eq!(all["total_count"], 0, "{all}");
    d.fails(&["attach-volumes", "-v", &vol], 2100);
}

#[test]
fn attachments_come_back_after_a_reboot() {
    if !root_or_skip("attachments_come_back_after_a_reboot") {
        return;
    }
    let mut d = Daemon::start("");
    let vol = d.volume("32M", "reboot");
    let dev = d.attach(&vol);
    assert!(d.stop());
    // What a reboot does to loop devices: they are gone.
    sh(&format!("losetup -d {}", dev.display()));
    d.spawn();
    let v = d.describe_volume(&vol);
    assert_eq!(v["status"], "in-use");
    let dev2 = v["device"].as_str().expect("device");
    assert!(dev2.starts_with("/dev/loop"));
    let back = sh(&format!("losetup -n -O BACK-FILE {dev2}"));
    assert_eq!(back.trim(), d.image(&vol).to_string_lossy());
    d.ok(&["detach-volumes", "-v", &vol]);
}

#[test]
fn describe_filters_and_pages() {
    if !root_or_skip("describe_filters_and_pages") {
        return;
    }
    let d = Daemon::start("");
    let v = d.job(&["create-volumes", "-s", "16M", "-N", "batch", "-c", "3"]);
    let ids: Vec<String> = v["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 3);
    let other = d.volume("1", "single-gib");
    assert_eq!(d.describe_volume(&other)["size_bytes"], 1u64 << 30);
    assert_eq!(d.ok(&["describe-volumes"])["total_count"], 4);
    assert_eq!(d.ok(&["describe-volumes", "-W", "batch"])["total_count"], 3);
    let listed = d.ok(&["describe-volumes", "-v", &format!("{},{}", ids[0], other)]);
    assert_eq!(listed["total_count"], 2);
    let page = d.ok(&["describe-volumes", "--offset", "1", "--limit", "2"]);
    assert_eq!(page["total_count"], 4);
    assert_eq!(page["volume_set"].as_array().unwrap().len(), 2);
    d.ok(&["attach-volumes", "-v", &ids[1]]);
    let in_use = d.ok(&["describe-volumes", "-s", "in-use"]);
    assert_eq!(in_use["total_count"], 1);
    assert_eq!(in_use["volume_set"][0]["volume_id"], ids[1].as_str());
    d.ok(&["detach-volumes", "-v", &ids[1]]);
}

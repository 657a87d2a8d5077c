//! The NBD server against real clients: nbdinfo, qemu-io, qemu-img, nbdcopy, fio and
//! nbdfuse (with a loop device and ext4 on top). Each test owns its server and socket.

mod nbd_support;

use std::fs;
use std::process::{Command, Stdio};
use std::time::Duration;

use nbd_support::*;

const MIB: u64 = 1 << 20;

#[test]
fn nbdinfo_shows_size_list_flags_and_map() {
    if !have("nbdinfo") {
        return;
    }
    let s = Served::start(64 * MIB);
    fill(&s.image, MIB, 0xaa, MIB as usize);
    fill(&s.image, 10 * MIB, 0xbb, 4096);

    let size = run_ok("nbdinfo", &["--size", &s.uri()]);
    assert_eq!(size.trim(), (64 * MIB).to_string());

    let info = run_ok("nbdinfo", &[&s.uri()]);
    for needle in [
        "can_flush: true",
        "can_fua: true",
        "can_trim: true",
        "can_zero: true",
        "can_fast_zero: true",
        "can_multi_conn: true",
        "can_cache: true",
        "is_read_only: false",
        "base:allocation",
    ] {
        assert!(info.contains(needle), "nbdinfo lacks {needle:?}:\n{info}");
    }

    let list = run_ok(
        "nbdinfo",
        &[
            "--list",
            &format!("nbd+unix://?socket={}", s.sock.display()),
        ],
    );
    assert!(list.contains(EXPORT), "{list}");

    // Map lines: offset length type description.
    let map = run_ok("nbdinfo", &["--map", &s.uri()]);
    let rows: Vec<(u64, u64, String)> = map
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[3..].join(" "),
            )
        })
        .collect();
    assert_eq!(rows.iter().map(|r| r.1).sum::<u64>(), 64 * MIB, "{map}");
    let kind_at = |off: u64| {
        rows.iter()
            .find(|r| r.0 <= off && off < r.0 + r.1)
            .map(|r| r.2.clone())
            .unwrap()
    };
    assert_eq!(kind_at(0), "hole,zero", "{map}");
    assert_eq!(kind_at(MIB), "data", "{map}");
    assert_eq!(kind_at(2 * MIB - 1), "data", "{map}");
    assert_eq!(kind_at(5 * MIB), "hole,zero", "{map}");
    assert_eq!(kind_at(10 * MIB), "data", "{map}");
    assert_eq!(kind_at(63 * MIB), "hole,zero", "{map}");
}

#[test]
fn qemu_io_writes_and_verifies_patterns() {
    if !have("qemu-io") {
        return;
    }
    let s = Served::start(32 * MIB);
    let uri = s.uri();
    qemu_io(
        &uri,
        &[
            "write -P 0xab 0 1M",
            "write -P 0xcd 1M 512",
            "write -f -P 0x11 4M 64k",
            "write -z 2M 1M",
            "write -P 0x5a 8M 3M",
            "flush",
        ],
    );
    qemu_io(
        &uri,
        &[
            "read -P 0xab 0 512",
            "read -P 0xab 512 1047552",
            "read -P 0xcd 1M 512",
            "read -P 0x11 4M 64k",
            "read -P 0 2M 1M",
            "read -P 0x5a 8M 3M",
            "read -P 0 20M 4M",
            "discard 8M 1M",
            "write -z -u 9M 1M",
            "read -P 0 9M 1M",
            "aio_write -P 0x77 12M 64k",
            "aio_write -P 0x78 13M 64k",
            "aio_flush",
            "read -P 0x77 12M 64k",
            "read -P 0x78 13M 64k",
        ],
    );
    // The backing file holds exactly what was written.
    assert!(read_range(&s.image, 0, MIB as usize)
        .iter()
        .all(|&b| b == 0xab));
    assert!(read_range(&s.image, 4 * MIB, 65536)
        .iter()
        .all(|&b| b == 0x11));
    assert!(read_range(&s.image, 10 * MIB, MIB as usize)
        .iter()
        .all(|&b| b == 0x5a));
    assert!(read_range(&s.image, 9 * MIB, MIB as usize)
        .iter()
        .all(|&b| b == 0));
}

#[test]
fn qemu_img_and_nbdcopy_copy_out_and_in() {
    if !have("qemu-img") || !have("nbdcopy") {
        return;
    }
    let s = Served::start(48 * MIB);
    // A recognisable, partly sparse image.
    for i in 0..40u64 {
        if i % 3 != 0 {
            fill(&s.image, i * MIB + i * 17, i as u8 + 1, 70_000);
        }
    }
    let original = fs::read(&s.image).unwrap();

    let out1 = s.path("out-qemu.raw");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &s.uri(),
            out1.to_str().unwrap(),
        ],
    );
    assert!(
        fs::read(&out1).unwrap() == original,
        "qemu-img convert differs"
    );

    let out2 = s.path("out-nbdcopy.raw");
    fs::File::create(&out2).unwrap().set_len(48 * MIB).unwrap();
    run_ok("nbdcopy", &[&s.uri(), out2.to_str().unwrap()]);
    assert!(fs::read(&out2).unwrap() == original, "nbdcopy out differs");

    // Copy a different image in (nbdcopy uses multi-conn and zeroing for holes).
    let src = s.path("in.raw");
    fs::File::create(&src).unwrap().set_len(48 * MIB).unwrap();
    for i in 0..48u64 {
        if i % 2 == 0 {
            fill(&src, i * MIB + 4096, 0xf0 ^ i as u8, 200_000);
        }
    }
    run_ok("nbdcopy", &[src.to_str().unwrap(), &s.uri()]);
    assert!(
        fs::read(&s.image).unwrap() == fs::read(&src).unwrap(),
        "nbdcopy in differs"
    );

    // And qemu-img compare agrees through the server.
    run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            src.to_str().unwrap(),
            &s.uri(),
        ],
    );
}

#[test]
fn many_concurrent_clients() {
    if !have("qemu-io") || !have("nbdcopy") {
        return;
    }
    let s = Served::start(64 * MIB);
    let uri = s.uri();
    let workers: Vec<_> = (0..12u64)
        .map(|i| {
            let uri = uri.clone();
            std::thread::spawn(move || {
                let off = i * 4 * MIB;
                let pat = 0x10 + i as u8;
                let w = format!("write -P {pat} {off} 2M");
                let r = format!("read -P {pat} {off} 2M");
                let a = format!("aio_write -P {pat} {} 64k", off + 2 * MIB);
                qemu_io(&uri, &[&w, &a, "aio_flush", &r]);
            })
        })
        .collect();
    // A multi-conn reader at the same time.
    let out = s.path("concurrent.raw");
    fs::File::create(&out).unwrap().set_len(64 * MIB).unwrap();
    run_ok("nbdcopy", &["--connections=4", &uri, out.to_str().unwrap()]);
    for w in workers {
        w.join().unwrap();
    }
    for i in 0..12u64 {
        let data = read_range(&s.image, i * 4 * MIB, 2 * MIB as usize);
        assert!(data.iter().all(|&b| b == 0x10 + i as u8), "region {i}");
    }
}

#[test]
fn fio_nbd_engine_verifies() {
    if !have("fio") {
        return;
    }
    let help = run("fio", &["--enghelp"]);
    if !String::from_utf8_lossy(&help.stdout).contains("nbd") {
        eprintln!("SKIP: this fio has no nbd engine");
        return;
    }
    let s = Served::start(64 * MIB);
    let uri = format!("--uri={}", s.uri());
    let out = run_ok(
        "fio",
        &[
            "--name=nbdverify",
            "--ioengine=nbd",
            &uri,
            "--rw=randwrite",
            "--bs=4k",
            "--size=32M",
            "--iodepth=16",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_state_save=0",
            "--output-format=terse",
        ],
    );
    // Terse output: field 5 is the error count of the job.
    let fields: Vec<&str> = out.lines().last().unwrap_or("").split(';').collect();
    assert!(
        fields.len() > 5 && fields[4] == "0",
        "fio reported errors:\n{out}"
    );
}

#[test]
fn tcp_listener_serves_too() {
    if !have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("t.raw");
    let export = blocksnap::nbd::FileExport::create(&image, 8 * MIB).unwrap();
    let server = blocksnap::nbd::NbdServer::new();
    server
        .add_export("tcpvol", std::sync::Arc::new(export))
        .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let srv = server.clone();
    let task = rt.spawn(async move {
        srv.serve_tcp(listener, async {
            let _ = stopped.await;
        })
        .await
    });
    let out = run_ok(
        "nbdinfo",
        &["--size", &format!("nbd://127.0.0.1:{port}/tcpvol")],
    );
    assert_eq!(out.trim(), (8 * MIB).to_string());
    let _ = stop.send(());
    rt.block_on(task).unwrap();
}

#[test]
fn nbdfuse_loop_ext4_mount_and_fsck() {
    if !is_root() || !have("nbdfuse") || !have("losetup") || !have("mkfs.ext4") || !have("e2fsck") {
        return;
    }
    if !std::path::Path::new("/dev/fuse").exists() {
        eprintln!("SKIP: /dev/fuse is not available");
        return;
    }
    let s = Served::start(128 * MIB);
    let fuse_dir = s.path("fuse");
    let mnt = s.path("mnt");
    fs::create_dir(&fuse_dir).unwrap();
    fs::create_dir(&mnt).unwrap();
    let pidfile = s.path("nbdfuse.pid");

    let child = Command::new("nbdfuse")
        .arg("-P")
        .arg(&pidfile)
        .arg(&fuse_dir)
        .arg(s.uri())
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn nbdfuse");
    let mut fuse = ChildGuard(Some(child));
    let fuse_mount = MountGuard(fuse_dir.clone());
    assert!(
        wait_for_path(&pidfile, Duration::from_secs(20)),
        "nbdfuse never became ready"
    );
    let disk = fuse_dir.join("nbd");
    assert_eq!(fs::metadata(&disk).unwrap().len(), 128 * MIB);

    let dev = run_ok("losetup", &["-f", "--show", disk.to_str().unwrap()]);
    let loop_dev = LoopGuard(dev.trim().to_string());
    run_ok("mkfs.ext4", &["-q", "-F", &loop_dev.0]);
    run_ok("mount", &[&loop_dev.0, mnt.to_str().unwrap()]);
    let mounted = MountGuard(mnt.clone());
    for i in 0..20 {
        let body: Vec<u8> = (0..(100_000 + i * 3000))
            .map(|b| (b % 251) as u8 ^ i as u8)
            .collect();
        fs::write(mnt.join(format!("file{i}")), body).unwrap();
    }
    run_ok("sync", &[]);
    drop(mounted);
    // Read the files back after a fresh mount, then check the filesystem.
    run_ok("mount", &[&loop_dev.0, mnt.to_str().unwrap()]);
    let mounted = MountGuard(mnt.clone());
    for i in 0..20 {
        let body: Vec<u8> = (0..(100_000 + i * 3000))
            .map(|b| (b % 251) as u8 ^ i as u8)
            .collect();
        assert!(
            fs::read(mnt.join(format!("file{i}"))).unwrap() == body,
            "file{i}"
        );
    }
    drop(mounted);
    run_ok("e2fsck", &["-f", "-n", &loop_dev.0]);
    drop(loop_dev);
    drop(fuse_mount);
    assert!(
        fuse.wait_for_exit(Duration::from_secs(10)),
        "nbdfuse did not exit after unmount"
    );
    // The image on the server side is a valid ext4 filesystem too.
    run_ok("e2fsck", &["-f", "-n", s.image.to_str().unwrap()]);
}

#[test]
fn read_only_export_refuses_writes() {
    if !have("qemu-io") || !have("nbdinfo") {
        return;
    }
    let s = Served::start_with(4 * MIB, |image| {
        fill(image, 0, 0x44, 4096);
        std::sync::Arc::new(blocksnap::nbd::FileExport::open_read_only(image).unwrap())
    });
    let info = run_ok("nbdinfo", &[&s.uri()]);
    assert!(info.contains("is_read_only: true"), "{info}");
    let out = run_ok(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0x44 0 4k", &s.uri()],
    );
    assert!(!out.contains("fail"), "{out}");
    // Opening read-write is refused by qemu itself, seeing NBD_FLAG_READ_ONLY.
    let out = run("qemu-io", &["-f", "raw", "-c", "write -P 1 0 4k", &s.uri()]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.to_lowercase().contains("read-only")
            || text.contains("not permitted")
            || !out.status.success(),
        "{text}"
    );
    assert!(read_range(&s.image, 0, 4096).iter().all(|&b| b == 0x44));
}

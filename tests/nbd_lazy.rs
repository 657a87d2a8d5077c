//! Lazy restore against real clients: a `LazyExport` served by `NbdServer` on a unix
//! socket while a hydrator thread runs; qemu-io and nbdcopy see the snapshot's image with
//! their own writes, and the writes survive hydration.

mod nbd_support;

use std::fs;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use blocksnap::nbd::{FileExport, LazyExport};
use blocksnap::store::{capture, ChainReader, NoProgress, SnapshotMeta, Store};
use nbd_support::*;

const MIB: u64 = 1 << 20;
const G: u64 = 65536;

fn meta(n: u32, parent: Option<u32>, size: u64) -> SnapshotMeta {
    snapshot_meta(n, parent, size, G as u32)
}

/// Writes `model` bytes too, so the model stays the image a client should see.
fn put(model: &mut [u8], off: u64, byte: u8, len: u64) {
    model[off as usize..(off + len) as usize].fill(byte);
}

#[test]
fn clients_see_the_snapshot_and_keep_their_writes_while_it_hydrates() {
    if !have("qemu-io") || !have("nbdcopy") {
        return;
    }
    let size = 48 * MIB;
    // A full snapshot and an incremental over it, of an image with holes.
    let work = tempfile::tempdir().unwrap();
    let store = Store::open(&work.path().join("store")).unwrap();
    let src_path = work.path().join("source.raw");
    let src = fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&src_path)
        .unwrap();
    src.set_len(size).unwrap();
    let fill_src = |off: u64, byte: u8, len: u64| {
        src.write_all_at(&vec![byte; len as usize], off).unwrap();
    };
    fill_src(0, 0x11, 4 * MIB);
    fill_src(10 * MIB, 0x22, 4 * MIB);
    fill_src(40 * MIB + 12345, 0x2f, 3 * MIB);
    capture(&store, meta(1, None, size), &src, &NoProgress).unwrap();
    fill_src(2 * MIB, 0x33, MIB);
    fill_src(12 * MIB, 0, G);
    capture(&store, meta(2, Some(1), size), &src, &NoProgress).unwrap();
    let mut model = fs::read(&src_path).unwrap();
    drop(src);

    let reader = Arc::new(ChainReader::open(&store, &sid(2)).unwrap());
    let mut lazy: Option<Arc<LazyExport>> = None;
    let s = Served::start_with(size, |path| {
        let target = FileExport::open(path).unwrap();
        let e = Arc::new(LazyExport::open(target, reader, &path.with_extension("map"), G).unwrap());
        lazy = Some(Arc::clone(&e));
        e
    });
    let lazy = lazy.unwrap();
    let uri = s.uri();

    // Before hydration starts: reads of the snapshot, and partial writes into unhydrated
    // granules (the bytes around them must come from the snapshot).
    qemu_io(
        &uri,
        &[
            "read -P 0x11 0 2M",
            "read -P 0x33 2M 1M",
            "read -P 0 5M 1M",
            "write -P 0x44 1000448 100352",
            "write -P 0x55 11538432 8192",
            "flush",
        ],
    );
    put(&mut model, 1_000_448, 0x44, 100_352);
    put(&mut model, 11_538_432, 0x55, 8192);
    assert!(!lazy.is_fully_hydrated());

    // The background job, slowed down so that clients run alongside it.
    let stop = Arc::new(AtomicBool::new(false));
    let hydrator = {
        let (lazy, stop) = (Arc::clone(&lazy), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut steps = 0u32;
            while !stop.load(Ordering::Acquire) {
                steps += 1;
                let step = lazy.hydrate_next(2 * G).unwrap();
                if step.finished {
                    return steps;
                }
                std::thread::sleep(Duration::from_millis(3));
            }
            steps
        })
    };
    let writer = {
        let uri = uri.clone();
        std::thread::spawn(move || {
            qemu_io(
                &uri,
                &[
                    "write -P 0x66 30M 64k",
                    "aio_write -P 0x77 41M 100k",
                    "aio_flush",
                    "read -P 0x66 30M 64k",
                    "read -P 0x2f 42008576 983040",
                    "read -P 0x77 41M 100k",
                    "read -P 0x22 10M 1M",
                    "read -P 0x55 11538432 8192",
                ],
            )
        })
    };
    // Concurrently: a full copy out over 4 connections (checked outside the regions the
    // writer changes, whose content depends on timing).
    let out = s.path("out.raw");
    fs::File::create(&out).unwrap().set_len(size).unwrap();
    run_ok("nbdcopy", &["--connections=4", &uri, out.to_str().unwrap()]);
    writer.join().unwrap();
    put(&mut model, 30 * MIB, 0x66, G);
    put(&mut model, 41 * MIB, 0x77, 100 * 1024);
    let copied = fs::read(&out).unwrap();
    for (i, (a, b)) in copied
        .chunks(G as usize)
        .zip(model.chunks(G as usize))
        .enumerate()
    {
        let off = i as u64 * G;
        let raced = off == 30 * MIB || (41 * MIB..41 * MIB + 2 * G).contains(&off);
        assert!(
            raced || a == b,
            "nbdcopy read wrong bytes in granule at {off}"
        );
    }

    let steps = hydrator.join().unwrap();
    assert!(
        steps > 10,
        "hydration finished too fast to overlap: {steps} steps"
    );
    assert!(lazy.is_fully_hydrated());
    assert_eq!(lazy.hydrated_bytes(), size);
    // Every client write survived hydration; everything else is the snapshot.
    assert!(
        fs::read(&s.image).unwrap() == model,
        "target differs after hydration"
    );
    run_ok("nbdcopy", &[&uri, out.to_str().unwrap()]);
    assert!(
        fs::read(&out).unwrap() == model,
        "export differs after hydration"
    );
    stop.store(true, Ordering::Release);
}

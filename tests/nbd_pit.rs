//! NBD volumes: an incremental after a 4 KiB write stores about 4 KiB (sub-block records),
//! and snapshots taken under a running write load are point-in-time images. A writer of our
//! own stamps every 4 KiB block with (block, sequence number) and logs when each write was
//! issued and acknowledged, so a restored snapshot can be checked against the log: one
//! consistent version per block, and one cut in time that explains every block.

mod common;
mod nbd_support;

use blocksnap::api::SnapshotId;
use blocksnap::nbd::{DirtyRange, EpochScope, Export, FileExport, TrackedExport};
use blocksnap::store::{
    capture, capture_extents, capture_ranges, DirtySet, NoProgress, RestoreMode, SnapshotMeta,
    Store, StoreError,
};
use common::{have_tool, qemu_io, root_or_skip, sh, Daemon};
use nbd_support::{sid, snapshot_meta};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;

// ---------------------------------------------------------------------------------------
// Store level: sub-block records through capture, restore, verify, delete-with-fold.

fn meta(n: u32, parent: Option<u32>, size: u64) -> SnapshotMeta {
    snapshot_meta(n, parent, size, 16 * KIB as u32)
}

fn scribble(f: &File, off: u64, len: u64, seed: u64) {
    let mut buf = vec![0u8; len as usize];
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.finalize_xof().fill(&mut buf);
    f.write_all_at(&buf, off).unwrap();
}

fn digest_file(f: &File) -> String {
    let len = f.metadata().unwrap().len();
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, 0).unwrap();
    blake3::hash(&buf).to_hex().to_string()
}

fn restored(store: &Store, dir: &Path, id: &SnapshotId) -> Result<String, StoreError> {
    let path = dir.join(format!("restore-{id}"));
    let _ = std::fs::remove_file(&path);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    store.restore(id, &f, RestoreMode::Fresh, &NoProgress)?;
    let d = digest_file(&f);
    std::fs::remove_file(&path).unwrap();
    Ok(d)
}

#[test]
fn store_sub_block_records_restore_verify_and_fold() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    // 16 KiB store blocks; the volume ends 6000 bytes into a short last block.
    let size = 8 * MIB + 6000;
    let img = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(dir.path().join("image"))
        .unwrap();
    img.set_len(size).unwrap();
    scribble(&img, 0, size, 1);
    let full = capture(&store, meta(1, None, size), &img, &NoProgress).unwrap();
    let d1 = digest_file(&img);

    // 4 KiB in the middle of a block; a piece of the short last block; a block zeroed whole;
    // 8 KiB across a block boundary (two pieces of two blocks, one record).
    scribble(&img, MIB + 4 * KIB, 4 * KIB, 2);
    scribble(&img, 8 * MIB + 4096, 1904, 3);
    img.write_all_at(&vec![0u8; 16 * KIB as usize], 2 * MIB)
        .unwrap();
    scribble(&img, 3 * MIB + 12 * KIB, 8 * KIB, 4);
    let dirty = [
        MIB + 4 * KIB..MIB + 8 * KIB,
        8 * MIB + 4096..size,
        2 * MIB..2 * MIB + 16 * KIB,
        3 * MIB + 12 * KIB..3 * MIB + 20 * KIB,
    ];
    let m2 = capture_extents(
        &store,
        meta(2, Some(1), size),
        &img,
        &dirty,
        DirtySet::Exact,
        &NoProgress,
    )
    .unwrap();
    assert_eq!(m2.stored_bytes, 4096 + 1904 + 8192, "{m2:?}");
    assert_eq!(m2.record_count, 4, "{m2:?}");
    assert!(m2.stored_bytes < full.stored_bytes / 100);
    let d2 = digest_file(&img);
    assert_eq!(restored(&store, dir.path(), &sid(2)).unwrap(), d2);
    assert!(store.verify(&sid(2), &NoProgress).unwrap().is_ok());

    // Overlapping pieces in the next snapshot, then fold the middle one into it.
    scribble(&img, MIB, 4 * KIB, 5);
    scribble(&img, MIB + 5000, 2000, 6);
    let dirty = [MIB..MIB + 4 * KIB, MIB + 4 * KIB..MIB + 8 * KIB];
    let m3 = capture_extents(
        &store,
        meta(3, Some(2), size),
        &img,
        &dirty,
        DirtySet::Exact,
        &NoProgress,
    )
    .unwrap();
    assert_eq!(m3.stored_bytes, 8192, "{m3:?}");
    let d3 = digest_file(&img);
    assert_eq!(restored(&store, dir.path(), &sid(3)).unwrap(), d3);
    // The hash of a block stored in part is not known: a full scan of the same image
    // re-stores those blocks whole (64, 192-193 as one record, the short last block 512)
    // and nothing else.
    let m4 = capture(&store, meta(4, Some(3), size), &img, &NoProgress).unwrap();
    assert_eq!(m4.record_count, 3, "{m4:?}");
    assert_eq!(m4.stored_bytes, 3 * 16 * KIB + 6000, "{m4:?}");

    store.delete(&sid(2), &NoProgress).unwrap();
    assert_eq!(store.manifest(&sid(3)).unwrap().parent, Some(sid(1)));
    assert_eq!(restored(&store, dir.path(), &sid(3)).unwrap(), d3);
    assert_eq!(restored(&store, dir.path(), &sid(4)).unwrap(), d3);
    assert_eq!(restored(&store, dir.path(), &sid(1)).unwrap(), d1);
    assert!(store.verify(&sid(4), &NoProgress).unwrap().is_ok());

    // The dirty set is trusted: of a block it covers in part only those bytes are read, so
    // a change it misses in that block is not stored. The next full scan re-reads the block
    // (its hash is not known) and stores what was missed.
    scribble(&img, 5 * MIB, 4 * KIB, 7);
    scribble(&img, 5 * MIB + 8 * KIB, 10, 8);
    let only_the_first = 5 * MIB..5 * MIB + 4 * KIB;
    let m5 = capture_extents(
        &store,
        meta(5, Some(4), size),
        &img,
        std::slice::from_ref(&only_the_first),
        DirtySet::Exact,
        &NoProgress,
    )
    .unwrap();
    assert_eq!(m5.stored_bytes, 4 * KIB, "{m5:?}");
    let m6 = capture(&store, meta(6, Some(5), size), &img, &NoProgress).unwrap();
    assert_eq!((m6.record_count, m6.stored_bytes), (1, 16 * KIB), "{m6:?}");
    assert_eq!(
        restored(&store, dir.path(), &sid(6)).unwrap(),
        digest_file(&img)
    );
    assert!(store.verify(&sid(6), &NoProgress).unwrap().is_ok());
    store.delete(&sid(6), &NoProgress).unwrap();
    store.delete(&sid(5), &NoProgress).unwrap();

    // Damage inside snapshot 3's (folded) delta is found by verify and stops restore.
    let snap_dir = dir.path().join("store/snapshots").join(sid(3).as_str());
    let delta = std::fs::read_dir(&snap_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("delta."))
        })
        .expect("a delta file");
    let mut bytes = std::fs::read(&delta).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&delta, &bytes).unwrap();
    // (Snapshot 4 re-stored every block of 3 that holds data, so its restore reads none of
    // 3's records; verify still reads the whole chain.)
    assert!(!store.verify(&sid(4), &NoProgress).unwrap().is_ok());
    assert!(restored(&store, dir.path(), &sid(3)).is_err());
}

/// Bytes `[off, off + len)` of the volume behind a tracked export, through its writes.
fn scribble_export(t: &TrackedExport<FileExport>, off: u64, len: u64, seed: u64) {
    let mut buf = vec![0u8; len as usize];
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.finalize_xof().fill(&mut buf);
    t.write_at(&buf, off, false).unwrap();
}

fn covered(ranges: &[DirtyRange], off: u64) -> bool {
    ranges
        .iter()
        .any(|r| r.offset <= off && off < r.offset + r.len)
}

fn byte_ranges(ranges: &[DirtyRange]) -> Vec<std::ops::Range<u64>> {
    ranges.iter().map(|r| r.offset..r.offset + r.len).collect()
}

/// A snapshot epoch over every block reads only what held data at the switch, yet the
/// snapshot is the image at the switch while writers fill holes and trim or zero data:
/// before the allocation walk (the walk sees the new state; copy-before-write saved the
/// old) and after it (before the capture reads those blocks). Both for a full snapshot and
/// for a rescan against a parent that has data where the image now has holes.
#[test]
fn full_epoch_skips_holes_of_the_point_in_time_while_writers_fill_and_trim() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let size = 8 * MIB + 6000;
    let img_path = dir.path().join("image");
    let t = TrackedExport::open(
        FileExport::create(&img_path, size).unwrap(),
        &dir.path().join("cbt"),
    )
    .unwrap();
    let img = File::open(&img_path).unwrap();
    // Data: [0, 1 MiB), [3 MiB, 3 MiB + 64 KiB), the short tail; holes elsewhere.
    scribble_export(&t, 0, MIB, 1);
    scribble_export(&t, 3 * MIB, 64 * KIB, 2);
    scribble_export(&t, 8 * MIB, size - 8 * MIB, 3);
    t.flush().unwrap();
    // Whether this filesystem reports holes at all (else everything is read, still right).
    let holes = t.block_status(6 * MIB, 64 * KIB).unwrap()[0].zero;
    let d1 = digest_file(&img);

    // Full snapshot 1.
    t.start_epoch_aligned(EpochScope::All, &dir.path().join("1.cow"), 16 * KIB)
        .unwrap();
    // Before the walk: trim the head of the data, zero a piece, fill holes (one in store
    // blocks of its own, one in a store block next to data).
    t.trim(0, 256 * KIB).unwrap();
    t.write_zeroes(3 * MIB + 16 * KIB, 16 * KIB, true).unwrap();
    scribble_export(&t, 5 * MIB, 64 * KIB, 4);
    scribble_export(&t, 3 * MIB + 68 * KIB, 4 * KIB, 5);
    let data = t.epoch_data_ranges(16 * KIB).unwrap();
    // After the walk, before the capture reads: more of the same.
    t.trim(512 * KIB, 128 * KIB).unwrap();
    t.write_zeroes(8 * MIB, 4096, false).unwrap();
    scribble_export(&t, 6 * MIB, 64 * KIB, 6);
    scribble_export(&t, 3 * MIB + 40 * KIB, 4 * KIB, 7);
    assert!(
        covered(&data, 0) && covered(&data, 3 * MIB + 16 * KIB),
        "{data:?}"
    );
    assert!(
        covered(&data, 8 * MIB) && covered(&data, size - 1),
        "{data:?}"
    );
    if holes {
        // Holes at the switch are not read: a never-written one, one filled after the walk.
        assert!(!covered(&data, 7 * MIB), "{data:?}");
        assert!(!covered(&data, 6 * MIB), "{data:?}");
        let read: u64 = data.iter().map(|r| r.len).sum();
        assert!(read < 2 * MIB, "{data:?}");
        // A released block cannot be read by mistake.
        assert!(t.read_snapshot_block(7 * MIB).is_err());
    }
    let m1 = capture_ranges(
        &store,
        meta(1, None, size),
        &t,
        &byte_ranges(&data),
        &NoProgress,
    )
    .unwrap();
    t.finish_epoch(true).unwrap();
    // Stored: the data at the switch, in whole 16 KiB blocks.
    assert_eq!(m1.stored_bytes, MIB + 64 * KIB + (size - 8 * MIB), "{m1:?}");
    assert_eq!(restored(&store, dir.path(), &sid(1)).unwrap(), d1);
    assert!(store.verify(&sid(1), &NoProgress).unwrap().is_ok());

    // A rescan against snapshot 1: the image now has holes where the parent has data.
    t.flush().unwrap();
    let d2 = digest_file(&img);
    t.start_epoch_aligned(EpochScope::All, &dir.path().join("2.cow"), 16 * KIB)
        .unwrap();
    // Fill the trimmed head (a hole at the switch, data in the parent) before the walk and
    // the trimmed [512 KiB, 640 KiB) after it; trim the data at 5 MiB after it.
    scribble_export(&t, 0, 256 * KIB, 8);
    let data = t.epoch_data_ranges(16 * KIB).unwrap();
    scribble_export(&t, 512 * KIB, 128 * KIB, 9);
    t.trim(5 * MIB, 64 * KIB).unwrap();
    let m2 = capture_ranges(
        &store,
        meta(2, Some(1), size),
        &t,
        &byte_ranges(&data),
        &NoProgress,
    )
    .unwrap();
    t.finish_epoch(true).unwrap();
    assert_ne!(d1, d2);
    assert_eq!(restored(&store, dir.path(), &sid(2)).unwrap(), d2, "{m2:?}");
    assert!(store.verify(&sid(2), &NoProgress).unwrap().is_ok());
    assert_eq!(restored(&store, dir.path(), &sid(1)).unwrap(), d1);
}

// ---------------------------------------------------------------------------------------
// Daemon level.

fn tools() -> bool {
    ["qemu-io", "nbdcopy"].iter().all(|t| have_tool(t))
}

/// Restores a snapshot to a new (loop) volume; returns its image's bytes.
fn restore_bytes(d: &Daemon, ss: &str) -> Vec<u8> {
    let v = d.job(&["create-volume-from-snapshot", "-s", ss]);
    let vol = v["volume_id"].as_str().unwrap().to_string();
    let bytes = std::fs::read(d.image(&vol)).unwrap();
    d.ok(&["delete-volumes", "-v", &vol]);
    bytes
}

/// An attached NBD volume of `size`; returns (volume id, uri).
fn nbd_volume(d: &Daemon, size: &str) -> (String, String) {
    let v = d.job(&["create-volumes", "-s", size, "--backend", "nbd"]);
    let vol = v["volumes"][0].as_str().unwrap().to_string();
    d.ok(&["attach-volumes", "-v", &vol]);
    let uri = d.nbd_uri(&vol);
    (vol, uri)
}

fn delta_len(d: &Daemon, ss: &str) -> u64 {
    let dir = d.state_dir.join("store/snapshots").join(ss);
    std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("delta."))
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

#[test]
fn an_incremental_after_4k_of_writes_stores_about_4k() {
    if !root_or_skip("an_incremental_after_4k_of_writes_stores_about_4k") || !tools() {
        return;
    }
    let d = Daemon::start("");
    let (vol, uri) = nbd_volume(&d, "64M");
    qemu_io(&uri, "write -P 0xaa 0 16M");
    let full = d.snapshot(&vol, true);
    let full_id = full["snapshot_id"].as_str().unwrap().to_string();
    let full_delta = delta_len(&d, &full_id);

    // The second 4 KiB of a 16 KiB store block.
    qemu_io(&uri, "write -P 0xbb 4100k 4k");
    let sha_inc = d.export_sha(&uri, "inc");
    let inc = d.snapshot(&vol, false);
    let inc_id = inc["snapshot_id"].as_str().unwrap().to_string();
    assert_eq!(inc["parent_id"], full_id.as_str());
    let stored = inc["size_bytes"].as_u64().unwrap();
    let file = delta_len(&d, &inc_id);
    eprintln!("4 KiB write: incremental stores {stored} bytes of data, delta file {file} bytes (full: {full_delta})");
    assert!(stored < 8 * KIB, "{inc}");
    assert!(file < 8 * KIB, "delta file of {file} bytes");
    assert_eq!(d.restore_sha(&inc_id), sha_inc);

    // 8 KiB at 8M-2K, across a store-block boundary: the 4 KiB pieces it touches are
    // 8M-4K..8M and 8M..8M+8K, 12 KiB in two blocks.
    qemu_io(&uri, "write -P 0xcc 8190k 8k");
    let sha_inc2 = d.export_sha(&uri, "inc2");
    let inc2 = d.snapshot(&vol, false);
    let inc2_id = inc2["snapshot_id"].as_str().unwrap().to_string();
    assert!(inc2["size_bytes"].as_u64().unwrap() <= 12 * KIB, "{inc2}");
    assert_eq!(d.restore_sha(&inc2_id), sha_inc2);

    // Delete the middle snapshot: its pieces fold into the child, which still restores
    // exactly and verifies against its whole-block hashes.
    d.job(&["delete-snapshots", "-s", &inc_id]);
    assert_eq!(d.describe_snapshot(&inc2_id)["parent_id"], full_id.as_str());
    assert_eq!(d.restore_sha(&inc2_id), sha_inc2);
    d.job(&["verify-snapshots", "-s", &inc2_id]);
    d.ok(&["detach-volumes", "-v", &vol]);
}

/// Socket path and export name of an `nbd+unix:///<export>?socket=<path>` URI.
fn parse_uri(uri: &str) -> (PathBuf, String) {
    let rest = uri.strip_prefix("nbd+unix:///").expect("nbd+unix uri");
    let (export, sock) = rest.split_once("?socket=").expect("socket in uri");
    (PathBuf::from(sock), export.to_string())
}

/// One write of the stamping writer.
#[derive(Clone, Copy, Debug)]
struct Logged {
    block: u64,
    seq: u64,
    issued: Instant,
    /// None: no reply came (the connection broke).
    acked: Option<Instant>,
}

/// A 4 KiB block stamped with (block, seq) in every 32-byte unit.
fn stamp(block: u64, seq: u64) -> Vec<u8> {
    let mut unit = [0u8; 32];
    unit[..8].copy_from_slice(&block.to_le_bytes());
    unit[8..16].copy_from_slice(&seq.to_le_bytes());
    unit[16..24].copy_from_slice(&(!block).to_le_bytes());
    unit[24..].copy_from_slice(&(!seq).to_le_bytes());
    unit.repeat((BLOCK / 32) as usize)
}

/// What a block of an image holds: `Ok(0)` zeros, `Ok(seq)` one consistent stamp of this
/// block, `Err` anything else (a torn or foreign block).
fn read_stamp(block: u64, bytes: &[u8]) -> Result<u64, String> {
    if bytes.iter().all(|&b| b == 0) {
        return Ok(0);
    }
    let seq = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
    if bytes != stamp(block, seq).as_slice() {
        return Err(format!(
            "block {block} is not one consistent write (first unit says seq {seq}, block {})",
            u64::from_le_bytes(bytes[..8].try_into().unwrap())
        ));
    }
    Ok(seq)
}

/// Writer threads, each owning the blocks `b % threads == id` so that the writes to one
/// block are ordered; each write is issued, then waited for, and logged.
struct StampLoad {
    stop: Arc<AtomicBool>,
    handles: Vec<std::thread::JoinHandle<Vec<Logged>>>,
    threads: u64,
}

impl StampLoad {
    fn start(uri: &str, blocks: u64, threads: u64, seq: Arc<AtomicU64>) -> StampLoad {
        let (sock, export) = parse_uri(uri);
        let stop = Arc::new(AtomicBool::new(false));
        let handles = (0..threads)
            .map(|id| {
                let (sock, export, stop, seq) =
                    (sock.clone(), export.clone(), stop.clone(), seq.clone());
                std::thread::spawn(move || writer(&sock, &export, id, threads, blocks, &seq, &stop))
            })
            .collect();
        StampLoad {
            stop,
            handles,
            threads,
        }
    }

    /// Stops the writers; returns all logs, per thread.
    fn finish(mut self) -> Vec<Vec<Logged>> {
        self.stop.store(true, Ordering::Release);
        std::mem::take(&mut self.handles)
            .into_iter()
            .map(|h| h.join().expect("writer thread"))
            .collect()
    }
}

impl Drop for StampLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

fn writer(
    sock: &Path,
    export: &str,
    id: u64,
    threads: u64,
    blocks: u64,
    seq: &AtomicU64,
    stop: &AtomicBool,
) -> Vec<Logged> {
    let (mut r, _, _) = nbd_support::Raw::open(sock, export, false, false);
    let mut log = Vec::new();
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (id + 1);
    let mine = blocks / threads;
    while !stop.load(Ordering::Acquire) {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let block = ((x >> 17) % mine) * threads + id;
        let s = seq.fetch_add(1, Ordering::AcqRel) + 1;
        let mut m = 0x25609513u32.to_be_bytes().to_vec();
        m.extend_from_slice(&0u16.to_be_bytes());
        m.extend_from_slice(&nbd_support::CMD_WRITE.to_be_bytes());
        m.extend_from_slice(&s.to_be_bytes());
        m.extend_from_slice(&(block * BLOCK).to_be_bytes());
        m.extend_from_slice(&(BLOCK as u32).to_be_bytes());
        m.extend_from_slice(&stamp(block, s));
        let issued = Instant::now();
        let mut entry = Logged {
            block,
            seq: s,
            issued,
            acked: None,
        };
        if r.s.write_all(&m).is_err() {
            log.push(entry);
            break;
        }
        let mut h = [0u8; 16];
        if r.s.read_exact(&mut h).is_err() {
            log.push(entry);
            break;
        }
        assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), 0x67446698);
        assert_eq!(
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            0,
            "write error"
        );
        assert_eq!(u64::from_be_bytes(h[8..16].try_into().unwrap()), s);
        entry.acked = Some(Instant::now());
        log.push(entry);
    }
    log
}

/// Per block, its writes in order.
fn by_block(logs: &[Vec<Logged>], blocks: u64) -> Vec<Vec<Logged>> {
    let mut out = vec![Vec::new(); blocks as usize];
    for log in logs {
        for w in log {
            out[w.block as usize].push(*w);
        }
    }
    for ws in &mut out {
        ws.sort_by_key(|w| w.seq);
    }
    out
}

/// Checks that `image` is the point-in-time image of some instant between `req` (the
/// snapshot was requested) and `ret` (it had returned): each block is one consistent write,
/// and a single cut T explains all blocks: every block's content was issued before T, and
/// no later write to that block had been acknowledged before T. Returns the number of
/// blocks written while the snapshot ran (content issued after `req`, or overwritten by a
/// write issued before `ret`): those the snapshot had to get right under load.
fn check_point_in_time(
    image: &[u8],
    writes: &[Vec<Logged>],
    req: Instant,
    ret: Instant,
) -> Result<usize, String> {
    let mut latest_issue: Option<(Instant, u64)> = None; // max over content of issue time
    let mut earliest_supersede: Option<(Instant, u64)> = None; // min over next-write acks
    let mut in_flight = 0;
    for (b, ws) in writes.iter().enumerate() {
        let b = b as u64;
        let at = (b * BLOCK) as usize;
        let seq = read_stamp(b, &image[at..at + BLOCK as usize])?;
        let pos = if seq == 0 {
            None
        } else {
            Some(
                ws.iter()
                    .position(|w| w.seq == seq)
                    .ok_or_else(|| format!("block {b} holds seq {seq}, never written there"))?,
            )
        };
        if let Some(p) = pos {
            let w = ws[p];
            if w.issued >= ret {
                return Err(format!(
                    "block {b} holds seq {seq}, issued after the snapshot returned"
                ));
            }
            if latest_issue.is_none_or(|(t, _)| w.issued > t) {
                latest_issue = Some((w.issued, b));
            }
        }
        let next = pos.map_or(0, |p| p + 1);
        let content_late = pos.is_some_and(|p| ws[p].issued > req);
        if content_late || ws.get(next).is_some_and(|n| n.issued < ret) {
            in_flight += 1;
        }
        if let Some(n) = ws.get(next) {
            if let Some(acked) = n.acked {
                if acked <= req {
                    return Err(format!(
                        "block {b} holds seq {seq}, but seq {} was acknowledged there before the snapshot was requested",
                        n.seq
                    ));
                }
                if earliest_supersede.is_none_or(|(t, _)| acked < t) {
                    earliest_supersede = Some((acked, b));
                }
            }
        }
    }
    if let (Some((issued, b1)), Some((acked, b2))) = (latest_issue, earliest_supersede) {
        if issued >= acked {
            return Err(format!(
                "no single instant explains the image: block {b1}'s content was issued {:?} after block {b2}'s content had been overwritten and acknowledged",
                issued - acked
            ));
        }
    }
    Ok(in_flight)
}

#[test]
fn snapshots_under_a_write_load_are_point_in_time_with_short_freezes() {
    let name = "snapshots_under_a_write_load_are_point_in_time_with_short_freezes";
    if !root_or_skip(name) || !tools() {
        return;
    }
    let d = Daemon::start("");
    let size = 32 * MIB;
    let blocks = size / BLOCK;
    let (vol, uri) = nbd_volume(&d, "32M");
    let seq = Arc::new(AtomicU64::new(0));
    let load = StampLoad::start(&uri, blocks, 3, seq.clone());
    std::thread::sleep(Duration::from_millis(400));
    let mut taken = Vec::new();
    for i in 0..5 {
        let full = i == 0;
        let before = seq.load(Ordering::Acquire);
        let req = Instant::now();
        let v = d.job(&[
            "create-snapshots",
            "-r",
            &vol,
            "-F",
            if full { "1" } else { "0" },
        ]);
        let ret = Instant::now();
        let after = seq.load(Ordering::Acquire);
        let ss = v["snapshots"][0].as_str().unwrap().to_string();
        let s = d.describe_snapshot(&ss);
        eprintln!(
            "snapshot {i} ({}): freeze_ms {}, stored {} bytes, {} writes issued while it ran, {:?}",
            if full { "full" } else { "incremental" },
            s["freeze_ms"],
            s["size_bytes"],
            after - before,
            ret - req
        );
        assert!(
            after > before,
            "the load was not running during snapshot {i}"
        );
        taken.push((ss, s, req, ret));
        std::thread::sleep(Duration::from_millis(300));
    }
    let logs = load.finish();
    let total: usize = logs.iter().map(Vec::len).sum();
    assert!(logs.iter().all(|l| l.iter().all(|w| w.acked.is_some())));
    eprintln!("{total} writes in all");
    let writes = by_block(&logs, blocks);
    let mut freezes = Vec::new();
    for (i, (ss, s, req, ret)) in taken.iter().enumerate() {
        let image = restore_bytes(&d, ss);
        assert_eq!(image.len() as u64, size);
        let in_flight = check_point_in_time(&image, &writes, *req, *ret)
            .unwrap_or_else(|e| panic!("snapshot {i} ({ss}) is not a point-in-time image: {e}"));
        eprintln!("snapshot {i}: point in time; {in_flight} blocks caught mid-overwrite");
        if i > 0 {
            assert_eq!(s["parent_id"], taken[i - 1].0.as_str(), "{s}");
        }
        freezes.push(s["freeze_ms"].as_u64().unwrap());
    }
    // The same log must reject a wrong image: the last snapshot's image is not the first's.
    let first = restore_bytes(&d, &taken[0].0);
    let (_, _, req, ret) = &taken[taken.len() - 1];
    assert!(check_point_in_time(&first, &writes, *req, *ret).is_err());
    // Writers are held only while in-flight writes drain at the switch: microseconds, or a
    // scheduling delay of a writer thread holding the lock. On an overloaded host (load
    // above the CPU count) such delays reach tens of ms, so there only the median is held
    // to the target and each switch to 100 ms.
    let mut sorted = freezes.clone();
    sorted.sort_unstable();
    let (load, cpus) = host_load();
    if load <= cpus {
        assert!(freezes.iter().all(|&f| f <= 10), "freeze_ms {freezes:?}");
    } else {
        eprintln!("host overloaded (load {load:.1} on {cpus} CPUs): freeze_ms {freezes:?}, median checked");
        assert!(sorted[sorted.len() / 2] <= 10, "freeze_ms {freezes:?}");
        assert!(freezes.iter().all(|&f| f <= 100), "freeze_ms {freezes:?}");
    }
    d.ok(&["detach-volumes", "-v", &vol]);
}

/// The 1-minute load average and the number of CPUs.
fn host_load() -> (f64, f64) {
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    (load, cpus)
}

#[test]
fn sigkill_under_a_write_load_then_the_next_incremental_holds_every_write() {
    let name = "sigkill_under_a_write_load_then_the_next_incremental_holds_every_write";
    if !root_or_skip(name) || !tools() {
        return;
    }
    let mut d = Daemon::start("");
    let size = 32 * MIB;
    let blocks = size / BLOCK;
    let (vol, uri) = nbd_volume(&d, "32M");
    let seq = Arc::new(AtomicU64::new(0));
    let load = StampLoad::start(&uri, blocks, 3, seq.clone());
    std::thread::sleep(Duration::from_millis(300));
    let base = d.snapshot(&vol, true);
    std::thread::sleep(Duration::from_millis(700));
    let before_kill = seq.load(Ordering::Acquire);
    d.kill9();
    let threads = load.threads;
    let logs = load.finish();
    assert_eq!(logs.len() as u64, threads);
    let total: usize = logs.iter().map(Vec::len).sum();
    eprintln!("{total} writes, {before_kill} issued before the kill");
    d.spawn();
    let uri = d.nbd_uri(&vol);
    let copy = d.dir.path().join("now.raw");
    sh(&format!("nbdcopy '{uri}' {}", copy.display()));
    let now = std::fs::read(&copy).unwrap();
    let _ = std::fs::remove_file(&copy);
    let inc = d.snapshot(&vol, false);
    let inc_id = inc["snapshot_id"].as_str().unwrap().to_string();
    assert_eq!(inc["parent_id"], base["snapshot_id"], "{inc}");
    let restored = restore_bytes(&d, &inc_id);
    // Every acknowledged write is there: each block holds its last write, or, for a block
    // whose last write was cut off by the kill, possibly the one before.
    let writes = by_block(&logs, blocks);
    let mut checked = 0;
    for (b, ws) in writes.iter().enumerate() {
        let Some(last) = ws.last() else { continue };
        let at = b * BLOCK as usize;
        let got = &restored[at..at + BLOCK as usize];
        if last.acked.is_some() {
            assert_eq!(read_stamp(b as u64, got), Ok(last.seq), "block {b}");
            checked += 1;
        }
    }
    assert!(checked > 100, "only {checked} blocks written");
    assert!(
        restored == now,
        "the restored incremental differs from the volume's image (nbdcopy)"
    );
    d.ok(&["detach-volumes", "-v", &vol]);
}

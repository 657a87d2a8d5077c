//! Incrementals from shared extents (`store::changed_by_sharing`): on a reflink filesystem a
//! full capture clones its long records from the image, so a later clone of the image tells
//! by FIEMAP which blocks were not rewritten. Real xfs (reflink) and ext4 (no reflink) on loop
//! devices; every snapshot taken through the shortcut must restore byte-identical.

mod common;

use blocksnap::api::SnapshotId;
use blocksnap::store::{
    capture, capture_extents, changed_by_sharing, ChangedRanges, DirtySet, NoProgress, RestoreMode,
    Sharing, SnapshotMeta, Store,
};
use common::{have_tool, root_or_skip, sh, sha256, Daemon, ScratchFs};
use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const K: u64 = 4096;
const BS: u32 = 64 << 10;

fn sid(n: u32) -> SnapshotId {
    format!("ss-{n:08}").parse().unwrap()
}

fn meta(id: &SnapshotId, parent: Option<&SnapshotId>, size: u64) -> SnapshotMeta {
    SnapshotMeta {
        id: id.clone(),
        volume_id: "vol-00000001".parse().unwrap(),
        volume_name: "data".into(),
        name: format!("snap {id}"),
        description: String::new(),
        owner: "root".into(),
        parent: parent.cloned(),
        volume_size: size,
        block_size: BS,
        snapshot_time: 1_700_000_000,
        freeze_ms: 1,
        consistency: "crash".into(),
    }
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.finalize_xof().fill(&mut buf);
    buf
}

/// A sparse image on `dir` with random data in `data`.
fn image(dir: &Path, size: u64, data: Range<u64>) -> (PathBuf, File) {
    let path = dir.join("image");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    f.set_len(size).unwrap();
    let mut off = data.start;
    while off < data.end {
        let n = (1u64 << 20).min(data.end - off);
        f.write_all_at(&random(n as usize, off), off).unwrap();
        off += n;
    }
    f.sync_all().unwrap();
    (path, f)
}

/// A reflink clone of `image` (the point-in-time copy the daemon captures from).
fn clone_of(image: &File, path: &Path) -> File {
    let c = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .unwrap();
    blocksnap::sys::reflink::ficlone(image, &c).unwrap();
    c
}

fn restored_sha(store: &Store, dir: &Path, id: &SnapshotId) -> String {
    let path = dir.join(format!("restore-{id}"));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    store
        .restore(id, &f, RestoreMode::Fresh, &NoProgress)
        .unwrap();
    drop(f);
    let sha = sha256(&path);
    std::fs::remove_file(&path).unwrap();
    sha
}

fn changed(store: &Store, parent: &SnapshotId, clone: &File, size: u64) -> ChangedRanges {
    match changed_by_sharing(store, parent, clone, size, BS).unwrap() {
        Sharing::Changed(c) => c,
        Sharing::Unsupported(why) => panic!("sharing unsupported: {why}"),
    }
}

fn covered(ranges: &[Range<u64>], s: u64, e: u64) -> bool {
    ranges.iter().any(|r| r.start <= s && r.end >= e)
}

fn touches(ranges: &[Range<u64>], s: u64, e: u64) -> bool {
    ranges.iter().any(|r| r.start < e && s < r.end)
}

/// Rewrites, zeroes and punches 4 KiB pieces; returns every byte range touched.
fn modify(f: &File, path: &Path, seed: u64, rewrites: &[u64], zeroes: &[u64], punch: &[u64]) {
    for (i, &off) in rewrites.iter().enumerate() {
        f.write_all_at(&random(K as usize, seed + i as u64), off)
            .unwrap();
    }
    for &off in zeroes {
        f.write_all_at(&[0u8; K as usize], off).unwrap();
    }
    f.sync_all().unwrap();
    for &off in punch {
        sh(&format!(
            "fallocate -p -o {off} -l {} {}",
            4 * K,
            path.display()
        ));
    }
}

#[test]
fn rewritten_zeroed_and_punched_blocks_are_found_and_the_rest_is_shared() {
    if !root_or_skip("rewritten_zeroed_and_punched_blocks_are_found_and_the_rest_is_shared")
        || !have_tool("mkfs.xfs")
    {
        return;
    }
    rewritten_zeroed_and_punched("xfs");
}

#[test]
fn on_btrfs_rewritten_zeroed_and_punched_blocks_are_found_and_the_rest_is_shared() {
    if !root_or_skip(
        "on_btrfs_rewritten_zeroed_and_punched_blocks_are_found_and_the_rest_is_shared",
    ) || !have_tool("mkfs.btrfs")
    {
        return;
    }
    rewritten_zeroed_and_punched("btrfs");
}

fn rewritten_zeroed_and_punched(fstype: &str) {
    let fs = ScratchFs::new(fstype, "512M");
    let dir = fs.path();
    let store = Store::open(&dir.join("store")).unwrap();
    let size = 40u64 << 20;
    let (path, img) = image(&dir, size, 0..(24 << 20));
    // Some data far from the rest, to have a hole in between.
    img.write_all_at(&random(256 << 10, 99), 32 << 20).unwrap();
    img.sync_all().unwrap();
    let c1 = clone_of(&img, &dir.join("clone1"));
    let full = sid(1);
    capture(&store, meta(&full, None, size), &c1, &NoProgress).unwrap();
    drop(c1);

    let rewrites = [0, 5 * K, 1 << 20, (1 << 20) + 8 * K, 23 << 20, 32 << 20];
    let zeroes = [3 << 20, (3 << 20) + 4 * K];
    let punch = [7 << 20];
    modify(&img, &path, 1000, &rewrites, &zeroes, &punch);
    // A block written where the full snapshot had a hole.
    img.write_all_at(&random(K as usize, 7), 28 << 20).unwrap();
    img.sync_all().unwrap();
    // Allocated but unwritten space: over zeros it is unchanged (reads as zeros), over data
    // it is changed (zeroed).
    sh(&format!(
        "fallocate -o {} -l {} {}",
        26 << 20,
        1 << 20,
        path.display()
    ));
    sh(&format!(
        "fallocate -z -o {} -l {} {}",
        9 << 20,
        2 * K,
        path.display()
    ));
    let c2 = clone_of(&img, &dir.join("clone2"));
    let c = changed(&store, &full, &c2, size);
    eprintln!(
        "changed {} bytes in {} ranges, shared {}, zeros {}",
        c.changed_bytes(),
        c.ranges.len(),
        c.shared_bytes,
        c.zero_bytes
    );
    // A superset of what was touched ...
    for &off in rewrites.iter().chain(&zeroes).chain(&[28 << 20]) {
        assert!(covered(&c.ranges, off, off + K), "{off} not changed: {c:?}");
    }
    assert!(covered(&c.ranges, 7 << 20, (7 << 20) + 4 * K), "{c:?}");
    assert!(covered(&c.ranges, 9 << 20, (9 << 20) + 2 * K), "{c:?}");
    // ... and nothing else: untouched cloned blocks and untouched holes are not changed.
    for off in [
        K,
        4 * K,
        6 * K,
        2 << 20,
        (1 << 20) + 9 * K,
        20 << 20,
        (24 << 20) - K,
        (32 << 20) + K,
    ] {
        assert!(!touches(&c.ranges, off, off + K), "{off} changed: {c:?}");
    }
    assert!(!touches(&c.ranges, 25 << 20, 28 << 20), "{c:?}");
    assert_eq!(c.changed_bytes(), 15 * K, "{c:?}");
    assert!(c.shared_bytes >= (24 << 20) - 20 * K, "{c:?}");

    let inc = sid(2);
    let m = capture_extents(
        &store,
        meta(&inc, Some(&full), size),
        &c2,
        &c.ranges,
        DirtySet::Superset,
        &NoProgress,
    )
    .unwrap();
    assert!(m.stored_bytes <= 15 * K, "stored {}", m.stored_bytes);
    drop(c2);
    assert_eq!(restored_sha(&store, &dir, &inc), sha256(&path));
    assert!(store.verify(&inc, &NoProgress).unwrap().is_ok());

    // A grown volume: the bytes past the parent's size are changed too.
    let grown = size + (1 << 20);
    img.set_len(grown).unwrap();
    img.write_all_at(&random(K as usize, 8), size + 8 * K)
        .unwrap();
    img.sync_all().unwrap();
    let c3 = clone_of(&img, &dir.join("clone3"));
    let c = changed(&store, &inc, &c3, grown);
    assert!(covered(&c.ranges, size, grown), "{c:?}");
    let inc2 = sid(3);
    capture_extents(
        &store,
        meta(&inc2, Some(&inc), grown),
        &c3,
        &c.ranges,
        DirtySet::Superset,
        &NoProgress,
    )
    .unwrap();
    assert_eq!(restored_sha(&store, &dir, &inc2), sha256(&path));
}

#[test]
fn a_chain_through_sharing_and_a_merge_restores_identically() {
    if !root_or_skip("a_chain_through_sharing_and_a_merge_restores_identically")
        || !have_tool("mkfs.xfs")
    {
        return;
    }
    let fs = ScratchFs::new("xfs", "512M");
    let dir = fs.path();
    let store = Store::open(&dir.join("store")).unwrap();
    let size = 16u64 << 20;
    let (path, img) = image(&dir, size, 0..(12 << 20));
    let mut shas = Vec::new();
    let c = clone_of(&img, &dir.join("c1"));
    capture(&store, meta(&sid(1), None, size), &c, &NoProgress).unwrap();
    shas.push(sha256(&path));
    drop(c);

    let mut parent = sid(1);
    let mut previous: Vec<u64> = Vec::new();
    for step in 2..=4u32 {
        let base = u64::from(step) << 20;
        let rewrites = [base, base + 12 * K, base + 64 * K];
        modify(
            &img,
            &path,
            u64::from(step) * 100,
            &rewrites,
            &[base + 200 * K],
            &[],
        );
        let c = clone_of(&img, &dir.join(format!("c{step}")));
        let ch = changed(&store, &parent, &c, size);
        for &off in rewrites.iter().chain(&[base + 200 * K]) {
            assert!(covered(&ch.ranges, off, off + K), "{off}: {ch:?}");
        }
        // What earlier incrementals wrote (short records, not cloned) counts as changed
        // again: conservative, never wrong.
        for &off in &previous {
            assert!(covered(&ch.ranges, off, off + K), "{off}: {ch:?}");
        }
        assert!(!touches(&ch.ranges, 10 << 20, 12 << 20), "{ch:?}");
        let id = sid(step);
        capture_extents(
            &store,
            meta(&id, Some(&parent), size),
            &c,
            &ch.ranges,
            DirtySet::Superset,
            &NoProgress,
        )
        .unwrap();
        drop(c);
        shas.push(sha256(&path));
        previous.extend(rewrites);
        if step == 3 {
            // Delete the middle snapshot: snapshot 3 absorbs its records (a new delta).
            store.delete(&sid(2), &NoProgress).unwrap();
        }
        parent = id;
    }
    for (i, sha) in shas.iter().enumerate() {
        let id = sid(i as u32 + 1);
        if i == 1 {
            assert!(store.manifest(&id).is_err());
            continue;
        }
        assert_eq!(&restored_sha(&store, &dir, &id), sha, "snapshot {id}");
    }
    for id in [sid(1), sid(3), sid(4)] {
        assert!(store.verify(&id, &NoProgress).unwrap().is_ok(), "{id}");
    }
}

/// Pieces an incremental stored from shared extents are written, not cloned, so the next
/// comparison cannot prove them unchanged: they must be re-hashed, not stored again (each
/// later incremental would otherwise store every such piece again, and mark its block's
/// hash not known).
#[test]
fn pieces_stored_by_an_incremental_are_not_stored_again_when_unchanged() {
    if !root_or_skip("pieces_stored_by_an_incremental_are_not_stored_again_when_unchanged")
        || !have_tool("mkfs.xfs")
    {
        return;
    }
    let fs = ScratchFs::new("xfs", "512M");
    let dir = fs.path();
    let store = Store::open(&dir.join("store")).unwrap();
    let size = 8u64 << 20;
    let (path, img) = image(&dir, size, 0..size);
    let c1 = clone_of(&img, &dir.join("clone1"));
    capture(&store, meta(&sid(1), None, size), &c1, &NoProgress).unwrap();
    drop(c1);
    let mut stored = Vec::new();
    for n in 2..6u32 {
        // New 4 KiB inside a 64 KiB block before snapshots 2 and 3, nothing after.
        match n {
            2 => img.write_all_at(&random(K as usize, 5), 100 << 10).unwrap(),
            3 => img
                .write_all_at(&random(K as usize, 6), (640 << 10) + 8 * K)
                .unwrap(),
            _ => {}
        }
        img.sync_all().unwrap();
        let c = clone_of(&img, &dir.join(format!("clone{n}")));
        let ch = changed(&store, &sid(n - 1), &c, size);
        let m = capture_extents(
            &store,
            meta(&sid(n), Some(&sid(n - 1)), size),
            &c,
            &ch.ranges,
            DirtySet::Superset,
            &NoProgress,
        )
        .unwrap();
        stored.push(m.stored_bytes);
        // Every block's real hash is known: none is recorded as not known.
        let hashes = store.block_hashes(&m).unwrap().hashes;
        assert!(hashes.iter().all(|h| *h != [0xff; 32]), "snapshot {n}");
        assert_eq!(
            restored_sha(&store, &dir, &sid(n)),
            sha256(&path),
            "snapshot {n}"
        );
    }
    assert_eq!(
        stored,
        vec![K, K, 0, 0],
        "unchanged pieces were stored again"
    );
}

#[test]
fn written_records_are_changed_and_non_file_backends_are_unsupported() {
    if !root_or_skip("written_records_are_changed_and_non_file_backends_are_unsupported") {
        return;
    }
    // ext4: no reflink, so the full capture writes every record and nothing is shared.
    let fs = ScratchFs::new("ext4", "256M");
    let dir = fs.path();
    let store = Store::open(&dir.join("store")).unwrap();
    let size = 8u64 << 20;
    let (path, img) = image(&dir, size, 0..(4 << 20));
    capture(&store, meta(&sid(1), None, size), &img, &NoProgress).unwrap();
    modify(&img, &path, 5, &[K], &[], &[]);
    let c = changed(&store, &sid(1), &img, size);
    assert_eq!(c.shared_bytes, 0, "{c:?}");
    assert!(covered(&c.ranges, 0, 4 << 20), "{c:?}");
    assert!(!touches(&c.ranges, 4 << 20, size), "{c:?}");
    capture_extents(
        &store,
        meta(&sid(2), Some(&sid(1)), size),
        &img,
        &c.ranges,
        DirtySet::Superset,
        &NoProgress,
    )
    .unwrap();
    assert_eq!(restored_sha(&store, &dir, &sid(2)), sha256(&path));

    // A store that is not on a filesystem: cannot tell.
    let mem = Store::with_backend(std::sync::Arc::new(blocksnap::store::SharedMem::new())).unwrap();
    capture(&mem, meta(&sid(1), None, size), &img, &NoProgress).unwrap();
    match changed_by_sharing(&mem, &sid(1), &img, size, BS).unwrap() {
        Sharing::Unsupported(why) => assert!(why.contains("no extents"), "{why}"),
        other => panic!("{other:?}"),
    }
    // Another block size or a shrunk volume: cannot tell either.
    assert!(matches!(
        changed_by_sharing(&store, &sid(1), &img, size, 2 * BS).unwrap(),
        Sharing::Unsupported(_)
    ));
    assert!(matches!(
        changed_by_sharing(&store, &sid(1), &img, size - K, BS).unwrap(),
        Sharing::Unsupported(_)
    ));
}

/// A loop volume of `size` on daemon `d` whose first `data` bytes are random (written through
/// the device, direct), then a full snapshot of it. Returns (volume, device, full snapshot id).
fn volume_with_full_snapshot(
    d: &Daemon,
    scratch: &Path,
    size: &str,
    data: usize,
) -> (String, PathBuf, String) {
    let vol = d.volume(size, "shared");
    let dev = d.attach(&vol);
    let file = scratch.join("data.bin");
    std::fs::write(&file, random(data, 1)).unwrap();
    sh(&format!(
        "dd if={} of={} bs=1M oflag=direct status=none",
        file.display(),
        dev.display()
    ));
    let full = d.snapshot(&vol, true);
    let full_id = full["snapshot_id"].as_str().unwrap().to_string();
    (vol, dev, full_id)
}

/// Rewrites the 4 KiB blocks at `offsets` of `dev` with random bytes, durably.
fn rewrite_blocks(dev: &Path, offsets: &[u64]) {
    let dev_file = OpenOptions::new().write(true).open(dev).unwrap();
    for (i, &off) in offsets.iter().enumerate() {
        dev_file
            .write_all_at(&random(K as usize, 500 + i as u64), off)
            .unwrap();
    }
    dev_file.sync_all().unwrap();
}

/// The volume's image restores identically from snapshot `id`; then detaches the volume.
fn restores_identically(d: &Daemon, vol: &str, id: &str) {
    sh("sync");
    let now = sha256(&d.image(vol));
    assert_eq!(d.restore_sha(id), now);
    d.ok(&["detach-volumes", "-v", vol]);
}

/// The daemon on an xfs state dir: a loop volume's incremental reads only the rewritten
/// blocks, stores about their bytes and restores identically.
#[test]
fn loop_incremental_on_a_reflink_state_dir_uses_shared_extents() {
    if !root_or_skip("loop_incremental_on_a_reflink_state_dir_uses_shared_extents")
        || !have_tool("mkfs.xfs")
    {
        return;
    }
    let fs = ScratchFs::new("xfs", "1G");
    let d = Daemon::start_with_state_dir(&fs.path().join("state"), "");
    let (vol, dev, full_id) = volume_with_full_snapshot(&d, &fs.path(), "128M", 64 << 20);
    // 40 distinct 4 KiB blocks rewritten, spread over the data.
    let blocks: Vec<u64> = (0..40u64).map(|i| i * 409 * K + (i % 7) * K).collect();
    rewrite_blocks(&dev, &blocks);
    let inc = d.snapshot(&vol, false);
    let inc_id = inc["snapshot_id"].as_str().unwrap().to_string();
    assert_eq!(inc["parent_id"].as_str(), Some(full_id.as_str()), "{inc}");
    let log = d.log();
    assert!(
        log.lines()
            .any(|l| l.contains("incremental from shared extents") && l.contains(&inc_id)),
        "the shortcut was not used:\n{log}"
    );
    let stored = inc["size_bytes"].as_u64().unwrap();
    let rewritten = blocks.len() as u64 * K;
    assert!(
        stored >= rewritten && stored <= rewritten + 64 * K,
        "stored {stored} for {rewritten} rewritten bytes"
    );
    restores_identically(&d, &vol, &inc_id);
}

/// The state dir on xfs but the store on ext4: the clone and the deltas are on different
/// filesystems, so device addresses cannot be compared; the incremental reads the whole
/// clone as before (and says so) and restores identically.
#[test]
fn store_on_another_filesystem_falls_back_to_reading_everything() {
    if !root_or_skip("store_on_another_filesystem_falls_back_to_reading_everything")
        || !have_tool("mkfs.xfs")
    {
        return;
    }
    let state = ScratchFs::new("xfs", "512M");
    let store = ScratchFs::new("ext4", "512M");
    let d = Daemon::start_with_state_dir(
        &state.path().join("state"),
        &format!(
            "[store]\npath = \"{}\"\n",
            store.path().join("store").display()
        ),
    );
    let (vol, dev, _) = volume_with_full_snapshot(&d, &state.path(), "64M", 16 << 20);
    rewrite_blocks(&dev, &[5 << 20]);
    let inc = d.snapshot(&vol, false);
    let inc_id = inc["snapshot_id"].as_str().unwrap().to_string();
    let log = d.log();
    assert!(
        log.lines().any(|l| l.contains("shared extents cannot tell")
            && l.contains(&inc_id)
            && l.contains("another filesystem")),
        "no fallback logged:\n{log}"
    );
    assert!(!log.contains("incremental from shared extents"), "{log}");
    restores_identically(&d, &vol, &inc_id);
}

/// A large sparse volume: the comparison walks windows of extent maps, so time and memory
/// follow the data, not the size (1 TiB here, 4 MiB blocks to keep the hash list small).
#[test]
fn a_large_sparse_volume_compares_by_its_extents() {
    if !root_or_skip("a_large_sparse_volume_compares_by_its_extents") || !have_tool("mkfs.xfs") {
        return;
    }
    let fs = ScratchFs::new("xfs", "512M");
    let dir = fs.path();
    let store = Store::open(&dir.join("store")).unwrap();
    let size = 1u64 << 40;
    let (path, img) = image(&dir, size, 0..(8 << 20));
    img.write_all_at(&random(1 << 20, 5), size - (4 << 20))
        .unwrap();
    img.sync_all().unwrap();
    let big = |id: &SnapshotId, parent: Option<&SnapshotId>| SnapshotMeta {
        block_size: 4 << 20,
        ..meta(id, parent, size)
    };
    let c1 = clone_of(&img, &dir.join("clone1"));
    capture(&store, big(&sid(1), None), &c1, &NoProgress).unwrap();
    drop(c1);
    modify(&img, &path, 9, &[size - (3 << 20)], &[], &[]);
    let c2 = clone_of(&img, &dir.join("clone2"));
    let t = std::time::Instant::now();
    let c = match changed_by_sharing(&store, &sid(1), &c2, size, 4 << 20).unwrap() {
        Sharing::Changed(c) => c,
        Sharing::Unsupported(why) => panic!("{why}"),
    };
    let took = t.elapsed();
    eprintln!("1 TiB compared in {took:?}: {c:?}");
    assert_eq!(c.ranges, vec![size - (3 << 20)..size - (3 << 20) + K]);
    assert!(took < std::time::Duration::from_secs(30), "{took:?}");
    capture_extents(
        &store,
        big(&sid(2), Some(&sid(1))),
        &c2,
        &c.ranges,
        DirtySet::Superset,
        &NoProgress,
    )
    .unwrap();
    let mut buf = vec![0u8; K as usize];
    let reader = blocksnap::store::ChainReader::open(&store, &sid(2)).unwrap();
    reader.read_at(&mut buf, size - (3 << 20)).unwrap();
    let mut want = vec![0u8; K as usize];
    img.read_exact_at(&mut want, size - (3 << 20)).unwrap();
    assert_eq!(buf, want);
}

/// Restore clones from a private copy of the delta on a cloner thread: a clone that fails
/// there fails the restore with its own error, naming the target range, and leaves no
/// volume behind; without the fault the same restore is identical.
#[cfg(feature = "failpoints")]
#[test]
fn a_clone_failing_on_the_cloner_thread_fails_the_restore() {
    if !root_or_skip("a_clone_failing_on_the_cloner_thread_fails_the_restore")
        || !have_tool("mkfs.xfs")
    {
        return;
    }
    let fs = ScratchFs::new("xfs", "512M");
    let mut d = Daemon::start_with_state_dir(&fs.path().join("state"), "");
    // 16 MiB of random data in 1 MiB aligned records: the restore writes nothing, it clones.
    let (vol, _dev, full_id) = volume_with_full_snapshot(&d, &fs.path(), "32M", 16 << 20);
    d.ok(&["detach-volumes", "-v", &vol]);
    let volumes_before = d.ok(&["describe-volumes"])["total_count"].clone();
    // The first clone (made by the writer itself, to learn that sharing works) passes; the
    // second, the cloner thread's first, fails.
    d.failpoints = "restore.target.write=1*off->return".into();
    d.restart();
    let v = d.ok(&["create-volume-from-snapshot", "-s", &full_id, "-N", "r"]);
    let job = d.wait_job(v["job_id"].as_str().unwrap());
    assert_eq!(job["status"], "failed", "{job}");
    let msg = job["error"].as_str().unwrap_or_default();
    assert!(
        msg.contains("injected I/O error") && msg.contains("restore target"),
        "the cloner's own error is not reported: {msg}"
    );
    assert!(!msg.contains("cloner stopped"), "{msg}");
    assert_eq!(d.ok(&["describe-volumes"])["total_count"], volumes_before);
    d.failpoints.clear();
    d.restart();
    let want = sha256(&d.image(&vol));
    assert_eq!(d.restore_sha(&full_id), want);
}

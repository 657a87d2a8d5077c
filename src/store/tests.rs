//! Store tests: round trips, deletes, crashes at every step, corruption, golden bytes.

use super::test_util::*;
use super::*;
use std::collections::BTreeMap;
use std::fs::File;

const BS: u32 = 65536;
const MIB: u64 = 1 << 20;

/// A chain of snapshots of one evolving sparse image; remembers each image's digest.
struct Chain {
    dir: tempfile::TempDir,
    img: File,
    size: u64,
    ids: Vec<SnapshotId>,
    digests: BTreeMap<SnapshotId, (u64, String)>,
}

impl Chain {
    fn new(size: u64) -> Chain {
        let dir = tempfile::tempdir().unwrap();
        let img = sparse(dir.path(), "image", size);
        Chain {
            dir,
            img,
            size,
            ids: Vec::new(),
            digests: BTreeMap::new(),
        }
    }

    fn snap(&mut self, store: &Store, n: u32) -> Result<Manifest, StoreError> {
        let id = sid(n);
        let m = meta(&id, self.ids.last(), self.size, BS);
        let man = capture(store, m, &self.img, &NoProgress)?;
        self.ids.push(id.clone());
        self.digests.insert(id, digest(&self.img));
        Ok(man)
    }

    /// Restores each of this chain's remembered snapshots (with others in the same store).
    fn check_own(&self, store: &Store) {
        for (id, want) in &self.digests {
            assert_eq!(&restored(store, self.dir.path(), id).unwrap(), want, "{id}");
        }
    }

    fn check_all(&self, store: &Store) {
        for m in store.list().unwrap() {
            let got = restored(store, self.dir.path(), &m.id).unwrap();
            assert_eq!(&got, &self.digests[&m.id], "restore of {}", m.id);
        }
    }
}

/// Writes a few random extents, some unaligned, one of zeros over data.
fn mutate(img: &File, size: u64, seed: u64) {
    let mut x = seed;
    for i in 0..6 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let off = (x >> 20) % (size - 200_000);
        let len = 1 + ((x >> 8) % 150_000) as usize;
        scribble(img, off, len, seed * 100 + i);
    }
    use std::os::unix::fs::FileExt;
    let zoff = (seed * 3 * MIB / 2) % (size - 2 * MIB);
    img.write_all_at(&vec![0u8; 3 * BS as usize], zoff).unwrap();
}

#[test]
fn full_and_incrementals_round_trip_on_the_filesystem() {
    let store_dir = tempfile::tempdir().unwrap();
    let store = Store::open(store_dir.path()).unwrap();
    let mut c = Chain::new(16 * MIB + 12345);
    scribble(&c.img, 0, 300_000, 1);
    scribble(&c.img, 9 * MIB, 2 * MIB as usize, 2);
    let full = c.snap(&store, 1).unwrap();
    assert!(full.is_full());
    assert!(
        full.stored_bytes < 3 * MIB,
        "holes were stored: {}",
        full.stored_bytes
    );
    for n in 2..6 {
        mutate(&c.img, c.size, n as u64);
        let m = c.snap(&store, n).unwrap();
        assert_eq!(m.parent.as_ref(), Some(&sid(n - 1)));
        assert!(
            m.stored_bytes <= 2 * MIB,
            "incremental too big: {}",
            m.stored_bytes
        );
    }
    // The volume grows; the incremental still works.
    c.size += 3 * MIB;
    c.img.set_len(c.size).unwrap();
    scribble(&c.img, c.size - 100, 100, 9);
    c.snap(&store, 6).unwrap();
    c.check_all(&store);
    assert_eq!(store.chain(&sid(6)).unwrap().len(), 6);
    // An unchanged image gives an empty incremental.
    let empty = c.snap(&store, 7).unwrap();
    assert_eq!(empty.record_count, 0);
    let again = Store::open(store_dir.path()).unwrap();
    assert_eq!(again.list().unwrap().len(), 7);
    assert!(again.verify(&sid(7), &NoProgress).unwrap().is_ok());
}

/// An image source that logs every read (offset, length).
struct LoggedReads<'a>(&'a File, std::sync::Mutex<Vec<(u64, u64)>>);

impl ImageSource for LoggedReads<'_> {
    fn image_len(&self) -> Result<u64, StoreError> {
        self.0.image_len()
    }
    fn read_image_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        self.1.lock().unwrap().push((off, buf.len() as u64));
        self.0.read_image_at(buf, off)
    }
}

#[test]
fn capture_extents_reads_only_the_dirty_bytes_and_marks_partial_blocks() {
    use super::hashes::STALE_HASH;
    let (store, _) = mem_store();
    let bs = u64::from(BS);
    let mut c = Chain::new(8 * MIB);
    scribble(&c.img, 0, 5 * MIB as usize, 1);
    c.snap(&store, 1).unwrap();
    // Parts of blocks: two pieces of block 1, one of block 112, zeros over data in block 79;
    // then whole blocks 2..=21 (1.25 MiB: more than one batch, after a part of a block).
    let parts = [
        bs + 4096..bs + 8192,
        bs + 20_000..bs + 25_000,
        7 * MIB..7 * MIB + 4096,
    ];
    for (i, r) in parts.iter().enumerate() {
        scribble(&c.img, r.start, (r.end - r.start) as usize, 10 + i as u64);
    }
    use std::os::unix::fs::FileExt;
    c.img.write_all_at(&[0u8; 4096], 5 * MIB - 4096).unwrap();
    scribble(&c.img, 2 * bs, 20 * bs as usize, 20);
    let mut dirty = parts.to_vec();
    dirty.push(5 * MIB - 4096..5 * MIB);
    dirty.push(2 * bs..22 * bs);
    let src = LoggedReads(&c.img, Default::default());
    let m = meta(&sid(2), Some(&sid(1)), c.size, BS);
    let got = capture_extents(&store, m, &src, &dirty, DirtySet::Exact, &NoProgress).unwrap();
    // Exactly the dirty bytes were read, each once; the whole blocks in runs of whole blocks.
    let mut reads = src.1.into_inner().unwrap();
    reads.sort();
    let read: u64 = reads.iter().map(|r| r.1).sum();
    assert_eq!(read, 4096 + 5000 + 4096 + 4096 + 20 * bs, "{reads:?}");
    assert!(reads
        .iter()
        .all(|&(off, len)| (off >= 2 * bs && off + len <= 22 * bs && off % bs == 0) || len < bs));
    // Three data parts, one zero part, one run of whole blocks.
    assert_eq!(got.stored_bytes, 4096 + 5000 + 4096 + 20 * bs);
    c.ids.push(sid(2));
    c.digests.insert(sid(2), digest(&c.img));
    c.check_all(&store);
    assert!(store.verify(&sid(2), &NoProgress).unwrap().is_ok());
    // The hashes of partly stored blocks are not known; the others are a full scan's.
    let partial = [1u64, 79, 112];
    let incremental = store.block_hashes(&got).unwrap().hashes;
    let scanned = c.snap(&store, 3).unwrap();
    let truth = store.block_hashes(&scanned).unwrap().hashes;
    for (i, (h, t)) in incremental.iter().zip(&truth).enumerate() {
        if partial.contains(&(i as u64)) {
            assert_eq!(*h, STALE_HASH, "block {i}");
        } else {
            assert_eq!(h, t, "block {i}");
        }
    }
    // A full scan re-stores the blocks whose hash was not known (and nothing else).
    assert_eq!(scanned.record_count, 3);
    assert_eq!(scanned.stored_bytes, 3 * bs);
    c.check_all(&store);
}

#[test]
fn plan_reads_reads_parts_of_blocks_only_where_the_parent_holds_the_rest() {
    use super::capture::plan_reads;
    let bs = 16u64;
    // Covered whole (0..32), a part (36..40), two parts of one block (49..50, 60..62), a
    // whole block next to a part (64..80 covered, 80..84 a part).
    let fine = [0..32, 36..40, 49..50, 60..62, 64..84];
    assert_eq!(
        plan_reads(&fine, bs, 200, Some(200)),
        vec![0..32, 36..40, 49..50, 60..62, 64..80, 80..84]
    );
    // Without a parent, or past what it held, blocks are read whole.
    assert_eq!(plan_reads(&fine, bs, 200, None), vec![0..96]);
    assert_eq!(
        plan_reads(&fine, bs, 200, Some(48)),
        vec![0..32, 36..40, 48..96]
    );
    // The parent's short last block (96..104 of 96..112) is re-read whole once outgrown,
    // dirty or not; so is every block past it.
    assert_eq!(
        plan_reads(&[33..34, 190..200], bs, 200, Some(104)),
        vec![33..34, 96..112, 176..200]
    );
    assert_eq!(
        plan_reads(std::slice::from_ref(&(150..151)), bs, 200, Some(104)),
        vec![96..112, 144..160]
    );
    // The volume's short last block (192..200): a part, or whole when covered.
    assert_eq!(
        plan_reads(&[150..151, 194..200], bs, 200, Some(200)),
        vec![150..151, 194..200]
    );
    assert_eq!(
        plan_reads(std::slice::from_ref(&(192..200)), bs, 200, Some(200)),
        vec![192..200]
    );
}

#[test]
fn overwrite_restore_zeroes_old_data() {
    let (store, _) = mem_store();
    let mut c = Chain::new(4 * MIB);
    scribble(&c.img, MIB, 100_000, 1);
    c.snap(&store, 1).unwrap();
    let target = sparse(c.dir.path(), "old", 4 * MIB);
    scribble(&target, 0, 4 * MIB as usize, 7);
    store
        .restore(&sid(1), &target, RestoreMode::Overwrite, &NoProgress)
        .unwrap();
    assert_eq!(digest(&target), c.digests[&sid(1)]);
}

#[test]
fn a_checker_panic_is_raised_before_the_target_is_zeroed() {
    use super::restore::PANIC_CHECKING;
    let (store, _) = mem_store();
    let mut c = Chain::new(4 * MIB);
    // Data first, so the checker panics before anything was checked or written, and a
    // tail that a rollback would zero.
    scribble(&c.img, 0, 100_000, 1);
    let n = 90_000_001;
    c.snap(&store, n).unwrap();
    let target = sparse(c.dir.path(), "old", 4 * MIB);
    scribble(&target, 0, 4 * MIB as usize, 7);
    let before = digest(&target);
    *PANIC_CHECKING.lock().unwrap() = Some(sid(n));
    let restore = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        store.restore(&sid(n), &target, RestoreMode::Overwrite, &NoProgress)
    }));
    *PANIC_CHECKING.lock().unwrap() = None;
    assert!(restore.is_err(), "the checker's panic was not raised");
    assert_eq!(
        digest(&target),
        before,
        "the target was zeroed although nothing was checked"
    );
}

fn build_chain(store: &Store, n: u32) -> Chain {
    build_chain_sized(store, n, 6 * MIB)
}

fn build_chain_sized(store: &Store, n: u32, size: u64) -> Chain {
    let mut c = Chain::new(size);
    scribble(&c.img, 0, (size * 2 / 3) as usize, 1);
    c.snap(store, 1).unwrap();
    for i in 2..=n {
        mutate(&c.img, c.size, i as u64);
        c.snap(store, i).unwrap();
    }
    c
}

#[test]
fn delete_first_middle_last_keeps_others_identical_and_frees_space() {
    for victim in [1, 3, 5] {
        let (store, mem) = mem_store();
        let mut c = build_chain(&store, 5);
        let before = mem.total_bytes();
        store.delete(&sid(victim), &NoProgress).unwrap();
        c.digests.remove(&sid(victim));
        assert!(
            mem.total_bytes() < before,
            "no space freed deleting {victim}"
        );
        assert_eq!(store.list().unwrap().len(), 4);
        assert!(matches!(
            store.manifest(&sid(victim)),
            Err(StoreError::NotFound { .. })
        ));
        c.check_all(&store);
        if victim == 1 {
            assert!(store.manifest(&sid(2)).unwrap().is_full());
        }
        for m in store.list().unwrap() {
            assert!(store.verify(&m.id, &NoProgress).unwrap().is_ok());
        }
    }
    // Deleting everything, newest first and oldest first, leaves nothing behind.
    let (store, mem) = mem_store();
    build_chain(&store, 3);
    for i in [2, 1, 3] {
        store.delete(&sid(i), &NoProgress).unwrap();
    }
    assert_eq!(mem.total_bytes(), format::FORMAT_FILE_CONTENT.len() as u64);
}

#[test]
fn delete_with_two_children_folds_into_both() {
    let (store, _) = mem_store();
    let mut c = build_chain(&store, 2);
    // A second child of snapshot 1 (after a rollback, say).
    mutate(&c.img, c.size, 42);
    let m = meta(&sid(9), Some(&sid(1)), c.size, BS);
    capture(&store, m, &c.img, &NoProgress).unwrap();
    c.digests.insert(sid(9), digest(&c.img));
    store.delete(&sid(1), &NoProgress).unwrap();
    c.digests.remove(&sid(1));
    c.check_all(&store);
}

#[test]
fn crash_at_every_step_of_capture_recovers() {
    for step in 0..10 {
        let (store, mem) = mem_store();
        let mut c = build_chain_sized(&store, 2, 3 * MIB);
        mutate(&c.img, c.size, 77);
        mem.fail_after(step);
        let res = c.snap(&store, 3);
        mem.heal();
        let report = store.recover().unwrap();
        if res.is_ok() {
            assert_eq!(store.list().unwrap().len(), 3);
        } else {
            c.digests.remove(&sid(3));
            assert_eq!(store.list().unwrap().len(), 2, "step {step}: {report:?}");
            assert!(mem.get("snapshots/ss-00000003/manifest").is_none());
        }
        c.check_all(&store);
    }
}

#[test]
fn crash_at_every_step_of_delete_recovers() {
    for victim in [1, 2, 3] {
        for step in 0..12 {
            let (store, mem) = mem_store();
            let mut c = build_chain_sized(&store, 3, 3 * MIB);
            mem.fail_after(step);
            let res = store.delete(&sid(victim), &NoProgress);
            mem.heal();
            let report = store.recover().unwrap();
            let ids: Vec<_> = store.list().unwrap().into_iter().map(|m| m.id).collect();
            let marker_written = step > 0;
            if res.is_ok() || marker_written {
                assert!(
                    !ids.contains(&sid(victim)),
                    "victim {victim} step {step}: {report:?}"
                );
                c.digests.remove(&sid(victim));
            } else {
                assert!(ids.contains(&sid(victim)));
            }
            assert_eq!(ids.len(), c.digests.len());
            c.check_all(&store);
            // Nothing stray remains: every key belongs to a listed snapshot.
            let keys = mem.total_bytes();
            store.recover().unwrap();
            assert_eq!(keys, mem.total_bytes());
        }
    }
}

#[test]
fn recover_removes_filesystem_leftovers() {
    let store_dir = tempfile::tempdir().unwrap();
    let store = Store::open(store_dir.path()).unwrap();
    let c = build_chain(&store, 2);
    let snaps = store_dir.path().join("snapshots");
    std::fs::create_dir(snaps.join("ss-00000009")).unwrap();
    std::fs::write(snaps.join("ss-00000009/delta.0"), b"partial").unwrap();
    std::fs::write(snaps.join("ss-00000002/hashes.tmp-0123"), b"x").unwrap();
    std::fs::write(snaps.join("ss-00000002/delta.7"), b"old").unwrap();
    std::fs::write(store_dir.path().join("format.tmp-77"), b"x").unwrap();
    let r = store.recover().unwrap();
    assert_eq!(r.removed, vec![sid(9)]);
    assert_eq!(r.stale_files.len(), 3, "{r:?}");
    assert!(!store_dir.path().join("format.tmp-77").exists());
    assert!(!snaps.join("ss-00000009").exists());
    c.check_all(&store);
    assert!(store.recover().unwrap() == RecoveryReport::default());
}

#[test]
fn open_refuses_foreign_directories() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("precious.txt"), b"x").unwrap();
    let e = Store::open(d.path()).unwrap_err();
    assert_eq!(e.kind(), crate::api::ErrorKind::InvalidArgument);
    let d2 = tempfile::tempdir().unwrap();
    std::fs::write(d2.path().join("format"), b"something else").unwrap();
    assert!(Store::open(d2.path()).is_err());
    let d3 = tempfile::tempdir().unwrap();
    Store::open(&d3.path().join("new")).unwrap();
    Store::open(&d3.path().join("new")).unwrap();
}

#[test]
fn attributes_change_atomically() {
    let (store, _) = mem_store();
    build_chain(&store, 1);
    let m = store
        .set_attributes(&sid(1), Some("nightly"), None)
        .unwrap();
    assert_eq!(m.name, "nightly");
    let m = store
        .set_attributes(&sid(1), None, Some("before upgrade"))
        .unwrap();
    assert_eq!(
        (m.name.as_str(), m.description.as_str()),
        ("nightly", "before upgrade")
    );
    assert_eq!(store.manifest(&sid(1)).unwrap(), m);
    assert_eq!(
        store
            .set_attributes(&sid(5), None, None)
            .unwrap_err()
            .kind(),
        crate::api::ErrorKind::NotFound
    );
}

/// Each way of damaging snapshot 2's files, applied to a fresh chain of three.
type Damage = Box<dyn Fn(&MemBackend)>;

/// The index of a (current-version) delta file's bytes, decoded by the store's own decoders:
/// where damage lands is computed from the layout, never assumed.
fn delta_entries(b: &[u8]) -> Vec<format::IndexEntry> {
    let n = b.len();
    let footer = format::decode_footer(&b[n - 40..], n as u64).unwrap();
    format::decode_index(
        &b[footer.index_pos as usize..n - 40],
        &b[n - 40..],
        &footer,
        u64::MAX,
    )
    .unwrap()
}

/// File position of the first record's header.
fn first_record(b: &[u8]) -> usize {
    delta_entries(b)[0].file_pos as usize
}

fn corruptions() -> Vec<(&'static str, Damage)> {
    let delta = "snapshots/ss-00000002/delta.0";
    let edit = |key: &'static str, f: fn(&mut Vec<u8>)| -> Damage {
        Box::new(move |mem: &MemBackend| {
            let mut b = mem.get(key).unwrap();
            f(&mut b);
            mem.set(key, b);
        })
    };
    vec![
        (
            "payload bit",
            edit(delta, |b| {
                let at = first_record(b) + 32 + 10;
                b[at] ^= 1
            }),
        ),
        (
            "record header",
            edit(delta, |b| {
                let at = first_record(b) + 9;
                b[at] ^= 1
            }),
        ),
        (
            "index",
            edit(delta, |b| {
                let n = b.len();
                b[n - 40 - 20] ^= 1
            }),
        ),
        (
            "footer",
            edit(delta, |b| {
                let n = b.len();
                b[n - 30] ^= 1
            }),
        ),
        ("truncated", edit(delta, |b| b.truncate(b.len() - 7))),
        ("appended", edit(delta, |b| b.extend_from_slice(b"junk"))),
        (
            "manifest",
            edit("snapshots/ss-00000002/manifest", |b| b[40] ^= 4),
        ),
        (
            "hashes",
            edit("snapshots/ss-00000002/hashes", |b| b[60] ^= 1),
        ),
        (
            "deleted delta",
            Box::new(move |mem: &MemBackend| mem.remove(delta)),
        ),
        (
            "swapped records",
            Box::new(move |mem: &MemBackend| swap_first_records(mem, delta)),
        ),
    ]
}

/// Swaps the first two records (equal length) in place, index included: each record's own CRC
/// stays valid, but it no longer covers the offset it sits at.
fn swap_first_records(mem: &MemBackend, key: &str) {
    let mut b = mem.get(key).unwrap();
    let entries = delta_entries(&b);
    let (p0, l0) = (entries[0].file_pos, 32 + entries[0].length);
    let (p1, l1) = (entries[1].file_pos, 32 + entries[1].length);
    assert_eq!(l0, l1, "fixture needs two equal records");
    let (p0, p1, l) = (p0 as usize, p1 as usize, l0 as usize);
    let first = b[p0..p0 + l].to_vec();
    let second = b[p1..p1 + l].to_vec();
    // Keep the offsets in place so the layout stays sorted; swap everything else.
    b[p0..p0 + l].copy_from_slice(&second);
    b[p1..p1 + l].copy_from_slice(&first);
    b[p0 + 8..p0 + 16].copy_from_slice(&first[8..16]);
    b[p1 + 8..p1 + 16].copy_from_slice(&second[8..16]);
    // Fix up the index and footer too, so that only the records' own CRCs can tell.
    let n = b.len();
    let footer_at = n - 40;
    let index_pos =
        u64::from_le_bytes(b[footer_at + 16..footer_at + 24].try_into().unwrap()) as usize;
    let crc0: [u8; 4] = b[index_pos + 28..index_pos + 32].try_into().unwrap();
    let crc1: [u8; 4] = b[index_pos + 60..index_pos + 64].try_into().unwrap();
    b[index_pos + 28..index_pos + 32].copy_from_slice(&crc1);
    b[index_pos + 60..index_pos + 64].copy_from_slice(&crc0);
    let footer = format::Footer {
        record_count: u64::from_le_bytes(b[footer_at + 8..footer_at + 16].try_into().unwrap()),
        index_pos: index_pos as u64,
        payload_bytes: u64::from_le_bytes(b[footer_at + 24..footer_at + 32].try_into().unwrap()),
    };
    let new_footer = format::encode_footer(&footer, &b[index_pos..footer_at]);
    b[footer_at..].copy_from_slice(&new_footer);
    mem.set(key, b);
}

#[test]
fn corruption_is_reported_and_never_restored_as_data() {
    for (what, damage) in corruptions() {
        let (store, mem) = mem_store();
        let mut c = Chain::new(4 * MIB);
        scribble(&c.img, 0, 3 * MIB as usize, 1);
        c.snap(&store, 1).unwrap();
        // Two equal, separate data records in snapshot 2.
        scribble(&c.img, 0, 1 << 20, 2);
        scribble(&c.img, 2 * MIB, 1 << 20, 3);
        c.snap(&store, 2).unwrap();
        mutate(&c.img, c.size, 4);
        c.snap(&store, 3).unwrap();
        damage(&mem);
        let report = store.verify(&sid(3), &NoProgress);
        let report = match report {
            Ok(r) => r,
            Err(e) => panic!("{what}: verify failed: {e}"),
        };
        assert!(!report.is_ok(), "{what}: verify saw nothing");
        assert!(
            report.problems.iter().all(|p| p.snapshot == sid(2)),
            "{what}: {report:?}"
        );
        assert!(
            report.problems.iter().all(|p| p.start < p.end),
            "{what}: {report:?}"
        );
        if what == "payload bit" || what == "swapped records" {
            // The record itself is named, not just the file.
            assert!(
                report
                    .problems
                    .iter()
                    .any(|p| p.end - p.start <= MIB && p.reason.contains("CRC32")),
                "{what}: {report:?}"
            );
        }
        if what == "hashes" {
            // Restore does not need the block hashes: it still gives the right bytes.
            assert_eq!(
                restored(&store, c.dir.path(), &sid(3)).unwrap(),
                c.digests[&sid(3)]
            );
            continue;
        }
        for id in [sid(2), sid(3)] {
            let err = restored(&store, c.dir.path(), &id).expect_err(what);
            assert_eq!(err.kind(), crate::api::ErrorKind::Corrupt, "{what}: {err}");
        }
        assert_eq!(
            restored(&store, c.dir.path(), &sid(1)).unwrap(),
            c.digests[&sid(1)]
        );
    }
}

#[test]
fn bit_flips_anywhere_in_a_delta_are_caught_by_verify() {
    let (store, mem) = mem_store();
    let mut c = Chain::new(MIB);
    scribble(&c.img, 0, 200_000, 1);
    c.snap(&store, 1).unwrap();
    let key = "snapshots/ss-00000001/delta.0";
    let good = mem.get(key).unwrap();
    for i in (0..good.len())
        .step_by(997)
        .chain(good.len() - 40..good.len())
    {
        let mut b = good.clone();
        b[i] ^= 0x80;
        mem.set(key, b);
        assert!(
            !store.verify(&sid(1), &NoProgress).unwrap().is_ok(),
            "flip at {i}"
        );
    }
}

/// Size of the golden fixture's volume: 24 blocks of 4 KiB and a short one of 100 bytes.
const GOLDEN_SIZE: u64 = 24 * 4096 + 100;

/// Damage to an alignment gap (bytes no record covers) is found by verify, and restore
/// either refuses the chain or gives exactly the true bytes.
#[test]
fn damaged_alignment_gaps_are_reported() {
    let (store, mem) = mem_store();
    let mut c = Chain::new(4 * MIB);
    scribble(&c.img, 0, 100, 1);
    scribble(&c.img, 2 * BS as u64, 3 * MIB as usize, 2);
    c.snap(&store, 1).unwrap();
    let key = "snapshots/ss-00000001/delta.0";
    let good = mem.get(key).unwrap();
    let entries = delta_entries(&good);
    let gaps: Vec<std::ops::Range<usize>> = entries
        .windows(2)
        .map(|w| (w[0].file_pos + 32 + w[0].payload_len()) as usize..w[1].file_pos as usize)
        .filter(|g| !g.is_empty())
        .collect();
    assert!(!gaps.is_empty(), "no gap in {entries:?}");
    for g in &gaps {
        for at in [g.start, g.end - 1] {
            let mut b = good.clone();
            b[at] ^= 0x08;
            mem.set(key, b);
            let report = store.verify(&sid(1), &NoProgress).unwrap();
            assert!(
                report.problems.iter().any(|p| p.reason.contains("gap")),
                "gap byte {at}: {report:?}"
            );
            match restored(&store, c.dir.path(), &sid(1)) {
                Ok(d) => assert_eq!(d, c.digests[&sid(1)]),
                Err(e) => assert_eq!(e.kind(), crate::api::ErrorKind::Corrupt, "{e}"),
            }
        }
    }
    mem.set(key, good);
    assert!(store.verify(&sid(1), &NoProgress).unwrap().is_ok());
}

/// Deterministic inputs of the golden fixture (block size 4 KiB), full then incremental. The
/// full snapshot holds a 72 KiB record at image offset 12288, long enough to be aligned: the
/// fixture locks its alignment gap (delta version 2), as well as short unaligned records.
fn golden_store() -> (Store, Arc<MemBackend>) {
    let (store, mem) = mem_store();
    let dir = tempfile::tempdir().unwrap();
    let img = sparse(dir.path(), "img", GOLDEN_SIZE);
    scribble(&img, 0, 5000, 1);
    scribble(&img, 3 * 4096, 100, 2);
    scribble(&img, 4 * 4096, 17 * 4096, 4);
    scribble(&img, 24 * 4096, 100, 5);
    let mut m = meta(&sid(1), None, GOLDEN_SIZE, 4096);
    m.snapshot_time = 1_700_000_000;
    let mut man = capture(&store, m, &img, &NoProgress).unwrap();
    man.create_time = 1_700_000_001;
    store.write_manifest(&man).unwrap();
    use std::os::unix::fs::FileExt;
    img.write_all_at(&[0u8; 4096], 0).unwrap();
    scribble(&img, 8192, 10, 3);
    let m = meta(&sid(2), Some(&sid(1)), GOLDEN_SIZE, 4096);
    let mut man = capture(&store, m, &img, &NoProgress).unwrap();
    man.create_time = 1_700_000_002;
    store.write_manifest(&man).unwrap();
    // An incremental from an exact dirty set covering part of block 5 only: a short record
    // and a block hash recorded as not known (store version 4).
    scribble(&img, 5 * 4096 + 10, 100, 6);
    let m = meta(&sid(3), Some(&sid(2)), GOLDEN_SIZE, 4096);
    let dirty = std::slice::from_ref(&(5 * 4096 + 10..5 * 4096 + 110));
    let mut man = capture_extents(&store, m, &img, dirty, DirtySet::Exact, &NoProgress).unwrap();
    man.create_time = 1_700_000_003;
    store.write_manifest(&man).unwrap();
    (store, mem)
}

const GOLDEN: &[&str] = &[
    "format",
    "snapshots/ss-00000001/manifest",
    "snapshots/ss-00000001/delta.0",
    "snapshots/ss-00000001/hashes",
    "snapshots/ss-00000002/manifest",
    "snapshots/ss-00000002/delta.0",
    "snapshots/ss-00000002/hashes",
    "snapshots/ss-00000003/manifest",
    "snapshots/ss-00000003/delta.0",
    "snapshots/ss-00000003/hashes",
];

fn fixture_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store")
}

#[test]
#[ignore = "regenerates the golden fixtures; run with --ignored after an intended format change"]
fn regenerate_golden_fixtures() {
    let (_, mem) = golden_store();
    for key in GOLDEN {
        let path = fixture_dir().join(key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, mem.get(key).unwrap()).unwrap();
    }
}

#[test]
fn golden_format_is_unchanged() {
    let (_, mem) = golden_store();
    for key in GOLDEN {
        let want = std::fs::read(fixture_dir().join(key)).unwrap();
        assert!(
            mem.get(key).unwrap() == want,
            "{key} differs from the golden fixture"
        );
    }
    // And the fixtures themselves open, verify and restore as a store.
    let d = tempfile::tempdir().unwrap();
    copy_tree(&fixture_dir(), d.path());
    let store = Store::open(d.path()).unwrap();
    assert_eq!(store.list().unwrap().len(), 3);
    assert!(store.verify(&sid(3), &NoProgress).unwrap().is_ok());
    restored(&store, d.path(), &sid(3)).unwrap();
    // Snapshot 3's list holds the block it stored in part as "not known".
    let m = store.manifest(&sid(3)).unwrap();
    let hashes = store.block_hashes(&m).unwrap().hashes;
    let stale: Vec<usize> = (0..hashes.len())
        .filter(|&i| hashes[i] == super::hashes::STALE_HASH)
        .collect();
    assert_eq!(stale, vec![5]);
}

/// A store written by version 3 (block-hash lists without "not known" entries) opens, is
/// marked version 4, verifies and restores; an incremental on it works.
#[test]
fn version_3_fixtures_still_read() {
    let d = tempfile::tempdir().unwrap();
    copy_tree(&fixture_dir().join("v3"), d.path());
    assert_eq!(
        std::fs::read(d.path().join("format")).unwrap(),
        format::FORMAT_FILE_V3
    );
    let store = Store::open(d.path()).unwrap();
    assert_eq!(
        std::fs::read(d.path().join("format")).unwrap(),
        format::FORMAT_FILE_CONTENT
    );
    assert_eq!(store.list().unwrap().len(), 2);
    assert!(store.verify(&sid(2), &NoProgress).unwrap().is_ok());
    let img_dir = tempfile::tempdir().unwrap();
    let img = sparse(img_dir.path(), "img", 0);
    store
        .restore(&sid(2), &img, RestoreMode::Fresh, &NoProgress)
        .unwrap();
    assert_eq!(restored(&store, d.path(), &sid(2)).unwrap(), digest(&img));
    scribble(&img, 4096 + 7, 50, 9);
    let size = img.metadata().unwrap().len();
    let m = meta(&sid(3), Some(&sid(2)), size, 4096);
    let dirty = std::slice::from_ref(&(4096 + 7..4096 + 57));
    capture_extents(&store, m, &img, dirty, DirtySet::Exact, &NoProgress).unwrap();
    assert!(store.verify(&sid(3), &NoProgress).unwrap().is_ok());
    assert_eq!(restored(&store, d.path(), &sid(3)).unwrap(), digest(&img));
}

/// The golden delta of the full snapshot really holds an alignment gap: the layout the
/// fixture locks is the one `format` documents.
#[test]
fn golden_delta_has_an_aligned_record_after_a_zero_gap() {
    let b = std::fs::read(fixture_dir().join("snapshots/ss-00000001/delta.0")).unwrap();
    assert_eq!(&b[8..12], &format::DELTA_VERSION.to_le_bytes());
    let entries = delta_entries(&b);
    let long = entries
        .iter()
        .find(|e| e.length >= format::ALIGN_MIN_RECORD)
        .expect("an aligned record");
    assert_eq!((long.offset, long.length), (12288, 18 * 4096));
    assert_eq!((long.file_pos + 32) % format::ALIGN, 0);
    let prev = entries[entries.iter().position(|e| e == long).unwrap() - 1];
    let gap = (prev.file_pos + 32 + prev.payload_len()) as usize..long.file_pos as usize;
    assert_eq!(gap.len(), 4000);
    assert!(b[gap].iter().all(|&x| x == 0));
    // Short records follow each other with no gap.
    assert!(entries
        .windows(2)
        .filter(|w| w[1].length < format::ALIGN_MIN_RECORD)
        .all(|w| w[1].file_pos == w[0].file_pos + 32 + w[0].payload_len()));
}

/// A store written by version 2 (deltas of version 1, records back to back, manifests without
/// the whole-delta BLAKE3) opens, is marked version 4, verifies and restores; deleting its
/// full snapshot folds it into a version-2 delta of the incremental.
#[test]
fn version_2_fixtures_still_read() {
    let d = tempfile::tempdir().unwrap();
    copy_tree(&fixture_dir().join("v2"), d.path());
    assert_eq!(
        std::fs::read(d.path().join("format")).unwrap(),
        format::FORMAT_FILE_V2
    );
    let delta = std::fs::read(d.path().join("snapshots/ss-00000002/delta.0")).unwrap();
    assert_eq!(&delta[8..12], &1u32.to_le_bytes());
    let store = Store::open(d.path()).unwrap();
    assert_eq!(
        std::fs::read(d.path().join("format")).unwrap(),
        format::FORMAT_FILE_CONTENT
    );
    assert_eq!(store.list().unwrap().len(), 2);
    assert!(store.verify(&sid(2), &NoProgress).unwrap().is_ok());
    let want = restored(&store, d.path(), &sid(2)).unwrap();
    // A damaged version-1 delta is still caught.
    let path = d.path().join("snapshots/ss-00000002/delta.0");
    let mut bad = delta.clone();
    bad[32 + 32 + 1] ^= 1;
    std::fs::write(&path, &bad).unwrap();
    assert!(!store.verify(&sid(2), &NoProgress).unwrap().is_ok());
    std::fs::write(&path, &delta).unwrap();
    store.delete(&sid(1), &NoProgress).unwrap();
    let m = store.manifest(&sid(2)).unwrap();
    let folded = std::fs::read(d.path().join("snapshots/ss-00000002").join(&m.delta_file)).unwrap();
    assert_eq!(&folded[8..12], &format::DELTA_VERSION.to_le_bytes());
    assert!(store.verify(&sid(2), &NoProgress).unwrap().is_ok());
    assert_eq!(restored(&store, d.path(), &sid(2)).unwrap(), want);
}

/// A binary that knows only an older store version compares the marker byte for byte: the
/// current marker is not one it accepts, so it refuses the store ("unknown format file").
#[test]
fn the_store_marker_changed_with_the_delta_layout() {
    assert_ne!(format::FORMAT_FILE_CONTENT, format::FORMAT_FILE_V3);
    assert_ne!(format::FORMAT_FILE_CONTENT, format::FORMAT_FILE_V2);
    assert_ne!(format::FORMAT_FILE_CONTENT, format::FORMAT_FILE_V1);
    let (store, mem) = mem_store();
    drop(store);
    mem.set("format", b"blocksnap-store\nversion 5\n".to_vec());
    let err = Store::with_backend(Arc::new(SharedMem(mem))).unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
}

/// A store written by version 1 (manifests with the delta's whole-file BLAKE3) opens, is
/// marked version 4, verifies (comparing that BLAKE3) and restores; damage to the recorded
/// BLAKE3 is still reported, and a version-1 manifest cannot drop it.
#[test]
fn version_1_fixtures_still_read() {
    let d = tempfile::tempdir().unwrap();
    copy_tree(&fixture_dir().join("v1"), d.path());
    let v1 = std::fs::read(d.path().join("format")).unwrap();
    assert_eq!(v1, format::FORMAT_FILE_V1);
    let store = Store::open(d.path()).unwrap();
    assert_eq!(
        std::fs::read(d.path().join("format")).unwrap(),
        format::FORMAT_FILE_CONTENT
    );
    assert_eq!(store.list().unwrap().len(), 2);
    let m = store.manifest(&sid(2)).unwrap();
    assert_eq!(m.delta_blake3.len(), 64);
    assert!(store.verify(&sid(2), &NoProgress).unwrap().is_ok());
    restored(&store, d.path(), &sid(2)).unwrap();
    // A version-1 manifest whose BLAKE3 no longer matches the delta: verify says so.
    let path = d.path().join("snapshots/ss-00000002/manifest");
    let orig = std::fs::read(&path).unwrap();
    let reseal = |f: &dyn Fn(&mut Manifest)| {
        let body = format::decode_manifest(&orig).unwrap();
        let mut m: Manifest = serde_json::from_slice(body).unwrap();
        f(&mut m);
        let mut enc = format::encode_manifest(&serde_json::to_vec(&m).unwrap());
        enc[8..12].copy_from_slice(&1u32.to_le_bytes());
        let end = enc.len() - 32;
        let sum = blake3::hash(&enc[..end]);
        enc[end..].copy_from_slice(sum.as_bytes());
        std::fs::write(&path, enc).unwrap();
    };
    reseal(&|m| m.delta_blake3 = "00".repeat(32));
    let report = store.verify(&sid(2), &NoProgress).unwrap();
    assert!(
        report.problems.iter().any(|p| p.reason.contains("BLAKE3")),
        "{report:?}"
    );
    // Emptying it in a version-1 manifest is a forgery, not a version-2 manifest.
    reseal(&|m| m.delta_blake3.clear());
    let err = store.manifest(&sid(2)).unwrap_err();
    assert_eq!(err.kind(), crate::api::ErrorKind::Corrupt);
    std::fs::write(&path, &orig).unwrap();
    assert!(store.verify(&sid(2), &NoProgress).unwrap().is_ok());
}

fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_name() == "v1" || e.file_name() == "v2" {
            // Previous formats' fixtures (`version_1_fixtures_still_read`,
            // `version_2_fixtures_still_read`).
            continue;
        }
        if e.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&dest).unwrap();
            copy_tree(&e.path(), &dest);
        } else if e.file_name() != "README.md" && e.file_name() != "generate.sh" {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

#[test]
fn delete_of_damaged_snapshot_fails_and_rolls_back() {
    let (store, mem) = mem_store();
    let c = build_chain(&store, 3);
    let key = "snapshots/ss-00000002/delta.0";
    let mut b = mem.get(key).unwrap();
    let at = first_record(&b) + 32 + 5;
    b[at] ^= 1;
    mem.set(key, b);
    let err = store.delete(&sid(2), &NoProgress).unwrap_err();
    assert_eq!(err.kind(), crate::api::ErrorKind::Corrupt);
    assert_eq!(store.list().unwrap().len(), 3);
    assert_eq!(
        restored(&store, c.dir.path(), &sid(1)).unwrap(),
        c.digests[&sid(1)]
    );
    assert_eq!(store.recover().unwrap(), RecoveryReport::default());
    // Its parent cannot go either: folding would have to copy the damaged record.
    let err = store.delete(&sid(1), &NoProgress).unwrap_err();
    assert_eq!(err.kind(), crate::api::ErrorKind::Corrupt);
    assert_eq!(store.list().unwrap().len(), 3);
    // The newest one has no children and goes.
    store.delete(&sid(3), &NoProgress).unwrap();
}

/// Throughput against `cp --sparse=always` and `b3sum`. Not a pass/fail test: it prints.
/// `cargo --config 'profile.dev.package.blocksnap.opt-level=3' test --lib bench_throughput
/// -- --ignored --nocapture` (size in MiB from `BLOCKSNAP_BENCH_MIB`, default 512).
#[test]
#[ignore = "benchmark: prints timings, takes seconds to minutes"]
fn bench_throughput() {
    use std::process::Command;
    use std::time::Instant;
    let mib: u64 = std::env::var("BLOCKSNAP_BENCH_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(512);
    let size = mib * MIB;
    // BLOCKSNAP_BENCH_DIR: where image and store live (an xfs mount to measure sharing);
    // BLOCKSNAP_BENCH_COLD=1: sync and drop the page cache before every timed step (root).
    let base = std::env::var("BLOCKSNAP_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let cold = std::env::var("BLOCKSNAP_BENCH_COLD").is_ok_and(|v| v == "1");
    let dir = tempfile::tempdir_in(base).unwrap();
    let img = sparse(dir.path(), "img", size);
    // Three quarters data, one quarter holes, in 16 MiB stretches.
    let mut off = 0;
    while off < size {
        if (off / (16 * MIB)) % 4 != 3 {
            scribble(&img, off, (16 * MIB).min(size - off) as usize, off);
        }
        off += 16 * MIB;
    }
    img.sync_all().unwrap();
    let time = |what: &str, f: &mut dyn FnMut()| {
        if cold {
            let st = Command::new("sync").status().unwrap();
            assert!(st.success());
            std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
        }
        let t = Instant::now();
        f();
        let s = t.elapsed().as_secs_f64();
        eprintln!("{what:<28} {s:8.3} s  {:8.0} MiB/s", mib as f64 / s);
        s
    };
    let img_path = dir.path().join("img");
    let cp = time("cp --sparse=always", &mut || {
        let st = Command::new("cp")
            .arg("--sparse=always")
            .arg("--reflink=never")
            .arg(&img_path)
            .arg(dir.path().join("cp-copy"))
            .status()
            .unwrap();
        assert!(st.success());
    });
    time("cp --sparse=always + fsync", &mut || {
        let copy = dir.path().join("cp-copy2");
        let st = Command::new("cp")
            .arg("--sparse=always")
            .arg("--reflink=never")
            .arg(&img_path)
            .arg(&copy)
            .status()
            .unwrap();
        assert!(st.success());
        File::open(&copy).unwrap().sync_all().unwrap();
    });
    time("cat (read only)", &mut || {
        let st = Command::new("cat")
            .arg(&img_path)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(st.success());
    });
    let store = Store::open(&dir.path().join("store")).unwrap();
    time("capture full, memory backend", &mut || {
        let (mstore, _) = mem_store();
        capture(&mstore, meta(&sid(1), None, size, BS), &img, &NoProgress).unwrap();
    });
    let full = time("capture full", &mut || {
        capture(&store, meta(&sid(1), None, size, BS), &img, &NoProgress).unwrap();
    });
    for i in 0..(size / MIB) {
        if i % 97 == 0 {
            scribble(&img, i * MIB + 4096, 8192, i);
        }
    }
    let b3 = time("b3sum", &mut || {
        let st = Command::new("b3sum").arg(&img_path).output().unwrap();
        assert!(st.status.success());
    });
    let inc = time("capture incremental", &mut || {
        capture(
            &store,
            meta(&sid(2), Some(&sid(1)), size, BS),
            &img,
            &NoProgress,
        )
        .unwrap();
    });
    let target = sparse(dir.path(), "restored", 0);
    let rest = time("restore (fresh)", &mut || {
        store
            .restore(&sid(2), &target, RestoreMode::Fresh, &NoProgress)
            .unwrap();
    });
    assert_eq!(digest(&target), digest(&img));
    eprintln!(
        "full/cp {:.2}  incremental/b3sum {:.2}  restore/cp {:.2} (time ratios; lower is faster)",
        full / cp,
        inc / b3,
        rest / cp
    );
}

#[test]
fn store_is_send_sync_and_capture_can_be_cancelled() {
    fn send_sync<T: Send + Sync + Clone>() {}
    send_sync::<Store>();
    struct CancelSoon(std::sync::atomic::AtomicU32);
    impl Progress for CancelSoon {
        fn set_total(&self, _: u64) {}
        fn advance(&self, _: u64) {}
        fn cancelled(&self) -> bool {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst) >= 1
        }
    }
    let (store, mem) = mem_store();
    let c = Chain::new(16 * MIB);
    scribble(&c.img, 0, 16 * MIB as usize, 1);
    let err = capture(
        &store,
        meta(&sid(1), None, c.size, BS),
        &c.img,
        &CancelSoon(0.into()),
    )
    .unwrap_err();
    assert!(matches!(err, StoreError::Cancelled { .. }), "{err}");
    assert!(store.list().unwrap().is_empty());
    assert_eq!(mem.total_bytes(), format::FORMAT_FILE_CONTENT.len() as u64);
}

#[test]
fn capture_extents_after_growth_rehashes_the_short_last_block() {
    let (store, _) = mem_store();
    let mut c = Chain::new(MIB + 1000);
    scribble(&c.img, 0, (MIB + 1000) as usize, 1);
    c.snap(&store, 1).unwrap();
    c.size = 2 * MIB;
    c.img.set_len(c.size).unwrap();
    let m = meta(&sid(2), Some(&sid(1)), c.size, BS);
    let got = capture_extents(&store, m, &c.img, &[], DirtySet::Exact, &NoProgress).unwrap();
    c.ids.push(sid(2));
    c.digests.insert(sid(2), digest(&c.img));
    c.check_all(&store);
    // The hash list now equals a full scan's.
    let scanned = c.snap(&store, 3).unwrap();
    assert_eq!(scanned.record_count, 0);
    assert_eq!(
        store.block_hashes(&got).unwrap().hashes,
        store.block_hashes(&scanned).unwrap().hashes
    );
}

#[test]
fn capture_extents_refuses_to_shrink_the_volume() {
    let (store, _) = mem_store();
    let mut c = Chain::new(2 * MIB);
    scribble(&c.img, 0, MIB as usize, 1);
    c.snap(&store, 1).unwrap();
    let m = meta(&sid(2), Some(&sid(1)), MIB + 1000, BS);
    let err = capture_extents(&store, m, &c.img, &[], DirtySet::Exact, &NoProgress).unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err}");
    assert!(err.to_string().contains("shrink"), "{err}");
    assert_eq!(store.list().unwrap().len(), 1);
}

/// Counts bytes read through a backend (a decorator, as an object-store cache would be).
#[derive(Debug)]
struct Counting(SharedMem, std::sync::atomic::AtomicU64);

impl Backend for Counting {
    fn put(&self, key: &str) -> std::io::Result<Box<dyn BlobWriter>> {
        self.0.put(key)
    }
    fn read_at(&self, key: &str, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.1
            .fetch_add(buf.len() as u64, std::sync::atomic::Ordering::SeqCst);
        self.0.read_at(key, offset, buf)
    }
    fn size(&self, key: &str) -> std::io::Result<u64> {
        self.0.size(key)
    }
    fn list(&self, prefix: &str) -> std::io::Result<Vec<String>> {
        self.0.list(prefix)
    }
    fn delete(&self, key: &str) -> std::io::Result<()> {
        self.0.delete(key)
    }
}

#[test]
fn fifty_deep_chain_restores_and_reads_little() {
    let counting = Arc::new(Counting(SharedMem::new(), 0.into()));
    let store = Store::with_backend(counting.clone()).unwrap();
    let mut c = Chain::new(4 * MIB);
    scribble(&c.img, 0, 4 * MIB as usize, 1);
    c.snap(&store, 1).unwrap();
    for n in 2..=50u32 {
        // The same few places are rewritten again and again: newer records hide older ones.
        scribble(&c.img, u64::from(n % 3) * 700_001, 5000, n.into());
        c.snap(&store, n).unwrap();
    }
    assert_eq!(store.chain(&sid(50)).unwrap().len(), 50);
    let stored: u64 = store.list().unwrap().iter().map(|m| m.stored_bytes).sum();
    assert!(stored < 4 * MIB + 50 * 2 * u64::from(BS), "{stored}");
    let before = counting.1.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        restored(&store, c.dir.path(), &sid(50)).unwrap(),
        c.digests[&sid(50)]
    );
    let read = counting.1.load(std::sync::atomic::Ordering::SeqCst) - before;
    // One full image plus the three visible newest records, manifests and indexes.
    assert!(
        read < 4 * MIB + 3 * 2 * u64::from(BS) + 200_000,
        "read {read} bytes"
    );
    assert_eq!(
        restored(&store, c.dir.path(), &sid(25)).unwrap(),
        c.digests[&sid(25)]
    );
    assert!(store.verify(&sid(50), &NoProgress).unwrap().is_ok());
}

#[test]
fn hash_lists_stream_across_batches_and_a_damaged_parent_list_fails_the_capture() {
    let (store, mem) = mem_store();
    let dir = tempfile::tempdir().unwrap();
    // 4 KiB blocks over 200 MiB: 51200 hashes, more than one read batch.
    let size = 200 * MIB;
    let img = sparse(dir.path(), "img", size);
    scribble(&img, 150 * MIB, 10_000, 1);
    capture(&store, meta(&sid(1), None, size, 4096), &img, &NoProgress).unwrap();
    scribble(&img, 190 * MIB, 10_000, 2);
    let m2 = capture(
        &store,
        meta(&sid(2), Some(&sid(1)), size, 4096),
        &img,
        &NoProgress,
    )
    .unwrap();
    assert_eq!(m2.stored_bytes, 3 * 4096);
    assert_eq!(restored(&store, dir.path(), &sid(2)).unwrap(), digest(&img));
    let key = "snapshots/ss-00000002/hashes";
    let mut b = mem.get(key).unwrap();
    let n = b.len();
    b[n - 100] ^= 1;
    mem.set(key, b);
    let err = capture(
        &store,
        meta(&sid(3), Some(&sid(2)), size, 4096),
        &img,
        &NoProgress,
    )
    .unwrap_err();
    assert_eq!(err.kind(), crate::api::ErrorKind::Corrupt, "{err}");
    assert!(matches!(
        store.manifest(&sid(3)),
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(store.list().unwrap().len(), 2);
}

/// Fails every mutating operation after the first `n` (a crash at that step) over any backend.
#[derive(Debug)]
struct Faulty<B: Backend> {
    inner: B,
    left: Arc<std::sync::atomic::AtomicI64>,
}

fn step(left: &std::sync::atomic::AtomicI64) -> std::io::Result<()> {
    if left.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) <= 0 {
        return Err(std::io::Error::other("injected crash"));
    }
    Ok(())
}

struct FaultyWriter(Box<dyn BlobWriter>, Arc<std::sync::atomic::AtomicI64>);

impl std::io::Write for FaultyWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl BlobWriter for FaultyWriter {
    fn commit(self: Box<Self>) -> std::io::Result<()> {
        step(&self.1)?;
        self.0.commit()
    }
}

impl<B: Backend> Backend for Faulty<B> {
    fn put(&self, key: &str) -> std::io::Result<Box<dyn BlobWriter>> {
        Ok(Box::new(FaultyWriter(
            self.inner.put(key)?,
            self.left.clone(),
        )))
    }
    fn read_at(&self, key: &str, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.inner.read_at(key, offset, buf)
    }
    fn size(&self, key: &str) -> std::io::Result<u64> {
        self.inner.size(key)
    }
    fn list(&self, prefix: &str) -> std::io::Result<Vec<String>> {
        self.inner.list(prefix)
    }
    fn delete(&self, key: &str) -> std::io::Result<()> {
        step(&self.left)?;
        self.inner.delete(key)
    }
}

#[test]
fn crash_at_every_step_on_the_filesystem_backend() {
    for step_n in 0..14 {
        let store_dir = tempfile::tempdir().unwrap();
        let left = Arc::new(std::sync::atomic::AtomicI64::new(i64::MAX));
        let faulty = Faulty {
            inner: FsBackend::new(store_dir.path()),
            left: left.clone(),
        };
        let store = Store::with_backend(Arc::new(faulty)).unwrap();
        let mut c = build_chain_sized(&store, 3, 3 * MIB);
        mutate(&c.img, c.size, 5);
        left.store(step_n, std::sync::atomic::Ordering::SeqCst);
        // A new snapshot and a delete in the middle, stopped at step `step_n`.
        let created = c.snap(&store, 4).is_ok();
        let deleted = created && store.delete(&sid(2), &NoProgress).is_ok();
        left.store(i64::MAX, std::sync::atomic::Ordering::SeqCst);
        // Restart: a fresh handle on the same directory.
        let store = Store::open(store_dir.path()).unwrap();
        store.recover().unwrap();
        let ids: Vec<_> = store.list().unwrap().into_iter().map(|m| m.id).collect();
        if !created {
            c.digests.remove(&sid(4));
        }
        if deleted || !ids.contains(&sid(2)) {
            c.digests.remove(&sid(2));
        }
        assert_eq!(ids.len(), c.digests.len(), "step {step_n}");
        c.check_all(&store);
        let stray: Vec<_> = walk(store_dir.path())
            .into_iter()
            .filter(|p| p.to_string_lossy().contains(".tmp-"))
            .collect();
        assert!(stray.is_empty(), "{stray:?}");
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

#[test]
fn deletes_run_alongside_commits_and_attribute_changes() {
    let (store, _) = mem_store();
    let mut one = build_chain_sized(&store, 3, 3 * MIB);
    let mut two = Chain::new(3 * MIB);
    scribble(&two.img, 0, MIB as usize, 7);
    std::thread::scope(|s| {
        let st = store.clone();
        let deleter = s.spawn(move || st.delete(&sid(2), &NoProgress));
        for n in 11..15 {
            two.snap(&store, n).unwrap();
            store
                .set_attributes(&sid(3), Some(&format!("renamed {n}")), None)
                .unwrap();
            mutate(&two.img, two.size, n.into());
        }
        deleter.join().unwrap().unwrap();
    });
    one.digests.remove(&sid(2));
    let m3 = store.manifest(&sid(3)).unwrap();
    assert_eq!(m3.name, "renamed 14");
    assert_eq!(m3.parent, Some(sid(1)));
    one.check_own(&store);
    two.check_own(&store);
    assert_eq!(store.list().unwrap().len(), 2 + 4);
    assert!(store.verify(&sid(3), &NoProgress).unwrap().is_ok());
}

#[test]
fn verify_record_scan_handles_any_chunking() {
    let (store, mem) = mem_store();
    let mut c = Chain::new(3 * MIB);
    scribble(&c.img, 1000, 2 * MIB as usize, 1);
    let m = c.snap(&store, 1).unwrap();
    let index = store.delta_index(&m).unwrap();
    let good = mem.get("snapshots/ss-00000001/delta.0").unwrap();
    let mut bad = good.clone();
    bad[32 + 32 + 1000] ^= 1;
    for chunk in [1usize, 7, 31, 32, 33, 4096, 1 << 20] {
        for (bytes, want) in [(&good, 0usize), (&bad, 1)] {
            let mut scan = restore::RecordScan::new(&m, &index);
            let mut problems = Vec::new();
            for (i, piece) in bytes.chunks(chunk).enumerate() {
                scan.feed((i * chunk) as u64, piece, &mut problems, &NoProgress);
            }
            assert_eq!(problems.len(), want, "chunk {chunk}: {problems:?}");
        }
    }
}

#[test]
fn random_damage_never_panics_and_never_restores_wrong_data() {
    let (store, mem) = mem_store();
    let mut c = Chain::new(MIB);
    scribble(&c.img, 5000, 300_000, 1);
    c.snap(&store, 1).unwrap();
    scribble(&c.img, 600_000, 70_000, 2);
    c.snap(&store, 2).unwrap();
    let keys = [
        "snapshots/ss-00000002/delta.0",
        "snapshots/ss-00000002/manifest",
        "snapshots/ss-00000002/hashes",
    ];
    let originals: Vec<Vec<u8>> = keys.iter().map(|k| mem.get(k).unwrap()).collect();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for round in 0..300 {
        let which = (rnd() % 3) as usize;
        let mut b = originals[which].clone();
        match rnd() % 3 {
            0 => {
                for _ in 0..1 + rnd() % 4 {
                    let i = (rnd() % b.len() as u64) as usize;
                    b[i] = rnd() as u8;
                }
            }
            1 => b.truncate((rnd() % b.len() as u64) as usize),
            _ => b.extend((0..1 + rnd() % 64).map(|_| rnd() as u8)),
        }
        let damaged = b != originals[which];
        mem.set(keys[which], b);
        let verified = store.verify(&sid(2), &NoProgress);
        let restore = restored(&store, c.dir.path(), &sid(2));
        if let Ok(got) = &restore {
            assert_eq!(
                got,
                &c.digests[&sid(2)],
                "round {round}: wrong data restored"
            );
        }
        if damaged {
            assert!(
                verified.map_or(true, |r| !r.is_ok()),
                "round {round}: damage to {} not found",
                keys[which]
            );
        }
        mem.set(keys[which], originals[which].clone());
    }
}

#[test]
fn every_supported_block_size_round_trips() {
    for bs in [4096u32, 65536, 1 << 20, 4 << 20] {
        let (store, _) = mem_store();
        let dir = tempfile::tempdir().unwrap();
        let size = 9 * MIB + 777;
        let img = sparse(dir.path(), "img", size);
        scribble(&img, 3000, 5 * MIB as usize, 1);
        let m1 = capture(&store, meta(&sid(1), None, size, bs), &img, &NoProgress).unwrap();
        let d1 = digest(&img);
        scribble(&img, size - 10, 10, 2);
        scribble(&img, 4 * MIB, 100, 3);
        let m2 = capture(
            &store,
            meta(&sid(2), Some(&sid(1)), size, bs),
            &img,
            &NoProgress,
        )
        .unwrap();
        assert!(
            m2.stored_bytes <= 4 * u64::from(bs),
            "bs {bs}: {}",
            m2.stored_bytes
        );
        assert_eq!(
            restored(&store, dir.path(), &sid(1)).unwrap(),
            d1,
            "bs {bs}"
        );
        assert_eq!(
            restored(&store, dir.path(), &sid(2)).unwrap(),
            digest(&img),
            "bs {bs}"
        );
        store.delete(&m1.id, &NoProgress).unwrap();
        assert_eq!(
            restored(&store, dir.path(), &sid(2)).unwrap(),
            digest(&img),
            "bs {bs}"
        );
    }
    let (store, _) = mem_store();
    let dir = tempfile::tempdir().unwrap();
    let img = sparse(dir.path(), "img", MIB);
    for bad in [0u32, 2048, 3 * 4096, 8 << 20] {
        let err = capture(&store, meta(&sid(1), None, MIB, bad), &img, &NoProgress).unwrap_err();
        assert_eq!(err.kind(), crate::api::ErrorKind::InvalidArgument, "{bad}");
    }
}

/// Bytes of `f` in extents FIEMAP reports as shared.
fn shared_bytes(f: &File) -> u64 {
    crate::sys::fiemap::fiemap(f, 0, u64::MAX, true)
        .unwrap()
        .iter()
        .filter(|e| e.is_shared())
        .map(|e| e.length)
        .sum()
}

/// On a real xfs (reflink) loop image: capture shares the source image's extents in the delta
/// and restore shares the delta's extents in the target, while both still check every byte
/// (a damaged shared payload is refused by restore and verify); folding a deleted middle
/// snapshot keeps the chain restorable.
#[test]
fn capture_and_restore_share_extents_on_xfs() {
    if !crate::sys::test_util::root_or_skip("capture_and_restore_share_extents_on_xfs") {
        return;
    }
    let fs = crate::sys::test_util::ScratchFs::new("xfs", 512 * MIB);
    let root = fs.mountpoint();
    let store = Store::open(&root.join("store")).unwrap();
    let size = 16 * MIB;
    let mut c = Chain::new(size);
    // The image must live on the store's filesystem to share extents with it.
    c.img = sparse(root, "image", size);
    scribble(&c.img, 0, 100, 1);
    scribble(&c.img, MIB, 6 * MIB as usize + 5000, 2);
    c.img.sync_all().unwrap();
    c.snap(&store, 1).unwrap();
    let delta_path = |id: &SnapshotId| {
        let m = store.manifest(id).unwrap();
        root.join("store/snapshots")
            .join(id.as_str())
            .join(m.delta_file)
    };
    let delta = File::open(delta_path(&sid(1))).unwrap();
    let shared = shared_bytes(&delta);
    assert!(
        shared >= 6 * MIB,
        "capture shared only {shared} bytes of the image"
    );
    assert!(store.verify(&sid(1), &NoProgress).unwrap().is_ok());
    // Restore on the same filesystem: right bytes, shared with the delta.
    let target = sparse(root, "restored-1", 0);
    store
        .restore(&sid(1), &target, RestoreMode::Fresh, &NoProgress)
        .unwrap();
    assert_eq!(digest(&target), c.digests[&sid(1)]);
    assert!(
        shared_bytes(&target) >= 6 * MIB,
        "restore shared only {} bytes",
        shared_bytes(&target)
    );
    // Overwrite mode over old data, and an incremental on top.
    scribble(&c.img, 3 * MIB, 2 * MIB as usize, 3);
    c.img.write_all_at_zeros(MIB, 64 * 1024);
    c.snap(&store, 2).unwrap();
    scribble(&c.img, 10 * MIB, 3 * MIB as usize, 4);
    c.snap(&store, 3).unwrap();
    store
        .restore(&sid(3), &target, RestoreMode::Overwrite, &NoProgress)
        .unwrap();
    assert_eq!(digest(&target), c.digests[&sid(3)]);
    // A middle snapshot folded into its child: the chain still restores exactly.
    store.delete(&sid(2), &NoProgress).unwrap();
    c.digests.remove(&sid(2));
    c.check_own(&store);
    // Damage a payload byte the delta shares with the image (the write unshares only that
    // block): restore and verify refuse it.
    let path = delta_path(&sid(1));
    let index = store
        .delta_index(&store.manifest(&sid(1)).unwrap())
        .unwrap();
    let victim = index.iter().find(|e| e.length >= MIB).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&[0x5a], victim.file_pos + 32 + 4097)
        .unwrap();
    f.sync_all().unwrap();
    assert!(!store.verify(&sid(1), &NoProgress).unwrap().is_ok());
    let err = restored(&store, root, &sid(1)).unwrap_err();
    assert_eq!(err.kind(), crate::api::ErrorKind::Corrupt, "{err}");
    // The image itself is untouched by that write (copy-on-write).
    assert_eq!(digest(&c.img), c.digests[&sid(3)]);
}

/// `private_copy` of a file blob: on xfs an unnamed reflink copy that reads the same bytes,
/// can be cloned from, and leaves nothing in the blob's directory; on ext4 (no reflink) none.
#[test]
fn private_copies_of_blobs_share_their_extents_and_have_no_name() {
    if !crate::sys::test_util::root_or_skip(
        "private_copies_of_blobs_share_their_extents_and_have_no_name",
    ) {
        return;
    }
    use super::backend::{Backend, FsBackend};
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    let bytes: Vec<u8> = (0..256 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    for (fstype, shares) in [("xfs", true), ("ext4", false)] {
        let fs = crate::sys::test_util::ScratchFs::new(fstype, 512 * MIB);
        let b = FsBackend::new(&fs.mountpoint().join("store"));
        let mut w = b.put("snapshots/ss-1/delta.0").unwrap();
        w.write_all(&bytes).unwrap();
        w.commit().unwrap();
        let names = || b.list("snapshots/").unwrap();
        let before = names();
        let stream = b.open_stream("snapshots/ss-1/delta.0").unwrap();
        let copy = stream.private_copy().unwrap();
        assert_eq!(copy.is_some(), shares, "{fstype}");
        if let Some(copy) = copy {
            let mut got = vec![0u8; bytes.len()];
            copy.read_at(0, &mut got).unwrap();
            assert_eq!(got, bytes, "{fstype}: the copy reads other bytes");
            let target = sparse(fs.mountpoint(), "target", 0);
            copy.clone_to(64 * 1024, 128 * 1024, &target, 0).unwrap();
            let mut cloned = vec![0u8; 128 * 1024];
            target.read_exact_at(&mut cloned, 0).unwrap();
            assert_eq!(cloned[..], bytes[64 * 1024..192 * 1024]);
            assert_eq!(names(), before, "{fstype}: the copy has a name");
        }
    }
}

trait ZeroAt {
    fn write_all_at_zeros(&self, off: u64, len: usize);
}

impl ZeroAt for File {
    fn write_all_at_zeros(&self, off: u64, len: usize) {
        use std::os::unix::fs::FileExt;
        self.write_all_at(&vec![0u8; len], off).unwrap();
    }
}

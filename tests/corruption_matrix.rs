//! Corruption matrix against the store API (no daemon): a chain full + 2 incrementals is built
//! from a sparse file with random data, then every file of every snapshot is damaged in many
//! ways (bit flips in headers/records/index/footer, zeroed 4 KiB blocks, truncations, appended
//! bytes, deleted files, stray files, damaged manifests, swapped records). For each case:
//!
//! * `verify` of the chain's leaf must report it (a problem naming a snapshot of the chain and a
//!   non-empty byte range), or fail with NotFound/Corrupt when the leaf itself is gone;
//! * `restore` of every snapshot of the chain must either fail with kind Corrupt/NotFound, or
//!   succeed with exactly the true bytes — never Ok with wrong data.
//!
//! Stray files are harmless by design: verify/restore must keep working and `recover` removes
//! them. A tally (kind × detected) is printed; run with `--nocapture` to see it.

use blocksnap::api::{ErrorKind, SnapshotId};
use blocksnap::store::{self, format, NoProgress, RestoreMode, SnapshotMeta, Store, StoreError};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const SIZE: u64 = 3 << 20;
const BS: u32 = 4096;

struct Fixture {
    _dir: tempfile::TempDir,
    store: PathBuf,
    ids: Vec<SnapshotId>,
    truth: Vec<Vec<u8>>,
}

fn meta(id: &SnapshotId, parent: Option<&SnapshotId>) -> SnapshotMeta {
    SnapshotMeta {
        id: id.clone(),
        volume_id: "vol-0000000a".parse().unwrap(),
        volume_name: "matrix".into(),
        name: format!("snap {id}"),
        description: String::new(),
        owner: "root".into(),
        parent: parent.cloned(),
        volume_size: SIZE,
        block_size: BS,
        snapshot_time: 1_700_000_000,
        freeze_ms: 0,
        consistency: "crash".into(),
    }
}

fn write_random(f: &File, rng: &mut StdRng, off: u64, len: usize) {
    let mut buf = vec![0u8; len];
    rng.fill_bytes(&mut buf);
    f.write_all_at(&buf, off).unwrap();
}

fn read_all(f: &File) -> Vec<u8> {
    let len = f.metadata().unwrap().len() as usize;
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, 0).unwrap();
    buf
}

/// A temp dir on tmpfs when there is one: hundreds of restores fsync their targets.
fn fast_tempdir(prefix: &str) -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let mut b = tempfile::Builder::new();
    b.prefix(prefix);
    if shm.is_dir() {
        if let Ok(d) = b.tempdir_in(shm) {
            return d;
        }
    }
    b.tempdir().unwrap()
}

fn build() -> Fixture {
    let dir = fast_tempdir("bs-matrix-");
    let store_path = dir.path().join("store");
    let st = Store::open(&store_path).unwrap();
    let img = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.path().join("vol.img"))
        .unwrap();
    img.set_len(SIZE).unwrap();
    let mut rng = StdRng::seed_from_u64(0x5eed_0001);
    // Full: scattered random extents, one unaligned, several long enough for multi-block records.
    for _ in 0..24 {
        let off = rng.gen_range(0..SIZE / 4096 - 16) * 4096;
        let len = rng.gen_range(1..16) * 4096;
        write_random(&img, &mut rng, off, len);
    }
    write_random(&img, &mut rng, 12_345, 10_000);
    // A run long enough for an aligned record (delta version 2: a zero gap before its header).
    write_random(&img, &mut rng, 2 << 20, 40 * 4096);
    let ids: Vec<SnapshotId> = ["ss-0000full", "ss-00000in1", "ss-00000in2"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    let mut truth = Vec::new();
    store::capture(&st, meta(&ids[0], None), &img, &NoProgress).unwrap();
    truth.push(read_all(&img));
    // Inc 1: overwrite some blocks, zero a data region (becomes a zero record).
    for _ in 0..8 {
        let off = rng.gen_range(0..SIZE / 4096 - 4) * 4096;
        write_random(&img, &mut rng, off, 3 * 4096);
    }
    let first_data = truth[0].iter().position(|&b| b != 0).unwrap() as u64 / 4096 * 4096;
    img.write_all_at(&[0u8; 8192], first_data).unwrap();
    store::capture(&st, meta(&ids[1], Some(&ids[0])), &img, &NoProgress).unwrap();
    truth.push(read_all(&img));
    // Inc 2: more writes, one unaligned.
    for _ in 0..6 {
        let off = rng.gen_range(0..SIZE / 4096 - 8) * 4096;
        write_random(&img, &mut rng, off, 5 * 4096);
    }
    write_random(&img, &mut rng, SIZE - 5000, 5000);
    store::capture(&st, meta(&ids[2], Some(&ids[1])), &img, &NoProgress).unwrap();
    truth.push(read_all(&img));
    // Sanity: the pristine store verifies and restores exactly.
    for (i, id) in ids.iter().enumerate() {
        let r = st.verify(id, &NoProgress).unwrap();
        assert!(r.is_ok(), "pristine {id}: {r:?}");
        assert_eq!(
            restore_bytes(&st, dir.path(), id).unwrap(),
            truth[i],
            "pristine {id}"
        );
    }
    Fixture {
        _dir: dir,
        store: store_path,
        ids,
        truth,
    }
}

fn restore_bytes(st: &Store, dir: &Path, id: &SnapshotId) -> Result<Vec<u8>, StoreError> {
    let p = dir.join(format!("restore-{id}-{}", rand::random::<u32>()));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    let res = st.restore(id, &f, RestoreMode::Fresh, &NoProgress);
    let out = res.map(|()| read_all(&f));
    let _ = std::fs::remove_file(&p);
    out
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let t = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &t);
        } else {
            std::fs::copy(e.path(), t).unwrap();
        }
    }
}

fn snap_file(store: &Path, id: &SnapshotId, file: &str) -> PathBuf {
    store.join("snapshots").join(id.as_str()).join(file)
}

/// Parses a delta file with the store's own decoders: (footer, index).
fn parse_delta(bytes: &[u8]) -> (format::Footer, Vec<format::IndexEntry>) {
    let len = bytes.len() as u64;
    let fb = &bytes[bytes.len() - 40..];
    let footer = format::decode_footer(fb, len).unwrap();
    let index = &bytes[footer.index_pos as usize..bytes.len() - 40];
    let entries = format::decode_index(index, fb, &footer, SIZE).unwrap();
    (footer, entries)
}

type Apply = Box<dyn Fn(&Path)>;

struct Case {
    kind: &'static str,
    label: String,
    /// Damage that does not touch any data (strays): restore and verify must be clean.
    harmless: bool,
    apply: Apply,
}

fn edit(path: PathBuf, f: impl Fn(&mut Vec<u8>) + 'static) -> Apply {
    Box::new(move |store: &Path| {
        let p = store.join(&path);
        let mut b = std::fs::read(&p).unwrap();
        f(&mut b);
        std::fs::write(&p, b).unwrap();
    })
}

fn cases(fx: &Fixture) -> Vec<Case> {
    let mut out = Vec::new();
    let mut rng = StdRng::seed_from_u64(0x0bad_c0de);
    for id in &fx.ids {
        let delta = {
            let st = Store::open(&fx.store).unwrap();
            st.manifest(id).unwrap().delta_file
        };
        for file in ["manifest", delta.as_str(), "hashes"] {
            let rel = PathBuf::from("snapshots").join(id.as_str()).join(file);
            let bytes = std::fs::read(snap_file(&fx.store, id, file)).unwrap();
            let len = bytes.len();
            // Bit flips: structural positions plus random ones.
            let mut positions: Vec<usize> = vec![0, 7, 8, 12, 15, 16, 31, len / 2, len - 1];
            if file.starts_with("delta") {
                let (footer, idx) = parse_delta(&bytes);
                let ip = footer.index_pos as usize;
                positions.extend([32, 36, 40, 48, 56, 60, 63, 64, 100]);
                positions.extend([ip - 1, ip, ip + 8, ip + 16, ip + 24, ip + 25, ip + 28]);
                positions.extend([len - 40, len - 32, len - 24, len - 16, len - 6, len - 4]);
                // Every record header's fields, and a byte inside each of three payloads.
                for e in idx.iter().take(3) {
                    let p = e.file_pos as usize;
                    positions.extend([p, p + 4, p + 5, p + 8, p + 16, p + 24, p + 28]);
                    if e.kind == format::RecordKind::Data {
                        positions.push(p + 32 + (e.length as usize) / 2);
                    }
                }
                // First and last byte of every alignment gap (zero bytes no record covers).
                let mut gaps = 0;
                for w in idx.windows(2) {
                    let end = (w[0].file_pos + 32 + w[0].payload_len()) as usize;
                    if (w[1].file_pos as usize) > end {
                        positions.extend([end, w[1].file_pos as usize - 1]);
                        gaps += 1;
                    }
                }
                if *id == fx.ids[0] {
                    assert!(
                        gaps > 0,
                        "the full snapshot's delta should hold an alignment gap"
                    );
                }
                if let Some(z) = idx.iter().find(|e| e.kind == format::RecordKind::Zero) {
                    let p = z.file_pos as usize;
                    positions.extend([p, p + 4, p + 8, p + 16, p + 24]);
                }
            } else if file == "hashes" {
                positions.extend([24, 32, 47, 48, 80, len - 32, len - 33]);
            } else {
                positions.extend([len - 32, len - 33, 20, 40]);
            }
            for _ in 0..10 {
                positions.push(rng.gen_range(0..len));
            }
            positions.sort_unstable();
            positions.dedup();
            for pos in positions.into_iter().filter(|&p| p < len) {
                let bit = rng.gen_range(0..8u8);
                out.push(Case {
                    kind: "bit-flip",
                    label: format!("{id}/{file} byte {pos} bit {bit}"),
                    harmless: false,
                    apply: edit(rel.clone(), move |b| b[pos] ^= 1 << bit),
                });
            }
            // Zeroed 4 KiB block (the whole file when it is smaller).
            for start in [0, len / 2 / 4096 * 4096, len.saturating_sub(4096)] {
                out.push(Case {
                    kind: "zero-4k",
                    label: format!("{id}/{file} at {start}"),
                    harmless: false,
                    apply: edit(rel.clone(), move |b| {
                        let end = (start + 4096).min(b.len());
                        b[start..end].fill(0);
                    }),
                });
            }
            // Truncation.
            let mut lens = vec![0, 1, 16, 32, len / 2, len - 1, len.saturating_sub(40)];
            lens.sort_unstable();
            lens.dedup();
            for l in lens.into_iter().filter(|&l| l < len) {
                out.push(Case {
                    kind: "truncate",
                    label: format!("{id}/{file} to {l}"),
                    harmless: false,
                    apply: edit(rel.clone(), move |b| b.truncate(l)),
                });
            }
            // Appended bytes: one zero, a page of junk, a copy of the last 40 bytes (a footer).
            out.push(Case {
                kind: "append",
                label: format!("{id}/{file} +1 zero"),
                harmless: false,
                apply: edit(rel.clone(), |b| b.push(0)),
            });
            out.push(Case {
                kind: "append",
                label: format!("{id}/{file} +4096 junk"),
                harmless: false,
                apply: edit(rel.clone(), |b| b.extend((0..4096u32).map(|i| i as u8))),
            });
            out.push(Case {
                kind: "append",
                label: format!("{id}/{file} +tail copy"),
                harmless: false,
                apply: edit(rel.clone(), |b| {
                    let t = b[b.len() - 40..].to_vec();
                    b.extend(t)
                }),
            });
            // Deleted file.
            let r2 = rel.clone();
            out.push(Case {
                kind: "delete-file",
                label: format!("{id}/{file}"),
                harmless: false,
                apply: Box::new(move |s: &Path| std::fs::remove_file(s.join(&r2)).unwrap()),
            });
        }
        // Stray extra file in the snapshot's directory.
        let dir = PathBuf::from("snapshots").join(id.as_str());
        for name in ["stray", "delta.7", "manifest.tmp-42"] {
            let d = dir.clone();
            out.push(Case {
                kind: "stray-file",
                label: format!("{id}/{name}"),
                harmless: true,
                apply: Box::new(move |s: &Path| {
                    std::fs::write(s.join(&d).join(name), b"x").unwrap()
                }),
            });
        }
        // Two valid records swapped within the delta.
        let drel = dir.join(&delta);
        let bytes = std::fs::read(fx.store.join(&drel)).unwrap();
        let (footer, idx) = parse_delta(&bytes);
        let data: Vec<_> = idx
            .iter()
            .filter(|e| e.kind == format::RecordKind::Data)
            .copied()
            .collect();
        // (a) Two data records of the same length exchange header+payload: layout stays valid.
        let same = data.iter().enumerate().find_map(|(i, a)| {
            data[i + 1..]
                .iter()
                .find(|b| b.length == a.length)
                .map(|b| (*a, *b))
        });
        if let Some((a, b)) = same {
            out.push(Case {
                kind: "swap-records",
                label: format!("{id} records @{} <-> @{} (whole)", a.offset, b.offset),
                harmless: false,
                apply: edit(drel.clone(), move |buf| swap_ranges(buf, a, b, 0)),
            });
            out.push(Case {
                kind: "swap-records",
                label: format!("{id} records @{} <-> @{} (payload)", a.offset, b.offset),
                harmless: false,
                apply: edit(drel.clone(), move |buf| swap_ranges(buf, a, b, 32)),
            });
        }
        // (b) Any two adjacent records swapped in file order with a rebuilt, self-consistent
        // index (valid footer CRC): a forged layout.
        if idx.len() >= 2 {
            let entries = idx.clone();
            out.push(Case {
                kind: "swap-records",
                label: format!("{id} records 0<->1 reindexed"),
                harmless: false,
                apply: edit(drel.clone(), move |buf| {
                    // Every record (header + payload) re-laid in the new order with the gaps
                    // the format demands, so the layout is valid and only the records' own
                    // checks (offset bound into the CRC) can tell.
                    let rec = |e: &format::IndexEntry| {
                        buf[e.file_pos as usize..(e.file_pos + 32 + e.payload_len()) as usize]
                            .to_vec()
                    };
                    let mut ne = entries.clone();
                    ne.swap(0, 1);
                    let bodies: Vec<Vec<u8>> = ne.iter().map(rec).collect();
                    let mut nb = buf[..32].to_vec();
                    let mut index = Vec::new();
                    for (e, body) in ne.iter_mut().zip(&bodies) {
                        let pos = format::record_pos(
                            format::DELTA_VERSION,
                            nb.len() as u64,
                            e.kind,
                            e.offset,
                            e.length,
                        );
                        nb.resize(pos as usize, 0);
                        e.file_pos = pos;
                        nb.extend(body);
                        index.extend(format::encode_index_entry(e));
                    }
                    let f = format::Footer {
                        record_count: ne.len() as u64,
                        index_pos: nb.len() as u64,
                        payload_bytes: footer.payload_bytes,
                    };
                    nb.extend(&index);
                    nb.extend(format::encode_footer(&f, &index));
                    *buf = nb;
                }),
            });
        }
    }
    // Stray files/dirs in snapshots/.
    out.push(Case {
        kind: "stray-file",
        label: "snapshots/README".into(),
        harmless: true,
        apply: Box::new(|s: &Path| std::fs::write(s.join("snapshots/README"), b"x").unwrap()),
    });
    out.push(Case {
        kind: "stray-file",
        label: "snapshots/ss-zzzzzzzz/ (no manifest)".into(),
        harmless: true,
        apply: Box::new(|s: &Path| {
            std::fs::create_dir_all(s.join("snapshots/ss-zzzzzzzz")).unwrap();
            std::fs::write(s.join("snapshots/ss-zzzzzzzz/delta.0"), b"junk").unwrap();
        }),
    });
    out
}

fn swap_ranges(buf: &mut [u8], a: format::IndexEntry, b: format::IndexEntry, skip: usize) {
    let n = 32 + a.length as usize - skip;
    let pa = a.file_pos as usize + skip;
    let pb = b.file_pos as usize + skip;
    let ta = buf[pa..pa + n].to_vec();
    let tb = buf[pb..pb + n].to_vec();
    buf[pa..pa + n].copy_from_slice(&tb);
    buf[pb..pb + n].copy_from_slice(&ta);
}

#[derive(Default)]
struct Tally {
    cases: usize,
    verify_detected: usize,
    restore_errors: usize,
    restore_ok_correct: usize,
    restore_wrong: usize,
}

/// Runs one case; returns a failure description, or None.
fn run_case(fx: &Fixture, work: &Path, n: usize, case: &Case, t: &mut Tally) -> Option<String> {
    let store_dir = work.join(format!("s{n}"));
    copy_dir(&fx.store, &store_dir);
    (case.apply)(&store_dir);
    let st = match Store::open(&store_dir) {
        Ok(s) => s,
        Err(e) => return Some(format!("Store::open failed: {e}")),
    };
    let mut fail = Vec::new();
    t.cases += 1;
    let leaf = fx.ids.last().unwrap();
    // verify
    let detected = match st.verify(leaf, &NoProgress) {
        Ok(r) if r.is_ok() => {
            if !case.harmless {
                fail.push("verify reported no problem".to_string());
            }
            false
        }
        Ok(r) => {
            for p in &r.problems {
                if !fx.ids.contains(&p.snapshot) {
                    fail.push(format!("verify names foreign snapshot {}", p.snapshot));
                }
                // A manifest that cannot be read gives no volume size: its range is the
                // manifest's own bytes (0..0 for an empty one). Everything else names a
                // non-empty range of the volume image.
                let ok = if p.file == "manifest" {
                    p.start <= p.end && p.end <= SIZE
                } else {
                    p.start < p.end && p.end <= SIZE
                };
                if !ok {
                    fail.push(format!(
                        "verify problem has an empty/outside range {}..{} ({}: {})",
                        p.start, p.end, p.file, p.reason
                    ));
                }
            }
            if case.harmless {
                fail.push(format!("verify flags harmless damage: {:?}", r.problems));
            }
            true
        }
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::Corrupt) => true,
        Err(e) => {
            fail.push(format!(
                "verify failed with unexpected kind {:?}: {e}",
                e.kind()
            ));
            false
        }
    };
    if detected {
        t.verify_detected += 1;
    }
    // restore every snapshot of the chain
    for (i, id) in fx.ids.iter().enumerate() {
        match restore_bytes(&st, work, id) {
            Ok(bytes) if bytes == fx.truth[i] => t.restore_ok_correct += 1,
            Ok(bytes) => {
                t.restore_wrong += 1;
                let first = bytes
                    .iter()
                    .zip(&fx.truth[i])
                    .position(|(a, b)| a != b)
                    .unwrap_or(bytes.len().min(fx.truth[i].len()));
                fail.push(format!(
                    "restore of {id} returned Ok with WRONG data (len {} vs {}, first diff at {first})",
                    bytes.len(),
                    fx.truth[i].len()
                ));
            }
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::Corrupt) => {
                t.restore_errors += 1;
                if case.harmless {
                    fail.push(format!("restore of {id} fails on harmless damage: {e}"));
                }
            }
            Err(e) => fail.push(format!(
                "restore of {id} failed with unexpected kind {:?}: {e}",
                e.kind()
            )),
        }
    }
    if case.harmless {
        // recover() must clean strays inside snapshot dirs and the manifest-less dir.
        match st.recover() {
            Ok(_) => {
                let listed = st.list().map(|l| l.len()).unwrap_or(0);
                if listed != fx.ids.len() {
                    fail.push(format!("after recover, list has {listed} snapshots"));
                }
                for id in &fx.ids {
                    let dir = store_dir.join("snapshots").join(id.as_str());
                    let n = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
                    if n != 3 {
                        fail.push(format!("after recover, {} holds {n} files", dir.display()));
                    }
                }
                if store_dir.join("snapshots/ss-zzzzzzzz").exists() {
                    fail.push("recover left snapshots/ss-zzzzzzzz".into());
                }
            }
            Err(e) => fail.push(format!("recover failed: {e}")),
        }
    }
    let _ = std::fs::remove_dir_all(&store_dir);
    if fail.is_empty() {
        None
    } else {
        Some(fail.join("; "))
    }
}

#[test]
fn every_damage_is_detected_and_restore_never_returns_wrong_data() {
    let fx = build();
    let work = fast_tempdir("bs-matrix-work-");
    let all = cases(&fx);
    let mut tallies: BTreeMap<&'static str, Tally> = BTreeMap::new();
    let mut failures = Vec::new();
    for (n, case) in all.iter().enumerate() {
        let t = tallies.entry(case.kind).or_default();
        if let Some(f) = run_case(&fx, work.path(), n, case, t) {
            failures.push(format!("[{}] {}: {f}", case.kind, case.label));
        }
    }
    eprintln!("corruption matrix ({} cases):", all.len());
    eprintln!(
        "  {:<14} {:>6} {:>16} {:>15} {:>16} {:>11}",
        "kind", "cases", "verify-detected", "restore-errors", "restore-correct", "restore-BAD"
    );
    for (k, t) in &tallies {
        eprintln!(
            "  {:<14} {:>6} {:>16} {:>15} {:>16} {:>11}",
            k, t.cases, t.verify_detected, t.restore_errors, t.restore_ok_correct, t.restore_wrong
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        all.len(),
        failures.join("\n")
    );
}

/// A manifest rewritten with a valid envelope (checksum recomputed) but one field changed: as a
/// software bug or a careless hand edit would leave it. Verify must flag it, and restore must not
/// return wrong data.
type Forge = fn(&mut store::Manifest, &[SnapshotId]);

fn forged_manifest_cases() -> Vec<(&'static str, Forge)> {
    vec![
        ("volume_size +4096", |m, _| m.volume_size += 4096),
        ("volume_size -4096", |m, _| m.volume_size -= 4096),
        ("parent skips a snapshot", |m, ids| {
            m.parent = Some(ids[0].clone())
        }),
        ("delta_len +1", |m, _| m.delta_len += 1),
        ("delta_blake3 changed", |m, _| {
            m.delta_blake3 = "00".repeat(32);
        }),
        ("record_count -1", |m, _| m.record_count -= 1),
        ("block_size 8192", |m, _| m.block_size = 8192),
        ("id of another snapshot", |m, ids| m.id = ids[0].clone()),
    ]
}

#[test]
fn forged_manifests_are_detected() {
    let fx = build();
    let work = fast_tempdir("bs-matrix-forged-");
    let leaf = fx.ids.last().unwrap().clone();
    let mut failures = Vec::new();
    for (n, (label, f)) in forged_manifest_cases().into_iter().enumerate() {
        let store_dir = work.path().join(format!("f{n}"));
        copy_dir(&fx.store, &store_dir);
        let st = Store::open(&store_dir).unwrap();
        let mut m = st.manifest(&leaf).unwrap();
        f(&mut m, &fx.ids);
        let body = serde_json::to_vec_pretty(&m).unwrap();
        std::fs::write(
            snap_file(&store_dir, &leaf, "manifest"),
            format::encode_manifest(&body),
        )
        .unwrap();
        let verified = match st.verify(&leaf, &NoProgress) {
            Ok(r) => !r.is_ok(),
            Err(_) => true,
        };
        let restored = match restore_bytes(&st, work.path(), &leaf) {
            Ok(b) if b == fx.truth[2] => "ok-correct".to_string(),
            Ok(b) => format!("ok-WRONG (len {})", b.len()),
            Err(e) => format!("error {:?}", e.kind()),
        };
        eprintln!("forged manifest [{label}]: verify detected={verified}, restore={restored}");
        if !verified || restored.starts_with("ok-WRONG") {
            failures.push(format!(
                "[{label}] verify detected={verified}, restore={restored}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

//! Runs the fuzz targets (`tests/fuzz_support/targets.rs`, shared with `fuzz/`) as an ordinary
//! test: every file of `tests/fixtures/fuzz/<target>/`, deterministic mutations of each
//! (bit flips, truncations, splices), and seeded random inputs. A panic or an input taking
//! more than 5 s fails the test and names the input.
//!
//! `BLOCKSNAP_LONG=1` runs 20× more mutations. `BLOCKSNAP_WRITE_FUZZ_CORPUS=1 cargo test
//! --test fuzz_corpus write_seed_corpus -- --ignored` regenerates the store seeds from a real
//! capture.

#[path = "fuzz_support/targets.rs"]
mod targets;

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

type Target = fn(&[u8]);

const TARGETS: &[(&str, Target)] = &[
    ("request_parse", targets::request_parse),
    ("nbd_proto", targets::nbd_proto),
    ("store_manifest", targets::store_manifest),
    ("store_records", targets::store_records),
];

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/fuzz")
        .join(target)
}

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(corpus_dir(target))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .map(|e| {
                    (
                        e.file_name().to_string_lossy().into_owned(),
                        std::fs::read(e.path()).unwrap(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn run_one(target: &str, f: Target, label: &str, data: &[u8]) {
    let t = Instant::now();
    let res = std::panic::catch_unwind(|| f(data));
    let took = t.elapsed();
    let hex: String = data.iter().take(256).map(|b| format!("{b:02x}")).collect();
    assert!(
        res.is_ok(),
        "{target} panicked on {label} ({} bytes): {hex}",
        data.len()
    );
    assert!(
        took < Duration::from_secs(5),
        "{target} took {took:?} on {label} ({} bytes): {hex}",
        data.len()
    );
}

fn mutate(rng: &mut StdRng, base: &[u8], others: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut b = base.to_vec();
    for _ in 0..rng.gen_range(1..4) {
        match rng.gen_range(0..6) {
            0 if !b.is_empty() => {
                let i = rng.gen_range(0..b.len());
                b[i] ^= 1 << rng.gen_range(0..8);
            }
            1 if !b.is_empty() => {
                let i = rng.gen_range(0..b.len());
                b[i] = [0, 0xff, 0x7f, 0x80, b'"', b'{', b'9'][rng.gen_range(0..7)];
            }
            2 if !b.is_empty() => {
                let l = rng.gen_range(0..b.len());
                b.truncate(l);
            }
            3 => {
                let n = rng.gen_range(1..64);
                let at = rng.gen_range(0..=b.len());
                let mut junk = vec![0u8; n];
                rng.fill_bytes(&mut junk);
                b.splice(at..at, junk);
            }
            4 if !others.is_empty() => {
                let o = &others[rng.gen_range(0..others.len())].1;
                if !o.is_empty() {
                    let s = rng.gen_range(0..o.len());
                    let e = rng.gen_range(s..=o.len());
                    let at = rng.gen_range(0..=b.len());
                    b.splice(at..at, o[s..e].iter().copied());
                }
            }
            _ if b.len() >= 8 => {
                // Overwrite an aligned 8-byte field with an interesting integer.
                let i = rng.gen_range(0..b.len() / 8) * 8;
                let v: u64 =
                    [0, 1, u64::MAX, u64::MAX / 2, 1 << 32, 1 << 63, 4096, 40][rng.gen_range(0..8)];
                b[i..i + 8].copy_from_slice(&v.to_le_bytes());
            }
            _ => {}
        }
    }
    b
}

fn run_target(name: &str, f: Target) -> usize {
    let files = corpus(name);
    assert!(
        !files.is_empty(),
        "no corpus in {}",
        corpus_dir(name).display()
    );
    let mut n = 0;
    for (label, data) in &files {
        run_one(name, f, label, data);
        n += 1;
    }
    let rounds = if std::env::var("BLOCKSNAP_LONG").as_deref() == Ok("1") {
        4000
    } else {
        200
    };
    let mut rng = StdRng::seed_from_u64(0xf022 ^ name.len() as u64);
    for i in 0..rounds {
        let (label, base) = &files[i % files.len()];
        let m = mutate(&mut rng, base, &files);
        run_one(name, f, &format!("mutation {i} of {label}"), &m);
        n += 1;
    }
    for i in 0..rounds / 4 {
        let len = rng.gen_range(0..512);
        let mut b = vec![0u8; len];
        rng.fill_bytes(&mut b);
        run_one(name, f, &format!("random input {i}"), &b);
        n += 1;
    }
    n
}

#[test]
fn fuzz_request_parse_corpus() {
    eprintln!(
        "request_parse: {} inputs",
        run_target("request_parse", TARGETS[0].1)
    );
}

#[test]
fn fuzz_nbd_proto_corpus() {
    eprintln!(
        "nbd_proto: {} inputs",
        run_target("nbd_proto", TARGETS[1].1)
    );
}

#[test]
fn fuzz_store_manifest_corpus() {
    eprintln!(
        "store_manifest: {} inputs",
        run_target("store_manifest", TARGETS[2].1)
    );
}

#[test]
fn fuzz_store_records_corpus() {
    eprintln!(
        "store_records: {} inputs",
        run_target("store_records", TARGETS[3].1)
    );
}

/// Regenerates the store seeds (manifest, delta, hash file of a small real chain).
#[test]
#[ignore = "writes tests/fixtures/fuzz/store_*; run with BLOCKSNAP_WRITE_FUZZ_CORPUS=1"]
fn write_seed_corpus() {
    if std::env::var("BLOCKSNAP_WRITE_FUZZ_CORPUS").as_deref() != Ok("1") {
        return;
    }
    use blocksnap::store::{capture, NoProgress, SnapshotMeta, Store};
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let st = Store::open(&dir.path().join("store")).unwrap();
    let img = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.path().join("img"))
        .unwrap();
    img.set_len(1 << 20).unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    let mut blk = vec![0u8; 4096];
    for off in [0u64, 8192, 65536, 65536 + 4096, 500_000] {
        rng.fill_bytes(&mut blk);
        img.write_all_at(&blk, off).unwrap();
    }
    let id: blocksnap::api::SnapshotId = "ss-fuzz0001".parse().unwrap();
    let meta = SnapshotMeta {
        id: id.clone(),
        volume_id: "vol-fuzz0001".parse().unwrap(),
        volume_name: "fuzz".into(),
        name: "seed".into(),
        description: String::new(),
        owner: "root".into(),
        parent: None,
        volume_size: 1 << 20,
        block_size: 4096,
        snapshot_time: 0,
        freeze_ms: 0,
        consistency: "crash".into(),
    };
    capture(&st, meta, &img, &NoProgress).unwrap();
    img.write_all_at(&[0u8; 4096], 8192).unwrap();
    let snap = dir.path().join("store/snapshots/ss-fuzz0001");
    let man = corpus_dir("store_manifest");
    let rec = corpus_dir("store_records");
    std::fs::create_dir_all(&man).unwrap();
    std::fs::create_dir_all(&rec).unwrap();
    std::fs::copy(snap.join("manifest"), man.join("seed-manifest")).unwrap();
    std::fs::copy(snap.join("delta.0"), rec.join("seed-delta")).unwrap();
    std::fs::copy(snap.join("hashes"), rec.join("seed-hashes")).unwrap();
}

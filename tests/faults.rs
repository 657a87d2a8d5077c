//! Injected I/O faults (build with `--features failpoints`): every site of
//! `blocksnap::failpoint::SITES` is failed once (`1*return`) and forever (`return`) while a real
//! daemon runs the operations that reach it. Each run checks that the operation fails cleanly
//! with a message naming the site (or, once, succeeds), that the daemon stays up, that nothing
//! partial is listed `available`, and — after a restart without failpoints — that the earlier
//! snapshots still verify and restore byte for byte and the operation now succeeds.
//! Also: a failed fsync of an NBD export poisons it (fsyncgate) until it is re-opened, and a
//! failed freeze-journal write leaves nothing frozen.
//!
//! Without the `failpoints` feature every site is a no-op, so this file is then empty.

#![cfg(feature = "failpoints")]

mod common;

use common::{have_tool, root_or_skip, sh, Daemon, Mount};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

const ONCE: &str = "1*return";
/// Sites whose failure the operation survives by design (it is logged): the tracking base
/// marker (without it the next NBD snapshot reads the whole volume: slower, never wrong).
const TOLERATED: &[&str] = &["nbd.cbt-base.rename"];
const FOREVER: &str = "return";

/// What one operation did.
#[derive(Debug)]
struct Outcome {
    ok: bool,
    message: String,
    /// The new snapshot or volume id the operation named, if any.
    id: Option<String>,
}

/// Runs a verb; when it starts a job, waits for it. A refusal and a failed job are both
/// failures (with their message).
fn attempt(d: &Daemon, args: &[&str]) -> Outcome {
    let v = d.call(args);
    let id = v["snapshots"][0]
        .as_str()
        .or(v["volumes"][0].as_str())
        .or(v["volume_id"].as_str())
        .map(str::to_string);
    if v["ret_code"] != 0 {
        let message = v["message"].as_str().unwrap_or_default().to_string();
        assert!(
            !message.is_empty(),
            "{args:?}: failure without a message: {v}"
        );
        return Outcome {
            ok: false,
            message,
            id,
        };
    }
    let Some(job) = v["job_id"].as_str() else {
        return Outcome {
            ok: true,
            message: String::new(),
            id,
        };
    };
    let j = d.wait_job(job);
    let ok = j["status"] == "successful";
    let message = j["error"].as_str().unwrap_or_default().to_string();
    assert!(
        ok || !message.is_empty(),
        "{args:?}: job failed without a message: {j}"
    );
    Outcome { ok, message, id }
}

/// Writes a deterministic pattern (`seed`) at a few offsets of an image and syncs it.
fn scribble(image: &Path, seed: u8) {
    let f = std::fs::OpenOptions::new().write(true).open(image).unwrap();
    for k in 0..3u64 {
        let off = (u64::from(seed) * 7 + k * 5) % 15 * (1 << 20) + k * 4096;
        let buf: Vec<u8> = (0..65536u32)
            .map(|i| (i as u8) ^ seed.wrapping_mul(31) ^ (k as u8))
            .collect();
        f.write_all_at(&buf, off).unwrap();
    }
    f.sync_all().unwrap();
}

/// `qemu-io` commands against a URI; returns (all succeeded, output).
fn qemu_io(uri: &str, cmds: &[&str]) -> (bool, String) {
    let mut c = Command::new("timeout");
    c.args(["60", "qemu-io", "-f", "raw"]);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    let out = c.arg(uri).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let failed = !out.status.success() || text.contains("failed") || text.contains("error");
    (!failed, text)
}

/// The operations a site is reached by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    CreateVolume,
    ResizeVolume,
    DeleteVolume,
    SnapshotFull,
    SnapshotIncremental,
    FromSnapshot,
    Apply,
    Verify,
    DeleteMiddle,
    NbdWrite,
    NbdFlush,
    NbdSnapshot,
    LazyRestore,
}

fn ops_for(site: &str) -> Vec<Op> {
    use Op::*;
    let store_writes = vec![SnapshotFull, SnapshotIncremental, DeleteMiddle];
    match site {
        "store.blob.create" | "store.blob.write" | "store.blob.fsync" | "store.blob.rename"
        | "store.dir.fsync" => store_writes,
        "store.delete" => vec![DeleteMiddle],
        "volume.image.create" => vec![CreateVolume, FromSnapshot],
        "volume.image.resize" => vec![ResizeVolume, Apply],
        "volume.image.fsync" => vec![CreateVolume, ResizeVolume, FromSnapshot, Apply],
        "volume.dir.fsync" => vec![CreateVolume, FromSnapshot, DeleteVolume],
        "catalog.volume.write" => vec![CreateVolume, ResizeVolume, SnapshotFull, Apply],
        "catalog.snapshot.write" => vec![SnapshotFull, SnapshotIncremental, DeleteMiddle],
        "catalog.job.write" => vec![SnapshotFull, Verify, FromSnapshot],
        "nbd.export.write" => vec![NbdWrite],
        "nbd.export.fsync" => vec![NbdFlush, NbdSnapshot],
        "nbd.cbt.write" | "nbd.cbt.fsync" => vec![NbdWrite, NbdSnapshot],
        "nbd.cbt-base.rename" => vec![NbdSnapshot],
        "restore.target.write" | "restore.target.fsync" => vec![FromSnapshot, Apply],
        "nbd.hydration-map.write" | "nbd.hydration-map.fsync" | "lazy.marker.write" => {
            vec![LazyRestore]
        }
        other => panic!("no operation known to reach failpoint {other}: add one"),
    }
}

/// Modes that let the first hit pass, for sites whose later hits take another path.
fn later_hits(site: &str) -> &'static [&'static str] {
    match site {
        // The job is accepted; marking it working and recording its result fail.
        "catalog.job.write" => &["1*off->return"],
        _ => &[],
    }
}

fn needs_nbd(site: &str) -> bool {
    ops_for(site)
        .iter()
        .any(|o| matches!(o, Op::NbdWrite | Op::NbdFlush | Op::NbdSnapshot))
}

/// A daemon with a loop volume `a` holding a chain S1 <- S2 <- S3 whose images are known,
/// and optionally an attached NBD volume.
struct Fixture {
    d: Daemon,
    a: String,
    /// snapshot id -> sha256 of the volume image it captured
    golden: BTreeMap<String, String>,
    chain: Vec<String>,
    nbd: Option<(String, String)>,
    seed: u8,
    /// Volumes made by successful operations (candidates for DeleteVolume).
    made_volumes: Vec<String>,
}

impl Fixture {
    fn new(with_nbd: bool) -> Fixture {
        let d = Daemon::start("");
        let a = d.volume("16M", "a");
        let mut golden = BTreeMap::new();
        let mut chain = Vec::new();
        for (i, full) in [true, false, false].into_iter().enumerate() {
            scribble(&d.image(&a), i as u8 + 1);
            let v = d.job(&[
                "create-snapshots",
                "-r",
                &a,
                "-F",
                if full { "1" } else { "0" },
            ]);
            let id = v["snapshots"][0].as_str().unwrap().to_string();
            golden.insert(id.clone(), common::sha256(&d.image(&a)));
            chain.push(id);
        }
        let nbd = with_nbd.then(|| {
            let v = d.job(&["create-volumes", "-s", "16M", "-N", "n", "--backend", "nbd"]);
            let n = v["volumes"][0].as_str().unwrap().to_string();
            d.ok(&["attach-volumes", "-v", &n]);
            let uri = d.describe_volume(&n)["device"]
                .as_str()
                .unwrap()
                .to_string();
            let (ok, out) = qemu_io(&uri, &["write -P 0x5a 0 1M", "flush"]);
            assert!(ok, "baseline NBD write: {out}");
            d.job(&["create-snapshots", "-r", &n, "-F", "1"]);
            (n, uri)
        });
        // One to delete even when creating volumes fails.
        let spare = d.volume("8M", "spare");
        Fixture {
            d,
            a,
            golden,
            chain,
            nbd,
            seed: 10,
            made_volumes: vec![spare],
        }
    }

    fn run(&mut self, op: Op) -> Outcome {
        let d = &self.d;
        let a = self.a.clone();
        let out = match op {
            Op::CreateVolume => attempt(d, &["create-volumes", "-s", "8M", "-N", "new"]),
            Op::ResizeVolume => {
                let size = format!("{}M", 16 + u32::from(self.seed));
                self.seed += 1;
                attempt(d, &["resize-volumes", "-v", &a, "-s", &size])
            }
            Op::DeleteVolume => {
                let v = self.made_volumes.pop().unwrap();
                let out = attempt(&self.d, &["delete-volumes", "-v", &v]);
                if !out.ok {
                    self.made_volumes.push(v);
                }
                out
            }
            Op::SnapshotFull | Op::SnapshotIncremental => {
                self.seed += 1;
                scribble(&d.image(&a), self.seed);
                let full = if op == Op::SnapshotFull { "1" } else { "0" };
                attempt(d, &["create-snapshots", "-r", &a, "-F", full])
            }
            Op::FromSnapshot => attempt(d, &["create-volume-from-snapshot", "-s", &self.chain[2]]),
            Op::Apply => attempt(d, &["apply-snapshots", "-s", &self.chain[0]]),
            Op::Verify => attempt(d, &["verify-snapshots", "-s", &self.chain.join(",")]),
            Op::DeleteMiddle => attempt(d, &["delete-snapshots", "-s", &self.chain[1]]),
            Op::NbdWrite | Op::NbdFlush => {
                let (_, uri) = self.nbd.as_ref().unwrap();
                self.seed += 1;
                // A new 1 MiB region each time, so the write-intent bitmap is written too.
                let w = format!("write -P {} {}M 64k", self.seed, 2 + self.seed % 12);
                let cmds: Vec<&str> = if op == Op::NbdWrite {
                    vec![w.as_str()]
                } else {
                    vec![w.as_str(), "flush"]
                };
                let (ok, text) = qemu_io(uri, &cmds);
                Outcome {
                    ok,
                    message: text,
                    id: None,
                }
            }
            Op::NbdSnapshot => {
                let (n, uri) = self.nbd.clone().unwrap();
                self.seed += 1;
                let w = format!("write -P {} {}M 64k", self.seed, 2 + self.seed % 12);
                // The write may fail at the site too; the snapshot is the operation tested.
                let _ = qemu_io(&uri, &[&w]);
                attempt(d, &["create-snapshots", "-r", &n, "-F", "0"])
            }
            Op::LazyRestore => attempt(
                d,
                &[
                    "create-volume-from-snapshot",
                    "-s",
                    &self.chain[2],
                    "--lazy",
                ],
            ),
        };
        if out.ok {
            match op {
                Op::DeleteMiddle => {
                    let gone = self.chain[1].clone();
                    self.golden.remove(&gone);
                    // Another middle for the next delete: a fresh chain S1' <- S2' <- S3'.
                    self.rebuild_chain();
                }
                Op::CreateVolume => self.made_volumes.extend(out.id.clone()),
                Op::FromSnapshot | Op::LazyRestore => {
                    let v = out.id.clone().unwrap();
                    assert_eq!(
                        common::sha256(&self.d.image(&v)),
                        self.golden[&self.chain[2]],
                        "restored volume {v} differs from its snapshot"
                    );
                    self.made_volumes.push(v);
                }
                _ => {}
            }
        }
        out
    }

    /// A new chain of three snapshots of `a` (after a successful middle delete).
    fn rebuild_chain(&mut self) {
        let mut chain = Vec::new();
        for full in [true, false, false] {
            self.seed += 1;
            scribble(&self.d.image(&self.a), self.seed);
            let v = self.d.job(&[
                "create-snapshots",
                "-r",
                &self.a,
                "-F",
                if full { "1" } else { "0" },
            ]);
            let id = v["snapshots"][0].as_str().unwrap().to_string();
            self.golden
                .insert(id.clone(), common::sha256(&self.d.image(&self.a)));
            chain.push(id);
        }
        self.chain = chain;
    }

    fn snapshots(&self) -> Vec<Value> {
        self.d.ok(&["describe-snapshots", "--limit", "1000"])["snapshot_set"]
            .as_array()
            .unwrap()
            .clone()
    }

    /// Daemon up and answering; no snapshot that did not complete is `available`; with no job
    /// running, nothing is left `pending` (unless the site is the very write that would
    /// clean it up).
    fn check_consistent(&mut self, site: &str, failed_snapshots: &BTreeSet<String>, ctx: &str) {
        assert!(
            self.d.exited().is_none(),
            "{ctx}: daemon exited: {}",
            self.d.log()
        );
        // Jobs resumed or failed by recovery end first.
        for j in self.d.ok(&["describe-jobs"])["job_set"].as_array().unwrap() {
            self.d.wait_job(j["job_id"].as_str().unwrap());
        }
        for s in self.snapshots() {
            let id = s["snapshot_id"].as_str().unwrap();
            if failed_snapshots.contains(id) {
                assert_ne!(
                    s["status"], "available",
                    "{ctx}: failed snapshot listed: {s}"
                );
            }
            if site != "catalog.snapshot.write" {
                assert_ne!(s["status"], "pending", "{ctx}: snapshot left pending: {s}");
            }
        }
        if site != "catalog.volume.write" {
            for v in self.d.ok(&["describe-volumes", "--limit", "1000"])["volume_set"]
                .as_array()
                .unwrap()
            {
                assert_ne!(v["status"], "pending", "{ctx}: volume left pending: {v}");
            }
        }
    }

    /// After a restart without failpoints: every snapshot is settled, every available one
    /// verifies, and the known ones restore byte for byte.
    fn check_after_heal(&mut self, ctx: &str) {
        if self.nbd.is_some() {
            // The change tracking survived the faults: a new incremental restores to exactly
            // what the export holds (no block written under a failed bitmap write is missed).
            let out = self.run(Op::NbdSnapshot);
            assert!(out.ok, "{ctx}: NBD snapshot after healing: {}", out.message);
            let (n, _) = self.nbd.clone().unwrap();
            let v = self.d.job(&[
                "create-volume-from-snapshot",
                "-s",
                out.id.as_deref().unwrap(),
            ]);
            let vol = v["volume_id"].as_str().unwrap().to_string();
            assert_eq!(
                common::sha256(&self.d.image(&vol)),
                common::sha256(&self.d.image(&n)),
                "{ctx}: the NBD volume's new snapshot does not restore to its content"
            );
            self.d.ok(&["delete-volumes", "-v", &vol]);
        }
        let d = &self.d;
        // Jobs resumed or failed by recovery end.
        for j in d.ok(&["describe-jobs"])["job_set"].as_array().unwrap() {
            d.wait_job(j["job_id"].as_str().unwrap());
        }
        let mut available = Vec::new();
        for s in self.snapshots() {
            let id = s["snapshot_id"].as_str().unwrap().to_string();
            match s["status"].as_str().unwrap() {
                "available" => available.push(id),
                "deleted" => {}
                other => panic!("{ctx}: snapshot {id} left {other} after a restart: {s}"),
            }
        }
        for id in self.golden.keys() {
            assert!(available.contains(id), "{ctx}: snapshot {id} lost");
        }
        let v = attempt(d, &["verify-snapshots", "-s", &available.join(",")]);
        assert!(v.ok, "{ctx}: verify after the fault: {}", v.message);
        for id in [&self.chain[0], &self.chain[2]] {
            let v = d.job(&["create-volume-from-snapshot", "-s", id]);
            let vol = v["volume_id"].as_str().unwrap().to_string();
            assert_eq!(
                common::sha256(&d.image(&vol)),
                self.golden[id],
                "{ctx}: snapshot {id} no longer restores identically"
            );
            d.ok(&["delete-volumes", "-v", &vol]);
        }
    }
}

/// Fails `site` with `mode` during the operations that reach it; returns whether the site was
/// shown to be reached (an operation failed naming it, or an NBD operation failed with it and
/// succeeds without it).
fn exercise(site: &str, mode: &str) -> bool {
    let ctx = format!("{site}={mode}");
    let ops = ops_for(site);
    let mut f = Fixture::new(needs_nbd(site));
    f.d.failpoints = format!("{site}={mode}");
    f.d.restart();
    let mut failed = Vec::new();
    let mut failed_snapshots = BTreeSet::new();
    let mut reached = false;
    for &op in &ops {
        let out = f.run(op);
        eprintln!(
            "{ctx}: {op:?}: {}",
            if out.ok { "ok" } else { out.message.trim() }
        );
        if !out.ok {
            let nbd_client = matches!(op, Op::NbdWrite | Op::NbdFlush);
            if nbd_client {
                // The client sees an errno only; reached is decided by the rerun below.
                assert!(
                    out.message.contains("Input/output error") || out.message.contains("failed"),
                    "{ctx}: {op:?}: unexpected client failure: {}",
                    out.message
                );
            } else {
                assert!(
                    out.message.contains(&format!("failpoint {site}")),
                    "{ctx}: {op:?} failed without naming the site: {}",
                    out.message
                );
                reached = true;
            }
            if matches!(
                op,
                Op::SnapshotFull | Op::SnapshotIncremental | Op::NbdSnapshot
            ) {
                failed_snapshots.extend(out.id.clone());
            }
            failed.push((op, nbd_client));
        }
        f.check_consistent(site, &failed_snapshots, &format!("{ctx} after {op:?}"));
    }
    if TOLERATED.contains(&site) {
        assert!(
            failed.is_empty(),
            "{ctx}: a tolerated failure failed {failed:?}"
        );
    } else if mode == FOREVER {
        assert!(
            !failed.is_empty(),
            "{ctx}: no operation failed: site not reached by {ops:?}"
        );
    }
    // A site that only logs (the tracking base marker): the log names it.
    if f.d.log().contains(&format!("failpoint {site}")) {
        reached = true;
    }
    f.d.failpoints.clear();
    f.d.restart();
    f.check_consistent(site, &failed_snapshots, &format!("{ctx} after restart"));
    for (op, nbd_client) in &failed {
        if *op == Op::DeleteMiddle {
            let middle = f.chain[1].clone();
            let still = f
                .snapshots()
                .iter()
                .any(|s| s["snapshot_id"] == middle.as_str() && s["status"] == "available");
            if !still {
                // The delete's intent was durable: recovery finished it at the restart.
                eprintln!("{ctx}: the failed delete of {middle} was completed by recovery");
                f.golden.remove(&middle);
                f.rebuild_chain();
                continue;
            }
        }
        let out = f.run(*op);
        assert!(
            out.ok,
            "{ctx}: {op:?} still fails without the failpoint: {}\n{}",
            out.message,
            f.d.log()
        );
        if *nbd_client {
            reached = true;
        }
    }
    f.check_after_heal(&ctx);
    reached
}

fn sites_with_prefix(prefixes: &[&str]) -> Vec<&'static str> {
    blocksnap::failpoint::SITES
        .iter()
        .copied()
        .filter(|s| prefixes.iter().any(|p| s.starts_with(p)))
        .filter(|s| *s != "catalog.frozen.write")
        .collect()
}

fn matrix(test: &str, prefixes: &[&str]) {
    if !root_or_skip(test) {
        return;
    }
    let mut unreached = Vec::new();
    for site in sites_with_prefix(prefixes) {
        if needs_nbd(site) && !have_tool("qemu-io") {
            eprintln!("SKIPPED {site}: needs qemu-io");
            continue;
        }
        let forever = exercise(site, FOREVER);
        let once = exercise(site, ONCE);
        eprintln!("SITE {site}: reached forever={forever} once={once}");
        for mode in later_hits(site) {
            let reached = exercise(site, mode);
            eprintln!("SITE {site}: reached {mode}={reached}");
            assert!(reached, "{site}={mode}: not reached");
        }
        if !forever {
            unreached.push(site);
        }
    }
    assert!(
        unreached.is_empty(),
        "sites no operation reached: {unreached:?}"
    );
}

#[test]
fn every_site_is_covered_by_a_test() {
    for site in blocksnap::failpoint::SITES {
        if *site == "catalog.frozen.write" {
            continue; // failed_freeze_journal_write_leaves_nothing_frozen
        }
        let _ = ops_for(site); // panics for a site no operation is known to reach
        let groups = ["store.", "restore.", "volume.", "catalog.", "nbd.", "lazy."];
        assert!(
            groups.iter().any(|g| site.starts_with(g)),
            "{site} belongs to no test group"
        );
    }
}

#[test]
fn store_sites() {
    matrix("store_sites", &["store.", "restore."]);
}

#[test]
fn volume_and_catalog_sites() {
    matrix("volume_and_catalog_sites", &["volume.", "catalog."]);
}

#[test]
fn nbd_and_lazy_sites() {
    matrix("nbd_and_lazy_sites", &["nbd.", "lazy."]);
}

/// An attached 16M NBD volume holding 1 MiB of 0x11 at offset 0, and a full snapshot of it:
/// (volume id, NBD URI, snapshot id).
fn nbd_volume_with_full(d: &Daemon) -> (String, String, String) {
    let (n, uri) = d.nbd_volume("16M");
    let (ok, out) = qemu_io(&uri, &["write -P 0x11 0 1M"]);
    assert!(ok, "{out}");
    let s1 = d.snapshot(&n, true)["snapshot_id"]
        .as_str()
        .expect("snapshot id")
        .to_string();
    (n, uri, s1)
}

/// A rollback rewrites the image behind the change tracking, so the tracking base must be
/// gone before the first byte changes: a daemon killed in the middle of the rewrite (whose
/// resumed job may then fail) must not leave a base the next snapshot would trust.
#[test]
fn rollback_forgets_change_tracking_before_rewriting_the_image() {
    if !root_or_skip("rollback_forgets_change_tracking_before_rewriting_the_image")
        || !have_tool("qemu-io")
    {
        return;
    }
    let mut d = Daemon::start("");
    let (n, uri, s1) = nbd_volume_with_full(&d);
    let (ok, out) = qemu_io(&uri, &["write -P 0x22 4M 1M"]);
    assert!(ok, "{out}");
    let base = d.state_dir.join("volumes").join(format!("{n}.cbt-base"));
    assert!(base.exists(), "no tracking base after a snapshot");
    d.ok(&["detach-volumes", "-v", &n]);
    // Killed at the first write of the rollback into the image.
    d.failpoints = "restore.target.write=return(kill)".into();
    d.restart();
    let apply = d.call(&["apply-snapshots", "-s", &s1]);
    let apply = apply["job_id"]
        .as_str()
        .unwrap_or_else(|| panic!("apply-snapshots started no job: {apply}"))
        .to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while d.exited().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon was not killed"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        !base.exists(),
        "the tracking base outlived the start of the rollback"
    );
    // The resumed rollback completes; the next snapshot is an incremental on s1 that
    // verifies.
    d.failpoints.clear();
    d.kill9();
    d.spawn();
    let j = d.wait_job(&apply);
    assert_eq!(j["status"], "successful", "{j}");
    d.ok(&["attach-volumes", "-v", &n]);
    let (ok, out) = qemu_io(&uri, &["read -P 0x11 0 1M", "read -P 0 4M 1M"]);
    assert!(ok, "the rolled-back image is not the snapshot's: {out}");
    let s2 = d.snapshot(&n, false);
    assert_eq!(s2["parent_id"], s1.as_str(), "{s2}");
    d.job(&[
        "verify-snapshots",
        "-s",
        s2["snapshot_id"].as_str().expect("id"),
    ]);
}

/// A snapshot whose tracking base cannot be recorded removes the old base: a base naming an
/// older snapshot must not outlive the bitmap generation it described (a bitmap made anew
/// restarts its generations and could match it again). The next snapshot rescans and verifies.
#[test]
fn a_failed_tracking_base_write_leaves_no_stale_base() {
    if !root_or_skip("a_failed_tracking_base_write_leaves_no_stale_base") || !have_tool("qemu-io") {
        return;
    }
    let mut d = Daemon::start("");
    let (n, uri, s1) = nbd_volume_with_full(&d);
    let base = d.state_dir.join("volumes").join(format!("{n}.cbt-base"));
    let recorded = std::fs::read_to_string(&base).expect("a tracking base after a snapshot");
    assert!(recorded.contains(&s1), "{recorded}");
    d.ok(&["detach-volumes", "-v", &n]);
    d.failpoints = "nbd.cbt-base.rename=return".into();
    d.restart();
    d.ok(&["attach-volumes", "-v", &n]);
    let (ok, out) = qemu_io(&uri, &["write -P 0x22 4M 1M"]);
    assert!(ok, "{out}");
    // The snapshot itself succeeds (the base only saves a rescan); the old base is gone.
    let s2 = d.snapshot(&n, false);
    assert_eq!(s2["parent_id"], s1.as_str(), "{s2}");
    assert!(
        !base.exists(),
        "a stale tracking base survived a failed base write: {:?}",
        std::fs::read_to_string(&base)
    );
    d.ok(&["detach-volumes", "-v", &n]);
    d.failpoints.clear();
    d.restart();
    d.ok(&["attach-volumes", "-v", &n]);
    let (ok, out) = qemu_io(&uri, &["write -P 0x33 8M 1M"]);
    assert!(ok, "{out}");
    let s3 = d.snapshot(&n, false);
    d.job(&[
        "verify-snapshots",
        "-s",
        s3["snapshot_id"].as_str().expect("id"),
    ]);
    assert!(base.exists(), "no tracking base after a good snapshot");
}

/// fsyncgate: once an fsync of an NBD export failed, no later FLUSH or FUA write of it may
/// succeed (the kernel may have dropped the pages), nor a snapshot of the volume, until the
/// export is re-opened (detach + attach).
#[test]
fn failed_nbd_fsync_poisons_the_export_until_reopened() {
    if !root_or_skip("failed_nbd_fsync_poisons_the_export_until_reopened") || !have_tool("qemu-io")
    {
        return;
    }
    let mut d = Daemon::start("");
    let n = d.job(&["create-volumes", "-s", "16M", "--backend", "nbd"])["volumes"][0]
        .as_str()
        .unwrap()
        .to_string();
    let base = d.job(&["create-snapshots", "-r", &n, "-F", "1"])["snapshots"][0]
        .as_str()
        .unwrap()
        .to_string();
    d.failpoints = "nbd.export.fsync=1*return".into();
    d.restart();
    d.ok(&["attach-volumes", "-v", &n]);
    let uri = d.describe_volume(&n)["device"]
        .as_str()
        .unwrap()
        .to_string();
    let (ok, out) = qemu_io(&uri, &["write -P 0x11 0 64k", "flush"]);
    assert!(!ok, "the injected fsync failure was not reported: {out}");
    // The failpoint is spent: a later fsync would succeed, and must not be believed.
    let (ok, out) = qemu_io(&uri, &["flush"]);
    assert!(!ok, "a flush after a failed fsync reported success: {out}");
    let (ok, out) = qemu_io(&uri, &["write -f -P 0x22 1M 4k"]);
    assert!(
        !ok,
        "a FUA write after a failed fsync reported success: {out}"
    );
    let s = attempt(&d, &["create-snapshots", "-r", &n]);
    assert!(!s.ok, "a snapshot of a poisoned export was taken");
    assert!(
        s.message.contains("earlier fsync"),
        "the snapshot's failure does not say why: {}",
        s.message
    );
    let sid = s.id.unwrap();
    assert_ne!(d.describe_snapshot(&sid)["status"], "available");
    assert!(d.exited().is_none(), "daemon exited");
    // Re-opening the export (detach + attach) clears it.
    d.ok(&["detach-volumes", "-v", &n]);
    d.ok(&["attach-volumes", "-v", &n]);
    let (ok, out) = qemu_io(
        &uri,
        &["write -P 0x33 0 64k", "flush", "write -f -P 0x44 1M 4k"],
    );
    assert!(ok, "the re-opened export still fails: {out}");
    let s = attempt(&d, &["create-snapshots", "-r", &n]);
    assert!(s.ok, "snapshot after re-opening: {}", s.message);
    d.job(&[
        "verify-snapshots",
        "-s",
        &format!("{base},{}", s.id.unwrap()),
    ]);
}

/// The freeze journal (`catalog.frozen.write`) of a mounted loop volume: failing the record
/// before the freeze fails the snapshot with nothing frozen; failing the clear after the thaw
/// leaves the filesystem thawed (and the next start clears the row).
#[test]
fn failed_freeze_journal_write_leaves_nothing_frozen() {
    if !root_or_skip("failed_freeze_journal_write_leaves_nothing_frozen") || !have_tool("mkfs.ext4")
    {
        return;
    }
    let site = "catalog.frozen.write";
    let mut d = Daemon::start("");
    let vol = d.volume("64M", "fs");
    let dev = d.attach(&vol);
    sh(&format!("mkfs.ext4 -q -F {}", dev.display()));
    let mnt = Mount::new(&dev, &d.dir.path().join("mnt"));
    let m = mnt.target.display().to_string();
    let writable = |what: &str| {
        let ok = Command::new("timeout")
            .args(["5", "sh", "-c"])
            .arg(format!("echo '{what}' > {m}/probe && sync -f {m}/probe"))
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "{what}: the filesystem is not writable (left frozen?)");
    };
    let first = d.job(&["create-snapshots", "-r", &vol, "-F", "1"])["snapshots"][0]
        .as_str()
        .unwrap()
        .to_string();
    let mut reached = false;
    for mode in [FOREVER, ONCE, "1*off->1*return"] {
        d.failpoints = format!("{site}={mode}");
        d.restart();
        let log_before = d.log().len();
        sh(&format!("echo '{mode}' > {m}/data && sync -f {m}/data"));
        let s = attempt(&d, &["create-snapshots", "-r", &vol]);
        eprintln!("{site}={mode}: {s:?}");
        if !s.ok {
            assert!(
                s.message.contains(&format!("failpoint {site}")),
                "{}",
                s.message
            );
            reached = true;
            assert_ne!(
                d.describe_snapshot(s.id.as_deref().unwrap())["status"],
                "available"
            );
        } else if d.log()[log_before..].contains(&format!("failpoint {site}")) {
            reached = true; // the clear after the thaw failed; logged
        }
        assert!(d.exited().is_none(), "daemon exited");
        writable(mode);
        d.failpoints.clear();
        d.restart();
        writable(mode);
        let s = attempt(&d, &["create-snapshots", "-r", &vol]);
        assert!(s.ok, "{site}={mode}: snapshot after healing: {}", s.message);
        writable(mode);
    }
    assert!(reached, "{site} was never reached");
    d.job(&["verify-snapshots", "-s", &first]);
    drop(mnt);
}

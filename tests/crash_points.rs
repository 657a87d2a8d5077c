//! SIGKILL of the daemon at many randomized points of its long operations, with the
//! invariants checked after every restart.
//!
//! A round picks an operation (create-snapshots full or incremental, of a detached volume or
//! of a mounted ext4 that gets frozen; create-volume-from-snapshot; apply-snapshots;
//! delete-snapshots, often of a snapshot in the middle of a chain so that it is folded into
//! its child; verify-snapshots), arms a crash and runs it:
//!
//! - exact points: the daemon starts with `FAILPOINTS="<site>=<N>*off->return(kill)"` for a
//!   random store site and a random `N`, and kills itself at that hit (a run that ends
//!   without reaching it counts as "not hit");
//! - timed points: the test SIGKILLs the daemon after a random delay within the operation's
//!   measured duration (a kill after the job ended counts as "not hit").
//!
//! After the restart: no filesystem is frozen; every job ends within a bound; every snapshot
//! that was `available` before is still listed and `available` (but the one being deleted)
//! and restores byte-identically; nothing partial is listed; no loop device leaked; no
//! temporary or stale file is left in the store or the state dir; and the interrupted
//! operation, retried, succeeds.
//!
//! The seed is printed and can be set with `BLOCKSNAP_CRASH_SEED`; the number of crash
//! points with `BLOCKSNAP_CRASH_POINTS` (default 200, 2,000 with `BLOCKSNAP_LONG=1`).

mod common;

use common::{root_or_skip, sh, writable, Daemon, Mount};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// How long any job may take to end after a restart before the test calls it hung.
const JOB_BOUND: Duration = Duration::from_secs(60);
const VOLUME_BYTES: u64 = 16 << 20;
/// Snapshots per volume kept at most (the daemon's quota is 15).
const MAX_PER_VOLUME: usize = 8;

/// splitmix64: small, seedable, good enough to pick crash points.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// The state dir: on an xfs with reflink (captures go through a reflink clone in the state
/// dir's `tmp/`, as on a production host that has one) over a loop device on tmpfs (fast
/// fsyncs); on plain tmpfs with `BLOCKSNAP_CRASH_STATE_FS=tmpfs` or without mkfs.xfs.
/// Unmounted, detached and removed when dropped.
struct StateDir {
    dir: tempfile::TempDir,
    device: Option<String>,
}

impl StateDir {
    fn new() -> StateDir {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = tempfile::Builder::new()
            .prefix("blocksnap-crash-")
            .tempdir_in(base)
            .expect("tempdir");
        let mut s = StateDir { dir, device: None };
        let want_xfs = std::env::var("BLOCKSNAP_CRASH_STATE_FS").as_deref() != Ok("tmpfs");
        if want_xfs && common::have_tool("mkfs.xfs") {
            let image = s.dir.path().join("fs.img");
            sh(&format!("truncate -s 1G {}", image.display()));
            sh(&format!("mkfs.xfs -q -m reflink=1 {}", image.display()));
            let dev = sh(&format!("losetup -f --show {}", image.display()))
                .trim()
                .to_string();
            s.device = Some(dev.clone());
            std::fs::create_dir_all(s.mnt()).expect("mkdir");
            sh(&format!("mount {dev} {}", s.mnt().display()));
        }
        s
    }

    fn mnt(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }

    fn state(&self) -> PathBuf {
        match self.device {
            Some(_) => self.mnt().join("state"),
            None => self.dir.path().join("state"),
        }
    }

    fn kind(&self) -> &'static str {
        match self.device {
            Some(_) => "xfs (reflink) on tmpfs",
            None => "tmpfs",
        }
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        if let Some(dev) = self.device.take() {
            let mnt = self.mnt();
            let ok = Command::new("umount")
                .arg(&mnt)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&mnt).status();
            }
            let _ = Command::new("losetup").args(["-d", &dev]).status();
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    Create { volume: String, full: bool },
    FromSnapshot { snapshot: String },
    Apply { snapshot: String },
    Delete { snapshot: String, middle: bool },
    Verify { snapshots: Vec<String> },
}

impl Op {
    fn name(&self) -> &'static str {
        match self {
            Op::Create { full: true, .. } => "create-full",
            Op::Create { full: false, .. } => "create-incremental",
            Op::FromSnapshot { .. } => "create-volume-from-snapshot",
            Op::Apply { .. } => "apply-snapshots",
            Op::Delete { middle: true, .. } => "delete-middle (fold)",
            Op::Delete { middle: false, .. } => "delete-snapshots",
            Op::Verify { .. } => "verify-snapshots",
        }
    }
    fn args(&self) -> Vec<String> {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        match self {
            Op::Create { volume, full } => s(&[
                "create-snapshots",
                "-r",
                volume,
                "-F",
                if *full { "1" } else { "0" },
            ]),
            Op::FromSnapshot { snapshot } => s(&["create-volume-from-snapshot", "-s", snapshot]),
            Op::Apply { snapshot } => s(&["apply-snapshots", "-s", snapshot]),
            Op::Delete { snapshot, .. } => s(&["delete-snapshots", "-s", snapshot]),
            Op::Verify { snapshots } => {
                let mut a = s(&["verify-snapshots"]);
                for id in snapshots {
                    a.push("-s".into());
                    a.push(id.clone());
                }
                a
            }
        }
    }
}

#[derive(Default, Clone, Copy)]
struct Count {
    rounds: u64,
    hit: u64,
    survived: u64,
}

/// The test's model of what must hold.
struct World {
    d: Daemon,
    _state: StateDir,
    /// The detached volume whose image the test writes directly (exact sha256 known).
    raw: String,
    /// sha256 of `raw`'s image as it is now.
    raw_sha: String,
    /// The volume with a mounted ext4 (frozen by every snapshot of it).
    fs_vol: String,
    fs_dev: PathBuf,
    mnt: PathBuf,
    /// Available snapshots: id -> (volume, sha256 of the volume image it captured).
    snaps: BTreeMap<String, (String, String)>,
    /// The head of each volume's chain (what its next incremental builds on).
    heads: BTreeMap<String, Option<String>>,
    /// Every job this test started, and the ones known to have ended.
    jobs: BTreeSet<String>,
    ended: HashSet<String>,
    /// What is known of how often each op reaches each site: (it reached it more than this
    /// many times once, at most this many times once). Exact points draw N below the
    /// upper bound; a pair not tried yet is probed with N = 0 first.
    hit_bound: BTreeMap<(&'static str, &'static str), (u64, u64)>,
    /// Typical duration of each op (ms), for timed points.
    duration_ms: BTreeMap<&'static str, f64>,
    log_seen: u64,
    /// Where in the log recovery events were last counted, and their counts.
    events_seen: u64,
    events: BTreeMap<&'static str, u64>,
    /// How long the last job took from the CLI's answer to its observed end (ms).
    last_job_ms: f64,
    rng: Rng,
}

/// Waits for a job to end (successful or failed) within `JOB_BOUND`; returns its item.
fn wait_job(d: &Daemon, job: &str) -> Value {
    let deadline = Instant::now() + JOB_BOUND;
    loop {
        let v = d.ok(&["describe-jobs", "-j", job]);
        let j = v["job_set"][0].clone();
        if matches!(j["status"].as_str(), Some("successful") | Some("failed")) {
            return j;
        }
        assert!(
            Instant::now() < deadline,
            "job {job} did not end within {JOB_BOUND:?}: {j}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl World {
    fn new(seed: u64) -> World {
        let state = StateDir::new();
        eprintln!("state dir on {}", state.kind());
        let d = Daemon::start_with_state_dir(&state.state(), "");
        let raw = d.volume("16M", "raw");
        let fs_vol = d.volume("16M", "fs");
        let fs_dev = d.attach(&fs_vol);
        sh(&format!(
            "mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 {}",
            fs_dev.display()
        ));
        let mnt = d.dir.path().join("mnt");
        let mut w = World {
            d,
            _state: state,
            raw,
            raw_sha: String::new(),
            fs_vol,
            fs_dev,
            mnt,
            snaps: BTreeMap::new(),
            heads: BTreeMap::new(),
            jobs: BTreeSet::new(),
            ended: HashSet::new(),
            hit_bound: BTreeMap::new(),
            duration_ms: BTreeMap::new(),
            log_seen: 0,
            events_seen: 0,
            events: BTreeMap::new(),
            last_job_ms: 0.0,
            rng: Rng(seed),
        };
        // The volumes' own creation jobs (ended).
        let jobs = w.d.ok(&["describe-jobs"]);
        for j in jobs["job_set"].as_array().expect("job_set") {
            let id = j["job_id"].as_str().expect("job_id").to_string();
            w.jobs.insert(id.clone());
            w.ended.insert(id);
        }
        w.scribble_raw(64);
        w.raw_sha = common::sha256(&w.d.image(&w.raw));
        w
    }

    fn image_sha(&self, volume: &str) -> String {
        common::sha256(&self.d.image(volume))
    }

    /// Random writes straight into the detached volume's image.
    fn scribble_raw(&mut self, writes: u64) {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(self.d.image(&self.raw))
            .expect("open raw image");
        for _ in 0..writes {
            let len = (1 + self.rng.below(16)) * 4096;
            let off = self.rng.below((VOLUME_BYTES - len) / 4096) * 4096;
            let fill: Vec<u8> = if self.rng.chance(15) {
                vec![0u8; len as usize]
            } else {
                (0..len / 8)
                    .flat_map(|_| self.rng.next().to_le_bytes())
                    .collect()
            };
            f.write_all_at(&fill, off).expect("write raw image");
        }
        f.sync_all().expect("sync raw image");
    }

    /// New files in the mounted filesystem, old ones removed to keep it from filling.
    fn scribble_fs(&mut self) {
        let n = self.rng.below(1_000_000);
        let dir = self.mnt.join("data");
        std::fs::create_dir_all(&dir).expect("mkdir");
        let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
            .expect("readdir")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        names.sort();
        while names.len() > 6 {
            let victim = names.remove(self.rng.below(names.len() as u64) as usize);
            std::fs::remove_file(victim).expect("rm");
        }
        let data: Vec<u8> = (0..(32 + self.rng.below(480)) * 128)
            .flat_map(|_| self.rng.next().to_le_bytes())
            .collect();
        let mut f = std::fs::File::create(dir.join(format!("f{n:06}"))).expect("create");
        f.write_all(&data).expect("write");
        f.sync_all().expect("fsync");
    }

    /// Listed snapshots: id -> item.
    fn listed(&self) -> BTreeMap<String, Value> {
        let v = self.d.ok(&["describe-snapshots"]);
        let set = v["snapshot_set"].as_array().expect("snapshot_set").clone();
        assert_eq!(
            set.len() as u64,
            v["total_count"].as_u64().unwrap_or(0),
            "describe-snapshots paged: {v}"
        );
        set.into_iter()
            .map(|s| (s["snapshot_id"].as_str().unwrap_or_default().to_string(), s))
            .collect()
    }

    /// Runs a job-starting verb that must succeed; returns (response, ms it took).
    fn job(&mut self, args: &[String]) -> (Value, f64) {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let v = self.d.ok(&a);
        let t = Instant::now();
        let job = v["job_id"].as_str().expect("job_id").to_string();
        self.jobs.insert(job.clone());
        let j = wait_job(&self.d, &job);
        self.ended.insert(job);
        assert_eq!(
            j["status"],
            "successful",
            "{args:?}: job failed: {j}\n--- daemon log ---\n{}",
            log_tail(&self.d)
        );
        self.last_job_ms = t.elapsed().as_secs_f64() * 1000.0;
        (v, self.last_job_ms)
    }

    /// sha256 of a new volume restored from `snap` (the volume is deleted again).
    fn restored_sha(&mut self, snap: &str, fsck: bool) -> String {
        let (v, _) = self.job(&[
            "create-volume-from-snapshot".into(),
            "-s".into(),
            snap.into(),
        ]);
        let vid = v["volume_id"].as_str().expect("volume_id").to_string();
        let image = self.d.image(&vid);
        if fsck {
            sh(&format!("e2fsck -fn {} >/dev/null", image.display()));
        }
        let sha = common::sha256(&image);
        self.d.ok(&["delete-volumes", "-v", &vid]);
        sha
    }

    fn check_restore(&mut self, snap: &str, ctx: &str) {
        let want = self.snaps[snap].1.clone();
        let got = self.restored_sha(snap, false);
        assert_eq!(
            got, want,
            "{ctx}: snapshot {snap} no longer restores byte-identically"
        );
    }

    /// Records a snapshot that became available. The raw volume's content is known exactly;
    /// the mounted filesystem's is what its first restore gives (checked with e2fsck).
    fn adopt(&mut self, snap: &str, volume: &str, raw_sha: &str) {
        let sha = if volume == self.raw {
            raw_sha.to_string()
        } else {
            self.snaps
                .insert(snap.to_string(), (volume.to_string(), String::new()));
            self.restored_sha(snap, true)
        };
        self.snaps
            .insert(snap.to_string(), (volume.to_string(), sha));
        self.heads
            .insert(volume.to_string(), Some(snap.to_string()));
    }

    fn snaps_of(&self, volume: &str) -> Vec<String> {
        self.snaps
            .iter()
            .filter(|(_, (v, _))| v == volume)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Picks the next operation.
    fn pick_op(&mut self, listed: &BTreeMap<String, Value>) -> Op {
        let volumes = [self.raw.clone(), self.fs_vol.clone()];
        for v in &volumes {
            if self.snaps_of(v).len() >= MAX_PER_VOLUME {
                let all = self.snaps_of(v);
                let snapshot = self.rng.pick(&all).clone();
                return delete_op(listed, snapshot);
            }
        }
        if self.snaps.is_empty() {
            return Op::Create {
                volume: self.raw.clone(),
                full: true,
            };
        }
        let all: Vec<String> = self.snaps.keys().cloned().collect();
        match self.rng.below(100) {
            0..=34 => {
                let volume = self.rng.pick(&volumes).clone();
                let full = self.rng.chance(25);
                Op::Create { volume, full }
            }
            35..=49 => Op::FromSnapshot {
                snapshot: self.rng.pick(&all).clone(),
            },
            50..=62 => {
                let raw = self.snaps_of(&self.raw);
                match raw.is_empty() {
                    true => Op::Create {
                        volume: self.raw.clone(),
                        full: false,
                    },
                    false => Op::Apply {
                        snapshot: self.rng.pick(&raw).clone(),
                    },
                }
            }
            63..=87 => {
                // Prefer a snapshot in the middle of a chain: its delete folds into a child.
                let parents: HashSet<String> = listed
                    .values()
                    .filter_map(parent_of)
                    .map(String::from)
                    .collect();
                let middle: Vec<String> = all
                    .iter()
                    .filter(|id| parents.contains(*id) && parent_of(&listed[*id]).is_some())
                    .cloned()
                    .collect();
                let snapshot = if !middle.is_empty() && self.rng.chance(70) {
                    self.rng.pick(&middle).clone()
                } else {
                    self.rng.pick(&all).clone()
                };
                delete_op(listed, snapshot)
            }
            _ => {
                let n = 1 + self.rng.below(3) as usize;
                let mut pick: BTreeSet<String> = BTreeSet::new();
                for _ in 0..n {
                    pick.insert(self.rng.pick(&all).clone());
                }
                Op::Verify {
                    snapshots: pick.into_iter().collect(),
                }
            }
        }
    }
}

/// A delete of `snapshot`, marked `middle` when it has a parent and a child (its delete
/// folds it into the child).
fn delete_op(listed: &BTreeMap<String, Value>, snapshot: String) -> Op {
    let has_parent = listed.get(&snapshot).and_then(parent_of).is_some();
    let has_child = listed
        .values()
        .any(|s| parent_of(s) == Some(snapshot.as_str()));
    Op::Delete {
        snapshot,
        middle: has_parent && has_child,
    }
}

impl World {
    /// Restarts the daemon with `failpoints` (if it is not already running with them).
    fn ensure_daemon(&mut self, failpoints: &str) {
        if self.d.pid().is_some() && self.d.failpoints == failpoints {
            return;
        }
        if self.d.pid().is_some() {
            assert!(self.d.stop(), "daemon did not stop: {}", log_tail(&self.d));
        }
        self.d.failpoints = failpoints.to_string();
        // Armed after recovery: a crash point belongs to the operation, not to the start.
        self.d.failpoints_after_ready = true;
        self.d.spawn();
    }

    /// Everything that must hold after a restart, with `deleting` the snapshot whose delete
    /// was interrupted (it may be gone) and `created` the one whose capture was (it may have
    /// made it). Returns the listed snapshots.
    fn check_invariants(
        &mut self,
        ctx: &str,
        deleting: Option<&str>,
        created: Option<&str>,
    ) -> BTreeMap<String, Value> {
        assert!(
            writable(&self.mnt),
            "{ctx}: filesystem left frozen after the restart"
        );
        // What the restarts' recoveries did (for the tally).
        let log = log_from(&self.d, self.events_seen);
        self.events_seen += log.len() as u64;
        for line in log.lines() {
            for (pattern, event) in RECOVERY_EVENTS {
                if line.contains(pattern) {
                    *self.events.entry(event).or_default() += 1;
                }
            }
        }
        // Every job ends within the bound; the daemon knows no other jobs.
        let open: Vec<String> = self
            .jobs
            .iter()
            .filter(|j| !self.ended.contains(*j))
            .cloned()
            .collect();
        for j in open {
            let item = wait_job(&self.d, &j);
            assert!(
                item["status"] == "successful" || item["status"] == "failed",
                "{ctx}: {item}"
            );
            self.ended.insert(j);
        }
        let all_jobs = self.d.ok(&["describe-jobs", "-L", "1"]);
        assert_eq!(
            all_jobs["total_count"].as_u64(),
            Some(self.jobs.len() as u64),
            "{ctx}: the daemon lists jobs the test did not start"
        );
        let open = self
            .d
            .ok(&["describe-jobs", "-s", "pending", "-s", "working"]);
        assert_eq!(open["total_count"], 0, "{ctx}: jobs left open: {open}");
        // Snapshots: the available ones are still there, nothing partial is listed.
        let listed = self.listed();
        for (id, s) in &listed {
            assert_eq!(s["status"], "available", "{ctx}: listed: {s}");
            assert!(
                self.snaps.contains_key(id) || created == Some(id.as_str()),
                "{ctx}: a snapshot nobody created is listed: {s}"
            );
        }
        for id in self.snaps.keys() {
            assert!(
                listed.contains_key(id) || deleting == Some(id.as_str()),
                "{ctx}: snapshot {id} was available and is gone"
            );
        }
        // Parent links point at listed snapshots.
        for s in listed.values() {
            assert!(
                parent_of(s).is_none_or(|p| listed.contains_key(p)),
                "{ctx}: parent of a listed snapshot is not listed: {s}"
            );
        }
        // The store holds exactly the listed snapshots, with no leftovers.
        let store = self.d.state_dir.join("store");
        let mut dirs = BTreeSet::new();
        for e in walk(&store) {
            let rel = e.strip_prefix(&store).expect("under store");
            let name = e.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            assert!(
                !name.contains(".tmp-"),
                "{ctx}: temporary left in the store: {}",
                e.display()
            );
            let parts: Vec<&str> = rel.iter().filter_map(|c| c.to_str()).collect();
            if parts.first() == Some(&"snapshots") {
                assert_eq!(parts.len(), 3, "{ctx}: unexpected {}", e.display());
                dirs.insert(parts[1].to_string());
                assert!(
                    name == "manifest" || name == "hashes" || name.starts_with("delta."),
                    "{ctx}: stray file in the store: {}",
                    e.display()
                );
            }
        }
        for id in &dirs {
            assert!(
                listed.contains_key(id),
                "{ctx}: the store keeps snapshot {id}, which is not listed"
            );
            let files = std::fs::read_dir(store.join("snapshots").join(id))
                .expect("snapshot dir")
                .count();
            assert_eq!(files, 3, "{ctx}: snapshot {id} holds {files} files");
        }
        assert_eq!(
            dirs.len(),
            listed.len(),
            "{ctx}: listed snapshots missing from the store"
        );
        // The state dir's scratch space is empty; images are exactly the live volumes.
        let tmp: Vec<PathBuf> = walk(&self.d.state_dir.join("tmp"));
        assert!(tmp.is_empty(), "{ctx}: leftovers in the state dir: {tmp:?}");
        let volumes = self.d.ok(&["describe-volumes"]);
        let vols = volumes["volume_set"].as_array().expect("volume_set");
        let mut live = BTreeSet::new();
        let mut attached = BTreeSet::new();
        for v in vols {
            let id = v["volume_id"].as_str().unwrap_or_default().to_string();
            let status = v["status"].as_str().unwrap_or_default();
            assert_ne!(status, "pending", "{ctx}: volume left pending: {v}");
            if status == "deleted" {
                continue;
            }
            if let Some(dev) = v["device"].as_str().filter(|d| !d.is_empty()) {
                attached.insert(dev.to_string());
            }
            live.insert(format!("{id}.img"));
        }
        let images: BTreeSet<String> = std::fs::read_dir(self.d.state_dir.join("volumes"))
            .expect("volumes dir")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        assert_eq!(
            images, live,
            "{ctx}: volume images differ from live volumes"
        );
        // Loop devices over the state dir: exactly the attached volumes.
        let loops = loops_under(&self.d.state_dir);
        assert_eq!(
            loops, attached,
            "{ctx}: loop devices over the state dir differ from the attached volumes"
        );
        assert!(attached.contains(self.fs_dev.to_str().unwrap_or_default()));
        listed
    }

    /// One round: pick an op, arm a crash, run it, restart, check, retry; counts in `tally`.
    fn round(&mut self, round: u64, tally: &mut BTreeMap<(&'static str, &'static str), Count>) {
        let listed_before = self.listed();
        let op = self.pick_op(&listed_before);
        let mut raw_sha_at_op = self.raw_sha.clone();
        if let Op::Create { volume, .. } = &op {
            if *volume == self.raw {
                let n = 1 + self.rng.below(48);
                self.scribble_raw(n);
                self.raw_sha = self.image_sha(&self.raw);
                raw_sha_at_op = self.raw_sha.clone();
            } else {
                self.scribble_fs();
            }
        }
        let name = op.name();
        // Exact points only where a store site can be reached (verify writes nothing).
        let sites: Vec<&'static str> = blocksnap::failpoint::SITES
            .iter()
            .copied()
            .filter(|s| self.hit_bound.get(&(name, *s)).is_none_or(|b| b.1 > 0))
            .collect();
        let exact = !sites.is_empty() && self.rng.chance(50);
        let kind = if exact { "exact" } else { "timed" };
        let mut armed = String::new();
        if exact {
            let site = *self.rng.pick(&sites);
            let n = match self.hit_bound.get(&(name, site)) {
                None => 0,
                Some(&(lo, hi)) => self.rng.below(hi.max(lo + 1)),
            };
            armed = format!("{site}={n}*off->return(kill)");
            self.ensure_daemon(&armed);
        } else {
            self.ensure_daemon("");
        }
        let ctx = format!("round {round} ({name}, {kind} {armed})");
        // Children of a snapshot being deleted: they absorb it and are checked after.
        let children: Vec<String> = match &op {
            Op::Delete { snapshot, .. } => listed_before
                .values()
                .filter(|s| parent_of(s) == Some(snapshot.as_str()))
                .filter_map(|s| s["snapshot_id"].as_str().map(String::from))
                .collect(),
            _ => Vec::new(),
        };
        let log_at = log_len(&self.d);
        let args = op.args();
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let resp = self.d.run(&a);
        let started = Instant::now();
        let resp: Value = serde_json::from_slice(&resp.stdout).unwrap_or(Value::Null);
        let job = resp["job_id"].as_str().map(String::from);
        if let Some(j) = &job {
            self.jobs.insert(j.clone());
        }
        let hit;
        if exact {
            let deadline = Instant::now() + JOB_BOUND;
            loop {
                if self.d.exited().is_some() {
                    hit = true;
                    break;
                }
                let done = match &job {
                    Some(j) => {
                        let out = self.d.run(&["describe-jobs", "-j", j]);
                        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
                        matches!(
                            v["job_set"][0]["status"].as_str(),
                            Some("successful") | Some("failed")
                        )
                    }
                    None => {
                        // Refused without a job: only acceptable if the daemon died.
                        std::thread::sleep(Duration::from_millis(50));
                        assert!(self.d.exited().is_some(), "{ctx}: {args:?} refused: {resp}");
                        hit = true;
                        break;
                    }
                };
                if done && self.d.exited().is_none() {
                    hit = false;
                    break;
                }
                assert!(Instant::now() < deadline, "{ctx}: job did not end");
                std::thread::sleep(Duration::from_millis(3));
            }
            if hit {
                let (site, n) = parse_armed(&armed);
                let b = self.hit_bound.entry((name, site)).or_insert((0, 64));
                b.0 = b.0.max(n + 1);
                b.1 = b.1.max(b.0 * 2);
                assert!(
                    log_from(&self.d, log_at).contains("failpoint: SIGKILL"),
                    "{ctx}: the daemon died, not at the failpoint:\n{}",
                    log_tail(&self.d)
                );
            } else {
                let (site, n) = parse_armed(&armed);
                // This op hits `site` at most n times: draw below that from now on.
                let b = self.hit_bound.entry((name, site)).or_insert((0, 64));
                b.1 = b.1.min(n);
            }
            self.d.kill9();
        } else {
            let est = self.duration_ms.get(name).copied().unwrap_or(50.0);
            let delay = self.rng.below((est * 0.8) as u64 + 1);
            let at = started + Duration::from_millis(delay);
            if let Some(wait) = at.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            self.d.kill9();
            // A job the restart finds unfinished is resumed or failed, and says so.
            hit = false;
        }
        self.d.failpoints.clear();
        self.log_seen = log_len(&self.d);
        self.d.spawn();
        let mut job = job;
        if job.is_none() {
            // The daemon died before its answer reached the CLI: the job it had started, if
            // any, is the one job the test does not know yet.
            let all = self.d.ok(&["describe-jobs", "-L", "10000"]);
            let unknown: Vec<String> = all["job_set"]
                .as_array()
                .expect("job_set")
                .iter()
                .filter_map(|j| j["job_id"].as_str())
                .filter(|j| !self.jobs.contains(*j))
                .map(String::from)
                .collect();
            assert!(unknown.len() <= 1, "{ctx}: unknown jobs {unknown:?}");
            job = unknown.into_iter().next();
            if let Some(j) = &job {
                self.jobs.insert(j.clone());
            }
        }
        let hit = hit
            || job.as_ref().is_some_and(|j| {
                log_from(&self.d, self.log_seen)
                    .lines()
                    .any(|l| l.contains(j.as_str()) && l.contains("interrupted by a restart"))
            });
        // Sometimes a second crash, while the restart's resumed work runs.
        let kind = if hit && !exact && self.rng.chance(25) {
            let est = self.duration_ms.get(name).copied().unwrap_or(50.0);
            std::thread::sleep(Duration::from_millis(
                self.rng.below((est * 0.8) as u64 + 1),
            ));
            self.d.kill9();
            self.d.spawn();
            "twice"
        } else {
            kind
        };
        let c = tally.entry((name, kind)).or_default();
        c.rounds += 1;
        if hit {
            c.hit += 1;
        }

        let deleting = match &op {
            Op::Delete { snapshot, .. } => Some(snapshot.as_str()),
            _ => None,
        };
        let created = match &op {
            Op::Create { .. } => resp["snapshots"][0].as_str(),
            _ => None,
        };
        let listed = self.check_invariants(&ctx, deleting, created);

        // Settle the operation: keep what it finished, retry it, check what it touched.
        let mut touched: Vec<String> = Vec::new();
        match &op {
            Op::Create { volume, .. } => {
                if let Some(id) = created.filter(|id| listed.contains_key(*id)) {
                    self.adopt(id, volume, &raw_sha_at_op);
                    if *volume == self.raw {
                        touched.push(id.to_string());
                    }
                } else {
                    let (v, ms) = self.job(&args);
                    self.learn(name, ms);
                    let id = v["snapshots"][0].as_str().expect("snapshot id").to_string();
                    self.adopt(&id, volume, &raw_sha_at_op);
                    if *volume == self.raw {
                        touched.push(id);
                    }
                }
            }
            Op::FromSnapshot { snapshot } => {
                // A restore the restart resumed must have produced the right bytes.
                if let Some(vid) = resp["volume_id"].as_str() {
                    let v = self.d.ok(&["describe-volumes", "-v", vid]);
                    if v["volume_set"][0]["status"] == "available" {
                        let got = self.image_sha(vid);
                        assert_eq!(
                            got, self.snaps[snapshot].1,
                            "{ctx}: interrupted restore finished with wrong bytes"
                        );
                        self.d.ok(&["delete-volumes", "-v", vid]);
                    }
                }
                self.check_restore(snapshot, &ctx);
                self.learn(name, self.last_job_ms);
            }
            Op::Apply { snapshot } => {
                let (_, ms) = self.job(&args);
                self.learn(name, ms);
                let got = self.image_sha(&self.raw);
                assert_eq!(
                    got, self.snaps[snapshot].1,
                    "{ctx}: apply-snapshots retried left the volume with wrong bytes"
                );
                self.raw_sha = got;
                self.heads.insert(self.raw.clone(), Some(snapshot.clone()));
            }
            Op::Delete { snapshot, .. } => {
                if listed.contains_key(snapshot) {
                    let (_, ms) = self.job(&args);
                    self.learn(name, ms);
                }
                if let Some((vol, _)) = self.snaps.remove(snapshot) {
                    if self.heads.get(&vol) == Some(&Some(snapshot.clone())) {
                        let parent = listed_before.get(snapshot).and_then(parent_of);
                        self.heads.insert(vol, parent.map(String::from));
                    }
                }
                touched.extend(children);
            }
            Op::Verify { .. } => {
                let (_, ms) = self.job(&args);
                self.learn(name, ms);
            }
        }
        // Snapshots the op touched, and now and then one more at random, restore
        // byte-identically (all of them in the periodic sweeps).
        if !self.snaps.is_empty() && self.rng.chance(30) {
            let all: Vec<String> = self.snaps.keys().cloned().collect();
            touched.push(self.rng.pick(&all).clone());
        }
        for id in touched {
            if self.snaps.contains_key(&id) {
                self.check_restore(&id, &ctx);
            }
        }
        self.check_heads(&ctx, deleting);
        if hit {
            tally.entry((name, kind)).or_default().survived += 1;
        }
    }

    /// Each volume's chain head is where the test expects it: the snapshots marked
    /// `head_chain` are exactly the head and its ancestors.
    fn check_heads(&self, ctx: &str, deleted: Option<&str>) {
        let listed = self.listed();
        if let Some(id) = deleted {
            assert!(
                !listed.contains_key(id),
                "{ctx}: deleted snapshot {id} still listed"
            );
        }
        for vol in [&self.raw, &self.fs_vol] {
            let mut want = BTreeSet::new();
            let mut at = self.heads.get(vol).cloned().flatten();
            while let Some(id) = at {
                let s = listed
                    .get(&id)
                    .unwrap_or_else(|| panic!("{ctx}: head {id} of {vol} is not listed"));
                want.insert(id.clone());
                at = parent_of(s).map(String::from);
            }
            let got: BTreeSet<String> = listed
                .iter()
                .filter(|(_, s)| s["resource"]["resource_id"] == vol.as_str())
                .filter(|(_, s)| s["head_chain"] == 1)
                .map(|(id, _)| id.clone())
                .collect();
            assert_eq!(
                got, want,
                "{ctx}: the chain head of volume {vol} is not where it should be (next incremental would build on the wrong snapshot)"
            );
        }
    }

    fn learn(&mut self, op: &'static str, ms: f64) {
        let e = self.duration_ms.entry(op).or_insert(ms);
        *e = 0.7 * *e + 0.3 * ms;
    }

    /// Every snapshot restores byte-identically and verifies.
    fn sweep(&mut self, ctx: &str) {
        let all: Vec<String> = self.snaps.keys().cloned().collect();
        for id in &all {
            self.check_restore(id, ctx);
        }
        if !all.is_empty() {
            let mut args = vec!["verify-snapshots".to_string()];
            for id in &all {
                args.push("-s".into());
                args.push(id.clone());
            }
            self.job(&args);
        }
    }
}

/// Recovery's log lines worth counting: (what the line says, what the tally calls it).
const RECOVERY_EVENTS: &[(&str, &str)] = &[
    (
        "thawed a filesystem left frozen",
        "thawed a frozen filesystem",
    ),
    (
        "removing a snapshot whose capture was interrupted",
        "discarded a partial snapshot",
    ),
    ("removed a scratch file", "removed a capture's scratch file"),
    ("chain head was deleted", "moved a dangling chain head"),
    ("resuming a job interrupted", "resumed a job"),
    ("failing a job interrupted", "failed a job"),
    (
        "removing a volume whose creation did not finish",
        "removed an unfinished volume",
    ),
];

/// Regular files under `dir`, recursively (none if it does not exist).
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Loop devices whose backing file lies under `dir`.
fn loops_under(dir: &Path) -> BTreeSet<String> {
    let out = sh("losetup -l -n -O NAME,BACK-FILE");
    let prefix = dir.to_string_lossy().into_owned();
    out.lines()
        .filter_map(|l| {
            let mut p = l.split_whitespace();
            let (dev, back) = (p.next()?, p.next()?);
            back.starts_with(&prefix).then(|| dev.to_string())
        })
        .collect()
}

/// The daemon's log from byte `from` on (the log only grows).
fn log_from(d: &Daemon, from: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut out = String::new();
    if let Ok(mut f) = std::fs::File::open(d.dir.path().join("daemon.log")) {
        if f.seek(SeekFrom::Start(from)).is_ok() {
            let mut buf = Vec::new();
            let _ = f.read_to_end(&mut buf);
            out = String::from_utf8_lossy(&buf).into_owned();
        }
    }
    out
}

fn log_len(d: &Daemon) -> u64 {
    std::fs::metadata(d.dir.path().join("daemon.log"))
        .map(|m| m.len())
        .unwrap_or(0)
}

/// The site and N of an armed `site=N*off->return(kill)`.
fn parse_armed(armed: &str) -> (&'static str, u64) {
    let (site, rest) = armed.split_once('=').expect("site=action");
    let site = blocksnap::failpoint::SITES
        .iter()
        .copied()
        .find(|s| *s == site)
        .expect("a known site");
    let n = rest
        .split('*')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("N*off");
    (site, n)
}

/// A listed snapshot's parent (`parent_id` is "self" for a full snapshot).
fn parent_of(s: &Value) -> Option<&str> {
    s["parent_id"]
        .as_str()
        .filter(|p| !p.is_empty() && *p != "self" && Some(*p) != s["snapshot_id"].as_str())
}

fn log_tail(d: &Daemon) -> String {
    let log = log_from(d, log_len(d).saturating_sub(16 << 10));
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

#[test]
fn sigkill_at_random_points_keeps_every_invariant() {
    if !root_or_skip("sigkill_at_random_points_keeps_every_invariant") {
        return;
    }
    if !cfg!(feature = "failpoints") {
        eprintln!("SKIPPED exact crash points: build with --features failpoints for them");
    }
    let seed = env_u64("BLOCKSNAP_CRASH_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let long = std::env::var("BLOCKSNAP_LONG").as_deref() == Ok("1");
    let target = env_u64("BLOCKSNAP_CRASH_POINTS").unwrap_or(if long { 2000 } else { 200 });
    eprintln!("crash points: seed {seed} (BLOCKSNAP_CRASH_SEED={seed} reproduces), target {target} points");
    let started = Instant::now();
    let mut w = World::new(seed);
    let mut mount = Some(Mount::new(&w.fs_dev, &w.mnt));
    if !cfg!(feature = "failpoints") {
        // Without failpoints every site is unreachable: timed points only.
        let ops = [
            "create-full",
            "create-incremental",
            "create-volume-from-snapshot",
            "apply-snapshots",
            "delete-middle (fold)",
            "delete-snapshots",
            "verify-snapshots",
        ];
        for op in ops {
            for s in blocksnap::failpoint::SITES {
                w.hit_bound.insert((op, s), (0, 0));
            }
        }
    }
    // A few snapshots to start from, without crashes.
    for full in [true, false] {
        for vol in [w.raw.clone(), w.fs_vol.clone()] {
            if vol == w.raw {
                w.scribble_raw(32);
                w.raw_sha = w.image_sha(&w.raw);
            } else {
                w.scribble_fs();
            }
            let op = Op::Create {
                volume: vol.clone(),
                full,
            };
            let (v, _) = w.job(&op.args());
            let id = v["snapshots"][0].as_str().expect("id").to_string();
            let sha = w.raw_sha.clone();
            w.adopt(&id, &vol, &sha);
        }
    }
    let mut tally: BTreeMap<(&'static str, &'static str), Count> = BTreeMap::new();
    let max_rounds = target * 4 + 50;
    let mut round = 0;
    let hits = |t: &BTreeMap<(&'static str, &'static str), Count>| -> u64 {
        t.values().map(|c| c.hit).sum()
    };
    while hits(&tally) < target && round < max_rounds {
        w.round(round, &mut tally);
        round += 1;
        if round % 100 == 0 {
            eprintln!(
                "  {round} rounds, {} crash points, {:.0} s",
                hits(&tally),
                started.elapsed().as_secs_f64()
            );
            w.sweep(&format!("sweep after round {round}"));
        }
    }
    w.ensure_daemon("");
    w.check_invariants("final", None, None);
    w.sweep("final sweep");
    drop(mount.take());

    eprintln!(
        "crash points (seed {seed}): {round} rounds in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    eprintln!(
        "  {:<30} {:<6} {:>7} {:>7} {:>9}",
        "op", "kind", "rounds", "hit", "survived"
    );
    let mut total = Count::default();
    for ((op, kind), c) in &tally {
        eprintln!(
            "  {op:<30} {kind:<6} {:>7} {:>7} {:>9}",
            c.rounds, c.hit, c.survived
        );
        total.rounds += c.rounds;
        total.hit += c.hit;
        total.survived += c.survived;
    }
    eprintln!(
        "  {:<30} {:<6} {:>7} {:>7} {:>9}",
        "total", "", total.rounds, total.hit, total.survived
    );
    eprintln!("  recoveries:");
    for (event, n) in &w.events {
        eprintln!("    {event:<34} {n:>6}");
    }
    assert_eq!(total.hit, total.survived);
    assert!(
        total.hit >= target,
        "only {} crash points were hit in {round} rounds (target {target})",
        total.hit
    );
}

//! Freezing the filesystems of a volume for the instant of a snapshot.
//!
//! [`FreezeSet::freeze`] freezes each superblock once (bind mounts share one), inner
//! filesystems before the ones holding their loop backing files, after recording each
//! mountpoint through the caller's durable journal, and never a filesystem holding a
//! protected path (the store, the state dir, the logs, `/`). Every mountpoint is opened and
//! checked before the first freeze, so nothing is looked up by path while anything is frozen;
//! thawing goes through those descriptors, in reverse order. A [`Watchdog`] thaws at the
//! freeze timeout even if the capture hangs, and [`FreezeSet::thaw`] then reports that it did.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::devices::DevId;
use super::mountinfo::{read_mountinfo, Mount};
use super::QuiesceError;
use crate::sys::freeze::{self as sysfreeze, FreezeError, Frozen};
use crate::sys::loopdev;

// The daemon moves these into blocking tasks and watchdog threads.
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<FreezeSet>();
    send_sync::<SetThawHandle>();
    send_sync::<Watchdog>();
};

/// One frozen superblock.
struct Member {
    mountpoint: PathBuf,
    frozen: Frozen,
}

#[derive(Clone, Copy)]
enum SetState {
    Frozen,
    Thawed {
        held: Duration,
        /// `Some(timeout)` when the watchdog did it.
        by_watchdog: Option<Duration>,
    },
}

struct SetInner {
    /// In freeze order; thawed in reverse.
    members: Members,
    frozen_at: Instant,
    state: Mutex<SetState>,
}

enum ThawOutcome {
    Now(Duration),
    Earlier(SetState),
}

impl SetInner {
    fn lock(&self) -> MutexGuard<'_, SetState> {
        // A panic while holding the lock cannot leave the state half-written.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Thaws every member in reverse order, once; the lock makes concurrent callers wait.
    fn thaw_all(&self, by_watchdog: Option<Duration>) -> Result<ThawOutcome, QuiesceError> {
        let mut state = self.lock();
        if let SetState::Thawed { .. } = *state {
            return Ok(ThawOutcome::Earlier(*state));
        }
        let failures = thaw_reverse(&self.members.0);
        let held = if self.members.0.is_empty() {
            Duration::ZERO
        } else {
            self.frozen_at.elapsed()
        };
        if !failures.is_empty() {
            // Stay "frozen": a later caller (Drop, the watchdog) tries the failed ones again.
            return Err(QuiesceError::Thaw { failures });
        }
        *state = SetState::Thawed { held, by_watchdog };
        Ok(ThawOutcome::Now(held))
    }
}

/// Frozen superblocks in freeze order; dropping them thaws in reverse order (the fallback
/// when everything else failed or unwound; a no-op for what is already thawed).
struct Members(Vec<Member>);

impl Drop for Members {
    fn drop(&mut self) {
        for e in thaw_reverse(&self.0) {
            tracing::error!(error = %e, "thaw on drop failed");
        }
    }
}

fn thaw_reverse(members: &[Member]) -> Vec<FreezeError> {
    members
        .iter()
        .rev()
        .filter_map(|m| m.frozen.thaw_handle().thaw().err())
        .collect()
}

/// The filesystems frozen for one snapshot. [`FreezeSet::thaw`] is the normal end; dropping
/// the set thaws as a fallback.
#[must_use = "dropping a FreezeSet thaws at once"]
pub struct FreezeSet {
    inner: Arc<SetInner>,
}

impl std::fmt::Debug for FreezeSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FreezeSet")
            .field("mountpoints", &self.mountpoints())
            .finish()
    }
}

/// A mount chosen to freeze its superblock, opened and checked before any freeze.
struct Candidate<'a> {
    mount: &'a Mount,
    dir: File,
    st_dev: u64,
}

impl FreezeSet {
    /// Freezes the filesystems of `mounts`, once per superblock.
    ///
    /// `protected` paths (plus `/`) must not be on any of them: that is refused before
    /// anything is frozen. `journal(mountpoint)` must record durably that the mountpoint is
    /// about to be frozen, so that a restarted daemon thaws it; it runs before each freeze,
    /// and an error from it aborts. On any error, whatever was frozen is thawed again, in
    /// reverse order. [`QuiesceError::NotSupported`] means a crash-consistent snapshot is
    /// the only option.
    pub fn freeze(
        mounts: &[Mount],
        protected: &[PathBuf],
        journal: &mut dyn FnMut(&Path) -> io::Result<()>,
    ) -> Result<FreezeSet, QuiesceError> {
        let candidates = open_candidates(mounts)?;
        check_protected(&candidates, protected)?;
        let candidates = order_inner_first(candidates);

        // Writers are held from the first FIFREEZE on; the first journal write is not counted.
        let mut frozen_at = None;
        // If anything below unwinds, dropping `members` thaws them in reverse order.
        let mut members = Members(Vec::with_capacity(candidates.len()));
        for c in candidates {
            let mountpoint = c.mount.mountpoint.clone();
            let result = journal(&mountpoint)
                .map_err(|source| QuiesceError::Journal {
                    mountpoint: mountpoint.clone(),
                    source,
                })
                .and_then(|()| {
                    frozen_at.get_or_insert_with(Instant::now);
                    sysfreeze::freeze(c.dir, &mountpoint)
                        .map_err(|e| freeze_error(e, c.mount, &mountpoint))
                });
            match result {
                Ok(frozen) => members.0.push(Member { mountpoint, frozen }),
                Err(cause) => {
                    let thaw = thaw_reverse(&members.0);
                    return Err(if thaw.is_empty() {
                        cause
                    } else {
                        QuiesceError::ThawFailed {
                            cause: Box::new(cause),
                            thaw,
                        }
                    });
                }
            }
        }
        tracing::debug!(count = members.0.len(), "filesystems frozen");
        Ok(FreezeSet {
            inner: Arc::new(SetInner {
                members,
                frozen_at: frozen_at.unwrap_or_else(Instant::now),
                state: Mutex::new(SetState::Frozen),
            }),
        })
    }

    /// Thaws (reverse order) and returns how long writers were held.
    ///
    /// If the watchdog thawed first, the hold exceeded the timeout and this returns
    /// [`QuiesceError::WatchdogFired`]: the snapshot must fail, saying why.
    pub fn thaw(self) -> Result<Duration, QuiesceError> {
        match self.inner.thaw_all(None)? {
            ThawOutcome::Now(held) => Ok(held),
            ThawOutcome::Earlier(SetState::Thawed {
                held,
                by_watchdog: Some(timeout),
            }) => Err(QuiesceError::WatchdogFired { timeout, held }),
            ThawOutcome::Earlier(SetState::Thawed { held, .. }) => Ok(held),
            ThawOutcome::Earlier(SetState::Frozen) => Ok(Duration::ZERO),
        }
    }

    /// A handle that thaws the whole set from another thread (at most once in all).
    pub fn thaw_handle(&self) -> SetThawHandle {
        SetThawHandle {
            inner: Arc::clone(&self.inner),
        }
    }

    /// Starts a watchdog thread that thaws the set `timeout` after the freeze began, unless
    /// it is disarmed (or dropped) first.
    pub fn watchdog(&self, timeout: Duration) -> Watchdog {
        Watchdog::start(Arc::clone(&self.inner), timeout)
    }

    /// Runs `capture` while frozen, with a watchdog at `timeout`, then thaws. Returns what
    /// `capture` returned and how long writers were held, or [`QuiesceError::WatchdogFired`].
    pub fn hold<T>(
        self,
        timeout: Duration,
        capture: impl FnOnce() -> T,
    ) -> Result<(T, Duration), QuiesceError> {
        let watchdog = self.watchdog(timeout);
        let out = capture();
        watchdog.disarm();
        let held = self.thaw()?;
        Ok((out, held))
    }

    /// The mountpoints frozen, in freeze order (one per superblock).
    pub fn mountpoints(&self) -> Vec<&Path> {
        self.inner
            .members
            .0
            .iter()
            .map(|m| m.mountpoint.as_path())
            .collect()
    }

    /// True when nothing was frozen (no mounts given).
    pub fn is_empty(&self) -> bool {
        self.inner.members.0.is_empty()
    }
}

impl Drop for FreezeSet {
    fn drop(&mut self) {
        if let Err(e) = self.inner.thaw_all(None) {
            tracing::error!(error = %e, "thaw on drop failed");
        }
    }
}

/// Thaws a [`FreezeSet`] from another thread; the first thaw wins, later ones are no-ops.
#[derive(Clone)]
pub struct SetThawHandle {
    inner: Arc<SetInner>,
}

impl SetThawHandle {
    /// `Ok(true)` if this call thawed, `Ok(false)` if the set was thawed already.
    pub fn thaw(&self) -> Result<bool, QuiesceError> {
        Ok(matches!(self.inner.thaw_all(None)?, ThawOutcome::Now(_)))
    }
}

/// Thaws a [`FreezeSet`] when the freeze timeout passes. Disarm it when the capture is done.
pub struct Watchdog {
    cancel: Arc<(Mutex<bool>, Condvar)>,
    fired: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    fn start(inner: Arc<SetInner>, timeout: Duration) -> Watchdog {
        let cancel = Arc::new((Mutex::new(false), Condvar::new()));
        let fired = Arc::new(AtomicBool::new(false));
        let thread = {
            let cancel = Arc::clone(&cancel);
            let fired = Arc::clone(&fired);
            std::thread::Builder::new()
                .name("freeze-watchdog".into())
                .spawn(move || watch(&inner, timeout, &cancel, &fired))
        };
        let thread = match thread {
            Ok(t) => Some(t),
            Err(e) => {
                // Without a watchdog the timeout cannot be kept: thaw now rather than risk it.
                tracing::error!(error = %e, "cannot start the freeze watchdog; thawing now");
                fired.store(true, Ordering::SeqCst);
                None
            }
        };
        Watchdog {
            cancel,
            fired,
            thread,
        }
    }

    /// True once the watchdog has thawed the set.
    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }

    /// Stops the watchdog; returns whether it had fired.
    pub fn disarm(mut self) -> bool {
        self.stop();
        self.fired()
    }

    fn stop(&mut self) {
        let (lock, cvar) = &*self.cancel;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cvar.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop();
    }
}

fn watch(inner: &SetInner, timeout: Duration, cancel: &(Mutex<bool>, Condvar), fired: &AtomicBool) {
    let deadline = inner.frozen_at + timeout;
    let (lock, cvar) = cancel;
    let mut cancelled = lock.lock().unwrap_or_else(|p| p.into_inner());
    while !*cancelled {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        cancelled = cvar
            .wait_timeout(cancelled, deadline - now)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
    if *cancelled {
        return;
    }
    drop(cancelled);
    match inner.thaw_all(Some(timeout)) {
        Ok(ThawOutcome::Now(held)) => {
            fired.store(true, Ordering::SeqCst);
            // Logs go to stderr, never to a filesystem that may still be frozen.
            tracing::warn!(
                timeout_ms = timeout.as_millis() as u64,
                held_ms = held.as_millis() as u64,
                "freeze timeout reached: thawed by the watchdog"
            );
        }
        Ok(ThawOutcome::Earlier(_)) => {}
        Err(e) => {
            fired.store(true, Ordering::SeqCst);
            tracing::error!(error = %e, "freeze timeout reached, and the watchdog cannot thaw");
        }
    }
}

/// Recovery at start: thaws each mountpoint a previous run recorded before freezing it.
/// Per mountpoint, `Ok(true)` if it was still frozen and is thawed now, `Ok(false)` if it
/// was not frozen. A freeze outlives the process that made it; only FITHAW undoes it.
pub fn thaw_recorded(mountpoints: &[PathBuf]) -> Vec<(PathBuf, Result<bool, FreezeError>)> {
    mountpoints
        .iter()
        .map(|m| (m.clone(), sysfreeze::thaw_path(m)))
        .collect()
}

fn freeze_error(e: FreezeError, mount: &Mount, mountpoint: &Path) -> QuiesceError {
    let mountpoint = mountpoint.to_path_buf();
    match e {
        FreezeError::NotSupported { .. } => QuiesceError::NotSupported {
            mountpoint,
            fstype: mount.fstype.clone(),
            source: e,
        },
        FreezeError::AlreadyFrozen { .. } => QuiesceError::AlreadyFrozen {
            mountpoint,
            source: e,
        },
        e => QuiesceError::Freeze {
            mountpoint,
            source: e,
        },
    }
}

/// The mount id an open descriptor was reached through (`/proc/self/fdinfo`, "mnt_id:").
fn mount_id_of(file: &File) -> Option<u32> {
    let info = fs::read_to_string(format!("/proc/self/fdinfo/{}", file.as_raw_fd())).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("mnt_id:"))
        .and_then(|v| v.trim().parse().ok())
}

/// One open, verified mountpoint per superblock, in the order first seen.
fn open_candidates(mounts: &[Mount]) -> Result<Vec<Candidate<'_>>, QuiesceError> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for m in mounts {
        if !seen.insert(m.dev()) {
            continue;
        }
        // Bind mounts of the same superblock: any one that really reaches it will do.
        let mut first_err = None;
        let mut chosen = None;
        for same in mounts.iter().filter(|o| o.dev() == m.dev()) {
            match File::open(&same.mountpoint) {
                // A mount on top of the mountpoint would hand us another filesystem.
                Ok(dir) if mount_id_of(&dir) == Some(same.mount_id) => {
                    chosen = Some((same, dir));
                    break;
                }
                Ok(_) => {
                    first_err.get_or_insert(QuiesceError::Shadowed {
                        mountpoint: same.mountpoint.clone(),
                        device: same.dev(),
                    });
                }
                Err(source) => {
                    first_err.get_or_insert(QuiesceError::OpenMountpoint {
                        mountpoint: same.mountpoint.clone(),
                        source,
                    });
                }
            }
        }
        let Some((mount, dir)) = chosen else {
            return Err(first_err.unwrap_or(QuiesceError::Shadowed {
                mountpoint: m.mountpoint.clone(),
                device: m.dev(),
            }));
        };
        let st_dev = dir
            .metadata()
            .map_err(|source| QuiesceError::OpenMountpoint {
                mountpoint: mount.mountpoint.clone(),
                source,
            })?
            .dev();
        out.push(Candidate { mount, dir, st_dev });
    }
    Ok(out)
}

/// Refuses if a candidate's superblock holds a protected path (or `/`).
fn check_protected(
    candidates: &[Candidate<'_>],
    protected: &[PathBuf],
) -> Result<(), QuiesceError> {
    if candidates.is_empty() {
        return Ok(());
    }
    let all_mounts = read_mountinfo()?;
    let root = PathBuf::from("/");
    for path in protected.iter().chain(std::iter::once(&root)) {
        // A protected path that does not exist yet will be created in its nearest ancestor.
        let existing = path
            .ancestors()
            .find(|p| p.symlink_metadata().is_ok())
            .unwrap_or(Path::new("/"));
        // O_PATH: no side effects even for a FIFO or a device node.
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH)
            .open(existing)
            .map_err(|source| QuiesceError::OpenProtected {
                path: path.clone(),
                source,
            })?;
        let st_dev = file
            .metadata()
            .map_err(|source| QuiesceError::OpenProtected {
                path: path.clone(),
                source,
            })?
            .dev();
        // The superblock as mountinfo names it also catches other subvolumes of one btrfs.
        let sb_dev: Option<DevId> = mount_id_of(&file)
            .and_then(|id| all_mounts.iter().find(|m| m.mount_id == id))
            .map(Mount::dev);
        if let Some(c) = candidates
            .iter()
            .find(|c| c.st_dev == st_dev || Some(c.mount.dev()) == sb_dev)
        {
            return Err(QuiesceError::Protected {
                mountpoint: c.mount.mountpoint.clone(),
                protected: path.clone(),
            });
        }
    }
    Ok(())
}

/// Orders candidates so that a filesystem on a loop device comes before the filesystem that
/// holds the loop device's backing file (its writeback needs the outer one unfrozen).
fn order_inner_first(mut candidates: Vec<Candidate<'_>>) -> Vec<Candidate<'_>> {
    // The st_dev of each candidate's backing file, if it sits on a loop device.
    let backing_dev = |c: &Candidate<'_>| -> Option<u64> {
        let source = Path::new(&c.mount.source);
        let backing = loopdev::backing_file(source).ok()??;
        fs::metadata(&backing.path).ok().map(|m| m.dev())
    };
    let outer_of: Vec<Option<u64>> = candidates.iter().map(backing_dev).collect();
    if outer_of.iter().all(Option::is_none) {
        return candidates;
    }
    // Repeatedly take a candidate that no remaining candidate needs frozen after it.
    let mut items: Vec<(Candidate<'_>, Option<u64>)> = candidates.drain(..).zip(outer_of).collect();
    let mut ordered = Vec::with_capacity(items.len());
    while !items.is_empty() {
        let pick = (0..items.len())
            .find(|&i| {
                let dev = items[i].0.st_dev;
                !items
                    .iter()
                    .enumerate()
                    .any(|(j, (_, outer))| j != i && *outer == Some(dev))
            })
            // A cycle cannot happen with real devices; keep the given order if it does.
            .unwrap_or(0);
        ordered.push(items.remove(pick).0);
    }
    ordered
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quiesce::{mounts_of_device, stat_rdev};
    use crate::sys::test_util::{
        mkfs, root_or_skip, sparse_file, write_in_background, LoopGuard, MountGuard, ScratchFs,
    };
    use std::sync::mpsc::Receiver;

    const MIB: u64 = 1 << 20;

    fn mounts_of(device: &Path) -> Vec<Mount> {
        let id = stat_rdev(device).unwrap();
        mounts_of_device(id.major, id.minor).unwrap()
    }

    fn is_frozen(path: &Path) -> bool {
        // FITHAW by path would thaw it; probe with a write that must not complete at once.
        let probe = write_in_background(&path.join(format!("probe-{}", rand_suffix())));
        match probe.recv_timeout(Duration::from_millis(300)) {
            Ok(r) => {
                r.unwrap();
                false
            }
            Err(_) => {
                // Frozen: let the probe finish once the test thaws.
                std::mem::forget(probe);
                true
            }
        }
    }

    fn rand_suffix() -> u64 {
        use rand::Rng;
        rand::thread_rng().gen()
    }

    fn completes(rx: Receiver<io::Result<()>>) {
        rx.recv_timeout(Duration::from_secs(10))
            .expect("write still blocked")
            .unwrap();
    }

    #[test]
    fn bind_mounts_freeze_once_and_journal_first() {
        if !root_or_skip("bind_mounts_freeze_once_and_journal_first") {
            return;
        }
        let fs = ScratchFs::new("ext4", 32 * MIB);
        std::fs::create_dir(fs.mountpoint().join("sub")).unwrap();
        let bind_target = fs.dir.path().join("bind");
        let _bind = MountGuard::bind(&fs.mountpoint().join("sub"), &bind_target);
        let mounts = mounts_of(fs.device());
        assert_eq!(mounts.len(), 2, "{mounts:?}");

        let mut journal = Vec::new();
        let set = FreezeSet::freeze(&mounts, &[], &mut |p| {
            journal.push(p.to_path_buf());
            Ok(())
        })
        .unwrap();
        assert_eq!(journal, vec![fs.mountpoint().to_path_buf()]);
        assert_eq!(set.mountpoints(), vec![fs.mountpoint()]);

        let write = write_in_background(&bind_target.join("through-bind"));
        assert!(write.recv_timeout(Duration::from_millis(300)).is_err());
        let held = set.thaw().unwrap();
        assert!(held >= Duration::from_millis(300), "{held:?}");
        completes(write);
    }

    #[test]
    fn protected_filesystem_is_refused_before_freezing() {
        if !root_or_skip("protected_filesystem_is_refused_before_freezing") {
            return;
        }
        let fs = ScratchFs::new("ext4", 32 * MIB);
        let mounts = mounts_of(fs.device());
        // Not created yet: its nearest existing ancestor decides.
        let store = fs.mountpoint().join("store/objects");
        let err = FreezeSet::freeze(&mounts, std::slice::from_ref(&store), &mut |_| {
            panic!("journal called for a protected filesystem")
        })
        .unwrap_err();
        match &err {
            QuiesceError::Protected {
                mountpoint,
                protected,
            } => {
                assert_eq!(mountpoint, fs.mountpoint());
                assert_eq!(protected, &store);
            }
            other => panic!("expected Protected, got {other:?}"),
        }
        assert_eq!(err.kind(), crate::api::ErrorKind::InvalidArgument);
        assert!(!is_frozen(fs.mountpoint()));

        // `/` is always protected; the journal panics before any freeze if that check fails.
        let root: Vec<Mount> = read_mountinfo()
            .unwrap()
            .into_iter()
            .filter(|m| m.mountpoint == Path::new("/"))
            .collect();
        let err = FreezeSet::freeze(&root, &[], &mut |_| panic!("would freeze /")).unwrap_err();
        assert!(matches!(err, QuiesceError::Protected { .. }), "{err:?}");
    }

    #[test]
    fn second_freeze_is_already_frozen_and_leaves_the_first() {
        if !root_or_skip("second_freeze_is_already_frozen_and_leaves_the_first") {
            return;
        }
        let fs = ScratchFs::new("ext4", 32 * MIB);
        let mounts = mounts_of(fs.device());
        let first = FreezeSet::freeze(&mounts, &[], &mut |_| Ok(())).unwrap();
        let err = FreezeSet::freeze(&mounts, &[], &mut |_| Ok(())).unwrap_err();
        assert!(matches!(err, QuiesceError::AlreadyFrozen { .. }), "{err:?}");
        assert_eq!(err.kind(), crate::api::ErrorKind::Busy);
        let write = write_in_background(&fs.mountpoint().join("after"));
        assert!(write.recv_timeout(Duration::from_millis(200)).is_err());
        first.thaw().unwrap();
        completes(write);
    }

    #[test]
    fn failure_thaws_what_was_frozen() {
        if !root_or_skip("failure_thaws_what_was_frozen") {
            return;
        }
        let a = ScratchFs::new("ext4", 32 * MIB);
        let b = ScratchFs::new("ext4", 32 * MIB);
        let mut mounts = mounts_of(a.device());
        mounts.extend(mounts_of(b.device()));
        let mut calls = 0;
        let err = FreezeSet::freeze(&mounts, &[], &mut |_| {
            calls += 1;
            if calls == 2 {
                Err(io::Error::other("journal disk full"))
            } else {
                Ok(())
            }
        })
        .unwrap_err();
        assert!(matches!(err, QuiesceError::Journal { .. }), "{err:?}");
        assert!(
            !sysfreeze::thaw_path(a.mountpoint()).unwrap(),
            "a stayed frozen"
        );
        assert!(
            !sysfreeze::thaw_path(b.mountpoint()).unwrap(),
            "b was frozen"
        );
    }

    #[test]
    fn no_freeze_support_is_reported() {
        if !root_or_skip("no_freeze_support_is_reported") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let _tmpfs = MountGuard::mount(Path::new("none"), &dir.path().join("t"), "tmpfs");
        let mounts: Vec<Mount> = read_mountinfo()
            .unwrap()
            .into_iter()
            .filter(|m| m.mountpoint == dir.path().join("t"))
            .collect();
        assert_eq!(mounts.len(), 1);
        match FreezeSet::freeze(&mounts, &[], &mut |_| Ok(())) {
            Err(e) => {
                assert!(e.is_not_supported(), "{e:?}");
                assert!(e.to_string().contains("crash-consistent"), "{e}");
            }
            Ok(set) => {
                set.thaw().unwrap();
                eprintln!("SKIPPED no_freeze_support_is_reported: this kernel freezes tmpfs");
            }
        }
    }

    #[test]
    fn watchdog_thaws_a_hung_capture_and_thaw_says_so() {
        if !root_or_skip("watchdog_thaws_a_hung_capture_and_thaw_says_so") {
            return;
        }
        let fs = ScratchFs::new("ext4", 32 * MIB);
        let mounts = mounts_of(fs.device());
        let set = FreezeSet::freeze(&mounts, &[], &mut |_| Ok(())).unwrap();
        let mountpoint = fs.mountpoint().to_path_buf();
        let result = set.hold(Duration::from_millis(200), || {
            // The capture "hangs"; the watchdog must release writers meanwhile.
            let write = write_in_background(&mountpoint.join("released-by-watchdog"));
            write.recv_timeout(Duration::from_secs(10)).is_ok()
        });
        match result {
            Err(QuiesceError::WatchdogFired { timeout, held }) => {
                assert_eq!(timeout, Duration::from_millis(200));
                assert!(held >= timeout && held < Duration::from_secs(5), "{held:?}");
            }
            other => panic!("expected WatchdogFired, got {other:?}"),
        }
        assert!(!sysfreeze::thaw_path(fs.mountpoint()).unwrap());
    }

    #[test]
    fn hold_within_timeout_reports_freeze_time() {
        if !root_or_skip("hold_within_timeout_reports_freeze_time") {
            return;
        }
        let fs = ScratchFs::new("ext4", 32 * MIB);
        let set = FreezeSet::freeze(&mounts_of(fs.device()), &[], &mut |_| Ok(())).unwrap();
        let handle = set.thaw_handle();
        let (value, held) = set
            .hold(Duration::from_secs(30), || {
                std::thread::sleep(Duration::from_millis(50));
                42
            })
            .unwrap();
        assert_eq!(value, 42);
        assert!(held >= Duration::from_millis(50) && held < Duration::from_secs(30));
        assert!(!handle.thaw().unwrap(), "already thawed");
    }

    #[test]
    fn drop_thaws_the_set() {
        if !root_or_skip("drop_thaws_the_set") {
            return;
        }
        let fs = ScratchFs::new("ext4", 32 * MIB);
        let set = FreezeSet::freeze(&mounts_of(fs.device()), &[], &mut |_| Ok(())).unwrap();
        drop(set);
        completes(write_in_background(&fs.mountpoint().join("after-drop")));
    }

    #[test]
    fn stacked_filesystems_freeze_inner_first() {
        if !root_or_skip("stacked_filesystems_freeze_inner_first") {
            return;
        }
        let outer = ScratchFs::new("ext4", 96 * MIB);
        let image = sparse_file(&outer.mountpoint().join("inner.img"), 32 * MIB);
        let inner_loop = LoopGuard::attach(&image, false);
        mkfs("ext4", inner_loop.device());
        let inner_mnt = outer.dir.path().join("inner");
        let _inner = MountGuard::mount(inner_loop.device(), &inner_mnt, "ext4");
        // Given outer first on purpose: freezing it first would hang the inner freeze.
        let mut mounts = mounts_of(outer.device());
        mounts.extend(mounts_of(inner_loop.device()));
        let mut journal = Vec::new();
        let set = FreezeSet::freeze(&mounts, &[], &mut |p| {
            journal.push(p.to_path_buf());
            Ok(())
        })
        .unwrap();
        assert_eq!(
            set.mountpoints(),
            vec![inner_mnt.as_path(), outer.mountpoint()]
        );
        assert_eq!(
            journal,
            vec![inner_mnt.clone(), outer.mountpoint().to_path_buf()]
        );
        set.thaw().unwrap();
    }

    #[test]
    fn recovery_thaws_what_a_dead_process_left_frozen() {
        if !root_or_skip("recovery_thaws_what_a_dead_process_left_frozen") {
            return;
        }
        let fs = ScratchFs::new("ext4", 32 * MIB);
        // A process that freezes and exits: its freeze stays.
        let status = std::process::Command::new("fsfreeze")
            .arg("-f")
            .arg(fs.mountpoint())
            .status()
            .unwrap();
        assert!(status.success());
        let journal = vec![fs.mountpoint().to_path_buf()];
        let write = write_in_background(&fs.mountpoint().join("after-recovery"));
        let results = thaw_recorded(&journal);
        assert_eq!(results.len(), 1);
        assert!(results[0].1.as_ref().unwrap(), "was frozen");
        completes(write);
        assert!(!thaw_recorded(&journal)[0].1.as_ref().unwrap());
    }

    #[test]
    fn btrfs_subvolumes_share_one_superblock() {
        if !root_or_skip("btrfs_subvolumes_share_one_superblock") {
            return;
        }
        let fs = ScratchFs::new("btrfs", 200 * MIB);
        for sub in ["a", "b"] {
            let out = std::process::Command::new("btrfs")
                .args(["subvolume", "create"])
                .arg(fs.mountpoint().join(sub))
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
        }
        let m1 = fs.dir.path().join("m1");
        let m2 = fs.dir.path().join("m2");
        let _a = MountGuard::mount_with(fs.device(), &m1, "btrfs", Some("subvol=a"));
        let _b = MountGuard::mount_with(fs.device(), &m2, "btrfs", Some("subvol=b"));
        // mountinfo names btrfs by an anonymous device: found through the source instead.
        let mounts = mounts_of(fs.device());
        assert_eq!(mounts.len(), 3, "{mounts:?}");

        let set = FreezeSet::freeze(&mounts, &[], &mut |_| Ok(())).unwrap();
        assert_eq!(set.mountpoints().len(), 1);
        let write = write_in_background(&m2.join("blocked"));
        assert!(write.recv_timeout(Duration::from_millis(200)).is_err());
        set.thaw().unwrap();
        completes(write);

        // Subvolumes have their own st_dev, yet freezing one freezes the other: protected.
        let only_a: Vec<Mount> = mounts
            .iter()
            .filter(|m| m.mountpoint == m1)
            .cloned()
            .collect();
        let err = FreezeSet::freeze(&only_a, &[m2.join("store")], &mut |_| {
            panic!("journal called for a protected filesystem")
        })
        .unwrap_err();
        assert!(matches!(err, QuiesceError::Protected { .. }), "{err:?}");
    }

    #[test]
    fn panic_midway_thaws_what_was_frozen() {
        if !root_or_skip("panic_midway_thaws_what_was_frozen") {
            return;
        }
        let a = ScratchFs::new("ext4", 32 * MIB);
        let b = ScratchFs::new("ext4", 32 * MIB);
        let mut mounts = mounts_of(a.device());
        mounts.extend(mounts_of(b.device()));
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut calls = 0;
            FreezeSet::freeze(&mounts, &[], &mut |_| {
                calls += 1;
                assert!(calls < 2, "journal panics with the first filesystem frozen");
                Ok(())
            })
        }));
        assert!(outcome.is_err());
        assert!(
            !sysfreeze::thaw_path(a.mountpoint()).unwrap(),
            "a left frozen"
        );
        assert!(!sysfreeze::thaw_path(b.mountpoint()).unwrap());
    }
}

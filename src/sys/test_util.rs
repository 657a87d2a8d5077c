//! Test helpers for root tests on real kernel objects: sparse images, loop devices, mkfs,
//! mounts. Every guard undoes its kernel state in `Drop`, also when the test fails, unless
//! `BLOCKSNAP_KEEP_TEST_DEVICES=1` asks to keep it for debugging.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::loopdev::{self, LoopAttachment, LoopError};

/// True if the test may use root-only kernel features. Without root it skips (returns false,
/// saying so on stderr), or fails when `BLOCKSNAP_REQUIRE_ROOT_TESTS=1`.
pub fn root_or_skip(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() && Path::new("/dev/loop-control").exists() {
        return true;
    }
    if std::env::var("BLOCKSNAP_REQUIRE_ROOT_TESTS").as_deref() == Ok("1") {
        panic!("{test}: needs root and /dev/loop-control (BLOCKSNAP_REQUIRE_ROOT_TESTS=1)");
    }
    eprintln!("SKIPPED {test}: needs root and /dev/loop-control");
    false
}

fn keep_devices() -> bool {
    std::env::var("BLOCKSNAP_KEEP_TEST_DEVICES").as_deref() == Ok("1")
}

/// Creates a sparse file of `size` bytes.
pub fn sparse_file(path: &Path, size: u64) -> PathBuf {
    let f = File::create(path).expect("create sparse image");
    f.set_len(size).expect("size sparse image");
    path.to_path_buf()
}

/// A loop device attached for a test, detached on drop.
///
/// Tests run in parallel and loop numbers are reused at once, so the guard detaches only while
/// the device is still backed by its own file.
pub struct LoopGuard {
    pub attachment: LoopAttachment,
    backing: PathBuf,
    armed: bool,
}

impl LoopGuard {
    pub fn attach(backing: &Path, direct_io: bool) -> LoopGuard {
        let attachment = loopdev::attach(backing, direct_io).expect("attach loop device");
        LoopGuard {
            attachment,
            backing: backing.to_path_buf(),
            armed: true,
        }
    }

    pub fn device(&self) -> &Path {
        &self.attachment.device
    }

    /// Detaches now (the test's own detach) and disarms the guard.
    pub fn detach(mut self) -> Result<loopdev::Detach, LoopError> {
        self.armed = false;
        loopdev::detach(&self.attachment.device)
    }
}

impl Drop for LoopGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if keep_devices() {
            eprintln!("keeping {}", self.attachment.device.display());
            return;
        }
        // A just-unmounted device can stay claimed for a moment; retry briefly.
        let start = Instant::now();
        loop {
            match loopdev::detach_backing(&self.attachment.device, &self.backing) {
                Ok(_) | Err(LoopError::NotAttached { .. } | LoopError::NotBackedBy { .. }) => {
                    return
                }
                Err(LoopError::DeviceBusy { .. }) if start.elapsed() < Duration::from_secs(5) => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    eprintln!("cannot detach {}: {e}", self.attachment.device.display());
                    return;
                }
            }
        }
    }
}

/// Runs mkfs for `fstype` (ext4, xfs, btrfs) on `device`, quietly.
pub fn mkfs(fstype: &str, device: &Path) {
    let mut cmd = Command::new(format!("mkfs.{fstype}"));
    match fstype {
        "ext4" => cmd.args(["-q", "-F"]),
        "xfs" | "btrfs" => cmd.args(["-q", "-f"]),
        other => panic!("no mkfs recipe for {other}"),
    };
    let out = cmd.arg(device).output().expect("run mkfs");
    assert!(
        out.status.success(),
        "mkfs.{fstype} {} failed: {}",
        device.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A mount made for a test, unmounted on drop.
pub struct MountGuard {
    pub target: PathBuf,
}

impl MountGuard {
    pub fn mount(device: &Path, target: &Path, fstype: &str) -> MountGuard {
        MountGuard::mount_with(device, target, fstype, None)
    }

    /// Mounts with filesystem-specific options (`data`), e.g. `subvol=a` for btrfs.
    pub fn mount_with(
        device: &Path,
        target: &Path,
        fstype: &str,
        data: Option<&str>,
    ) -> MountGuard {
        std::fs::create_dir_all(target).expect("create mountpoint");
        mount(Some(device), target, Some(fstype), MsFlags::empty(), data)
            .unwrap_or_else(|e| panic!("mount {} on {}: {e}", device.display(), target.display()));
        MountGuard {
            target: target.to_path_buf(),
        }
    }

    pub fn bind(source: &Path, target: &Path) -> MountGuard {
        std::fs::create_dir_all(target).expect("create bind mountpoint");
        mount(
            Some(source),
            target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .unwrap_or_else(|e| panic!("bind {} on {}: {e}", source.display(), target.display()));
        MountGuard {
            target: target.to_path_buf(),
        }
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if keep_devices() {
            eprintln!("keeping mount {}", self.target.display());
            return;
        }
        let start = Instant::now();
        while let Err(e) = umount2(&self.target, MntFlags::empty()) {
            if start.elapsed() > Duration::from_secs(5) {
                eprintln!(
                    "cannot unmount {}: {e}; detaching lazily",
                    self.target.display()
                );
                let _ = umount2(&self.target, MntFlags::MNT_DETACH);
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A fresh filesystem on a loop device over a sparse image in its own temporary directory.
/// Fields drop in order: unmount, detach, remove the directory.
pub struct ScratchFs {
    pub mount: MountGuard,
    pub loop_dev: LoopGuard,
    /// Held so that the image outlives the mount and the loop device.
    #[allow(dead_code)]
    pub dir: tempfile::TempDir,
}

impl ScratchFs {
    /// `fstype` as for [`mkfs`]; xfs needs at least 300 MiB.
    pub fn new(fstype: &str, size: u64) -> ScratchFs {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = sparse_file(&dir.path().join("fs.img"), size);
        let loop_dev = LoopGuard::attach(&image, false);
        mkfs(fstype, loop_dev.device());
        let mount = MountGuard::mount(loop_dev.device(), &dir.path().join("mnt"), fstype);
        ScratchFs {
            mount,
            loop_dev,
            dir,
        }
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mount.target
    }

    pub fn device(&self) -> &Path {
        self.loop_dev.device()
    }
}

impl Drop for ScratchFs {
    fn drop(&mut self) {
        // A test that failed while frozen must not leave the filesystem frozen (nor unmount
        // it frozen); then the fields unmount, detach and remove.
        if !keep_devices() {
            let _ = super::freeze::thaw_path(&self.mount.target);
        }
    }
}

/// Creates `path` with some bytes and fsyncs it on a thread; the receiver gets the outcome.
/// On a frozen filesystem this blocks until the thaw, without hanging the test itself.
pub fn write_in_background(path: &Path) -> std::sync::mpsc::Receiver<std::io::Result<()>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        let result = (|| {
            use std::io::Write;
            let mut f = File::create(&path)?;
            f.write_all(b"written")?;
            f.sync_all()
        })();
        let _ = tx.send(result);
    });
    rx
}

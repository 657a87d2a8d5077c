//! Which processes hold a block device open for writing: a scan of `/proc/*/fd`.
//!
//! A descriptor matches when its target is a block device with the same `st_rdev` (so any
//! node or symlink for the device counts, not just one name), and it is a writer when the
//! access mode in `/proc/<pid>/fdinfo/<fd>` is O_WRONLY or O_RDWR. Processes come and go
//! during the scan; whatever vanishes or cannot be read is skipped. Mounted filesystems hold
//! the device without a descriptor: find them with `mountinfo`.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::devices::{stat_rdev, DevId};
use super::QuiesceError;

/// A process found holding a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    pub pid: u32,
    /// `/proc/<pid>/comm`.
    pub name: String,
}

impl std::fmt::Display for ProcessInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (pid {})", self.name, self.pid)
    }
}

/// Processes other than this one with the block device `device` open for writing, by pid.
pub fn open_writers(device: &Path) -> Result<Vec<ProcessInfo>, QuiesceError> {
    let target = stat_rdev(device)?;
    let me = std::process::id();
    let proc_dir = Path::new("/proc");
    let entries = fs::read_dir(proc_dir).map_err(|source| QuiesceError::ScanProc {
        path: proc_dir.to_path_buf(),
        source,
    })?;
    let mut writers = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        if holds_for_writing(pid, target) {
            let name = fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|s| s.trim_end().to_string())
                .unwrap_or_else(|_| "?".to_string());
            writers.push(ProcessInfo { pid, name });
        }
    }
    writers.sort_by_key(|p| p.pid);
    Ok(writers)
}

fn holds_for_writing(pid: u32, target: DevId) -> bool {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        let link = fd.path();
        is_device(&link, target) && is_write_mode(pid, &fd.file_name().to_string_lossy())
    })
}

fn is_device(link: &PathBuf, target: DevId) -> bool {
    // Sockets, pipes and anonymous inodes cannot be the device: skip their stat.
    match fs::read_link(link) {
        Ok(t) if t.is_absolute() => {}
        _ => return false,
    }
    fs::metadata(link)
        .is_ok_and(|m| m.file_type().is_block_device() && DevId::from_dev_t(m.rdev()) == target)
}

fn is_write_mode(pid: u32, fd: &str) -> bool {
    let Ok(info) = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")) else {
        return false;
    };
    info.lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        .is_some_and(|flags| {
            let mode = flags & libc::O_ACCMODE as u32;
            mode == libc::O_WRONLY as u32 || mode == libc::O_RDWR as u32
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::test_util::{root_or_skip, sparse_file, LoopGuard};
    use std::fs::File;
    use std::process::{Child, Command};

    /// Kills and reaps the helper process on drop.
    struct ChildGuard(Child);

    impl Drop for ChildGuard {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn sleeper_holding(file: File) -> ChildGuard {
        ChildGuard(
            Command::new("sleep")
                .arg("60")
                .stdin(file)
                .spawn()
                .expect("spawn sleep"),
        )
    }

    fn wait_until_holding(pid: u32, device: &Path) {
        let target = stat_rdev(device).unwrap();
        for _ in 0..200 {
            if holds(pid, target) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("pid {pid} never held {}", device.display());
    }

    fn holds(pid: u32, target: DevId) -> bool {
        fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|fds| fds.flatten().any(|fd| is_device(&fd.path(), target)))
            .unwrap_or(false)
    }

    #[test]
    fn finds_writers_not_readers_nor_itself() {
        if !root_or_skip("finds_writers_not_readers_nor_itself") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let image = sparse_file(&dir.path().join("w.img"), 8 << 20);
        let guard = LoopGuard::attach(&image, false);
        let device = guard.device().to_path_buf();
        assert!(open_writers(&device).unwrap().is_empty());

        let rw = File::options()
            .read(true)
            .write(true)
            .open(&device)
            .unwrap();
        let writer = sleeper_holding(rw);
        let reader = sleeper_holding(File::open(&device).unwrap());
        // This process holds it for writing too, and must not list itself.
        let _own = File::options().write(true).open(&device).unwrap();
        wait_until_holding(writer.0.id(), &device);
        wait_until_holding(reader.0.id(), &device);

        let found = open_writers(&device).unwrap();
        assert_eq!(
            found,
            vec![ProcessInfo {
                pid: writer.0.id(),
                name: "sleep".to_string()
            }]
        );
        // Any name for the device finds the same, compared by st_rdev.
        let link = dir.path().join("link-to-dev");
        std::os::unix::fs::symlink(&device, &link).unwrap();
        assert_eq!(open_writers(&link).unwrap(), found);

        let usage = crate::quiesce::device_use(&device).unwrap();
        assert!(usage.mounts.is_empty());
        let err = usage.ensure_no_writers(&device).unwrap_err();
        assert_eq!(err.kind(), crate::api::ErrorKind::Busy);
        let message = err.to_string();
        assert!(
            message.contains(&format!("sleep (pid {})", writer.0.id())),
            "{message}"
        );

        drop(writer);
        assert!(open_writers(&device).unwrap().is_empty());
        drop(reader);
    }

    #[test]
    fn refuses_non_block_device() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain");
        fs::write(&file, b"x").unwrap();
        assert!(matches!(
            open_writers(&file),
            Err(QuiesceError::NotBlockDevice { .. })
        ));
    }
}

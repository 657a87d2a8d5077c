//! Shared helpers of the integration tests: a daemon per test in a temp dir, the control
//! command, root checks, and guards that clean up mounts, loop devices and processes even
//! when a test fails. `BLOCKSNAP_KEEP_TEST_DEVICES=1` keeps devices for debugging.

#![allow(dead_code)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// True when the test may run as root. Without root it is skipped, unless
/// `BLOCKSNAP_REQUIRE_ROOT_TESTS=1`, where a missing privilege fails the test.
pub fn root_or_skip(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("BLOCKSNAP_REQUIRE_ROOT_TESTS").as_deref() == Ok("1") {
        panic!("{test} needs root and BLOCKSNAP_REQUIRE_ROOT_TESTS=1 is set");
    }
    eprintln!(
        "SKIPPED {test}: needs root (set BLOCKSNAP_REQUIRE_ROOT_TESTS=1 to make this a failure)"
    );
    false
}

/// A tool the test needs; missing it is a failure under BLOCKSNAP_REQUIRE_ROOT_TESTS=1.
pub fn have_tool(tool: &str) -> bool {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok && std::env::var("BLOCKSNAP_REQUIRE_ROOT_TESTS").as_deref() == Ok("1") {
        panic!("{tool} is not installed (needed by this test)");
    }
    ok
}

fn keep_devices() -> bool {
    std::env::var("BLOCKSNAP_KEEP_TEST_DEVICES").as_deref() == Ok("1")
}

/// Runs a command, panicking with its output when it fails.
pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("spawn sh");
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A daemon of this test's own, with its state dir and sockets in a temp dir.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub config: PathBuf,
    /// `FAILPOINTS` for the next `spawn` (a `--features failpoints` build): see
    /// `src/failpoint.rs`. Empty means none.
    pub failpoints: String,
    /// Install `failpoints` only once the daemon has recovered (`FAILPOINTS_ARM=ready`).
    pub failpoints_after_ready: bool,
    child: Option<Child>,
}

impl Daemon {
    /// Starts a daemon with built-in defaults plus `extra_config` (TOML).
    pub fn start(extra_config: &str) -> Daemon {
        Daemon::start_in(
            tempfile::Builder::new()
                .prefix("blocksnap-test-")
                .tempdir()
                .expect("tempdir"),
            extra_config,
        )
    }

    /// Starts a daemon whose state dir is `state_dir` (e.g. on a test filesystem).
    pub fn start_with_state_dir(state_dir: &Path, extra_config: &str) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("blocksnap-test-")
            .tempdir()
            .expect("tempdir");
        let mut d = Daemon {
            socket: dir.path().join("run/blocksnap.sock"),
            state_dir: state_dir.to_path_buf(),
            config: dir.path().join("blocksnap.toml"),
            dir,
            failpoints: String::new(),
            failpoints_after_ready: false,
            child: None,
        };
        std::fs::write(&d.config, extra_config).expect("write config");
        d.spawn();
        d
    }

    fn start_in(dir: tempfile::TempDir, extra_config: &str) -> Daemon {
        let mut d = Daemon {
            socket: dir.path().join("run/blocksnap.sock"),
            state_dir: dir.path().join("state"),
            config: dir.path().join("blocksnap.toml"),
            dir,
            failpoints: String::new(),
            failpoints_after_ready: false,
            child: None,
        };
        std::fs::write(&d.config, extra_config).expect("write config");
        d.spawn();
        d
    }

    /// (Re)starts the daemon process on the same state and waits until it answers.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_blocksnapd"))
            .arg("--config")
            .arg(&self.config)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--socket")
            .arg(&self.socket)
            .env("BLOCKSNAP_LOG", "blocksnap=debug,blocksnapd=debug")
            .env("FAILPOINTS", &self.failpoints)
            .env(
                "FAILPOINTS_ARM",
                if self.failpoints_after_ready {
                    "ready"
                } else {
                    ""
                },
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start blocksnapd");
        self.child = Some(child);
        self.wait_ready();
    }

    /// Waits by connecting (never by sleeping a fixed time).
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                // Bound and recovered: the socket is bound before recovery, so ask something.
                if self.try_call(&["describe-jobs"]).is_some() {
                    return;
                }
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("blocksnapd exited with {status}: {}", self.log());
                }
            }
            assert!(
                Instant::now() < deadline,
                "blocksnapd did not become ready: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Whether the daemon has exited (e.g. killed itself at a `kill` failpoint); reaps it.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten());
        if status.is_some() {
            self.child = None;
        }
        status
    }

    /// SIGKILLs the daemon (only the process this test started).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERMs the daemon and waits for it to exit; returns its exit success.
    pub fn stop(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                return s.success();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn restart(&mut self) {
        assert!(self.stop(), "daemon did not stop cleanly: {}", self.log());
        self.spawn();
    }

    /// Runs `blocksnap ARGS` against this daemon.
    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_blocksnap"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run blocksnap")
    }

    fn try_call(&self, args: &[&str]) -> Option<Value> {
        let out = self.run(args);
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Runs a verb and returns its JSON, asserting the exit status matches `ret_code`.
    pub fn call(&self, args: &[&str]) -> Value {
        let out = self.run(args);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{args:?}: not JSON ({e}): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        let code = v["ret_code"].as_i64().unwrap_or(-1);
        assert_eq!(
            out.status.success(),
            code == 0,
            "{args:?}: exit status {:?} with ret_code {code}: {v}",
            out.status
        );
        v
    }

    /// Runs a verb that must succeed.
    pub fn ok(&self, args: &[&str]) -> Value {
        let v = self.call(args);
        assert_eq!(
            v["ret_code"],
            0,
            "{args:?} failed: {v}\n--- daemon log ---\n{}",
            tail(&self.log())
        );
        v
    }

    /// Runs a verb that must fail with `code`.
    pub fn fails(&self, args: &[&str], code: i64) -> Value {
        let v = self.call(args);
        assert_eq!(v["ret_code"], code, "{args:?}: expected {code}, got {v}");
        assert!(
            v["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{args:?}: no message: {v}"
        );
        v
    }

    /// Waits for a job to end; returns its item.
    pub fn wait_job(&self, job: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let v = self.ok(&["describe-jobs", "-j", job]);
            let j = v["job_set"][0].clone();
            match j["status"].as_str() {
                Some("successful") | Some("failed") => return j,
                _ => {}
            }
            assert!(Instant::now() < deadline, "job {job} did not end: {j}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs a job-starting verb and waits for the job to succeed; returns the response.
    pub fn job(&self, args: &[&str]) -> Value {
        let v = self.ok(args);
        let job = v["job_id"]
            .as_str()
            .unwrap_or_else(|| panic!("{args:?}: no job_id: {v}"))
            .to_string();
        let j = self.wait_job(&job);
        assert_eq!(
            j["status"],
            "successful",
            "{args:?}: job failed: {j}\n--- daemon log ---\n{}",
            tail(&self.log())
        );
        v
    }

    /// Creates an available volume and returns its id.
    pub fn volume(&self, size: &str, name: &str) -> String {
        let v = self.job(&["create-volumes", "-s", size, "-N", name]);
        v["volumes"][0].as_str().expect("volume id").to_string()
    }

    pub fn describe_volume(&self, id: &str) -> Value {
        let v = self.ok(&["describe-volumes", "-v", id]);
        v["volume_set"][0].clone()
    }

    pub fn describe_snapshot(&self, id: &str) -> Value {
        let v = self.ok(&["describe-snapshots", "-n", id]);
        v["snapshot_set"][0].clone()
    }

    /// Attaches a loop volume and returns its device.
    pub fn attach(&self, id: &str) -> PathBuf {
        self.ok(&["attach-volumes", "-v", id]);
        PathBuf::from(self.describe_volume(id)["device"].as_str().expect("device"))
    }

    /// Takes a full (`-F 1`) or incremental snapshot of `vol`, waits, and describes it.
    pub fn snapshot(&self, vol: &str, full: bool) -> Value {
        let v = self.job(&[
            "create-snapshots",
            "-r",
            vol,
            "-F",
            if full { "1" } else { "0" },
        ]);
        self.describe_snapshot(v["snapshots"][0].as_str().expect("snapshot id"))
    }

    /// Restores `ss` into a new volume, checks it is `available`, and returns the new
    /// image's sha256 (the volume is deleted again).
    pub fn restore_sha(&self, ss: &str) -> String {
        let v = self.job(&["create-volume-from-snapshot", "-s", ss, "-N", "restored"]);
        let vol = v["volume_id"].as_str().expect("volume_id").to_string();
        assert_eq!(self.describe_volume(&vol)["status"], "available");
        let sha = sha256(&self.image(&vol));
        self.ok(&["delete-volumes", "-v", &vol]);
        sha
    }

    /// Creates an nbd volume of `size`, attaches it and returns (volume id, NBD URI).
    pub fn nbd_volume(&self, size: &str) -> (String, String) {
        let v = self.job(&["create-volumes", "-s", size, "--backend", "nbd"]);
        let vol = v["volumes"][0].as_str().expect("volume id").to_string();
        self.ok(&["attach-volumes", "-v", &vol]);
        let uri = self.nbd_uri(&vol);
        (vol, uri)
    }

    /// The NBD URI of an attached nbd volume.
    pub fn nbd_uri(&self, vol: &str) -> String {
        self.describe_volume(vol)["device"]
            .as_str()
            .expect("device")
            .to_string()
    }

    /// sha256 of an NBD export's whole content, read by nbdcopy.
    pub fn export_sha(&self, uri: &str, name: &str) -> String {
        let out = self.dir.path().join(format!("{name}.raw"));
        sh(&format!("nbdcopy '{uri}' {}", out.display()));
        let sha = sha256(&out);
        let _ = std::fs::remove_file(out);
        sha
    }

    pub fn image(&self, id: &str) -> PathBuf {
        self.state_dir.join("volumes").join(format!("{id}.img"))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
        if keep_devices() {
            eprintln!("keeping test devices of {}", self.state_dir.display());
            return;
        }
        detach_loops_under(&self.state_dir);
    }
}

/// Detaches every loop device whose backing file lies under `dir`.
pub fn detach_loops_under(dir: &Path) {
    let Ok(out) = Command::new("losetup")
        .args(["-l", "-n", "-O", "NAME,BACK-FILE"])
        .output()
    else {
        return;
    };
    let prefix = dir.to_string_lossy().into_owned();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let mut parts = line.split_whitespace();
        if let (Some(dev), Some(back)) = (parts.next(), parts.next()) {
            if back.starts_with(&prefix) {
                let _ = Command::new("losetup").args(["-d", dev]).status();
            }
        }
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// A mount made by a test; unmounted (lazily if busy) on drop, thawing first if needed.
pub struct Mount {
    pub target: PathBuf,
}

impl Mount {
    pub fn new(device: &Path, target: &Path) -> Mount {
        std::fs::create_dir_all(target).expect("mkdir mountpoint");
        sh(&format!("mount {} {}", device.display(), target.display()));
        Mount {
            target: target.to_path_buf(),
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if keep_devices() {
            return;
        }
        // A test that failed mid-freeze must not leave the filesystem frozen.
        let _ = Command::new("fsfreeze")
            .arg("-u")
            .arg(&self.target)
            .stderr(Stdio::null())
            .status();
        let ok = Command::new("umount")
            .arg(&self.target)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.target).status();
        }
    }
}

/// A scratch filesystem image (e.g. xfs for reflink) mounted at a temp dir.
pub struct ScratchFs {
    pub dir: tempfile::TempDir,
    pub mount: Option<Mount>,
    pub device: String,
}

impl ScratchFs {
    pub fn new(fstype: &str, size: &str) -> ScratchFs {
        let dir = tempfile::Builder::new()
            .prefix("blocksnap-fs-")
            .tempdir()
            .expect("tempdir");
        let image = dir.path().join("fs.img");
        sh(&format!("truncate -s {size} {}", image.display()));
        let mkfs = match fstype {
            "xfs" => format!("mkfs.xfs -q -m reflink=1 {}", image.display()),
            "btrfs" => format!("mkfs.btrfs -q {}", image.display()),
            other => format!("mkfs.{other} -q -F {}", image.display()),
        };
        sh(&mkfs);
        let device = sh(&format!("losetup -f --show {}", image.display()))
            .trim()
            .to_string();
        let mount = Mount::new(Path::new(&device), &dir.path().join("mnt"));
        ScratchFs {
            dir,
            mount: Some(mount),
            device,
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }
}

impl Drop for ScratchFs {
    fn drop(&mut self) {
        drop(self.mount.take());
        if !keep_devices() {
            let _ = Command::new("losetup").args(["-d", &self.device]).status();
        }
    }
}

/// sha256 of a file or device.
/// Runs one qemu-io command against an NBD URI (raw format); panics if it fails.
pub fn qemu_io(uri: &str, cmd: &str) {
    sh(&format!("qemu-io -f raw -c '{cmd}' '{uri}' >/dev/null"));
}

/// True when writing to the filesystem at `dir` completes within a few seconds (not frozen).
pub fn writable(dir: &Path) -> bool {
    Command::new("timeout")
        .args([
            "5",
            "sh",
            "-c",
            &format!(
                "echo x > {}/.probe && sync -f {}/.probe",
                dir.display(),
                dir.display()
            ),
        ])
        .status()
        .is_ok_and(|s| s.success())
}

pub fn sha256(path: &Path) -> String {
    sh(&format!("sha256sum {}", path.display()))
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

//! Shared helpers of the NBD integration tests: a server on a socket in a `TempDir`, a
//! runner for real client programs with a time limit, RAII guards for everything a test
//! starts, and a minimal raw protocol client for hostile and edge-case traffic.
#![allow(dead_code)]

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use blocksnap::nbd::{nbd_uri, Export, FileExport, NbdServer};
use tempfile::TempDir;

pub const EXPORT: &str = "vol-test0001";

/// A server serving one file export on a unix socket, stopped and joined on drop.
pub struct Served {
    pub dir: TempDir,
    pub sock: PathBuf,
    pub image: PathBuf,
    pub server: NbdServer,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Served {
    /// A sparse image of `size` bytes exported as [`EXPORT`].
    pub fn start(size: u64) -> Served {
        Self::start_with(size, |path| {
            Arc::new(FileExport::open(path).unwrap()) as Arc<dyn Export>
        })
    }

    /// Like `start`, but the export is built by `make` from the image path.
    pub fn start_with(size: u64, make: impl FnOnce(&Path) -> Arc<dyn Export>) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("image.raw");
        let f = fs::File::create(&image).unwrap();
        f.set_len(size).unwrap();
        drop(f);
        let sock = dir.path().join("nbd.sock");
        let server = NbdServer::new();
        server.add_export(EXPORT, make(&image)).unwrap();
        // Bound here, so the socket accepts connections before this returns.
        let std_listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let srv = server.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::UnixListener::from_std(std_listener).unwrap();
                srv.serve_unix(listener, async {
                    let _ = stopped.await;
                })
                .await;
            });
        });
        Served {
            dir,
            sock,
            image,
            server,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn uri(&self) -> String {
        nbd_uri(EXPORT, &self.sock)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Served {
    /// Completes the server's shutdown future and waits for `serve_unix` to return.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether `prog` is on PATH. Missing tools skip the test, or fail it when
/// `BLOCKSNAP_REQUIRE_ROOT_TESTS=1`.
pub fn have(prog: &str) -> bool {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
        .unwrap_or(false);
    if !found {
        if std::env::var("BLOCKSNAP_REQUIRE_ROOT_TESTS").as_deref() == Ok("1") {
            panic!("{prog} is required (BLOCKSNAP_REQUIRE_ROOT_TESTS=1) but not installed");
        }
        eprintln!("SKIP: {prog} is not installed");
    }
    found
}

/// Whether we are root (loop devices, mounts); same skip/fail rule as `have`.
pub fn is_root() -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        if std::env::var("BLOCKSNAP_REQUIRE_ROOT_TESTS").as_deref() == Ok("1") {
            panic!("root is required (BLOCKSNAP_REQUIRE_ROOT_TESTS=1)");
        }
        eprintln!("SKIP: not root");
    }
    root
}

/// Runs a program to completion under `timeout(1)` so a hung client cannot hang the test.
pub fn run(prog: &str, args: &[&str]) -> Output {
    let out = Command::new("timeout")
        .args(["-k", "5", "120", prog])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    out
}

/// Runs a program and insists it succeeded; returns its stdout.
pub fn run_ok(prog: &str, args: &[&str]) -> String {
    let out = run(prog, args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{prog} {args:?} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    stdout
}

/// `qemu-io` commands against `uri`; any failed command or pattern mismatch fails.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(uri);
    let out = run("qemu-io", &args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("failed") && !text.contains("rror"),
        "qemu-io {cmds:?} on {uri}:\n{text}"
    );
    text
}

/// A child process killed and reaped on drop (only this pid, never by name).
pub struct ChildGuard(pub Option<Child>);

impl ChildGuard {
    /// Waits up to `limit` for a clean exit; true if it exited.
    pub fn wait_for_exit(&mut self, limit: Duration) -> bool {
        let Some(child) = self.0.as_mut() else {
            return true;
        };
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(_)) = child.try_wait() {
                self.0 = None;
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A mount point unmounted on drop (lazily if busy).
pub struct MountGuard(pub PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// A loop device detached on drop.
pub struct LoopGuard(pub String);

impl Drop for LoopGuard {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// Waits until `path` exists (e.g. a pid file written when a helper is ready).
pub fn wait_for_path(path: &Path, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if path.exists() && fs::metadata(path).map(|m| m.len() > 0).unwrap_or(false) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

pub fn fill(path: &Path, offset: u64, byte: u8, len: usize) {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&vec![byte; len], offset).unwrap();
}

pub fn read_range(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = fs::File::open(path).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).unwrap();
    buf
}

// Protocol values for the raw client (written out here, independent of the server).
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const FLAG_FUA: u16 = 1;
pub const FLAG_FAST_ZERO: u16 = 1 << 4;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;

/// A minimal NBD client speaking raw bytes.
pub struct Raw {
    pub s: UnixStream,
    pub structured: bool,
}

pub struct Chunk {
    pub flags: u16,
    pub kind: u16,
    pub handle: u64,
    pub payload: Vec<u8>,
}

impl Raw {
    pub fn connect(sock: &Path) -> Raw {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Raw {
            s,
            structured: false,
        }
    }

    /// Reads the greeting and sends the client flags.
    pub fn greet(&mut self) {
        let mut g = [0u8; 18];
        self.s.read_exact(&mut g).unwrap();
        assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
        self.s.write_all(&3u32.to_be_bytes()).unwrap();
    }

    pub fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut m = b"IHAVEOPT".to_vec();
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.s.write_all(&m).unwrap();
    }

    /// One option reply: (reply type, data).
    pub fn option_reply(&mut self) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(
            u64::from_be_bytes(h[..8].try_into().unwrap()),
            0x3e889045565a9
        );
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        self.s.read_exact(&mut d).unwrap();
        (kind, d)
    }

    /// Full handshake to transmission; returns (size, transmission flags).
    pub fn open(sock: &Path, export: &str, structured: bool, meta: bool) -> (Raw, u64, u16) {
        let mut r = Raw::connect(sock);
        r.greet();
        if structured {
            r.send_option(8, &[]);
            assert_eq!(r.option_reply().0, 1);
            r.structured = true;
        }
        if meta {
            let mut d = (export.len() as u32).to_be_bytes().to_vec();
            d.extend_from_slice(export.as_bytes());
            d.extend_from_slice(&1u32.to_be_bytes());
            d.extend_from_slice(&15u32.to_be_bytes());
            d.extend_from_slice(b"base:allocation");
            r.send_option(10, &d);
            let (k, _) = r.option_reply();
            assert_eq!(k, 4, "expected a META_CONTEXT reply");
            assert_eq!(r.option_reply().0, 1);
        }
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        r.send_option(7, &d);
        let (mut size, mut flags) = (0, 0);
        loop {
            let (kind, data) = r.option_reply();
            match kind {
                3 if data[..2] == [0, 0] => {
                    size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                    flags = u16::from_be_bytes(data[10..12].try_into().unwrap());
                }
                3 => {}
                1 => break,
                other => panic!("GO failed with reply type {other:#x}"),
            }
        }
        (r, size, flags)
    }

    pub fn request(
        &mut self,
        kind: u16,
        flags: u16,
        handle: u64,
        offset: u64,
        len: u32,
        data: &[u8],
    ) {
        let mut m = 0x25609513u32.to_be_bytes().to_vec();
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&handle.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(data);
        self.s.write_all(&m).unwrap();
    }

    /// A simple reply: (errno, handle).
    pub fn simple_reply(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), 0x67446698);
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }

    pub fn chunk(&mut self) -> Chunk {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), 0x668e33ef);
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut payload = vec![0u8; len as usize];
        self.s.read_exact(&mut payload).unwrap();
        Chunk {
            flags: u16::from_be_bytes(h[4..6].try_into().unwrap()),
            kind: u16::from_be_bytes(h[6..8].try_into().unwrap()),
            handle: u64::from_be_bytes(h[8..16].try_into().unwrap()),
            payload,
        }
    }

    /// Errno of a reply to a non-read command, whichever form it takes.
    pub fn status(&mut self) -> (u32, u64) {
        let mut magic = [0u8; 4];
        self.s.peek_exact(&mut magic);
        if u32::from_be_bytes(magic) == 0x67446698 {
            return self.simple_reply();
        }
        let c = self.chunk();
        assert_ne!(c.flags & 1, 0, "expected a final chunk");
        let errno = if c.kind & 0x8000 != 0 {
            u32::from_be_bytes(c.payload[..4].try_into().unwrap())
        } else {
            0
        };
        (errno, c.handle)
    }

    /// True once the server has closed the connection (reads EOF or reset).
    pub fn closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 1];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
                Err(_) => return true,
            }
        }
    }
}

trait PeekExact {
    fn peek_exact(&self, buf: &mut [u8]);
}

impl PeekExact for UnixStream {
    fn peek_exact(&self, buf: &mut [u8]) {
        // MSG_PEEK through nix: wait until the whole magic is buffered.
        let start = Instant::now();
        loop {
            let n = nix::sys::socket::recv(
                std::os::fd::AsRawFd::as_raw_fd(self),
                buf,
                nix::sys::socket::MsgFlags::MSG_PEEK,
            )
            .unwrap();
            if n == buf.len() {
                return;
            }
            assert!(
                n > 0 && start.elapsed() < Duration::from_secs(20),
                "connection closed"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// The id of test snapshot `n` (`ss-0000000n`).
pub fn sid(n: u32) -> blocksnap::api::SnapshotId {
    format!("ss-{n:08}").parse().expect("snapshot id")
}

/// Metadata of test snapshot `n` of one volume, with `parent` and `block_size`.
pub fn snapshot_meta(
    n: u32,
    parent: Option<u32>,
    size: u64,
    block_size: u32,
) -> blocksnap::store::SnapshotMeta {
    blocksnap::store::SnapshotMeta {
        id: sid(n),
        volume_id: "vol-00000001".parse().expect("volume id"),
        volume_name: "data".into(),
        name: format!("snap {n}"),
        description: String::new(),
        owner: "root".into(),
        parent: parent.map(sid),
        volume_size: size,
        block_size,
        snapshot_time: 1_700_000_000,
        freeze_ms: 0,
        consistency: "crash".into(),
    }
}

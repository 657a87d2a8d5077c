//! [`NbdServer`]: accepts connections on a unix or TCP listener, negotiates the fixed
//! newstyle handshake and serves requests against the named [`Export`].
//!
//! Per connection: a tokio task does the handshake, then hands the socket (switched to
//! blocking) to a thread of the connection's own for the transmission phase. That thread
//! reads whatever the client has sent, executes the whole requests buffered in order
//! (positional I/O, no hand-off per request) and sends their replies a few at a time,
//! all of them before it reads again. Reads that miss the page cache go to a small pool
//! of threads, writes that wait for a write-intent sync to one thread that syncs the
//! intents of all it holds at once (see [`Connection`]). Every reply is written whole
//! under one lock, so replies may come out of order but never interleave; a client that
//! stops reading replies blocks only its own threads, whose buffers stay bounded. Any
//! protocol violation ends that connection only.

use crate::buf::AlignedBuf;
use crate::sys::splice::SplicePipe;
use std::collections::BTreeMap;
use std::future::Future;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{oneshot, watch, Semaphore};
use tokio::task::JoinSet;

use super::export::Export;
use super::kernel::{self, KernelDevice};
use super::proto::{self, Command, ProtoError, SessionCaps};
use super::NbdError;

/// Connections served at once by one `serve_*` call; more are closed at accept.
const MAX_CONNECTIONS: usize = 512;
/// Time a client has to finish option haggling.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Options accepted in one handshake before the client is considered hostile.
const MAX_OPTIONS: usize = 256;
/// Time given to in-flight replies after the reader stops, before the socket is dropped.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long removing an export waits for its connections to end. A client's connection is
/// cut after `DRAIN_TIMEOUT`; the kernel's ends once told to disconnect. Past this, one is
/// stuck (in the export's own I/O, or a kernel that does not let go).
const REMOVE_TIMEOUT: Duration = Duration::from_secs(45);
/// Most descriptors sent in one block status reply.
const MAX_DESCRIPTORS: usize = 1024;
/// Zero extents smaller than this are sent as data rather than as hole chunks.
const MIN_HOLE_CHUNK: u64 = 4096;
/// Reads shorter than this are sent as one data chunk without looking for holes.
const MIN_HOLE_LOOKUP: u64 = 64 * 1024;

/// An NBD server holding named exports. Cheap to clone; clones share exports.
#[derive(Clone, Default)]
pub struct NbdServer {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    exports: Mutex<BTreeMap<String, Slot>>,
    /// Exports removed while connections still used them, by name: removing the name again
    /// waits for those connections again, and it is not exported anew until they ended.
    draining: Mutex<BTreeMap<String, Arc<Users>>>,
}

struct Slot {
    export: Arc<dyn Export>,
    /// Set to true when the export is removed; its connections watch it and close.
    removed: watch::Sender<bool>,
    /// The connections serving it; its removal waits until they have ended.
    users: Arc<Users>,
    /// The /dev/nbdN this export is connected to, if any: disconnected when dropped.
    kernel: Option<KernelDevice>,
}

/// Counts the connections using an export, so that its removal can wait for them.
#[derive(Default)]
struct Users {
    count: Mutex<usize>,
    ended: Condvar,
}

/// One connection's use of an export, counted in [`Users`] until dropped.
struct InUse(Arc<Users>);

impl Users {
    fn lock(&self) -> MutexGuard<'_, usize> {
        // A counter cannot be left half-updated by a panic.
        self.count.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count(&self) -> usize {
        *self.lock()
    }

    fn enter(users: &Arc<Users>) -> InUse {
        *users.lock() += 1;
        InUse(Arc::clone(users))
    }

    /// Waits until no connection uses the export, at most `timeout`; returns how many
    /// still do (0: all ended).
    fn wait_idle(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let mut count = self.lock();
        while *count > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            count = self
                .ended
                .wait_timeout(count, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        *count
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        let mut count = self.0.lock();
        *count -= 1;
        if *count == 0 {
            self.0.ended.notify_all();
        }
    }
}

impl NbdServer {
    pub fn new() -> NbdServer {
        NbdServer::default()
    }

    fn exports(&self) -> MutexGuard<'_, BTreeMap<String, Slot>> {
        // A panic while holding this lock cannot leave the map half-updated: every
        // critical section is a single insert, remove or lookup.
        self.inner
            .exports
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn draining(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Users>>> {
        // Single inserts, removals and lookups: nothing is left half-updated by a panic.
        self.inner
            .draining
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds an export under `name` (1..=4096 bytes of UTF-8 without NUL). Refused while
    /// connections to an export removed under that name are still there.
    pub fn add_export(&self, name: &str, export: Arc<dyn Export>) -> Result<(), NbdError> {
        if name.is_empty() || name.len() > proto::MAX_STRING_LEN || name.contains('\0') {
            return Err(NbdError::InvalidExportName {
                name: name.to_string(),
            });
        }
        let mut map = self.exports();
        if map.contains_key(name) {
            return Err(NbdError::ExportExists {
                name: name.to_string(),
            });
        }
        let mut draining = self.draining();
        if let Some(users) = draining.get(name) {
            match users.count() {
                0 => {
                    draining.remove(name);
                }
                connections => {
                    return Err(NbdError::ExportStillInUse {
                        name: name.to_string(),
                        connections,
                    })
                }
            }
        }
        drop(draining);
        let (removed, _) = watch::channel(false);
        map.insert(
            name.to_string(),
            Slot {
                export,
                removed,
                users: Arc::default(),
                kernel: None,
            },
        );
        Ok(())
    }

    /// Removes an export; its connected clients are disconnected once their in-flight
    /// requests are answered, its /dev/nbdN (if any) with NBD_CMD_DISCONNECT. Returns once
    /// every connection to it has ended (so no request of theirs can still reach the
    /// export), or fails with `ExportStillInUse` after [`REMOVE_TIMEOUT`]; new clients
    /// are refused from the start either way. Removing it again after that failure waits
    /// for those connections again. Blocks: call it off the async runtime.
    pub fn remove_export(&self, name: &str) -> Result<(), NbdError> {
        self.remove_export_within(name, REMOVE_TIMEOUT)
    }

    fn remove_export_within(&self, name: &str, timeout: Duration) -> Result<(), NbdError> {
        let mut exports = self.exports();
        let (users, slot) = match exports.remove(name) {
            Some(slot) => {
                slot.removed.send_replace(true);
                let users = Arc::clone(&slot.users);
                // Draining from now on (under the exports lock, as `add_export` looks): the
                // name is neither exported anew nor "not found" while its connections last.
                self.draining().insert(name.to_string(), Arc::clone(&users));
                (users, Some(slot))
            }
            None => {
                let users = self.draining().get(name).cloned();
                let users = users.ok_or_else(|| NbdError::ExportNotFound {
                    name: name.to_string(),
                })?;
                (users, None)
            }
        };
        drop(exports);
        // Disconnects the kernel's device, if any: its connection ends on NBD_CMD_DISC.
        drop(slot);
        match users.wait_idle(timeout) {
            0 => {
                let mut draining = self.draining();
                if draining.get(name).is_some_and(|d| Arc::ptr_eq(d, &users)) {
                    draining.remove(name);
                }
                Ok(())
            }
            connections => Err(NbdError::ExportStillInUse {
                name: name.to_string(),
                connections,
            }),
        }
    }

    /// Where the kernel has the nbd driver, also connects export `name` to a /dev/nbdN
    /// (see [`super::kernel`]) and returns its path; `None` where it has not (checked once).
    /// The device is disconnected when the export is removed or the server shuts down.
    pub fn connect_kernel_device(&self, name: &str) -> Result<Option<PathBuf>, NbdError> {
        if !kernel::available() {
            return Ok(None);
        }
        let device = kernel::connect(self, name)?;
        let path = device.path();
        let mut map = self.exports();
        match map.get_mut(name) {
            Some(slot) if slot.kernel.is_none() => slot.kernel = Some(device),
            // Connected meanwhile: keep that one; this one is disconnected (unlocked).
            Some(slot) => {
                let existing = slot.kernel.as_ref().map(KernelDevice::path);
                drop(map);
                drop(device);
                return Ok(existing);
            }
            // Removed meanwhile: so is this device.
            None => {
                drop(map);
                drop(device);
                return Err(NbdError::ExportNotFound {
                    name: name.to_string(),
                });
            }
        }
        Ok(Some(path))
    }

    /// The /dev/nbdN export `name` is connected to, if any.
    pub fn kernel_device(&self, name: &str) -> Option<PathBuf> {
        self.exports()
            .get(name)
            .and_then(|s| s.kernel.as_ref().map(KernelDevice::path))
    }

    /// Disconnects every /dev/nbdN of this server's exports.
    fn disconnect_kernel_devices(&self) {
        let devices: Vec<KernelDevice> = self
            .exports()
            .values_mut()
            .filter_map(|s| s.kernel.take())
            .collect();
        drop(devices);
    }

    /// Serves export `name` on `socket`, a connection without a handshake: the kernel's
    /// nbd driver speaks only the transmission phase, with simple replies, and is told
    /// the size and flags returned here through netlink instead. The connection runs on
    /// threads of its own marked PR_SET_IO_FLUSHER (they serve a block device: memory
    /// reclaim must not wait for them) until the peer sends NBD_CMD_DISC or the socket's
    /// read side is shut: when its `KernelDevice` is dropped, by `remove_export` (which
    /// waits for it) or by its owner.
    pub fn serve_negotiated(
        &self,
        name: &str,
        socket: std::os::unix::net::UnixStream,
    ) -> Result<Negotiated, NbdError> {
        let (export, _, in_use) = self.lookup(name).ok_or_else(|| NbdError::ExportNotFound {
            name: name.to_string(),
        })?;
        let caps = SessionCaps {
            size: export.size(),
            structured: false,
            block_status: false,
            read_only: export.read_only(),
        };
        let negotiated = Negotiated {
            size: caps.size,
            flags: transmission_flags(false, caps.read_only),
        };
        let export_name = name.to_string();
        std::thread::Builder::new()
            .name("nbd-kernel".into())
            .spawn(move || {
                // Held until the connection and its helper threads are done.
                let _in_use = in_use;
                mark_io_flusher();
                let r = Connection::new(export, caps, BlockingConn::Unix(socket), Vec::new())
                    .map(Connection::io_flusher)
                    .map_err(|e| conn_err("clone socket", e))
                    .and_then(Connection::run);
                if let Err(e) = r {
                    tracing::info!(export = %export_name, error = %error_chain(&e), "kernel NBD connection closed");
                }
            })
            .map_err(|s| conn_err("start connection thread", s))?;
        Ok(negotiated)
    }

    /// Names of the current exports, sorted.
    pub fn export_names(&self) -> Vec<String> {
        self.exports().keys().cloned().collect()
    }

    /// Looks an export up, subscribes to its removal and counts a user of it, atomically
    /// (so a removal either refuses this lookup or waits for the returned [`InUse`]).
    fn lookup(&self, name: &str) -> Option<(Arc<dyn Export>, watch::Receiver<bool>, InUse)> {
        self.exports().get(name).map(|s| {
            (
                Arc::clone(&s.export),
                s.removed.subscribe(),
                Users::enter(&s.users),
            )
        })
    }

    /// Serves clients on a unix socket until `shutdown` completes, then disconnects them
    /// (after their in-flight requests) and returns.
    pub async fn serve_unix(&self, listener: UnixListener, shutdown: impl Future<Output = ()>) {
        self.serve(listener, shutdown).await
    }

    /// Serves clients on a TCP socket until `shutdown` completes.
    pub async fn serve_tcp(&self, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        self.serve(listener, shutdown).await
    }

    async fn serve<L: Listener>(&self, listener: L, shutdown: impl Future<Output = ()>) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let mut conns = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                accepted = listener.next_conn() => match accepted {
                    Ok(stream) => {
                        let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
                            tracing::warn!("NBD connection refused: {MAX_CONNECTIONS} clients already");
                            continue;
                        };
                        let server = self.clone();
                        let stop = stop_rx.clone();
                        conns.spawn(async move {
                            if let Err(e) = server.serve_connection(stream, stop).await {
                                tracing::info!(error = %error_chain(&e), "NBD connection closed");
                            }
                            drop(permit);
                        });
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "NBD accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        stop_tx.send_replace(true);
        self.disconnect_kernel_devices();
        while conns.join_next().await.is_some() {}
    }

    async fn serve_connection<S>(
        &self,
        stream: S,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), NbdError>
    where
        S: AsyncRead + AsyncWrite + IntoBlocking + Unpin + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(stream);
        let mut rd = BufReader::with_capacity(64 * 1024, rd);
        let mut wr = BufWriter::with_capacity(64 * 1024, wr);
        let session = tokio::select! {
            r = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.handshake(&mut rd, &mut wr)) => {
                r.map_err(|_| NbdError::HandshakeTimeout)??
            }
            _ = stop.wait_for(|s| *s) => return Ok(()),
        };
        let Some(session) = session else {
            return Ok(());
        };
        // Requests the client pipelined behind the handshake stay with the session.
        let leftover = rd.buffer().to_vec();
        let stream = rd.into_inner().unsplit(wr.into_inner());
        let conn = stream
            .into_blocking()
            .map_err(|s| conn_err("switch socket to blocking", s))?;
        transmission(session, conn, leftover, stop).await
    }

    /// Option haggling. `None` when the client aborted.
    async fn handshake<R, W>(&self, rd: &mut R, wr: &mut W) -> Result<Option<Session>, NbdError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        send(wr, &proto::server_greeting(), "greeting").await?;
        let flags = rd
            .read_u32()
            .await
            .map_err(|source| conn_err("client flags", source))?;
        let client = proto::parse_client_flags(flags)?;
        let mut structured = false;
        // The export the current metadata context selection was made for.
        let mut meta_export: Option<String> = None;

        for _ in 0..MAX_OPTIONS {
            let mut hdr = [0u8; proto::OPTION_HEADER_LEN];
            rd.read_exact(&mut hdr)
                .await
                .map_err(|source| conn_err("option header", source))?;
            let opt = match proto::parse_option_header(&hdr) {
                Ok(opt) => opt,
                Err(e @ ProtoError::OptionTooLarge { option, .. }) => {
                    // Say why before hanging up: skipping up to 4 GiB is not worth it.
                    let msg = e.to_string();
                    let reply = proto::option_reply(option, proto::REP_ERR_TOO_BIG, msg.as_bytes());
                    let _ = send(wr, &reply, "option reply").await;
                    return Err(e.into());
                }
                Err(e) => return Err(e.into()),
            };
            let mut data = vec![0u8; opt.len as usize];
            rd.read_exact(&mut data)
                .await
                .map_err(|source| conn_err("option data", source))?;
            let option = opt.option;
            let reply = |kind: u32, data: &[u8]| proto::option_reply(option, kind, data);
            let err = |kind: u32, msg: &str| proto::option_reply(option, kind, msg.as_bytes());

            let mut out: Vec<u8> = Vec::new();
            match option {
                proto::OPT_EXPORT_NAME => {
                    // This option cannot fail politely: an unknown export ends the session.
                    let name = proto::parse_export_name(&data)?;
                    let (export, removed, in_use) = self
                        .lookup(&name)
                        .ok_or(NbdError::ExportNotFound { name: name.clone() })?;
                    let flags = transmission_flags(structured, export.read_only());
                    let reply = proto::export_name_reply(export.size(), flags, client.no_zeroes);
                    send(wr, &reply, "export name reply").await?;
                    let block_status = meta_export.as_deref() == Some(name.as_str());
                    return Ok(Some(Session {
                        export,
                        removed,
                        in_use,
                        structured,
                        block_status,
                    }));
                }
                proto::OPT_ABORT => {
                    let _ = send(wr, &reply(proto::REP_ACK, &[]), "abort reply").await;
                    return Ok(None);
                }
                proto::OPT_LIST => {
                    if !data.is_empty() {
                        out = err(proto::REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
                    } else {
                        for name in self.export_names() {
                            out.extend(reply(proto::REP_SERVER, &proto::rep_server_data(&name)));
                        }
                        out.extend(reply(proto::REP_ACK, &[]));
                    }
                }
                proto::OPT_INFO | proto::OPT_GO => match proto::parse_info_request(&data) {
                    Err(e) => out = err(proto::REP_ERR_INVALID, &e.to_string()),
                    Ok(req) => match self.lookup(&req.name) {
                        None => {
                            let msg = format!("no export named {:?}", req.name);
                            out = err(proto::REP_ERR_UNKNOWN, &msg);
                        }
                        Some((export, removed, in_use)) => {
                            let flags = transmission_flags(structured, export.read_only());
                            out.extend(reply(
                                proto::REP_INFO,
                                &proto::info_export_data(export.size(), flags),
                            ));
                            if req.infos.contains(&proto::INFO_NAME) {
                                let data = proto::info_string_data(proto::INFO_NAME, &req.name);
                                out.extend(reply(proto::REP_INFO, &data));
                            }
                            out.extend(reply(proto::REP_INFO, &proto::info_block_size_data()));
                            out.extend(reply(proto::REP_ACK, &[]));
                            if option == proto::OPT_GO {
                                send(wr, &out, "go reply").await?;
                                let block_status =
                                    meta_export.as_deref() == Some(req.name.as_str());
                                return Ok(Some(Session {
                                    export,
                                    removed,
                                    in_use,
                                    structured,
                                    block_status,
                                }));
                            }
                        }
                    },
                },
                proto::OPT_STRUCTURED_REPLY => {
                    if data.is_empty() {
                        structured = true;
                        out = reply(proto::REP_ACK, &[]);
                    } else {
                        out = err(
                            proto::REP_ERR_INVALID,
                            "NBD_OPT_STRUCTURED_REPLY takes no data",
                        );
                    }
                }
                proto::OPT_LIST_META_CONTEXT | proto::OPT_SET_META_CONTEXT => {
                    let set = option == proto::OPT_SET_META_CONTEXT;
                    if !structured {
                        out = err(proto::REP_ERR_INVALID, "negotiate structured replies first");
                    } else {
                        match proto::parse_meta_context_request(&data) {
                            Err(e) => out = err(proto::REP_ERR_INVALID, &e.to_string()),
                            Ok(req) if self.lookup(&req.export).is_none() => {
                                let msg = format!("no export named {:?}", req.export);
                                out = err(proto::REP_ERR_UNKNOWN, &msg);
                            }
                            Ok(req) => {
                                let contexts = proto::match_meta_contexts(&req.queries, !set);
                                for (name, id) in &contexts {
                                    let data = proto::rep_meta_context_data(*id, name);
                                    out.extend(reply(proto::REP_META_CONTEXT, &data));
                                }
                                out.extend(reply(proto::REP_ACK, &[]));
                                if set {
                                    meta_export = (!contexts.is_empty()).then_some(req.export);
                                }
                            }
                        }
                    }
                }
                proto::OPT_STARTTLS => out = err(proto::REP_ERR_UNSUP, "TLS is not supported"),
                _ => out = err(proto::REP_ERR_UNSUP, "unsupported option"),
            }
            send(wr, &out, "option reply").await?;
        }
        Err(ProtoError::Malformed {
            what: "handshake (too many options)",
        }
        .into())
    }
}

/// What a connection served by [`NbdServer::serve_negotiated`] was agreed to be.
#[derive(Debug, Clone, Copy)]
pub struct Negotiated {
    pub size: u64,
    /// Transmission flags (NBD_FLAG_*), as the handshake would have sent them.
    pub flags: u16,
}

/// Marks the calling thread as serving a block device (PR_SET_IO_FLUSHER). Without the
/// privilege (CAP_SYS_RESOURCE) the connection is still served, with a warning.
fn mark_io_flusher() {
    if let Err(e) = crate::sys::process::set_io_flusher(true) {
        tracing::warn!(error = %e, "cannot mark an NBD thread PR_SET_IO_FLUSHER; under memory pressure the kernel device may deadlock");
    }
}

/// Starts a helper thread of a connection; it marks itself PR_SET_IO_FLUSHER when the
/// connection serves the kernel's client.
fn spawn_helper(
    name: &str,
    io_flusher: bool,
    body: impl FnOnce() + Send + 'static,
) -> io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            if io_flusher {
                mark_io_flusher();
            }
            body()
        })
}

/// The transmission flags this server advertises.
fn transmission_flags(structured: bool, read_only: bool) -> u16 {
    // Every connection shares one Export and `flush` reaches the backing store, so a
    // flush on one connection covers writes completed on all: multi-conn is safe.
    let mut flags = proto::FLAG_HAS_FLAGS
        | proto::FLAG_SEND_FLUSH
        | proto::FLAG_SEND_FUA
        | proto::FLAG_SEND_TRIM
        | proto::FLAG_SEND_WRITE_ZEROES
        | proto::FLAG_CAN_MULTI_CONN
        | proto::FLAG_SEND_CACHE
        | proto::FLAG_SEND_FAST_ZERO;
    if structured {
        flags |= proto::FLAG_SEND_DF;
    }
    if read_only {
        flags |= proto::FLAG_READ_ONLY;
    }
    flags
}

/// What the handshake agreed on.
struct Session {
    export: Arc<dyn Export>,
    removed: watch::Receiver<bool>,
    /// Counts this connection as a user of the export until its thread ends.
    in_use: InUse,
    structured: bool,
    block_status: bool,
}

/// Reads from the socket land in a buffer of at least this size.
const INPUT_BUF: usize = 256 * 1024;
/// Buffers grown past this (by a large write or read) shrink back once drained.
const KEEP_BUF: usize = 4 * 1024 * 1024;
/// Replies are sent once this many bytes are waiting, even if more requests are buffered.
const OUT_FLUSH: usize = 256 * 1024;
/// Replies are sent once this many are waiting, even if more requests are buffered: the
/// client gets to work on them while the rest are served.
const REPLY_BATCH: usize = 4;
/// How long a connection looks for more requests before it sleeps in `recv`.
const SPIN: std::time::Duration = std::time::Duration::from_micros(50);

/// Runs the transmission phase on a thread of its own, then waits for it. Stop and
/// export removal shut the socket's read side: the thread answers what it has already
/// read, then ends; a client that does not take its replies is cut off after
/// `DRAIN_TIMEOUT`.
async fn transmission(
    session: Session,
    conn: BlockingConn,
    leftover: Vec<u8>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), NbdError> {
    let caps = SessionCaps {
        size: session.export.size(),
        structured: session.structured,
        block_status: session.block_status,
        read_only: session.export.read_only(),
    };
    let mut removed = session.removed.clone();
    let ctl = conn.try_clone().map_err(|s| conn_err("clone socket", s))?;
    let (done_tx, mut done_rx) = oneshot::channel();
    let export = Arc::clone(&session.export);
    let in_use = session.in_use;
    std::thread::Builder::new()
        .name("nbd-conn".into())
        .spawn(move || {
            // Held until the connection and its helper threads are done.
            let _in_use = in_use;
            let r = Connection::new(export, caps, conn, leftover)
                .map_err(|e| conn_err("clone socket", e))
                .and_then(Connection::run);
            let _ = done_tx.send(r);
        })
        .map_err(|s| conn_err("start connection thread", s))?;
    let lost = || conn_err("serve", io::Error::other("connection thread panicked"));
    tokio::select! {
        r = &mut done_rx => return r.unwrap_or_else(|_| Err(lost())),
        _ = stop.wait_for(|s| *s) => {}
        _ = removed.wait_for(|r| *r) => {}
    }
    // Ends the thread's next read; what it already read is still answered.
    let _ = ctl.shutdown(Shutdown::Read);
    match tokio::time::timeout(DRAIN_TIMEOUT, &mut done_rx).await {
        Ok(r) => r.unwrap_or_else(|_| Err(lost())),
        Err(_) => {
            // Replies nobody reads: cut the connection so the thread's write fails.
            let _ = ctl.shutdown(Shutdown::Both);
            let _ = done_rx.await;
            Ok(())
        }
    }
}

/// The transmission phase of one connection, served synchronously: requests already
/// received are executed in order on this thread (positional I/O, mostly page-cache
/// hits) and their replies sent in batches, with no hand-off to another thread. Two
/// exceptions, so that one slow request does not hold up the others: a read that would
/// wait for the disk goes to the connection's read pool (threads that may block, so cold
/// reads still reach the disk in parallel), and a write that must first wait for a sync
/// of its own (a tracked export's first write to a region) goes to the slow lane, one
/// thread that makes the write intents of all it holds durable with one sync. Large
/// writes are received straight into buffers of their own and written by the write lane,
/// so that the next payload is received while this one is copied into the page cache.
/// Each reply is written whole under the writer's lock, so replies never interleave.
/// Memory per connection is bounded: the input buffer holds at most one maximal write
/// beyond `INPUT_BUF`, the output at most one maximal read beyond `OUT_FLUSH`, the slow
/// lane at most `LANE_JOBS` writes of at most `LANE_MAX_WRITE` bytes, the write lane at
/// most `WRITE_BUFFERS` buffers of at most `WRITE_MAX` bytes.
struct Connection {
    export: Arc<dyn Export>,
    caps: SessionCaps,
    conn: BlockingConn,
    writer: Arc<Mutex<BlockingConn>>,
    input: Input,
    out: Vec<u8>,
    /// Replies in `out`.
    replies: usize,
    lane: Option<SlowLane>,
    writes: Option<WriteLane>,
    reads: Option<ReadPool>,
    /// Helper threads mark themselves PR_SET_IO_FLUSHER (a kernel client's connection).
    io_flusher: bool,
}

/// Writes that wait for their write intents, grouped: see [`Connection`].
struct SlowLane {
    tx: mpsc::SyncSender<SlowWrite>,
    thread: std::thread::JoinHandle<()>,
}

struct SlowWrite {
    handle: u64,
    command: Command,
    payload: Vec<u8>,
}

/// Most writes queued for the slow lane before the connection waits for it.
const LANE_JOBS: usize = 64;
/// Larger writes are served inline even when they need a sync.
const LANE_MAX_WRITE: u32 = 1024 * 1024;

impl SlowLane {
    fn start(
        export: Arc<dyn Export>,
        structured: bool,
        writer: Arc<Mutex<BlockingConn>>,
        io_flusher: bool,
    ) -> io::Result<SlowLane> {
        let (tx, rx) = mpsc::sync_channel::<SlowWrite>(LANE_JOBS);
        let thread = spawn_helper("nbd-intent", io_flusher, move || {
            let mut jobs = Vec::new();
            let mut ranges = Vec::new();
            let mut out = Vec::new();
            let mut broken = false;
            while let Ok(job) = rx.recv() {
                jobs.push(job);
                while jobs.len() < LANE_JOBS {
                    match rx.try_recv() {
                        Ok(job) => jobs.push(job),
                        Err(_) => break,
                    }
                }
                if broken {
                    // The socket is gone: only drain, so the connection never waits.
                    jobs.clear();
                    continue;
                }
                ranges.clear();
                ranges.extend(jobs.iter().filter_map(|j| match j.command {
                    Command::Write { offset, len, .. } => Some((offset, u64::from(len))),
                    _ => None,
                }));
                export.prepare_writes(&ranges);
                for job in jobs.drain(..) {
                    serve_command(
                        &*export,
                        job.handle,
                        job.command,
                        &job.payload,
                        structured,
                        false,
                        &mut out,
                    );
                }
                broken = write_locked(&writer, &out).is_err();
                out.clear();
            }
        })?;
        Ok(SlowLane { tx, thread })
    }
}

/// Writes replies whole under the writer's lock ([`send_locked`]).
fn write_locked(writer: &Mutex<BlockingConn>, bytes: &[u8]) -> io::Result<()> {
    send_locked(writer, |w| w.write_all(bytes))
}

/// Sends replies with `send` under the writer's lock, so replies never interleave. A
/// failure shuts the socket down: the connection thread's next read fails too, and
/// nothing is sent after a torn reply.
fn send_locked(
    writer: &Mutex<BlockingConn>,
    send: impl FnOnce(&mut BlockingConn) -> io::Result<()>,
) -> io::Result<()> {
    // A panic while writing leaves at worst a torn reply, after which the client
    // cannot trust the stream anyway; the next write fails or is garbage to it.
    let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
    let sent = send(&mut w);
    if sent.is_err() {
        let _ = w.shutdown(Shutdown::Both);
    }
    sent
}

/// Large writes, each received into a buffer of its own, written by a thread of the
/// connection: see [`Connection`].
struct WriteLane {
    tx: mpsc::SyncSender<LargeWrite>,
    /// Buffers the thread is done with, and those taken back from it.
    free: mpsc::Receiver<Vec<u8>>,
    spare: Vec<Vec<u8>>,
    /// Buffers made so far: queued, being written, or spare.
    buffers: usize,
    thread: std::thread::JoinHandle<()>,
}

/// A WRITE whose payload is `payload[..len]` (the buffer may be longer: buffers are reused).
struct LargeWrite {
    handle: u64,
    command: Command,
    payload: Vec<u8>,
    len: usize,
}

/// Least WRITE received into a buffer of its own and written by the write lane: below it,
/// the hand-off costs more than the overlap gains.
const WRITE_MIN: u32 = 256 * 1024;
/// Larger writes are served inline.
const WRITE_MAX: u32 = 4 << 20;
/// Most buffers of the write lane (each at most `WRITE_MAX` bytes).
const WRITE_BUFFERS: usize = 4;
/// Spare buffers larger than this are given back while the connection waits for requests.
const WRITE_KEEP: usize = 1 << 20;

impl WriteLane {
    fn start(
        export: Arc<dyn Export>,
        structured: bool,
        writer: Arc<Mutex<BlockingConn>>,
        io_flusher: bool,
    ) -> io::Result<WriteLane> {
        let (tx, rx) = mpsc::sync_channel::<LargeWrite>(WRITE_BUFFERS);
        let (free_tx, free) = mpsc::channel::<Vec<u8>>();
        let thread = spawn_helper("nbd-write", io_flusher, move || {
            let mut out = Vec::new();
            let mut broken = false;
            while let Ok(job) = rx.recv() {
                // The socket is gone: only drain, so the connection never waits.
                if !broken {
                    let payload = &job.payload[..job.len];
                    serve_command(
                        &*export,
                        job.handle,
                        job.command,
                        payload,
                        structured,
                        false,
                        &mut out,
                    );
                    broken = write_locked(&writer, &out).is_err();
                    out.clear();
                }
                let _ = free_tx.send(job.payload);
            }
        })?;
        Ok(WriteLane {
            tx,
            free,
            spare: Vec::new(),
            buffers: 0,
            thread,
        })
    }

    /// A buffer for a payload: a spare one, a new one while fewer than `WRITE_BUFFERS`
    /// exist, or `None` when all are in use.
    fn try_buffer(&mut self) -> Option<Vec<u8>> {
        self.spare.extend(self.free.try_iter());
        if let Some(buf) = self.spare.pop() {
            return Some(buf);
        }
        (self.buffers < WRITE_BUFFERS).then(|| {
            self.buffers += 1;
            Vec::new()
        })
    }

    /// Gives back the memory of spare buffers larger than `WRITE_KEEP`.
    fn shrink(&mut self) {
        self.spare.extend(self.free.try_iter());
        let before = self.spare.len();
        self.spare.retain(|b| b.len() <= WRITE_KEEP);
        self.buffers -= before - self.spare.len();
    }
}

/// Runs one command, turning a panic in the export into an EIO reply. `false` when
/// `cached_only` and the command is a read that would block (nothing appended).
fn serve_command(
    export: &dyn Export,
    handle: u64,
    command: Command,
    payload: &[u8],
    structured: bool,
    cached_only: bool,
    out: &mut Vec<u8>,
) -> bool {
    let start = out.len();
    let done = std::panic::catch_unwind(AssertUnwindSafe(|| {
        execute(
            export,
            handle,
            command,
            payload,
            structured,
            cached_only,
            out,
        )
    }));
    match done {
        Ok(done) => done,
        Err(_) => {
            out.truncate(start);
            out.extend_from_slice(&error_reply(
                handle,
                proto::EIO,
                "export panicked",
                structured,
            ));
            true
        }
    }
}

/// Threads of one connection that serve reads missing the page cache, so that such reads
/// proceed in parallel (the disk's queue) while cached ones are still served inline.
struct ReadPool {
    tx: mpsc::SyncSender<(u64, Command)>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Threads in a connection's read pool.
const READ_THREADS: usize = 4;
/// Reads queued for the pool before the connection waits for it.
const READ_QUEUE: usize = 64;

impl ReadPool {
    fn start(
        export: &Arc<dyn Export>,
        structured: bool,
        writer: &Arc<Mutex<BlockingConn>>,
        io_flusher: bool,
    ) -> io::Result<ReadPool> {
        let (tx, rx) = mpsc::sync_channel::<(u64, Command)>(READ_QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        let mut pool = ReadPool {
            tx,
            threads: Vec::new(),
        };
        for _ in 0..READ_THREADS {
            let (export, writer, rx) = (Arc::clone(export), Arc::clone(writer), Arc::clone(&rx));
            let thread = spawn_helper("nbd-read", io_flusher, move || {
                let mut out = Vec::new();
                let mut broken = false;
                let mut splicer = Splicer::default();
                loop {
                    let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    let Ok((handle, command)) = job else { break };
                    if broken {
                        continue;
                    }
                    // A panic of the export is answered by `serve_command` below.
                    let read = (handle, command, structured);
                    let spliced = std::panic::catch_unwind(AssertUnwindSafe(|| {
                        spliced_read(&*export, read, &mut splicer, &writer)
                    }))
                    .unwrap_or_else(|_| {
                        splicer = Splicer::default();
                        None
                    });
                    if let Some(sent) = spliced {
                        broken = sent.is_err();
                        continue;
                    }
                    serve_command(&*export, handle, command, &[], structured, false, &mut out);
                    broken = write_locked(&writer, &out).is_err();
                    out.clear();
                    if out.capacity() > KEEP_BUF {
                        out.shrink_to(OUT_FLUSH);
                    }
                }
            });
            match thread {
                Ok(t) => pool.threads.push(t),
                // Fewer threads still serve; none at all is an error.
                Err(e) if pool.threads.is_empty() => return Err(e),
                Err(_) => break,
            }
        }
        Ok(pool)
    }
}

/// Least READ a connection sends by splice: below it, a copy costs less than the calls.
const SPLICE_MIN: u32 = 64 * 1024;
/// The pipe each read thread asks for: a 1 MiB read not aligned to a page fits. Without
/// CAP_SYS_RESOURCE a pipe is held to /proc/sys/fs/pipe-max-size (1 MiB by default), and
/// only page-aligned reads of up to 1 MiB fit ([`SplicePipe::fits`]).
const SPLICE_PIPE: usize = 2 << 20;
/// The largest READ sent by splice; larger ones are copied.
const SPLICE_MAX: u32 = SPLICE_PIPE as u32;

/// Whether `command` is a READ the read threads send by splice ([`spliced_read`]).
fn splices(export: &dyn Export, command: &Command) -> bool {
    matches!(*command, Command::Read { offset, len, .. }
        if (SPLICE_MIN..=SPLICE_MAX).contains(&len)
            && export.read_file(offset, u64::from(len)).is_some())
}

/// A read thread's means to splice replies: its pipe, made on first use and dropped after
/// any failure; `off` once the export's file refused splice.
#[derive(Default)]
struct Splicer {
    pipe: Option<SplicePipe>,
    off: bool,
}

/// Sends the reply to READ `(handle, command, structured)` with its data spliced from the
/// export's file (`crate::sys::splice`): the server copies none of it. The data is in the
/// pipe before the header is written, so a read that fails never follows a success header;
/// it is then served the usual way. `None`: nothing was sent and the caller serves the
/// command itself (not a large READ of a file, a structured reply that would describe
/// holes, a range the pipe cannot hold, or a failed read). `Some(Err)`: the socket failed
/// mid-reply and was shut down ([`send_locked`]).
fn spliced_read(
    export: &dyn Export,
    (handle, command, structured): (u64, Command, bool),
    splicer: &mut Splicer,
    writer: &Mutex<BlockingConn>,
) -> Option<io::Result<()>> {
    let Command::Read { offset, len, df } = command else {
        return None;
    };
    if splicer.off || !(SPLICE_MIN..=SPLICE_MAX).contains(&len) {
        return None;
    }
    let file = export.read_file(offset, u64::from(len))?;
    // Without DF a structured reply sends holes as hole chunks (see `read_structured`).
    if structured
        && !df
        && read_segments(export, offset, u64::from(len))
            .iter()
            .any(|s| s.2)
    {
        return None;
    }
    if splicer.pipe.is_none() {
        splicer.pipe = SplicePipe::new(SPLICE_PIPE).ok();
    }
    let pipe = splicer.pipe.as_mut()?;
    let n = len as usize;
    if !pipe.fits(offset, n) {
        return None;
    }
    if let Err(e) = pipe.fill(file, offset, n) {
        splicer.off = e.raw_os_error() == Some(libc::EINVAL);
        splicer.pipe = None;
        return None;
    }
    // A structured reply is one data chunk that is also the last: no NONE chunk after it.
    let (data_chunk, simple);
    let header: &[u8] = if structured {
        data_chunk = proto::data_chunk_header(proto::REPLY_FLAG_DONE, handle, offset, len);
        &data_chunk
    } else {
        simple = proto::simple_reply(handle, 0);
        &simple
    };
    let sent = send_locked(writer, |w| {
        w.write_all(header)?;
        pipe.drain_to(w.as_fd(), n)
    });
    if sent.is_err() {
        splicer.pipe = None;
    }
    Some(sent)
}

/// Bytes read from the socket and not yet consumed: `buf[start..end]`.
struct Input {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Input {
    fn new(leftover: Vec<u8>) -> Input {
        let end = leftover.len();
        let mut buf = leftover;
        buf.resize(end.max(INPUT_BUF), 0);
        Input { buf, start: 0, end }
    }

    fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn len(&self) -> usize {
        self.end - self.start
    }

    fn consume(&mut self, n: usize) {
        self.start += n.min(self.len());
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads until at least `need` bytes are buffered; `false` at end of stream.
    fn fill(&mut self, conn: &mut BlockingConn, need: usize) -> io::Result<bool> {
        if self.buf.len() - self.start < need {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.buf.len() < need {
                self.buf.resize(need, 0);
            }
        }
        // A client with requests in flight usually sends the next ones within microseconds:
        // look for them briefly before sleeping, which saves a wake-up per round trip.
        let spin_until = std::time::Instant::now() + SPIN;
        while self.len() < need && std::time::Instant::now() < spin_until {
            match conn.read_nowait(&mut self.buf[self.end..]) {
                Ok(0) => return Ok(false),
                Ok(n) => self.end += n,
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted =>
                {
                    std::hint::spin_loop()
                }
                Err(e) => return Err(e),
            }
        }
        while self.len() < need {
            match conn.read(&mut self.buf[self.end..]) {
                Ok(0) => return Ok(false),
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Gives back memory a large request took, once nothing is buffered.
    fn shrink(&mut self) {
        if self.len() == 0 && self.buf.len() > KEEP_BUF {
            self.buf.truncate(INPUT_BUF);
            self.buf.shrink_to_fit();
        }
    }
}

/// What the next buffered request needs.
enum Next {
    /// This many bytes (header, and the payload of a valid write) make it whole.
    Request(usize),
    /// Not even a header yet.
    Header,
}

impl Connection {
    fn new(
        export: Arc<dyn Export>,
        caps: SessionCaps,
        conn: BlockingConn,
        leftover: Vec<u8>,
    ) -> io::Result<Connection> {
        let writer = Arc::new(Mutex::new(conn.try_clone()?));
        Ok(Connection {
            export,
            caps,
            conn,
            writer,
            input: Input::new(leftover),
            out: Vec::with_capacity(OUT_FLUSH),
            replies: 0,
            lane: None,
            writes: None,
            reads: None,
            io_flusher: false,
        })
    }

    fn io_flusher(mut self) -> Connection {
        self.io_flusher = true;
        self
    }

    fn run(mut self) -> Result<(), NbdError> {
        // Even after a panic the helpers are joined first: the connection (and its use of
        // the export, which `remove_export` waits for) ends only when they have.
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| self.serve()));
        // Requests handed to other threads are answered before the connection ends.
        if let Some(lane) = self.lane.take() {
            drop(lane.tx);
            let _ = lane.thread.join();
        }
        if let Some(lane) = self.writes.take() {
            drop(lane.tx);
            let _ = lane.thread.join();
        }
        if let Some(pool) = self.reads.take() {
            drop(pool.tx);
            for t in pool.threads {
                let _ = t.join();
            }
        }
        result.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    fn serve(&mut self) -> Result<(), NbdError> {
        loop {
            let next = next_request(self.input.data(), &self.caps)?;
            if let Some((handle, command, len)) = self.large_write(&next) {
                self.receive_write(handle, command, len)?;
                continue;
            }
            let need = match next {
                Next::Request(n) if self.input.len() >= n => n,
                next => {
                    // Nothing whole to serve: answer everything so far before waiting.
                    self.send_replies()?;
                    self.input.shrink();
                    if let Some(lane) = &mut self.writes {
                        lane.shrink();
                    }
                    let need = match next {
                        Next::Request(n) => n,
                        Next::Header => proto::REQUEST_HEADER_LEN,
                    };
                    let partial = self.input.len() >= proto::REQUEST_HEADER_LEN;
                    match self.input.fill(&mut self.conn, need) {
                        Ok(true) => {}
                        // The client went away between requests or mid-header.
                        Ok(false) if !partial => return Ok(()),
                        Ok(false) => {
                            let eof = io::ErrorKind::UnexpectedEof.into();
                            return Err(conn_err("write payload", eof));
                        }
                        Err(e) => return Err(conn_err("request", e)),
                    }
                    continue;
                }
            };
            if !self.serve_one(need)? {
                return self.send_replies();
            }
            if self.replies >= REPLY_BATCH || self.out.len() >= OUT_FLUSH {
                self.send_replies()?;
            }
        }
    }

    /// Serves the whole request at the head of the input (`need` bytes). `false` after
    /// NBD_CMD_DISC.
    fn serve_one(&mut self, need: usize) -> Result<bool, NbdError> {
        let header = proto::parse_request_header(header_of(self.input.data()))?;
        let structured = self.caps.structured;
        match proto::check_request(&header, &self.caps) {
            Err(rejection) => {
                self.input.consume(proto::REQUEST_HEADER_LEN);
                self.discard(rejection.discard as usize)?;
                let reply =
                    error_reply(header.handle, rejection.errno, rejection.reason, structured);
                self.out.extend_from_slice(&reply);
                self.replies += 1;
            }
            Ok(Command::Disconnect) => return Ok(false),
            Ok(command @ Command::Write { offset, len, .. })
                if len <= LANE_MAX_WRITE
                    && self.export.write_needs_sync(offset, u64::from(len)) =>
            {
                let payload = self.input.data()[proto::REQUEST_HEADER_LEN..need].to_vec();
                self.input.consume(need);
                self.queue_slow_write(SlowWrite {
                    handle: header.handle,
                    command,
                    payload,
                })?;
            }
            // Large reads of a file go to the read threads, which send them by splice.
            Ok(command) if splices(&*self.export, &command) => {
                self.input.consume(need);
                self.queue_read(header.handle, command)?;
            }
            Ok(command) => {
                let payload = &self.input.data()[proto::REQUEST_HEADER_LEN..need];
                let done = serve_command(
                    &*self.export,
                    header.handle,
                    command,
                    payload,
                    structured,
                    true,
                    &mut self.out,
                );
                self.input.consume(need);
                if done {
                    self.replies += 1;
                } else {
                    self.queue_read(header.handle, command)?;
                }
            }
        }
        Ok(true)
    }

    /// The WRITE at the head of the input (`next`), if the write lane takes it: of
    /// `WRITE_MIN..=WRITE_MAX` bytes, and not one for the slow lane. Starts the lane; a
    /// lane that cannot start leaves the write to be served inline.
    fn large_write(&mut self, next: &Next) -> Option<(u64, Command, usize)> {
        let Next::Request(n) = *next else { return None };
        let payload = n - proto::REQUEST_HEADER_LEN;
        if payload < WRITE_MIN as usize || payload > WRITE_MAX as usize {
            return None;
        }
        let header = proto::parse_request_header(header_of(self.input.data())).ok()?;
        let write = match proto::check_request(&header, &self.caps) {
            Ok(command @ Command::Write { offset, len, .. })
                if !(len <= LANE_MAX_WRITE
                    && self.export.write_needs_sync(offset, u64::from(len))) =>
            {
                (header.handle, command, len as usize)
            }
            _ => return None,
        };
        if self.writes.is_none() {
            let lane = WriteLane::start(
                Arc::clone(&self.export),
                self.caps.structured,
                Arc::clone(&self.writer),
                self.io_flusher,
            );
            match lane {
                Ok(lane) => self.writes = Some(lane),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start an NBD write thread; writing inline");
                    return None;
                }
            }
        }
        Some(write)
    }

    /// Receives the payload of the WRITE at the head of the input (`len` bytes, buffered
    /// or still on the wire) into a buffer of its own and queues it for the write lane,
    /// which [`Connection::large_write`] started.
    fn receive_write(&mut self, handle: u64, command: Command, len: usize) -> Result<(), NbdError> {
        let (tx, mut payload) = self.write_buffer()?;
        if payload.len() < len {
            payload.resize(len, 0);
        }
        self.input.consume(proto::REQUEST_HEADER_LEN);
        let mut got = len.min(self.input.len());
        payload[..got].copy_from_slice(&self.input.data()[..got]);
        self.input.consume(got);
        if got < len {
            // Answer what is done before waiting for the rest.
            self.send_replies()?;
        }
        while got < len {
            match self.conn.read(&mut payload[got..len]) {
                Ok(0) => {
                    let eof = io::ErrorKind::UnexpectedEof.into();
                    return Err(conn_err("write payload", eof));
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(conn_err("write payload", e)),
            }
        }
        let job = LargeWrite {
            handle,
            command,
            payload,
            len,
        };
        self.hand_off(&tx, job)
    }

    /// The write lane's queue and a buffer for a payload; when all buffers are in use,
    /// waits for the next one the lane is done with (replies sent meanwhile).
    fn write_buffer(&mut self) -> Result<(mpsc::SyncSender<LargeWrite>, Vec<u8>), NbdError> {
        let gone = || conn_err("write", io::Error::other("write thread stopped"));
        let Some(lane) = self.writes.as_mut() else {
            return Err(gone());
        };
        let tx = lane.tx.clone();
        if let Some(buf) = lane.try_buffer() {
            return Ok((tx, buf));
        }
        self.send_replies()?;
        match &self.writes {
            Some(lane) => Ok((tx, lane.free.recv().map_err(|_| gone())?)),
            None => Err(gone()),
        }
    }

    fn queue_slow_write(&mut self, job: SlowWrite) -> Result<(), NbdError> {
        if self.lane.is_none() {
            let lane = SlowLane::start(
                Arc::clone(&self.export),
                self.caps.structured,
                Arc::clone(&self.writer),
                self.io_flusher,
            )
            .map_err(|e| conn_err("start the write-intent thread", e))?;
            self.lane = Some(lane);
        }
        match &self.lane {
            Some(lane) => {
                let tx = lane.tx.clone();
                self.hand_off(&tx, job)
            }
            None => Ok(()),
        }
    }

    /// Queues `job` for a helper thread; when its queue is full, sends the replies so far
    /// before waiting for room (don't sit on replies while waiting).
    fn hand_off<T>(&mut self, tx: &mpsc::SyncSender<T>, job: T) -> Result<(), NbdError> {
        let gone = || conn_err("reply", io::ErrorKind::BrokenPipe.into());
        match tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(mpsc::TrySendError::Full(job)) => {
                self.send_replies()?;
                tx.send(job).map_err(|_| gone())
            }
            Err(mpsc::TrySendError::Disconnected(_)) => Err(gone()),
        }
    }

    fn queue_read(&mut self, handle: u64, command: Command) -> Result<(), NbdError> {
        if self.reads.is_none() {
            let pool = ReadPool::start(
                &self.export,
                self.caps.structured,
                &self.writer,
                self.io_flusher,
            )
            .map_err(|e| conn_err("start the read threads", e))?;
            self.reads = Some(pool);
        }
        match &self.reads {
            Some(pool) => {
                let tx = pool.tx.clone();
                self.hand_off(&tx, (handle, command))
            }
            None => Ok(()),
        }
    }

    /// Skips the payload of a rejected request, buffered or still on the wire.
    fn discard(&mut self, mut len: usize) -> Result<(), NbdError> {
        let buffered = len.min(self.input.len());
        self.input.consume(buffered);
        len -= buffered;
        while len > 0 {
            let n = len.min(INPUT_BUF);
            match self.input.fill(&mut self.conn, n) {
                Ok(true) => {}
                Ok(false) => {
                    let eof = io::ErrorKind::UnexpectedEof.into();
                    return Err(conn_err("discarded payload", eof));
                }
                Err(e) => return Err(conn_err("discarded payload", e)),
            }
            let n = n.min(self.input.len());
            self.input.consume(n);
            len -= n;
        }
        Ok(())
    }

    fn send_replies(&mut self) -> Result<(), NbdError> {
        if self.out.is_empty() {
            return Ok(());
        }
        write_locked(&self.writer, &self.out).map_err(|e| conn_err("reply", e))?;
        self.out.clear();
        self.replies = 0;
        if self.out.capacity() > KEEP_BUF {
            self.out.shrink_to(OUT_FLUSH);
        }
        Ok(())
    }
}

fn header_of(data: &[u8]) -> &[u8; proto::REQUEST_HEADER_LEN] {
    // Callers have checked the length; an empty header parses as garbage (bad magic).
    const EMPTY: [u8; proto::REQUEST_HEADER_LEN] = [0; proto::REQUEST_HEADER_LEN];
    data.get(..proto::REQUEST_HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .unwrap_or(&EMPTY)
}

/// How much of `data` the request at its head needs. A header that cannot be parsed
/// (bad magic, oversized write) is a protocol error that ends the session.
fn next_request(data: &[u8], caps: &SessionCaps) -> Result<Next, NbdError> {
    if data.len() < proto::REQUEST_HEADER_LEN {
        return Ok(Next::Header);
    }
    let header = proto::parse_request_header(header_of(data))?;
    let payload = match proto::check_request(&header, caps) {
        Ok(Command::Write { len, .. }) => len as usize,
        // A rejected request's payload is skipped as it streams in, never buffered whole.
        _ => 0,
    };
    Ok(Next::Request(proto::REQUEST_HEADER_LEN + payload))
}

/// An error reply in the form the session requires.
fn error_reply(handle: u64, errno: u32, message: &str, structured: bool) -> Vec<u8> {
    if structured {
        proto::error_chunk(handle, errno, message)
    } else {
        proto::simple_reply(handle, errno).to_vec()
    }
}

fn io_reply(handle: u64, result: io::Result<()>, structured: bool, out: &mut Vec<u8>) {
    match result {
        Ok(()) => out.extend_from_slice(&proto::simple_reply(handle, 0)),
        Err(e) => out.extend_from_slice(&error_reply(
            handle,
            proto::errno_of(&e),
            &e.to_string(),
            structured,
        )),
    }
}

/// Runs one command against the export and appends its complete reply to `out`.
/// Blocking, except that with `cached_only` a read that would wait for the disk is not
/// done: `false`, and nothing appended.
fn execute(
    export: &dyn Export,
    handle: u64,
    command: Command,
    payload: &[u8],
    structured: bool,
    cached_only: bool,
    out: &mut Vec<u8>,
) -> bool {
    match command {
        Command::Read { offset, len, df } => {
            let cached = |b: &mut [u8], o: u64| export.read_cached(b, o);
            let blocking = |b: &mut [u8], o: u64| Some(export.read_at(b, o));
            let read: ReadFn = if cached_only { &cached } else { &blocking };
            return if structured {
                read_structured(export, read, handle, offset, len, df, out)
            } else {
                read_simple(read, handle, offset, len, out)
            };
        }
        Command::Write { offset, fua, .. } => io_reply(
            handle,
            export.write_at(payload, offset, fua),
            structured,
            out,
        ),
        Command::Flush => io_reply(handle, export.flush(), structured, out),
        Command::Trim { offset, len, fua } => {
            let r = export.trim(offset, u64::from(len));
            io_reply(
                handle,
                r.and_then(|()| flush_if(export, fua)),
                structured,
                out,
            )
        }
        Command::Cache { offset, len } => io_reply(
            handle,
            export.cache(offset, u64::from(len)),
            structured,
            out,
        ),
        Command::WriteZeroes {
            offset,
            len,
            fua,
            may_trim,
            fast,
        } => {
            let len = u64::from(len);
            let r = if fast {
                export.write_zeroes_fast(offset, len, may_trim)
            } else {
                export.write_zeroes(offset, len, may_trim)
            };
            io_reply(
                handle,
                r.and_then(|()| flush_if(export, fua)),
                structured,
                out,
            )
        }
        Command::BlockStatus {
            offset,
            len,
            req_one,
        } => match export.block_status(offset, u64::from(len)) {
            Ok(extents) => {
                let descs = descriptors(&extents, len, req_one);
                let chunk = proto::block_status_chunk(handle, proto::BASE_ALLOCATION_ID, &descs);
                out.extend_from_slice(&chunk);
            }
            Err(e) => out.extend_from_slice(&error_reply(
                handle,
                proto::errno_of(&e),
                &e.to_string(),
                structured,
            )),
        },
        // The connection stops at DISC and never hands it here.
        Command::Disconnect => {}
    }
    true
}

fn flush_if(export: &dyn Export, fua: bool) -> io::Result<()> {
    if fua {
        export.flush()
    } else {
        Ok(())
    }
}

/// How a reply reads data: with blocking reads, or from the page cache only (`None`
/// when it would block).
type ReadFn<'a> = &'a dyn Fn(&mut [u8], u64) -> Option<io::Result<()>>;

/// Destinations at least this aligned get the data read straight into them.
const READ_ALIGN: usize = 64;
/// The most a thread's scratch buffer for unaligned destinations holds.
const SCRATCH_MAX: usize = 1 << 20;

thread_local! {
    static SCRATCH: std::cell::RefCell<AlignedBuf> = std::cell::RefCell::new(AlignedBuf::default());
}

/// `read` into `dst`, which lies somewhere in a reply buffer after its headers: where `dst`
/// is not 64-byte aligned, the data is read into this thread's page-aligned scratch buffer
/// (at most `SCRATCH_MAX` at a time) and copied over, because the kernel's copy out of the
/// page cache into a misaligned destination is several times slower than this extra copy
/// (see `crate::buf`).
fn read_aligned(read: ReadFn, dst: &mut [u8], offset: u64) -> Option<io::Result<()>> {
    if dst.as_ptr() as usize % READ_ALIGN == 0 {
        return read(dst, offset);
    }
    SCRATCH.with_borrow_mut(|scratch| {
        let mut done = 0usize;
        for part in dst.chunks_mut(SCRATCH_MAX) {
            scratch.resize_for_overwrite(part.len());
            match read(scratch, offset + done as u64) {
                Some(Ok(())) => part.copy_from_slice(scratch),
                other => return other,
            }
            done += part.len();
        }
        Some(Ok(()))
    })
}

/// A simple READ reply: the header is built only once the data is in hand, so an error
/// never follows a success header. `false` (and nothing appended) when `read` would block.
fn read_simple(read: ReadFn, handle: u64, offset: u64, len: u32, out: &mut Vec<u8>) -> bool {
    let start = out.len();
    out.resize(start + 16 + len as usize, 0);
    match read_aligned(read, &mut out[start + 16..], offset) {
        None => {
            out.truncate(start);
            return false;
        }
        Some(Ok(())) => out[start..start + 16].copy_from_slice(&proto::simple_reply(handle, 0)),
        Some(Err(e)) => {
            out.truncate(start);
            out.extend_from_slice(&proto::simple_reply(handle, proto::errno_of(&e)));
        }
    }
    true
}

/// A structured READ reply: hole chunks for zero extents (unless DF), data chunks for the
/// rest, then a final NONE chunk. The whole reply is built before any of it is sent, so
/// an error turns into a single ERROR chunk. `false` (and nothing appended) when `read`
/// would block.
fn read_structured(
    export: &dyn Export,
    read: ReadFn,
    handle: u64,
    offset: u64,
    len: u32,
    df: bool,
    out: &mut Vec<u8>,
) -> bool {
    if len == 0 {
        out.extend_from_slice(&proto::done_chunk(handle));
        return true;
    }
    let start = out.len();
    // Small reads skip the hole lookup: two lseeks cost more than sending the zeroes.
    let whole = [(offset, u64::from(len), false)];
    let looked_up;
    let segments: &[(u64, u64, bool)] = if df || u64::from(len) < MIN_HOLE_LOOKUP {
        &whole
    } else {
        looked_up = read_segments(export, offset, u64::from(len));
        &looked_up
    };
    for &(seg_off, seg_len, zero) in segments {
        if zero {
            // Segments never exceed the request, so they fit in 32 bits.
            out.extend_from_slice(&proto::hole_chunk(0, handle, seg_off, seg_len as u32));
            continue;
        }
        out.extend_from_slice(&proto::data_chunk_header(
            0,
            handle,
            seg_off,
            seg_len as u32,
        ));
        let at = out.len();
        out.resize(at + seg_len as usize, 0);
        match read_aligned(read, &mut out[at..], seg_off) {
            Some(Ok(())) => {}
            None => {
                out.truncate(start);
                return false;
            }
            Some(Err(e)) => {
                out.truncate(start);
                let chunk = proto::error_chunk(handle, proto::errno_of(&e), &e.to_string());
                out.extend_from_slice(&chunk);
                return true;
            }
        }
    }
    out.extend_from_slice(&proto::done_chunk(handle));
    true
}

/// Splits a read into (offset, len, reads-as-zero) segments using block status; small
/// zero runs are merged into data. A failed status query means "all data".
fn read_segments(export: &dyn Export, offset: u64, len: u64) -> Vec<(u64, u64, bool)> {
    let extents = export.block_status(offset, len).unwrap_or_default();
    let mut segs: Vec<(u64, u64, bool)> = Vec::new();
    let mut pos = offset;
    let end = offset + len;
    for e in extents {
        if pos >= end {
            break;
        }
        let n = e.len.min(end - pos);
        if n == 0 {
            break;
        }
        let zero = e.zero && n >= MIN_HOLE_CHUNK;
        match segs.last_mut() {
            Some(last) if last.2 == zero => last.1 += n,
            _ => segs.push((pos, n, zero)),
        }
        pos += n;
    }
    if pos < end {
        match segs.last_mut() {
            Some(last) if !last.2 => last.1 += end - pos,
            _ => segs.push((pos, end - pos, false)),
        }
    }
    segs
}

/// Block status descriptors for a request of `len` bytes: never longer than the request,
/// never zero-length, neighbours with equal flags merged, at least one.
fn descriptors(extents: &[super::Extent], len: u32, req_one: bool) -> Vec<proto::Descriptor> {
    let mut out: Vec<proto::Descriptor> = Vec::new();
    let mut left = u64::from(len);
    for e in extents {
        let n = e.len.min(left);
        if n == 0 {
            break;
        }
        let flags =
            if e.hole { proto::STATE_HOLE } else { 0 } | if e.zero { proto::STATE_ZERO } else { 0 };
        match out.last_mut() {
            Some(last) if last.flags == flags => last.len += n as u32,
            _ => {
                if out.len() == MAX_DESCRIPTORS {
                    break;
                }
                out.push(proto::Descriptor {
                    len: n as u32,
                    flags,
                });
            }
        }
        left -= n;
    }
    if out.is_empty() {
        out.push(proto::Descriptor { len, flags: 0 });
    }
    if req_one {
        out.truncate(1);
    }
    out
}

async fn send<W: AsyncWrite + Unpin>(
    wr: &mut W,
    bytes: &[u8],
    op: &'static str,
) -> Result<(), NbdError> {
    wr.write_all(bytes)
        .await
        .map_err(|source| conn_err(op, source))?;
    wr.flush().await.map_err(|source| conn_err(op, source))
}

fn conn_err(op: &'static str, source: io::Error) -> NbdError {
    NbdError::Connection { op, source }
}

/// An error and its sources, joined for one log line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A listener the server can accept from.
trait Listener: Send {
    type Stream: AsyncRead + AsyncWrite + IntoBlocking + Unpin + Send + 'static;
    fn next_conn(&self) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

impl Listener for UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn next_conn(&self) -> io::Result<Self::Stream> {
        UnixListener::accept(self).await.map(|(s, _)| s)
    }
}

impl Listener for TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn next_conn(&self) -> io::Result<Self::Stream> {
        let (s, _) = TcpListener::accept(self).await?;
        // Replies are small and latency-bound; don't let Nagle hold them.
        s.set_nodelay(true)?;
        Ok(s)
    }
}

/// A socket taken out of tokio for the transmission phase's own thread.
enum BlockingConn {
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream),
}

impl BlockingConn {
    /// Reads what is already there without waiting: `WouldBlock` when nothing is.
    fn read_nowait(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::fd::AsRawFd;
        let fd = match self {
            BlockingConn::Unix(s) => s.as_raw_fd(),
            BlockingConn::Tcp(s) => s.as_raw_fd(),
        };
        nix::sys::socket::recv(fd, buf, nix::sys::socket::MsgFlags::MSG_DONTWAIT)
            .map_err(io::Error::from)
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            BlockingConn::Unix(s) => s.read(buf),
            BlockingConn::Tcp(s) => s.read(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            BlockingConn::Unix(s) => s.write_all(buf),
            BlockingConn::Tcp(s) => s.write_all(buf),
        }
    }

    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        match self {
            BlockingConn::Unix(s) => s.as_fd(),
            BlockingConn::Tcp(s) => s.as_fd(),
        }
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            BlockingConn::Unix(s) => s.shutdown(how),
            BlockingConn::Tcp(s) => s.shutdown(how),
        }
    }

    fn try_clone(&self) -> io::Result<BlockingConn> {
        Ok(match self {
            BlockingConn::Unix(s) => BlockingConn::Unix(s.try_clone()?),
            BlockingConn::Tcp(s) => BlockingConn::Tcp(s.try_clone()?),
        })
    }
}

/// A tokio socket that can become a blocking std one.
trait IntoBlocking {
    fn into_blocking(self) -> io::Result<BlockingConn>;
}

/// The send buffer asked for a connection in the transmission phase: room for several
/// 1 MiB read replies, so a reply is not sent in many small steps, each waiting for the
/// client to take the last (the kernel caps it at `net.core.wmem_max`; a refusal is only
/// slower).
const SEND_BUFFER: usize = 4 << 20;

fn transmission_socket(fd: std::os::fd::BorrowedFd<'_>) {
    let _ = nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::SndBuf, &SEND_BUFFER);
}

impl IntoBlocking for tokio::net::UnixStream {
    fn into_blocking(self) -> io::Result<BlockingConn> {
        let s = self.into_std()?;
        s.set_nonblocking(false)?;
        transmission_socket(std::os::fd::AsFd::as_fd(&s));
        Ok(BlockingConn::Unix(s))
    }
}

impl IntoBlocking for tokio::net::TcpStream {
    fn into_blocking(self) -> io::Result<BlockingConn> {
        let s = self.into_std()?;
        s.set_nonblocking(false)?;
        transmission_socket(std::os::fd::AsFd::as_fd(&s));
        Ok(BlockingConn::Tcp(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::Extent;

    #[test]
    fn an_export_removed_while_in_use_is_waited_for_again_and_not_exported_anew() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let export =
            || -> Arc<dyn Export> { Arc::new(super::super::FileExport::open(&path).unwrap()) };
        let server = NbdServer::new();
        server.add_export("e", export()).unwrap();
        // A connection's use of it, as the handshake takes it.
        let (_, _, in_use) = server.lookup("e").unwrap();
        let short = Duration::from_millis(30);
        let busy = |r: Result<(), NbdError>| {
            matches!(r, Err(NbdError::ExportStillInUse { connections: 1, .. }))
        };
        assert!(busy(server.remove_export_within("e", short)));
        // Gone for new clients, but neither "not found" nor exported anew meanwhile.
        assert!(server.lookup("e").is_none());
        assert!(busy(server.remove_export_within("e", short)));
        assert!(busy(server.add_export("e", export())));
        drop(in_use);
        server.remove_export_within("e", short).unwrap();
        assert!(matches!(
            server.remove_export_within("e", short),
            Err(NbdError::ExportNotFound { .. })
        ));
        server.add_export("e", export()).unwrap();
        // Ended connections need no second removal before the name is exported again.
        let (_, _, in_use) = server.lookup("e").unwrap();
        assert!(busy(server.remove_export_within("e", short)));
        drop(in_use);
        server.add_export("e", export()).unwrap();
        server.remove_export_within("e", short).unwrap();

        // While the first removal still waits, too.
        server.add_export("e", export()).unwrap();
        let (_, _, in_use) = server.lookup("e").unwrap();
        let remover = {
            let server = server.clone();
            std::thread::spawn(move || server.remove_export_within("e", Duration::from_secs(20)))
        };
        while server.lookup("e").is_some() {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(busy(server.add_export("e", export())));
        assert!(busy(server.remove_export_within("e", short)));
        drop(in_use);
        remover.join().unwrap().unwrap();
        server.add_export("e", export()).unwrap();
    }

    #[test]
    fn waiting_for_an_export_s_users_ends_when_the_last_leaves_or_times_out() {
        let users = Arc::new(Users::default());
        assert_eq!(users.wait_idle(Duration::ZERO), 0);
        let (a, b) = (Users::enter(&users), Users::enter(&users));
        assert_eq!(users.wait_idle(Duration::from_millis(20)), 2);
        drop(a);
        let leave = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            drop(b);
        });
        let t = Instant::now();
        assert_eq!(users.wait_idle(Duration::from_secs(20)), 0);
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "not woken by the last user"
        );
        leave.join().unwrap();
    }

    #[test]
    fn reads_into_misaligned_destinations_go_through_the_scratch_buffer() {
        // A "file" whose byte at x is x % 251; the read records where it was asked to write.
        let dests = std::cell::RefCell::new(Vec::new());
        let read = |buf: &mut [u8], off: u64| -> Option<io::Result<()>> {
            dests.borrow_mut().push(buf.as_ptr() as usize);
            for (i, b) in buf.iter_mut().enumerate() {
                *b = ((off + i as u64) % 251) as u8;
            }
            Some(Ok(()))
        };
        let len = SCRATCH_MAX * 2 + 100;
        let mut out = AlignedBuf::zeroed(len + 16);
        for at in [0usize, 16] {
            dests.borrow_mut().clear();
            let dst = &mut out[at..at + len];
            read_aligned(&read, dst, 7).expect("read").expect("ok");
            assert!(dst
                .iter()
                .enumerate()
                .all(|(i, &b)| b == ((7 + i) % 251) as u8));
            let dests = dests.borrow();
            if at == 0 {
                // Aligned: straight into the destination, in one read.
                assert_eq!(*dests, vec![dst.as_ptr() as usize]);
            } else {
                // Misaligned: bounded, aligned reads of the scratch buffer.
                assert_eq!(dests.len(), 3);
                assert!(dests.iter().all(|&p| p % READ_ALIGN == 0));
            }
        }
        // "Would block" part-way through is passed on.
        let mut calls = 0;
        let blocked = |_: &mut [u8], _: u64| -> Option<io::Result<()>> {
            calls += 1;
            (calls < 2).then_some(Ok(()))
        };
        let blocked_cell = std::cell::RefCell::new(blocked);
        let read = |b: &mut [u8], o: u64| (blocked_cell.borrow_mut())(b, o);
        assert!(read_aligned(&read, &mut out[16..16 + len], 0).is_none());
    }

    fn request(kind: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut r = proto::REQUEST_MAGIC.to_be_bytes().to_vec();
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&handle.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        r
    }

    /// What the kernel's nbd driver does: no handshake, simple replies only.
    #[test]
    fn negotiated_connections_serve_the_transmission_phase_only() {
        let dir = tempfile::tempdir().unwrap();
        let export = crate::nbd::FileExport::create(&dir.path().join("img"), 1 << 20).unwrap();
        let server = NbdServer::new();
        server.add_export("v", Arc::new(export)).unwrap();
        let (mut client, ours) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(server
            .serve_negotiated("nope", ours.try_clone().unwrap())
            .is_err());
        let n = server.serve_negotiated("v", ours).unwrap();
        assert_eq!(n.size, 1 << 20);
        assert_eq!(n.flags, transmission_flags(false, false));
        assert_eq!(n.flags & proto::FLAG_SEND_DF, 0);
        let mut w = request(proto::CMD_WRITE, 7, 8192, 4096);
        w.extend_from_slice(&[0xab; 4096]);
        client.write_all(&w).unwrap();
        client
            .write_all(&request(proto::CMD_READ, 8, 8190, 8))
            .unwrap();
        let mut reply = [0u8; 16 + 16 + 8];
        client.read_exact(&mut reply).unwrap();
        let simple = |r: &[u8], handle: u64| {
            assert_eq!(r[..4], proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
            assert_eq!(r[4..8], [0; 4], "error");
            assert_eq!(r[8..16], handle.to_be_bytes());
        };
        simple(&reply[..16], 7);
        simple(&reply[16..32], 8);
        assert_eq!(reply[32..], [0, 0, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab]);
        // NBD_CMD_DISC ends the connection: the socket is closed without a reply.
        client
            .write_all(&request(proto::CMD_DISC, 9, 0, 0))
            .unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }

    #[test]
    fn descriptors_are_clamped_merged_and_nonempty() {
        let ex = [
            Extent {
                len: 4096,
                hole: true,
                zero: true,
            },
            Extent {
                len: 4096,
                hole: true,
                zero: true,
            },
            Extent {
                len: 1 << 40,
                hole: false,
                zero: false,
            },
        ];
        let d = descriptors(&ex, 10000, false);
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].len, 8192);
        assert_eq!(d[0].flags, proto::STATE_HOLE | proto::STATE_ZERO);
        assert_eq!(d[1].len, 10000 - 8192);
        assert_eq!(descriptors(&ex, 10000, true).len(), 1);
        assert_eq!(
            descriptors(&[], 7, false),
            vec![proto::Descriptor { len: 7, flags: 0 }]
        );
    }

    #[test]
    fn transmission_flags_advertise_df_only_with_structured_replies() {
        assert_eq!(transmission_flags(false, false) & proto::FLAG_SEND_DF, 0);
        assert_ne!(transmission_flags(true, false) & proto::FLAG_SEND_DF, 0);
        assert_ne!(
            transmission_flags(true, false) & proto::FLAG_CAN_MULTI_CONN,
            0
        );
        assert_ne!(transmission_flags(true, true) & proto::FLAG_READ_ONLY, 0);
    }
}

//! [`NbdServer`]: accepts connections on a unix or TCP listener, negotiates the fixed
//! newstyle handshake and serves requests against the named [`Export`].
//!
//! Per connection: one task reads requests; each request runs on tokio's blocking pool;
//! replies travel through a channel to one writer task, so replies may complete out of
//! order but never interleave. Bytes in flight per connection are bounded by a semaphore,
//! which also back-pressures a client that stops reading replies. Any protocol violation
//! ends that connection only.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{
    AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter, ReadHalf, WriteHalf,
};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::export::Export;
use super::proto::{self, Command, ProtoError, RequestHeader, SessionCaps};
use super::NbdError;

/// Connections served at once by one `serve_*` call; more are closed at accept.
const MAX_CONNECTIONS: usize = 512;
/// Time a client has to finish option haggling.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Options accepted in one handshake before the client is considered hostile.
const MAX_OPTIONS: usize = 256;
/// Bytes of request and reply payload in flight per connection (at least one maximal
/// request must fit).
const INFLIGHT_BYTES: usize = 2 * proto::MAX_PAYLOAD as usize;
/// Budget charged for every request on top of its payload, bounding the request count.
const REQUEST_COST: usize = 64 * 1024;
/// Time given to in-flight replies after the reader stops, before the socket is dropped.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
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
}

struct Slot {
    export: Arc<dyn Export>,
    /// Set to true when the export is removed; its connections watch it and close.
    removed: watch::Sender<bool>,
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

    /// Adds an export under `name` (1..=4096 bytes of UTF-8 without NUL).
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
        let (removed, _) = watch::channel(false);
        map.insert(name.to_string(), Slot { export, removed });
        Ok(())
    }

    /// Removes an export; its connected clients are disconnected once their in-flight
    /// requests are answered.
    pub fn remove_export(&self, name: &str) -> Result<(), NbdError> {
        let slot = self
            .exports()
            .remove(name)
            .ok_or_else(|| NbdError::ExportNotFound {
                name: name.to_string(),
            })?;
        slot.removed.send_replace(true);
        Ok(())
    }

    /// Names of the current exports, sorted.
    pub fn export_names(&self) -> Vec<String> {
        self.exports().keys().cloned().collect()
    }

    /// Looks an export up and subscribes to its removal, atomically.
    fn lookup(&self, name: &str) -> Option<(Arc<dyn Export>, watch::Receiver<bool>)> {
        self.exports()
            .get(name)
            .map(|s| (Arc::clone(&s.export), s.removed.subscribe()))
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
        while conns.join_next().await.is_some() {}
    }

    async fn serve_connection<S>(
        &self,
        stream: S,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), NbdError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(stream);
        let mut rd = BufReader::with_capacity(128 * 1024, rd);
        let mut wr = BufWriter::with_capacity(128 * 1024, wr);
        let session = tokio::select! {
            r = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.handshake(&mut rd, &mut wr)) => {
                r.map_err(|_| NbdError::HandshakeTimeout)??
            }
            _ = stop.wait_for(|s| *s) => return Ok(()),
        };
        match session {
            Some(session) => transmission(session, rd, wr, stop).await,
            None => Ok(()),
        }
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
                    let (export, removed) = self
                        .lookup(&name)
                        .ok_or(NbdError::ExportNotFound { name: name.clone() })?;
                    let flags = transmission_flags(structured, export.read_only());
                    let reply = proto::export_name_reply(export.size(), flags, client.no_zeroes);
                    send(wr, &reply, "export name reply").await?;
                    let block_status = meta_export.as_deref() == Some(name.as_str());
                    return Ok(Some(Session {
                        export,
                        removed,
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
                        Some((export, removed)) => {
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
    structured: bool,
    block_status: bool,
}

/// One reply on its way to the socket, with the in-flight budget it holds.
struct Outgoing {
    bytes: Vec<u8>,
    _permit: OwnedSemaphorePermit,
}

/// What the reader took off the wire.
enum Incoming {
    Request {
        header: RequestHeader,
        command: Command,
        payload: Vec<u8>,
        permit: OwnedSemaphorePermit,
    },
    Rejected {
        header: RequestHeader,
        rejection: proto::Rejection,
        permit: OwnedSemaphorePermit,
    },
    Disconnect,
    Closed,
}

async fn transmission<R, W>(
    session: Session,
    mut rd: BufReader<ReadHalf<R>>,
    wr: BufWriter<WriteHalf<W>>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), NbdError>
where
    R: AsyncRead + Send + 'static,
    W: AsyncWrite + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel::<Outgoing>();
    let mut writer = tokio::spawn(write_replies(wr, rx));
    let budget = Arc::new(Semaphore::new(INFLIGHT_BYTES));
    let caps = SessionCaps {
        size: session.export.size(),
        structured: session.structured,
        block_status: session.block_status,
        read_only: session.export.read_only(),
    };
    let mut removed = session.removed.clone();

    let result = loop {
        let incoming = tokio::select! {
            r = read_request(&mut rd, &caps, &budget) => r,
            _ = stop.wait_for(|s| *s) => break Ok(()),
            _ = removed.wait_for(|r| *r) => break Ok(()),
            _ = tx.closed() => break Ok(()),
        };
        match incoming {
            Err(e) => break Err(e),
            Ok(Incoming::Disconnect) | Ok(Incoming::Closed) => break Ok(()),
            Ok(Incoming::Rejected {
                header,
                rejection,
                permit,
            }) => {
                let bytes = error_reply(
                    header.handle,
                    rejection.errno,
                    rejection.reason,
                    caps.structured,
                );
                let _ = tx.send(Outgoing {
                    bytes,
                    _permit: permit,
                });
            }
            Ok(Incoming::Request {
                header,
                command,
                payload,
                permit,
            }) => {
                let export = Arc::clone(&session.export);
                let tx = tx.clone();
                let structured = caps.structured;
                tokio::task::spawn_blocking(move || {
                    let handle = header.handle;
                    let bytes = std::panic::catch_unwind(AssertUnwindSafe(|| {
                        execute(&*export, handle, command, &payload, structured)
                    }))
                    .unwrap_or_else(|_| {
                        error_reply(handle, proto::EIO, "export panicked", structured)
                    });
                    // A closed channel means the connection is gone; nobody to answer.
                    let _ = tx.send(Outgoing {
                        bytes,
                        _permit: permit,
                    });
                });
            }
        }
    };
    drop(tx);
    if result.is_err() {
        // A protocol violation is a hard disconnect: don't wait for the client.
        writer.abort();
        return result;
    }
    match tokio::time::timeout(DRAIN_TIMEOUT, &mut writer).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(source))) => Err(conn_err("reply", source)),
        Ok(Err(_)) => Ok(()),
        Err(_) => {
            writer.abort();
            Ok(())
        }
    }
}

async fn read_request<R: AsyncRead + Unpin>(
    rd: &mut R,
    caps: &SessionCaps,
    budget: &Arc<Semaphore>,
) -> Result<Incoming, NbdError> {
    let mut hdr = [0u8; proto::REQUEST_HEADER_LEN];
    match rd.read_exact(&mut hdr).await {
        Ok(_) => {}
        // The client went away, perhaps mid-header: nothing left to answer.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Incoming::Closed),
        Err(source) => return Err(conn_err("request header", source)),
    }
    let header = proto::parse_request_header(&hdr)?;
    let checked = proto::check_request(&header, caps);
    let payload_len = match &checked {
        Ok(Command::Write { len, .. }) => *len as usize,
        Ok(Command::Read { len, .. }) => *len as usize,
        _ => 0,
    };
    // Bounded by MAX_PAYLOAD (parse/check), so this always fits under INFLIGHT_BYTES.
    let cost = (payload_len + REQUEST_COST) as u32;
    let permit = Arc::clone(budget)
        .acquire_many_owned(cost)
        .await
        .map_err(|_| conn_err("budget", io::ErrorKind::BrokenPipe.into()))?;
    match checked {
        Err(rejection) => {
            discard(rd, u64::from(rejection.discard)).await?;
            Ok(Incoming::Rejected {
                header,
                rejection,
                permit,
            })
        }
        Ok(Command::Disconnect) => Ok(Incoming::Disconnect),
        Ok(command) => {
            let payload = if let Command::Write { len, .. } = command {
                let mut buf = vec![0u8; len as usize];
                rd.read_exact(&mut buf)
                    .await
                    .map_err(|source| conn_err("write payload", source))?;
                buf
            } else {
                Vec::new()
            };
            Ok(Incoming::Request {
                header,
                command,
                payload,
                permit,
            })
        }
    }
}

async fn discard<R: AsyncRead + Unpin>(rd: &mut R, len: u64) -> Result<(), NbdError> {
    let copied = tokio::io::copy(&mut rd.take(len), &mut tokio::io::sink())
        .await
        .map_err(|source| conn_err("discarded payload", source))?;
    if copied < len {
        return Err(conn_err(
            "discarded payload",
            io::ErrorKind::UnexpectedEof.into(),
        ));
    }
    Ok(())
}

async fn write_replies<W: AsyncWrite>(
    mut wr: BufWriter<WriteHalf<W>>,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
) -> io::Result<()> {
    while let Some(msg) = rx.recv().await {
        wr.write_all(&msg.bytes).await?;
        drop(msg);
        // Batch whatever else is ready into one flush.
        while let Ok(msg) = rx.try_recv() {
            wr.write_all(&msg.bytes).await?;
        }
        wr.flush().await?;
    }
    wr.shutdown().await
}

/// An error reply in the form the session requires.
fn error_reply(handle: u64, errno: u32, message: &str, structured: bool) -> Vec<u8> {
    if structured {
        proto::error_chunk(handle, errno, message)
    } else {
        proto::simple_reply(handle, errno).to_vec()
    }
}

fn io_reply(handle: u64, result: io::Result<()>, structured: bool) -> Vec<u8> {
    match result {
        Ok(()) => proto::simple_reply(handle, 0).to_vec(),
        Err(e) => error_reply(handle, proto::errno_of(&e), &e.to_string(), structured),
    }
}

/// Runs one command against the export and builds its complete reply. Blocking.
fn execute(
    export: &dyn Export,
    handle: u64,
    command: Command,
    payload: &[u8],
    structured: bool,
) -> Vec<u8> {
    match command {
        Command::Read { offset, len, df } => {
            if structured {
                read_structured(export, handle, offset, len, df)
            } else {
                read_simple(export, handle, offset, len)
            }
        }
        Command::Write { offset, fua, .. } => {
            io_reply(handle, export.write_at(payload, offset, fua), structured)
        }
        Command::Flush => io_reply(handle, export.flush(), structured),
        Command::Trim { offset, len, fua } => {
            let r = export.trim(offset, u64::from(len));
            io_reply(handle, r.and_then(|()| flush_if(export, fua)), structured)
        }
        Command::Cache { offset, len } => {
            io_reply(handle, export.cache(offset, u64::from(len)), structured)
        }
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
            io_reply(handle, r.and_then(|()| flush_if(export, fua)), structured)
        }
        Command::BlockStatus {
            offset,
            len,
            req_one,
        } => match export.block_status(offset, u64::from(len)) {
            Ok(extents) => {
                let descs = descriptors(&extents, len, req_one);
                proto::block_status_chunk(handle, proto::BASE_ALLOCATION_ID, &descs)
            }
            Err(e) => error_reply(handle, proto::errno_of(&e), &e.to_string(), structured),
        },
        // The reader stops at DISC and never hands it here.
        Command::Disconnect => Vec::new(),
    }
}

fn flush_if(export: &dyn Export, fua: bool) -> io::Result<()> {
    if fua {
        export.flush()
    } else {
        Ok(())
    }
}

/// A simple READ reply: the header is built only once the data is in hand, so an error
/// never follows a success header.
fn read_simple(export: &dyn Export, handle: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut out = vec![0u8; 16 + len as usize];
    match export.read_at(&mut out[16..], offset) {
        Ok(()) => {
            out[..16].copy_from_slice(&proto::simple_reply(handle, 0));
            out
        }
        Err(e) => proto::simple_reply(handle, proto::errno_of(&e)).to_vec(),
    }
}

/// A structured READ reply: hole chunks for zero extents (unless DF), data chunks for the
/// rest, then a final NONE chunk. The whole reply is built before any of it is sent, so
/// an error turns into a single ERROR chunk.
fn read_structured(export: &dyn Export, handle: u64, offset: u64, len: u32, df: bool) -> Vec<u8> {
    if len == 0 {
        return proto::done_chunk(handle).to_vec();
    }
    // Small reads skip the hole lookup: two lseeks cost more than sending the zeroes.
    let segments = if df || u64::from(len) < MIN_HOLE_LOOKUP {
        vec![(offset, u64::from(len), false)]
    } else {
        read_segments(export, offset, u64::from(len))
    };
    let data_bytes: u64 = segments.iter().filter(|s| !s.2).map(|s| s.1).sum();
    let mut out = Vec::with_capacity(data_bytes as usize + 28 * segments.len() + 20);
    for (seg_off, seg_len, zero) in segments {
        if zero {
            // Segments never exceed the request, so they fit in 32 bits.
            out.extend_from_slice(&proto::hole_chunk(0, handle, seg_off, seg_len as u32));
            continue;
        }
        out.extend_from_slice(&proto::chunk_header(
            0,
            proto::REPLY_TYPE_OFFSET_DATA,
            handle,
            seg_len as u32 + 8,
        ));
        out.extend_from_slice(&seg_off.to_be_bytes());
        let start = out.len();
        out.resize(start + seg_len as usize, 0);
        if let Err(e) = export.read_at(&mut out[start..], seg_off) {
            return proto::error_chunk(handle, proto::errno_of(&e), &e.to_string());
        }
    }
    out.extend_from_slice(&proto::done_chunk(handle));
    out
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
    type Stream: AsyncRead + AsyncWrite + Send + 'static;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::Extent;

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

//! The NBD wire protocol: constants, pure parsers of what a client sends and encoders of
//! what the server answers. Nothing here does I/O, so every parser can be unit-tested and
//! fuzzed on raw bytes. All integers on the wire are big-endian.
//!
//! Handshake (fixed newstyle only):
//! ```text
//! S: "NBDMAGIC" u64 | "IHAVEOPT" u64 | handshake flags u16
//! C: client flags u32
//! C: "IHAVEOPT" u64 | option u32 | length u32 | data          (repeated)
//! S: 0x3e889045565a9 u64 | option u32 | reply type u32 | length u32 | data
//! ```
//! Transmission:
//! ```text
//! C: 0x25609513 u32 | flags u16 | type u16 | handle u64 | offset u64 | length u32 [| data]
//! S: 0x67446698 u32 | error u32 | handle u64 [| data]                      (simple reply)
//! S: 0x668e33ef u32 | flags u16 | type u16 | handle u64 | length u32 | payload (chunk)
//! ```

use std::fmt;

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server → client).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags (client → server).
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

/// `NBD_REP_INFO` types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply chunk types and flags.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// `base:allocation` descriptor flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// Error values (a fixed subset of errno, as the protocol defines them).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// The one metadata context this server offers, and the id it is given on the wire.
pub const BASE_ALLOCATION: &str = "base:allocation";
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Largest option payload accepted during the handshake; a bigger one ends the session.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Longest export name or query string (the protocol's own limit for strings).
pub const MAX_STRING_LEN: usize = 4096;
/// Largest READ or WRITE payload; also advertised as the maximum block size.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Block sizes advertised in `NBD_INFO_BLOCK_SIZE`.
pub const MIN_BLOCK: u32 = 1;
pub const PREFERRED_BLOCK: u32 = 4096;

pub const REQUEST_HEADER_LEN: usize = 28;
pub const OPTION_HEADER_LEN: usize = 16;

/// A protocol violation that ends the session (a hard disconnect).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("Bad {what} magic {found:#x}")]
    BadMagic { what: &'static str, found: u64 },
    #[error("Unknown client flags {flags:#x}")]
    UnknownClientFlags { flags: u32 },
    #[error("Option {option} carries {len} bytes, more than the {max} allowed")]
    OptionTooLarge { option: u32, len: u32, max: u32 },
    #[error("Write of {len} bytes exceeds the {max} byte limit")]
    PayloadTooLarge { len: u32, max: u32 },
    #[error("Malformed {what}")]
    Malformed { what: &'static str },
}

/// A big-endian reader over a byte slice that never panics: running short is `None`.
struct Be<'a> {
    buf: &'a [u8],
}

impl<'a> Be<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Be { buf }
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Option<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Some(u64::from_be_bytes(a))
    }
    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// The server's greeting: magic, option magic and handshake flags.
pub fn server_greeting() -> [u8; 18] {
    let mut out = [0u8; 18];
    out[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// What the client's flags word asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    pub fixed_newstyle: bool,
    pub no_zeroes: bool,
}

/// Parses the client's flags; any bit this server did not offer ends the session.
pub fn parse_client_flags(flags: u32) -> Result<ClientFlags, ProtoError> {
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(ProtoError::UnknownClientFlags { flags });
    }
    Ok(ClientFlags {
        fixed_newstyle: flags & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: flags & FLAG_C_NO_ZEROES != 0,
    })
}

/// An option header; the payload (`len` bytes) follows it on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

/// Parses an option header, refusing payloads larger than [`MAX_OPTION_LEN`] before
/// anything is allocated for them.
pub fn parse_option_header(buf: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, ProtoError> {
    let mut r = Be::new(buf);
    let magic = r.u64().unwrap_or(0);
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic {
            what: "option",
            found: magic,
        });
    }
    let option = r.u32().unwrap_or(0);
    let len = r.u32().unwrap_or(0);
    if len > MAX_OPTION_LEN {
        return Err(ProtoError::OptionTooLarge {
            option,
            len,
            max: MAX_OPTION_LEN,
        });
    }
    Ok(OptionHeader { option, len })
}

fn parse_string(bytes: &[u8], what: &'static str) -> Result<String, ProtoError> {
    if bytes.len() > MAX_STRING_LEN || bytes.contains(&0) {
        return Err(ProtoError::Malformed { what });
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| ProtoError::Malformed { what })
}

/// Parses the data of `NBD_OPT_EXPORT_NAME`: the whole payload is the name.
pub fn parse_export_name(payload: &[u8]) -> Result<String, ProtoError> {
    parse_string(payload, "export name")
}

/// The data of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub infos: Vec<u16>,
}

/// Parses `u32 name length | name | u16 count | count × u16 info type`, exactly.
pub fn parse_info_request(payload: &[u8]) -> Result<InfoRequest, ProtoError> {
    let what = "NBD_OPT_INFO/GO data";
    let mut r = Be::new(payload);
    let name_len = r.u32().ok_or(ProtoError::Malformed { what })? as usize;
    let name = parse_string(
        r.take(name_len).ok_or(ProtoError::Malformed { what })?,
        what,
    )?;
    let count = r.u16().ok_or(ProtoError::Malformed { what })?;
    let mut infos = Vec::with_capacity(usize::from(count).min(64));
    for _ in 0..count {
        infos.push(r.u16().ok_or(ProtoError::Malformed { what })?);
    }
    if !r.is_empty() {
        return Err(ProtoError::Malformed { what });
    }
    Ok(InfoRequest { name, infos })
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: String,
    pub queries: Vec<String>,
}

/// Parses `u32 name length | name | u32 count | count × (u32 length | query)`, exactly.
pub fn parse_meta_context_request(payload: &[u8]) -> Result<MetaContextRequest, ProtoError> {
    let what = "meta context request";
    let mut r = Be::new(payload);
    let name_len = r.u32().ok_or(ProtoError::Malformed { what })? as usize;
    let export = parse_string(
        r.take(name_len).ok_or(ProtoError::Malformed { what })?,
        what,
    )?;
    let count = r.u32().ok_or(ProtoError::Malformed { what })?;
    let mut queries = Vec::new();
    for _ in 0..count {
        // Each query needs at least its 4-byte length, so `count` is bounded by the payload.
        let len = r.u32().ok_or(ProtoError::Malformed { what })? as usize;
        queries.push(parse_string(
            r.take(len).ok_or(ProtoError::Malformed { what })?,
            what,
        )?);
    }
    if !r.is_empty() {
        return Err(ProtoError::Malformed { what });
    }
    Ok(MetaContextRequest { export, queries })
}

/// The contexts a list of queries names. `list` is true for `NBD_OPT_LIST_META_CONTEXT`,
/// where no query means "everything" and a bare namespace (`base:`) matches all of it.
pub fn match_meta_contexts(queries: &[String], list: bool) -> Vec<(&'static str, u32)> {
    let hit = if list && queries.is_empty() {
        true
    } else {
        queries
            .iter()
            .any(|q| q == BASE_ALLOCATION || (list && q == "base:"))
    };
    if hit {
        vec![(BASE_ALLOCATION, BASE_ALLOCATION_ID)]
    } else {
        Vec::new()
    }
}

/// One option reply: header and data.
pub fn option_reply(option: u32, reply_type: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    // Replies are built from bounded strings, far below 4 GiB.
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// `NBD_REP_SERVER` data for one export.
pub fn rep_server_data(name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len());
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out
}

/// `NBD_REP_META_CONTEXT` data.
pub fn rep_meta_context_data(id: u32, name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out
}

/// `NBD_INFO_EXPORT` data: size and transmission flags.
pub fn info_export_data(size: u64, flags: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(12);
    out.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out
}

/// `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION` data.
pub fn info_string_data(info: u16, text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + text.len());
    out.extend_from_slice(&info.to_be_bytes());
    out.extend_from_slice(text.as_bytes());
    out
}

/// `NBD_INFO_BLOCK_SIZE` data: minimum, preferred and maximum block size.
pub fn info_block_size_data() -> Vec<u8> {
    let mut out = Vec::with_capacity(14);
    out.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    out.extend_from_slice(&MIN_BLOCK.to_be_bytes());
    out.extend_from_slice(&PREFERRED_BLOCK.to_be_bytes());
    out.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
    out
}

/// The answer to `NBD_OPT_EXPORT_NAME`: size, flags and (unless NO_ZEROES) 124 zeroes.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(134);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
    out
}

/// A transmission request header as it came off the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub kind: u16,
    pub handle: u64,
    pub offset: u64,
    pub len: u32,
}

/// Parses a request header. A bad magic, or a WRITE whose payload would exceed
/// [`MAX_PAYLOAD`], cannot be answered and skipped safely: both end the session.
pub fn parse_request_header(buf: &[u8; REQUEST_HEADER_LEN]) -> Result<RequestHeader, ProtoError> {
    let mut r = Be::new(buf);
    let magic = r.u32().unwrap_or(0);
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadMagic {
            what: "request",
            found: u64::from(magic),
        });
    }
    let h = RequestHeader {
        flags: r.u16().unwrap_or(0),
        kind: r.u16().unwrap_or(0),
        handle: r.u64().unwrap_or(0),
        offset: r.u64().unwrap_or(0),
        len: r.u32().unwrap_or(0),
    };
    if h.kind == CMD_WRITE && h.len > MAX_PAYLOAD {
        return Err(ProtoError::PayloadTooLarge {
            len: h.len,
            max: MAX_PAYLOAD,
        });
    }
    Ok(h)
}

/// A validated command, ready to run against an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        len: u32,
        df: bool,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Disconnect,
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Cache {
        offset: u64,
        len: u32,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
        may_trim: bool,
        fast: bool,
    },
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
    },
}

/// A request answered with an error without touching the export. `discard` is the number
/// of payload bytes that follow the header and must be read and dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub errno: u32,
    pub discard: u32,
    pub reason: &'static str,
}

/// What the session negotiated that decides whether a request is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionCaps {
    pub size: u64,
    pub structured: bool,
    pub block_status: bool,
    pub read_only: bool,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason)
    }
}

/// Checks flags and ranges of a request against the session and the export's size.
pub fn check_request(h: &RequestHeader, caps: &SessionCaps) -> Result<Command, Rejection> {
    let discard = if h.kind == CMD_WRITE { h.len } else { 0 };
    let reject = |errno, reason| Rejection {
        errno,
        discard,
        reason,
    };
    // FUA is accepted on every command (the protocol says so); the rest are per command.
    let allowed = CMD_FLAG_FUA
        | match h.kind {
            CMD_READ if caps.structured => CMD_FLAG_DF,
            CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            _ => 0,
        };
    if !matches!(
        h.kind,
        CMD_READ
            | CMD_WRITE
            | CMD_DISC
            | CMD_FLUSH
            | CMD_TRIM
            | CMD_CACHE
            | CMD_WRITE_ZEROES
            | CMD_BLOCK_STATUS
    ) {
        return Err(reject(EINVAL, "unknown command"));
    }
    if h.flags & !allowed != 0 {
        return Err(reject(EINVAL, "command flags not valid for this command"));
    }
    if caps.read_only && matches!(h.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES) {
        return Err(reject(EPERM, "the export is read-only"));
    }
    let fua = h.flags & CMD_FLAG_FUA != 0;
    let end = h.offset.checked_add(u64::from(h.len));
    let inside = matches!(end, Some(e) if e <= caps.size);
    let (offset, len) = (h.offset, h.len);
    match h.kind {
        CMD_READ => {
            if len > MAX_PAYLOAD {
                return Err(reject(EOVERFLOW, "read larger than the maximum block size"));
            }
            if !inside {
                return Err(reject(EINVAL, "read past the end of the export"));
            }
            Ok(Command::Read {
                offset,
                len,
                df: h.flags & CMD_FLAG_DF != 0,
            })
        }
        CMD_WRITE => {
            if !inside {
                return Err(reject(ENOSPC, "write past the end of the export"));
            }
            Ok(Command::Write { offset, len, fua })
        }
        CMD_DISC => Ok(Command::Disconnect),
        CMD_FLUSH => Ok(Command::Flush),
        CMD_TRIM => {
            if !inside {
                return Err(reject(ENOSPC, "trim past the end of the export"));
            }
            Ok(Command::Trim { offset, len, fua })
        }
        CMD_CACHE => {
            if !inside {
                return Err(reject(EINVAL, "cache past the end of the export"));
            }
            Ok(Command::Cache { offset, len })
        }
        CMD_WRITE_ZEROES => {
            if !inside {
                return Err(reject(ENOSPC, "write zeroes past the end of the export"));
            }
            Ok(Command::WriteZeroes {
                offset,
                len,
                fua,
                may_trim: h.flags & CMD_FLAG_NO_HOLE == 0,
                fast: h.flags & CMD_FLAG_FAST_ZERO != 0,
            })
        }
        _ => {
            if !caps.block_status {
                return Err(reject(EINVAL, "block status without a metadata context"));
            }
            if !inside || len == 0 {
                return Err(reject(
                    EINVAL,
                    "block status of an empty range or past the end",
                ));
            }
            Ok(Command::BlockStatus {
                offset,
                len,
                req_one: h.flags & CMD_FLAG_REQ_ONE != 0,
            })
        }
    }
}

/// A simple reply header.
pub fn simple_reply(handle: u64, errno: u32) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&errno.to_be_bytes());
    out[8..].copy_from_slice(&handle.to_be_bytes());
    out
}

/// A structured reply chunk header; `len` bytes of payload follow it.
pub fn chunk_header(flags: u16, kind: u16, handle: u64, len: u32) -> [u8; 20] {
    let mut out = [0u8; 20];
    out[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&handle.to_be_bytes());
    out[16..].copy_from_slice(&len.to_be_bytes());
    out
}

/// A final `NBD_REPLY_TYPE_ERROR` chunk with a human-readable message.
pub fn error_chunk(handle: u64, errno: u32, message: &str) -> Vec<u8> {
    // The message field is 16 bits long and should stay short anyway.
    let msg = truncate_utf8(message, 1024).as_bytes();
    let len = 6 + msg.len() as u32;
    let mut out = Vec::with_capacity(20 + len as usize);
    out.extend_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        handle,
        len,
    ));
    out.extend_from_slice(&errno.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
    out
}

/// An `NBD_REPLY_TYPE_OFFSET_HOLE` chunk.
pub fn hole_chunk(flags: u16, handle: u64, offset: u64, len: u32) -> [u8; 32] {
    let mut out = [0u8; 32];
    out[..20].copy_from_slice(&chunk_header(flags, REPLY_TYPE_OFFSET_HOLE, handle, 12));
    out[20..28].copy_from_slice(&offset.to_be_bytes());
    out[28..].copy_from_slice(&len.to_be_bytes());
    out
}

/// The header of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk: `len` bytes of data at `offset` follow.
pub fn data_chunk_header(flags: u16, handle: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut out = [0u8; 28];
    out[..20].copy_from_slice(&chunk_header(
        flags,
        REPLY_TYPE_OFFSET_DATA,
        handle,
        len + 8,
    ));
    out[20..].copy_from_slice(&offset.to_be_bytes());
    out
}

/// The final `NBD_REPLY_TYPE_NONE` chunk.
pub fn done_chunk(handle: u64) -> [u8; 20] {
    chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0)
}

/// One `base:allocation` descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    pub len: u32,
    pub flags: u32,
}

/// A final `NBD_REPLY_TYPE_BLOCK_STATUS` chunk for one context.
pub fn block_status_chunk(handle: u64, context: u32, descs: &[Descriptor]) -> Vec<u8> {
    let len = 4 + 8 * descs.len();
    let mut out = Vec::with_capacity(20 + len);
    // At most MAX_DESCRIPTORS descriptors are ever passed, so `len` fits easily.
    out.extend_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        handle,
        len as u32,
    ));
    out.extend_from_slice(&context.to_be_bytes());
    for d in descs {
        out.extend_from_slice(&d.len.to_be_bytes());
        out.extend_from_slice(&d.flags.to_be_bytes());
    }
    out
}

/// Cuts a string to at most `max` bytes on a character boundary.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Maps an I/O error to the protocol's error values.
pub fn errno_of(err: &std::io::Error) -> u32 {
    match err.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EROFS) | Some(libc::EACCES) => EPERM,
        Some(libc::ENOMEM) => ENOMEM,
        Some(libc::EINVAL) => EINVAL,
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => ENOSPC,
        Some(libc::EOVERFLOW) => EOVERFLOW,
        Some(libc::EOPNOTSUPP) => ENOTSUP,
        Some(libc::ESHUTDOWN) => ESHUTDOWN,
        Some(_) => EIO,
        None => match err.kind() {
            std::io::ErrorKind::InvalidInput => EINVAL,
            std::io::ErrorKind::Unsupported => ENOTSUP,
            std::io::ErrorKind::OutOfMemory => ENOMEM,
            std::io::ErrorKind::PermissionDenied => EPERM,
            _ => EIO,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: u16, flags: u16, offset: u64, len: u32) -> [u8; REQUEST_HEADER_LEN] {
        let mut b = [0u8; REQUEST_HEADER_LEN];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&flags.to_be_bytes());
        b[6..8].copy_from_slice(&kind.to_be_bytes());
        b[8..16].copy_from_slice(&7u64.to_be_bytes());
        b[16..24].copy_from_slice(&offset.to_be_bytes());
        b[24..].copy_from_slice(&len.to_be_bytes());
        b
    }

    fn caps() -> SessionCaps {
        SessionCaps {
            size: 1 << 20,
            structured: true,
            block_status: true,
            read_only: false,
        }
    }

    fn check(kind: u16, flags: u16, offset: u64, len: u32) -> Result<Command, Rejection> {
        let h = parse_request_header(&header(kind, flags, offset, len)).unwrap();
        check_request(&h, &caps())
    }

    #[test]
    fn greeting_and_client_flags() {
        let g = server_greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(u16::from_be_bytes([g[16], g[17]]), 3);
        assert_eq!(
            parse_client_flags(3).unwrap(),
            ClientFlags {
                fixed_newstyle: true,
                no_zeroes: true
            }
        );
        assert!(parse_client_flags(4).is_err());
    }

    #[test]
    fn option_header_bounds_length() {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
        b[12..].copy_from_slice(&10u32.to_be_bytes());
        assert_eq!(
            parse_option_header(&b).unwrap(),
            OptionHeader {
                option: OPT_GO,
                len: 10
            }
        );
        b[12..].copy_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
        assert!(matches!(
            parse_option_header(&b),
            Err(ProtoError::OptionTooLarge { .. })
        ));
        b[0] = 0;
        assert!(matches!(
            parse_option_header(&b),
            Err(ProtoError::BadMagic { .. })
        ));
    }

    #[test]
    fn info_request_is_parsed_exactly() {
        let mut p = Vec::new();
        p.extend_from_slice(&3u32.to_be_bytes());
        p.extend_from_slice(b"vol");
        p.extend_from_slice(&2u16.to_be_bytes());
        p.extend_from_slice(&INFO_NAME.to_be_bytes());
        p.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        let r = parse_info_request(&p).unwrap();
        assert_eq!(r.name, "vol");
        assert_eq!(r.infos, vec![INFO_NAME, INFO_BLOCK_SIZE]);
        // Trailing garbage, short data and lying lengths are all malformed.
        let mut extra = p.clone();
        extra.push(0);
        assert!(parse_info_request(&extra).is_err());
        assert!(parse_info_request(&p[..p.len() - 1]).is_err());
        let mut lying = p.clone();
        lying[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_info_request(&lying).is_err());
        assert!(parse_info_request(&[]).is_err());
        // Names with NUL or invalid UTF-8 are refused.
        let bad = [0, 0, 0, 2, b'a', 0, 0, 0];
        assert!(parse_info_request(&bad).is_err());
        let bad = [0, 0, 0, 1, 0xff, 0, 0];
        assert!(parse_info_request(&bad).is_err());
    }

    #[test]
    fn meta_context_request_and_matching() {
        let mut p = Vec::new();
        p.extend_from_slice(&1u32.to_be_bytes());
        p.extend_from_slice(b"v");
        p.extend_from_slice(&2u32.to_be_bytes());
        for q in [&b"base:allocation"[..], b"qemu:dirty-bitmap:x"] {
            p.extend_from_slice(&(q.len() as u32).to_be_bytes());
            p.extend_from_slice(q);
        }
        let r = parse_meta_context_request(&p).unwrap();
        assert_eq!(r.export, "v");
        assert_eq!(r.queries.len(), 2);
        assert_eq!(
            match_meta_contexts(&r.queries, false),
            vec![(BASE_ALLOCATION, BASE_ALLOCATION_ID)]
        );
        assert!(match_meta_contexts(&["base:".to_string()], false).is_empty());
        assert_eq!(match_meta_contexts(&["base:".to_string()], true).len(), 1);
        assert_eq!(match_meta_contexts(&[], true).len(), 1);
        assert!(match_meta_contexts(&[], false).is_empty());
        // A count larger than the data is malformed, not an allocation.
        let mut lying = p[..9].to_vec();
        lying.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta_context_request(&lying).is_err());
    }

    #[test]
    fn request_header_checks() {
        assert!(matches!(
            check(CMD_READ, 0, 0, 4096),
            Ok(Command::Read {
                offset: 0,
                len: 4096,
                df: false
            })
        ));
        assert_eq!(
            check(CMD_READ, 0, (1 << 20) - 1, 2).unwrap_err().errno,
            EINVAL
        );
        assert_eq!(check(CMD_READ, 0, u64::MAX, 2).unwrap_err().errno, EINVAL);
        assert_eq!(
            check(CMD_READ, 0, 0, MAX_PAYLOAD + 1).unwrap_err().errno,
            EOVERFLOW
        );
        let r = check(CMD_WRITE, 0, 1 << 20, 512).unwrap_err();
        assert_eq!((r.errno, r.discard), (ENOSPC, 512));
        let r = check(CMD_WRITE, CMD_FLAG_REQ_ONE, 0, 512).unwrap_err();
        assert_eq!((r.errno, r.discard), (EINVAL, 512));
        assert_eq!(check(99, 0, 0, 0).unwrap_err().errno, EINVAL);
        assert_eq!(check(CMD_TRIM, 0, 1 << 20, 1).unwrap_err().errno, ENOSPC);
        assert!(matches!(
            check(
                CMD_WRITE_ZEROES,
                CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                0,
                10
            ),
            Ok(Command::WriteZeroes {
                may_trim: false,
                fast: true,
                ..
            })
        ));
        assert!(matches!(
            check(CMD_FLUSH, CMD_FLAG_FUA, 0, 0),
            Ok(Command::Flush)
        ));
        assert!(check(CMD_FLUSH, CMD_FLAG_DF, 0, 0).is_err());
        let no_meta = SessionCaps {
            block_status: false,
            structured: false,
            ..caps()
        };
        let h = parse_request_header(&header(CMD_BLOCK_STATUS, 0, 0, 10)).unwrap();
        assert_eq!(check_request(&h, &no_meta).unwrap_err().errno, EINVAL);
        assert_eq!(check(CMD_BLOCK_STATUS, 0, 0, 0).unwrap_err().errno, EINVAL);
        let ro = SessionCaps {
            read_only: true,
            ..caps()
        };
        let h = parse_request_header(&header(CMD_WRITE, 0, 0, 10)).unwrap();
        let r = check_request(&h, &ro).unwrap_err();
        assert_eq!((r.errno, r.discard), (EPERM, 10));
        let h = parse_request_header(&header(CMD_READ, 0, 0, 10)).unwrap();
        assert!(check_request(&h, &ro).is_ok());
        let h = parse_request_header(&header(CMD_READ, CMD_FLAG_DF, 0, 10)).unwrap();
        assert_eq!(check_request(&h, &no_meta).unwrap_err().errno, EINVAL);
    }

    #[test]
    fn request_header_disconnects() {
        let mut b = header(CMD_READ, 0, 0, 1);
        b[0] ^= 1;
        assert!(matches!(
            parse_request_header(&b),
            Err(ProtoError::BadMagic { .. })
        ));
        assert!(matches!(
            parse_request_header(&header(CMD_WRITE, 0, 0, MAX_PAYLOAD + 1)),
            Err(ProtoError::PayloadTooLarge { .. })
        ));
        // A huge READ is answered with an error, not a disconnect.
        assert!(parse_request_header(&header(CMD_READ, 0, 0, u32::MAX)).is_ok());
    }

    #[test]
    fn encoders_have_the_documented_layout() {
        let r = option_reply(OPT_GO, REP_ACK, &[]);
        assert_eq!(r.len(), 20);
        assert_eq!(&r[..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        assert_eq!(export_name_reply(5, 1, false).len(), 134);
        assert_eq!(export_name_reply(5, 1, true).len(), 10);
        let e = error_chunk(9, EIO, "boom");
        assert_eq!(e.len(), 20 + 6 + 4);
        assert_eq!(u16::from_be_bytes([e[6], e[7]]), REPLY_TYPE_ERROR);
        let bs = block_status_chunk(
            1,
            BASE_ALLOCATION_ID,
            &[Descriptor {
                len: 512,
                flags: STATE_HOLE | STATE_ZERO,
            }],
        );
        assert_eq!(bs.len(), 20 + 12);
        assert_eq!(truncate_utf8("héllo", 2), "h");
    }

    #[test]
    fn parsers_never_panic_on_random_bytes() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x6e6264);
        for _ in 0..20_000 {
            let n = rng.gen_range(0..64);
            let mut buf: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
            // Plausible prefixes reach deeper into the parsers than pure noise.
            if n >= 4 && rng.gen_bool(0.5) {
                let len = rng.gen_range(0..n as u32);
                buf[..4].copy_from_slice(&len.to_be_bytes());
            }
            let _ = parse_info_request(&buf);
            let _ = parse_meta_context_request(&buf);
            let _ = parse_export_name(&buf);
            let mut opt = [0u8; OPTION_HEADER_LEN];
            rng.fill(&mut opt[..]);
            let _ = parse_option_header(&opt);
            let mut req = [0u8; REQUEST_HEADER_LEN];
            rng.fill(&mut req[..]);
            if rng.gen_bool(0.5) {
                req[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
                req[6] = 0;
                req[7] = rng.gen_range(0..10);
            }
            if let Ok(h) = parse_request_header(&req) {
                let _ = check_request(&h, &caps());
            }
        }
    }

    #[test]
    fn io_errors_map_to_protocol_values() {
        let e = std::io::Error::from_raw_os_error(libc::EDQUOT);
        assert_eq!(errno_of(&e), ENOSPC);
        let e = std::io::Error::from_raw_os_error(libc::EBADF);
        assert_eq!(errno_of(&e), EIO);
        let e = std::io::Error::from(std::io::ErrorKind::Unsupported);
        assert_eq!(errno_of(&e), ENOTSUP);
    }
}

//! The NBD protocol server the daemon uses to expose `nbd` volumes.
//!
//! - [`proto`]: constants, pure parsers and encoders of the wire format (fuzzable);
//! - [`export`]: the [`Export`] trait the server serves, and [`FileExport`];
//! - [`server`]: [`NbdServer`], the handshake and transmission phases over unix or TCP
//!   sockets: handshake in a tokio task, then a thread per connection that serves cached
//!   I/O inline and hands reads that miss the cache and writes that wait for a
//!   write-intent sync to helper threads;
//! - [`kernel`]: where the kernel has the nbd driver, an export connected to a /dev/nbdN
//!   over a socket pair (netlink, `crate::sys::nbd_netlink`);
//! - [`tracked`]: [`TrackedExport`], changed-block tracking (persistent write-intent
//!   bitmap) and copy-before-write for point-in-time capture;
//! - [`lazy`]: [`LazyExport`], lazy restore: a snapshot served at once while a background
//!   job hydrates a new image (persistent hydrated map).
//!
//! This module knows nothing of volumes, the catalog or HTTP; it may call `nix`, tokio,
//! `crate::sys` (page-cache-only reads, the nbd netlink family, PR_SET_IO_FLUSHER), `crate::api` (for error kinds) and, for lazy
//! restore, the store's `ChainReader`.

pub mod export;
pub mod kernel;
pub mod lazy;
pub mod proto;
pub mod server;
pub mod tracked;

use std::path::{Path, PathBuf};

pub use export::{Export, Extent, FileExport};
pub use lazy::{HydrateStep, LazyExport};
pub use server::NbdServer;
pub use tracked::{DirtyRange, EpochScope, Recovery, TrackedExport};

use crate::api::ErrorKind;

/// Errors of the NBD server, its exports and change tracking.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("Cannot open backing file {path}")]
    OpenBacking {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Backing path {path} is not a regular file")]
    NotRegularFile { path: PathBuf },
    #[error("Invalid export name {name:?}")]
    InvalidExportName { name: String },
    #[error("Export {name:?} already exists")]
    ExportExists { name: String },
    #[error("No export named {name:?}")]
    ExportNotFound { name: String },
    #[error(
        "Export {name:?} is still used by {connections} connection(s) from before its removal"
    )]
    ExportStillInUse { name: String, connections: usize },
    #[error("Client broke the NBD protocol")]
    Protocol {
        #[source]
        source: proto::ProtoError,
    },
    #[error("NBD connection I/O failed during {op}")]
    Connection {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("NBD handshake did not finish in time")]
    HandshakeTimeout,
    #[error("Cannot connect export {name:?} to the kernel's nbd driver")]
    Kernel {
        name: String,
        #[source]
        source: crate::sys::nbd_netlink::NbdNetlinkError,
    },
    #[error("Cannot {op} dirty bitmap {path}")]
    Bitmap {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Dirty bitmap {path} is corrupt: {reason}")]
    BitmapCorrupt { path: PathBuf, reason: String },
    #[error("Dirty bitmap {path} is for a {found} byte volume, not {expected}")]
    BitmapSizeMismatch {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error("Snapshot epoch I/O failed at offset {offset}")]
    Epoch {
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("No snapshot epoch is open")]
    NoEpoch,
    #[error("A snapshot epoch is already open")]
    EpochOpen,
    #[error("Offset {offset} is not a block inside the volume")]
    BadBlock { offset: u64 },
    #[error("Cannot {op} hydration map {path}")]
    HydrationMap {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Hydration map {path} cannot be used: {reason}")]
    HydrationMapCorrupt { path: PathBuf, reason: String },
    #[error("Hydration granularity {granularity} is not a power of two of at least 4096")]
    BadGranularity { granularity: u64 },
    #[error("Lazy restore target is {target} bytes but the snapshot is {snapshot}")]
    LazySizeMismatch { target: u64, snapshot: u64 },
    #[error("Cannot hydrate bytes {start}..{end} of the volume")]
    Hydrate {
        start: u64,
        end: u64,
        #[source]
        source: std::io::Error,
    },
}

impl NbdError {
    /// The error kind this maps to on the control API.
    pub fn kind(&self) -> ErrorKind {
        match self {
            NbdError::OpenBacking { source, .. }
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                ErrorKind::NotFound
            }
            NbdError::OpenBacking { source, .. }
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                ErrorKind::PermissionDenied
            }
            NbdError::OpenBacking { .. } => ErrorKind::Io,
            NbdError::NotRegularFile { .. }
            | NbdError::InvalidExportName { .. }
            | NbdError::Protocol { .. }
            | NbdError::BadBlock { .. } => ErrorKind::InvalidArgument,
            NbdError::ExportExists { .. }
            | NbdError::ExportStillInUse { .. }
            | NbdError::EpochOpen => ErrorKind::Busy,
            NbdError::ExportNotFound { .. } | NbdError::NoEpoch => ErrorKind::NotFound,
            NbdError::Connection { .. } | NbdError::HandshakeTimeout => ErrorKind::Unavailable,
            NbdError::Kernel { source, .. } => source.kind(),
            NbdError::Bitmap { .. } | NbdError::Epoch { .. } => ErrorKind::Io,
            NbdError::BitmapCorrupt { .. }
            | NbdError::BitmapSizeMismatch { .. }
            | NbdError::HydrationMapCorrupt { .. } => ErrorKind::Corrupt,
            NbdError::HydrationMap { .. } => ErrorKind::Io,
            NbdError::BadGranularity { .. } | NbdError::LazySizeMismatch { .. } => {
                ErrorKind::InvalidArgument
            }
            // A damaged snapshot record is Corrupt; anything else failed I/O.
            NbdError::Hydrate { source, .. } => source
                .get_ref()
                .and_then(|e| e.downcast_ref::<crate::store::StoreError>())
                .map_or(ErrorKind::Io, |e| e.kind()),
        }
    }
}

impl From<proto::ProtoError> for NbdError {
    fn from(source: proto::ProtoError) -> Self {
        NbdError::Protocol { source }
    }
}

/// The URI a client (`qemu-io`, `nbdinfo`, `nbdfuse`) uses to reach `export` through the
/// unix socket `socket`: `nbd+unix:///vol-1?socket=/run/blocksnap/nbd.sock`.
pub fn nbd_uri(export: &str, socket: &Path) -> String {
    format!(
        "nbd+unix:///{}?socket={}",
        percent_encode(export, b""),
        percent_encode(&socket.to_string_lossy(), b"/")
    )
}

/// Percent-encodes everything but RFC 3986 unreserved characters and `keep`.
fn percent_encode(s: &str, keep: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || keep.contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_is_what_clients_expect() {
        assert_eq!(
            nbd_uri("vol-0123abcd", Path::new("/run/blocksnap/nbd.sock")),
            "nbd+unix:///vol-0123abcd?socket=/run/blocksnap/nbd.sock"
        );
        assert_eq!(
            nbd_uri("a b", Path::new("/tmp/x y/s")),
            "nbd+unix:///a%20b?socket=/tmp/x%20y/s"
        );
    }

    #[test]
    fn kinds() {
        let e = NbdError::ExportNotFound { name: "x".into() };
        assert_eq!(e.kind(), ErrorKind::NotFound);
        let e = NbdError::OpenBacking {
            path: "/x".into(),
            source: std::io::ErrorKind::NotFound.into(),
        };
        assert_eq!(e.kind(), ErrorKind::NotFound);
    }
}

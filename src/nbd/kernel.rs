//! /dev/nbdN for an export, where the kernel has the nbd driver: detected once at run time
//! (the generic-netlink family "nbd"), then NBD_CMD_CONNECT with one end of a socket pair
//! whose other end [`NbdServer::serve_negotiated`] serves (transmission phase only: the
//! kernel does no handshake), and NBD_CMD_DISCONNECT when the [`KernelDevice`] is dropped.
//!
//! Where the driver is absent (CONFIG_BLK_DEV_NBD unset, as on the machines this was
//! written and tested on) detection says so once, at info, and exports stay reachable by
//! URI only. The connect and disconnect paths have therefore never run against a real
//! kernel: only the message encoding (`crate::sys::nbd_netlink`'s tests) and the detection
//! are tested. The reply handling follows drivers/block/nbd.c: `nbd_genl_connect` answers a
//! successful connect with a message of the family's type carrying NBD_ATTR_INDEX (u32) and
//! the request's sequence number, before the ack.
//!
//! May call `crate::sys::nbd_netlink` and the server; nothing above this module.

use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::OnceLock;

use super::{NbdError, NbdServer};
use crate::sys::nbd_netlink::{ConnectRequest, NbdNetlink};

/// Logical block size given to the kernel: 512 is what every filesystem accepts.
const BLOCK_SIZE: u64 = 512;

/// Whether the kernel has the nbd driver (asked once; the answer is logged once).
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| match NbdNetlink::open() {
        Ok(Some(_)) => {
            tracing::info!("the kernel has the nbd driver: attached nbd volumes also get a /dev/nbdN");
            true
        }
        Ok(None) => {
            tracing::info!("the kernel has no nbd driver (no generic netlink family \"nbd\"): nbd volumes are reachable by URI only");
            false
        }
        Err(e) => {
            tracing::info!(error = %e, "cannot ask the kernel for its nbd driver: nbd volumes are reachable by URI only");
            false
        }
    })
}

/// An export connected to /dev/nbd`index`; dropping it disconnects the device.
pub struct KernelDevice {
    index: u32,
    /// The netlink socket that sent NBD_CMD_CONNECT, kept open for the device's life: the
    /// kernel records its port as the device's owner, and a kernel may shut the device's
    /// sockets down when the owner's netlink socket is released. It also sends the
    /// disconnect.
    netlink: NbdNetlink,
    /// Our end of the socket pair, to end the serving thread if the kernel does not.
    socket: UnixStream,
    name: String,
}

impl KernelDevice {
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/nbd{}", self.index))
    }
}

impl Drop for KernelDevice {
    fn drop(&mut self) {
        match self.netlink.disconnect(self.index) {
            Ok(()) => {
                tracing::info!(export = %self.name, device = %self.path().display(), "kernel nbd device disconnected")
            }
            Err(e) => {
                tracing::warn!(export = %self.name, device = %self.path().display(), error = %e, "cannot disconnect the kernel nbd device")
            }
        }
        // What the thread already read is answered; its next read ends it.
        let _ = self.socket.shutdown(Shutdown::Read);
    }
}

/// Connects export `name` of `server` to a free /dev/nbdN.
pub(super) fn connect(server: &NbdServer, name: &str) -> Result<KernelDevice, NbdError> {
    let io = |op| move |source| NbdError::Connection { op, source };
    let (ours, theirs) = UnixStream::pair().map_err(io("create a socket pair"))?;
    let control = ours.try_clone().map_err(io("clone socket"))?;
    let negotiated = server.serve_negotiated(name, ours)?;
    let kernel = |source| NbdError::Kernel {
        name: name.to_string(),
        source,
    };
    let connected = NbdNetlink::open().map_err(kernel).and_then(|nl| {
        let Some(mut nl) = nl else {
            let gone = std::io::Error::other("the nbd driver went away");
            return Err(NbdError::Connection {
                op: "find the kernel's nbd driver",
                source: gone,
            });
        };
        let index = nl
            .connect(&ConnectRequest {
                size: negotiated.size,
                block_size: BLOCK_SIZE,
                server_flags: negotiated.flags,
                socket: theirs.as_raw_fd(),
            })
            .map_err(kernel)?;
        Ok((index, nl))
    });
    // The kernel holds its own reference to its end now (or never will).
    drop(theirs);
    match connected {
        Ok((index, netlink)) => {
            let device = KernelDevice {
                index,
                netlink,
                socket: control,
                name: name.to_string(),
            };
            tracing::info!(export = name, device = %device.path().display(), "export connected to the kernel's nbd driver");
            Ok(device)
        }
        Err(e) => {
            let _ = control.shutdown(Shutdown::Both);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a kernel without the nbd driver nothing is connected and nothing fails.
    #[test]
    fn absent_driver_means_uri_only() {
        if std::path::Path::new("/sys/module/nbd").exists() {
            eprintln!("skipped: this kernel has the nbd module loaded");
            return;
        }
        assert!(!available());
        let server = NbdServer::new();
        let dir = tempfile::tempdir().unwrap();
        let export = crate::nbd::FileExport::create(&dir.path().join("img"), 1 << 20).unwrap();
        server.add_export("v", std::sync::Arc::new(export)).unwrap();
        assert_eq!(server.connect_kernel_device("v").unwrap(), None);
        assert_eq!(server.kernel_device("v"), None);
    }
}

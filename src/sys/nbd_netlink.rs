//! The kernel nbd driver's generic-netlink interface (`include/uapi/linux/nbd-netlink.h`):
//! resolving the "nbd" family through nlctrl, NBD_CMD_CONNECT with a socket the caller
//! serves, NBD_CMD_DISCONNECT. Messages are encoded by hand (no netlink crate is
//! available to this build); the byte layouts are those of `linux/netlink.h` and
//! `linux/genetlink.h` and are checked by the unit tests below.
//!
//! Where the nbd module is not loaded (CONFIG_BLK_DEV_NBD unset, as on the machines this
//! was written on) resolving the family fails with ENOENT and nothing else is attempted:
//! the connect and disconnect paths have never run against a real kernel here.
//!
//! Sockets go through nix's safe wrappers; this file has no `unsafe`.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::sys::socket::{self, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol};

use crate::api::ErrorKind;

// linux/netlink.h
const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLA_HDRLEN: usize = 4;
const NLA_F_NESTED: u16 = 0x8000;
// linux/genetlink.h
const GENL_HDRLEN: usize = 4;
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
// linux/nbd-netlink.h
const NBD_GENL_FAMILY_NAME: &str = "nbd";
const NBD_GENL_VERSION: u8 = 1;
const NBD_CMD_CONNECT: u8 = 1;
const NBD_CMD_DISCONNECT: u8 = 2;
const NBD_ATTR_INDEX: u16 = 1;
const NBD_ATTR_SIZE_BYTES: u16 = 2;
const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const NBD_ATTR_SERVER_FLAGS: u16 = 5;
const NBD_ATTR_SOCKETS: u16 = 7;
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;

/// Errors of the nbd netlink interface.
#[derive(Debug, thiserror::Error)]
pub enum NbdNetlinkError {
    #[error("Cannot {op} on a generic netlink socket")]
    Socket {
        op: &'static str,
        #[source]
        source: Errno,
    },
    #[error("The kernel refused {request}")]
    Refused {
        request: &'static str,
        #[source]
        source: Errno,
    },
    #[error("Malformed netlink reply to {request}: {what}")]
    Malformed {
        request: &'static str,
        what: &'static str,
    },
}

impl NbdNetlinkError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            NbdNetlinkError::Refused {
                source: Errno::EPERM | Errno::EACCES,
                ..
            } => ErrorKind::PermissionDenied,
            NbdNetlinkError::Refused {
                source: Errno::EBUSY,
                ..
            } => ErrorKind::Busy,
            _ => ErrorKind::Io,
        }
    }
}

/// What to connect: the export's geometry and transmission flags, and the socket (one end
/// of a connected pair) whose other end serves the transmission phase.
#[derive(Debug, Clone, Copy)]
pub struct ConnectRequest {
    pub size: u64,
    pub block_size: u64,
    pub server_flags: u16,
    pub socket: RawFd,
}

/// A generic netlink socket talking to the nbd family.
pub struct NbdNetlink {
    fd: OwnedFd,
    family: u16,
    seq: u32,
}

impl NbdNetlink {
    /// Opens a socket and resolves the nbd family. `Ok(None)` when the kernel has no nbd
    /// family (the module is absent or not loaded).
    pub fn open() -> Result<Option<NbdNetlink>, NbdNetlinkError> {
        let mut nl = NbdNetlink::control()?;
        Ok(nl.resolve(NBD_GENL_FAMILY_NAME)?.map(|family| {
            nl.family = family;
            nl
        }))
    }

    /// A socket bound for generic netlink, talking to nlctrl.
    fn control() -> Result<NbdNetlink, NbdNetlinkError> {
        let fd = socket::socket(
            AddressFamily::Netlink,
            socket::SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkGeneric,
        )
        .map_err(|source| NbdNetlinkError::Socket { op: "open", source })?;
        socket::bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))
            .map_err(|source| NbdNetlinkError::Socket { op: "bind", source })?;
        Ok(NbdNetlink {
            fd,
            family: GENL_ID_CTRL,
            seq: 0,
        })
    }

    /// The id of generic netlink family `name` (CTRL_CMD_GETFAMILY); `None` if the kernel
    /// has no such family (ENOENT).
    fn resolve(&mut self, name: &str) -> Result<Option<u16>, NbdNetlinkError> {
        let request = "CTRL_CMD_GETFAMILY";
        let msg = getfamily_message(self.next_seq(), name);
        match self.transact(request, &msg, GENL_ID_CTRL) {
            Ok(attrs) => find_attr(&attrs, CTRL_ATTR_FAMILY_ID)
                .and_then(|v| v.get(..2))
                .map(|v| Some(u16::from_ne_bytes([v[0], v[1]])))
                .ok_or(NbdNetlinkError::Malformed {
                    request,
                    what: "no family id",
                }),
            Err(NbdNetlinkError::Refused {
                source: Errno::ENOENT,
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// NBD_CMD_CONNECT: the kernel picks a free /dev/nbdN, takes its own reference to the
    /// socket and starts sending requests on it. Returns N.
    pub fn connect(&mut self, req: &ConnectRequest) -> Result<u32, NbdNetlinkError> {
        let request = "NBD_CMD_CONNECT";
        let msg = connect_message(self.family, self.next_seq(), req);
        let attrs = self.transact(request, &msg, self.family)?;
        find_attr(&attrs, NBD_ATTR_INDEX)
            .and_then(|v| v.get(..4))
            .map(|v| u32::from_ne_bytes([v[0], v[1], v[2], v[3]]))
            .ok_or(NbdNetlinkError::Malformed {
                request,
                what: "no device index",
            })
    }

    /// NBD_CMD_DISCONNECT of /dev/nbd`index`: the kernel sends NBD_CMD_DISC on the socket
    /// and drops it.
    pub fn disconnect(&mut self, index: u32) -> Result<(), NbdNetlinkError> {
        let msg = disconnect_message(self.family, self.next_seq(), index);
        self.transact("NBD_CMD_DISCONNECT", &msg, self.family)
            .map(drop)
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends `msg` (with NLM_F_ACK) and reads until its ack or error. Returns the attributes
    /// of the last reply of type `reply_type` (empty when there was none).
    fn transact(
        &self,
        request: &'static str,
        msg: &[u8],
        reply_type: u16,
    ) -> Result<Vec<u8>, NbdNetlinkError> {
        let sock_err = |op| move |source| NbdNetlinkError::Socket { op, source };
        socket::send(self.fd.as_raw_fd(), msg, MsgFlags::empty()).map_err(sock_err("send"))?;
        let seq = header_seq(msg);
        let mut attrs = Vec::new();
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = socket::recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty())
                .map_err(sock_err("receive"))?;
            for m in Messages::new(&buf[..n]) {
                let m = m.map_err(|what| NbdNetlinkError::Malformed { request, what })?;
                if m.seq != seq {
                    continue;
                }
                match m.kind {
                    NLMSG_ERROR => {
                        let code = m
                            .payload
                            .get(..4)
                            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                        return match code {
                            Some(0) => Ok(attrs),
                            Some(e) => Err(NbdNetlinkError::Refused {
                                request,
                                source: Errno::from_raw(-e),
                            }),
                            None => Err(NbdNetlinkError::Malformed {
                                request,
                                what: "short error message",
                            }),
                        };
                    }
                    NLMSG_DONE => return Ok(attrs),
                    t if t == reply_type => {
                        attrs = m
                            .payload
                            .get(GENL_HDRLEN..)
                            .ok_or(NbdNetlinkError::Malformed {
                                request,
                                what: "short generic netlink header",
                            })?
                            .to_vec();
                    }
                    _ => {}
                }
            }
        }
    }
}

fn align4(n: usize) -> usize {
    n.next_multiple_of(4)
}

/// Builds one netlink message: nlmsghdr, genlmsghdr, then attributes appended by the caller.
struct Builder {
    buf: Vec<u8>,
}

impl Builder {
    fn new(kind: u16, seq: u32, cmd: u8, version: u8) -> Builder {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by `finish`
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's is 0
        buf.extend_from_slice(&[cmd, version, 0, 0]);
        Builder { buf }
    }

    fn attr(&mut self, kind: u16, value: &[u8]) {
        let len = NLA_HDRLEN + value.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(value);
        self.buf.resize(align4(self.buf.len()), 0);
    }

    /// Starts a nested attribute; returns where its header is, for `end_nest`.
    fn begin_nest(&mut self, kind: u16) -> usize {
        let at = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        at
    }

    fn end_nest(&mut self, at: usize) {
        let len = (self.buf.len() - at) as u16;
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

fn getfamily_message(seq: u32, name: &str) -> Vec<u8> {
    let mut b = Builder::new(GENL_ID_CTRL, seq, CTRL_CMD_GETFAMILY, 1);
    let mut value = name.as_bytes().to_vec();
    value.push(0);
    b.attr(CTRL_ATTR_FAMILY_NAME, &value);
    b.finish()
}

fn connect_message(family: u16, seq: u32, req: &ConnectRequest) -> Vec<u8> {
    let mut b = Builder::new(family, seq, NBD_CMD_CONNECT, NBD_GENL_VERSION);
    // No NBD_ATTR_INDEX: the kernel takes a free device (or creates one) and replies with it.
    b.attr(NBD_ATTR_SIZE_BYTES, &req.size.to_ne_bytes());
    b.attr(NBD_ATTR_BLOCK_SIZE_BYTES, &req.block_size.to_ne_bytes());
    b.attr(
        NBD_ATTR_SERVER_FLAGS,
        &u64::from(req.server_flags).to_ne_bytes(),
    );
    let sockets = b.begin_nest(NBD_ATTR_SOCKETS);
    let item = b.begin_nest(NBD_SOCK_ITEM);
    b.attr(NBD_SOCK_FD, &(req.socket as u32).to_ne_bytes());
    b.end_nest(item);
    b.end_nest(sockets);
    b.finish()
}

fn disconnect_message(family: u16, seq: u32, index: u32) -> Vec<u8> {
    let mut b = Builder::new(family, seq, NBD_CMD_DISCONNECT, NBD_GENL_VERSION);
    b.attr(NBD_ATTR_INDEX, &index.to_ne_bytes());
    b.finish()
}

fn header_seq(msg: &[u8]) -> u32 {
    u32::from_ne_bytes([msg[8], msg[9], msg[10], msg[11]])
}

/// One received netlink message.
struct Message<'a> {
    kind: u16,
    seq: u32,
    payload: &'a [u8],
}

/// The netlink messages of one datagram.
struct Messages<'a> {
    rest: &'a [u8],
}

impl<'a> Messages<'a> {
    fn new(buf: &'a [u8]) -> Messages<'a> {
        Messages { rest: buf }
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<Message<'a>, &'static str>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let h = self.rest;
        if h.len() < NLMSG_HDRLEN {
            self.rest = &[];
            return Some(Err("short message header"));
        }
        let len = u32::from_ne_bytes([h[0], h[1], h[2], h[3]]) as usize;
        if len < NLMSG_HDRLEN || len > h.len() {
            self.rest = &[];
            return Some(Err("bad message length"));
        }
        let m = Message {
            kind: u16::from_ne_bytes([h[4], h[5]]),
            seq: u32::from_ne_bytes([h[8], h[9], h[10], h[11]]),
            payload: &h[NLMSG_HDRLEN..len],
        };
        self.rest = h.get(align4(len)..).unwrap_or(&[]);
        Some(Ok(m))
    }
}

/// The value of the first top-level attribute of type `kind` in `attrs`.
fn find_attr(attrs: &[u8], kind: u16) -> Option<&[u8]> {
    let mut rest = attrs;
    while rest.len() >= NLA_HDRLEN {
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        let t = u16::from_ne_bytes([rest[2], rest[3]]) & !NLA_F_NESTED;
        if len < NLA_HDRLEN || len > rest.len() {
            return None;
        }
        if t == kind {
            return Some(&rest[NLA_HDRLEN..len]);
        }
        rest = rest.get(align4(len)..).unwrap_or(&[]);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn le(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    #[test]
    fn getfamily_matches_the_uapi_layout() {
        let m = getfamily_message(7, "nbd");
        // nlmsghdr: len 28, type GENL_ID_CTRL, flags REQUEST|ACK, seq 7, pid 0;
        // genlmsghdr: cmd GETFAMILY, version 1; attr: len 8, CTRL_ATTR_FAMILY_NAME, "nbd\0".
        let want = le(&[
            &28u32.to_ne_bytes(),
            &0x10u16.to_ne_bytes(),
            &5u16.to_ne_bytes(),
            &7u32.to_ne_bytes(),
            &0u32.to_ne_bytes(),
            &[3, 1, 0, 0],
            &8u16.to_ne_bytes(),
            &2u16.to_ne_bytes(),
            b"nbd\0",
        ]);
        assert_eq!(m, want);
        assert_eq!(header_seq(&m), 7);
    }

    #[test]
    fn connect_nests_the_socket_and_carries_u64_geometry() {
        let req = ConnectRequest {
            size: 1 << 30,
            block_size: 512,
            server_flags: 0x1ed,
            socket: 9,
        };
        let m = connect_message(0x1a, 3, &req);
        let attr64 =
            |t: u16, v: u64| le(&[&12u16.to_ne_bytes(), &t.to_ne_bytes(), &v.to_ne_bytes()]);
        let want = le(&[
            &(20u32 + 36 + 16).to_ne_bytes(),
            &0x1au16.to_ne_bytes(),
            &5u16.to_ne_bytes(),
            &3u32.to_ne_bytes(),
            &0u32.to_ne_bytes(),
            &[1, 1, 0, 0],
            &attr64(2, 1 << 30),
            &attr64(3, 512),
            &attr64(5, 0x1ed),
            // NBD_ATTR_SOCKETS { NBD_SOCK_ITEM { NBD_SOCK_FD u32 } }
            &16u16.to_ne_bytes(),
            &(7u16 | 0x8000).to_ne_bytes(),
            &12u16.to_ne_bytes(),
            &(1u16 | 0x8000).to_ne_bytes(),
            &8u16.to_ne_bytes(),
            &1u16.to_ne_bytes(),
            &9u32.to_ne_bytes(),
        ]);
        assert_eq!(m, want);
    }

    #[test]
    fn disconnect_names_the_index() {
        let m = disconnect_message(0x1a, 4, 5);
        assert_eq!(m.len(), 28);
        assert_eq!(&m[16..20], &[2, 1, 0, 0]);
        assert_eq!(
            find_attr(&m[20..], NBD_ATTR_INDEX),
            Some(&5u32.to_ne_bytes()[..])
        );
    }

    #[test]
    fn replies_are_split_and_attributes_found() {
        // A NEWFAMILY reply (family name padded, then the id) followed by an ack.
        let mut b = Builder::new(GENL_ID_CTRL, 9, 1, 2);
        b.attr(CTRL_ATTR_FAMILY_NAME, b"nbd\0\0");
        b.attr(CTRL_ATTR_FAMILY_ID, &0x1au16.to_ne_bytes());
        let mut buf = b.finish();
        let ack = le(&[
            &36u32.to_ne_bytes(),
            &NLMSG_ERROR.to_ne_bytes(),
            &0u16.to_ne_bytes(),
            &9u32.to_ne_bytes(),
            &0u32.to_ne_bytes(),
            &0i32.to_ne_bytes(),
            &[0; 16],
        ]);
        buf.extend_from_slice(&ack);
        let msgs: Vec<_> = Messages::new(&buf).map(|m| m.unwrap()).collect();
        assert_eq!(msgs.len(), 2);
        assert_eq!((msgs[0].kind, msgs[0].seq), (GENL_ID_CTRL, 9));
        let attrs = &msgs[0].payload[GENL_HDRLEN..];
        assert_eq!(
            find_attr(attrs, CTRL_ATTR_FAMILY_ID),
            Some(&0x1au16.to_ne_bytes()[..])
        );
        assert_eq!(find_attr(attrs, 9), None);
        assert_eq!(msgs[1].kind, NLMSG_ERROR);
        // Truncated input is an error, never a panic.
        assert!(Messages::new(&buf[..10]).next().unwrap().is_err());
        assert!(Messages::new(&buf[..30]).next().unwrap().is_err());
        assert_eq!(find_attr(&[255, 0, 1, 0], 1), None);
    }

    /// This is run where the kernel has no nbd module: resolving the family says so (and
    /// a kernel with the module loaded resolves it). `/sys/module/nbd` tells which.
    #[test]
    fn detection_matches_the_running_kernel() {
        let found = NbdNetlink::open();
        // After the attempt: resolving a family may load its module.
        let loaded = std::path::Path::new("/sys/module/nbd").exists();
        match found {
            Ok(found) => assert_eq!(found.is_some(), loaded),
            // No generic netlink at all (a restricted sandbox) is not "present" either.
            Err(e @ NbdNetlinkError::Socket { .. }) => assert!(!loaded, "{e}"),
            Err(e) => panic!("resolving the nbd family failed: {e}"),
        }
    }

    /// The same request against a family every kernel with generic netlink has: the
    /// controller itself, whose id is fixed. Checks the reply parsing on a real kernel.
    #[test]
    fn resolving_the_controller_finds_its_fixed_id() {
        let Ok(mut nl) = NbdNetlink::control() else {
            eprintln!("skipped: no generic netlink socket here");
            return;
        };
        assert_eq!(nl.resolve("nlctrl").unwrap(), Some(GENL_ID_CTRL));
        assert_eq!(nl.resolve("no-such-fam").unwrap(), None);
    }
}

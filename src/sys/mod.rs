//! sys: every `unsafe` call and every ioctl of blocksnap, behind safe wrappers.
//!
//! One file per kernel interface: `loopdev` (loop devices through /dev/loop-control),
//! `blkdev` (block device size and flush, device numbers), `freeze` (FIFREEZE/FITHAW with an
//! owning guard), `reflink` (FICLONE, FICLONERANGE), `fiemap` (extent maps, shared
//! extents), `process` (PR_SET_IO_FLUSHER), `nbd_netlink` (the nbd driver's generic netlink
//! family), `uio` (page-cache-only reads, RWF_NOWAIT), `splice` (file to socket through a
//! pipe, without copying) and `writeback` (sync_file_range behind
//! streamed writes). Ioctl numbers come from nix's macros, argument
//! structs are `#[repr(C)]` with compile-time size checks, and only safe functions are exported.
//!
//! This module depends on nothing else of ours except `crate::api::ErrorKind`, the small enum
//! every error maps to.

pub mod blkdev;
pub mod fiemap;
pub mod freeze;
pub mod loopdev;
pub mod nbd_netlink;
pub mod process;
pub mod reflink;
pub mod splice;
pub mod uio;
pub mod writeback;

#[cfg(test)]
pub(crate) mod test_util;

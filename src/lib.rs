//! blocksnap: a block-device snapshot daemon for Linux storage hosts.
//!
//! The crate is one library and two thin binaries. Layering, from the bottom:
//! `sys` (the only `unsafe`, every ioctl) ← `quiesce`, `volume`, `nbd`, `store`
//! (which knows nothing of volumes or HTTP) ← `daemon` (the only place that knows HTTP,
//! the socket and jobs). `api` holds the wire types shared by the daemon and the control
//! command; `client` is the control command's HTTP client and depends only on `api`; `cli` is the
//! control command itself (`api` and `client` only).

pub mod api;
pub mod buf;
pub mod catalog;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod failpoint;
pub mod nbd;
pub mod quiesce;
pub mod store;
#[allow(unsafe_code)]
pub mod sys;
pub mod volume;

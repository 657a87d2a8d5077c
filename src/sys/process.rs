//! Per-thread kernel settings through prctl(2): PR_SET_IO_FLUSHER for threads that serve
//! block I/O (the NBD server), so that memory reclaim never waits on the I/O they serve.

use crate::api::ErrorKind;

// Not in the libc crate for Linux targets yet; values from include/uapi/linux/prctl.h.
const PR_SET_IO_FLUSHER: libc::c_int = 57;
const PR_GET_IO_FLUSHER: libc::c_int = 58;

/// Errors of prctl calls.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("prctl({op}) failed")]
    Prctl {
        op: &'static str,
        #[source]
        source: nix::Error,
    },
}

impl ProcessError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ProcessError::Prctl {
                source: nix::Error::EPERM,
                ..
            } => ErrorKind::PermissionDenied,
            ProcessError::Prctl { .. } => ErrorKind::Internal,
        }
    }
}

fn prctl(op: &'static str, option: libc::c_int, arg2: libc::c_ulong) -> Result<i32, ProcessError> {
    // SAFETY: these prctl options take plain integers (no pointers); the unused arguments
    // must be zero.
    let res = unsafe {
        libc::prctl(
            option,
            arg2,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    nix::errno::Errno::result(res).map_err(|source| ProcessError::Prctl { op, source })
}

/// Marks the calling thread as an I/O flusher (or clears it). Needs CAP_SYS_RESOURCE. It is
/// per thread: call it on every thread that serves a block device's requests.
pub fn set_io_flusher(on: bool) -> Result<(), ProcessError> {
    prctl(
        "PR_SET_IO_FLUSHER",
        PR_SET_IO_FLUSHER,
        libc::c_ulong::from(on),
    )
    .map(drop)
}

/// Whether the calling thread is an I/O flusher.
pub fn is_io_flusher() -> Result<bool, ProcessError> {
    prctl("PR_GET_IO_FLUSHER", PR_GET_IO_FLUSHER, 0).map(|v| v == 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::test_util::root_or_skip;

    #[test]
    fn io_flusher_is_set_per_thread() {
        if !root_or_skip("io_flusher_is_set_per_thread") {
            return;
        }
        // On a thread of its own: the flag must not leak into other tests.
        std::thread::spawn(|| {
            match is_io_flusher() {
                Err(e) if e.kind() == ErrorKind::PermissionDenied => {
                    // Root without CAP_SYS_RESOURCE (as in some containers): cannot test here.
                    eprintln!("SKIPPED io_flusher_is_set_per_thread: {e} (no CAP_SYS_RESOURCE)");
                    return;
                }
                other => assert!(!other.unwrap()),
            }
            set_io_flusher(true).unwrap();
            assert!(is_io_flusher().unwrap());
            set_io_flusher(false).unwrap();
            assert!(!is_io_flusher().unwrap());
        })
        .join()
        .unwrap();
    }
}

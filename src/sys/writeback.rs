//! Early writeback of a file being streamed (sync_file_range), so that the final fsync of a
//! large write finds little left to flush.
//!
//! `sync_file_range` makes nothing durable (no metadata, no disk cache flush): it only starts
//! writeback sooner and bounds how much dirty data piles up. Callers still `fsync` at the end.

use std::os::fd::{AsFd, AsRawFd};

/// Starts writeback of `[offset, offset + len)` of `file` without waiting for it.
pub fn start(file: impl AsFd, offset: u64, len: u64) -> std::io::Result<()> {
    range(file, offset, len, libc::SYNC_FILE_RANGE_WRITE)
}

/// Starts writeback of `[offset, offset + len)` and waits until it is written.
pub fn wait(file: impl AsFd, offset: u64, len: u64) -> std::io::Result<()> {
    range(
        file,
        offset,
        len,
        libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER,
    )
}

fn range(file: impl AsFd, offset: u64, len: u64, flags: libc::c_uint) -> std::io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let off = i64::try_from(offset).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let n = i64::try_from(len).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: sync_file_range takes an fd that `file` keeps open for the call, two integers
    // and flags; it touches no user memory.
    let r = unsafe { libc::sync_file_range(file.as_fd().as_raw_fd(), off, n, flags) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Keeps writeback running behind a sequential writer: every `step` bytes it starts
/// writeback of the newest stretch and waits for the stretch `lag` bytes behind, so dirty
/// pages stay bounded and the disk writes while the caller is still producing data.
#[derive(Debug)]
pub struct Streamer {
    step: u64,
    lag: u64,
    /// Writeback started up to here.
    started: u64,
    /// Written back (waited for) up to here.
    waited: u64,
    /// Set when the file refused the call (e.g. a pipe): then it is never tried again.
    off: bool,
}

impl Streamer {
    pub fn new(step: u64, lag: u64) -> Streamer {
        Streamer {
            step,
            lag,
            started: 0,
            waited: 0,
            off: false,
        }
    }

    /// Tells the streamer that everything before `end` has been written to `file`.
    /// Errors are not fatal to the write (the final fsync reports real I/O errors), so
    /// failures only switch the streamer off.
    pub fn wrote(&mut self, file: impl AsFd, end: u64) {
        if self.off || end < self.started + self.step {
            return;
        }
        let fd = file.as_fd();
        if start(fd, self.started, end - self.started).is_err() {
            self.off = true;
            return;
        }
        self.started = end;
        let behind = end.saturating_sub(self.lag);
        if behind > self.waited {
            if wait(fd, self.waited, behind - self.waited).is_err() {
                self.off = true;
                return;
            }
            self.waited = behind;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn streams_a_file_and_refuses_nothing_on_a_regular_file() {
        let mut f = tempfile::tempfile().unwrap();
        let mut s = Streamer::new(1 << 16, 1 << 18);
        let block = vec![7u8; 1 << 15];
        let mut end = 0u64;
        for _ in 0..64 {
            f.write_all(&block).unwrap();
            end += block.len() as u64;
            s.wrote(&f, end);
        }
        assert!(!s.off);
        assert!(s.started > 0 && s.waited > 0 && s.waited <= s.started);
        assert!(wait(&f, 0, end).is_ok());
        assert!(start(&f, 0, 0).is_ok());
    }
}

//! Early writeback of a file being streamed (sync_file_range), so that the final fsync of a
//! large write finds little left to flush.
//!
//! `sync_file_range` makes nothing durable (no metadata, no disk cache flush): it only starts
//! writeback sooner and bounds how much dirty data piles up. Callers still `fsync` at the end.

use std::collections::VecDeque;
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

/// Keeps writeback running behind a writer: every `step` bytes written it starts writeback
/// of what was written since the last start, and waits for the writeback started `lag` bytes
/// earlier, so dirty pages stay bounded and the disk writes while the caller is still
/// producing data. Writes must move forward through the file; they may skip ranges
/// (`wrote_at`), which then cost nothing.
#[derive(Debug)]
pub struct Streamer {
    step: u64,
    lag: u64,
    /// Writeback started up to this position, when `started_bytes` bytes had been written.
    started: u64,
    started_bytes: u64,
    /// Written back (waited for) up to this position.
    waited: u64,
    /// Bytes written so far.
    bytes: u64,
    /// Positions up to which writeback was started and not yet waited for, each with the
    /// bytes written by then (at most `lag / step + 1` of them).
    marks: VecDeque<(u64, u64)>,
    /// Set when the file refused the call (e.g. a pipe): then it is never tried again.
    off: bool,
}

impl Streamer {
    pub fn new(step: u64, lag: u64) -> Streamer {
        Streamer {
            step,
            lag,
            started: 0,
            started_bytes: 0,
            waited: 0,
            bytes: 0,
            marks: VecDeque::new(),
            off: false,
        }
    }

    /// Tells a sequential writer's streamer that everything before `end` has been written
    /// to `file`. Errors are not fatal to the write (the final fsync reports real I/O
    /// errors), so failures only switch the streamer off.
    pub fn wrote(&mut self, file: impl AsFd, end: u64) {
        self.bytes = self.bytes.max(end);
        self.advance(file.as_fd(), end);
    }

    /// Tells the streamer that `len` more bytes were written to `file`, all of them before
    /// `end`, for a writer that skips ranges (a restore that clones most of its target).
    pub fn wrote_at(&mut self, file: impl AsFd, end: u64, len: u64) {
        self.bytes += len;
        self.advance(file.as_fd(), end);
    }

    fn advance(&mut self, fd: std::os::fd::BorrowedFd<'_>, end: u64) {
        if self.off || self.bytes < self.started_bytes + self.step || end <= self.started {
            return;
        }
        if start(fd, self.started, end - self.started).is_err() {
            self.off = true;
            return;
        }
        self.marks.push_back((end, self.bytes));
        (self.started, self.started_bytes) = (end, self.bytes);
        let mut behind = None;
        while let Some(&(pos, bytes)) = self.marks.front() {
            if bytes + self.lag > self.bytes {
                break;
            }
            behind = Some(pos);
            self.marks.pop_front();
        }
        if let Some(pos) = behind {
            if wait(fd, self.waited, pos - self.waited).is_err() {
                self.off = true;
                return;
            }
            self.waited = pos;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STEP: u64 = 8 << 20;
    const LAG: u64 = 64 << 20;

    #[test]
    fn a_scattered_writer_starts_writeback_by_bytes_written_not_by_position() {
        let f = tempfile::tempfile().unwrap();
        let mut s = Streamer::new(STEP, LAG);
        // A restore that clones most of its target: 4 KiB written every 64 MiB.
        for i in 1..=100u64 {
            s.wrote_at(&f, i * (64 << 20), 4096);
        }
        assert_eq!(
            (s.started, s.waited),
            (0, 0),
            "400 KiB written: no writeback yet"
        );
        s.wrote_at(&f, 101 * (64 << 20), STEP);
        assert_eq!(s.started, 101 * (64 << 20));
        // Holes punched (nothing written) start nothing either.
        s.wrote_at(&f, 200 * (64 << 20), 0);
        assert_eq!(s.started, 101 * (64 << 20));
    }

    #[test]
    fn a_sequential_writer_waits_for_the_writeback_lag_bytes_behind() {
        let f = tempfile::tempfile().unwrap();
        let mut s = Streamer::new(STEP, LAG);
        for k in 1..=20u64 {
            s.wrote(&f, k * STEP);
            assert_eq!(s.started, k * STEP);
            assert_eq!(
                s.waited,
                k.saturating_sub(LAG / STEP) * STEP,
                "after {k} steps"
            );
            assert!(s.marks.len() as u64 <= LAG / STEP + 1);
        }
        // Less than a step more: nothing new.
        s.wrote(&f, 20 * STEP + 4096);
        assert_eq!(s.started, 20 * STEP);
    }
}

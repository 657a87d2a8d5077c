//! Sending file bytes to a socket without copying them through user space: splice(2) from
//! the file into a pipe (the pipe takes references to the page-cache pages), then from the
//! pipe into the socket (since Linux 6.5 unix and TCP sockets attach those pages to their
//! buffers instead of copying them). An NBD READ reply then costs the server no copy of
//! its data at all; the client's own receive is the only one.
//!
//! The pages are referenced, not copied: a write to the same bytes before the peer has
//! received them may show through, as it may for any read that overlaps a write in flight.

use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

/// A pipe for one thread's spliced replies: [`fill`](SplicePipe::fill) it with file bytes,
/// then [`drain_to`](SplicePipe::drain_to) a socket. It is empty between such rounds; after
/// a failure of either it holds unknown bytes and must be dropped.
#[derive(Debug)]
pub struct SplicePipe {
    rd: OwnedFd,
    wr: OwnedFd,
    /// What the pipe holds, in bytes (its buffers times the page size).
    capacity: usize,
    /// The page size: splice fills one pipe buffer per page touched (`filemap_splice_read`).
    page: usize,
}

impl SplicePipe {
    /// A pipe of at least `want` bytes where the kernel allows it (an unprivileged process
    /// is held to /proc/sys/fs/pipe-max-size, 1 MiB by default), else of what it allows.
    pub fn new(want: usize) -> io::Result<SplicePipe> {
        let page = match nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE) {
            Ok(Some(p)) => usize::try_from(p).unwrap_or(4096),
            _ => 4096,
        };
        let (rd, wr) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        let mut capacity = 0;
        for size in [want, 1 << 20] {
            let Ok(size) = i32::try_from(size) else {
                continue;
            };
            if let Ok(got) = fcntl(wr.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(size)) {
                capacity = usize::try_from(got).unwrap_or(0);
                break;
            }
        }
        if capacity == 0 {
            // The default size stands (16 pages on Linux).
            let got = fcntl(wr.as_raw_fd(), FcntlArg::F_GETPIPE_SZ)?;
            capacity = usize::try_from(got).unwrap_or(0);
        }
        Ok(SplicePipe {
            rd,
            wr,
            capacity,
            page,
        })
    }

    /// Whether `len` bytes at file offset `offset` fit in the pipe at once (splice fills
    /// one buffer per page touched, so a range not starting on a page takes one more).
    pub fn fits(&self, offset: u64, len: usize) -> bool {
        let head = (offset % self.page as u64) as usize;
        (head + len).div_ceil(self.page) <= self.capacity / self.page
    }

    /// Moves `len` bytes of `file` at `offset` into the empty pipe, waiting for the disk
    /// where they are not cached. `len` must [`fits`](Self::fits); the end of the file
    /// before `len` bytes is `UnexpectedEof`.
    pub fn fill(&mut self, file: &File, offset: u64, len: usize) -> io::Result<()> {
        if !self.fits(offset, len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "splice: the range does not fit in the pipe",
            ));
        }
        let mut pos =
            i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let mut left = len;
        while left > 0 {
            // SPLICE_F_NONBLOCK: a pipe that is full after all fails instead of waiting for
            // a reader that is this very thread.
            match splice(
                file.as_fd(),
                Some(&mut pos),
                self.wr.as_fd(),
                None,
                left,
                SpliceFFlags::SPLICE_F_NONBLOCK,
            ) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => left -= n,
                Err(nix::Error::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Sends the `len` bytes `fill` put in the pipe to `sock` (blocking on the socket), all
    /// of them. A failure may come after part of them was sent.
    pub fn drain_to(&mut self, sock: BorrowedFd<'_>, len: usize) -> io::Result<()> {
        let mut sent = 0;
        while sent < len {
            // SPLICE_F_NONBLOCK: a pipe emptier than `len` says fails instead of waiting
            // forever for a writer that is this very thread (the socket still blocks).
            match splice(
                self.rd.as_fd(),
                None,
                sock,
                None,
                len - sent,
                SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK,
            ) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => sent += n,
                Err(nix::Error::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    #[test]
    fn file_bytes_reach_the_socket_through_the_pipe() {
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 253) as u8).collect();
        f.write_all(&data).unwrap();
        let mut pipe = SplicePipe::new(2 << 20).unwrap();
        assert!(pipe.capacity >= 1 << 20, "{pipe:?}");
        let (a, mut b) = UnixStream::pair().unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            b.read_to_end(&mut got).unwrap();
            got
        });
        // Page-aligned and not, whole pipe and less.
        let ranges = [(0u64, 1usize << 20), (5, 4096), (4096 * 3 + 17, 600_000)];
        for &(off, len) in &ranges {
            assert!(pipe.fits(off, len));
            pipe.fill(&f, off, len).unwrap();
            pipe.drain_to(a.as_fd(), len).unwrap();
        }
        // Draining more than the pipe holds fails instead of waiting.
        pipe.fill(&f, 0, 1).unwrap();
        let err = pipe.drain_to(a.as_fd(), 2).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EAGAIN), "{err}");
        drop(a);
        let got = reader.join().unwrap();
        let mut want: Vec<u8> = ranges
            .iter()
            .flat_map(|&(o, l)| data[o as usize..o as usize + l].to_vec())
            .collect();
        want.push(data[0]);
        assert!(got == want, "the socket got other bytes");
        // One page more than the pipe holds does not fit, and is refused.
        let mut pipe = SplicePipe::new(2 << 20).unwrap();
        let cap = pipe.capacity;
        assert!(pipe.fits(0, cap));
        assert!(!pipe.fits(1, cap));
        assert!(pipe.fill(&f, 1, cap).is_err());
        // Past the end of the file.
        let mut pipe = SplicePipe::new(1 << 20).unwrap();
        let err = pipe.fill(&f, data.len() as u64 - 10, 100).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }
}

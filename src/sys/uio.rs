//! Positional reads that never wait for the disk: preadv2(2) with RWF_NOWAIT, so that a
//! server can serve page-cache hits at once and send misses to threads that may block.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Reads into `buf` at `offset` only from the page cache. `Ok(Some(n))`: `n` bytes were
/// read (fewer than asked when the rest is not cached, 0 at end of file); `Ok(None)`:
/// nothing could be read without waiting for I/O. `Err` with `Unsupported` when the
/// kernel or filesystem has no RWF_NOWAIT for buffered reads.
pub fn pread_nowait(file: &File, buf: &mut [u8], offset: u64) -> io::Result<Option<usize>> {
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    loop {
        // SAFETY: `iov` describes `buf`, which is valid for writes of `buf.len()` bytes
        // and outlives the call; the descriptor is open for as long as `file` lives.
        let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, off, libc::RWF_NOWAIT) };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => return Ok(None),
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => {
                return Err(io::ErrorKind::Unsupported.into())
            }
            _ => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn reads_cached_data() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        f.write_all_at(&[7u8; 8192], 0).unwrap();
        let mut buf = [0u8; 4096];
        match pread_nowait(&f, &mut buf, 4096) {
            // Just written, so cached: all of it arrives.
            Ok(Some(n)) => {
                assert_eq!(n, 4096);
                assert!(buf.iter().all(|&b| b == 7));
            }
            Ok(None) => panic!("freshly written data reported as not cached"),
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::Unsupported),
        }
        assert!(matches!(
            pread_nowait(&f, &mut buf, 1 << 20),
            Ok(Some(0)) | Err(_)
        ));
    }
}

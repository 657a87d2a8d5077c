//! Page-aligned byte buffers for large reads.
//!
//! A `Vec<u8>` of a megabyte or more comes from its own mmap with the allocator's header in
//! front, so its first byte sits 16 bytes past a page boundary. The kernel copies a `pread`
//! from the page cache into user memory with `rep movsb`, and on the AMD EPYC hosts we
//! measured that copy runs about five times slower into a destination that is not 32-byte
//! aligned: 2 GiB of cached file took 1.15 s into a buffer at page offset 16 and 0.22 s at
//! offset 0 or 32 (`bench/README.md`, "Aligned reads"). Every bulk read of the store and of
//! images therefore lands in an `AlignedBuf`, whose first byte is 4 KiB aligned (which also
//! suits `O_DIRECT`). Safe code only: the buffer is a slice of an over-allocated `Vec`.

use std::ops::{Deref, DerefMut};

/// A byte buffer whose first byte is `ALIGN`-aligned.
#[derive(Default)]
pub struct AlignedBuf {
    raw: Vec<u8>,
    off: usize,
    len: usize,
}

impl AlignedBuf {
    /// The alignment of the first byte: a page.
    pub const ALIGN: usize = 4096;

    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> AlignedBuf {
        let raw = vec![0u8; len + Self::ALIGN];
        // Always below ALIGN for a byte pointer at run time; were it not, the buffer would
        // still be correct, only unaligned.
        let off = match raw.as_ptr().align_offset(Self::ALIGN) {
            off if off < Self::ALIGN => off,
            _ => 0,
        };
        AlignedBuf { raw, off, len }
    }

    /// Makes the buffer `len` bytes long for a caller that overwrites all of them: keeps the
    /// allocation when it is big enough, so bytes past the old length hold stale data of this
    /// buffer, not zeros; a new allocation keeps the old bytes and zeroes the rest.
    pub fn resize_for_overwrite(&mut self, len: usize) {
        if self.raw.len() - self.off >= len {
            self.len = len;
            return;
        }
        let mut grown = AlignedBuf::zeroed(len);
        grown[..self.len].copy_from_slice(self);
        *self = grown;
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.raw[self.off..self.off + self.len]
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.off..self.off + self.len]
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::AlignedBuf;

    fn aligned(b: &AlignedBuf) -> bool {
        b.as_ptr() as usize % AlignedBuf::ALIGN == 0
    }

    #[test]
    fn first_byte_is_page_aligned_at_every_size() {
        for len in [0, 1, 16, 4095, 4096, 65536, 1 << 20, (4 << 20) + 5] {
            let b = AlignedBuf::zeroed(len);
            assert_eq!(b.len(), len);
            assert!(aligned(&b), "len {len}");
            assert!(b.iter().all(|&x| x == 0));
        }
        assert!(AlignedBuf::default().is_empty());
    }

    #[test]
    fn resize_keeps_the_bytes_and_the_alignment() {
        let mut b = AlignedBuf::zeroed(8);
        b.copy_from_slice(b"abcdefgh");
        // Shrinking and growing back within the allocation keeps the bytes.
        b.resize_for_overwrite(3);
        assert_eq!(&b[..], b"abc");
        b.resize_for_overwrite(8);
        assert_eq!(&b[..], b"abcdefgh");
        // Growing past it moves to a new aligned allocation with the old bytes in front.
        b.resize_for_overwrite(3 << 20);
        assert!(aligned(&b));
        assert_eq!(&b[..8], b"abcdefgh");
        assert!(b[8..].iter().all(|&x| x == 0));
        let mut empty = AlignedBuf::default();
        empty.resize_for_overwrite(100);
        assert!(aligned(&empty));
        assert_eq!(empty.len(), 100);
    }
}

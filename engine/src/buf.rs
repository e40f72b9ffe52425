//! Aligned, shareable I/O buffers.
//!
//! The daemon opens backing devices with `O_DIRECT`, which needs the memory of every
//! transfer aligned to the device's logical block size. [`AlignedBuf`] owns such memory;
//! [`AlignedBuf::freeze`] turns it into a [`Bytes`] so one payload can be handed at once to
//! the local disk write and to the replication link without a copy.

use bytes::Bytes;
use std::alloc::{self, Layout};
use std::ptr::NonNull;

/// Alignment of every [`AlignedBuf`]: enough for 4 KiB logical-block devices.
pub const ALIGN: usize = 4096;

/// A zero-initialised heap buffer aligned to [`ALIGN`].
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively (like a Box<[u8]>); nothing in it is
// tied to a thread.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]`, which is safe to share between threads.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (`len` may be 0).
    pub fn zeroed(len: usize) -> Self {
        if len == 0 {
            return Self {
                ptr: NonNull::dangling(),
                len: 0,
            };
        }
        let layout = Self::layout(len);
        // SAFETY: layout has a non-zero size (len > 0) and a valid power-of-two alignment.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        Self { ptr, len }
    }

    /// A buffer holding a copy of `data` (not zeroed first: this is on the write path).
    pub fn copy_from(data: &[u8]) -> Self {
        let len = data.len();
        if len == 0 {
            return Self::zeroed(0);
        }
        let layout = Self::layout(len);
        // SAFETY: layout has a non-zero size and a valid power-of-two alignment.
        let raw = unsafe { alloc::alloc(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        // SAFETY: `raw` is a fresh allocation of `len` bytes that cannot overlap `data`;
        // after the copy every byte is initialised, as the other methods assume.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), raw, len) };
        Self { ptr, len }
    }

    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len, ALIGN).expect("buffer length overflows a Layout")
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for len bytes (allocated above, or dangling with len 0),
        // initialised (alloc_zeroed), and uniquely borrowed through &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Raw pointer for handing to the kernel; valid for `len()` bytes while `self` lives.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Freeze into a cheaply clonable [`Bytes`] whose memory stays aligned.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: as in as_mut_slice, with a shared borrow.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: ptr was allocated by alloc_zeroed with exactly this layout.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
        }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

/// True when `b` starts on an [`ALIGN`] boundary (so it may go to an `O_DIRECT` fd as is).
pub fn is_aligned(b: &[u8]) -> bool {
    (b.as_ptr() as usize).is_multiple_of(ALIGN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_shared() {
        let b = AlignedBuf::copy_from(&[7u8; 8192]).freeze();
        assert!(is_aligned(&b));
        let c = b.clone();
        assert_eq!(c.as_ptr(), b.as_ptr());
        assert!(b.iter().all(|&x| x == 7));
        let s = b.slice(4096..);
        assert!(is_aligned(&s));
        assert_eq!(AlignedBuf::zeroed(0).freeze().len(), 0);
    }
}

//! Aligned I/O buffers, recycled through a pool so the data path does not
//! allocate per request once warm.
//!
//! `O_DIRECT` needs buffers aligned to the logical block size; every buffer
//! here is aligned to 4 KiB. A buffer returns to its pool when dropped; the
//! pool keeps at most [`RETAIN_MAX`] buffers of each size class (worst-case
//! retained memory: the sum of class size × retain count, 94 MiB), frees the
//! rest, and hands out exact-size unpooled buffers above the largest class.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::Arc;

use crossbeam_queue::ArrayQueue;

/// Alignment of every buffer.
pub const BUF_ALIGN: usize = 4096;

/// Size classes of pooled buffers.
pub const CLASS_SIZES: [usize; 6] = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20];

/// How many free buffers of each class the pool keeps.
pub const RETAIN_MAX: [usize; 6] = [512, 256, 128, 64, 32, 8];

const _: () = assert!(CLASS_SIZES[0] % BUF_ALIGN == 0);

/// An owned, 4 KiB-aligned byte buffer with a length no larger than its capacity.
pub struct IoBuf {
    ptr: NonNull<u8>,
    capacity: usize,
    len: usize,
    pool: Option<Arc<PoolShared>>,
}

// SAFETY: IoBuf owns its allocation exclusively, like Vec<u8>.
unsafe impl Send for IoBuf {}
// SAFETY: shared references only give out &[u8].
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// A new unpooled buffer of `len` zeroed bytes (capacity rounded up to the alignment).
    pub fn new(len: usize) -> IoBuf {
        let capacity = len.max(1).next_multiple_of(BUF_ALIGN);
        IoBuf {
            ptr: raw_alloc(capacity),
            capacity,
            len,
            pool: None,
        }
    }

    /// Bytes the buffer can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Sets the length.
    ///
    /// # Panics
    /// If `len` exceeds the capacity.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.capacity, "IoBuf length beyond capacity");
        self.len = len;
    }

    /// Pointer to the first byte, for handing to the kernel.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Deref for IoBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for capacity ≥ len bytes and initialised (zeroed at allocation).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for IoBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuf")
            .field("len", &self.len)
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        let raw = RawBuf {
            ptr: self.ptr,
            capacity: self.capacity,
        };
        match self.pool.take() {
            Some(pool) => pool.give_back(raw),
            None => raw.free(),
        }
    }
}

fn raw_alloc(capacity: usize) -> NonNull<u8> {
    let layout = Layout::from_size_align(capacity, BUF_ALIGN).expect("valid buffer layout");
    // SAFETY: the layout has a non-zero size.
    let ptr = unsafe { alloc_zeroed(layout) };
    NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout))
}

struct RawBuf {
    ptr: NonNull<u8>,
    capacity: usize,
}

// SAFETY: a RawBuf is an exclusively owned allocation in transit.
unsafe impl Send for RawBuf {}

impl RawBuf {
    fn free(self) {
        let layout = Layout::from_size_align(self.capacity, BUF_ALIGN).expect("valid layout");
        // SAFETY: allocated by raw_alloc with this layout, not freed before.
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }
}

/// Free buffers of one size.
struct Class {
    size: usize,
    free: ArrayQueue<RawBuf>,
}

struct PoolShared {
    /// Ascending sizes.
    classes: Box<[Class]>,
}

impl PoolShared {
    fn give_back(&self, raw: RawBuf) {
        match self.classes.iter().find(|c| c.size == raw.capacity) {
            Some(class) => {
                if let Err(raw) = class.free.push(raw) {
                    raw.free();
                }
            }
            None => raw.free(),
        }
    }
}

impl Drop for PoolShared {
    fn drop(&mut self) {
        for class in &self.classes {
            while let Some(raw) = class.free.pop() {
                raw.free();
            }
        }
    }
}

/// A pool of aligned buffers shared by every device of a daemon.
#[derive(Clone)]
pub struct BufPool {
    shared: Arc<PoolShared>,
}

impl Default for BufPool {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for BufPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufPool").finish_non_exhaustive()
    }
}

impl BufPool {
    /// An empty pool of the daemon's size classes ([`CLASS_SIZES`], keeping
    /// [`RETAIN_MAX`]); buffers are allocated on first use.
    pub fn new() -> BufPool {
        let classes: Vec<_> = CLASS_SIZES.into_iter().zip(RETAIN_MAX).collect();
        Self::with_classes(&classes)
    }

    /// An empty pool of the given `(size, how many free ones to keep)`
    /// classes, e.g. one class of exactly the size a frontend's requests
    /// may reach.
    ///
    /// # Panics
    /// If the sizes are not ascending multiples of [`BUF_ALIGN`] or a class
    /// keeps none.
    pub fn with_classes(classes: &[(usize, usize)]) -> BufPool {
        assert!(
            classes.windows(2).all(|w| w[0].0 < w[1].0)
                && classes
                    .iter()
                    .all(|&(size, keep)| size > 0 && size % BUF_ALIGN == 0 && keep > 0),
            "buffer classes must be ascending, aligned and keep some"
        );
        BufPool {
            shared: Arc::new(PoolShared {
                classes: classes
                    .iter()
                    .map(|&(size, keep)| Class {
                        size,
                        free: ArrayQueue::new(keep),
                    })
                    .collect(),
            }),
        }
    }

    /// A buffer of length `len` from the smallest class that holds it.
    ///
    /// The content is whatever the previous user left; callers overwrite it.
    pub fn take(&self, len: usize) -> IoBuf {
        let Some(class) = self.shared.classes.iter().find(|c| c.size >= len) else {
            return IoBuf::new(len);
        };
        let raw = class.free.pop().unwrap_or_else(|| RawBuf {
            ptr: raw_alloc(class.size),
            capacity: class.size,
        });
        IoBuf {
            ptr: raw.ptr,
            capacity: raw.capacity,
            len,
            pool: Some(self.shared.clone()),
        }
    }

    /// Number of free buffers held, per class (for tests and statistics).
    pub fn free_counts(&self) -> Vec<usize> {
        self.shared.classes.iter().map(|c| c.free.len()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_recycled() {
        let pool = BufPool::new();
        let mut a = pool.take(5000);
        assert_eq!(a.len(), 5000);
        assert_eq!(a.capacity(), 16 << 10);
        assert_eq!(a.as_mut_ptr() as usize % BUF_ALIGN, 0);
        a[4999] = 7;
        let ptr = a.as_mut_ptr();
        drop(a);
        assert_eq!(pool.free_counts()[1], 1);
        let mut b = pool.take(16 << 10);
        assert_eq!(b.as_mut_ptr(), ptr, "the freed buffer is reused");
    }

    #[test]
    fn oversized_buffers_are_not_pooled() {
        let pool = BufPool::new();
        let big = pool.take(9 << 20);
        assert_eq!(big.capacity(), 9 << 20);
        drop(big);
        assert_eq!(pool.free_counts().iter().sum::<usize>(), 0);
    }

    #[test]
    fn a_pool_of_one_class_serves_exactly_that_size() {
        let pool = BufPool::with_classes(&[(512 << 10, 2)]);
        let bufs: Vec<_> = (0..3).map(|_| pool.take(512 << 10)).collect();
        assert!(bufs.iter().all(|b| b.capacity() == 512 << 10));
        drop(bufs);
        assert_eq!(pool.free_counts(), vec![2]);
        assert_eq!(pool.take(4096).capacity(), 512 << 10, "small requests too");
        assert_eq!(pool.take(1 << 20).capacity(), 1 << 20, "larger: unpooled");
    }

    #[test]
    fn pool_keeps_at_most_its_retain_limit() {
        let pool = BufPool::new();
        let bufs: Vec<_> = (0..RETAIN_MAX[5] + 3).map(|_| pool.take(4 << 20)).collect();
        drop(bufs);
        assert_eq!(pool.free_counts()[5], RETAIN_MAX[5]);
    }
}

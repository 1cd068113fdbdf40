//! Memory the agent shares with the programs: a shared, writable mapping of an mmapable array
//! map (`ENDPOINT_SLOTS`, `PEER_SLOTS`, `FLOWS_V4`), or zeroed heap words standing in for one
//! in tests of the writers. The owners ([`super::slots`], [`super::peer_slots`],
//! [`super::flows`]) access it only through atomics, under their own protocols.

use std::{os::fd::BorrowedFd, ptr::NonNull};

use anyhow::{Context as _, Result, bail};

/// `len` bytes shared with the programs, unmapped (or freed) on drop.
pub struct SharedMemory {
    ptr: NonNull<u8>,
    len: usize,
    /// `None` for a mapping; the words `ptr` points into for heap memory.
    heap: Option<Box<[u64]>>,
}

// SAFETY: the memory is owned by this value (heap) or by the mapping it unmaps on drop; the
// owners access it only with atomic loads, stores and compare-and-swaps.
unsafe impl Send for SharedMemory {}
// SAFETY: as above.
unsafe impl Sync for SharedMemory {}

impl SharedMemory {
    /// Maps the first `len` bytes (rounded up to whole pages) of the mmapable map `name` behind
    /// `fd`, shared and writable.
    pub fn map(fd: BorrowedFd<'_>, len: usize, name: &str) -> Result<Self> {
        use std::os::fd::AsRawFd as _;
        if len == 0 {
            bail!("{name} is empty");
        }
        let len = len.next_multiple_of(page_size());
        // SAFETY: a fresh shared mapping of `len` bytes of the map; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            bail!(
                "mapping {name} into memory: {}",
                std::io::Error::last_os_error()
            );
        }
        let ptr = NonNull::new(p.cast()).context("mmap returned null")?;
        Ok(Self {
            ptr,
            len,
            heap: None,
        })
    }

    /// `len` zeroed bytes (rounded up to whole 8-byte words) of plain memory, for tests.
    pub fn heap(len: usize) -> Self {
        let mut words = vec![0u64; len.div_ceil(8).max(1)].into_boxed_slice();
        let ptr = NonNull::new(words.as_mut_ptr().cast()).expect("a box is non-null");
        Self {
            ptr,
            len: words.len() * 8,
            heap: Some(words),
        }
    }

    /// The first element of the memory as an array of `T` (8-aligned: page or `u64` base).
    pub fn base<T>(&self) -> *mut T {
        self.ptr.as_ptr().cast()
    }
}

impl Drop for SharedMemory {
    fn drop(&mut self) {
        if self.heap.is_none() {
            // SAFETY: the mapping made in `map`, of `len` bytes, unused from here on.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        }
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

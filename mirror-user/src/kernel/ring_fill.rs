//! How full each CPU's ring is, read on demand: a read-only mapping of the
//! ring's two position pages (consumer, then producer), which the kernel
//! lets any holder of the map's fd map. Nothing is written and the drain
//! tasks are not disturbed.

use std::{
    ffi::c_void,
    io,
    num::NonZeroUsize,
    os::fd::AsFd,
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};
use serde::Serialize;

use crate::telemetry::registry::Stage;

/// One ring's position pages.
pub struct RingFill {
    cpu: u32,
    size: u32,
    pages: NonNull<c_void>,
    page: usize,
}

// SAFETY: the mapping is read-only shared memory that lives as long as the
// value; it is only read, through atomic loads.
unsafe impl Send for RingFill {}
// SAFETY: as above.
unsafe impl Sync for RingFill {}

impl RingFill {
    /// Maps the position pages of `ring` (of `size` data bytes).
    pub fn new(cpu: u32, ring: impl AsFd, size: u32) -> io::Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .map_err(|_| io::Error::other("no page size"))?;
        let length = NonZeroUsize::new(2 * page).ok_or_else(|| io::Error::other("no page size"))?;
        // SAFETY: a new read-only shared mapping of the ring's first two
        // pages (the kernel allows read-only mappings of a BPF ring at any
        // offset); it aliases nothing of ours and is unmapped on drop.
        let pages = unsafe {
            mmap(
                None,
                length,
                ProtFlags::PROT_READ,
                MapFlags::MAP_SHARED,
                ring,
                0,
            )
        }?;
        Ok(Self {
            cpu,
            size,
            pages,
            page,
        })
    }

    /// Bytes written by the kernel and not yet read by the drain (record
    /// headers and padding included).
    pub fn fill(&self) -> u64 {
        let position = |offset: usize| {
            // SAFETY: both pages are mapped for the life of `self`; each
            // starts with the kernel's 8-byte, 8-aligned position, which
            // the kernel and the drain update atomically.
            unsafe {
                (*self.pages.as_ptr().byte_add(offset).cast::<AtomicU64>()).load(Ordering::Acquire)
            }
        };
        let consumer = position(0);
        let producer = position(self.page);
        producer.wrapping_sub(consumer).min(u64::from(self.size))
    }
}

impl Drop for RingFill {
    fn drop(&mut self) {
        // SAFETY: `pages` is the mapping made in `new`, of this length,
        // and nothing refers to it any more.
        let _ = unsafe { munmap(self.pages, 2 * self.page) };
    }
}

/// Every ring's fill: the `rings` section of the counters (gauges).
#[derive(Default)]
pub struct RingFills(pub Vec<RingFill>);

/// One ring's entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RingSnapshot {
    pub cpu: u32,
    pub fill_bytes: u64,
    pub size_bytes: u64,
}

impl Stage for RingFills {
    type Snapshot = Vec<RingSnapshot>;

    fn snapshot(&self) -> Vec<RingSnapshot> {
        self.0
            .iter()
            .map(|ring| RingSnapshot {
                cpu: ring.cpu,
                fill_bytes: ring.fill(),
                size_bytes: u64::from(ring.size),
            })
            .collect()
    }
}

//! The payload arena: one sealed memfd mapping cut into fixed-size chunks,
//! where the drain copies payloads out of the kernel rings, and which a
//! local subscriber maps read-only, so that its stream bytes are never
//! copied again (docs/protocol.md, "Shared memory").
//!
//! A chunk is leased whole by one [`crate::flow::segment::PayloadPool`],
//! which fills it front to back and hands out slices of one [`Bytes`] over
//! the lease; the chunk goes back to the free set when the last slice drops
//! (a session keeps the slices a client has not returned, which is what
//! keeps the client's view of them stable). Leasing and returning are one
//! atomic operation on a bitmap each, never a lock or a wait: when no chunk
//! is free, the pool copies to the heap instead.
//!
//! The memfd is sealed against resizing and against any writable mapping
//! made after the mirror's own (`F_SEAL_FUTURE_WRITE`), so a client that
//! receives it can read and nothing more.

use std::{
    ffi::c_void,
    num::NonZeroUsize,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    ptr::NonNull,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use nix::{
    fcntl::{FcntlArg, SealFlag, fcntl},
    sys::{
        memfd::{MFdFlags, memfd_create},
        mman::{MapFlags, ProtFlags, mmap, munmap},
        stat::fstat,
    },
    unistd::ftruncate,
};

/// Size of a chunk: large enough that leasing one is rare (once per MiB of
/// payload), small enough that a chunk pinned by one held slice wastes
/// little of the arena.
pub const CHUNK: usize = 1 << 20;

/// The seals a mirror's arena carries, which a client may check.
pub const SEALS: SealFlag = SealFlag::F_SEAL_SHRINK
    .union(SealFlag::F_SEAL_GROW)
    .union(SealFlag::F_SEAL_FUTURE_WRITE)
    .union(SealFlag::F_SEAL_SEAL);

#[derive(Debug, thiserror::Error)]
pub enum ArenaError {
    #[error(
        "the payload arena must be a whole number of {CHUNK}-byte chunks, at least one and at most 64 GiB; {0} bytes is not"
    )]
    Size(usize),
    #[error("cannot create the payload arena ({step}): {source}")]
    Create {
        step: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("the arena the mirror sent is not usable ({0}): use a client of the mirror's release")]
    Foreign(&'static str),
}

/// The mirror's writable arena; clones share it.
#[derive(Clone)]
pub struct Arena {
    inner: Arc<Inner>,
}

struct Inner {
    fd: OwnedFd,
    mapping: Mapping,
    /// Bit set: chunk free. Lowest chunks are leased first, so that a
    /// light load keeps touching the same few pages.
    free: Box<[AtomicU64]>,
    counters: ArenaCounters,
}

/// One `mmap` of an arena, unmapped on drop.
struct Mapping {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; who writes where is governed
// by chunk leases (one writer per chunk, readers only of the written part).
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `base..base+len` is a mapping of ours, and nothing points
        // into it any more (every user holds the Arc that holds this).
        let _ = unsafe { munmap(self.base.cast::<c_void>(), self.len) };
    }
}

impl Mapping {
    fn contains(&self, bytes: &[u8]) -> Option<u64> {
        let base = self.base.as_ptr() as usize;
        let start = bytes.as_ptr() as usize;
        (start >= base && start + bytes.len() <= base + self.len && !bytes.is_empty())
            .then(|| (start - base) as u64)
    }
}

/// Counters of the arena (the `arena` section of the counters document).
#[derive(Debug, Default)]
pub struct ArenaCounters {
    size_bytes: AtomicU64,
    in_use_bytes: AtomicU64,
    fallback_payloads: AtomicU64,
}

/// [`ArenaCounters`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ArenaSnapshot {
    /// Bytes of the arena (`mirror run --arena-size`).
    pub size_bytes: u64,
    /// Bytes of chunks leased now: being filled, or holding payload that a
    /// stage or a client still uses.
    pub in_use_bytes: u64,
    /// Payloads copied to the heap because no chunk was free (a local
    /// client receives those as bytes).
    pub fallback_payloads: u64,
}

impl ArenaCounters {
    pub fn snapshot(&self) -> ArenaSnapshot {
        ArenaSnapshot {
            size_bytes: self.size_bytes.load(Ordering::Relaxed),
            in_use_bytes: self.in_use_bytes.load(Ordering::Relaxed),
            fallback_payloads: self.fallback_payloads.load(Ordering::Relaxed),
        }
    }
}

impl Arena {
    /// Creates and seals an arena of `size` bytes (a multiple of
    /// [`CHUNK`]). Its pages take memory only once written.
    pub fn new(size: usize) -> Result<Self, ArenaError> {
        if size == 0 || !size.is_multiple_of(CHUNK) || size > 64 << 30 {
            return Err(ArenaError::Size(size));
        }
        let create = |step| move |source| ArenaError::Create { step, source };
        let fd = memfd_create(
            c"mirror-arena",
            MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
        )
        .map_err(create("memfd_create"))?;
        ftruncate(&fd, size as i64).map_err(create("ftruncate"))?;
        // The mirror's own writable mapping comes before the seal that
        // forbids any later one.
        let mapping =
            map(&fd, size, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE).map_err(create("mmap"))?;
        fcntl(&fd, FcntlArg::F_ADD_SEALS(SEALS)).map_err(create("seal"))?;
        let chunks = size / CHUNK;
        let free = (0..chunks.div_ceil(64))
            .map(|word| {
                let bits = (chunks - word * 64).min(64);
                AtomicU64::new(if bits == 64 {
                    u64::MAX
                } else {
                    (1 << bits) - 1
                })
            })
            .collect();
        let counters = ArenaCounters::default();
        counters.size_bytes.store(size as u64, Ordering::Relaxed);
        Ok(Self {
            inner: Arc::new(Inner {
                fd,
                mapping,
                free,
                counters,
            }),
        })
    }

    /// The memfd, to pass to a local client.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.inner.fd.as_fd()
    }

    pub fn size(&self) -> usize {
        self.inner.mapping.len
    }

    pub fn counters(&self) -> ArenaSnapshot {
        self.inner.counters.snapshot()
    }

    /// Counts a payload that went to the heap for want of a free chunk.
    pub fn count_fallback(&self) {
        self.inner
            .counters
            .fallback_payloads
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Where `bytes` lie in the arena, if they do (and are not empty).
    pub fn offset_of(&self, bytes: &[u8]) -> Option<u64> {
        self.inner.mapping.contains(bytes)
    }

    /// A free chunk, or `None` when every chunk is leased.
    pub fn lease(&self) -> Option<Chunk> {
        for (word_index, word) in self.inner.free.iter().enumerate() {
            let mut bits = word.load(Ordering::Relaxed);
            while bits != 0 {
                let bit = bits.trailing_zeros();
                // Acquire: the previous holder's reads of the chunk happen
                // before our writes.
                match word.compare_exchange_weak(
                    bits,
                    bits & !(1 << bit),
                    Ordering::Acquire,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => {
                        self.inner
                            .counters
                            .in_use_bytes
                            .fetch_add(CHUNK as u64, Ordering::Relaxed);
                        return Some(Chunk {
                            arena: Arc::clone(&self.inner),
                            index: word_index * 64 + bit as usize,
                        });
                    }
                    Err(now) => bits = now,
                }
            }
        }
        None
    }
}

/// A leased chunk; free again when dropped. Held by the [`Bytes`] made of
/// it ([`Chunk::into_bytes`]), so it is returned when the last slice goes.
pub struct Chunk {
    arena: Arc<Inner>,
    index: usize,
}

impl Chunk {
    /// The chunk's first byte. Only the holder of the lease writes through
    /// it, and only to bytes no slice has been handed out for.
    pub fn as_mut_ptr(&self) -> *mut u8 {
        // SAFETY: `index` is below the chunk count, so this stays inside
        // the mapping.
        unsafe { self.arena.mapping.base.as_ptr().add(self.index * CHUNK) }
    }

    /// A [`Bytes`] over the whole chunk, owning the lease.
    pub fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for Chunk {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: inside the mapping, which lives as long as `arena`. The
        // bytes may be written later through `as_mut_ptr`, but only those
        // no slice was yet handed out for: a `Bytes` reads the range of
        // its own slice only.
        unsafe { std::slice::from_raw_parts(self.as_mut_ptr(), CHUNK) }
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        let word = &self.arena.free[self.index / 64];
        // Release: our use of the chunk happens before the next lease.
        word.fetch_or(1 << (self.index % 64), Ordering::Release);
        self.arena
            .counters
            .in_use_bytes
            .fetch_sub(CHUNK as u64, Ordering::Relaxed);
    }
}

fn map(fd: &OwnedFd, len: usize, prot: ProtFlags) -> nix::Result<Mapping> {
    let length = NonZeroUsize::new(len).ok_or(nix::Error::EINVAL)?;
    // SAFETY: a fresh mapping of a file we hold; nothing aliases it yet.
    let base = unsafe { mmap(None, length, prot, MapFlags::MAP_SHARED, fd, 0)? };
    Ok(Mapping {
        base: base.cast::<u8>(),
        len,
    })
}

/// A client's read-only view of the mirror's arena.
#[derive(Clone)]
pub struct ArenaView {
    mapping: Arc<Mapping>,
}

impl ArenaView {
    /// Maps the arena the mirror sent, after checking that it is a sealed
    /// memfd of `size` bytes (so it cannot shrink under the mapping, which
    /// would make reading it a crash).
    pub fn map(fd: OwnedFd, size: u64) -> Result<Self, ArenaError> {
        let foreign = ArenaError::Foreign;
        let seals = fcntl(&fd, FcntlArg::F_GET_SEALS).map_err(|_| foreign("not a memfd"))?;
        let seals = SealFlag::from_bits_truncate(seals);
        if !seals.contains(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW) {
            return Err(foreign("not sealed against resizing"));
        }
        let stat = fstat(&fd).map_err(|_| foreign("cannot stat it"))?;
        let len = usize::try_from(size).map_err(|_| foreign("too large"))?;
        if u64::try_from(stat.st_size).ok() != Some(size) || len == 0 {
            return Err(foreign("its size is not the announced size"));
        }
        let mapping = map(&fd, len, ProtFlags::PROT_READ).map_err(|_| foreign("cannot map it"))?;
        Ok(Self {
            mapping: Arc::new(mapping),
        })
    }

    pub fn size(&self) -> u64 {
        self.mapping.len as u64
    }

    /// `len` bytes at `offset` as [`Bytes`], with `guard` held as long as
    /// any slice of them lives; `None` if the range is not inside the arena.
    pub fn bytes<G: Send + 'static>(&self, offset: u64, len: u32, guard: G) -> Option<Bytes> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(len as usize)?;
        (end <= self.mapping.len).then(|| {
            Bytes::from_owner(ViewSlice {
                mapping: Arc::clone(&self.mapping),
                start,
                len: len as usize,
                _guard: guard,
            })
        })
    }
}

/// A range of a client's view, owned by the [`Bytes`] over it.
struct ViewSlice<G> {
    mapping: Arc<Mapping>,
    start: usize,
    len: usize,
    _guard: G,
}

impl<G> AsRef<[u8]> for ViewSlice<G> {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: checked to be inside the mapping, which `mapping` keeps.
        // The mirror does not write these bytes until the client returned
        // them, which it does once `_guard` drops, after the last reader.
        unsafe { std::slice::from_raw_parts(self.mapping.base.as_ptr().add(self.start), self.len) }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd as _;

    use super::*;

    fn write(chunk: &Chunk, at: usize, data: &[u8]) {
        // SAFETY: a test writing into its own lease.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), chunk.as_mut_ptr().add(at), data.len());
        }
    }

    #[test]
    fn chunks_are_leased_lowest_first_and_come_back_when_the_last_slice_drops() {
        let arena = Arena::new(3 * CHUNK).unwrap();
        let a = arena.lease().unwrap();
        let b = arena.lease().unwrap();
        let c = arena.lease().unwrap();
        assert_eq!((a.index, b.index, c.index), (0, 1, 2));
        assert!(arena.lease().is_none(), "three chunks, three leases");
        assert_eq!(arena.counters().in_use_bytes, 3 * CHUNK as u64);
        write(&b, 10, b"hello");
        let whole = b.into_bytes();
        let slice = whole.slice(10..15);
        drop(whole);
        assert!(arena.lease().is_none(), "a slice keeps its chunk");
        assert_eq!(&slice[..], b"hello");
        assert_eq!(arena.offset_of(&slice), Some(CHUNK as u64 + 10));
        drop(slice);
        let again = arena.lease().unwrap();
        assert_eq!(again.index, 1, "the chunk came back");
        drop((a, c, again));
        assert_eq!(arena.counters().in_use_bytes, 0);
        assert_eq!(arena.counters().size_bytes, 3 * CHUNK as u64);
    }

    #[test]
    fn bytes_outside_the_arena_have_no_offset() {
        let arena = Arena::new(CHUNK).unwrap();
        assert_eq!(arena.offset_of(b"elsewhere"), None);
        let chunk = arena.lease().unwrap().into_bytes();
        assert_eq!(arena.offset_of(&chunk.slice(0..0)), None);
        assert_eq!(
            arena.offset_of(&chunk.slice(CHUNK - 1..)),
            Some(CHUNK as u64 - 1)
        );
    }

    #[test]
    fn sizes_must_be_whole_chunks() {
        for size in [0, CHUNK - 1, CHUNK + 1] {
            assert!(matches!(Arena::new(size), Err(ArenaError::Size(_))));
        }
        // 65 chunks: the bitmap's second word has one chunk.
        let arena = Arena::new(65 * CHUNK).unwrap();
        let leases: Vec<Chunk> = std::iter::from_fn(|| arena.lease()).collect();
        assert_eq!(leases.len(), 65);
    }

    #[test]
    fn a_client_can_read_the_arena_and_never_write_it() {
        let arena = Arena::new(2 * CHUNK).unwrap();
        let chunk = arena.lease().unwrap();
        write(&chunk, 0, b"payload");
        // What a client receives: a duplicate of the descriptor.
        let received = arena.fd().try_clone_to_owned().unwrap();
        let writable = received.try_clone().unwrap();
        let view = ArenaView::map(received, 2 * CHUNK as u64).unwrap();
        assert_eq!(&view.bytes(0, 7, ()).unwrap()[..], b"payload");
        assert!(view.bytes(2 * CHUNK as u64 - 1, 2, ()).is_none());
        assert!(view.bytes(u64::MAX, 1, ()).is_none());
        // No shared writable mapping, no write, no resize.
        let length = NonZeroUsize::new(CHUNK).unwrap();
        // SAFETY: expected to fail; unmapped below if it does not.
        let mapped = unsafe {
            mmap(
                None,
                length,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                &writable,
                0,
            )
        };
        assert_eq!(mapped.err(), Some(nix::Error::EPERM));
        assert!(nix::unistd::write(&writable, b"x").is_err());
        assert!(ftruncate(&writable, 0).is_err());
        assert!(ftruncate(&writable, 4 * CHUNK as i64).is_err());
        // Reopened through /proc, for writing: the seal is the file's.
        let path = format!("/proc/self/fd/{}", writable.as_raw_fd());
        if let Ok(mut reopened) = std::fs::OpenOptions::new().write(true).open(&path) {
            use std::io::Write as _;
            assert!(reopened.write_all(b"x").is_err());
        }
        // The guard of a slice lives as long as the slice.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let slice = view.bytes(0, 3, tx).unwrap();
        let shorter = slice.slice(1..);
        drop(slice);
        assert!(rx.try_recv().is_err());
        drop(shorter);
        assert!(
            rx.try_recv()
                .is_err_and(|e| e == std::sync::mpsc::TryRecvError::Disconnected)
        );
    }

    #[test]
    fn a_client_cannot_change_the_arena_by_mprotect_hole_punching_or_a_private_mapping() {
        let arena = Arena::new(CHUNK).unwrap();
        let chunk = arena.lease().unwrap();
        write(&chunk, 0, b"payload");
        let received = arena.fd().try_clone_to_owned().unwrap();
        let length = NonZeroUsize::new(CHUNK).unwrap();
        // SAFETY: a fresh read-only mapping, unmapped at the end.
        let shared = unsafe {
            mmap(
                None,
                length,
                ProtFlags::PROT_READ,
                MapFlags::MAP_SHARED,
                &received,
                0,
            )
        }
        .unwrap();
        // SAFETY: asking to make our own mapping writable; expected to fail.
        let upgraded =
            unsafe { libc::mprotect(shared.as_ptr(), CHUNK, libc::PROT_READ | libc::PROT_WRITE) };
        assert_eq!(upgraded, -1, "a read-only view became writable");
        // SAFETY: punching a hole in the file, which would zero the
        // mirror's pages; expected to fail.
        let punched = unsafe {
            libc::fallocate(
                received.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                0,
                CHUNK as i64,
            )
        };
        assert_eq!(punched, -1, "a hole was punched in the arena");
        // A private writable mapping is the client's copy, not the arena.
        // SAFETY: a fresh private mapping, unmapped below.
        let private = unsafe {
            mmap(
                None,
                length,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE,
                &received,
                0,
            )
        }
        .unwrap();
        // SAFETY: writing the private copy, which is ours.
        unsafe { private.cast::<u8>().as_ptr().write(b'X') };
        // SAFETY: reading the mappings made above, then unmapping them.
        unsafe {
            assert_eq!(*shared.cast::<u8>().as_ptr(), b'p');
            assert_eq!(*chunk.as_mut_ptr(), b'p');
            munmap(private, CHUNK).unwrap();
            munmap(shared, CHUNK).unwrap();
        }
    }

    #[test]
    fn a_descriptor_that_is_not_a_sealed_arena_is_refused() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(CHUNK as u64).unwrap();
        assert!(matches!(
            ArenaView::map(file.into(), CHUNK as u64),
            Err(ArenaError::Foreign(_))
        ));
        let arena = Arena::new(CHUNK).unwrap();
        let fd = arena.fd().try_clone_to_owned().unwrap();
        assert!(matches!(
            ArenaView::map(fd, 2 * CHUNK as u64),
            Err(ArenaError::Foreign(_))
        ));
    }
}

//! Reading one BPF ring in place, with a look at its next record before the
//! record is released to the kernel.
//!
//! aya's `RingBuf` releases a record when its item is dropped and lends one
//! item at a time, tied to a `&mut` borrow of the ring: a merge of several
//! rings could not keep one ring's next record while it reads another's,
//! nor across an `await`. This reader keeps the read position itself; the
//! memory-ordering protocol is the kernel's (`kernel/bpf/ringbuf.c`) and
//! the same as aya's.

use std::{
    ffi::c_void,
    io,
    num::NonZeroUsize,
    os::fd::AsFd,
    ptr::NonNull,
    sync::atomic::{self, AtomicU32, AtomicUsize, Ordering},
};

use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

/// Set in a record's length word while its producer is still writing it.
const BUSY_BIT: u32 = 1 << 31;
/// Set in a record's length word when its producer gave it up.
const DISCARD_BIT: u32 = 1 << 30;
/// `BPF_RINGBUF_HDR_SZ`: the length word and the page offset.
const HEADER: usize = 8;

/// One ring's pages: the consumer position (read-write), then the producer
/// position and the data, mapped twice in a row by the kernel so that a
/// record that wraps around is still one slice.
pub struct RingReader {
    consumer: NonNull<c_void>,
    producer: NonNull<c_void>,
    page: usize,
    size: usize,
    /// Where the next record starts (the kernel's consumer position once
    /// released).
    pos: usize,
    /// The producer position last read.
    producer_pos: usize,
    /// Length of the record `peek` returned, until it is released.
    head_len: Option<usize>,
    /// The consumer position moved since the producer position was last
    /// read: before concluding that the ring is empty, a full fence makes
    /// sure that either this reader sees the producer's new record or the
    /// producer sees the new position (and wakes the reader).
    moved: bool,
}

// SAFETY: the mappings are owned by the value and live as long as it does;
// the shared words are accessed only through atomics.
unsafe impl Send for RingReader {}

impl RingReader {
    /// Maps `ring`, whose data area is `size` bytes (a power of two and a
    /// multiple of the page size, as the kernel requires of every ring).
    pub fn new(ring: impl AsFd, size: u32) -> io::Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .map_err(|_| io::Error::other("no page size"))?;
        let size = size as usize;
        if !size.is_power_of_two() || !size.is_multiple_of(page) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a ring of {size} bytes is not a power of two of whole pages"),
            ));
        }
        let consumer_len = NonZeroUsize::new(page).expect("a page is not empty");
        let producer_len = NonZeroUsize::new(page + 2 * size).expect("not empty");
        // SAFETY: a new shared mapping of the ring's consumer page, which
        // the kernel lets the map's holder map read-write; unmapped on drop.
        let consumer = unsafe {
            mmap(
                None,
                consumer_len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                ring.as_fd(),
                0,
            )
        }?;
        // SAFETY: as above, read-only: the producer page and the data pages
        // the kernel maps twice.
        let producer = unsafe {
            mmap(
                None,
                producer_len,
                ProtFlags::PROT_READ,
                MapFlags::MAP_SHARED,
                ring.as_fd(),
                page as i64,
            )
        };
        let producer = match producer {
            Ok(producer) => producer,
            Err(error) => {
                // SAFETY: the consumer mapping just made, used by nothing.
                let _ = unsafe { munmap(consumer, page) };
                return Err(error.into());
            }
        };
        let mut reader = Self {
            consumer,
            producer,
            page,
            size,
            pos: 0,
            producer_pos: 0,
            head_len: None,
            moved: false,
        };
        reader.pos = reader.consumer_word().load(Ordering::Acquire);
        reader.producer_pos = reader.pos;
        Ok(reader)
    }

    fn consumer_word(&self) -> &AtomicUsize {
        // SAFETY: the consumer page is mapped for the life of `self` and
        // starts with the kernel's aligned, word-sized consumer position.
        unsafe { self.consumer.cast::<AtomicUsize>().as_ref() }
    }

    fn load_producer(&self) -> usize {
        // SAFETY: as above, for the producer page.
        unsafe { self.producer.cast::<AtomicUsize>().as_ref() }.load(Ordering::Acquire)
    }

    fn data(&self) -> *const u8 {
        // SAFETY: the data pages follow the producer page in the mapping.
        unsafe { self.producer.as_ptr().cast::<u8>().add(self.page) }
    }

    /// The next committed record, left in the ring: `peek` returns it
    /// again until [`release`](Self::release). `None`: the ring is empty,
    /// or its next record is still being written.
    pub fn peek(&mut self) -> Option<&[u8]> {
        loop {
            if self.pos == self.producer_pos {
                if self.moved {
                    atomic::fence(Ordering::SeqCst);
                    self.moved = false;
                }
                self.producer_pos = self.load_producer();
                if self.pos == self.producer_pos {
                    return None;
                }
            }
            let offset = self.pos & (self.size - 1);
            // SAFETY: `offset` lies within the data pages and every record
            // starts 8-aligned with its 4-byte length word, which the
            // producer commits with a fully ordered exchange: the Acquire
            // load pairs with it, so the record's bytes are visible.
            let word =
                unsafe { &*self.data().add(offset).cast::<AtomicU32>() }.load(Ordering::Acquire);
            if word & BUSY_BIT != 0 {
                if !self.moved {
                    return None;
                }
                atomic::fence(Ordering::SeqCst);
                self.moved = false;
                continue;
            }
            let len = (word & !(BUSY_BIT | DISCARD_BIT)) as usize;
            // The kernel never writes a record longer than its ring; one
            // that claimed to would leave the mapping, so it stays unread
            // (the ring's fill gauge then shows it stuck).
            if HEADER + len > self.size {
                return None;
            }
            if word & DISCARD_BIT != 0 {
                self.advance(len);
                continue;
            }
            self.head_len = Some(len);
            // SAFETY: the record lies within the data pages, which are
            // mapped twice in a row, so even a record that wraps around the
            // end is contiguous; the producer does not reuse it before the
            // consumer position passes it.
            return Some(unsafe {
                std::slice::from_raw_parts(self.data().add(offset + HEADER), len)
            });
        }
    }

    /// Gives the record `peek` returned back to the kernel.
    pub fn release(&mut self) {
        if let Some(len) = self.head_len.take() {
            self.advance(len);
        }
    }

    fn advance(&mut self, len: usize) {
        self.pos += (HEADER + len).next_multiple_of(8);
        // Publishes the position after the record was read; the kernel
        // pairs this with an Acquire load before reusing its storage.
        self.consumer_word().store(self.pos, Ordering::Release);
        self.moved = true;
        self.head_len = None;
    }
}

impl Drop for RingReader {
    fn drop(&mut self) {
        // SAFETY: the mappings made in `new`, of these lengths, referred to
        // by nothing any more.
        unsafe {
            let _ = munmap(self.consumer, self.page);
            let _ = munmap(self.producer, self.page + 2 * self.size);
        }
    }
}

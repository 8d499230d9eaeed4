//! TCP segments as the flow shards take them: the payload is copied once
//! out of the kernel ring into large shared buffers.

use bytes::{Bytes, BytesMut};

use crate::{
    arena::{Arena, CHUNK},
    flow::{
        ifaces::IfaceId,
        model::{Direction, FlowKey},
    },
};

/// One mirrored TCP segment.
#[derive(Debug, Clone)]
pub struct Segment {
    /// The connection's client-to-server tuple, whichever way the segment
    /// went.
    pub flow: FlowKey,
    /// Which way it went.
    pub dir: Direction,
    pub seq: u32,
    /// The ACK number: meaningful when `flags` has ACK.
    pub ack: u32,
    pub flags: TcpFlags,
    pub payload: Bytes,
    /// The record was cut at the snap length: `payload` lacks bytes the
    /// connection carried.
    pub truncated: bool,
    /// The interface it came through.
    pub iface: IfaceId,
}

bitflags::bitflags! {
    /// TCP flag bits, as in the header's flags byte.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct TcpFlags: u8 {
        const FIN = 0x01;
        const SYN = 0x02;
        const RST = 0x04;
        const PSH = 0x08;
        const ACK = 0x10;
        const URG = 0x20;
        const ECE = 0x40;
        const CWR = 0x80;
    }
}

/// tcpdump's notation: `S` SYN, `F` FIN, `R` RST, `P` PSH, `U` URG,
/// `E` ECE, `W` CWR, `.` ACK; e.g. `S.` for SYN-ACK.
impl std::fmt::Display for TcpFlags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const ORDER: [(TcpFlags, char); 8] = [
            (TcpFlags::SYN, 'S'),
            (TcpFlags::FIN, 'F'),
            (TcpFlags::RST, 'R'),
            (TcpFlags::PSH, 'P'),
            (TcpFlags::URG, 'U'),
            (TcpFlags::ECE, 'E'),
            (TcpFlags::CWR, 'W'),
            (TcpFlags::ACK, '.'),
        ];
        if self.is_empty() {
            return f.write_str("none");
        }
        for (bit, letter) in ORDER {
            if self.contains(bit) {
                write!(f, "{letter}")?;
            }
        }
        Ok(())
    }
}

/// Copies payloads out of the ring, once each.
///
/// Small payloads go into large shared buffers and come out as slices of
/// them, so that a small packet costs a copy and no allocation of its own;
/// a slice keeps its whole buffer alive, so a small segment held for long
/// (out of order, or waiting for its SYN) is copied out first
/// ([`crate::flow::reassembly::detach`]). Payloads of [`OWN_ALLOCATION`] bytes
/// or more (GRO/GSO super-packets) get an allocation of their own: one
/// allocation beside a copy of 16 to 64 KiB costs little, and such a
/// segment can then be held as it is, pinning only itself (copying every
/// held super-packet out of a shared buffer cost a quarter of the shards'
/// time on bulk traffic, whose segments arrive out of order across CPU
/// rings all the time).
///
/// With an [`Arena`], every payload goes into the arena's chunks instead
/// (large ones too: a local client then reads them where they are, and a
/// held one pins its chunk only until the hole before it fills or times
/// out); when no chunk is free, the payload is copied as without an arena
/// and counted ([`Arena::count_fallback`]). Never a wait.
pub struct PayloadPool {
    buffer: BytesMut,
    buffer_size: usize,
    arena: Option<ArenaFill>,
}

/// The chunk a pool fills: a [`Bytes`] over all of it (payloads are slices
/// of it) and where the next payload goes.
struct ArenaFill {
    arena: Arena,
    chunk: Option<(Bytes, *mut u8)>,
    filled: usize,
}

// SAFETY: the raw pointer points into the chunk that `chunk.0` owns, which
// this pool alone writes.
unsafe impl Send for ArenaFill {}

impl ArenaFill {
    fn copy(&mut self, payload: &[u8]) -> Option<Bytes> {
        if payload.len() > CHUNK {
            return None;
        }
        // The copy starts at the source's offset within a cache line:
        // `memcpy` (rep movsb) between buffers aligned alike ran 1.2 to 1.5
        // times as fast on this machine's EPYC as between buffers that are
        // not, for up to 63 bytes of padding.
        let align = |filled: usize, start: *mut u8| {
            let skew = (payload.as_ptr() as usize).wrapping_sub(start as usize + filled) % 64;
            filled + skew
        };
        if let Some((_, start)) = &self.chunk {
            self.filled = align(self.filled, *start).min(CHUNK);
        }
        if self.chunk.is_none() || CHUNK - self.filled < payload.len() {
            // The old chunk is free once the slices handed out are gone.
            self.chunk = None;
            let chunk = self.arena.lease()?;
            let start = chunk.as_mut_ptr();
            self.chunk = Some((chunk.into_bytes(), start));
            self.filled = align(0, start);
            if CHUNK - self.filled < payload.len() {
                // Too large to be skewed: the padding would push its end
                // into the next chunk, another pool's.
                self.filled = 0;
            }
        }
        let (whole, start) = self.chunk.as_ref().expect("a chunk was just leased");
        // SAFETY: `filled..filled + len` is inside the chunk (checked above)
        // and no slice covering it was handed out yet.
        unsafe {
            std::ptr::copy_nonoverlapping(payload.as_ptr(), start.add(self.filled), payload.len());
        }
        let slice = whole.slice(self.filled..self.filled + payload.len());
        self.filled += payload.len();
        Some(slice)
    }
}

impl PayloadPool {
    pub const DEFAULT_BUFFER: usize = 1 << 20;

    pub fn new(buffer_size: usize) -> Self {
        Self {
            buffer: BytesMut::new(),
            buffer_size,
            arena: None,
        }
    }

    /// A pool that fills chunks of `arena`.
    pub fn with_arena(arena: Arena) -> Self {
        Self {
            arena: Some(ArenaFill {
                arena,
                chunk: None,
                filled: 0,
            }),
            ..Self::default()
        }
    }

    pub fn copy(&mut self, payload: &[u8]) -> Bytes {
        if payload.is_empty() {
            return Bytes::new();
        }
        if let Some(fill) = &mut self.arena {
            match fill.copy(payload) {
                Some(bytes) => return bytes,
                None => fill.arena.count_fallback(),
            }
        }
        if payload.len() >= OWN_ALLOCATION {
            return Bytes::copy_from_slice(payload);
        }
        if self.buffer.capacity() - self.buffer.len() < payload.len() {
            self.buffer = BytesMut::with_capacity(self.buffer_size.max(payload.len()));
        }
        self.buffer.extend_from_slice(payload);
        self.buffer.split().freeze()
    }
}

/// Payloads at least this large get an allocation of their own
/// ([`PayloadPool`]).
pub const OWN_ALLOCATION: usize = 16 << 10;

impl Default for PayloadPool {
    fn default() -> Self {
        Self::new(Self::DEFAULT_BUFFER)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_slices_share_a_buffer_and_keep_their_bytes() {
        let mut pool = PayloadPool::new(16);
        let a = pool.copy(b"hello");
        let b = pool.copy(b"world!");
        let c = pool.copy(b"this is longer than the buffer");
        assert_eq!(&a[..], b"hello");
        assert_eq!(&b[..], b"world!");
        assert_eq!(&c[..], b"this is longer than the buffer");
        // a and b are neighbours in one allocation.
        assert_eq!(a.as_ptr().wrapping_add(5), b.as_ptr());
        assert!(pool.copy(b"").is_empty());
    }

    #[test]
    fn large_payloads_get_an_allocation_of_their_own() {
        let mut pool = PayloadPool::default();
        let before = pool.copy(b"small");
        let large = vec![7u8; OWN_ALLOCATION];
        let own = pool.copy(&large);
        let after = pool.copy(b"small again");
        assert_eq!(&own[..], &large[..]);
        // The shared buffer went on right after the first small payload.
        assert_eq!(before.as_ptr().wrapping_add(before.len()), after.as_ptr());
        let buffer =
            before.as_ptr() as usize..before.as_ptr() as usize + PayloadPool::DEFAULT_BUFFER;
        assert!(!buffer.contains(&(own.as_ptr() as usize)));
    }

    #[test]
    fn with_an_arena_payloads_fill_its_chunks_then_fall_back_to_the_heap() {
        let arena = Arena::new(2 * CHUNK).unwrap();
        let mut pool = PayloadPool::with_arena(arena.clone());
        let large = vec![9u8; 60_000];
        // Each copy is aligned as its source within a cache line, right
        // after the one before.
        let small = b"small";
        let at = |bytes: &Bytes| arena.offset_of(bytes).unwrap() as usize;
        let first = pool.copy(small);
        let second = pool.copy(&large);
        assert_eq!(at(&first) % 64, small.as_ptr() as usize % 64);
        assert_eq!(at(&second) % 64, large.as_ptr() as usize % 64);
        assert!(at(&first) < 64 && (at(&first) + 5..at(&first) + 69).contains(&at(&second)));
        assert_eq!(&second[..], &large[..]);
        // Fill both chunks; then no chunk is free while slices live.
        let mut kept = vec![first, second];
        while arena.counters().fallback_payloads == 0 {
            kept.push(pool.copy(&large));
        }
        let fallen = kept.pop().unwrap();
        assert_eq!(&fallen[..], &large[..]);
        assert_eq!(arena.offset_of(&fallen), None);
        assert_eq!(arena.counters().in_use_bytes, 2 * CHUNK as u64);
        // Every byte handed out is still what was copied in.
        assert!(kept[1..].iter().all(|b| b[..] == large[..]));
        assert_eq!(&kept[0][..], b"small");
        // Once the slices are gone, the chunks come back (the pool let go
        // of its full chunk when it found no other).
        drop(kept);
        assert_eq!(arena.counters().in_use_bytes, 0);
        let again = pool.copy(&large);
        assert!(arena.offset_of(&again).is_some());
        assert!(pool.copy(&vec![1u8; CHUNK + 1]).len() == CHUNK + 1);
    }

    #[test]
    fn flag_notation_matches_tcpdump() {
        assert_eq!((TcpFlags::SYN | TcpFlags::ACK).to_string(), "S.");
        assert_eq!((TcpFlags::FIN | TcpFlags::ACK).to_string(), "F.");
        assert_eq!(TcpFlags::RST.to_string(), "R");
        assert_eq!(TcpFlags::empty().to_string(), "none");
    }

    #[test]
    fn a_payload_of_almost_a_chunk_stays_inside_its_chunk() {
        let arena = Arena::new(2 * CHUNK).unwrap();
        let mut pool = PayloadPool::with_arena(arena.clone());
        // The pool gets chunk 0, whose neighbour the test holds.
        let first = arena.lease().unwrap();
        let neighbour = arena.lease().unwrap();
        drop(first);
        // SAFETY: the test's own lease, written before anyone reads it.
        unsafe { std::ptr::write_bytes(neighbour.as_mut_ptr(), 0xAA, 64) };
        // A source 32 bytes past a cache line: the pool would like to skew
        // its copy by as much.
        let source = vec![7u8; CHUNK + 64];
        let skew = (32 + 64 - source.as_ptr() as usize % 64) % 64;
        let payload = &source[skew..skew + CHUNK - 16];
        let copied = pool.copy(payload);
        assert_eq!(
            arena.offset_of(&copied).map(|at| at as usize / CHUNK),
            Some(0)
        );
        assert!(copied.iter().all(|&b| b == 7));
        assert!(
            neighbour.as_ref()[..64].iter().all(|&b| b == 0xAA),
            "the copy ran into the neighbouring chunk"
        );
    }
}

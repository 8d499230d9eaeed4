//! TCP segments as the flow shards take them: the payload is copied once
//! out of the kernel ring into large shared buffers.

use bytes::{Bytes, BytesMut};

use crate::flow::model::{Direction, FlowKey};

/// One mirrored TCP segment.
#[derive(Debug, Clone)]
pub struct Segment {
    /// The connection's client-to-server tuple, whichever way the segment
    /// went.
    pub flow: FlowKey,
    /// Which way it went.
    pub dir: Direction,
    pub seq: u32,
    pub flags: TcpFlags,
    pub payload: Bytes,
    /// The record was cut at the snap length: `payload` lacks bytes the
    /// connection carried.
    pub truncated: bool,
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
pub struct PayloadPool {
    buffer: BytesMut,
    buffer_size: usize,
}

impl PayloadPool {
    pub const DEFAULT_BUFFER: usize = 1 << 20;

    pub fn new(buffer_size: usize) -> Self {
        Self {
            buffer: BytesMut::new(),
            buffer_size,
        }
    }

    pub fn copy(&mut self, payload: &[u8]) -> Bytes {
        if payload.is_empty() {
            return Bytes::new();
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
    fn flag_notation_matches_tcpdump() {
        assert_eq!((TcpFlags::SYN | TcpFlags::ACK).to_string(), "S.");
        assert_eq!((TcpFlags::FIN | TcpFlags::ACK).to_string(), "F.");
        assert_eq!(TcpFlags::RST.to_string(), "R");
        assert_eq!(TcpFlags::empty().to_string(), "none");
    }
}

//! Writing one record (header + packet bytes) into this CPU's ring.
//!
//! `bpf_ringbuf_reserve` only takes a size the verifier knows as a constant,
//! so a record is reserved in the smallest power-of-two size class that
//! holds the packet, and the packet is copied straight from the skb / XDP
//! buffer into the reserved space: one copy, no per-CPU scratch buffer.
//! The unused tail of a class costs ring space, not copying.

use aya_ebpf::{
    btf_maps::RingBuf, helpers::generated::bpf_ringbuf_query, maps::ring_buf::RingBufBytes,
};
use mirror_common::{Counter, MAX_SNAPLEN, RECORD_HEADER_LEN, RecordHeader};

use crate::packet::Packet;

const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;
/// Bytes in a ring's record header (`BPF_RINGBUF_HDR_SZ`).
const RINGBUF_HDR: u64 = 8;

/// Wakes the reader only when this record makes the unread data cross
/// `MIRROR_WAKEUP_BYTES`; below it, the reader's own timer picks records
/// up. Without this the kernel wakes the reader for every record whenever
/// the reader keeps up, one interrupt and one context switch per packet.
/// 0 keeps the kernel's default (wake when the reader had caught up).
#[inline(always)]
fn wakeup_flags(ring: &Ring, reserved: usize) -> u64 {
    // SAFETY: a plain read of a global the loader may have rewritten.
    let watermark = unsafe { core::ptr::read_volatile(&crate::MIRROR_WAKEUP_BYTES) };
    if watermark == 0 {
        return 0;
    }
    // SAFETY: `ring` is the map pointer the ring array lookup returned (the
    // BTF map type has no `query` wrapper in aya-ebpf 0.2).
    let after = unsafe {
        bpf_ringbuf_query(
            core::ptr::from_ref(ring).cast_mut().cast(),
            BPF_RB_AVAIL_DATA,
        )
    };
    let before = after.saturating_sub(reserved as u64 + RINGBUF_HDR);
    if before < watermark && after >= watermark {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

/// Size of the ring template in the object. The rings the loader creates
/// may have any size: the kernel does not compare ring sizes of inner maps.
const RING_TEMPLATE_BYTES: usize = 1 << 16;

/// One CPU's ring.
pub type Ring = RingBuf<u8, RING_TEMPLATE_BYTES>;

/// Writes `header` and its `cap_len` first packet bytes into `ring`.
/// `header.cap_len` is in `1..=MAX_SNAPLEN`.
#[inline(always)]
pub fn emit<P: Packet>(ring: &Ring, pkt: &P, header: &RecordHeader) -> Result<(), Counter> {
    const _: () = assert!(MAX_SNAPLEN as usize == TOP_CLASS);
    match header.cap_len {
        0..=64 => emit_in::<P, 64>(ring, pkt, header),
        65..=128 => emit_in::<P, 128>(ring, pkt, header),
        129..=256 => emit_in::<P, 256>(ring, pkt, header),
        257..=512 => emit_in::<P, 512>(ring, pkt, header),
        513..=1024 => emit_in::<P, 1024>(ring, pkt, header),
        1025..=2048 => emit_in::<P, 2048>(ring, pkt, header),
        2049..=4096 => emit_in::<P, 4096>(ring, pkt, header),
        4097..=8192 => emit_in::<P, 8192>(ring, pkt, header),
        8193..=16384 => emit_in::<P, 16384>(ring, pkt, header),
        16385..=32768 => emit_in::<P, 32768>(ring, pkt, header),
        // cap_len - COPY_SPLIT is in 1..=32768.
        32769..=65536 => emit_split::<P, 65536, { (1 << 15) - 1 }, 0>(ring, pkt, header),
        // cap_len - COPY_SPLIT is in 32769..=32800.
        _ => emit_split::<P, TOP_CLASS, { TOP_TAIL as u32 - 1 }, { 1 << 15 }>(ring, pkt, header),
    }
}

/// Most bytes one `bpf_xdp_load_bytes` call copies is 0xffff (kernel
/// `bpf_xdp_pointer`); longer packets (lo's MTU is 64 KiB) are copied in
/// two calls, the first of this size.
const COPY_SPLIT: usize = 1 << 15;
/// The largest class: any IP packet behind Ethernet and two VLAN tags.
const TOP_TAIL: usize = 32;
const TOP_CLASS: usize = (1 << 16) + TOP_TAIL;

/// Emits into a record with room for `N` packet bytes, `N` a power of two
/// of at most [`COPY_SPLIT`], copied in one call.
#[inline(always)]
fn emit_in<P: Packet, const N: usize>(
    ring: &Ring,
    pkt: &P,
    header: &RecordHeader,
) -> Result<(), Counter> {
    const { assert!(N.is_power_of_two() && N <= COPY_SPLIT) };
    let Some(mut record) = ring.reserve_bytes(RECORD_HEADER_LEN + N, 0) else {
        return Err(Counter::RingFull);
    };
    let base = record.as_mut_ptr();
    // Equal to cap_len (which the caller keeps in the class), written as a
    // mask so that the verifier can prove 1 <= len <= N: LLVM moves a
    // comparison away from the register the helper gets.
    let len = (header.cap_len.wrapping_sub(1) & (N as u32 - 1)) + 1;
    // SAFETY: the reservation holds the header and N >= len packet bytes.
    let copied = unsafe {
        base.cast::<RecordHeader>().write(*header);
        pkt.load_bytes(0, base.add(RECORD_HEADER_LEN).cast(), len)
    };
    finish(ring, record, copied, RECORD_HEADER_LEN + N)
}

/// Emits a packet longer than [`COPY_SPLIT`] into a record with room for
/// `N` bytes: [`COPY_SPLIT`] bytes, then `((cap_len - 1) & REST_MASK) + 1 +
/// REST_BASE` more, which equals the rest for the cap_len of this class and
/// is provably inside the reservation.
#[inline(always)]
fn emit_split<P: Packet, const N: usize, const REST_MASK: u32, const REST_BASE: u32>(
    ring: &Ring,
    pkt: &P,
    header: &RecordHeader,
) -> Result<(), Counter> {
    const { assert!(REST_BASE as usize + REST_MASK as usize + 1 + COPY_SPLIT <= N) };
    let Some(mut record) = ring.reserve_bytes(RECORD_HEADER_LEN + N, 0) else {
        return Err(Counter::RingFull);
    };
    let base = record.as_mut_ptr();
    let rest = (header.cap_len.wrapping_sub(1) & REST_MASK) + 1 + REST_BASE;
    // SAFETY: header, COPY_SPLIT and rest bytes all lie inside the
    // reservation (checked at compile time above).
    let copied = unsafe {
        base.cast::<RecordHeader>().write(*header);
        let dst = base.add(RECORD_HEADER_LEN);
        pkt.load_bytes(0, dst.cast(), COPY_SPLIT as u32)
            && pkt.load_bytes(COPY_SPLIT as u32, dst.add(COPY_SPLIT).cast(), rest)
    };
    finish(ring, record, copied, RECORD_HEADER_LEN + N)
}

#[inline(always)]
fn finish(
    ring: &Ring,
    record: RingBufBytes<'_>,
    copied: bool,
    reserved: usize,
) -> Result<(), Counter> {
    if copied {
        record.submit(wakeup_flags(ring, reserved));
        Ok(())
    } else {
        record.discard(0);
        Err(Counter::CopyFailed)
    }
}

//! Plain data shared by the kernel programs (`mirror-ebpf`) and userspace
//! (`mirror-user`): names of programs, maps and globals, the ring record
//! header, counter indices and limits.
//!
//! Everything that crosses the kernel boundary is `#[repr(C)]`, `Copy` and
//! made of fixed-width integers, so that any bit pattern the kernel writes is
//! a valid value on the user side.
#![no_std]

use core::mem::size_of;

/// XDP entry point (function name in `mirror-ebpf`).
pub const PROG_XDP: &str = "mirror_xdp";
/// TC (clsact ingress / TCX ingress) entry point.
pub const PROG_TC: &str = "mirror_tc";
/// TC egress (clsact egress / TCX egress) entry point: the server's
/// answers (`--directions both`). At most 15 bytes, the kernel's limit on
/// program names, so that the name a filter shows is this one whole.
pub const PROG_TC_EGRESS: &str = "mirror_egress";
const _: () = assert!(PROG_TC_EGRESS.len() <= 15);

/// `Array<u8, 65536>`: a non-zero value at index P mirrors TCP packets whose
/// destination port is P (at ingress, the client's) or, at egress, whose
/// source port is P (the server's answers).
pub const MAP_PORTS: &str = "MIRROR_PORTS";
/// `ArrayOfMaps<RingBuf>`: one BPF ring buffer per CPU, indexed by CPU id.
pub const MAP_RINGS: &str = "MIRROR_RINGS";
/// `PerCpuArray<u64, COUNTER_COUNT>`: outcome counters, see [`Counter`].
pub const MAP_COUNTERS: &str = "MIRROR_COUNTERS";
/// `LruHashMap<LostFlow, u64>`: flows that lost a packet with payload (or
/// SYN/FIN/RST) to a full ring, with the count. Userspace takes the entries
/// out and closes those connections as `gap`.
pub const MAP_LOST_FLOWS: &str = "MIRROR_LOST";
/// Entries of [`MAP_LOST_FLOWS`]; the least recently updated go first.
pub const LOST_FLOWS_CAPACITY: u32 = 16384;
/// Read-only global (`.rodata`): bytes of each packet copied into the ring.
pub const GLOBAL_SNAPLEN: &str = "MIRROR_SNAPLEN";
/// Read-only global: unread bytes in a ring at which the kernel wakes its
/// reader (0: the kernel's default, wake whenever the reader caught up).
pub const GLOBAL_WAKEUP_BYTES: &str = "MIRROR_WAKEUP_BYTES";
/// Read-only global: percentage (1..=100) of connections mirrored, chosen
/// by [`LostFlow::sample_hash`]; 100 mirrors all without hashing.
pub const GLOBAL_SAMPLE_PERCENT: &str = "MIRROR_SAMPLE_PERCENT";
/// Read-only global: seed of [`LostFlow::sample_hash`], random per load so
/// that nobody can pick the source ports of connections the mirror skips.
pub const GLOBAL_SAMPLE_SEED: &str = "MIRROR_SAMPLE_SEED";
/// Read-only globals: where the kernel keeps the network namespace of the
/// interface a packet is on, as byte offsets the loader takes from the
/// kernel's BTF (`struct sk_buff` → `dev`, `struct xdp_buff` → `rxq` →
/// `dev`, `struct net_device` → `nd_net.net`, `struct net` →
/// `net_cookie`). While [`GLOBAL_NETNS_NET_COOKIE`] is 0 the programs do
/// not look, and records carry cookie 0.
pub const GLOBAL_NETNS_SKB_DEV: &str = "MIRROR_NETNS_SKB_DEV";
pub const GLOBAL_NETNS_XDP_RXQ: &str = "MIRROR_NETNS_XDP_RXQ";
pub const GLOBAL_NETNS_RXQ_DEV: &str = "MIRROR_NETNS_RXQ_DEV";
pub const GLOBAL_NETNS_DEV_NET: &str = "MIRROR_NETNS_DEV_NET";
pub const GLOBAL_NETNS_NET_COOKIE: &str = "MIRROR_NETNS_NET_COOKIE";

/// Entries of the port map: every TCP port.
pub const PORT_MAP_LEN: u32 = 1 << 16;
/// Upper bound of the CPU-indexed ring array in the object; the loader
/// shrinks it to the number of CPUs of the machine.
pub const MAX_CPUS: u32 = 4096;
/// Largest number of packet bytes one record carries: 64 KiB + 32, which
/// holds any IP packet (at most 65535 bytes, so also a whole 64 KiB GSO/GRO
/// super-packet) behind an Ethernet header and two VLAN tags. Longer
/// packets (BIG TCP) are truncated and counted.
pub const MAX_SNAPLEN: u32 = (1 << 16) + 32;
const _: () = assert!(MAX_SNAPLEN >= 65535 + 14 + 2 * 4);
const _: () = assert!(MAX_SNAPLEN.is_multiple_of(8));

/// Header of every record in a ring, followed by `cap_len` packet bytes
/// starting at the link-layer (Ethernet) header.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordHeader {
    /// `CLOCK_BOOTTIME` in nanoseconds when the program saw the packet.
    pub ts_ns: u64,
    /// Interface the packet arrived on.
    pub ifindex: u32,
    /// Length of the packet as the kernel held it (a GSO super-packet counts whole).
    pub wire_len: u32,
    /// Packet bytes that follow this header (`min(wire_len, snaplen)`).
    pub cap_len: u32,
    /// CPU whose ring holds the record.
    pub cpu: u32,
    /// [`record_flags`] bits.
    pub flags: u32,
    /// Offset of the IP header from the start of the packet.
    pub l3_offset: u16,
    /// Offset of the TCP header from the start of the packet.
    pub l4_offset: u16,
    /// Cookie of the network namespace of the interface (what
    /// `SO_NETNS_COOKIE` gives a socket there), or 0 when the loader did
    /// not ask for it: with [`Self::ifindex`] it names the interface when
    /// the mirror watches several namespaces, whose indexes may repeat.
    pub netns_cookie: u64,
}

impl RecordHeader {
    /// The header as the kernel lays it out in the ring (native byte order).
    pub fn to_bytes(&self) -> [u8; RECORD_HEADER_LEN] {
        let mut out = [0u8; RECORD_HEADER_LEN];
        out[0..8].copy_from_slice(&self.ts_ns.to_ne_bytes());
        out[8..12].copy_from_slice(&self.ifindex.to_ne_bytes());
        out[12..16].copy_from_slice(&self.wire_len.to_ne_bytes());
        out[16..20].copy_from_slice(&self.cap_len.to_ne_bytes());
        out[20..24].copy_from_slice(&self.cpu.to_ne_bytes());
        out[24..28].copy_from_slice(&self.flags.to_ne_bytes());
        out[28..30].copy_from_slice(&self.l3_offset.to_ne_bytes());
        out[30..32].copy_from_slice(&self.l4_offset.to_ne_bytes());
        out[32..40].copy_from_slice(&self.netns_cookie.to_ne_bytes());
        out
    }

    /// Reads a header laid out as [`Self::to_bytes`] writes it.
    pub fn from_bytes(bytes: &[u8; RECORD_HEADER_LEN]) -> Self {
        let u16_at = |i: usize| u16::from_ne_bytes([bytes[i], bytes[i + 1]]);
        let u32_at =
            |i: usize| u32::from_ne_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let u64_at = |i: usize| {
            let mut word = [0u8; 8];
            word.copy_from_slice(&bytes[i..i + 8]);
            u64::from_ne_bytes(word)
        };
        Self {
            ts_ns: u64_at(0),
            ifindex: u32_at(8),
            wire_len: u32_at(12),
            cap_len: u32_at(16),
            cpu: u32_at(20),
            flags: u32_at(24),
            l3_offset: u16_at(28),
            l4_offset: u16_at(30),
            netns_cookie: u64_at(32),
        }
    }
}

/// Size of [`RecordHeader`] in the ring; packet bytes start right after it.
pub const RECORD_HEADER_LEN: usize = size_of::<RecordHeader>();
const _: () = assert!(RECORD_HEADER_LEN == 40);
// The ring hands out 8-byte aligned records; the packet bytes then start
// 8-byte aligned too.
const _: () = assert!(RECORD_HEADER_LEN.is_multiple_of(8));

/// Key of [`MAP_LOST_FLOWS`]: the client-to-server 4-tuple of a flow, and
/// which direction lost a packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LostFlow {
    /// IPv4 in the first 4 bytes (rest zero), or IPv6.
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    /// Host byte order.
    pub src_port: u16,
    pub dst_port: u16,
    /// 4 or 6.
    pub ip_version: u8,
    /// 1: the lost packet went from the server to the client; 0: from the
    /// client to the server. Not part of [`Self::sample_hash`].
    pub server_to_client: u8,
    pub _pad: [u8; 2],
}

const _: () = assert!(size_of::<LostFlow>() == 40);

impl LostFlow {
    /// A 32-bit hash of the 4-tuple (MurmurHash3 x86_32 over its words:
    /// addresses, then both ports in one word), the same for every packet of
    /// a connection on every CPU. IPv4 hashes only its 4-byte addresses.
    #[inline(always)]
    pub fn sample_hash(&self, seed: u32) -> u32 {
        let word = |bytes: &[u8; 16], i: usize| {
            u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]])
        };
        let ports = (u32::from(self.src_port) << 16) | u32::from(self.dst_port);
        let mut hash = Murmur3(seed);
        if self.ip_version == 6 {
            for i in [0, 4, 8, 12] {
                hash.word(word(&self.src_addr, i));
            }
            for i in [0, 4, 8, 12] {
                hash.word(word(&self.dst_addr, i));
            }
            hash.word(ports);
            hash.finish(36)
        } else {
            hash.word(word(&self.src_addr, 0));
            hash.word(word(&self.dst_addr, 0));
            hash.word(ports);
            hash.finish(12)
        }
    }
}

/// Whether a connection whose [`LostFlow::sample_hash`] is `hash` belongs to
/// a `percent` sample: the hash scaled onto 0..100 (a multiply, no division).
#[inline(always)]
pub const fn in_sample(hash: u32, percent: u32) -> bool {
    ((hash as u64 * 100) >> 32) < percent as u64
}

/// MurmurHash3 x86_32, by words: a few multiplies and rotates per word, no
/// table, no loop the verifier has to bound.
struct Murmur3(u32);

impl Murmur3 {
    #[inline(always)]
    fn word(&mut self, k: u32) {
        let k = k
            .wrapping_mul(0xcc9e_2d51)
            .rotate_left(15)
            .wrapping_mul(0x1b87_3593);
        self.0 = (self.0 ^ k)
            .rotate_left(13)
            .wrapping_mul(5)
            .wrapping_add(0xe654_6b64);
    }

    #[inline(always)]
    fn finish(self, len: u32) -> u32 {
        let mut h = self.0 ^ len;
        h ^= h >> 16;
        h = h.wrapping_mul(0x85eb_ca6b);
        h ^= h >> 13;
        h = h.wrapping_mul(0xc2b2_ae35);
        h ^ (h >> 16)
    }
}

/// Bits of [`RecordHeader::flags`].
pub mod record_flags {
    /// `cap_len < wire_len`: the packet was cut at the snap length.
    pub const TRUNCATED: u32 = 1 << 0;
    /// The network layer is IPv6 (else IPv4).
    pub const IPV6: u32 = 1 << 1;
    /// Seen by the XDP program (else by a TC program).
    pub const XDP: u32 = 1 << 2;
    /// The packet went from the server (the subscribed port is its source)
    /// to the client; else from the client to the server.
    pub const SERVER_TO_CLIENT: u32 = 1 << 3;
    /// Seen by the TC egress program (else at ingress, TC or XDP).
    pub const EGRESS: u32 = 1 << 4;
}

/// Index of each per-CPU counter in [`MAP_COUNTERS`].
///
/// Every packet the program sees moves `Seen` and exactly one of the outcome
/// counters `NotTcp`, `NotSubscribed`, `Unparseable`, `Unsupported`,
/// `Mirrored`, `RingFull`, `CopyFailed`, `NotSampled`. `Truncated` additionally counts
/// mirrored packets cut at the snap length.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    Seen = 0,
    NotTcp = 1,
    NotSubscribed = 2,
    /// Shorter than its headers claim, or a malformed header.
    Unparseable = 3,
    /// Valid but not followed: IP fragments, IPv6 extension header chains
    /// longer than the program walks.
    Unsupported = 4,
    Mirrored = 5,
    /// The CPU's ring had no room (or no ring exists for the CPU).
    RingFull = 6,
    Truncated = 7,
    /// The kernel refused to copy the packet into its reserved record (a
    /// helper limit the program does not know of: a bug if not 0).
    CopyFailed = 8,
    /// TCP to a mirrored port, of a connection outside the `--sample`.
    NotSampled = 9,
    /// Mirrored while records carry the namespace cookie, but the
    /// interface's namespace could not be read: its record carries 0 (a
    /// bug if not 0).
    NetnsUnknown = 10,
}

/// Number of entries of [`MAP_COUNTERS`].
pub const COUNTER_COUNT: u32 = 11;

impl Counter {
    /// All counters in index order.
    pub const ALL: [Self; COUNTER_COUNT as usize] = [
        Self::Seen,
        Self::NotTcp,
        Self::NotSubscribed,
        Self::Unparseable,
        Self::Unsupported,
        Self::Mirrored,
        Self::RingFull,
        Self::Truncated,
        Self::CopyFailed,
        Self::NotSampled,
        Self::NetnsUnknown,
    ];

    /// Stable snake_case name used in user-facing output.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Seen => "seen",
            Self::NotTcp => "not_tcp",
            Self::NotSubscribed => "not_subscribed",
            Self::Unparseable => "unparseable",
            Self::Unsupported => "unsupported",
            Self::Mirrored => "mirrored",
            Self::RingFull => "ring_full",
            Self::Truncated => "truncated",
            Self::CopyFailed => "copy_failed",
            Self::NotSampled => "not_sampled",
            Self::NetnsUnknown => "netns_unknown",
        }
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: `RecordHeader` and `LostFlow` are `repr(C)`, made only of
    // integers and byte arrays, with padding spelled out (checked by the size
    // assertions above), so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::RecordHeader {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::LostFlow {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_indices_are_dense_and_ordered() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "{} out of place", c.name());
        }
    }

    /// MurmurHash3 x86_32 reference values (seed, input bytes) -> hash.
    #[test]
    fn murmur3_matches_the_reference() {
        let murmur = |seed: u32, words: &[u32]| {
            let mut hash = Murmur3(seed);
            for w in words {
                hash.word(*w);
            }
            hash.finish(4 * words.len() as u32)
        };
        assert_eq!(murmur(0, &[]), 0);
        assert_eq!(murmur(1, &[]), 0x514e_28b7);
        assert_eq!(murmur(0, &[u32::from_le_bytes(*b"test")]), 0xba6b_d213);
        assert_eq!(
            murmur(0x9747_b28c, &[u32::from_le_bytes(*b"aaaa")]),
            0x5a97_808a
        );
    }

    fn v4(src: [u8; 4], dst: [u8; 4], src_port: u16, dst_port: u16) -> LostFlow {
        let mut flow = LostFlow {
            src_port,
            dst_port,
            ip_version: 4,
            ..LostFlow::default()
        };
        flow.src_addr[..4].copy_from_slice(&src);
        flow.dst_addr[..4].copy_from_slice(&dst);
        flow
    }

    #[test]
    fn samples_spread_evenly_over_source_ports() {
        // One client, one server, successive ephemeral ports: the worst
        // case for a weak hash.
        for (seed, percent) in [(0, 10), (7, 50), (0xdead_beef, 25), (1, 1)] {
            let n = 20_000u32;
            let hits = (0..n)
                .filter(|i| {
                    let flow = v4([198, 18, 0, 1], [198, 18, 0, 2], 32768 + *i as u16, 80);
                    in_sample(flow.sample_hash(seed), percent)
                })
                .count() as u32;
            let expected = n * percent / 100;
            let slack = expected / 10 + 20;
            assert!(
                hits.abs_diff(expected) <= slack,
                "seed {seed}, {percent} %: {hits} of {n}"
            );
        }
    }

    #[test]
    fn the_sample_depends_on_every_part_of_the_tuple_and_the_seed() {
        let base = v4([198, 18, 0, 1], [198, 18, 0, 2], 40000, 80);
        let hash = base.sample_hash(3);
        let mut other = base;
        other.dst_port = 81;
        assert_ne!(other.sample_hash(3), hash);
        other = base;
        other.src_addr[3] = 9;
        assert_ne!(other.sample_hash(3), hash);
        other = base;
        other.dst_addr[0] = 10;
        assert_ne!(other.sample_hash(3), hash);
        assert_ne!(base.sample_hash(4), hash);
        let mut v6 = base;
        v6.ip_version = 6;
        assert_ne!(v6.sample_hash(3), hash);
        v6.src_addr[15] = 1;
        assert_ne!(v6.sample_hash(3), base.sample_hash(3));
    }

    #[test]
    fn percent_bounds() {
        assert!(in_sample(u32::MAX, 100));
        assert!(!in_sample(0, 0));
        assert!(in_sample(0, 1));
        assert!(!in_sample(u32::MAX / 100 + 1, 1));
        assert!(in_sample(u32::MAX / 100 - 1, 1));
    }

    #[test]
    fn header_bytes_round_trip() {
        let header = RecordHeader {
            ts_ns: 0x0102_0304_0506_0708,
            ifindex: 7,
            wire_len: 1514,
            cap_len: 128,
            cpu: 3,
            flags: record_flags::TRUNCATED | record_flags::IPV6,
            l3_offset: 22,
            l4_offset: 62,
            netns_cookie: 0x1112_1314_1516_1718,
        };
        assert_eq!(RecordHeader::from_bytes(&header.to_bytes()), header);
        assert_eq!(&header.to_bytes()[28..30], &22u16.to_ne_bytes());
    }

    #[test]
    fn header_field_offsets_match_the_kernel_layout() {
        assert_eq!(core::mem::offset_of!(RecordHeader, ts_ns), 0);
        assert_eq!(core::mem::offset_of!(RecordHeader, ifindex), 8);
        assert_eq!(core::mem::offset_of!(RecordHeader, wire_len), 12);
        assert_eq!(core::mem::offset_of!(RecordHeader, cap_len), 16);
        assert_eq!(core::mem::offset_of!(RecordHeader, cpu), 20);
        assert_eq!(core::mem::offset_of!(RecordHeader, flags), 24);
        assert_eq!(core::mem::offset_of!(RecordHeader, l3_offset), 28);
        assert_eq!(core::mem::offset_of!(RecordHeader, l4_offset), 30);
        assert_eq!(core::mem::offset_of!(RecordHeader, netns_cookie), 32);
    }
}

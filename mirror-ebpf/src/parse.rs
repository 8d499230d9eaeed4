//! Parse-and-filter core shared by the XDP and TC programs:
//! Ethernet → up to two VLAN tags → IPv4 | IPv6 (+ extension headers) → TCP.
//!
//! Offsets always come from the packet (VLAN tags, IPv4 IHL, IPv6 extension
//! header lengths, TCP data offset), never from fixed header sizes.
//!
//! Only the handful of fields the filter needs are read, at their RFC byte
//! offsets; a header-struct crate (network-types) would add enums read from
//! the wire and an API that has changed with every release for six fields.

use mirror_common::Counter;

use crate::packet::Packet;

const ETH_HLEN: usize = 14;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const VLAN_HLEN: usize = 4;
/// 802.1Q and 802.1ad: at most two tags (QinQ).
const MAX_VLAN_TAGS: usize = 2;

const IPPROTO_TCP: u8 = 6;
const IPV4_MIN_HLEN: usize = 20;
/// IPv4 "more fragments" flag and fragment offset.
const IPV4_FRAG_MASK: u16 = 0x3FFF;

const IPV6_HLEN: usize = 40;
const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTH: u8 = 51;
const IPV6_DSTOPTS: u8 = 60;
/// Extension headers walked before giving up (counted as unsupported).
/// Real traffic carries zero or one; each step costs verifier states.
const MAX_IPV6_EXT_HEADERS: usize = 4;

const TCP_MIN_HLEN: usize = 20;

/// Where the headers of a mirrored TCP packet are.
#[derive(Clone, Copy)]
pub struct Parsed {
    pub l3_offset: usize,
    pub l4_offset: usize,
    /// First byte after the TCP header (options included).
    pub l4_end: usize,
    /// End of the IP packet as its header gives it (0: not given, BIG TCP).
    pub ip_end: usize,
    pub src_port: u16,
    pub dst_port: u16,
    pub tcp_flags: u8,
    pub ipv6: bool,
}

impl Parsed {
    /// Whether losing this packet loses part of the stream: it carries
    /// payload, or opens or closes the connection. (Ethernet padding
    /// behind a short frame is not payload, hence the IP length.)
    #[inline(always)]
    pub fn matters_to_the_stream(&self) -> bool {
        const SYN_FIN_RST: u8 = 0x07;
        self.tcp_flags & SYN_FIN_RST != 0 || self.ip_end == 0 || self.ip_end > self.l4_end
    }
}

/// First 14 bytes of a TCP header: ports, sequence numbers, data offset.
#[repr(C)]
#[derive(Clone, Copy)]
struct TcpStart {
    src_port: [u8; 2],
    dst_port: [u8; 2],
    _seq: [u8; 4],
    _ack: [u8; 4],
    data_offset: u8,
    flags: u8,
}

/// First 10 bytes of an IPv4 header, up to the protocol field.
#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Start {
    version_ihl: u8,
    _tos: u8,
    total_len: [u8; 2],
    _id: [u8; 2],
    frag: [u8; 2],
    _ttl: u8,
    protocol: u8,
}

/// Parses `pkt` up to the TCP header. `Err` is the counter of the reason the
/// packet is not a TCP packet this program can follow.
#[inline(always)]
pub fn parse<P: Packet>(pkt: &P) -> Result<Parsed, Counter> {
    let len = pkt.len() as usize;
    let mut proto = be16(pkt.load::<[u8; 2]>(12).ok_or(Counter::Unparseable)?);
    let mut offset = ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if proto != ETH_P_8021Q && proto != ETH_P_8021AD {
            break;
        }
        // The tag's own EtherType follows its 2-byte TCI.
        proto = be16(
            pkt.load::<[u8; 2]>(offset + 2)
                .ok_or(Counter::Unparseable)?,
        );
        offset += VLAN_HLEN;
    }

    let l3_offset = offset;
    let (l4_offset, ip_len, ipv6) = match proto {
        ETH_P_IPV4 => {
            let (l4, total) = ipv4_payload(pkt, l3_offset, len)?;
            (l4, total, false)
        }
        ETH_P_IPV6 => {
            let (l4, payload) = ipv6_payload(pkt, l3_offset, len)?;
            (l4, if payload == 0 { 0 } else { payload + IPV6_HLEN }, true)
        }
        _ => return Err(Counter::NotTcp),
    };

    let tcp = pkt
        .load::<TcpStart>(l4_offset)
        .ok_or(Counter::Unparseable)?;
    let tcp_hlen = usize::from(tcp.data_offset >> 4) * 4;
    let l4_end = l4_offset + tcp_hlen;
    if tcp_hlen < TCP_MIN_HLEN || l4_end > len {
        return Err(Counter::Unparseable);
    }
    Ok(Parsed {
        l3_offset,
        l4_offset,
        l4_end,
        ip_end: if ip_len == 0 { 0 } else { l3_offset + ip_len },
        src_port: be16(tcp.src_port),
        dst_port: be16(tcp.dst_port),
        tcp_flags: tcp.flags,
        ipv6,
    })
}

/// Offset of the TCP header inside the IPv4 packet at `offset`, and the
/// packet's total length.
#[inline(always)]
fn ipv4_payload<P: Packet>(pkt: &P, offset: usize, len: usize) -> Result<(usize, usize), Counter> {
    let ip = pkt.load::<Ipv4Start>(offset).ok_or(Counter::Unparseable)?;
    let ihl = usize::from(ip.version_ihl & 0x0F) * 4;
    if ip.version_ihl >> 4 != 4 || ihl < IPV4_MIN_HLEN || offset + ihl > len {
        return Err(Counter::Unparseable);
    }
    if ip.protocol != IPPROTO_TCP {
        return Err(Counter::NotTcp);
    }
    // A fragment carries a piece of a TCP segment that cannot be placed in
    // the stream on its own; the kernel reassembles later than this hook.
    if be16(ip.frag) & IPV4_FRAG_MASK != 0 {
        return Err(Counter::Unsupported);
    }
    Ok((offset + ihl, usize::from(be16(ip.total_len))))
}

/// Offset of the TCP header inside the IPv6 packet at `offset`, after any
/// hop-by-hop, routing, destination-options, authentication and (atomic)
/// fragment extension headers, and the packet's payload length.
#[inline(always)]
fn ipv6_payload<P: Packet>(pkt: &P, offset: usize, len: usize) -> Result<(usize, usize), Counter> {
    // Version nibble, payload length at byte 4, next header at byte 6.
    let first = pkt.load::<u8>(offset).ok_or(Counter::Unparseable)?;
    let payload_len = usize::from(be16(
        pkt.load::<[u8; 2]>(offset + 4)
            .ok_or(Counter::Unparseable)?,
    ));
    let mut next = pkt.load::<u8>(offset + 6).ok_or(Counter::Unparseable)?;
    if first >> 4 != 6 || offset + IPV6_HLEN > len {
        return Err(Counter::Unparseable);
    }
    let mut offset = offset + IPV6_HLEN;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        let ext_len = match next {
            IPPROTO_TCP => return Ok((offset, payload_len)),
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS => {
                let units = pkt.load::<u8>(offset + 1).ok_or(Counter::Unparseable)?;
                (usize::from(units) + 1) * 8
            }
            IPV6_AUTH => {
                let units = pkt.load::<u8>(offset + 1).ok_or(Counter::Unparseable)?;
                (usize::from(units) + 2) * 4
            }
            IPV6_FRAGMENT => {
                // Offset and M flag zero: an atomic fragment, whole segment.
                let frag = pkt
                    .load::<[u8; 2]>(offset + 2)
                    .ok_or(Counter::Unparseable)?;
                if be16(frag) & 0xFFF9 != 0 {
                    return Err(Counter::Unsupported);
                }
                8
            }
            _ => return Err(Counter::NotTcp),
        };
        next = pkt.load::<u8>(offset).ok_or(Counter::Unparseable)?;
        offset += ext_len;
    }
    match next {
        IPPROTO_TCP => Ok((offset, payload_len)),
        IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS | IPV6_AUTH | IPV6_FRAGMENT => {
            Err(Counter::Unsupported)
        }
        _ => Err(Counter::NotTcp),
    }
}

#[inline(always)]
const fn be16(bytes: [u8; 2]) -> u16 {
    u16::from_be_bytes(bytes)
}

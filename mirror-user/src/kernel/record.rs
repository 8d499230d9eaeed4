//! Decoding ring records: the kernel's fixed header, then the TCP packet
//! behind it (header fields through `etherparse`), then the segment the
//! flow shards take.

use std::net::{IpAddr, SocketAddr};

use etherparse::{Ipv4HeaderSlice, Ipv6HeaderSlice, TcpHeaderSlice};
use mirror_common::{RECORD_HEADER_LEN, RecordHeader, record_flags};

use crate::flow::{
    ifaces::IfaceId,
    model::{Direction, FlowKey},
    segment::{PayloadPool, Segment, TcpFlags},
};

/// Why a record could not be decoded. The kernel writes only well-formed
/// records, so any of these means a bug on one side, not bad traffic.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("record of {0} bytes is shorter than its {RECORD_HEADER_LEN}-byte header")]
    Short(usize),
    #[error("record claims {claimed} packet bytes but holds {held}")]
    Length { claimed: u32, held: usize },
    #[error("record's header offsets (IP at {l3}, TCP at {l4}) lie outside its packet")]
    Offsets { l3: u16, l4: u16 },
    #[error("record's packet has a malformed {layer} header: {reason}")]
    Header { layer: &'static str, reason: String },
}

/// One record read from a ring: the header and the captured packet bytes.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    pub header: RecordHeader,
    /// `header.cap_len` bytes from the start of the link-layer header.
    pub packet: &'a [u8],
}

impl<'a> Record<'a> {
    /// A raw ring record: `header` then `packet` (for tests and benchmarks;
    /// the kernel writes the real ones).
    pub fn encode(header: &RecordHeader, packet: &[u8]) -> Vec<u8> {
        let mut raw = Vec::with_capacity(RECORD_HEADER_LEN + packet.len());
        raw.extend_from_slice(&header.to_bytes());
        raw.extend_from_slice(packet);
        raw
    }

    /// Splits a raw ring record into header and packet bytes.
    pub fn decode(raw: &'a [u8]) -> Result<Self, RecordError> {
        let (head, body) = raw
            .split_first_chunk::<RECORD_HEADER_LEN>()
            .ok_or(RecordError::Short(raw.len()))?;
        let header = RecordHeader::from_bytes(head);
        // The kernel reserves records in size classes: the tail past
        // cap_len is slack, not packet.
        let packet = body
            .get(..header.cap_len as usize)
            .ok_or(RecordError::Length {
                claimed: header.cap_len,
                held: body.len(),
            })?;
        Ok(Self { header, packet })
    }

    /// Whether the packet went from the server (its source port is the
    /// subscribed one) to the client: seen at TC egress.
    pub fn server_to_client(&self) -> bool {
        self.header.flags & record_flags::SERVER_TO_CLIENT != 0
    }

    /// Whether the TC egress program saw the packet (else an ingress one).
    pub fn egress(&self) -> bool {
        self.header.flags & record_flags::EGRESS != 0
    }

    /// Decodes the TCP/IP headers of the packet.
    pub fn tcp(&self) -> Result<TcpPacket<'a>, RecordError> {
        TcpPacket::parse(&self.header, self.packet)
    }

    /// Decodes the packet into a segment, its payload copied into `pool`.
    /// An answer's flow is its connection's client-to-server tuple, so that
    /// both directions land in one shard and one table entry.
    pub fn segment(&self, pool: &mut PayloadPool) -> Result<Segment, RecordError> {
        let tcp = self.tcp()?;
        let truncated = self.header.flags & record_flags::TRUNCATED != 0
            && tcp.payload.len() < tcp.payload_len as usize;
        let (dir, flow) = if self.server_to_client() {
            let flow = FlowKey {
                src: tcp.dst,
                dst: tcp.src,
            };
            (Direction::Server, flow)
        } else {
            let flow = FlowKey {
                src: tcp.src,
                dst: tcp.dst,
            };
            (Direction::Client, flow)
        };
        Ok(Segment {
            flow,
            dir,
            seq: tcp.seq,
            ack: tcp.ack,
            flags: tcp.flags,
            payload: pool.copy(tcp.payload),
            truncated,
            iface: IfaceId {
                netns: self.header.netns_cookie,
                index: self.header.ifindex,
            },
        })
    }
}

/// The fields of a mirrored TCP packet that consumers use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpPacket<'a> {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub seq: u32,
    pub ack: u32,
    pub flags: TcpFlags,
    /// TCP payload length on the wire, captured or not.
    pub payload_len: u32,
    /// The captured part of the payload (shorter when truncated).
    pub payload: &'a [u8],
}

impl<'a> TcpPacket<'a> {
    fn parse(header: &RecordHeader, packet: &'a [u8]) -> Result<Self, RecordError> {
        let offsets = RecordError::Offsets {
            l3: header.l3_offset,
            l4: header.l4_offset,
        };
        let l3 = packet
            .get(header.l3_offset as usize..)
            .ok_or(offsets.clone())?;
        let l4 = packet.get(header.l4_offset as usize..).ok_or(offsets)?;

        // Where the IP packet ends according to its header: Ethernet
        // padding after it is not payload. Zero lengths (BIG TCP, jumbo
        // payload) fall back to the length the kernel saw.
        let (src_ip, dst_ip, ip_end) = if header.flags & record_flags::IPV6 != 0 {
            let ip = Ipv6HeaderSlice::from_slice(l3).map_err(|e| header_error("IPv6", e))?;
            let end = match ip.payload_length() {
                0 => header.wire_len,
                n => u32::from(header.l3_offset) + 40 + u32::from(n),
            };
            (
                IpAddr::V6(ip.source_addr()),
                IpAddr::V6(ip.destination_addr()),
                end,
            )
        } else {
            let ip = Ipv4HeaderSlice::from_slice(l3).map_err(|e| header_error("IPv4", e))?;
            let end = match ip.total_len() {
                0 => header.wire_len,
                n => u32::from(header.l3_offset) + u32::from(n),
            };
            (
                IpAddr::V4(ip.source_addr()),
                IpAddr::V4(ip.destination_addr()),
                end,
            )
        };

        let tcp = TcpHeaderSlice::from_slice(l4).map_err(|e| header_error("TCP", e))?;
        let payload_start = u32::from(header.l4_offset) + tcp.slice().len() as u32;
        let payload_end = ip_end.min(header.wire_len);
        let payload_len = payload_end.saturating_sub(payload_start);
        let captured_end = (payload_end as usize).min(packet.len());
        let payload = packet
            .get(payload_start as usize..captured_end)
            .unwrap_or_default();

        Ok(Self {
            src: SocketAddr::new(src_ip, tcp.source_port()),
            dst: SocketAddr::new(dst_ip, tcp.destination_port()),
            seq: tcp.sequence_number(),
            ack: tcp.acknowledgment_number(),
            // The header's flags byte, bit for bit.
            flags: TcpFlags::from_bits_retain(tcp.slice()[13]),
            payload_len,
            payload,
        })
    }
}

fn header_error(layer: &'static str, error: impl std::fmt::Display) -> RecordError {
    RecordError::Header {
        layer,
        reason: error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use etherparse::PacketBuilder;

    use super::*;

    fn raw_record(header: RecordHeader, packet: &[u8], slack: usize) -> Vec<u8> {
        let mut raw = Record::encode(&header, packet);
        raw.extend(std::iter::repeat_n(0xEE, slack));
        raw
    }

    fn ipv4_frame(payload: &[u8]) -> Vec<u8> {
        let builder = PacketBuilder::ethernet2([1; 6], [2; 6])
            .ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64)
            .tcp(40000, 8080, 1000, 65535)
            .ack(77)
            .psh();
        let mut frame = Vec::new();
        builder.write(&mut frame, payload).unwrap();
        frame
    }

    fn header_for(frame: &[u8], cap_len: u32, flags: u32, l3: u16, l4: u16) -> RecordHeader {
        RecordHeader {
            ts_ns: 123,
            ifindex: 7,
            wire_len: frame.len() as u32,
            cap_len,
            cpu: 1,
            flags,
            l3_offset: l3,
            l4_offset: l4,
            netns_cookie: 0,
        }
    }

    /// The fuzzer's seeds are records as the kernel writes them: when the
    /// header changes they must follow, or the fuzzer starts from records
    /// that never reach the TCP parser.
    #[test]
    fn the_fuzz_seeds_are_well_formed_records() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/ring_records");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("the seeds") {
            let path = entry.expect("a seed").path();
            let raw = std::fs::read(&path).expect("a seed's bytes");
            let record = Record::decode(&raw).unwrap_or_else(|e| panic!("{path:?}: {e}"));
            record
                .tcp()
                .unwrap_or_else(|e| panic!("{path:?} is no TCP packet: {e}"));
            seen += 1;
        }
        assert!(seen >= 4, "{seen} seeds in {dir:?}");
    }

    #[test]
    fn decodes_an_ipv4_record_and_ignores_slack() {
        let frame = ipv4_frame(b"hello");
        let header = header_for(&frame, frame.len() as u32, 0, 14, 34);
        let raw = raw_record(header, &frame, 19);
        let record = Record::decode(&raw).unwrap();
        assert_eq!(record.header, header);
        assert_eq!(record.packet, &frame[..]);

        assert!(!record.server_to_client() && !record.egress());
        let tcp = record.tcp().unwrap();
        assert_eq!(tcp.src, "198.18.0.1:40000".parse().unwrap());
        assert_eq!(tcp.dst, "198.18.0.2:8080".parse().unwrap());
        assert_eq!(tcp.seq, 1000);
        assert_eq!(tcp.ack, 77);
        assert_eq!(tcp.flags.to_string(), "P.");
        assert_eq!(tcp.payload_len, 5);
        assert_eq!(tcp.payload, b"hello");
    }

    #[test]
    fn the_direction_and_hook_bits_are_read() {
        let frame = ipv4_frame(b"answer");
        let flags = record_flags::SERVER_TO_CLIENT | record_flags::EGRESS;
        let header = header_for(&frame, frame.len() as u32, flags, 14, 34);
        let raw = raw_record(header, &frame, 0);
        let record = Record::decode(&raw).unwrap();
        assert!(record.server_to_client() && record.egress());
        assert_eq!(record.tcp().unwrap().payload, b"answer");
        // An answer's segment carries its connection's client-to-server
        // tuple, as the client's segments do.
        let segment = record.segment(&mut PayloadPool::default()).unwrap();
        assert_eq!(segment.dir, Direction::Server);
        assert_eq!(segment.flow.src, "198.18.0.2:8080".parse().unwrap());
        assert_eq!(segment.flow.dst, "198.18.0.1:40000".parse().unwrap());
        assert_eq!(&segment.payload[..], b"answer");
    }

    #[test]
    fn truncated_record_keeps_the_wire_payload_length() {
        let frame = ipv4_frame(&[7; 1000]);
        let cap = 14 + 20 + 20 + 10;
        let header = header_for(&frame, cap, record_flags::TRUNCATED, 14, 34);
        let raw = raw_record(header, &frame[..cap as usize], 0);
        let tcp = Record::decode(&raw).unwrap().tcp().unwrap();
        assert_eq!(tcp.payload_len, 1000);
        assert_eq!(tcp.payload, &[7; 10]);
    }

    #[test]
    fn ethernet_padding_is_not_payload() {
        let mut frame = ipv4_frame(&[]);
        frame.resize(60, 0); // minimum Ethernet frame: 6 bytes of padding
        let header = header_for(&frame, 60, 0, 14, 34);
        let raw = raw_record(header, &frame, 0);
        let tcp = Record::decode(&raw).unwrap().tcp().unwrap();
        assert_eq!(tcp.payload_len, 0);
        assert!(tcp.payload.is_empty());
    }

    #[test]
    fn decodes_ipv6_behind_two_vlan_tags() {
        let builder = PacketBuilder::ethernet2([1; 6], [2; 6])
            .double_vlan(
                etherparse::VlanId::try_new(10).unwrap(),
                etherparse::VlanId::try_new(20).unwrap(),
            )
            .ipv6([0xfe; 16], [0xfd; 16], 64)
            .tcp(1, 2, u32::MAX, 100)
            .syn();
        let mut frame = Vec::new();
        builder.write(&mut frame, &[]).unwrap();
        let header = header_for(&frame, frame.len() as u32, record_flags::IPV6, 22, 62);
        let raw = raw_record(header, &frame, 0);
        let tcp = Record::decode(&raw).unwrap().tcp().unwrap();
        assert_eq!(tcp.src.port(), 1);
        assert_eq!(
            tcp.dst.ip(),
            "fdfd:fdfd:fdfd:fdfd:fdfd:fdfd:fdfd:fdfd"
                .parse::<IpAddr>()
                .unwrap()
        );
        assert_eq!(tcp.seq, u32::MAX);
        assert_eq!(tcp.flags.to_string(), "S");
        assert_eq!(tcp.payload_len, 0);
    }

    #[test]
    fn malformed_records_are_errors_not_panics() {
        assert_eq!(
            Record::decode(&[0; 31]).unwrap_err(),
            RecordError::Short(31)
        );

        let frame = ipv4_frame(b"x");
        let mut header = header_for(&frame, frame.len() as u32 + 1, 0, 14, 34);
        let raw = raw_record(header, &frame, 0);
        assert!(matches!(
            Record::decode(&raw),
            Err(RecordError::Length { .. })
        ));

        header.cap_len = frame.len() as u32;
        header.l4_offset = 2000;
        let raw = raw_record(header, &frame, 0);
        assert!(matches!(
            Record::decode(&raw).unwrap().tcp(),
            Err(RecordError::Offsets { .. })
        ));

        header.l4_offset = 34;
        header.flags = record_flags::IPV6; // an IPv4 packet flagged as IPv6
        let raw = raw_record(header, &frame, 0);
        assert!(matches!(
            Record::decode(&raw).unwrap().tcp(),
            Err(RecordError::Header { layer: "IPv6", .. })
        ));
    }
}

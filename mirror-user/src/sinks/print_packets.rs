//! `--print`: one line per mirrored packet, tcpdump-like text or JSON.

use std::{
    fmt::Write as _,
    io::{self, Write as _},
    time::Duration,
};

use mirror_common::record_flags;
use serde::Serialize;

use crate::{
    flow::{
        ifaces::{IfaceId, IfaceNames},
        model::Iface,
    },
    kernel::clock::WallClock,
    kernel::drain::RecordSink,
    kernel::record::{Record, TcpPacket},
};

/// How packets are written (`--print-packets`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketFormat {
    /// tcpdump-like text.
    Text,
    /// One JSON object per line.
    Json,
}

/// Formats records into a per-task buffer and writes each batch to stdout
/// at once, so lines of different CPUs never interleave mid-line.
pub struct PacketPrinter {
    format: PacketFormat,
    clock: WallClock,
    buffer: Vec<u8>,
    /// With several interfaces: each record's, by index.
    names: Option<IfaceNames>,
    /// The last index looked up, and its name.
    last: (IfaceId, Iface),
}

impl PacketPrinter {
    pub fn new(format: PacketFormat, iface: &str, clock: WallClock) -> Self {
        Self {
            format,
            clock,
            buffer: Vec::with_capacity(64 * 1024),
            names: None,
            last: (IfaceId::default(), Iface::from(iface)),
        }
    }

    /// Names each packet's interface from `names` rather than one name for
    /// all.
    #[must_use]
    pub fn naming(mut self, names: IfaceNames) -> Self {
        self.names = Some(names);
        self
    }

    fn iface_of(&mut self, id: IfaceId) -> Iface {
        if let Some(names) = &self.names
            && (self.last.0 != id || self.last.1.is_empty())
        {
            self.last = (id, names.name(id));
        }
        Iface::clone(&self.last.1)
    }
}

/// A JSON line (`--print json`).
#[derive(Debug, Serialize)]
pub struct PacketLine<'a> {
    pub kind: &'static str,
    pub ts_ns: u64,
    pub iface: &'a str,
    pub ifindex: u32,
    pub cpu: u32,
    pub src: String,
    pub dst: String,
    pub seq: u32,
    pub ack: u32,
    pub flags: String,
    pub payload_len: u32,
    pub wire_len: u32,
    pub cap_len: u32,
    pub truncated: bool,
}

impl<'a> PacketLine<'a> {
    pub fn new(iface: &'a str, ts_ns: u64, record: &Record<'_>, tcp: &TcpPacket<'_>) -> Self {
        let header = &record.header;
        Self {
            kind: "packet",
            ts_ns,
            iface,
            ifindex: header.ifindex,
            cpu: header.cpu,
            src: tcp.src.to_string(),
            dst: tcp.dst.to_string(),
            seq: tcp.seq,
            ack: tcp.ack,
            flags: tcp.flags.to_string(),
            payload_len: tcp.payload_len,
            wire_len: header.wire_len,
            cap_len: header.cap_len,
            truncated: header.flags & record_flags::TRUNCATED != 0,
        }
    }
}

impl RecordSink for PacketPrinter {
    fn record(&mut self, record: &Record<'_>) {
        let tcp = match record.tcp() {
            Ok(tcp) => tcp,
            Err(error) => {
                tracing::warn!("cannot decode a mirrored packet: {error}");
                return;
            }
        };
        let ts_ns = self.clock.unix_ns(record.header.ts_ns);
        let iface = self.iface_of(IfaceId {
            netns: record.header.netns_cookie,
            index: record.header.ifindex,
        });
        match self.format {
            PacketFormat::Json => {
                let line = PacketLine::new(&iface, ts_ns, record, &tcp);
                // Serializing plain fields into a Vec cannot fail.
                let _ = serde_json::to_writer(&mut self.buffer, &line);
                self.buffer.push(b'\n');
            }
            PacketFormat::Text => {
                let mut line = String::with_capacity(128);
                let _ = write!(
                    line,
                    "{} {} {} > {}: Flags [{}], seq {}, ack {}, length {}",
                    time_of_day(ts_ns),
                    iface,
                    tcp.src,
                    tcp.dst,
                    tcp.flags,
                    tcp.seq,
                    tcp.ack,
                    tcp.payload_len
                );
                if record.header.flags & record_flags::TRUNCATED != 0 {
                    line.push_str(" (truncated)");
                }
                line.push('\n');
                self.buffer.extend_from_slice(line.as_bytes());
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let mut out = io::stdout().lock();
        let result = out.write_all(&self.buffer).and_then(|()| out.flush());
        self.buffer.clear();
        result
    }
}

/// Local time of day with microseconds, as tcpdump prints it.
fn time_of_day(unix_ns: u64) -> String {
    let since_epoch = Duration::from_nanos(unix_ns);
    let secs = since_epoch.as_secs() as libc::time_t;
    // SAFETY: zeroed `tm` is a valid out-value; localtime_r is thread-safe.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call.
    let ok = !unsafe { libc::localtime_r(&secs, &mut tm) }.is_null();
    let (h, m, s) = if ok {
        (tm.tm_hour, tm.tm_min, tm.tm_sec)
    } else {
        let day = since_epoch.as_secs() % 86_400;
        (
            (day / 3600) as i32,
            (day / 60 % 60) as i32,
            (day % 60) as i32,
        )
    };
    format!("{h:02}:{m:02}:{s:02}.{:06}", since_epoch.subsec_micros())
}

#[cfg(test)]
mod tests {
    use etherparse::PacketBuilder;
    use mirror_common::RecordHeader;

    use super::*;

    /// With several interfaces, each packet's comes from the names table,
    /// by its record's namespace and index.
    #[test]
    fn packets_name_their_interface_by_namespace_and_index() {
        let names = IfaceNames::default();
        let pod = |netns| IfaceId { netns, index: 2 };
        names.insert(pod(11), "pod1:eth0");
        names.insert(pod(12), "pod2:eth0");
        let mut printer =
            PacketPrinter::new(PacketFormat::Text, "pod1:eth0, pod2:eth0", WallClock::new())
                .naming(names);
        assert_eq!(&*printer.iface_of(pod(12)), "pod2:eth0");
        assert_eq!(&*printer.iface_of(pod(11)), "pod1:eth0");
        assert_eq!(&*printer.iface_of(pod(11)), "pod1:eth0");
        assert_eq!(&*printer.iface_of(IfaceId::index(9)), "");
        let mut single = PacketPrinter::new(PacketFormat::Text, "lo", WallClock::new());
        assert_eq!(&*single.iface_of(IfaceId::index(1)), "lo");
    }

    #[test]
    fn json_line_has_the_documented_keys() {
        let mut frame = Vec::new();
        PacketBuilder::ethernet2([1; 6], [2; 6])
            .ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64)
            .tcp(40000, 8080, 5, 1000)
            .syn()
            .write(&mut frame, &[])
            .unwrap();
        let record = Record {
            header: RecordHeader {
                ts_ns: 1,
                ifindex: 3,
                wire_len: frame.len() as u32,
                cap_len: frame.len() as u32,
                cpu: 0,
                flags: 0,
                l3_offset: 14,
                l4_offset: 34,
                netns_cookie: 0,
            },
            packet: &frame,
        };
        let tcp = record.tcp().unwrap();
        let line = PacketLine::new("veth0", 1_700_000_000_000_000_000, &record, &tcp);
        let json: serde_json::Value = serde_json::to_value(&line).unwrap();
        for key in [
            "ts_ns",
            "iface",
            "src",
            "dst",
            "seq",
            "ack",
            "flags",
            "payload_len",
        ] {
            assert!(!json[key].is_null(), "missing {key}");
        }
        assert_eq!(json["src"], "198.18.0.1:40000");
        assert_eq!(json["dst"], "198.18.0.2:8080");
        assert_eq!(json["flags"], "S");
        assert_eq!(json["seq"], 5);
        assert_eq!(json["iface"], "veth0");
    }

    #[test]
    fn time_of_day_has_microseconds() {
        let text = time_of_day(1_700_000_000_123_456_789);
        assert_eq!(text.len(), "00:00:00.123456".len());
        assert!(text.ends_with(".123456"), "{text}");
    }
}

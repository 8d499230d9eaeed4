//! `--print`: one line per stream event, text or JSON; `mirror tail`
//! writes its lines with the same [`format_event`].

use std::fmt::Write as _;

use base64::Engine as _;
use serde::Serialize;
use tokio::io::{AsyncWriteExt as _, BufWriter};

use crate::{
    fanout::subscription::Subscription,
    flow::model::{CloseReason, Direction, StreamEvent},
    text::printable,
};

/// Bytes of payload shown in a text line.
const TEXT_PREVIEW: usize = 64;

/// JSON form of an event (`--print json`).
#[derive(Debug, Serialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum EventLine<'a> {
    Opened {
        conn: u64,
        src: String,
        dst: String,
        midstream: bool,
        /// The interface the connection came through (`NETNS:IF` in
        /// another namespace); empty when not known.
        iface: &'a str,
    },
    Data {
        conn: u64,
        /// `"client"`, or `"server"` for the server's bytes
        /// (`--directions both`).
        dir: &'static str,
        /// Bytes of the other direction's stream its sender had
        /// acknowledged when these were delivered (0 when not known).
        peer_acked: u64,
        len: usize,
        /// Base64 (standard alphabet, padded).
        data: String,
    },
    Closed {
        conn: u64,
        reason: &'a str,
    },
}

impl<'a> EventLine<'a> {
    pub fn new(event: &'a StreamEvent) -> Self {
        match event {
            StreamEvent::Opened {
                iface,
                conn,
                src,
                dst,
                midstream,
            } => Self::Opened {
                conn: *conn,
                src: src.to_string(),
                dst: dst.to_string(),
                midstream: *midstream,
                iface,
            },
            StreamEvent::Data {
                peer_acked,
                conn,
                dir,
                bytes,
            } => Self::Data {
                conn: *conn,
                dir: dir.as_str(),
                peer_acked: *peer_acked,
                len: bytes.len(),
                data: base64::engine::general_purpose::STANDARD.encode(bytes),
            },
            StreamEvent::Closed { conn, reason } => Self::Closed {
                conn: *conn,
                reason: reason.as_str(),
            },
        }
    }
}

/// How events are written: `--print` (text or JSON) and `mirror tail
/// --format` (also hex).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrintFormat {
    /// One line per event, data shown as escaped text.
    Text,
    /// One JSON object per line.
    Json,
    /// As text, with each data chunk as a hex dump.
    Hex,
}

/// `xxd`-like lines: offset, 16 bytes in hex, the printable ones as text.
fn hex_dump(bytes: &[u8], out: &mut String) {
    for (row, chunk) in bytes.chunks(16).enumerate() {
        let _ = write!(out, "\n  {:08x}:", row * 16);
        for (i, byte) in chunk.iter().enumerate() {
            if i % 2 == 0 {
                out.push(' ');
            }
            let _ = write!(out, "{byte:02x}");
        }
        // A full row is 8 groups of " xxxx": pad a short one to that width.
        let written = chunk.len() * 2 + chunk.len().div_ceil(2);
        out.extend(std::iter::repeat_n(' ', 40 - written + 2));
        out.extend(chunk.iter().map(|b| {
            if b.is_ascii_graphic() || *b == b' ' {
                *b as char
            } else {
                '.'
            }
        }));
    }
}

/// How a text line marks the direction of bytes: `data > 5 bytes` for the
/// client's, the way of the `>` of the connection's `opened` line, and
/// `data < 5 bytes` for the server's.
const fn marker(dir: Direction) -> &'static str {
    match dir {
        Direction::Client => "> ",
        Direction::Server => "< ",
    }
}

/// Appends the line for `event` (with its newline) to `out`.
pub fn format_event(event: &StreamEvent, format: PrintFormat, out: &mut String) {
    match format {
        PrintFormat::Json => {
            // Serializing strings and numbers cannot fail.
            if let Ok(json) = serde_json::to_string(&EventLine::new(event)) {
                out.push_str(&json);
            }
        }
        PrintFormat::Text | PrintFormat::Hex => match event {
            StreamEvent::Opened {
                iface,
                conn,
                src,
                dst,
                midstream,
            } => {
                let _ = write!(out, "conn {conn} opened {src} > {dst}");
                if !iface.is_empty() {
                    // A namespace's name is a file name: anything but `/`.
                    let _ = write!(out, " on {}", printable(iface));
                }
                if *midstream {
                    out.push_str(" (midstream)");
                }
            }
            StreamEvent::Data {
                peer_acked: _,
                conn,
                dir,
                bytes,
            } if format == PrintFormat::Hex => {
                let _ = write!(
                    out,
                    "conn {conn} data {}{} bytes:",
                    marker(*dir),
                    bytes.len()
                );
                hex_dump(bytes, out);
            }
            StreamEvent::Data {
                peer_acked: _,
                conn,
                dir,
                bytes,
            } => {
                let shown = &bytes[..bytes.len().min(TEXT_PREVIEW)];
                let _ = write!(
                    out,
                    "conn {conn} data {}{} bytes: \"{}\"{}",
                    marker(*dir),
                    bytes.len(),
                    shown.escape_ascii(),
                    if shown.len() < bytes.len() { "..." } else { "" }
                );
            }
            StreamEvent::Closed { conn, reason } => {
                let _ = write!(out, "conn {conn} closed {reason}");
            }
        },
    }
    out.push('\n');
}

/// What a consumer received, for the line `mirror tail` prints at exit
/// (as tcpdump prints what it captured): connections, data, and closes by
/// reason, so that lost streams (`gap`, `lagged`) are never silent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventTotals {
    pub connections: u64,
    pub data_events: u64,
    pub data_bytes: u64,
    pub closed: [u64; CloseReason::ALL.len()],
}

impl EventTotals {
    pub fn count(&mut self, event: &StreamEvent) {
        match event {
            StreamEvent::Opened { .. } => self.connections += 1,
            StreamEvent::Data { bytes, .. } => {
                self.data_events += 1;
                self.data_bytes += bytes.len() as u64;
            }
            StreamEvent::Closed { reason, .. } => {
                if let Some(i) = CloseReason::ALL.iter().position(|r| r == reason) {
                    self.closed[i] += 1;
                }
            }
        }
    }

    pub fn closed(&self, reason: CloseReason) -> u64 {
        CloseReason::ALL
            .iter()
            .position(|r| *r == reason)
            .map_or(0, |i| self.closed[i])
    }
}

impl std::fmt::Display for EventTotals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} connections, {} data events, {} bytes; closed:",
            self.connections, self.data_events, self.data_bytes
        )?;
        for (reason, count) in CloseReason::ALL.iter().zip(self.closed) {
            write!(f, " {reason}={count}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for EventTotals {
    type Err = String;

    /// Reads back what `Display` wrote (scripts and benchmarks read the
    /// line `mirror tail` prints at exit).
    fn from_str(line: &str) -> Result<Self, Self::Err> {
        let bad = || format!("not a totals line: {line:?}");
        let (counts, closes) = line.split_once("; closed:").ok_or_else(bad)?;
        let numbers: Vec<u64> = counts
            .split(", ")
            .map(|part| part.split(' ').next().and_then(|n| n.parse().ok()))
            .collect::<Option<_>>()
            .ok_or_else(bad)?;
        let [connections, data_events, data_bytes] = numbers[..] else {
            return Err(bad());
        };
        let mut totals = Self {
            connections,
            data_events,
            data_bytes,
            ..Self::default()
        };
        for pair in closes.split_whitespace() {
            let (name, count) = pair.split_once('=').ok_or_else(bad)?;
            let i = CloseReason::ALL
                .iter()
                .position(|r| r.as_str() == name)
                .ok_or_else(bad)?;
            totals.closed[i] = count.parse().map_err(|_| bad())?;
        }
        Ok(totals)
    }
}

/// Writes every event of `subscription` to standard output until the mirror
/// stops. Output that cannot keep up makes this consumer lag, never the
/// mirror.
pub async fn print_events(
    mut subscription: Subscription,
    format: PrintFormat,
) -> std::io::Result<()> {
    let mut out = BufWriter::with_capacity(1 << 16, tokio::io::stdout());
    let mut line = String::new();
    while let Some(event) = subscription.next().await {
        line.clear();
        format_event(&event, format, &mut line);
        out.write_all(line.as_bytes()).await?;
        if subscription.queued() == 0 {
            out.flush().await?;
        }
    }
    out.flush().await
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::sinks::test_events::{closed, data, opened, opened_midstream};

    fn line(event: &StreamEvent, format: PrintFormat) -> String {
        let mut out = String::new();
        format_event(event, format, &mut out);
        out
    }

    #[test]
    fn an_opened_connection_names_its_interface() {
        let event = StreamEvent::Opened {
            iface: "pod1:eth0".into(),
            conn: 4,
            src: "198.18.0.1:40000".parse().unwrap(),
            dst: "198.18.0.2:80".parse().unwrap(),
            midstream: false,
        };
        assert_eq!(
            line(&event, PrintFormat::Text),
            "conn 4 opened 198.18.0.1:40000 > 198.18.0.2:80 on pod1:eth0\n"
        );
        let json: serde_json::Value =
            serde_json::from_str(&line(&event, PrintFormat::Json)).unwrap();
        assert_eq!(json["iface"], "pod1:eth0");
        // Unknown: empty, the key always there (README's JSON shape).
        let json = line(
            &opened(
                1,
                "198.18.0.1:40000".parse().unwrap(),
                "198.18.0.2:80".parse().unwrap(),
            ),
            PrintFormat::Json,
        );
        assert!(json.contains("\"iface\":\"\""), "{json}");
    }

    #[test]
    fn totals_count_connections_bytes_and_each_close_reason() {
        let mut totals = EventTotals::default();
        let events = [
            opened(
                1,
                "198.18.0.1:40000".parse().unwrap(),
                "198.18.0.2:80".parse().unwrap(),
            ),
            data(1, b"hello"),
            data(1, b"!"),
            closed(1, CloseReason::Lagged),
        ];
        for event in &events {
            totals.count(event);
        }
        assert_eq!(
            (totals.connections, totals.data_events, totals.data_bytes),
            (1, 2, 6)
        );
        assert_eq!(totals.closed(CloseReason::Lagged), 1);
        assert_eq!(totals.closed(CloseReason::Fin), 0);
        assert_eq!(
            totals.to_string(),
            "1 connections, 2 data events, 6 bytes; closed: fin=0 rst=0 idle=0 gap=0 lagged=1 evicted=0 shutdown=0"
        );
        assert_eq!(totals.to_string().parse(), Ok(totals));
        assert!("3 connections".parse::<EventTotals>().is_err());
    }

    #[test]
    fn json_lines_have_the_documented_keys() {
        let opened = opened_midstream(
            7,
            "198.18.0.1:40000".parse().unwrap(),
            "[2001:db8::2]:80".parse().unwrap(),
        );
        let json: serde_json::Value =
            serde_json::from_str(&line(&opened, PrintFormat::Json)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"event": "opened", "conn": 7, "src": "198.18.0.1:40000",
                               "dst": "[2001:db8::2]:80", "midstream": true, "iface": ""})
        );
        let data = data(7, b"hi\x00");
        let json: serde_json::Value =
            serde_json::from_str(&line(&data, PrintFormat::Json)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"event": "data", "conn": 7, "dir": "client", "peer_acked": 0,
                               "len": 3, "data": "aGkA"})
        );
        let answer = StreamEvent::Data {
            peer_acked: 3,
            conn: 7,
            dir: Direction::Server,
            bytes: Bytes::from_static(b"ok"),
        };
        let json: serde_json::Value =
            serde_json::from_str(&line(&answer, PrintFormat::Json)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"event": "data", "conn": 7, "dir": "server", "peer_acked": 3,
                               "len": 2, "data": "b2s="})
        );
        assert_eq!(
            line(&answer, PrintFormat::Text),
            "conn 7 data < 2 bytes: \"ok\"\n"
        );
        assert_eq!(
            line(&data, PrintFormat::Text),
            "conn 7 data > 3 bytes: \"hi\\x00\"\n"
        );
        let through = StreamEvent::Opened {
            iface: "ns\u{1b}1:veth0".into(),
            conn: 8,
            src: "198.18.0.1:40000".parse().unwrap(),
            dst: "198.18.0.2:80".parse().unwrap(),
            midstream: false,
        };
        let json: serde_json::Value =
            serde_json::from_str(&line(&through, PrintFormat::Json)).unwrap();
        assert_eq!(json["iface"], "ns\u{1b}1:veth0");
        assert_eq!(
            line(&through, PrintFormat::Text),
            "conn 8 opened 198.18.0.1:40000 > 198.18.0.2:80 on ns\\u{1b}1:veth0\n"
        );
        let closed = closed(7, CloseReason::Lagged);
        let json: serde_json::Value =
            serde_json::from_str(&line(&closed, PrintFormat::Json)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"event": "closed", "conn": 7, "reason": "lagged"})
        );
    }

    #[test]
    fn hex_lines_dump_every_byte() {
        let data = data(2, b"GET / HTTP/1.1\r\nHost: x\r\n");
        let text = line(&data, PrintFormat::Hex);
        assert_eq!(
            text,
            concat!(
                "conn 2 data > 25 bytes:\n",
                "  00000000: 4745 5420 2f20 4854 5450 2f31 2e31 0d0a  GET / HTTP/1.1..\n",
                "  00000010: 486f 7374 3a20 780d 0a                   Host: x..\n",
            )
        );
    }

    #[test]
    fn text_lines_show_a_preview_of_the_data() {
        let data = data(1, b"GET / HTTP/1.1\r\n");
        assert_eq!(
            line(&data, PrintFormat::Text),
            "conn 1 data > 16 bytes: \"GET / HTTP/1.1\\r\\n\"\n"
        );
        let long = StreamEvent::Data {
            peer_acked: 0,
            dir: Default::default(),
            conn: 1,
            bytes: Bytes::from(vec![b'a'; 100]),
        };
        assert!(line(&long, PrintFormat::Text).ends_with("...\n"));
    }
}

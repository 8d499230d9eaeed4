//! Checks on the packets a mirror printed (`--print json`).

use std::collections::BTreeMap;

use serde_json::Value;

/// Payload bytes of each connection to `dst_port`, keyed by source
/// address, counting every sequence number once: retransmitted or
/// overlapping segments are not counted twice.
pub fn unique_payload_by_source(packets: &[Value], dst_port: u16) -> BTreeMap<String, u64> {
    let mut segments: BTreeMap<String, Vec<(u32, u32, bool)>> = BTreeMap::new();
    for packet in packets {
        let dst = packet["dst"].as_str().expect("dst");
        if !dst.ends_with(&format!(":{dst_port}")) {
            continue;
        }
        let src = packet["src"].as_str().expect("src").to_owned();
        let seq = packet["seq"].as_u64().expect("seq") as u32;
        let len = packet["payload_len"].as_u64().expect("payload_len") as u32;
        let syn = packet["flags"].as_str().expect("flags").contains('S');
        segments.entry(src).or_default().push((seq, len, syn));
    }
    segments
        .into_iter()
        .map(|(src, segs)| (src, covered_bytes(&segs)))
        .collect()
}

/// Bytes covered by the union of `[seq, seq + len)` ranges, sequence
/// numbers taken relative to the SYN (or the first segment) so that a
/// 32-bit wrap inside the connection does not matter.
fn covered_bytes(segments: &[(u32, u32, bool)]) -> u64 {
    let base = segments
        .iter()
        .find(|(_, _, syn)| *syn)
        .map(|(seq, _, _)| seq.wrapping_add(1))
        .or_else(|| segments.iter().map(|(seq, _, _)| *seq).next())
        .unwrap_or(0);
    let mut ranges: Vec<(u64, u64)> = segments
        .iter()
        .filter(|(_, len, _)| *len > 0)
        .map(|(seq, len, _)| {
            let start = u64::from(seq.wrapping_sub(base));
            (start, start + u64::from(*len))
        })
        .collect();
    ranges.sort_unstable();
    let mut total = 0;
    let mut reach = 0;
    for (start, end) in ranges {
        let start = start.max(reach);
        if end > start {
            total += end - start;
            reach = end;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pkt(src: &str, seq: u32, len: u32, flags: &str) -> Value {
        json!({"src": src, "dst": "198.18.0.2:5201", "seq": seq, "payload_len": len, "flags": flags})
    }

    #[test]
    fn retransmissions_and_overlaps_count_once() {
        let packets = [
            pkt("a:1", u32::MAX - 1, 0, "S"),
            pkt("a:1", u32::MAX, 100, "P."),
            pkt("a:1", u32::MAX, 100, "P."), // retransmission
            pkt("a:1", 49, 100, "."),        // overlaps the first, after the wrap
            pkt("b:2", 10, 5, "."),
            json!({"src": "a:1", "dst": "x:80", "seq": 0, "payload_len": 9, "flags": "."}),
        ];
        let counts = unique_payload_by_source(&packets, 5201);
        assert_eq!(counts["a:1"], 100 + 50);
        assert_eq!(counts["b:2"], 5);
        assert_eq!(counts.len(), 2);
    }
}

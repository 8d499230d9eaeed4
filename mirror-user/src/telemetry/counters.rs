//! Counters of every stage, summed over CPUs.

use std::{
    fmt,
    sync::atomic::{AtomicU64, Ordering},
};

use mirror_common::{COUNTER_COUNT, Counter};

use crate::{
    flow::{conntrack::TableStats, model::CloseReason},
    text::printable,
};

/// Most ports a counters document lists (the busiest by bytes); the others
/// are counted in `truncated.ports`.
pub const MAX_LISTED_PORTS: usize = 1024;
/// Most consumers a counters document lists (in-process ones first, then
/// sessions in the order they started); the others are counted in
/// `truncated.consumers`.
///
/// With [`MAX_LISTED_PORTS`] this bounds the document well below a STATS
/// frame ([`crate::server::protocol::MAX_FRAME`]): a port entry is at most about
/// 100 bytes, a consumer entry about 600 (a 64-byte client name of control
/// characters, escaped here and again by JSON), about 240 KiB in all
/// (measured in the tests).
pub const MAX_LISTED_CONSUMERS: usize = 256;

/// Flattens a counters document into `stage.name` keys: `kernel.ring_full`,
/// `connections.closed.gap`, `ports.5201.bytes`, `consumers.print.lags`
/// (arrays of ports and consumers are keyed by port or name; a name is
/// escaped, so that no key holds a line break or a terminal escape).
pub fn flatten(json: &serde_json::Value) -> std::collections::BTreeMap<String, u64> {
    fn walk(
        prefix: &str,
        value: &serde_json::Value,
        out: &mut std::collections::BTreeMap<String, u64>,
    ) {
        match value {
            serde_json::Value::Number(n) => {
                if let Some(n) = n.as_u64() {
                    out.insert(prefix.to_owned(), n);
                }
            }
            serde_json::Value::Object(map) => {
                for (key, value) in map {
                    let name = if prefix.is_empty() {
                        key.clone()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    walk(&name, value, out);
                }
            }
            serde_json::Value::Array(items) => {
                for item in items {
                    let key = item["port"]
                        .as_u64()
                        .map(|p| p.to_string())
                        .or_else(|| item["name"].as_str().map(|n| printable(n).into_owned()))
                        .unwrap_or_default();
                    walk(&format!("{prefix}.{key}"), item, out);
                }
            }
            _ => {}
        }
    }
    let mut counters = std::collections::BTreeMap::new();
    walk("", json, &mut counters);
    counters
}

/// The kernel programs' outcome counters, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelCounters([u64; COUNTER_COUNT as usize]);

impl KernelCounters {
    /// The counters from their sums over CPUs, in index order.
    pub const fn from_sums(sums: [u64; COUNTER_COUNT as usize]) -> Self {
        Self(sums)
    }

    pub const fn get(&self, counter: Counter) -> u64 {
        self.0[counter as usize]
    }

    /// `(name, value)` in index order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Counter::ALL.iter().map(|c| (c.name(), self.get(*c)))
    }

    /// Counts since `earlier` (counters only grow).
    pub fn since(&self, earlier: &Self) -> Self {
        let mut delta = *self;
        for (value, before) in delta.0.iter_mut().zip(earlier.0) {
            *value = value.saturating_sub(before);
        }
        delta
    }
}

/// Userspace side of the ring stage, shared by the drain tasks.
#[derive(Debug, Default)]
pub struct DrainCounters {
    /// Records read out of the rings.
    pub records: AtomicU64,
    /// Packet bytes in those records.
    pub bytes: AtomicU64,
    /// Records that could not be decoded (a bug, never bad traffic).
    pub undecodable: AtomicU64,
}

impl DrainCounters {
    pub fn snapshot(&self) -> DrainSnapshot {
        DrainSnapshot {
            records: self.records.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            undecodable: self.undecodable.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainSnapshot {
    pub records: u64,
    pub bytes: u64,
    pub undecodable: u64,
}

/// Counters of the stream stages (shards, connection tables, hub).
#[derive(Debug, Clone, Default)]
pub struct StreamSummary {
    /// Segments handed to shards.
    pub segments: u64,
    /// Segments dropped at a full shard queue.
    pub queue_drops: u64,
    /// Records that did not decode as TCP segments.
    pub undecodable: u64,
    /// Flows the kernel reported as having lost packets to a full ring.
    pub ring_lost_flows: u64,
    pub table: TableStats,
    pub ports: Vec<PortTotals>,
    pub consumers: Vec<ConsumerSnapshot>,
    pub past_sessions: PastSessions,
}

/// What a port's channel carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PortTotals {
    pub port: u16,
    pub connections: u64,
    pub bytes: u64,
    pub batches: u64,
}

impl PortTotals {
    pub fn add(&mut self, other: &Self) {
        self.connections += other.connections;
        self.bytes += other.bytes;
        self.batches += other.batches;
    }
}

/// What one consumer received and lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerSnapshot {
    pub name: String,
    /// A session's client name (escaped).
    pub client: Option<String>,
    pub events: u64,
    pub bytes: u64,
    pub lags: u64,
    pub lagged_connections: u64,
}

/// What the subscriber sessions that ended received and lost, summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PastSessions {
    pub sessions: u64,
    pub events: u64,
    pub bytes: u64,
    pub lags: u64,
    pub lagged_connections: u64,
}

impl PastSessions {
    /// Name of its entry among the consumers (sessions are `client-N`).
    pub const NAME: &str = "past_sessions";

    pub fn add(&mut self, ended: &ConsumerSnapshot) {
        self.sessions += 1;
        self.events += ended.events;
        self.bytes += ended.bytes;
        self.lags += ended.lags;
        self.lagged_connections += ended.lagged_connections;
    }
}

impl StreamSummary {
    /// The ports a document lists, in port order, and how many it leaves
    /// out.
    fn listed_ports(&self) -> (Vec<&PortTotals>, usize) {
        let mut listed: Vec<&PortTotals> = self.ports.iter().collect();
        if listed.len() > MAX_LISTED_PORTS {
            listed.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.port.cmp(&b.port)));
            listed.truncate(MAX_LISTED_PORTS);
            listed.sort_by_key(|t| t.port);
        }
        let omitted = self.ports.len() - listed.len();
        (listed, omitted)
    }

    /// The consumers a document lists, and how many it leaves out.
    fn listed_consumers(&self) -> (&[ConsumerSnapshot], usize) {
        let listed = &self.consumers[..self.consumers.len().min(MAX_LISTED_CONSUMERS)];
        (listed, self.consumers.len() - listed.len())
    }
}

/// Everything printed at exit.
#[derive(Debug, Clone)]
pub struct Summary {
    pub kernel: KernelCounters,
    pub drain: DrainSnapshot,
    pub streams: StreamSummary,
}

impl Summary {
    pub fn to_json(&self) -> serde_json::Value {
        let mut kernel = serde_json::Map::new();
        for (name, value) in self.kernel.iter() {
            kernel.insert(name.to_owned(), value.into());
        }
        let s = &self.streams;
        let mut closed = serde_json::Map::new();
        for reason in CloseReason::ALL {
            closed.insert(reason.as_str().to_owned(), s.table.closed(reason).into());
        }
        let (listed_ports, omitted_ports) = s.listed_ports();
        let ports: Vec<_> = listed_ports
            .iter()
            .map(|t| {
                serde_json::json!({"port": t.port, "connections": t.connections,
                                   "bytes": t.bytes, "batches": t.batches})
            })
            .collect();
        let (listed_consumers, omitted_consumers) = s.listed_consumers();
        let mut consumers: Vec<_> = listed_consumers
            .iter()
            .map(|c| {
                let mut entry = serde_json::json!({"name": c.name, "events": c.events,
                    "bytes": c.bytes, "lags": c.lags, "lagged_connections": c.lagged_connections});
                if let Some(client) = &c.client {
                    entry["client"] = client.as_str().into();
                }
                entry
            })
            .collect();
        let past = &s.past_sessions;
        consumers.push(serde_json::json!({"name": PastSessions::NAME,
            "sessions": past.sessions, "events": past.events, "bytes": past.bytes,
            "lags": past.lags, "lagged_connections": past.lagged_connections}));
        serde_json::json!({
            "kind": "counters",
            "kernel": kernel,
            "drain": {
                "records": self.drain.records,
                "bytes": self.drain.bytes,
                "undecodable": self.drain.undecodable,
            },
            "shards": {
                "segments": s.segments,
                "queue_drops": s.queue_drops,
                "undecodable": s.undecodable,
                "ring_lost_flows": s.ring_lost_flows,
            },
            "connections": {
                "opened": s.table.opened,
                "midstream": s.table.opened_midstream,
                "untracked_segments": s.table.untracked,
                "silent": s.table.silent,
                "ignored_rsts": s.table.ignored_rsts,
                "ignored_syns": s.table.ignored_syns,
                "delivered_bytes": s.table.delivered_bytes,
                "missing_bytes": s.table.missing_bytes,
                "closed": closed,
            },
            "ports": ports,
            "consumers": consumers,
            "truncated": {"ports": omitted_ports, "consumers": omitted_consumers},
        })
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "kernel:")?;
        for (name, value) in self.kernel.iter() {
            write!(f, " {name}={value}")?;
        }
        writeln!(
            f,
            "\ndrain: records={} bytes={} undecodable={}",
            self.drain.records, self.drain.bytes, self.drain.undecodable
        )?;
        let s = &self.streams;
        writeln!(
            f,
            "shards: segments={} queue_drops={} undecodable={} ring_lost_flows={}",
            s.segments, s.queue_drops, s.undecodable, s.ring_lost_flows
        )?;
        write!(
            f,
            "connections: opened={} midstream={} untracked_segments={} silent={} ignored_rsts={} ignored_syns={} delivered_bytes={} missing_bytes={}",
            s.table.opened,
            s.table.opened_midstream,
            s.table.untracked,
            s.table.silent,
            s.table.ignored_rsts,
            s.table.ignored_syns,
            s.table.delivered_bytes,
            s.table.missing_bytes
        )?;
        write!(f, "\nclosed:")?;
        for reason in CloseReason::ALL {
            write!(f, " {reason}={}", s.table.closed(reason))?;
        }
        let (listed_ports, omitted_ports) = s.listed_ports();
        for t in listed_ports {
            write!(
                f,
                "\nport {}: connections={} bytes={} batches={}",
                t.port, t.connections, t.bytes, t.batches
            )?;
        }
        let (listed_consumers, omitted_consumers) = s.listed_consumers();
        for c in listed_consumers {
            write!(
                f,
                "\nconsumer {}: events={} bytes={} lags={} lagged_connections={}",
                printable(&c.name),
                c.events,
                c.bytes,
                c.lags,
                c.lagged_connections
            )?;
        }
        let past = &s.past_sessions;
        write!(
            f,
            "\nconsumer {}: sessions={} events={} bytes={} lags={} lagged_connections={}",
            PastSessions::NAME,
            past.sessions,
            past.events,
            past.bytes,
            past.lags,
            past.lagged_connections
        )?;
        if omitted_ports + omitted_consumers > 0 {
            write!(
                f,
                "\ntruncated: ports={omitted_ports} consumers={omitted_consumers}"
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flatten_keys_ports_and_consumers() {
        let json = serde_json::json!({"kernel": {"seen": 7}, "connections": {"closed": {"gap": 2}},
            "ports": [{"port": 80, "bytes": 5}], "consumers": [{"name": "print", "lags": 3}], "kind": "counters"});
        let flat = flatten(&json);
        assert_eq!(flat["kernel.seen"], 7);
        assert_eq!(flat["connections.closed.gap"], 2);
        assert_eq!(flat["ports.80.bytes"], 5);
        assert_eq!(flat["consumers.print.lags"], 3);
        assert!(!flat.contains_key("kind"));
    }

    #[test]
    fn since_subtracts_per_counter() {
        let mut before = KernelCounters::default();
        before.0[Counter::Seen as usize] = 10;
        let mut after = before;
        after.0[Counter::Seen as usize] = 15;
        after.0[Counter::Mirrored as usize] = 3;
        let delta = after.since(&before);
        assert_eq!(delta.get(Counter::Seen), 5);
        assert_eq!(delta.get(Counter::Mirrored), 3);
        assert_eq!(delta.get(Counter::RingFull), 0);
    }

    #[test]
    fn summary_json_names_every_counter() {
        let mut kernel = KernelCounters::default();
        kernel.0[Counter::RingFull as usize] = 4;
        let mut table = TableStats::default();
        table.closed[CloseReason::Gap as usize] = 2;
        table.ignored_rsts = 6;
        let summary = Summary {
            kernel,
            drain: DrainSnapshot {
                records: 1,
                bytes: 2,
                undecodable: 0,
            },
            streams: StreamSummary {
                queue_drops: 3,
                table,
                ports: vec![PortTotals {
                    port: 80,
                    connections: 5,
                    bytes: 100,
                    batches: 2,
                }],
                consumers: vec![ConsumerSnapshot {
                    name: "dump".to_owned(),
                    client: None,
                    events: 1,
                    bytes: 2,
                    lags: 1,
                    lagged_connections: 4,
                }],
                ..StreamSummary::default()
            },
        };
        let json = summary.to_json();
        assert_eq!(json["kind"], "counters");
        for counter in Counter::ALL {
            assert!(
                json["kernel"][counter.name()].is_u64(),
                "{}",
                counter.name()
            );
        }
        for reason in CloseReason::ALL {
            assert!(
                json["connections"]["closed"][reason.as_str()].is_u64(),
                "{reason}"
            );
        }
        assert_eq!(json["kernel"]["ring_full"], 4);
        assert_eq!(json["drain"]["bytes"], 2);
        assert_eq!(json["shards"]["queue_drops"], 3);
        assert_eq!(json["connections"]["closed"]["gap"], 2);
        assert_eq!(json["connections"]["ignored_rsts"], 6);
        for counter in ["silent", "ignored_syns"] {
            assert!(json["connections"][counter].is_u64(), "{counter}");
        }
        assert_eq!(json["ports"][0]["connections"], 5);
        assert_eq!(json["consumers"][0]["lagged_connections"], 4);
        let text = summary.to_string();
        for expected in [
            "ring_full=4",
            "queue_drops=3",
            "gap=2",
            "ignored_rsts=6",
            "port 80: connections=5",
            "consumer dump:",
        ] {
            assert!(text.contains(expected), "{expected} in {text}");
        }
    }

    #[test]
    fn flattened_names_are_escaped() {
        let json = serde_json::json!({"consumers": [
            {"name": "evil\nkernel.seen", "events": 1},
            {"name": "\u{1b}[2J", "events": 2},
        ]});
        let flat = flatten(&json);
        assert_eq!(flat["consumers.evil\\nkernel.seen.events"], 1);
        assert_eq!(flat["consumers.\\u{1b}[2J.events"], 2);
    }
}

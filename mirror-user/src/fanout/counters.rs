//! The fan-out's counters: what each port's channel carried and what each
//! consumer received and lost. They make the `ports`, `consumers` and
//! `truncated` sections of the counters document, bounded however many
//! ports and sessions come and go.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Serialize, ser::SerializeMap};

use crate::telemetry::counters;

/// Most ports the document lists (the busiest by bytes); the others are
/// counted in `truncated.ports`.
pub const MAX_LISTED_PORTS: usize = 1024;
/// Most consumers the document lists (in-process ones first, then
/// sessions in the order they started); the others are counted in
/// `truncated.consumers`.
///
/// With [`MAX_LISTED_PORTS`] this bounds the document well below a STATS
/// frame: a port entry is at most about 100 bytes, a consumer entry about
/// 600 (a 64-byte client name of control characters, escaped here and
/// again by JSON), about 240 KiB in all (measured in the server's tests).
/// It also bounds the series the Prometheus endpoint exports.
pub const MAX_LISTED_CONSUMERS: usize = 256;

counters! {
    /// What one port's channel carried.
    pub struct PortCounters => PortCounts {
        connections,
        bytes,
        batches,
    }
}

/// A port's entry in the `ports` section.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PortSnapshot {
    pub port: u16,
    pub connections: u64,
    pub bytes: u64,
    pub batches: u64,
}

impl PortSnapshot {
    pub fn new(port: u16, counts: PortCounts) -> Self {
        Self {
            port,
            connections: counts.connections,
            bytes: counts.bytes,
            batches: counts.batches,
        }
    }

    pub fn add(&mut self, other: &Self) {
        self.connections += other.connections;
        self.bytes += other.bytes;
        self.batches += other.batches;
    }
}

/// What one consumer received and lost.
#[derive(Debug)]
pub struct ConsumerCounters {
    pub name: String,
    /// For a subscriber session: the name its client gave, cut and escaped
    /// (see [`super::hub::Hub::subscribe_session`]).
    pub client: Option<String>,
    pub events: AtomicU64,
    pub bytes: AtomicU64,
    /// Times the consumer fell behind a channel.
    pub lags: AtomicU64,
    /// Connections closed for it as `lagged`.
    pub lagged_connections: AtomicU64,
}

impl ConsumerCounters {
    pub(super) fn new(name: String, client: Option<String>) -> Self {
        Self {
            name,
            client,
            events: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            lags: AtomicU64::new(0),
            lagged_connections: AtomicU64::new(0),
        }
    }

    pub fn snapshot(&self) -> ConsumerSnapshot {
        ConsumerSnapshot {
            name: self.name.clone(),
            client: self.client.clone(),
            events: self.events.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            lags: self.lags.load(Ordering::Relaxed),
            lagged_connections: self.lagged_connections.load(Ordering::Relaxed),
        }
    }
}

/// A consumer's entry in the `consumers` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConsumerSnapshot {
    /// A stable identifier: `print`, `dump-dir`, `forward-IP:PORT`,
    /// `client-N`.
    pub name: String,
    /// A session's client name (escaped).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    pub events: u64,
    pub bytes: u64,
    pub lags: u64,
    pub lagged_connections: u64,
}

/// What the subscriber sessions that ended received and lost, summed: the
/// consumer entry `past_sessions`.
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

impl Serialize for PastSessions {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(6))?;
        map.serialize_entry("name", Self::NAME)?;
        map.serialize_entry("sessions", &self.sessions)?;
        map.serialize_entry("events", &self.events)?;
        map.serialize_entry("bytes", &self.bytes)?;
        map.serialize_entry("lags", &self.lags)?;
        map.serialize_entry("lagged_connections", &self.lagged_connections)?;
        map.end()
    }
}

/// An entry of the `consumers` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ConsumerEntry {
    Live(ConsumerSnapshot),
    Past(PastSessions),
}

/// The fan-out's sections of the counters document.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HubSnapshot {
    /// In port order.
    pub ports: Vec<PortSnapshot>,
    /// In-process consumers, sessions, then `past_sessions`.
    pub consumers: Vec<ConsumerEntry>,
    pub truncated: Truncated,
}

/// Entries the document left out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Truncated {
    pub ports: u64,
    pub consumers: u64,
}

impl HubSnapshot {
    /// The sections, within [`MAX_LISTED_PORTS`] (the busiest kept) and
    /// [`MAX_LISTED_CONSUMERS`] (the first kept).
    pub fn listed(
        mut ports: Vec<PortSnapshot>,
        mut consumers: Vec<ConsumerSnapshot>,
        past: PastSessions,
    ) -> Self {
        let all_ports = ports.len();
        if all_ports > MAX_LISTED_PORTS {
            ports.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.port.cmp(&b.port)));
            ports.truncate(MAX_LISTED_PORTS);
        }
        ports.sort_by_key(|p| p.port);
        let all_consumers = consumers.len();
        consumers.truncate(MAX_LISTED_CONSUMERS);
        let truncated = Truncated {
            ports: (all_ports - ports.len()) as u64,
            consumers: (all_consumers - consumers.len()) as u64,
        };
        let mut consumers: Vec<ConsumerEntry> =
            consumers.into_iter().map(ConsumerEntry::Live).collect();
        consumers.push(ConsumerEntry::Past(past));
        Self {
            ports,
            consumers,
            truncated,
        }
    }
}

//! The hub: one bounded broadcast channel per mirrored port, opened and
//! closed by the main task, and the registry of its consumers' counters.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, atomic::Ordering},
};

use parking_lot::{Mutex, RwLock};
use tokio::sync::broadcast;

use crate::{
    fanout::{
        counters::{
            ConsumerCounters, ConsumerSnapshot, HubSnapshot, PastSessions, PortCounters,
            PortSnapshot,
        },
        subscription::{EndGuard, EventBatch, PortFeed, Subscription},
    },
    flow::model::StreamEvent,
    telemetry::registry::Stage,
    text::printable,
};

/// Sizes of the fan-out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HubConfig {
    /// Batches a port's channel holds before slow consumers lag.
    pub capacity: usize,
    /// Payload bytes a port's channel may hold; lowers the capacity when
    /// `capacity` full batches would exceed it.
    pub max_bytes: usize,
    /// A shard publishes a port's batch once it holds this many payload
    /// bytes (or at the end of each round of work).
    pub batch_bytes: usize,
}

impl HubConfig {
    /// A shard publishes a port's batch once it holds this many payload
    /// bytes: one channel slot per this many bytes.
    pub const BATCH_BYTES: usize = 256 << 10;
    /// Most events in one batch, whatever their size.
    pub const MAX_BATCH_EVENTS: usize = 1024;

    /// Slots per channel, honouring both limits. A batch can exceed
    /// `batch_bytes` by one event (at most one 64 KiB packet), which the
    /// budget allows for.
    pub fn effective_capacity(&self) -> usize {
        let per_batch = self.batch_bytes + (64 << 10);
        self.capacity.min(self.max_bytes / per_batch).max(2)
    }
}

struct PortChannel {
    sender: broadcast::Sender<EventBatch>,
    stats: PortCounters,
}

/// The hub's consumers: in-process ones for the life of the mirror, and
/// subscriber sessions while they last.
#[derive(Debug, Default)]
struct Consumers {
    /// In subscription order.
    live: BTreeMap<u64, Arc<ConsumerCounters>>,
    next: u64,
    /// Ended sessions, summed: the counters stay bounded however many
    /// sessions come and go.
    past_sessions: PastSessions,
}

pub struct Hub {
    /// Read once per published batch (not per packet); written when a port
    /// is added or removed.
    channels: RwLock<HashMap<u16, PortChannel>>,
    config: HubConfig,
    consumers: Arc<Mutex<Consumers>>,
    /// Totals of channels closed while the mirror ran, one entry per port
    /// however often it was closed.
    pub(super) closed_ports: Mutex<BTreeMap<u16, PortSnapshot>>,
}

impl Hub {
    /// A hub with a channel for each of `ports`.
    pub fn new(ports: &[u16], config: HubConfig) -> Self {
        let hub = Self {
            channels: RwLock::new(HashMap::new()),
            config,
            consumers: Arc::default(),
            closed_ports: Mutex::default(),
        };
        for port in ports {
            hub.open_port(*port);
        }
        hub
    }

    pub fn config(&self) -> HubConfig {
        self.config
    }

    /// Opens `port`'s channel if it has none; returns a receiver of it.
    pub fn open_port(&self, port: u16) -> broadcast::Receiver<EventBatch> {
        let mut channels = self.channels.write();
        channels
            .entry(port)
            .or_insert_with(|| PortChannel {
                sender: broadcast::channel(self.config.effective_capacity()).0,
                stats: PortCounters::default(),
            })
            .sender
            .subscribe()
    }

    /// Closes `port`'s channel: its consumers see its end once they have
    /// read what it holds.
    pub fn close_port(&self, port: u16) {
        let mut channels = self.channels.write();
        if let Some(channel) = channels.remove(&port) {
            // Totals of a closed channel are kept for the counters.
            drop(channel.sender);
            let mut closed = self.closed_ports.lock();
            closed
                .entry(port)
                .or_insert(PortSnapshot {
                    port,
                    ..PortSnapshot::default()
                })
                .add(&totals(port, &channel.stats));
        }
    }

    /// A receiver of `port`'s channel, if it is open.
    pub fn receiver(&self, port: u16) -> Option<broadcast::Receiver<EventBatch>> {
        let channels = self.channels.read();
        channels
            .get(&port)
            .map(|channel| channel.sender.subscribe())
    }

    /// Closes every channel (the mirror stops).
    pub fn close_all(&self) {
        let ports: Vec<u16> = {
            let channels = self.channels.read();
            channels.keys().copied().collect()
        };
        for port in ports {
            self.close_port(port);
        }
    }

    /// Sends a batch to the consumers of `port`; never waits.
    pub fn publish(&self, port: u16, events: Vec<StreamEvent>) {
        let channels = self.channels.read();
        let Some(channel) = channels.get(&port) else {
            return;
        };
        let mut bytes = 0;
        let mut opened = 0;
        for event in &events {
            bytes += event.data_len() as u64;
            opened += u64::from(matches!(event, StreamEvent::Opened { .. }));
        }
        channel.stats.bytes.fetch_add(bytes, Ordering::Relaxed);
        channel
            .stats
            .connections
            .fetch_add(opened, Ordering::Relaxed);
        channel.stats.batches.fetch_add(1, Ordering::Relaxed);
        // No receiver is not an error: nobody consumes this port now.
        let _ = channel.sender.send(events.into());
    }

    /// An in-process consumer of the given ports (those with an open
    /// channel); `name` identifies it in the counters for the life of the
    /// mirror. The returned feed adds and removes ports later; the
    /// subscription ends when its channels have closed and the feed is
    /// dropped.
    pub fn subscribe(&self, ports: &[u16], name: &str) -> (PortFeed, Subscription) {
        let (feed, mut subscription) = self.register(name.to_owned(), None, false);
        for port in ports {
            if let Some(receiver) = self.receiver(*port) {
                subscription.add_port(*port, receiver);
            }
        }
        (feed, subscription)
    }

    /// A subscriber session's consumer, with no port yet: `client-ID` in
    /// the counters while it lasts, with the name its client gave (as the
    /// server keeps it, escaped here). When the subscription is dropped its
    /// totals move into the past sessions'. It carries both directions; the
    /// session narrows it to the client's for a version 2 client.
    pub fn subscribe_session(&self, id: u64, client: &str) -> Subscription {
        let client = printable(client).into_owned();
        let (_, subscription) = self.register(format!("client-{id}"), Some(client), true);
        subscription
    }

    fn register(
        &self,
        name: String,
        client: Option<String>,
        session: bool,
    ) -> (PortFeed, Subscription) {
        let stats = Arc::new(ConsumerCounters::new(name, client));
        let key = {
            let mut consumers = self.consumers.lock();
            let key = consumers.next;
            consumers.next += 1;
            consumers.live.insert(key, Arc::clone(&stats));
            key
        };
        let end = session.then(|| {
            Box::new(SessionEnd {
                consumers: Arc::clone(&self.consumers),
                key,
            }) as EndGuard
        });
        Subscription::new(stats, end)
    }

    /// Totals of every port, open or closed, in port order (at most one
    /// entry per port).
    pub fn port_totals(&self) -> Vec<PortSnapshot> {
        let mut by_port = self.closed_ports.lock().clone();
        for (port, channel) in self.channels.read().iter() {
            by_port
                .entry(*port)
                .or_insert(PortSnapshot {
                    port: *port,
                    ..PortSnapshot::default()
                })
                .add(&totals(*port, &channel.stats));
        }
        by_port.into_values().collect()
    }

    /// The consumers now (in-process ones first, in subscription order),
    /// and the ended sessions' totals, read together so that a session
    /// ending meanwhile is counted once.
    pub fn consumer_totals(&self) -> (Vec<ConsumerSnapshot>, PastSessions) {
        let consumers = self.consumers.lock();
        let live = consumers
            .live
            .values()
            .map(|stats| stats.snapshot())
            .collect();
        (live, consumers.past_sessions)
    }
}

fn totals(port: u16, counters: &PortCounters) -> PortSnapshot {
    PortSnapshot::new(port, counters.snapshot())
}

/// The `ports`, `consumers` and `truncated` sections.
impl Stage for Hub {
    type Snapshot = HubSnapshot;

    fn snapshot(&self) -> HubSnapshot {
        let (consumers, past) = self.consumer_totals();
        HubSnapshot::listed(self.port_totals(), consumers, past)
    }
}

/// Moves a session's totals into the past sessions' when it ends.
struct SessionEnd {
    consumers: Arc<Mutex<Consumers>>,
    key: u64,
}

impl Drop for SessionEnd {
    fn drop(&mut self) {
        let mut consumers = self.consumers.lock();
        if let Some(stats) = consumers.live.remove(&self.key) {
            consumers.past_sessions.add(&stats.snapshot());
        }
    }
}

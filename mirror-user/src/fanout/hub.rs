//! Fan-out of stream events to consumers: one bounded broadcast channel
//! per mirrored port.
//!
//! Shards publish events in batches (one channel slot per batch), so the
//! memory a channel can hold is bounded by its capacity times the batch
//! size: that is the byte budget. A consumer that falls behind loses only
//! its own connections of that port, each closed as `lagged`; the producer
//! never waits and other consumers see nothing of it.
//!
//! Ports come and go while the mirror runs: the main task opens and closes
//! channels; a consumer's subscription gains and loses ports, and the
//! connections it had open on a port it leaves end as `shutdown`.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    pin::Pin,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::{
    sync::{broadcast, mpsc},
    time::{Duration, Instant},
};
use tokio_stream::{
    Stream, StreamExt as _, StreamMap,
    wrappers::{BroadcastStream, errors::BroadcastStreamRecvError},
};

use crate::{
    flow::model::{CloseReason, ConnId, EventSink, StreamEvent},
    telemetry::counters::{ConsumerSnapshot, PastSessions, PortTotals},
    text::printable,
};

/// Events of one port, published together.
pub type EventBatch = Arc<[StreamEvent]>;

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

/// Totals of one port.
#[derive(Debug, Default)]
pub struct PortStats {
    pub connections: AtomicU64,
    pub bytes: AtomicU64,
    pub batches: AtomicU64,
}

/// Totals of one consumer.
#[derive(Debug)]
pub struct ConsumerStats {
    pub name: String,
    /// For a subscriber session: the name its client gave, cut and escaped
    /// (see [`Hub::subscribe_session`]).
    pub client: Option<String>,
    pub events: AtomicU64,
    pub bytes: AtomicU64,
    /// Times the consumer fell behind a channel.
    pub lags: AtomicU64,
    /// Connections closed for it as `lagged`.
    pub lagged_connections: AtomicU64,
}

impl ConsumerStats {
    /// Its counters, now.
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

struct PortChannel {
    sender: broadcast::Sender<EventBatch>,
    stats: PortStats,
}

/// The hub's consumers: in-process ones for the life of the mirror, and
/// subscriber sessions while they last.
#[derive(Debug, Default)]
struct Consumers {
    /// In subscription order.
    live: BTreeMap<u64, Arc<ConsumerStats>>,
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
    closed_ports: Mutex<BTreeMap<u16, PortTotals>>,
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
        let mut channels = self.channels.write().unwrap_or_else(|p| p.into_inner());
        channels
            .entry(port)
            .or_insert_with(|| PortChannel {
                sender: broadcast::channel(self.config.effective_capacity()).0,
                stats: PortStats::default(),
            })
            .sender
            .subscribe()
    }

    /// Closes `port`'s channel: its consumers see its end once they have
    /// read what it holds.
    pub fn close_port(&self, port: u16) {
        let mut channels = self.channels.write().unwrap_or_else(|p| p.into_inner());
        if let Some(channel) = channels.remove(&port) {
            // Totals of a closed channel are kept for the counters.
            drop(channel.sender);
            let mut closed = self.closed_ports.lock().unwrap_or_else(|p| p.into_inner());
            closed
                .entry(port)
                .or_insert(PortTotals {
                    port,
                    ..PortTotals::default()
                })
                .add(&totals(port, &channel.stats));
        }
    }

    /// A receiver of `port`'s channel, if it is open.
    pub fn receiver(&self, port: u16) -> Option<broadcast::Receiver<EventBatch>> {
        let channels = self.channels.read().unwrap_or_else(|p| p.into_inner());
        channels
            .get(&port)
            .map(|channel| channel.sender.subscribe())
    }

    /// Closes every channel (the mirror stops).
    pub fn close_all(&self) {
        let ports: Vec<u16> = {
            let channels = self.channels.read().unwrap_or_else(|p| p.into_inner());
            channels.keys().copied().collect()
        };
        for port in ports {
            self.close_port(port);
        }
    }

    /// Sends a batch to the consumers of `port`; never waits.
    pub fn publish(&self, port: u16, events: Vec<StreamEvent>) {
        let channels = self.channels.read().unwrap_or_else(|p| p.into_inner());
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
        let (feed, mut subscription, _) = self.register(name.to_owned(), None);
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
    /// totals move into the past sessions'.
    pub fn subscribe_session(&self, id: u64, client: &str) -> Subscription {
        let client = printable(client).into_owned();
        let (_, mut subscription, key) = self.register(format!("client-{id}"), Some(client));
        subscription.session = Some(SessionEnd {
            consumers: Arc::clone(&self.consumers),
            key,
        });
        subscription
    }

    fn register(&self, name: String, client: Option<String>) -> (PortFeed, Subscription, u64) {
        let stats = Arc::new(ConsumerStats {
            name,
            client,
            events: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            lags: AtomicU64::new(0),
            lagged_connections: AtomicU64::new(0),
        });
        let key = {
            let mut consumers = self.consumers.lock().unwrap_or_else(|p| p.into_inner());
            let key = consumers.next;
            consumers.next += 1;
            consumers.live.insert(key, Arc::clone(&stats));
            key
        };
        let (feed, changes) = mpsc::unbounded_channel();
        let subscription = Subscription {
            streams: StreamMap::new(),
            changes: Some(changes),
            open: HashMap::new(),
            queue: VecDeque::new(),
            stats,
            session: None,
        };
        (PortFeed(feed), subscription, key)
    }

    /// Totals of every port, open or closed, in port order (at most one
    /// entry per port).
    pub fn port_totals(&self) -> Vec<PortTotals> {
        let mut by_port = self
            .closed_ports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for (port, channel) in self
            .channels
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            by_port
                .entry(*port)
                .or_insert(PortTotals {
                    port: *port,
                    ..PortTotals::default()
                })
                .add(&totals(*port, &channel.stats));
        }
        by_port.into_values().collect()
    }

    /// The consumers now (in-process ones first, in subscription order),
    /// and the ended sessions' totals, read together so that a session
    /// ending meanwhile is counted once.
    pub fn consumer_totals(&self) -> (Vec<ConsumerSnapshot>, PastSessions) {
        let consumers = self.consumers.lock().unwrap_or_else(|p| p.into_inner());
        let live = consumers
            .live
            .values()
            .map(|stats| stats.snapshot())
            .collect();
        (live, consumers.past_sessions)
    }
}

fn totals(port: u16, stats: &PortStats) -> PortTotals {
    PortTotals {
        port,
        connections: stats.connections.load(Ordering::Relaxed),
        bytes: stats.bytes.load(Ordering::Relaxed),
        batches: stats.batches.load(Ordering::Relaxed),
    }
}

/// Moves a session's totals into the past sessions' when it ends.
struct SessionEnd {
    consumers: Arc<Mutex<Consumers>>,
    key: u64,
}

impl Drop for SessionEnd {
    fn drop(&mut self) {
        let mut consumers = self.consumers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(stats) = consumers.live.remove(&self.key) {
            consumers.past_sessions.add(&stats.snapshot());
        }
    }
}

/// Adds ports to, or removes them from, a subscription from another task.
#[derive(Clone)]
pub struct PortFeed(mpsc::UnboundedSender<PortChange>);

enum PortChange {
    Add(u16, broadcast::Receiver<EventBatch>),
    Remove(u16),
}

impl PortFeed {
    pub fn add(&self, port: u16, receiver: broadcast::Receiver<EventBatch>) {
        let _ = self.0.send(PortChange::Add(port, receiver));
    }

    pub fn remove(&self, port: u16) {
        let _ = self.0.send(PortChange::Remove(port));
    }
}

/// What a port's stream yields: a batch, a lag, or its end.
enum ChannelItem {
    Batch(EventBatch),
    Lagged(u64),
    Ended,
}

type ChannelStream = Pin<Box<dyn Stream<Item = ChannelItem> + Send>>;

fn channel_stream(receiver: broadcast::Receiver<EventBatch>) -> ChannelStream {
    Box::pin(
        BroadcastStream::new(receiver)
            .map(|item| match item {
                Ok(batch) => ChannelItem::Batch(batch),
                Err(BroadcastStreamRecvError::Lagged(missed)) => ChannelItem::Lagged(missed),
            })
            .chain(tokio_stream::once(ChannelItem::Ended)),
    )
}

/// One consumer's view of the hub: the events of connections that opened
/// after it subscribed, with drop-on-lag applied.
pub struct Subscription {
    streams: StreamMap<u16, ChannelStream>,
    /// Port changes sent through its [`PortFeed`]; `None` once closed.
    changes: Option<mpsc::UnboundedReceiver<PortChange>>,
    /// Connections this consumer has seen open and not yet close.
    open: HashMap<ConnId, u16>,
    queue: VecDeque<StreamEvent>,
    stats: Arc<ConsumerStats>,
    /// Set for a subscriber session: its totals are folded when it ends.
    session: Option<SessionEnd>,
}

impl Subscription {
    /// The next event; `None` once every channel closed and the feed is
    /// gone (the mirror stops).
    pub async fn next(&mut self) -> Option<StreamEvent> {
        loop {
            if let Some(event) = self.queue.pop_front() {
                return Some(event);
            }
            if self.streams.is_empty() && self.changes.is_none() {
                return None;
            }
            tokio::select! {
                item = self.streams.next(), if !self.streams.is_empty() => {
                    if let Some((port, item)) = item {
                        match item {
                            ChannelItem::Batch(batch) => self.accept(port, &batch),
                            ChannelItem::Lagged(missed) => self.lagged(port, missed),
                            ChannelItem::Ended => self.end_port(port),
                        }
                    }
                }
                change = recv_change(&mut self.changes) => match change {
                    Some(PortChange::Add(port, receiver)) => self.add_port(port, receiver),
                    Some(PortChange::Remove(port)) => self.remove_port(port),
                    None => self.changes = None,
                },
            }
        }
    }

    /// Starts receiving `port`'s events (connections that open from now on).
    pub fn add_port(&mut self, port: u16, receiver: broadcast::Receiver<EventBatch>) {
        self.streams.insert(port, channel_stream(receiver));
    }

    /// Stops receiving `port`; its connections open here end as `shutdown`.
    pub fn remove_port(&mut self, port: u16) {
        if self.streams.remove(&port).is_some() {
            self.end_port(port);
        }
    }

    /// Nothing to wait for: no port and no queued event.
    pub fn is_idle(&self) -> bool {
        self.streams.is_empty() && self.queue.is_empty()
    }

    /// Ports this subscription receives.
    pub fn ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self.streams.keys().copied().collect();
        ports.sort_unstable();
        ports
    }

    /// Events already received and not yet returned by [`Self::next`]: a
    /// consumer may flush its output when this is zero.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    pub fn stats(&self) -> &ConsumerStats {
        &self.stats
    }

    fn accept(&mut self, port: u16, batch: &[StreamEvent]) {
        for event in batch {
            let keep = match event {
                StreamEvent::Opened { conn, .. } => {
                    self.open.insert(*conn, port);
                    true
                }
                // Connections that opened before this consumer subscribed,
                // or that it lost to lag, are not its own.
                StreamEvent::Data { conn, .. } => self.open.contains_key(conn),
                StreamEvent::Closed { conn, .. } => self.open.remove(conn).is_some(),
            };
            if keep {
                self.push(event.clone());
            }
        }
    }

    fn push(&mut self, event: StreamEvent) {
        self.stats.events.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes
            .fetch_add(event.data_len() as u64, Ordering::Relaxed);
        self.queue.push_back(event);
    }

    /// Closes this consumer's open connections of `port` with `reason`;
    /// returns how many.
    fn close_port_connections(&mut self, port: u16, reason: CloseReason) -> usize {
        let mut closing: Vec<ConnId> = self
            .open
            .iter()
            .filter(|(_, p)| **p == port)
            .map(|(conn, _)| *conn)
            .collect();
        closing.sort_unstable();
        for conn in &closing {
            self.open.remove(conn);
            self.push(StreamEvent::Closed {
                conn: *conn,
                reason,
            });
        }
        closing.len()
    }

    /// `port`'s channel ended or was left: its connections end here.
    fn end_port(&mut self, port: u16) {
        self.close_port_connections(port, CloseReason::Shutdown);
    }

    /// Missed events of `port`: every connection of that port this consumer
    /// had open may miss bytes now, so each ends here as `lagged`.
    fn lagged(&mut self, port: u16, missed: u64) {
        self.stats.lags.fetch_add(1, Ordering::Relaxed);
        let closed = self.close_port_connections(port, CloseReason::Lagged);
        tracing::warn!(
            consumer = %self.stats.name,
            port,
            missed_batches = missed,
            connections = closed,
            "consumer fell behind; closing its connections of this port as lagged"
        );
        self.stats
            .lagged_connections
            .fetch_add(closed as u64, Ordering::Relaxed);
    }
}

async fn recv_change(
    changes: &mut Option<mpsc::UnboundedReceiver<PortChange>>,
) -> Option<PortChange> {
    match changes {
        Some(changes) => changes.recv().await,
        None => std::future::pending().await,
    }
}

/// How long an event may wait for others to fill its batch. A channel's
/// byte budget buys as many slots as full batches fit in it, so batches
/// cut smaller than needed shrink what a consumer may fall behind by:
/// publishing after every round of shard work made 1448-byte segments at
/// 200 k/s (native XDP on veth) travel in batches of a few dozen, and the
/// consumer lag. tcpdump holds packets up to 1 s by default; a few
/// milliseconds cost a subscriber nothing it can notice.
pub const MAX_BATCH_DELAY: Duration = Duration::from_millis(2);

/// Collects a shard's events per port and publishes them in batches: when
/// a batch is full, and otherwise [`MAX_BATCH_DELAY`] after its first event.
pub struct Batcher {
    hub: Arc<Hub>,
    pending: HashMap<u16, (Vec<StreamEvent>, usize)>,
    /// When the oldest unpublished event arrived.
    oldest: Option<Instant>,
}

impl Batcher {
    pub fn new(hub: Arc<Hub>) -> Self {
        Self {
            hub,
            pending: HashMap::new(),
            oldest: None,
        }
    }

    /// When the pending events must be published, if any are pending.
    pub fn deadline(&self) -> Option<Instant> {
        self.oldest.map(|oldest| oldest + MAX_BATCH_DELAY)
    }

    /// Publishes the pending events if the oldest has waited long enough.
    pub fn flush_due(&mut self, now: Instant) {
        if self.deadline().is_some_and(|deadline| now >= deadline) {
            self.flush();
        }
    }

    /// Publishes every port's pending events.
    pub fn flush(&mut self) {
        for (port, (events, bytes)) in &mut self.pending {
            if !events.is_empty() {
                *bytes = 0;
                self.hub.publish(*port, std::mem::take(events));
            }
        }
        self.oldest = None;
    }
}

impl EventSink for Batcher {
    fn event(&mut self, port: u16, event: StreamEvent) {
        let limit = self.hub.config.batch_bytes;
        if self.oldest.is_none() {
            self.oldest = Some(Instant::now());
        }
        let (events, bytes) = self.pending.entry(port).or_default();
        *bytes += event.data_len();
        events.push(event);
        if *bytes >= limit || events.len() >= HubConfig::MAX_BATCH_EVENTS {
            *bytes = 0;
            self.hub.publish(port, std::mem::take(events));
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    const CONFIG: HubConfig = HubConfig {
        capacity: 4,
        max_bytes: 64 << 20,
        batch_bytes: 1 << 10,
    };

    fn opened(conn: ConnId) -> StreamEvent {
        StreamEvent::Opened {
            conn,
            src: "198.18.0.1:1".parse().unwrap(),
            dst: "198.18.0.2:80".parse().unwrap(),
            midstream: false,
        }
    }

    fn data(conn: ConnId, text: &'static str) -> StreamEvent {
        StreamEvent::Data {
            conn,
            bytes: Bytes::from_static(text.as_bytes()),
        }
    }

    fn closed(conn: ConnId, reason: CloseReason) -> StreamEvent {
        StreamEvent::Closed { conn, reason }
    }

    #[test]
    fn capacity_honours_the_byte_budget() {
        let small = HubConfig {
            capacity: 1000,
            max_bytes: 10 * ((1 << 10) + (64 << 10)),
            batch_bytes: 1 << 10,
        };
        assert_eq!(small.effective_capacity(), 10);
        assert_eq!(CONFIG.effective_capacity(), 4);
    }

    #[tokio::test]
    async fn consumers_see_connections_opened_after_they_subscribed() {
        let hub = Hub::new(&[80], CONFIG);
        hub.publish(80, vec![opened(1)]);
        let (_, mut sub) = hub.subscribe(&[80], "late");
        hub.publish(
            80,
            vec![
                data(1, "old"),
                opened(2),
                data(2, "new"),
                closed(1, CloseReason::Fin),
            ],
        );
        hub.publish(80, vec![closed(2, CloseReason::Fin)]);
        drop(hub);
        let mut got = Vec::new();
        while let Some(event) = sub.next().await {
            got.push(event);
        }
        assert_eq!(
            got,
            [opened(2), data(2, "new"), closed(2, CloseReason::Fin)]
        );
    }

    /// Reads exactly `n` events.
    async fn read(sub: &mut Subscription, n: usize) -> Vec<StreamEvent> {
        let mut events = Vec::new();
        for _ in 0..n {
            events.push(sub.next().await.expect("an event"));
        }
        events
    }

    #[tokio::test]
    async fn a_lagging_consumer_loses_only_its_own_connections() {
        let hub = Hub::new(&[80], CONFIG);
        let (_, mut slow) = hub.subscribe(&[80], "slow");
        let (_, mut fast) = hub.subscribe(&[80], "fast");
        hub.publish(80, vec![opened(1), data(1, "a")]);
        assert_eq!(read(&mut slow, 2).await, [opened(1), data(1, "a")]);
        assert_eq!(read(&mut fast, 2).await, [opened(1), data(1, "a")]);
        // The fast consumer keeps up; the slow one reads nothing for more
        // batches than the channel holds.
        for _ in 0..10 {
            hub.publish(80, vec![data(1, "b")]);
            assert_eq!(read(&mut fast, 1).await, [data(1, "b")]);
        }
        let later = vec![opened(2), data(2, "c"), closed(2, CloseReason::Fin)];
        hub.publish(80, later.clone());
        assert_eq!(read(&mut fast, 3).await, later);
        assert_eq!(fast.stats().lags.load(Ordering::Relaxed), 0);

        drop(hub);
        let mut rest = Vec::new();
        while let Some(event) = slow.next().await {
            rest.push(event);
        }
        // Connection 1 ends as lagged, none of its later bytes arrive, and
        // the connection opened afterwards arrives whole.
        let mut expected = vec![closed(1, CloseReason::Lagged)];
        expected.extend(later);
        assert_eq!(rest, expected);
        assert_eq!(slow.stats().lagged_connections.load(Ordering::Relaxed), 1);
        assert_eq!(slow.stats().lags.load(Ordering::Relaxed), 1);
        // The fast consumer still had connection 1 open when the channel
        // ended: it ends explicitly too.
        assert_eq!(fast.next().await, Some(closed(1, CloseReason::Shutdown)));
        assert!(fast.next().await.is_none());
    }

    #[tokio::test]
    async fn ended_sessions_leave_only_their_totals() {
        let hub = Hub::new(&[80], CONFIG);
        let (_, _print) = hub.subscribe(&[80], "print");
        let mut live = hub.subscribe_session(1, "stays\n");
        live.add_port(80, hub.receiver(80).unwrap());
        for id in 2..1002 {
            let mut session = hub.subscribe_session(id, "short");
            session.add_port(80, hub.receiver(80).unwrap());
            hub.publish(80, vec![opened(id), data(id, "abc")]);
            assert_eq!(read(&mut session, 2).await, [opened(id), data(id, "abc")]);
        }
        let (consumers, past) = hub.consumer_totals();
        let names: Vec<(&str, Option<&str>)> = consumers
            .iter()
            .map(|c| (c.name.as_str(), c.client.as_deref()))
            .collect();
        assert_eq!(
            names,
            [("print", None), ("client-1", Some("stays\\n"))],
            "ended sessions are not listed; the client's name is escaped"
        );
        assert_eq!(
            past,
            PastSessions {
                sessions: 1000,
                events: 2000,
                bytes: 3000,
                lags: 0,
                lagged_connections: 0
            }
        );
        drop(live);
        assert_eq!(hub.consumer_totals().1.sessions, 1001);
        assert_eq!(
            hub.consumer_totals().0.len(),
            1,
            "in-process consumers stay"
        );
    }

    #[test]
    fn a_port_opened_and_closed_again_keeps_one_entry() {
        let hub = Hub::new(&[], CONFIG);
        for _ in 0..1000 {
            hub.open_port(9000);
            hub.publish(9000, vec![opened(1)]);
            hub.close_port(9000);
        }
        hub.open_port(9000);
        hub.publish(9000, vec![opened(2)]);
        assert_eq!(
            hub.port_totals(),
            [PortTotals {
                port: 9000,
                connections: 1001,
                bytes: 0,
                batches: 1001
            }]
        );
        assert_eq!(hub.closed_ports.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn batcher_publishes_at_the_byte_threshold_and_on_flush() {
        let hub = Arc::new(Hub::new(&[80, 81], CONFIG));
        let (_, mut sub) = hub.subscribe(&[80, 81], "all");
        let mut batcher = Batcher::new(Arc::clone(&hub));
        batcher.event(80, opened(1));
        batcher.event(81, opened(2));
        let totals = |hub: &Hub| -> Vec<(u16, u64, u64, u64)> {
            hub.port_totals()
                .iter()
                .map(|t| (t.port, t.connections, t.bytes, t.batches))
                .collect()
        };
        assert_eq!(
            totals(&hub),
            [(80, 0, 0, 0), (81, 0, 0, 0)],
            "nothing sent yet"
        );
        batcher.event(
            80,
            StreamEvent::Data {
                conn: 1,
                bytes: Bytes::from(vec![0; 2048]),
            },
        );
        assert_eq!(
            totals(&hub)[0],
            (80, 1, 2048, 1),
            "over the threshold: sent"
        );
        batcher.flush();
        assert_eq!(totals(&hub)[1], (81, 1, 0, 1));
        assert_eq!(batcher.deadline(), None, "nothing pending");
        batcher.event(81, closed(2, CloseReason::Fin));
        let deadline = batcher.deadline().expect("an event is pending");
        batcher.flush_due(deadline - Duration::from_micros(1));
        assert_eq!(totals(&hub)[1].3, 1, "not due yet");
        batcher.flush_due(deadline);
        assert_eq!(totals(&hub)[1].3, 2, "due: published");
        drop(batcher);
        drop(hub);
        let mut count = 0;
        while sub.next().await.is_some() {
            count += 1;
        }
        // Two opens, the data and a close, then the connection still open
        // when the channels ended closes as shutdown.
        assert_eq!(count, 5);
    }
}

//! One consumer's view of the hub: the events of the ports it receives,
//! with drop-on-lag applied to it alone, and the feed through which its
//! ports change while it runs.

use std::{
    collections::{HashMap, VecDeque},
    pin::Pin,
    sync::{Arc, atomic::Ordering},
};

use tokio::sync::{broadcast, mpsc};
use tokio_stream::{
    Stream, StreamExt as _, StreamMap,
    wrappers::{BroadcastStream, errors::BroadcastStreamRecvError},
};

use crate::{
    fanout::counters::ConsumerCounters,
    flow::model::{CloseReason, ConnId, Direction, StreamEvent},
};

/// Events of one port, published together.
pub type EventBatch = Arc<[StreamEvent]>;

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
    stats: Arc<ConsumerCounters>,
    /// Skips the server's bytes (`--directions both`): for consumers that
    /// carry the client's stream only.
    client_only: bool,
    /// Dropped with the subscription: a subscriber session's totals move
    /// into the past sessions' then.
    _end: Option<EndGuard>,
}

/// What a subscription keeps until it is dropped.
pub(super) type EndGuard = Box<dyn Send + Sync>;

impl Subscription {
    /// A subscription with no port yet, and the feed that adds ports.
    pub(super) fn new(stats: Arc<ConsumerCounters>, end: Option<EndGuard>) -> (PortFeed, Self) {
        let (feed, changes) = mpsc::unbounded_channel();
        let subscription = Self {
            streams: StreamMap::new(),
            changes: Some(changes),
            open: HashMap::new(),
            queue: VecDeque::new(),
            stats,
            client_only: false,
            _end: end,
        };
        (PortFeed(feed), subscription)
    }

    /// This subscription without the server's bytes: for consumers that
    /// carry the client's stream only (the subscriber protocol, the shadow
    /// forwarder).
    pub fn client_only(mut self) -> Self {
        self.client_only = true;
        self
    }

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

    pub fn stats(&self) -> &ConsumerCounters {
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
                StreamEvent::Data { conn, dir, .. } => {
                    self.open.contains_key(conn) && !(self.client_only && *dir == Direction::Server)
                }
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

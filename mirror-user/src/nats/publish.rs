//! The hub consumer that publishes every stream event to JetStream.
//!
//! Publishes are pipelined: up to [`WINDOW`] messages ([`WINDOW_BYTES`]
//! of payload) wait for their acknowledgement at once. While the window
//! is full the consumer reads nothing more, so a slow or unreachable NATS
//! makes this consumer fall behind like any other: the hub closes its
//! connections as `lagged` (those closes are published once NATS takes
//! them) and nothing else on the node notices. A message whose
//! acknowledgement does not come is sent again (same message id: stored
//! once) for up to [`RETRY_FOR`]; one that never makes it ends its
//! connection with a `closed` message (`lagged`) at that message's place,
//! so that a reader never shows a stream short without saying so. When the
//! client reconnects (its server died), everything in flight is sent again
//! at once rather than after [`ACK_TIMEOUT`]: acknowledgements from a dead
//! server never come, and a window stalled that long makes the hub cut
//! connections that NATS could have taken.

use std::{
    collections::{HashMap, VecDeque},
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::{Notify, watch};

use async_nats::{
    HeaderMap, Subject,
    jetstream::{self, message::PublishMessage, stream},
};
use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt as _, StreamExt as _, future::BoxFuture, stream::FuturesUnordered};
use serde::Serialize;

use super::{NatsConfig, header, kind, stream_name, subject};
use crate::{
    fanout::subscription::Subscription,
    flow::model::{CloseReason, ConnId, StreamEvent},
    server::protocol::ServerFrame,
    telemetry::registry::Stage,
};

/// Messages published and not yet acknowledged, at most. Many: what rides
/// out a stream leader's election (a few seconds without acknowledgements)
/// is the window, and events are often small; [`WINDOW_BYTES`] bounds the
/// memory.
pub const WINDOW: usize = 4096;
/// Payload bytes of those messages, at most.
pub const WINDOW_BYTES: usize = 32 << 20;
/// Data bytes per message: well below NATS's default 1 MiB payload limit
/// (headers and the frame's head come on top).
pub const CHUNK: usize = 256 << 10;
/// How long an acknowledgement may take before the message counts as
/// failed (and is sent again).
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a message is sent again before its connection is given up:
/// long enough for a cluster to elect a new stream leader, within
/// JetStream's default two-minute deduplication window.
pub const RETRY_FOR: Duration = Duration::from_secs(30);
/// Pause before messages that failed are sent again.
const RETRY_PAUSE: Duration = Duration::from_millis(250);
/// How long the mirror's stop waits for the last acknowledgements.
const FLUSH_FOR: Duration = Duration::from_secs(5);

/// Counters of the `nats` section.
#[derive(Debug, Default)]
pub struct NatsCounters {
    /// Messages handed to NATS (retries included).
    pub published: AtomicU64,
    /// Messages JetStream acknowledged (stored).
    pub acked: AtomicU64,
    /// Publishes that failed or were not acknowledged in time.
    pub failed: AtomicU64,
    /// Of those, sent again.
    pub retried: AtomicU64,
    /// Connections closed as `lagged` on NATS: given up after failed
    /// publishes, or lost to the hub while NATS was slow.
    pub lagged_closes: AtomicU64,
    /// Data bytes acknowledged.
    pub bytes: AtomicU64,
    /// Messages waiting for their acknowledgement now.
    pub in_flight: AtomicU64,
    pub in_flight_bytes: AtomicU64,
}

/// [`NatsCounters`] at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct NatsSnapshot {
    pub published: u64,
    pub acked: u64,
    pub failed: u64,
    pub retried: u64,
    pub lagged_closes: u64,
    pub bytes: u64,
    pub in_flight: u64,
    pub in_flight_bytes: u64,
}

impl Stage for NatsCounters {
    type Snapshot = NatsSnapshot;

    fn snapshot(&self) -> NatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NatsSnapshot {
            published: get(&self.published),
            acked: get(&self.acked),
            failed: get(&self.failed),
            retried: get(&self.retried),
            lagged_closes: get(&self.lagged_closes),
            bytes: get(&self.bytes),
            in_flight: get(&self.in_flight),
            in_flight_bytes: get(&self.in_flight_bytes),
        }
    }
}

/// One message as published, kept until acknowledged (to be sent again).
struct Message {
    conn: ConnId,
    seq: u64,
    port: u16,
    src: SocketAddr,
    dst: SocketAddr,
    subject: Subject,
    headers: HeaderMap,
    body: Bytes,
    data_len: usize,
    closes: bool,
    first_sent: Instant,
}

/// What the publisher knows of a connection it publishes.
struct Conn {
    port: u16,
    src: SocketAddr,
    dst: SocketAddr,
    subject: Subject,
    /// The next message's `Mirror-Seq`.
    seq: u64,
    /// Given up: a `lagged` close was published, the rest is skipped.
    lost: bool,
    /// Its messages in the window: it is forgotten only once they are
    /// out, so that a message given up after the close still finds it.
    in_flight: usize,
    /// Its close was published.
    closed: bool,
}

/// A message in the window, and which of its publishes counts: the
/// outcome of an earlier one (sent before a reconnect) is ignored.
struct InFlight {
    message: Message,
    attempt: u32,
    /// Waiting in [`Publisher::retry`].
    queued: bool,
}

/// The outcome of one publish: the message's key, the attempt, the result.
type Ack = BoxFuture<'static, (u64, u32, Result<(), String>)>;

struct Publisher {
    js: jetstream::Context,
    config: NatsConfig,
    run: String,
    stats: Arc<NatsCounters>,
    conns: HashMap<ConnId, Conn>,
    /// The window, by key.
    in_flight: HashMap<u64, InFlight>,
    next_key: u64,
    /// Outcomes awaited, stale ones included (they end within
    /// [`ACK_TIMEOUT`]).
    pending: FuturesUnordered<Ack>,
    /// Keys of failed messages, sent again at the next tick.
    retry: VecDeque<u64>,
    window_bytes: usize,
}

/// Publishes the events of `subscription` until the mirror stops.
pub async fn publish_events(
    subscription: Subscription,
    config: NatsConfig,
    creds: Option<String>,
    stats: Arc<NatsCounters>,
    mut closing: watch::Receiver<bool>,
) -> io::Result<()> {
    let mut subscription = subscription;
    let reconnected = Arc::new(Notify::new());
    let client = super::connect(
        &config.servers,
        creds.as_deref(),
        &format!("mirror {}", config.node),
        Some(Arc::clone(&reconnected)),
    )
    .await
    .map_err(io::Error::other)?;
    // A publish waits for an in-flight permit, which only this loop's
    // acknowledgements give back: the limit leaves room for the window and
    // the stale outcomes of three reconnects within ACK_TIMEOUT. (Failing
    // at the limit instead, measured: a storm of immediate failures and
    // resends that kept a recovering cluster from taking anything.)
    let js = jetstream::ContextBuilder::new()
        .timeout(ACK_TIMEOUT)
        .ack_timeout(ACK_TIMEOUT)
        .max_ack_inflight(WINDOW * 4)
        .build(client);
    // The stream is made in the background: publishing does not wait for
    // NATS (a missing stream fails publishes, which are retried).
    let ensure = tokio::spawn(ensure_stream(js.clone(), config.clone()));
    let mut publisher = Publisher {
        js,
        config,
        run: run_id()?,
        stats,
        conns: HashMap::new(),
        in_flight: HashMap::new(),
        next_key: 0,
        pending: FuturesUnordered::new(),
        retry: VecDeque::new(),
        window_bytes: 0,
    };
    let mut retry_tick = tokio::time::interval(RETRY_PAUSE);
    retry_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Set once the mirror stops: a full window then gets FLUSH_FOR to make
    // room before the rest is left unread (NATS may be away for good).
    let mut give_up_at: Option<tokio::time::Instant> = None;
    loop {
        let room = publisher.in_flight.len() < WINDOW && publisher.window_bytes < WINDOW_BYTES;
        let deadline = give_up_at.unwrap_or_else(tokio::time::Instant::now);
        tokio::select! {
            biased;
            Some((key, attempt, result)) = publisher.pending.next(), if !publisher.pending.is_empty() => {
                publisher.acknowledged(key, attempt, result).await;
            }
            () = reconnected.notified() => publisher.resend_in_flight().await,
            _ = retry_tick.tick(), if !publisher.retry.is_empty() => {
                publisher.send_retries().await;
            }
            changed = closing.changed(), if give_up_at.is_none() => {
                if changed.is_err() || *closing.borrow() {
                    give_up_at = Some(tokio::time::Instant::now() + FLUSH_FOR);
                }
            }
            () = tokio::time::sleep_until(deadline), if give_up_at.is_some() && !room => {
                tracing::warn!("NATS: the mirror stops while NATS takes nothing; the last events are not published");
                break;
            }
            event = subscription.next(), if room => match event {
                Some(event) => publisher.event(event).await,
                None => break,
            },
        }
    }
    // The mirror stops: what is in flight gets a short while to land.
    let flushed = tokio::time::timeout(FLUSH_FOR, async {
        while !publisher.in_flight.is_empty() {
            tokio::select! {
                biased;
                Some((key, attempt, result)) = publisher.pending.next(), if !publisher.pending.is_empty() => {
                    publisher.acknowledged(key, attempt, result).await;
                }
                () = reconnected.notified() => publisher.resend_in_flight().await,
                _ = retry_tick.tick(), if !publisher.retry.is_empty() => {
                    publisher.send_retries().await;
                }
            }
        }
    })
    .await;
    if flushed.is_err() {
        tracing::warn!(
            "NATS: {} messages were not acknowledged before the mirror stopped",
            publisher.in_flight.len()
        );
    }
    ensure.abort();
    Ok(())
}

/// A random id for this run (connection numbers restart with each run).
fn run_id() -> io::Result<String> {
    let mut bytes = [0; 8];
    getrandom::fill(&mut bytes).map_err(io::Error::other)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Creates the stream if it is missing, retrying until NATS answers. An
/// existing stream is used as it is (its owner may have tuned it).
async fn ensure_stream(js: jetstream::Context, config: NatsConfig) {
    let name = stream_name(&config.prefix);
    let stream_config = stream::Config {
        name: name.clone(),
        subjects: vec![format!("{}.>", config.prefix)],
        max_bytes: i64::try_from(config.retention.max_bytes).unwrap_or(i64::MAX),
        max_age: config.retention.max_age,
        num_replicas: config.retention.replicas,
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::Old,
        storage: stream::StorageType::File,
        ..Default::default()
    };
    let mut warned = false;
    loop {
        match js.get_or_create_stream(stream_config.clone()).await {
            Ok(_) => {
                tracing::info!("NATS: publishing to stream {name} ({}.>)", config.prefix);
                return;
            }
            Err(error) => {
                if !warned {
                    tracing::warn!(
                        "NATS: cannot create or find the stream {name} yet: {error}; retrying"
                    );
                    warned = true;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

impl Publisher {
    async fn event(&mut self, event: StreamEvent) {
        match &event {
            StreamEvent::Opened { conn, src, dst, .. } => {
                let port = dst.port();
                self.conns.insert(
                    *conn,
                    Conn {
                        port,
                        src: *src,
                        dst: *dst,
                        subject: subject(&self.config.prefix, &self.config.node, port, *conn)
                            .into(),
                        seq: 0,
                        lost: false,
                        in_flight: 0,
                        closed: false,
                    },
                );
                self.publish(*conn, kind::OPENED, &[], event).await;
            }
            StreamEvent::Data {
                conn,
                dir,
                bytes,
                peer_acked,
            } => {
                if self.conns.get(conn).is_none_or(|c| c.lost) {
                    return;
                }
                let dir_header = [(header::DIR, dir.as_str())];
                if bytes.len() <= CHUNK {
                    self.publish(*conn, kind::DATA, &dir_header, event).await;
                    return;
                }
                let (conn, dir, bytes, peer_acked) = (*conn, *dir, bytes.clone(), *peer_acked);
                for start in (0..bytes.len()).step_by(CHUNK) {
                    let part = StreamEvent::Data {
                        conn,
                        dir,
                        bytes: bytes.slice(start..(start + CHUNK).min(bytes.len())),
                        peer_acked,
                    };
                    self.publish(conn, kind::DATA, &dir_header, part).await;
                }
            }
            StreamEvent::Closed { conn, reason } => {
                let (conn, reason) = (*conn, *reason);
                let Some(state) = self.conns.get(&conn) else {
                    return;
                };
                if !state.lost {
                    if reason == CloseReason::Lagged {
                        // The hub dropped this consumer's connection: NATS
                        // was too slow.
                        self.stats.lagged_closes.fetch_add(1, Ordering::Relaxed);
                    }
                    let reason_header = [(header::REASON, reason.as_str())];
                    self.publish(conn, kind::CLOSED, &reason_header, event)
                        .await;
                }
                if let Some(state) = self.conns.get_mut(&conn) {
                    state.closed = true;
                    if state.in_flight == 0 {
                        self.conns.remove(&conn);
                    }
                }
            }
        }
    }

    /// Publishes `event` as the next message of `conn`.
    async fn publish(
        &mut self,
        conn: ConnId,
        kind: &'static str,
        extra: &[(&'static str, &str)],
        event: StreamEvent,
    ) {
        let Some(state) = self.conns.get_mut(&conn) else {
            return;
        };
        let seq = state.seq;
        state.seq += 1;
        let (port, src, dst, subject) = (state.port, state.src, state.dst, state.subject.clone());
        let data_len = event.data_len();
        let mut body = BytesMut::with_capacity(data_len + 64);
        ServerFrame::Event(event).encode(&mut body);
        let message = Message {
            conn,
            seq,
            port,
            src,
            dst,
            subject,
            headers: self.headers(&message_place(conn, port, src, dst, seq), kind, extra),
            body: body.freeze(),
            data_len,
            closes: kind == kind::CLOSED,
            first_sent: Instant::now(),
        };
        self.enter_window(message).await;
    }

    /// Publishes the message of `key` (again); its outcome joins
    /// [`Self::pending`] and makes any earlier one stale.
    async fn send(&mut self, key: u64) {
        let Some(entry) = self.in_flight.get_mut(&key) else {
            return;
        };
        entry.attempt += 1;
        entry.queued = false;
        let attempt = entry.attempt;
        let message = &entry.message;
        let publish = PublishMessage::build()
            .headers(message.headers.clone())
            .payload(message.body.clone());
        let subject = message.subject.clone();
        self.stats.published.fetch_add(1, Ordering::Relaxed);
        let ack: Ack = match self.js.send_publish(subject, publish).await {
            Ok(ack) => async move {
                let result = ack.await.map(drop).map_err(|error| error.to_string());
                (key, attempt, result)
            }
            .boxed(),
            Err(error) => {
                let error = error.to_string();
                async move { (key, attempt, Err(error)) }.boxed()
            }
        };
        self.pending.push(ack);
    }

    /// Sends the failed messages again.
    async fn send_retries(&mut self) {
        for key in std::mem::take(&mut self.retry) {
            self.stats.retried.fetch_add(1, Ordering::Relaxed);
            self.send(key).await;
        }
    }

    /// After a reconnect: every message still awaiting its outcome is sent
    /// again now (JetStream stores a message id once).
    async fn resend_in_flight(&mut self) {
        let mut keys: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, entry)| !entry.queued)
            .map(|(key, _)| *key)
            .collect();
        // In the order they were first published.
        keys.sort_unstable();
        if !keys.is_empty() {
            tracing::debug!("NATS: reconnected; sending {} messages again", keys.len());
        }
        for key in keys {
            self.stats.retried.fetch_add(1, Ordering::Relaxed);
            self.send(key).await;
        }
    }

    /// A new message takes its place in the window until its outcome
    /// (acknowledged or given up), and is published.
    async fn enter_window(&mut self, message: Message) {
        let key = self.next_key;
        self.next_key += 1;
        if let Some(state) = self.conns.get_mut(&message.conn) {
            state.in_flight += 1;
        }
        self.window_bytes += message.body.len();
        self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        self.stats
            .in_flight_bytes
            .fetch_add(message.body.len() as u64, Ordering::Relaxed);
        self.in_flight.insert(
            key,
            InFlight {
                message,
                attempt: 0,
                queued: false,
            },
        );
        self.send(key).await;
    }

    fn leave_window(&mut self, message: &Message) {
        if let Some(state) = self.conns.get_mut(&message.conn) {
            state.in_flight -= 1;
            if state.closed && state.in_flight == 0 {
                self.conns.remove(&message.conn);
            }
        }
        self.window_bytes -= message.body.len();
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.stats
            .in_flight_bytes
            .fetch_sub(message.body.len() as u64, Ordering::Relaxed);
    }

    async fn acknowledged(&mut self, key: u64, attempt: u32, result: Result<(), String>) {
        match self.in_flight.get(&key) {
            Some(entry) if entry.attempt == attempt && !entry.queued => {}
            // Acknowledged already, or sent again since.
            _ => return,
        }
        if let Err(error) = &result
            && self.in_flight[&key].message.first_sent.elapsed() < RETRY_FOR
        {
            // Waits for the next tick (also when it expires meanwhile).
            let entry = self.in_flight.get_mut(&key).expect("looked up above");
            entry.queued = true;
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                conn = entry.message.conn,
                seq = entry.message.seq,
                "NATS: publish failed ({error}); sending again"
            );
            self.retry.push_back(key);
            return;
        }
        let message = self
            .in_flight
            .remove(&key)
            .expect("looked up above")
            .message;
        let error = match result {
            Ok(()) => {
                self.leave_window(&message);
                self.stats.acked.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .bytes
                    .fetch_add(message.data_len as u64, Ordering::Relaxed);
                return;
            }
            Err(error) => error,
        };
        self.stats.failed.fetch_add(1, Ordering::Relaxed);
        self.give_up(message, &error).await;
    }

    /// `message` never made it: it leaves the window, and its connection
    /// ends at its place.
    async fn give_up(&mut self, message: Message, error: &str) {
        // Once per connection: later messages of one given up only leave
        // the window.
        let first = match self.conns.get_mut(&message.conn) {
            Some(state) if state.lost => false,
            Some(state) => {
                state.lost = true;
                true
            }
            None => true,
        };
        self.leave_window(&message);
        if !first {
            return;
        }
        if message.closes {
            tracing::warn!(
                conn = message.conn,
                "NATS: the close of a connection could not be published ({error})"
            );
            return;
        }
        // Given up: the connection ends at this message's place, so that a
        // reader never takes what came before it for the whole stream.
        tracing::warn!(
            conn = message.conn,
            seq = message.seq,
            "NATS: giving a connection up as lagged ({error})"
        );
        self.stats.lagged_closes.fetch_add(1, Ordering::Relaxed);
        let mut headers = self.headers(
            &message_place(
                message.conn,
                message.port,
                message.src,
                message.dst,
                message.seq,
            ),
            kind::CLOSED,
            &[(header::REASON, CloseReason::Lagged.as_str())],
        );
        // Not the given-up message's id: that one may be stored after all.
        headers.insert(
            header::MSG_ID,
            format!("{}.{}.{}.c", self.run, message.conn, message.seq).as_str(),
        );
        let mut body = BytesMut::with_capacity(16);
        ServerFrame::Event(StreamEvent::Closed {
            conn: message.conn,
            reason: CloseReason::Lagged,
        })
        .encode(&mut body);
        let close = Message {
            headers,
            body: body.freeze(),
            data_len: 0,
            closes: true,
            first_sent: Instant::now(),
            ..message
        };
        self.enter_window(close).await;
    }
}

/// Where a message belongs: its connection and its place in it.
struct Place {
    conn: ConnId,
    port: u16,
    src: SocketAddr,
    dst: SocketAddr,
    seq: u64,
}

fn message_place(conn: ConnId, port: u16, src: SocketAddr, dst: SocketAddr, seq: u64) -> Place {
    Place {
        conn,
        port,
        src,
        dst,
        seq,
    }
}

impl Publisher {
    fn headers(
        &self,
        place: &Place,
        kind: &'static str,
        extra: &[(&'static str, &str)],
    ) -> HeaderMap {
        let (run, conn, seq) = (&self.run, place.conn, place.seq);
        let mut headers = HeaderMap::new();
        headers.insert(header::NODE, self.config.node.as_str());
        headers.insert(header::RUN, run.as_str());
        headers.insert(header::CONN, conn.to_string().as_str());
        headers.insert(header::PORT, place.port.to_string().as_str());
        headers.insert(header::KIND, kind);
        headers.insert(header::SEQ, seq.to_string().as_str());
        headers.insert(header::SRC, place.src.to_string().as_str());
        headers.insert(header::DST, place.dst.to_string().as_str());
        for (name, value) in extra {
            headers.insert(*name, *value);
        }
        headers.insert(header::MSG_ID, format!("{run}.{conn}.{seq}").as_str());
        headers
    }
}

//! `mirror tail --nats`: the connections of a JetStream stream rebuilt
//! from their messages, each as the mirror delivered it (open, data in
//! order, close) or explicitly cut.
//!
//! Messages of a connection are put in `Mirror-Seq` order: a publish the
//! mirror retried can be stored after later ones. A connection whose
//! first message is not its open (retention dropped the start, or the
//! reader's consumer starts later) is shown as picked up midstream and
//! reported; one whose order cannot be restored within
//! [`MAX_HELD_MESSAGES`] / [`MAX_HELD_BYTES`] ends as `gap`.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    fmt,
    net::SocketAddr,
    num::NonZeroUsize,
    time::{Duration, Instant},
};

use async_nats::{HeaderMap, jetstream};
use bytes::Bytes;
use futures_util::StreamExt as _;
use lru::LruCache;

use super::{NatsError, NatsServers, header, kind, stream_name};
use crate::{
    flow::model::{CloseReason, ConnId, Direction, StreamEvent},
    server::protocol::ServerFrame,
};

/// Out-of-order messages held per connection, at most.
pub const MAX_HELD_MESSAGES: usize = 1024;
/// Their bytes, at most.
pub const MAX_HELD_BYTES: usize = 64 << 20;
/// Ended connections remembered, so that their late (retried) messages
/// are not taken for new connections.
const ENDED: usize = 1 << 16;
/// Connections followed at once: anyone who may publish on the subjects
/// could otherwise open connections (new node, run or conn values) that
/// never end. At the limit the least recently active one ends as `gap`.
pub const MAX_OPEN: usize = 1 << 16;
/// Out-of-order bytes held by all connections together (each may hold
/// [`MAX_HELD_BYTES`]): checked on every expiry pass (once a second of
/// stream time and on the reader's tick); over it, the connections
/// holding most end as `gap` until it fits.
pub const MAX_TOTAL_HELD: usize = 256 << 20;
/// A connection with no message for this long ends as `idle` (its
/// mirror may have died without publishing its close).
pub const IDLE_AFTER: Duration = Duration::from_secs(600);

/// The headers of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub node: String,
    pub run: String,
    pub conn: ConnId,
    pub port: u16,
    pub kind: Kind,
    pub seq: u64,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub dir: Direction,
    pub reason: Option<CloseReason>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Opened,
    Data,
    Closed,
}

impl Meta {
    /// The metadata of a message, or `None` when a header is missing or
    /// wrong (not a message of a mirror).
    pub fn from_headers(headers: &HeaderMap) -> Option<Self> {
        let get = |name: &str| headers.get(name).map(|value| value.as_str());
        let kind = match get(header::KIND)? {
            kind::OPENED => Kind::Opened,
            kind::DATA => Kind::Data,
            kind::CLOSED => Kind::Closed,
            _ => return None,
        };
        let reason = match get(header::REASON) {
            Some(text) => Some(
                CloseReason::ALL
                    .into_iter()
                    .find(|reason| reason.as_str() == text)?,
            ),
            None => None,
        };
        Some(Self {
            node: get(header::NODE)?.to_owned(),
            run: get(header::RUN)?.to_owned(),
            conn: get(header::CONN)?.parse().ok()?,
            port: get(header::PORT)?.parse().ok()?,
            kind,
            // Far below u64::MAX, which marks an ended connection, and
            // which no mirror reaches (one message per event).
            seq: get(header::SEQ)?
                .parse()
                .ok()
                .filter(|seq: &u64| *seq < 1 << 62)?,
            src: get(header::SRC)?.parse().ok()?,
            dst: get(header::DST)?.parse().ok()?,
            dir: match get(header::DIR) {
                Some("server") => Direction::Server,
                _ => Direction::Client,
            },
            reason,
        })
    }
}

/// A connection as the stream names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    node: String,
    run: String,
    conn: ConnId,
}

/// Something a reader is told besides the events (on standard error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// The connection's first messages are not in the stream: shown from
    /// message `from` on, as picked up midstream.
    StartedMidway {
        node: String,
        conn: ConnId,
        shown_as: ConnId,
        from: u64,
    },
    /// Messages are missing in the middle: the connection ends as `gap`.
    Missing {
        node: String,
        conn: ConnId,
        shown_as: ConnId,
        at: u64,
    },
    /// A message that is not a mirror's frame: the connection ends as `gap`.
    Malformed { subject: String },
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::StartedMidway {
                node,
                conn,
                shown_as,
                from,
            } => write!(
                f,
                "node {node} connection {conn} (shown as {shown_as}): its first {from} messages are gone from the stream (retention); shown from there on as midstream, not as a whole stream"
            ),
            Self::Missing {
                node,
                conn,
                shown_as,
                at,
            } => write!(
                f,
                "node {node} connection {conn} (shown as {shown_as}): message {at} is missing from the stream; the connection ends there as gap"
            ),
            Self::Malformed { subject } => {
                write!(f, "a message on {subject} is not a mirror's event; skipped")
            }
        }
    }
}

/// A message held until the ones before it arrive.
enum Held {
    Event(StreamEvent),
    Close(CloseReason),
}

struct Conn {
    shown_as: ConnId,
    /// Its open was shown (as the mirror announced it, or as midstream).
    shown: bool,
    src: SocketAddr,
    dst: SocketAddr,
    dir: Direction,
    next: u64,
    held: BTreeMap<u64, Held>,
    held_bytes: usize,
    /// Since when (the reader's clock, and the stream's time of the
    /// message that found it) a message before the held ones is missing.
    hole_since: Option<(Instant, u64)>,
    /// When its last message was read.
    last_seen: Instant,
}

/// Rebuilds connections from messages in the order the stream holds them.
pub struct Rebuilder {
    conns: HashMap<Key, Conn>,
    ended: LruCache<Key, ()>,
    last_shown: ConnId,
    /// The stream time (ms since the epoch) of the newest message read.
    stream_time: u64,
    /// The stream time of the last [`Self::expire`] from [`Self::accept`].
    expired_at: u64,
}

impl Default for Rebuilder {
    fn default() -> Self {
        Self {
            conns: HashMap::new(),
            ended: LruCache::new(NonZeroUsize::new(ENDED).expect("not zero")),
            last_shown: 0,
            stream_time: 0,
            expired_at: 0,
        }
    }
}

/// What became of a connection after a step.
enum Step {
    Open,
    Ended,
}

impl Rebuilder {
    /// Takes one message, stored at `published` (ms since the epoch,
    /// JetStream's time), read at `now`; the events it completes go to
    /// `out`, in order.
    pub fn accept(
        &mut self,
        meta: &Meta,
        body: Bytes,
        published: u64,
        now: Instant,
        out: &mut VecDeque<StreamEvent>,
    ) -> Vec<Note> {
        self.stream_time = self.stream_time.max(published);
        // Older connections first; once a second of stream time (and on
        // the reader's tick): the check walks every connection.
        let mut notes = Vec::new();
        if self.stream_time >= self.expired_at.saturating_add(1000) {
            self.expired_at = self.stream_time;
            notes = self.expire(now, out);
        }
        let key = Key {
            node: meta.node.clone(),
            run: meta.run.clone(),
            conn: meta.conn,
        };
        if self.ended.contains(&key) {
            return notes;
        }
        let event = match (meta.kind, ServerFrame::decode_shared(body)) {
            (Kind::Closed, _) => None,
            (Kind::Opened, Ok(ServerFrame::Event(event @ StreamEvent::Opened { .. })))
            | (Kind::Data, Ok(ServerFrame::Event(event @ StreamEvent::Data { .. }))) => Some(event),
            _ => {
                // Not what its headers say: the stream cannot be trusted
                // past it.
                notes.push(Note::Malformed {
                    subject: format!("{}.{}", meta.node, meta.conn),
                });
                if let Some(conn) = self.conns.remove(&key)
                    && conn.shown
                {
                    out.push_back(StreamEvent::Closed {
                        conn: conn.shown_as,
                        reason: CloseReason::Gap,
                    });
                }
                self.ended.put(key, ());
                return notes;
            }
        };
        if !self.conns.contains_key(&key) {
            if self.conns.len() >= MAX_OPEN
                && let Some(oldest) = self
                    .conns
                    .iter()
                    .min_by_key(|(_, conn)| conn.last_seen)
                    .map(|(key, _)| key.clone())
            {
                self.end(oldest, CloseReason::Gap, out);
            }
            self.last_shown += 1;
            self.conns.insert(
                key.clone(),
                Conn {
                    shown_as: self.last_shown,
                    shown: false,
                    src: meta.src,
                    dst: meta.dst,
                    dir: meta.dir,
                    next: 0,
                    held: BTreeMap::new(),
                    held_bytes: 0,
                    hole_since: None,
                    last_seen: now,
                },
            );
        }
        let conn = self.conns.get_mut(&key).expect("inserted above");
        conn.last_seen = now;
        let held = match (meta.kind, event) {
            (Kind::Closed, _) => Held::Close(meta.reason.unwrap_or(CloseReason::Gap)),
            (_, Some(event)) => Held::Event(event),
            (_, None) => return notes,
        };
        if meta.seq < conn.next {
            // A retried message stored twice, or a close given at the
            // place of a message that was stored after all: only a close
            // still counts.
            if let Held::Close(reason) = held {
                out.push_back(StreamEvent::Closed {
                    conn: conn.shown_as,
                    reason,
                });
                self.conns.remove(&key);
                self.ended.put(key, ());
            }
            return notes;
        }
        let len = match &held {
            Held::Event(event) => event.data_len(),
            Held::Close(_) => 0,
        };
        conn.dir = meta.dir;
        if let std::collections::btree_map::Entry::Vacant(place) = conn.held.entry(meta.seq) {
            place.insert(held);
            conn.held_bytes += len;
        }
        let mut ended = matches!(drain(conn, out), Step::Ended);
        if !ended {
            if conn.held.is_empty() {
                conn.hole_since = None;
            } else {
                conn.hole_since.get_or_insert((now, published));
                if conn.held.len() > MAX_HELD_MESSAGES || conn.held_bytes > MAX_HELD_BYTES {
                    notes.push(resolve(&key, conn, now, self.stream_time, out));
                    ended = ended_by_gap(conn);
                }
            }
        }
        if ended {
            self.conns.remove(&key);
            self.ended.put(key, ());
        }
        notes
    }

    /// Connections whose missing messages can no longer come: longer
    /// than [`WAIT_FOR_MISSING`] waiting, by the reader's clock or by the
    /// stream's (messages stored that much later were read). A missing
    /// start is shown as midstream, a missing middle ends as `gap`.
    pub fn expire(&mut self, now: Instant, out: &mut VecDeque<StreamEvent>) -> Vec<Note> {
        let waited_out = |(since, published): (Instant, u64)| {
            now.duration_since(since) >= WAIT_FOR_MISSING
                || self.stream_time.saturating_sub(published) >= WAIT_FOR_MISSING.as_millis() as u64
        };
        let expired: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, conn)| conn.hole_since.is_some_and(waited_out))
            .map(|(key, _)| key.clone())
            .collect();
        let mut notes = Vec::new();
        for key in expired {
            let conn = self.conns.get_mut(&key).expect("listed above");
            notes.push(resolve(&key, conn, now, self.stream_time, out));
            if ended_by_gap(conn) {
                self.conns.remove(&key);
                self.ended.put(key, ());
            }
        }
        let idle: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, conn)| now.duration_since(conn.last_seen) >= IDLE_AFTER)
            .map(|(key, _)| key.clone())
            .collect();
        for key in idle {
            self.end(key, CloseReason::Idle, out);
        }
        let mut total: usize = self.conns.values().map(|conn| conn.held_bytes).sum();
        while total > MAX_TOTAL_HELD {
            let Some((key, held)) = self
                .conns
                .iter()
                .max_by_key(|(_, conn)| conn.held_bytes)
                .map(|(key, conn)| (key.clone(), conn.held_bytes))
            else {
                break;
            };
            self.end(key, CloseReason::Gap, out);
            total -= held;
        }
        notes
    }

    /// Ends `key` with `reason` (shown if its open was) and remembers it,
    /// so that its later messages are not a new connection.
    fn end(&mut self, key: Key, reason: CloseReason, out: &mut VecDeque<StreamEvent>) {
        if let Some(conn) = self.conns.remove(&key)
            && conn.shown
        {
            out.push_back(StreamEvent::Closed {
                conn: conn.shown_as,
                reason,
            });
        }
        self.ended.put(key, ());
    }

    /// Connections followed now.
    pub fn open(&self) -> usize {
        self.conns.len()
    }
}

/// How long a connection waits for a missing message: the publisher
/// sends one again for [`super::publish::RETRY_FOR`] after its first
/// acknowledgement was due.
pub const WAIT_FOR_MISSING: Duration = Duration::from_secs(40);

/// Shows what `conn` holds in order, up to its first hole.
fn drain(conn: &mut Conn, out: &mut VecDeque<StreamEvent>) -> Step {
    while let Some(entry) = conn.held.first_entry() {
        if *entry.key() != conn.next {
            break;
        }
        conn.next += 1;
        match entry.remove() {
            Held::Event(event) => {
                conn.held_bytes -= event.data_len();
                if matches!(event, StreamEvent::Opened { .. }) {
                    conn.shown = true;
                } else if !conn.shown {
                    // A message before the open (never sent so): skip.
                    continue;
                }
                out.push_back(shown(event, conn.shown_as, conn.dir));
            }
            Held::Close(reason) => {
                if conn.shown {
                    out.push_back(StreamEvent::Closed {
                        conn: conn.shown_as,
                        reason,
                    });
                }
                return Step::Ended;
            }
        }
    }
    Step::Open
}

/// Gives up waiting for `conn`'s missing message: a missing start is
/// shown as midstream (and the rest drained), a missing middle ends the
/// connection as `gap` (marked by emptying it and clearing its hole).
fn resolve(
    key: &Key,
    conn: &mut Conn,
    now: Instant,
    stream_time: u64,
    out: &mut VecDeque<StreamEvent>,
) -> Note {
    let first = conn.held.keys().next().copied().unwrap_or(conn.next);
    if !conn.shown {
        let note = Note::StartedMidway {
            node: key.node.clone(),
            conn: key.conn,
            shown_as: conn.shown_as,
            from: first,
        };
        out.push_back(StreamEvent::Opened {
            conn: conn.shown_as,
            src: conn.src,
            dst: conn.dst,
            midstream: true,
            iface: Default::default(),
        });
        conn.shown = true;
        conn.next = first;
        conn.hole_since = None;
        if let Step::Ended = drain(conn, out) {
            conn.held.clear();
            conn.next = u64::MAX;
        } else if !conn.held.is_empty() {
            // Another hole behind the first: it waits its own while.
            conn.hole_since = Some((now, stream_time));
        }
        return note;
    }
    let note = Note::Missing {
        node: key.node.clone(),
        conn: key.conn,
        shown_as: conn.shown_as,
        at: conn.next,
    };
    out.push_back(StreamEvent::Closed {
        conn: conn.shown_as,
        reason: CloseReason::Gap,
    });
    conn.held.clear();
    conn.held_bytes = 0;
    conn.hole_since = None;
    conn.next = u64::MAX;
    note
}

/// Whether [`resolve`] or [`drain`] ended `conn` (its place is past any
/// message).
fn ended_by_gap(conn: &Conn) -> bool {
    conn.next == u64::MAX
}

/// `event` under the number the reader shows, with the direction its
/// headers name.
fn shown(event: StreamEvent, shown_as: ConnId, dir: Direction) -> StreamEvent {
    match event {
        StreamEvent::Opened {
            src,
            dst,
            midstream,
            iface,
            ..
        } => StreamEvent::Opened {
            conn: shown_as,
            src,
            dst,
            midstream,
            iface,
        },
        StreamEvent::Data {
            bytes, peer_acked, ..
        } => StreamEvent::Data {
            conn: shown_as,
            dir,
            bytes,
            peer_acked,
        },
        StreamEvent::Closed { reason, .. } => StreamEvent::Closed {
            conn: shown_as,
            reason,
        },
    }
}

/// What `mirror tail --nats` reads.
#[derive(Debug, Clone)]
pub struct ReaderConfig {
    pub servers: NatsServers,
    pub prefix: String,
    /// Only this node's connections; `None`: every node's.
    pub node: Option<String>,
    pub ports: Vec<u16>,
    /// A durable consumer of this name (resumes where it stopped);
    /// `None`: an ephemeral ordered consumer from the stream's start.
    pub durable: Option<String>,
}

type Messages =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<jetstream::Message, String>> + Send>>;

/// The events of the connections of a JetStream stream.
pub struct NatsReader {
    messages: Messages,
    ack: bool,
    ports: Vec<u16>,
    rebuilder: Rebuilder,
    out: VecDeque<StreamEvent>,
    stream: String,
    tick: tokio::time::Interval,
}

impl NatsReader {
    pub async fn connect(config: &ReaderConfig, creds: Option<&str>) -> Result<Self, NatsError> {
        let client = super::connect(&config.servers, creds, "mirror tail", None).await?;
        let js = jetstream::new(client);
        let name = stream_name(&config.prefix);
        let stream_error = |error: &dyn fmt::Display| NatsError::Stream {
            stream: name.clone(),
            message: error.to_string(),
        };
        let stream = tokio::time::timeout(std::time::Duration::from_secs(10), js.get_stream(&name))
            .await
            .map_err(|_| stream_error(&"NATS did not answer within 10 s"))?
            .map_err(|error| stream_error(&error))?;
        let node = config.node.as_deref().unwrap_or("*");
        // One port filters on the server; several take the node's subjects
        // and filter here (one filter subject is all a 2.9 server takes).
        let filter_subject = match config.ports[..] {
            [port] => format!("{}.{node}.{port}.*", config.prefix),
            _ => format!("{}.{node}.>", config.prefix),
        };
        let consume_error = |error: &dyn fmt::Display| NatsError::Consume {
            stream: name.clone(),
            message: error.to_string(),
        };
        let (messages, ack): (Messages, bool) = match &config.durable {
            None => {
                let consumer = stream
                    .create_consumer(jetstream::consumer::pull::OrderedConfig {
                        filter_subject,
                        deliver_policy: jetstream::consumer::DeliverPolicy::All,
                        ..Default::default()
                    })
                    .await
                    .map_err(|error| consume_error(&error))?;
                let messages = consumer
                    .messages()
                    .await
                    .map_err(|error| consume_error(&error))?;
                (
                    Box::pin(messages.map(|item| item.map_err(|error| error.to_string()))),
                    false,
                )
            }
            Some(durable) => {
                let consumer = stream
                    .get_or_create_consumer(
                        durable,
                        jetstream::consumer::pull::Config {
                            durable_name: Some(durable.clone()),
                            filter_subject,
                            deliver_policy: jetstream::consumer::DeliverPolicy::All,
                            ack_policy: jetstream::consumer::AckPolicy::Explicit,
                            ..Default::default()
                        },
                    )
                    .await
                    .map_err(|error| consume_error(&error))?;
                let messages = consumer
                    .messages()
                    .await
                    .map_err(|error| consume_error(&error))?;
                (
                    Box::pin(messages.map(|item| item.map_err(|error| error.to_string()))),
                    true,
                )
            }
        };
        Ok(Self {
            messages,
            ack,
            ports: config.ports.clone(),
            rebuilder: Rebuilder::default(),
            out: VecDeque::new(),
            stream: name,
            tick: tokio::time::interval(Duration::from_secs(1)),
        })
    }

    /// The next event; `None` when the consumer ended. Notes about cut
    /// connections go to standard error.
    pub async fn next_event(&mut self) -> Result<Option<StreamEvent>, NatsError> {
        loop {
            if let Some(event) = self.out.pop_front() {
                return Ok(Some(event));
            }
            let message = tokio::select! {
                message = self.messages.next() => message,
                _ = self.tick.tick() => {
                    // Nothing new: connections waiting for a message that
                    // cannot come any more are resolved all the same.
                    for note in self.rebuilder.expire(Instant::now(), &mut self.out) {
                        eprintln!("mirror tail: {note}");
                    }
                    continue;
                }
            };
            let Some(message) = message else {
                return Ok(None);
            };
            let message = match message {
                Ok(message) => message,
                Err(error) => {
                    // The consumer recovers by itself (a missed heartbeat
                    // while NATS fails over, a reconnect): say so and go on.
                    eprintln!("mirror tail: reading {}: {error}; going on", self.stream);
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    continue;
                }
            };
            if self.ack {
                // Taken: a durable consumer resumes after it.
                let _ = message.ack().await;
            }
            let meta = message.headers.as_ref().and_then(Meta::from_headers);
            let Some(meta) = meta else {
                eprintln!(
                    "mirror tail: {}",
                    Note::Malformed {
                        subject: message.subject.to_string()
                    }
                );
                continue;
            };
            if !self.ports.contains(&meta.port) {
                continue;
            }
            let published = message.info().map_or(0, |info| {
                u64::try_from(info.published.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
            });
            for note in self.rebuilder.accept(
                &meta,
                message.payload.clone(),
                published,
                Instant::now(),
                &mut self.out,
            ) {
                eprintln!("mirror tail: {note}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use super::*;

    fn meta(conn: ConnId, seq: u64, kind: Kind) -> Meta {
        Meta {
            node: "a".into(),
            run: "r".into(),
            conn,
            port: 80,
            kind,
            seq,
            src: "198.18.0.1:40000".parse().unwrap(),
            dst: "198.18.0.2:80".parse().unwrap(),
            dir: Direction::Client,
            reason: (kind == Kind::Closed).then_some(CloseReason::Fin),
        }
    }

    fn body(event: StreamEvent) -> Bytes {
        let mut out = BytesMut::new();
        ServerFrame::Event(event).encode(&mut out);
        out.freeze()
    }

    fn opened(conn: ConnId) -> Bytes {
        body(StreamEvent::Opened {
            conn,
            src: "198.18.0.1:40000".parse().unwrap(),
            dst: "198.18.0.2:80".parse().unwrap(),
            midstream: false,
            iface: Default::default(),
        })
    }

    fn data(conn: ConnId, bytes: &'static [u8]) -> Bytes {
        body(StreamEvent::Data {
            conn,
            dir: Direction::Client,
            bytes: Bytes::from_static(bytes),
            peer_acked: 0,
        })
    }

    fn closed(conn: ConnId) -> Bytes {
        body(StreamEvent::Closed {
            conn,
            reason: CloseReason::Fin,
        })
    }

    #[test]
    fn the_reader_follows_a_bounded_number_of_connections_and_ends_idle_ones() {
        let mut rebuilder = Rebuilder::default();
        let mut out = VecDeque::new();
        let start = Instant::now();
        // Opens that never end, from a publisher that makes up connections.
        for conn in 1..=(MAX_OPEN as u64 + 10) {
            let at = start + Duration::from_millis(conn);
            rebuilder.accept(&meta(conn, 0, Kind::Opened), opened(conn), 0, at, &mut out);
        }
        assert_eq!(rebuilder.open(), MAX_OPEN);
        let gaps = out
            .iter()
            .filter(|event| {
                matches!(
                    event,
                    StreamEvent::Closed {
                        reason: CloseReason::Gap,
                        ..
                    }
                )
            })
            .count();
        assert_eq!(gaps, 10, "the least recently active ones made room");
        // Nothing more for longer than IDLE_AFTER: all end as idle.
        out.clear();
        let later = start + IDLE_AFTER + Duration::from_secs(120);
        rebuilder.expire(later, &mut out);
        assert_eq!(rebuilder.open(), 0);
        assert_eq!(out.len(), MAX_OPEN);
        assert!(out.iter().all(|event| matches!(
            event,
            StreamEvent::Closed {
                reason: CloseReason::Idle,
                ..
            }
        )));
    }

    #[test]
    fn a_sequence_number_at_the_end_of_the_range_is_not_a_mirrors() {
        let mut headers = HeaderMap::new();
        let m = meta(1, 5, Kind::Data);
        for (name, value) in [
            (header::KIND, kind::DATA.to_owned()),
            (header::NODE, m.node.clone()),
            (header::RUN, m.run.clone()),
            (header::CONN, "1".to_owned()),
            (header::PORT, "80".to_owned()),
            (header::SRC, m.src.to_string()),
            (header::DST, m.dst.to_string()),
        ] {
            headers.insert(name, value.as_str());
        }
        headers.insert(header::SEQ, "5");
        assert_eq!(Meta::from_headers(&headers).map(|meta| meta.seq), Some(5));
        headers.insert(header::SEQ, u64::MAX.to_string().as_str());
        assert_eq!(Meta::from_headers(&headers), None);
    }

    fn bytes_of(events: &VecDeque<StreamEvent>) -> Vec<u8> {
        events
            .iter()
            .filter_map(|event| match event {
                StreamEvent::Data { bytes, .. } => Some(bytes.to_vec()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    /// Feeds messages at stream time `at` (ms) and reader time `now`.
    fn feed(
        rebuilder: &mut Rebuilder,
        messages: &[(Meta, Bytes)],
        at: u64,
        now: Instant,
        out: &mut VecDeque<StreamEvent>,
    ) -> Vec<Note> {
        messages
            .iter()
            .flat_map(|(meta, body)| rebuilder.accept(meta, body.clone(), at, now, out))
            .collect()
    }

    #[test]
    fn messages_out_of_order_are_put_back_in_order() {
        let mut rebuilder = Rebuilder::default();
        let mut out = VecDeque::new();
        let now = Instant::now();
        // The open and 1 retried: stored after 2; 2 is stored twice.
        let notes = feed(
            &mut rebuilder,
            &[
                (meta(9, 2, Kind::Data), data(9, b"world")),
                (meta(9, 0, Kind::Opened), opened(9)),
                (meta(9, 2, Kind::Data), data(9, b"world")),
                (meta(9, 1, Kind::Data), data(9, b"hello ")),
                (meta(9, 3, Kind::Closed), closed(9)),
            ],
            1_000,
            now,
            &mut out,
        );
        assert_eq!(notes, []);
        assert_eq!(bytes_of(&out), b"hello world");
        assert!(matches!(
            out.front(),
            Some(StreamEvent::Opened {
                conn: 1,
                midstream: false,
                ..
            })
        ));
        assert_eq!(
            out.back(),
            Some(&StreamEvent::Closed {
                conn: 1,
                reason: CloseReason::Fin
            })
        );
        // A late duplicate of an ended connection is not a new one.
        feed(
            &mut rebuilder,
            &[(meta(9, 2, Kind::Data), data(9, b"world"))],
            1_000,
            now,
            &mut out,
        );
        assert_eq!(out.len(), 4);
    }

    #[test]
    fn a_stream_without_its_start_is_reported_and_shown_as_midstream() {
        let mut rebuilder = Rebuilder::default();
        let mut out = VecDeque::new();
        let now = Instant::now();
        let tail = [
            (meta(4, 5, Kind::Data), data(4, b"tail")),
            (meta(4, 6, Kind::Closed), closed(4)),
        ];
        assert_eq!(feed(&mut rebuilder, &tail, 1_000, now, &mut out), []);
        assert!(out.is_empty(), "its start may still come (a retry)");
        // Messages stored long after: the start cannot come any more.
        let later = 1_000 + WAIT_FOR_MISSING.as_millis() as u64;
        let notes = feed(
            &mut rebuilder,
            &[(meta(8, 0, Kind::Opened), opened(8))],
            later,
            now,
            &mut out,
        );
        assert!(
            matches!(
                notes[..],
                [Note::StartedMidway {
                    from: 5,
                    shown_as: 1,
                    ..
                }]
            ),
            "{notes:?}"
        );
        assert!(matches!(
            out[0],
            StreamEvent::Opened {
                conn: 1,
                midstream: true,
                ..
            }
        ));
        assert_eq!(bytes_of(&out), b"tail");
        assert!(out.contains(&StreamEvent::Closed {
            conn: 1,
            reason: CloseReason::Fin
        }));
        // The reader's clock alone ends the wait too.
        let mut rebuilder = Rebuilder::default();
        let mut out = VecDeque::new();
        feed(&mut rebuilder, &tail, 1_000, now, &mut out);
        assert_eq!(rebuilder.expire(now + WAIT_FOR_MISSING / 2, &mut out), []);
        assert_eq!(rebuilder.expire(now + WAIT_FOR_MISSING, &mut out).len(), 1);
        assert_eq!(bytes_of(&out), b"tail");
    }

    #[test]
    fn a_close_at_a_lost_place_cuts_the_stream_there() {
        let mut rebuilder = Rebuilder::default();
        let mut out = VecDeque::new();
        let mut lagged = meta(3, 2, Kind::Closed);
        lagged.reason = Some(CloseReason::Lagged);
        // Message 2 was given up; 3 made it; the close takes 2's place.
        feed(
            &mut rebuilder,
            &[
                (meta(3, 0, Kind::Opened), opened(3)),
                (meta(3, 1, Kind::Data), data(3, b"a")),
                (meta(3, 3, Kind::Data), data(3, b"c")),
                (lagged, closed(3)),
            ],
            1_000,
            Instant::now(),
            &mut out,
        );
        assert_eq!(bytes_of(&out), b"a");
        assert_eq!(
            out.back(),
            Some(&StreamEvent::Closed {
                conn: 1,
                reason: CloseReason::Lagged
            })
        );
    }

    #[test]
    fn a_hole_that_never_fills_ends_as_gap_within_bounds() {
        let mut rebuilder = Rebuilder::default();
        let mut out = VecDeque::new();
        let now = Instant::now();
        feed(
            &mut rebuilder,
            &[(meta(1, 0, Kind::Opened), opened(1))],
            1_000,
            now,
            &mut out,
        );
        let mut notes = Vec::new();
        for seq in 2..(MAX_HELD_MESSAGES as u64 + 3) {
            notes.extend(feed(
                &mut rebuilder,
                &[(meta(1, seq, Kind::Data), data(1, b"x"))],
                1_000,
                now,
                &mut out,
            ));
        }
        assert!(
            matches!(notes[..], [Note::Missing { at: 1, .. }]),
            "{notes:?}"
        );
        assert_eq!(
            out.back(),
            Some(&StreamEvent::Closed {
                conn: 1,
                reason: CloseReason::Gap
            })
        );
        assert_eq!(bytes_of(&out), b"");
        // The same hole, waited out by time.
        let mut rebuilder = Rebuilder::default();
        let mut out = VecDeque::new();
        feed(
            &mut rebuilder,
            &[
                (meta(1, 0, Kind::Opened), opened(1)),
                (meta(1, 2, Kind::Data), data(1, b"x")),
            ],
            1_000,
            now,
            &mut out,
        );
        let notes = rebuilder.expire(now + WAIT_FOR_MISSING, &mut out);
        assert!(
            matches!(notes[..], [Note::Missing { at: 1, .. }]),
            "{notes:?}"
        );
        assert!(out.contains(&StreamEvent::Closed {
            conn: 1,
            reason: CloseReason::Gap
        }));
    }

    #[test]
    fn a_body_that_is_not_its_kind_ends_the_connection() {
        let mut rebuilder = Rebuilder::default();
        let mut out = VecDeque::new();
        let notes = feed(
            &mut rebuilder,
            &[
                (meta(1, 0, Kind::Opened), opened(1)),
                (meta(1, 1, Kind::Data), Bytes::from_static(b"\x83")),
            ],
            1_000,
            Instant::now(),
            &mut out,
        );
        assert!(matches!(notes[..], [Note::Malformed { .. }]));
        assert_eq!(
            out.back(),
            Some(&StreamEvent::Closed {
                conn: 1,
                reason: CloseReason::Gap
            })
        );
    }
}

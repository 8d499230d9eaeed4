//! The connection table of one flow shard, sans-IO like the reassembler:
//! segments, losses and the current time go in, stream events come out.
//!
//! A connection starts on the client's SYN, and is announced to consumers
//! (`Opened`) only once it carries something: just before its first byte
//! is delivered, or before its close when a FIN, an RST or bytes it
//! carried but could not deliver end it. A bare SYN costs a table entry and
//! nothing downstream: a SYN flood opens no dump file and no shadow
//! connection, and its entries are the first to make room in a full table.
//! A connection that ends without carrying anything (idle, evicted, lost,
//! shutdown) is counted as `silent` and never shown.
//!
//! Data of a flow without a SYN first waits, within the reorder budget, for
//! a SYN that may still sit in another CPU's ring; when none comes, the flow
//! opens `midstream` at the lowest sequence number seen (a connection that
//! ran before the mirror started, or resumes after a loss). A connection
//! closes on FIN (reached in order), RST, idleness, a hole (`gap`), or
//! eviction when the table or its buffered bytes reach their limits: the
//! least recently seen connection goes first. Every close of an announced
//! connection is an event with its reason.
//!
//! With `--directions both` the server's answers come in too, keyed by
//! their connection's client-to-server tuple: one entry, one id, the
//! client's and the server's streams reassembled apart. The server's
//! stream starts at its SYN-ACK (or at the first answer seen); the
//! connection ends `fin` once both FINs are reached in order (the client's
//! alone while no answer came, as with `--directions client`), and a hole
//! or an RST in either direction ends it, the RST judged against its
//! sender's own stream.
//!
//! Spoofed segments (RFC 5961, as far as one direction shows): an RST ends
//! a connection only inside the window [`Reassembler::accepts_rst`]
//! describes (or, when it is beyond what the client has shown, once the
//! client's data turns out to end exactly there within the reorder
//! timeout: it overtook them through another ring), and a SYN with another ISN replaces a live connection only
//! once that connection sent its FIN or has been quiet for
//! [`SYN_QUIET_NS`]; other RSTs and SYNs are counted and ignored.
//!
//! [`Delivery::Acked`] (`--deliver acked`, with both directions) delivers a
//! byte only once the other side's ACK covers it, as the receiver's TCP
//! took it: bytes that a firewall, the receiver's checks or a full socket
//! dropped after the mirror saw them are never delivered. The receiver's
//! own checks are emulated so that blatant spoofs never count: a segment
//! acknowledging bytes never sent is ignored, and an RST is believed at the
//! receiver's acknowledged point or exactly at its sender's edge.

use std::{collections::HashSet, num::NonZeroUsize};

use bytes::Bytes;
use lru::LruCache;

use crate::flow::{
    ifaces::{IfaceId, IfaceNames},
    model::{CloseReason, ConnId, ConnIds, Direction, EventSink, FlowKey, StreamEvent},
    reassembly::{Hole, HoleCause, Reassembler, ReorderLimits, detach, held_cost},
    segment::{Segment, TcpFlags},
};

/// Limits of one shard's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableLimits {
    pub max_connections: usize,
    /// Memory held in reorder buffers and SYN waits, all connections
    /// together, as [`held_cost`] counts it.
    pub max_buffered_bytes: usize,
    pub idle_timeout_ns: u64,
    pub reorder: ReorderLimits,
    pub deliver: Delivery,
}

/// When a byte is delivered (`--deliver`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Delivery {
    /// As soon as the stream has it in order: what arrived at the
    /// interface.
    #[default]
    Seen,
    /// Once the other side's ACK covers it (and a FIN once acknowledged):
    /// what the receiver's TCP took. Needs both directions.
    Acked,
}

impl TableLimits {
    /// A stream of this table whose next byte is `next_seq`.
    fn stream(&self, next_seq: u32) -> Reassembler {
        match self.deliver {
            Delivery::Seen => Reassembler::new(next_seq, self.reorder),
            Delivery::Acked => Reassembler::with_acks(next_seq, self.reorder),
        }
    }
}

/// How long a connection must have been quiet before a SYN with another
/// ISN may take its 4-tuple (unless it sent its FIN). A live connection
/// answers such a SYN with a challenge ACK (RFC 5961 section 4), and a
/// client that really lost the old connection answers that with an RST at
/// the exact sequence number, which ends it here too; so a blind SYN can
/// never end a connection that is in use, and a 4-tuple whose end the
/// mirror could not see (the server's RST travels the other way) is
/// usable again after this long. Capped by the idle timeout.
pub const SYN_QUIET_NS: u64 = 5_000_000_000;

/// What a table did, and holds now: the flow stage's counters. Plain
/// numbers: a table belongs to one shard, which publishes a copy (summed
/// over shards by the pipeline).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableCounters {
    /// Connections announced to consumers.
    pub opened: u64,
    pub opened_midstream: u64,
    pub closed: [u64; CloseReason::ALL.len()],
    /// Connections that began with a SYN and ended (idle, evicted, lost,
    /// shutdown) without a byte, FIN or RST: never announced.
    pub silent: u64,
    /// Bytes known to be missing where streams ended with `gap`.
    pub missing_bytes: u64,
    /// Segments of no known connection that could not open one (a pure
    /// ACK, FIN or RST of a connection that started before the mirror),
    /// and segments that arrived after their connection's FIN or RST.
    pub untracked: u64,
    /// RSTs outside the window the connection showed (RFC 5961).
    pub ignored_rsts: u64,
    /// SYNs with another ISN on a connection that was neither finished
    /// nor quiet.
    pub ignored_syns: u64,
    pub delivered_bytes: u64,
    /// Segments ignored for acknowledging bytes their receiver never sent
    /// (`--deliver acked`).
    pub invalid_acks: u64,
    /// Connections closed (`gap`) because a copy of bytes waiting for their
    /// ACK differed from the first (`--deliver acked`).
    pub conflicting_copies: u64,
    /// Connections closed (`gap`) because the bytes waiting for their ACK
    /// exceeded the reorder budget (`--deliver acked`).
    pub unacked_overflow: u64,
    /// Bytes still waiting for their ACK when their connection closed:
    /// never delivered (`--deliver acked`).
    pub unacked_bytes: u64,
    /// Connections tracked now (a gauge).
    pub open: u64,
    /// Memory held in reorder buffers and SYN waits now (a gauge).
    pub held_bytes: u64,
}

impl TableCounters {
    pub fn closed(&self, reason: CloseReason) -> u64 {
        self.closed[reason as usize]
    }

    pub fn add(&mut self, other: &Self) {
        self.opened += other.opened;
        self.opened_midstream += other.opened_midstream;
        for (total, n) in self.closed.iter_mut().zip(other.closed) {
            *total += n;
        }
        self.silent += other.silent;
        self.missing_bytes += other.missing_bytes;
        self.untracked += other.untracked;
        self.ignored_rsts += other.ignored_rsts;
        self.ignored_syns += other.ignored_syns;
        self.delivered_bytes += other.delivered_bytes;
        self.invalid_acks += other.invalid_acks;
        self.conflicting_copies += other.conflicting_copies;
        self.unacked_overflow += other.unacked_overflow;
        self.unacked_bytes += other.unacked_bytes;
        self.open += other.open;
        self.held_bytes += other.held_bytes;
    }
}

/// The `connections` section of the counters document.
impl serde::Serialize for TableCounters {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;

        struct Closed<'a>(&'a TableCounters);
        impl serde::Serialize for Closed<'_> {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let mut map = serializer.serialize_map(Some(CloseReason::ALL.len()))?;
                for reason in CloseReason::ALL {
                    map.serialize_entry(reason.as_str(), &self.0.closed(reason))?;
                }
                map.end()
            }
        }

        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("opened", &self.opened)?;
        map.serialize_entry("midstream", &self.opened_midstream)?;
        map.serialize_entry("untracked_segments", &self.untracked)?;
        map.serialize_entry("silent", &self.silent)?;
        map.serialize_entry("ignored_rsts", &self.ignored_rsts)?;
        map.serialize_entry("ignored_syns", &self.ignored_syns)?;
        map.serialize_entry("delivered_bytes", &self.delivered_bytes)?;
        map.serialize_entry("missing_bytes", &self.missing_bytes)?;
        map.serialize_entry("invalid_acks", &self.invalid_acks)?;
        map.serialize_entry("conflicting_copies", &self.conflicting_copies)?;
        map.serialize_entry("unacked_overflow", &self.unacked_overflow)?;
        map.serialize_entry("unacked_bytes", &self.unacked_bytes)?;
        map.serialize_entry("closed", &Closed(self))?;
        map.serialize_entry("open", &self.open)?;
        map.serialize_entry("held_bytes", &self.held_bytes)?;
        map.end()
    }
}

struct Connection {
    phase: Phase,
    last_seen_ns: u64,
    /// The interface of the segment that started tracking it.
    iface: IfaceId,
    /// Memory held for this flow (reorder buffers or waiting segments), as
    /// last counted into the table's total.
    held: usize,
}

/// A segment of a flow that waits for its SYN: direction, sequence number,
/// ACK number, payload (copied out of the pool, [`detach`]), FIN.
type Waiting = (Direction, u32, Option<u32>, Bytes, bool);

/// The latest pure ACK of each direction of a waiting flow (sequence and
/// ACK numbers): ACKs are cumulative, the latest stands for the others.
type WaitingAcks = [Option<(u32, u32)>; 2];

enum Phase {
    /// Data without a SYN: waiting for the SYN from another CPU's ring.
    Waiting {
        segments: Vec<Waiting>,
        since_ns: u64,
        /// The sequence space each direction's segments cover (client,
        /// server), for RST checks and a midstream start.
        spans: [Option<Span>; 2],
        /// Sequence number right after a SYN-ACK seen meanwhile.
        syn_ack_next: Option<u32>,
        acks: WaitingAcks,
    },
    Open {
        /// Assigned when the connection is announced.
        id: Option<ConnId>,
        midstream: bool,
        /// It took a byte or a FIN (delivered or not), or a truncated
        /// segment: consumers hear of it at its close at the latest.
        carried: bool,
        /// Sequence number right after the SYN, to recognize its
        /// retransmission.
        syn_next: Option<u32>,
        /// The same for the server's SYN-ACK.
        syn_ack_next: Option<u32>,
        /// The client's stream: from its SYN, or from the first byte or
        /// FIN seen (midstream).
        client: Option<Reassembler>,
        /// The server's answers (`--directions both`): from its SYN-ACK,
        /// or from the first answer seen. None as long as no answer came:
        /// the client's FIN alone then ends the connection.
        server: Option<Reassembler>,
        /// An RST beyond what its sender has shown, with when it came: it
        /// ends the connection if the sender's data turns out to end
        /// exactly there within the reorder timeout (it overtook them
        /// through another CPU's ring), and is ignored otherwise.
        pending_rst: Option<(Direction, u32, u64)>,
    },
}

/// The other direction.
fn peer(dir: Direction) -> Direction {
    match dir {
        Direction::Client => Direction::Server,
        Direction::Server => Direction::Client,
    }
}

/// The stream of `dir` in an open connection.
fn side<'a>(
    client: &'a mut Option<Reassembler>,
    server: &'a mut Option<Reassembler>,
    dir: Direction,
) -> &'a mut Option<Reassembler> {
    match dir {
        Direction::Client => client,
        Direction::Server => server,
    }
}

/// Whether both directions are complete: the client's FIN was reached in
/// order, and the server's too if its answers are followed.
fn both_finished(client: Option<&Reassembler>, server: Option<&Reassembler>) -> bool {
    client.is_some_and(Reassembler::is_finished) && server.is_none_or(Reassembler::is_finished)
}

/// A range of sequence numbers, relative to a first one (wrapping).
#[derive(Clone, Copy)]
struct Span {
    first: u32,
    low: i64,
    high: i64,
}

impl Span {
    fn new(first: u32) -> Self {
        Self {
            first,
            low: 0,
            high: 0,
        }
    }

    fn rel(&self, seq: u32) -> i64 {
        i64::from(seq.wrapping_sub(self.first) as i32)
    }

    fn add(&mut self, seq: u32, len: usize, fin: bool) {
        let start = self.rel(seq);
        self.low = self.low.min(start);
        self.high = self.high.max(start + len as i64 + i64::from(fin));
    }

    fn contains(&self, seq: u32) -> bool {
        (self.low..=self.high).contains(&self.rel(seq))
    }

    fn start(&self) -> u32 {
        self.first.wrapping_add(self.low as u32)
    }
}

/// How a SYN on a tracked flow is taken.
enum SynOutcome {
    /// A retransmission of the SYN that opened the connection.
    Retransmitted,
    /// It (re)starts the flow.
    Opened,
    /// Another ISN on a connection in use: not believed.
    Ignored,
}

/// How long a flow closed by FIN or RST ignores segments without SYN:
/// retransmissions that arrive after the close are not a new connection.
const ENDED_GRACE_NS: u64 = 10_000_000_000;
/// Closed flows remembered at once (the oldest are forgotten first).
const ENDED_CAPACITY: usize = 65536;

pub struct ConnectionTable {
    /// Least recently seen first.
    conns: LruCache<FlowKey, Connection>,
    /// Connections that have carried nothing yet (a bare SYN, maybe a
    /// flood), least recently opened first: they make room first.
    bare: LruCache<FlowKey, ()>,
    /// Flows recently closed by FIN or RST, with when they were closed.
    ended: LruCache<FlowKey, u64>,
    /// Flows with a deadline: bytes held behind a hole, a FIN beyond one,
    /// or data waiting for its SYN.
    timed: HashSet<FlowKey>,
    buffered: usize,
    limits: TableLimits,
    ids: ConnIds,
    stats: TableCounters,
    scratch: Vec<Bytes>,
    /// Bytes of the other direction that a segment's ACK released.
    peer_scratch: Vec<Bytes>,
    /// Names the interface of each connection when it is announced.
    ifaces: IfaceNames,
    /// The interface of the segment being taken.
    iface: IfaceId,
}

impl ConnectionTable {
    /// A table whose connections take their ids from `ids` (shared by
    /// every shard's table).
    pub fn new(limits: TableLimits, ids: ConnIds) -> Self {
        Self {
            conns: LruCache::unbounded(),
            bare: LruCache::unbounded(),
            ended: LruCache::new(NonZeroUsize::new(ENDED_CAPACITY).expect("non-zero")),
            timed: HashSet::new(),
            buffered: 0,
            limits,
            ids,
            stats: TableCounters::default(),
            scratch: Vec::new(),
            peer_scratch: Vec::new(),
            ifaces: IfaceNames::default(),
            iface: IfaceId::default(),
        }
    }

    /// Names each connection's interface from `ifaces` (else they are
    /// announced with an empty name).
    #[must_use]
    pub fn with_iface_names(mut self, ifaces: IfaceNames) -> Self {
        self.ifaces = ifaces;
        self
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Memory held in reorder buffers and SYN waits.
    pub fn buffered_bytes(&self) -> usize {
        self.buffered
    }

    pub fn stats(&self) -> &TableCounters {
        &self.stats
    }

    /// Its counters now, with the gauges filled in.
    pub fn counters(&self) -> TableCounters {
        TableCounters {
            open: self.conns.len() as u64,
            held_bytes: self.buffered as u64,
            ..self.stats
        }
    }

    /// Takes one segment, of either direction.
    pub fn segment(&mut self, segment: Segment, now_ns: u64, sink: &mut impl EventSink) {
        let Segment {
            flow,
            dir,
            seq,
            ack,
            flags,
            payload,
            truncated,
            iface,
        } = segment;
        let ack = flags.contains(TcpFlags::ACK).then_some(ack);
        self.iface = iface;
        if flags.contains(TcpFlags::RST) {
            self.rst(&flow, dir, seq, now_ns, sink);
            return;
        }
        if flags.contains(TcpFlags::SYN) && dir == Direction::Server {
            if !self.syn_ack(&flow, seq, now_ns) {
                return;
            }
        } else if flags.contains(TcpFlags::SYN) {
            self.ended.pop(&flow);
            if matches!(self.syn(flow, seq, now_ns, sink), SynOutcome::Ignored) {
                return;
            }
        } else if !self.conns.contains(&flow) {
            if let Some(closed_ns) = self.ended.get(&flow) {
                if now_ns.saturating_sub(*closed_ns) <= ENDED_GRACE_NS {
                    self.stats.untracked += 1;
                    return;
                }
                self.ended.pop(&flow);
            }
            if payload.is_empty() || truncated {
                self.stats.untracked += 1;
                return;
            }
            self.make_room(sink);
            self.conns.put(
                flow,
                Connection {
                    phase: Phase::Waiting {
                        segments: Vec::new(),
                        since_ns: now_ns,
                        spans: [None, None],
                        syn_ack_next: None,
                        acks: [None, None],
                    },
                    last_seen_ns: now_ns,
                    iface: self.iface,
                    held: 0,
                },
            );
            self.timed.insert(flow);
        }
        if truncated {
            // Bytes the stream carried were not captured (--snaplen).
            if let Some(Phase::Open { carried, .. }) =
                self.conns.peek_mut(&flow).map(|conn| &mut conn.phase)
            {
                *carried = true;
            }
            self.close(&flow, CloseReason::Gap, sink);
            return;
        }
        let data_seq = if flags.contains(TcpFlags::SYN) {
            seq.wrapping_add(1)
        } else {
            seq
        };
        self.feed(
            &flow,
            dir,
            data_seq,
            ack,
            payload,
            flags.contains(TcpFlags::FIN),
            now_ns,
            sink,
        );
        self.enforce_buffer_limit(sink);
    }

    /// A segment of `flow` was lost before reaching the table (a full
    /// queue or ring): its stream cannot continue.
    pub fn lost(&mut self, flow: &FlowKey, sink: &mut impl EventSink) {
        if self.conns.contains(flow) {
            tracing::debug!(src = %flow.src, dst = %flow.dst, "segment lost upstream");
            self.close(flow, CloseReason::Gap, sink);
        }
    }

    /// Closes idle connections and holes that waited too long, and opens
    /// the flows whose SYN did not come as `midstream`.
    pub fn tick(&mut self, now_ns: u64, sink: &mut impl EventSink) {
        let timed: Vec<FlowKey> = self.timed.iter().copied().collect();
        for flow in timed {
            let Some(conn) = self.conns.peek(&flow) else {
                self.timed.remove(&flow);
                continue;
            };
            match &conn.phase {
                Phase::Waiting { since_ns, .. } => {
                    if now_ns.saturating_sub(*since_ns) > self.limits.reorder.max_wait_ns {
                        self.open_midstream(&flow, now_ns, sink);
                    }
                }
                Phase::Open {
                    client,
                    server,
                    pending_rst,
                    ..
                } => {
                    let hole = [client, server]
                        .into_iter()
                        .flatten()
                        .find_map(|stream| stream.poll(now_ns).err());
                    if let Some(hole) = hole {
                        self.gap(&flow, hole, sink);
                    } else if pending_rst.is_some_and(|(_, _, since)| {
                        now_ns.saturating_sub(since) > self.limits.reorder.max_wait_ns
                    }) {
                        // The data it waited for never came.
                        self.stats.ignored_rsts += 1;
                        let waits = [client, server]
                            .into_iter()
                            .flatten()
                            .any(|s| s.is_waiting());
                        if let Some(Phase::Open { pending_rst, .. }) =
                            self.conns.peek_mut(&flow).map(|conn| &mut conn.phase)
                        {
                            *pending_rst = None;
                        }
                        if !waits {
                            self.timed.remove(&flow);
                        }
                    }
                }
            }
        }
        while let Some(flow) = self
            .conns
            .peek_lru()
            .filter(|(_, c)| now_ns.saturating_sub(c.last_seen_ns) > self.limits.idle_timeout_ns)
            .map(|(flow, _)| *flow)
        {
            self.close(&flow, CloseReason::Idle, sink);
        }
    }

    /// Closes every connection (the mirror stops). Flows still waiting for
    /// a SYN open first, so their bytes are not lost.
    pub fn close_all(&mut self, reason: CloseReason, sink: &mut impl EventSink) {
        let waiting: Vec<FlowKey> = self
            .conns
            .iter()
            .filter(|(_, c)| matches!(c.phase, Phase::Waiting { .. }))
            .map(|(flow, _)| *flow)
            .collect();
        for flow in waiting {
            self.open_midstream(&flow, 0, sink);
        }
        while let Some(flow) = self.conns.peek_lru().map(|(flow, _)| *flow) {
            self.close(&flow, reason, sink);
        }
    }

    /// An RST ends its connection if it is where its sender's next
    /// sequence number can be (checked against the sender's own stream);
    /// one beyond what the sender has shown waits for its data; others are
    /// counted and ignored.
    fn rst(
        &mut self,
        flow: &FlowKey,
        dir: Direction,
        seq: u32,
        now_ns: u64,
        sink: &mut impl EventSink,
    ) {
        let Some(conn) = self.conns.peek_mut(flow) else {
            self.stats.untracked += 1;
            return;
        };
        let (believed, waiting) = match &mut conn.phase {
            Phase::Waiting { spans, .. } => (
                spans[dir as usize].is_some_and(|span| span.contains(seq)),
                true,
            ),
            Phase::Open {
                client,
                server,
                pending_rst,
                ..
            } => {
                // A sender that showed nothing has no window to check.
                let Some(stream) = side(client, server, dir) else {
                    self.stats.ignored_rsts += 1;
                    return;
                };
                let accepted = match self.limits.deliver {
                    Delivery::Seen => stream.accepts_rst(seq),
                    // RFC 5961 with the receiver's side in view: its
                    // RCV.NXT is its latest ACK; the sender's own RST
                    // carries its SND.NXT, the edge of what it showed.
                    Delivery::Acked => stream.acked_seq() == Some(seq) || stream.shown_seq() == seq,
                };
                if !accepted && stream.is_ahead(seq) {
                    if pending_rst.replace((dir, seq, now_ns)).is_some() {
                        self.stats.ignored_rsts += 1;
                    }
                    self.timed.insert(*flow);
                    return;
                }
                (accepted, false)
            }
        };
        if !believed {
            self.stats.ignored_rsts += 1;
            return;
        }
        if waiting {
            // The connection ended: what was sent before is delivered.
            self.open_midstream(flow, now_ns, sink);
        }
        self.close(flow, CloseReason::Rst, sink);
    }

    /// The server's SYN-ACK: starts its stream. Returns whether the segment
    /// goes on to the stream (a SYN-ACK may carry data).
    fn syn_ack(&mut self, flow: &FlowKey, seq: u32, now_ns: u64) -> bool {
        let next = seq.wrapping_add(1);
        let Some(conn) = self.conns.peek_mut(flow) else {
            // Before the client's SYN (another ring) or of a connection
            // not followed: the answers start the stream midstream.
            self.stats.untracked += 1;
            return false;
        };
        match &mut conn.phase {
            Phase::Waiting { syn_ack_next, .. } => *syn_ack_next = Some(next),
            Phase::Open {
                server: server @ None,
                syn_ack_next,
                ..
            } => {
                *server = Some(self.limits.stream(next));
                *syn_ack_next = Some(next);
            }
            Phase::Open { syn_ack_next, .. } if *syn_ack_next == Some(next) => {}
            Phase::Open { .. } => {
                self.stats.ignored_syns += 1;
                return false;
            }
        }
        conn.last_seen_ns = now_ns;
        self.conns.promote(flow);
        true
    }

    fn syn(
        &mut self,
        flow: FlowKey,
        seq: u32,
        now_ns: u64,
        sink: &mut impl EventSink,
    ) -> SynOutcome {
        let next = seq.wrapping_add(1);
        let quiet_ns = SYN_QUIET_NS.min(self.limits.idle_timeout_ns);
        let mut waiting = None;
        if let Some(conn) = self.conns.peek_mut(&flow) {
            let quiet = now_ns.saturating_sub(conn.last_seen_ns) > quiet_ns;
            match &mut conn.phase {
                Phase::Open { syn_next, .. } if *syn_next == Some(next) => {
                    conn.last_seen_ns = now_ns;
                    self.conns.promote(&flow);
                    return SynOutcome::Retransmitted;
                }
                Phase::Waiting {
                    segments,
                    spans,
                    syn_ack_next,
                    acks,
                    ..
                } => {
                    let server = spans[Direction::Server as usize].map(|span| span.start());
                    waiting = Some((std::mem::take(segments), *syn_ack_next, server, *acks));
                }
                // The client sent its FIN and reuses the 4-tuple: the old
                // stream misses bytes before its FIN.
                Phase::Open {
                    client: Some(stream),
                    server,
                    ..
                } if stream.fin_seen() => {
                    let hole = [Some(&*stream), server.as_ref()]
                        .into_iter()
                        .flatten()
                        .find_map(|stream| stream.open_hole(HoleCause::Superseded));
                    match hole {
                        Some(hole) => self.gap(&flow, hole, sink),
                        None => self.close(&flow, CloseReason::Idle, sink),
                    }
                }
                // The 4-tuple was reused: the old connection ended unseen.
                Phase::Open { .. } if quiet => self.close(&flow, CloseReason::Idle, sink),
                Phase::Open { .. } => {
                    self.stats.ignored_syns += 1;
                    return SynOutcome::Ignored;
                }
            }
        }
        if waiting.is_some() {
            self.release(&flow);
            self.conns.pop(&flow);
            self.timed.remove(&flow);
        }
        let (segments, syn_ack_next, answers, acks) = waiting.unwrap_or_default();
        self.open(
            flow,
            Some(next),
            syn_ack_next.or(answers),
            false,
            now_ns,
            sink,
        );
        if let Some(Phase::Open {
            syn_next,
            syn_ack_next: known,
            ..
        }) = self.conns.peek_mut(&flow).map(|conn| &mut conn.phase)
        {
            *syn_next = Some(next);
            *known = syn_ack_next;
        }
        // The data that overtook its SYN, now in its place.
        self.replay(&flow, segments, acks, now_ns, sink);
        SynOutcome::Opened
    }

    /// Opens a waiting flow at the lowest sequence number it holds in each
    /// direction (the server's at its SYN-ACK, if one came).
    fn open_midstream(&mut self, flow: &FlowKey, now_ns: u64, sink: &mut impl EventSink) {
        let Some(conn) = self.conns.peek_mut(flow) else {
            return;
        };
        let Phase::Waiting {
            segments,
            spans,
            syn_ack_next,
            acks,
            ..
        } = &mut conn.phase
        else {
            return;
        };
        let segments = std::mem::take(segments);
        let acks = *acks;
        let client = spans[Direction::Client as usize].map(|span| span.start());
        let server = syn_ack_next.or(spans[Direction::Server as usize].map(|span| span.start()));
        let syn_ack_next = *syn_ack_next;
        self.release(flow);
        self.conns.pop(flow);
        self.timed.remove(flow);
        self.open(*flow, client, server, true, now_ns, sink);
        if let Some(Phase::Open {
            syn_ack_next: known,
            ..
        }) = self.conns.peek_mut(flow).map(|conn| &mut conn.phase)
        {
            *known = syn_ack_next;
        }
        self.replay(flow, segments, acks, now_ns, sink);
    }

    /// Feeds what a flow held while it waited for its SYN: its segments,
    /// then the latest pure ACK of each direction.
    fn replay(
        &mut self,
        flow: &FlowKey,
        segments: Vec<Waiting>,
        acks: WaitingAcks,
        now_ns: u64,
        sink: &mut impl EventSink,
    ) {
        for (dir, seq, ack, payload, fin) in segments {
            self.feed(flow, dir, seq, ack, payload, fin, now_ns, sink);
        }
        for (dir, ack) in [Direction::Client, Direction::Server].into_iter().zip(acks) {
            if let Some((seq, ack)) = ack {
                self.feed(flow, dir, seq, Some(ack), Bytes::new(), false, now_ns, sink);
            }
        }
    }

    /// Takes a flow's held bytes out of the table's total.
    fn release(&mut self, flow: &FlowKey) {
        if let Some(conn) = self.conns.peek_mut(flow) {
            self.buffered -= conn.held;
            conn.held = 0;
        }
    }

    /// Makes room for one more flow: connections that carried nothing go
    /// first, then the least recently seen.
    fn make_room(&mut self, sink: &mut impl EventSink) {
        while self.conns.len() >= self.limits.max_connections.max(1) {
            let Some(oldest) = self
                .bare
                .peek_lru()
                .map(|(flow, _)| *flow)
                .or_else(|| self.conns.peek_lru().map(|(flow, _)| *flow))
            else {
                break;
            };
            self.close(&oldest, CloseReason::Evicted, sink);
        }
    }

    /// Starts tracking a connection whose streams' next bytes are `client`
    /// and `server` (None: from the first byte that comes); consumers hear
    /// of it once it carries something ([`Self::announce`]).
    fn open(
        &mut self,
        flow: FlowKey,
        client: Option<u32>,
        server: Option<u32>,
        midstream: bool,
        now_ns: u64,
        sink: &mut impl EventSink,
    ) {
        self.make_room(sink);
        let stream = |next_seq| self.limits.stream(next_seq);
        self.conns.put(
            flow,
            Connection {
                phase: Phase::Open {
                    id: None,
                    midstream,
                    carried: false,
                    syn_next: None,
                    syn_ack_next: None,
                    client: client.map(stream),
                    server: server.map(stream),
                    pending_rst: None,
                },
                last_seen_ns: now_ns,
                iface: self.iface,
                held: 0,
            },
        );
        self.bare.put(flow, ());
    }

    /// Tells consumers about `flow` if they have not heard of it yet;
    /// returns its id.
    fn announce(&mut self, flow: &FlowKey, sink: &mut impl EventSink) -> Option<ConnId> {
        let conn = self.conns.peek_mut(flow)?;
        let Phase::Open { id, midstream, .. } = &mut conn.phase else {
            return None;
        };
        if let Some(id) = id {
            return Some(*id);
        }
        let new = self.ids.next();
        *id = Some(new);
        let iface = self.ifaces.name(conn.iface);
        self.stats.opened += 1;
        if *midstream {
            self.stats.opened_midstream += 1;
        }
        sink.event(
            flow.dst.port(),
            StreamEvent::Opened {
                iface,
                conn: new,
                src: flow.src,
                dst: flow.dst,
                midstream: *midstream,
            },
        );
        self.bare.pop(flow);
        Some(new)
    }

    /// Takes one segment of an open or waiting flow: its ACK (for the
    /// other direction's stream), then its bytes and FIN.
    #[allow(clippy::too_many_arguments)]
    fn feed(
        &mut self,
        flow: &FlowKey,
        dir: Direction,
        seq: u32,
        ack: Option<u32>,
        payload: Bytes,
        fin: bool,
        now_ns: u64,
        sink: &mut impl EventSink,
    ) {
        let limits = self.limits;
        let Some(conn) = self.conns.get_mut(flow) else {
            return;
        };
        let (id, client, server, carried, pending_rst) = match &mut conn.phase {
            Phase::Waiting {
                segments,
                spans,
                acks,
                ..
            } => {
                conn.last_seen_ns = now_ns;
                if payload.is_empty() && !fin {
                    if let Some(ack) = ack {
                        acks[dir as usize] = Some((seq, ack));
                    }
                    return;
                }
                let cost = held_cost(payload.len());
                spans[dir as usize]
                    .get_or_insert_with(|| Span::new(seq))
                    .add(seq, payload.len(), fin);
                let directions = spans.iter().flatten().count();
                segments.push((dir, seq, ack, detach(&payload, true), fin));
                conn.held += cost;
                self.buffered += cost;
                // The reorder budget, per direction.
                if conn.held > self.limits.reorder.max_bytes * directions {
                    // No room to wait any longer for the SYN.
                    self.open_midstream(flow, now_ns, sink);
                }
                return;
            }
            Phase::Open {
                id,
                client,
                server,
                carried,
                pending_rst,
                ..
            } => (*id, client, server, carried, pending_rst),
        };
        self.scratch.clear();
        self.peer_scratch.clear();
        // A segment outside its sender's window is dropped by its receiver
        // before the ACK is looked at.
        let in_window = side(client, server, dir)
            .as_ref()
            .is_none_or(|own| own.is_plausible(seq));
        if !in_window && limits.deliver == Delivery::Acked {
            self.stats.invalid_acks += 1;
            return;
        }
        // The ACK first, as the receiver's TCP takes it.
        if let Some(ack) = ack.filter(|_| in_window)
            && let Some(acked) = side(client, server, peer(dir))
            && acked.acknowledge(ack, &mut self.peer_scratch).is_err()
            && limits.deliver == Delivery::Acked
        {
            // The receiver drops a segment that acknowledges bytes never
            // sent (Linux `tcp_ack`): so does the mirror.
            self.stats.invalid_acks += 1;
            return;
        }
        conn.last_seen_ns = now_ns;
        let mut reset = false;
        let result = match side(client, server, dir) {
            // A pure ACK of a direction not started yet may be older than
            // its first byte: only a byte or a FIN starts it (midstream).
            None if payload.is_empty() && !fin => Ok(()),
            slot => {
                let stream = slot.get_or_insert_with(|| limits.stream(seq));
                let result = stream.push(seq, payload, fin, now_ns, &mut self.scratch);
                // A waiting RST is believed once its sender's data ends
                // exactly where it points, and dropped once the data
                // passes it.
                if let Some((rst_dir, rst_seq, _)) = *pending_rst
                    && rst_dir == dir
                {
                    if stream.shown_seq() == rst_seq {
                        reset = true;
                    } else if !stream.is_ahead(rst_seq) {
                        *pending_rst = None;
                        self.stats.ignored_rsts += 1;
                    }
                }
                result
            }
        };
        let fin_seen = side(client, server, dir)
            .as_ref()
            .is_some_and(Reassembler::fin_seen);
        let finished = both_finished(client.as_ref(), server.as_ref());
        let streams = [client.as_ref(), server.as_ref()];
        let waits = streams.iter().flatten().any(|s| s.is_waiting());
        let held: usize = streams.iter().flatten().map(|s| s.memory()).sum();
        // What each direction's sender acknowledged of the other's stream.
        let acked_by =
            |sender: Direction| streams[peer(sender) as usize].map_or(0, Reassembler::acked_bytes);
        let peer_acked = [acked_by(Direction::Client), acked_by(Direction::Server)];
        let pending = pending_rst.is_some();
        let delivers = !self.scratch.is_empty() || !self.peer_scratch.is_empty();
        if !*carried && (fin_seen || held > 0 || delivers) {
            *carried = true;
            self.bare.pop(flow);
        }
        self.buffered = self.buffered + held - conn.held;
        conn.held = held;
        if delivers {
            let id = match id {
                Some(id) => id,
                None => self.announce(flow, sink).expect("an open connection"),
            };
            let port = flow.dst.port();
            // The other direction's bytes this ACK covers came first.
            let runs = [
                (peer(dir), &mut self.peer_scratch),
                (dir, &mut self.scratch),
            ];
            for (dir, run) in runs {
                for bytes in run.drain(..) {
                    self.stats.delivered_bytes += bytes.len() as u64;
                    sink.event(
                        port,
                        StreamEvent::Data {
                            peer_acked: peer_acked[dir as usize],
                            conn: id,
                            dir,
                            bytes,
                        },
                    );
                }
            }
        }
        match result {
            Err(hole) => self.gap(flow, hole, sink),
            Ok(()) if finished => self.close(flow, CloseReason::Fin, sink),
            Ok(()) if reset => self.close(flow, CloseReason::Rst, sink),
            Ok(()) if waits || pending => {
                self.timed.insert(*flow);
            }
            Ok(()) => {
                self.timed.remove(flow);
            }
        }
    }

    fn gap(&mut self, flow: &FlowKey, hole: Hole, sink: &mut impl EventSink) {
        match hole.cause {
            HoleCause::ConflictingCopy => self.stats.conflicting_copies += 1,
            HoleCause::Unacknowledged => self.stats.unacked_overflow += 1,
            HoleCause::Timeout | HoleCause::Budget | HoleCause::Superseded => {
                self.stats.missing_bytes += hole.len;
            }
        }
        tracing::info!(
            src = %flow.src,
            dst = %flow.dst,
            from_seq = hole.seq,
            bytes = hole.len,
            missing = hole.cause.is_missing(),
            cause = ?hole.cause,
            "closing a connection at a hole in its stream"
        );
        self.close(flow, CloseReason::Gap, sink);
    }

    /// Ends `flow`: with a close event if consumers heard of it or it
    /// carried something (announced first if needed), silently (counted)
    /// otherwise.
    fn close(&mut self, flow: &FlowKey, reason: CloseReason, sink: &mut impl EventSink) {
        let shown = match self.conns.peek(flow).map(|conn| &conn.phase) {
            None => return,
            Some(Phase::Waiting { .. }) => false,
            Some(Phase::Open { id, carried, .. }) => {
                id.is_some() || *carried || matches!(reason, CloseReason::Fin | CloseReason::Rst)
            }
        };
        let id = if shown {
            self.announce(flow, sink)
        } else {
            None
        };
        let Some(conn) = self.conns.pop(flow) else {
            return;
        };
        if let Phase::Open {
            pending_rst: Some(_),
            ..
        } = conn.phase
            && reason != CloseReason::Rst
        {
            self.stats.ignored_rsts += 1;
        }
        if let Phase::Open { client, server, .. } = &conn.phase {
            // Never delivered: the receiver did not acknowledge them.
            self.stats.unacked_bytes += [client, server]
                .into_iter()
                .flatten()
                .map(Reassembler::unacked_bytes)
                .sum::<u64>();
        }
        self.timed.remove(flow);
        self.bare.pop(flow);
        self.buffered -= conn.held;
        if matches!(reason, CloseReason::Fin | CloseReason::Rst) {
            self.ended.put(*flow, conn.last_seen_ns);
        }
        match (&conn.phase, id) {
            (Phase::Waiting { .. }, _) => self.stats.untracked += 1,
            (Phase::Open { .. }, None) => self.stats.silent += 1,
            (Phase::Open { .. }, Some(id)) => {
                self.stats.closed[reason as usize] += 1;
                sink.event(flow.dst.port(), StreamEvent::Closed { conn: id, reason });
            }
        }
    }

    /// Panics if the table's bookkeeping is off (memory counts, deadlines,
    /// the list of bare connections, the limits). For tests and the fuzz
    /// targets: it walks the whole table.
    pub fn assert_consistent(&self) {
        let mut total = 0;
        for (flow, conn) in self.conns.iter() {
            total += conn.held;
            match &conn.phase {
                Phase::Waiting {
                    segments, spans, ..
                } => {
                    let counted: usize = segments
                        .iter()
                        .map(|(_, _, _, p, _)| held_cost(p.len()))
                        .sum();
                    assert_eq!(conn.held, counted, "a waiting flow's memory");
                    assert!(self.timed.contains(flow), "a waiting flow has a deadline");
                    for (dir, seq, _, _, _) in segments {
                        assert!(spans[*dir as usize].is_some_and(|span| span.contains(*seq)));
                    }
                }
                Phase::Open {
                    id,
                    carried,
                    client,
                    server,
                    pending_rst,
                    ..
                } => {
                    let streams = [client.as_ref(), server.as_ref()];
                    for stream in streams.iter().flatten() {
                        stream.assert_consistent();
                        if stream.is_waiting() {
                            assert!(self.timed.contains(flow), "a hole has a deadline");
                        }
                    }
                    assert!(
                        !both_finished(client.as_ref(), server.as_ref()),
                        "a finished connection stays open"
                    );
                    let held: usize = streams.iter().flatten().map(|s| s.memory()).sum();
                    assert_eq!(conn.held, held, "a connection's memory");
                    if let Some((dir, seq, _)) = pending_rst {
                        assert!(self.timed.contains(flow), "a waiting RST has a deadline");
                        let stream = streams[*dir as usize].expect("a waiting RST's stream");
                        assert!(stream.is_ahead(*seq), "a waiting RST is ahead");
                    }
                    let bare = id.is_none() && !*carried;
                    assert_eq!(self.bare.contains(flow), bare, "bare: never carried");
                }
            }
        }
        assert_eq!(self.buffered, total, "the table's memory is the sum");
        assert!(self.buffered <= self.limits.max_buffered_bytes);
        assert!(self.conns.len() <= self.limits.max_connections.max(1));
        assert!(self.bare.len() <= self.conns.len());
    }

    fn enforce_buffer_limit(&mut self, sink: &mut impl EventSink) {
        while self.buffered > self.limits.max_buffered_bytes {
            let Some(oldest) = self.conns.peek_lru().map(|(f, _)| *f) else {
                break;
            };
            self.close(&oldest, CloseReason::Evicted, sink);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use proptest::prelude::*;

    use super::*;
    use crate::flow::reassembly::SEGMENT_OVERHEAD;

    const LIMITS: TableLimits = TableLimits {
        max_connections: 3,
        max_buffered_bytes: 1000,
        idle_timeout_ns: 10_000,
        reorder: ReorderLimits {
            max_bytes: 800,
            max_wait_ns: 5_000,
        },
        deliver: Delivery::Seen,
    };

    fn flow(client_port: u16) -> FlowKey {
        FlowKey {
            src: SocketAddr::from(([198, 18, 0, 1], client_port)),
            dst: SocketAddr::from(([198, 18, 0, 2], 80)),
        }
    }

    fn seg(flow: FlowKey, seq: u32, flags: TcpFlags, payload: &[u8]) -> Segment {
        Segment {
            dir: Default::default(),
            flow,
            seq,
            ack: 0,
            flags,
            payload: Bytes::copy_from_slice(payload),
            truncated: false,
            iface: IfaceId::default(),
        }
    }

    /// A segment of the server's answers to `flow`'s client.
    fn ans(flow: FlowKey, seq: u32, flags: TcpFlags, payload: &[u8]) -> Segment {
        Segment {
            dir: Direction::Server,
            ..seg(flow, seq, flags, payload)
        }
    }

    /// Events as compact strings: "open 1", "data 1 hello", "close 1 fin".
    #[derive(Default)]
    struct Log(Vec<String>);

    impl EventSink for Log {
        fn event(&mut self, port: u16, event: StreamEvent) {
            assert_eq!(port, 80);
            self.0.push(match event {
                StreamEvent::Opened {
                    conn, midstream, ..
                } => {
                    format!("open {conn}{}", if midstream { " midstream" } else { "" })
                }
                StreamEvent::Data {
                    peer_acked: _,
                    conn,
                    dir: Direction::Client,
                    bytes,
                } => format!("data {conn} {}", String::from_utf8_lossy(&bytes)),
                StreamEvent::Data {
                    peer_acked: _,
                    conn,
                    dir: Direction::Server,
                    bytes,
                } => format!("answer {conn} {}", String::from_utf8_lossy(&bytes)),
                StreamEvent::Closed { conn, reason } => format!("close {conn} {reason}"),
            });
        }
    }

    const SYN: TcpFlags = TcpFlags::SYN;
    const ACK: TcpFlags = TcpFlags::ACK;
    const FIN: TcpFlags = TcpFlags::FIN.union(TcpFlags::ACK);
    const RST: TcpFlags = TcpFlags::RST;
    const SYN_ACK: TcpFlags = TcpFlags::SYN.union(TcpFlags::ACK);

    /// A handshake of `f`: the client's ISN 99, the server's 499.
    fn handshake(table: &mut ConnectionTable, f: FlowKey, log: &mut Log) {
        table.segment(seg(f, 99, SYN, b""), 0, log);
        table.segment(ans(f, 499, SYN_ACK, b""), 1, log);
        table.segment(seg(f, 100, ACK, b""), 2, log);
    }

    /// Each connection is announced with the name of the interface its
    /// first segment came through, as the table knew it then.
    #[test]
    fn connections_name_their_interface() {
        let names = IfaceNames::default();
        // One index in two namespaces, as pods' eth0 often are.
        let pod = |netns| IfaceId { netns, index: 2 };
        names.insert(pod(11), "pod1:eth0");
        names.insert(pod(12), "pod2:eth0");
        let mut table = ConnectionTable::new(LIMITS, ConnIds::default()).with_iface_names(names);
        let mut opened = Vec::new();
        let mut sink = |_, event| {
            if let StreamEvent::Opened { iface, src, .. } = event {
                opened.push((src.port(), iface.to_string()));
            }
        };
        for (port, iface) in [(1000, pod(11)), (1001, pod(12)), (1002, IfaceId::index(9))] {
            let f = flow(port);
            let on = |segment: Segment| Segment { iface, ..segment };
            table.segment(on(seg(f, 99, SYN, b"")), 0, &mut sink);
            table.segment(on(seg(f, 100, ACK, b"x")), 1, &mut sink);
        }
        assert_eq!(
            opened,
            [
                (1000, "pod1:eth0".to_owned()),
                (1001, "pod2:eth0".to_owned()),
                // Not (or no longer) watched: no name.
                (1002, String::new()),
            ]
        );
    }

    /// Segments of one direction carrying `len` bytes (byte `i` is
    /// `stream_byte(dir, i)`) in pieces of `cut`, the last with the FIN.
    fn pieces(f: FlowKey, dir: Direction, isn: u32, len: usize, cut: usize) -> Vec<Segment> {
        let bytes: Vec<u8> = (0..len).map(|i| stream_byte(dir, i)).collect();
        let mut segments: Vec<Segment> = bytes
            .chunks(cut)
            .enumerate()
            .map(|(i, chunk)| Segment {
                dir,
                ..seg(f, isn + 1 + (i * cut) as u32, ACK, chunk)
            })
            .collect();
        match segments.last_mut() {
            Some(last) => last.flags = FIN,
            None => segments.push(Segment {
                dir,
                ..seg(f, isn + 1, FIN, b"")
            }),
        }
        segments
    }

    fn stream_byte(dir: Direction, i: usize) -> u8 {
        (i as u8).wrapping_mul(31) ^ if dir == Direction::Server { 0xa5 } else { 0 }
    }

    proptest! {
        /// Both directions of a connection, their segments in any order
        /// after the handshake, within budgets that never bind: each
        /// direction is delivered whole, and the connection ends `fin`.
        #[test]
        fn duplex_streams_are_whole_in_any_order(
            segments in (0usize..3000, 0usize..3000, 1usize..700).prop_flat_map(
                |(client, server, cut)| {
                    let f = flow(9);
                    let mut segments = pieces(f, Direction::Client, 99, client, cut);
                    segments.extend(pieces(f, Direction::Server, 499, server, cut));
                    Just(segments).prop_shuffle()
                        .prop_map(move |segments| (client, server, segments))
                }
            )
        ) {
            let (client, server, segments) = segments;
            let limits = TableLimits {
                max_buffered_bytes: 1 << 24,
                reorder: ReorderLimits {
                    max_bytes: 1 << 22,
                    max_wait_ns: 5_000,
                },
                ..LIMITS
            };
            let mut table = ConnectionTable::new(limits, ConnIds::default());
            let f = flow(9);
            let mut events = Vec::new();
            let mut sink = |_, event| events.push(event);
            table.segment(seg(f, 99, SYN, b""), 0, &mut sink);
            table.segment(ans(f, 499, SYN_ACK, b""), 0, &mut sink);
            for segment in segments {
                table.segment(segment, 0, &mut sink);
                table.assert_consistent();
            }
            let mut got = [Vec::new(), Vec::new()];
            for event in &events[1..events.len() - 1] {
                let StreamEvent::Data { peer_acked: _,  conn: 1, dir, bytes } = event else {
                    panic!("{event:?}");
                };
                got[*dir as usize].extend_from_slice(bytes);
            }
            let want = |dir, len| (0..len).map(|i| stream_byte(dir, i)).collect::<Vec<_>>();
            prop_assert_eq!(&got[0], &want(Direction::Client, client));
            prop_assert_eq!(&got[1], &want(Direction::Server, server));
            let opened = matches!(events[0], StreamEvent::Opened { conn: 1, .. });
            prop_assert!(opened, "{:?}", events[0]);
            prop_assert_eq!(
                events.last(),
                Some(&StreamEvent::Closed { conn: 1, reason: CloseReason::Fin })
            );
            prop_assert!(table.is_empty());
            prop_assert_eq!(table.buffered_bytes(), 0);
        }
    }

    #[test]
    fn both_directions_share_one_connection_that_ends_when_both_finished() {
        let mut table = ConnectionTable::new(LIMITS, ConnIds::default());
        let mut log = Log::default();
        let f = flow(1000);
        handshake(&mut table, f, &mut log);
        table.segment(seg(f, 100, ACK, b"GET"), 3, &mut log);
        // A retransmitted SYN-ACK is the same stream; another ISN is not.
        table.segment(ans(f, 499, SYN_ACK, b""), 4, &mut log);
        table.segment(ans(f, 7000, SYN_ACK, b""), 4, &mut log);
        assert_eq!(table.stats().ignored_syns, 1);
        // The server answers and closes first (`Connection: close`).
        table.segment(ans(f, 503, FIN, b"!"), 5, &mut log);
        table.segment(ans(f, 500, ACK, b"OK "), 6, &mut log);
        assert_eq!(
            log.0,
            ["open 1", "data 1 GET", "answer 1 OK ", "answer 1 !"]
        );
        assert_eq!(table.len(), 1, "the client has not finished");
        table.assert_consistent();
        table.segment(seg(f, 103, FIN, b""), 7, &mut log);
        assert_eq!(log.0.last().unwrap(), "close 1 fin");
        assert!(table.is_empty());
        assert_eq!(table.stats().delivered_bytes, 7);
        // The server's last ACK after the close is not a new connection.
        table.segment(ans(f, 505, ACK, b""), 8, &mut log);
        assert_eq!(table.stats().untracked, 1);
        assert_eq!(log.0.len(), 5);

        // The client half-closes first: the answers still come.
        let g = flow(1001);
        handshake(&mut table, g, &mut log);
        table.segment(seg(g, 100, FIN, b"req"), 10, &mut log);
        table.segment(ans(g, 500, ACK, b"late"), 11, &mut log);
        table.segment(ans(g, 504, FIN, b""), 12, &mut log);
        assert_eq!(
            &log.0[5..],
            ["open 2", "data 2 req", "answer 2 late", "close 2 fin"]
        );
        assert_eq!(table.stats().closed(CloseReason::Fin), 2);
    }

    #[test]
    fn an_rst_is_checked_against_its_senders_stream() {
        let mut table = ConnectionTable::new(LIMITS, ConnIds::default());
        let mut log = Log::default();
        let f = flow(1);
        handshake(&mut table, f, &mut log);
        table.segment(seg(f, 100, ACK, b"abc"), 3, &mut log);
        table.segment(ans(f, 500, ACK, b"xy"), 4, &mut log);
        // The client's sequence numbers are nothing in the server's stream.
        table.segment(ans(f, 103, RST, b""), 5, &mut log);
        table.segment(ans(f, 7, RST, b""), 5, &mut log);
        assert_eq!(table.stats().ignored_rsts, 2);
        assert_eq!(table.len(), 1);
        table.assert_consistent();
        table.segment(ans(f, 502, RST, b""), 6, &mut log);
        assert_eq!(
            log.0,
            ["open 1", "data 1 abc", "answer 1 xy", "close 1 rst"]
        );

        // A server that refuses at once: its RST at the SYN-ACK's place.
        let g = flow(2);
        handshake(&mut table, g, &mut log);
        table.segment(ans(g, 500, RST, b""), 7, &mut log);
        assert_eq!(&log.0[4..], ["open 2", "close 2 rst"]);
    }

    #[test]
    fn a_hole_in_the_answers_closes_with_gap() {
        let mut table = ConnectionTable::new(LIMITS, ConnIds::default());
        let mut log = Log::default();
        let f = flow(1);
        handshake(&mut table, f, &mut log);
        table.segment(ans(f, 500, ACK, b"ab"), 3, &mut log);
        table.segment(ans(f, 504, ACK, b"ef"), 4, &mut log);
        table.segment(seg(f, 100, FIN, b""), 5, &mut log);
        table.assert_consistent();
        table.tick(5 + LIMITS.reorder.max_wait_ns, &mut log);
        assert_eq!(log.0, ["open 1", "answer 1 ab", "close 1 gap"]);
        assert_eq!(table.stats().missing_bytes, 2);
        assert_eq!(table.buffered_bytes(), 0);
    }

    #[test]
    fn answers_that_overtook_the_syn_wait_for_it() {
        let mut table = ConnectionTable::new(LIMITS, ConnIds::default());
        let mut log = Log::default();
        let f = flow(1);
        // Through other rings: the answer first, then the request.
        table.segment(ans(f, 503, ACK, b"def"), 0, &mut log);
        table.segment(ans(f, 499, SYN_ACK, b""), 0, &mut log);
        table.segment(seg(f, 100, ACK, b"GET"), 1, &mut log);
        table.segment(ans(f, 500, ACK, b"abc"), 1, &mut log);
        assert!(log.0.is_empty());
        table.assert_consistent();
        table.segment(seg(f, 99, SYN, b""), 2, &mut log);
        assert_eq!(
            log.0,
            ["open 1", "data 1 GET", "answer 1 abc", "answer 1 def"],
            "in place, not midstream"
        );
        assert_eq!(table.stats().opened_midstream, 0);
        assert_eq!(table.buffered_bytes(), 0);

        // Answers only (a download that ran before the mirror): midstream
        // at the lowest sequence number seen, ended by both FINs.
        let g = flow(2);
        table.segment(ans(g, 9003, ACK, b"/2"), 3, &mut log);
        table.segment(ans(g, 9000, ACK, b"/1/"), 3, &mut log);
        table.tick(4 + LIMITS.reorder.max_wait_ns, &mut log);
        table.segment(
            ans(g, 9005, FIN, b""),
            5 + LIMITS.reorder.max_wait_ns,
            &mut log,
        );
        table.segment(
            seg(g, 300, FIN, b""),
            6 + LIMITS.reorder.max_wait_ns,
            &mut log,
        );
        assert_eq!(
            &log.0[4..],
            [
                "open 2 midstream",
                "answer 2 /1/",
                "answer 2 /2",
                "close 2 fin"
            ]
        );
        table.assert_consistent();
    }

    #[test]
    fn a_connection_from_syn_to_fin() {
        let mut table = ConnectionTable::new(LIMITS, ConnIds::default());
        let mut log = Log::default();
        let f = flow(1000);
        table.segment(seg(f, 99, SYN, b""), 0, &mut log);
        table.segment(seg(f, 99, SYN, b""), 1, &mut log); // retransmitted SYN
        table.segment(seg(f, 100, ACK, b""), 2, &mut log);
        table.segment(seg(f, 100, ACK, b"hello "), 3, &mut log);
        table.segment(seg(f, 106, FIN, b"world"), 4, &mut log);
        assert_eq!(
            log.0,
            ["open 1", "data 1 hello ", "data 1 world", "close 1 fin"]
        );
        assert!(table.is_empty());
        assert_eq!(table.stats().closed(CloseReason::Fin), 1);
        assert_eq!(table.stats().delivered_bytes, 11);
    }

    #[test]
    fn a_running_connection_is_picked_up_midstream_after_the_syn_wait() {
        let mut table = ConnectionTable::new(LIMITS, ConnIds::default());
        let mut log = Log::default();
        let f = flow(1000);
        table.segment(seg(f, 5000, ACK, b""), 0, &mut log);
        assert_eq!(table.stats().untracked, 1, "a pure ACK opens nothing");
        table.segment(seg(f, 5003, ACK, b"/x"), 1, &mut log);
        table.segment(seg(f, 5000, ACK, b"GET"), 2, &mut log);
        table.tick(1 + LIMITS.reorder.max_wait_ns, &mut log);
        assert!(
            log.0.is_empty(),
            "still waiting for a SYN from another ring"
        );
        table.tick(2 + LIMITS.reorder.max_wait_ns, &mut log);
        table.segment(
            seg(f, 5005, RST, b""),
            3 + LIMITS.reorder.max_wait_ns,
            &mut log,
        );
        assert_eq!(
            log.0,
            ["open 1 midstream", "data 1 GET", "data 1 /x", "close 1 rst"],
            "opens at the lowest sequence number seen"
        );
    }

    #[test]
    fn data_that_overtakes_its_syn_is_delivered_in_place() {
        let mut table = ConnectionTable::new(LIMITS, ConnIds::default());
        let mut log = Log::default();
        let f = flow(1000);
        table.segment(seg(f, 4, ACK, b"def"), 0, &mut log);
        table.segment(seg(f, 1, ACK, b"abc"), 1, &mut log);
        table.segment(seg(f, 0, SYN, b""), 2, &mut log);
        table.segment(seg(f, 7, FIN, b""), 3, &mut log);
        assert_eq!(log.0, ["open 1", "data 1 abc", "data 1 def", "close 1 fin"]);
        assert_eq!(table.stats().opened_midstream, 0);
        assert_eq!(table.buffered_bytes(), 0);
    }

    #[test]
    fn a_waiting_flow_over_the_reorder_budget_opens_at_once() {
        let mut table = ConnectionTable::new(LIMITS, ConnIds::default());
        let mut log = Log::default();
        table.segment(seg(flow(1), 100, ACK, &[b'a'; 500]), 0, &mut log);
        assert!(log.0.is_empty());
        table.segment(seg(flow(1), 600, ACK, &[b'b'; 400]), 1, &mut log);
        assert_eq!(log.0.len(), 3, "{:?}", log.0);
        assert_eq!(log.0[0], "open 1 midstream");
        assert_eq!(table.buffered_bytes(), 0);
    }

    #[test]
    fn a_waiting_flow_that_is_lost_or_stopped_leaves_no_trace() {
        let mut table = ConnectionTable::new(LIMITS, ConnIds::default());
        let mut log = Log::default();
        table.segment(seg(flow(1), 0, ACK, b"x"), 0, &mut log);
        table.lost(&flow(1), &mut log);
        assert!(log.0.is_empty(), "no consumer saw it");
        assert!(table.is_empty());
        assert_eq!(table.buffered_bytes(), 0);
        // At shutdown, a waiting flow opens so its bytes are delivered.
        table.segment(seg(flow(2), 0, ACK, b"y"), 1, &mut log);
        table.close_all(CloseReason::Shutdown, &mut log);
        assert_eq!(log.0, ["open 1 midstream", "data 1 y", "close 1 shutdown"]);
    }

    #[test]
    fn a_hole_closes_with_gap_and_nothing_after_it_is_delivered() {
        let mut table = ConnectionTable::new(LIMITS, ConnIds::default());
        let mut log = Log::default();
        let f = flow(1000);
        table.segment(seg(f, 0, SYN, b""), 0, &mut log);
        table.segment(seg(f, 1, ACK, b"ab"), 0, &mut log);
        table.segment(seg(f, 5, ACK, b"ef"), 100, &mut log);
        table.tick(100 + LIMITS.reorder.max_wait_ns, &mut log);
        assert_eq!(log.0.len(), 2, "still waiting");
        table.assert_consistent();
        table.tick(101 + LIMITS.reorder.max_wait_ns, &mut log);
        assert_eq!(log.0, ["open 1", "data 1 ab", "close 1 gap"]);
        assert_eq!(table.stats().missing_bytes, 2);
        assert_eq!(table.buffered_bytes(), 0);
    }

    #[test]
    fn a_loss_reported_upstream_closes_with_gap() {
        let mut table = ConnectionTable::new(LIMITS, ConnIds::default());
        let mut log = Log::default();
        table.segment(seg(flow(1), 0, SYN, b""), 0, &mut log);
        table.segment(seg(flow(1), 1, ACK, b"x"), 0, &mut log);
        table.lost(&flow(1), &mut log);
        table.lost(&flow(2), &mut log); // unknown: nothing to close
        assert_eq!(log.0, ["open 1", "data 1 x", "close 1 gap"]);
    }

    #[test]
    fn idle_connections_close() {
        let mut table = ConnectionTable::new(LIMITS, ConnIds::default());
        let mut log = Log::default();
        table.segment(seg(flow(1), 0, SYN, b""), 0, &mut log);
        table.segment(seg(flow(1), 1, ACK, b"a"), 0, &mut log);
        table.segment(seg(flow(2), 0, SYN, b""), 5_000, &mut log);
        table.segment(seg(flow(2), 1, ACK, b"b"), 5_000, &mut log);
        table.tick(10_000, &mut log);
        assert_eq!(table.len(), 2);
        table.tick(10_001, &mut log);
        assert_eq!(table.len(), 1);
        assert_eq!(log.0.last().unwrap(), "close 1 idle");
    }

    #[test]
    fn the_oldest_idle_connection_is_evicted_at_the_table_limit() {
        let mut table = ConnectionTable::new(LIMITS, ConnIds::default());
        let mut log = Log::default();
        for (i, port) in [1, 2, 3].into_iter().enumerate() {
            table.segment(seg(flow(port), 0, SYN, b""), i as u64, &mut log);
            table.segment(seg(flow(port), 1, ACK, b"x"), i as u64, &mut log);
        }
        // Connection 1 was seen last: 2 is now the least recently seen.
        table.segment(seg(flow(1), 2, ACK, b"y"), 10, &mut log);
        table.segment(seg(flow(4), 0, SYN, b""), 11, &mut log);
        assert!(log.0.contains(&"close 2 evicted".to_owned()), "{:?}", log.0);
        assert_eq!(table.len(), 3);
    }

    #[test]
    fn a_bare_syn_is_announced_only_when_the_connection_carries_something() {
        let mut table = ConnectionTable::new(LIMITS, ConnIds::default());
        let mut log = Log::default();
        // Data: announced just before its first byte.
        table.segment(seg(flow(1), 0, SYN, b""), 0, &mut log);
        table.segment(seg(flow(1), 1, ACK, b""), 0, &mut log);
        assert!(log.0.is_empty(), "a handshake alone shows nothing");
        table.segment(seg(flow(1), 1, ACK, b"hi"), 1, &mut log);
        // A FIN or an RST without data: announced before the close.
        table.segment(seg(flow(2), 0, SYN, b""), 2, &mut log);
        table.segment(seg(flow(2), 1, FIN, b""), 3, &mut log);
        table.segment(seg(flow(3), 0, SYN, b""), 4, &mut log);
        table.segment(seg(flow(3), 1, RST, b""), 5, &mut log);
        assert_eq!(
            log.0,
            [
                "open 1",
                "data 1 hi",
                "open 2",
                "close 2 fin",
                "open 3",
                "close 3 rst"
            ]
        );
        // Bytes held behind a hole, never delivered: announced at the close.
        table.segment(seg(flow(4), 0, SYN, b""), 6, &mut log);
        table.segment(seg(flow(4), 5, ACK, b"late"), 6, &mut log);
        table.tick(7 + LIMITS.reorder.max_wait_ns, &mut log);
        assert_eq!(&log.0[6..], ["open 4", "close 4 gap"]);
        // Nothing carried: idle, evicted, lost or stopped ends are silent.
        table.segment(seg(flow(5), 0, SYN, b""), 10, &mut log);
        table.segment(seg(flow(6), 0, SYN, b""), 10, &mut log);
        table.lost(&flow(6), &mut log);
        table.segment(seg(flow(7), 0, SYN, b""), 10, &mut log);
        table.tick(11 + LIMITS.idle_timeout_ns, &mut log);
        table.segment(seg(flow(8), 0, SYN, b""), 20_000, &mut log);
        table.close_all(CloseReason::Shutdown, &mut log);
        assert_eq!(log.0[8..], ["close 1 idle"], "{:?}", log.0);
        assert!(table.is_empty());
        let stats = table.stats();
        assert_eq!(stats.silent, 4);
        assert_eq!(stats.opened, 4);
        assert_eq!(stats.closed.iter().sum::<u64>(), 4);
    }

    #[test]
    fn a_syn_flood_makes_room_among_itself() {
        let mut table = ConnectionTable::new(LIMITS, ConnIds::default());
        let mut log = Log::default();
        table.segment(seg(flow(1), 0, SYN, b""), 0, &mut log);
        table.segment(seg(flow(1), 1, ACK, b"GET"), 0, &mut log);
        table.segment(seg(flow(2), 0, SYN, b""), 1, &mut log);
        table.segment(seg(flow(2), 1, ACK, b"POST"), 1, &mut log);
        for port in 1000..2000 {
            table.segment(seg(flow(port), 7, SYN, b""), 2, &mut log);
        }
        assert_eq!(table.len(), LIMITS.max_connections);
        assert_eq!(table.stats().silent, 999, "bare SYNs evicted bare SYNs");
        table.assert_consistent();
        table.segment(seg(flow(1), 4, FIN, b""), 3, &mut log);
        table.segment(seg(flow(2), 5, FIN, b""), 3, &mut log);
        assert_eq!(
            log.0,
            [
                "open 1",
                "data 1 GET",
                "open 2",
                "data 2 POST",
                "close 1 fin",
                "close 2 fin"
            ]
        );
    }

    #[test]
    fn an_rst_outside_what_the_client_sent_is_ignored() {
        let mut table = ConnectionTable::new(LIMITS, ConnIds::default());
        let mut log = Log::default();
        let f = flow(1);
        table.segment(seg(f, 99, SYN, b""), 0, &mut log);
        table.segment(seg(f, 100, ACK, b"abc"), 1, &mut log);
        table.segment(seg(f, 106, ACK, b"ghi"), 2, &mut log); // behind a hole
        for seq in [102, 7, 100 + (1 << 31)] {
            table.segment(seg(f, seq, RST, b""), 3, &mut log);
        }
        assert_eq!(table.stats().ignored_rsts, 3);
        assert_eq!(log.0, ["open 1", "data 1 abc"]);
        table.assert_consistent();
        // Within [next expected, furthest sent]: the receiver may have
        // bytes the mirror lost, the client's RST carries its SND.NXT.
        table.segment(seg(f, 109, RST, b""), 4, &mut log);
        assert_eq!(log.0, ["open 1", "data 1 abc", "close 1 rst"]);
        // An RST of nothing tracked.
        table.segment(seg(flow(2), 5, RST, b""), 5, &mut log);
        assert_eq!(table.stats().untracked, 1);
    }

    #[test]
    fn an_rst_that_overtook_the_last_data_waits_for_it() {
        let mut table = ConnectionTable::new(LIMITS, ConnIds::default());
        let mut log = Log::default();
        let f = flow(1);
        table.segment(seg(f, 0, SYN, b""), 0, &mut log);
        table.segment(seg(f, 1, ACK, b"abc"), 1, &mut log);
        // The RST came through another CPU's ring before "def".
        table.segment(seg(f, 7, RST, b""), 2, &mut log);
        assert_eq!(log.0, ["open 1", "data 1 abc"]);
        table.assert_consistent();
        table.segment(seg(f, 4, ACK, b"def"), 3, &mut log);
        assert_eq!(log.0, ["open 1", "data 1 abc", "data 1 def", "close 1 rst"]);
        assert_eq!(table.stats().ignored_rsts, 0);

        // One that the data passes, or that waits in vain, is ignored.
        let g = flow(2);
        table.segment(seg(g, 0, SYN, b""), 10, &mut log);
        table.segment(seg(g, 1, ACK, b"abc"), 10, &mut log);
        table.segment(seg(g, 5, RST, b""), 11, &mut log);
        table.segment(seg(g, 4, ACK, b"defg"), 12, &mut log);
        assert_eq!(table.stats().ignored_rsts, 1, "the data went past it");
        table.segment(seg(g, 100, RST, b""), 13, &mut log);
        table.tick(13 + LIMITS.reorder.max_wait_ns, &mut log);
        assert_eq!(table.stats().ignored_rsts, 1);
        table.tick(14 + LIMITS.reorder.max_wait_ns, &mut log);
        assert_eq!(table.stats().ignored_rsts, 2, "no data ended there in time");
        table.assert_consistent();
        assert_eq!(
            &log.0[4..],
            ["open 2", "data 2 abc", "data 2 defg"],
            "still open"
        );
    }

    #[test]
    fn an_rst_of_a_flow_waiting_for_its_syn_is_checked_then_delivers_it() {
        let mut table = ConnectionTable::new(LIMITS, ConnIds::default());
        let mut log = Log::default();
        let f = flow(1);
        table.segment(seg(f, 5003, ACK, b"/x"), 0, &mut log);
        table.segment(seg(f, 5000, ACK, b"GET"), 1, &mut log);
        table.segment(seg(f, 4000, RST, b""), 2, &mut log);
        table.segment(seg(f, 5006, RST, b""), 2, &mut log);
        assert_eq!(table.stats().ignored_rsts, 2);
        assert!(log.0.is_empty());
        table.assert_consistent();
        table.segment(seg(f, 5005, RST, b""), 3, &mut log);
        assert_eq!(
            log.0,
            ["open 1 midstream", "data 1 GET", "data 1 /x", "close 1 rst"]
        );
        assert_eq!(table.buffered_bytes(), 0);
    }

    #[test]
    fn buffered_bytes_over_the_budget_evict() {
        let mut table = ConnectionTable::new(LIMITS, ConnIds::default());
        let mut log = Log::default();
        table.segment(seg(flow(1), 0, SYN, b""), 0, &mut log);
        table.segment(seg(flow(1), 10, ACK, &[b'x'; 600]), 1, &mut log);
        table.segment(seg(flow(2), 0, SYN, b""), 2, &mut log);
        table.segment(seg(flow(2), 10, ACK, &[b'y'; 600]), 3, &mut log);
        assert!(log.0.contains(&"close 1 evicted".to_owned()), "{:?}", log.0);
        assert!(table.buffered_bytes() <= LIMITS.max_buffered_bytes);
    }

    #[test]
    fn retransmissions_after_the_fin_are_not_a_new_connection() {
        let mut table = ConnectionTable::new(LIMITS, ConnIds::default());
        let mut log = Log::default();
        let f = flow(1);
        table.segment(seg(f, 0, SYN, b""), 0, &mut log);
        table.segment(seg(f, 1, FIN, b"bye"), 1, &mut log);
        table.segment(seg(f, 1, FIN, b"bye"), 2, &mut log); // late retransmission
        table.tick(3 + LIMITS.reorder.max_wait_ns, &mut log);
        assert_eq!(log.0, ["open 1", "data 1 bye", "close 1 fin"]);
        assert!(table.is_empty());
        // A new SYN on the tuple is a new connection at once.
        table.segment(seg(f, 500, SYN, b""), 4, &mut log);
        table.segment(seg(f, 501, ACK, b"again"), 5, &mut log);
        assert_eq!(&log.0[3..], ["open 2", "data 2 again"]);
    }

    #[test]
    fn a_syn_with_another_isn_takes_a_tuple_only_from_a_quiet_connection() {
        let mut table = ConnectionTable::new(LIMITS, ConnIds::default());
        let mut log = Log::default();
        let f = flow(1);
        table.segment(seg(f, 0, SYN, b""), 0, &mut log);
        table.segment(seg(f, 1, ACK, b"abc"), 1, &mut log);
        // A blind SYN while the connection is in use: ignored.
        table.segment(seg(f, 1000, SYN, b""), 2, &mut log);
        table.segment(seg(f, 4, ACK, b"def"), 3, &mut log);
        assert_eq!(table.stats().ignored_syns, 1);
        assert_eq!(log.0, ["open 1", "data 1 abc", "data 1 def"]);
        table.assert_consistent();
        // Quiet for longer than the quiet time (capped by the idle
        // timeout): the tuple was reused, the old connection ended unseen.
        let quiet = SYN_QUIET_NS.min(LIMITS.idle_timeout_ns) + 1;
        table.segment(seg(f, 1000, SYN, b""), 3 + quiet, &mut log);
        assert_eq!(table.stats().ignored_syns, 1);
        assert_eq!(log.0.last().unwrap(), "close 1 idle");
        // Once the client sent its FIN (here behind a hole), a new SYN
        // starts a new connection at once; the old one misses bytes.
        table.segment(seg(f, 1001, ACK, b"x"), 4 + quiet, &mut log);
        table.segment(seg(f, 1005, FIN, b""), 5 + quiet, &mut log);
        table.segment(seg(f, 2000, SYN, b""), 6 + quiet, &mut log);
        table.segment(seg(f, 2001, ACK, b"y"), 7 + quiet, &mut log);
        assert_eq!(
            &log.0[4..],
            ["open 2", "data 2 x", "close 2 gap", "open 3", "data 3 y"]
        );
        assert_eq!(table.stats().missing_bytes, 3);
    }

    #[test]
    fn held_bytes_are_copies_counted_at_their_memory_cost() {
        let mut table = ConnectionTable::new(LIMITS, ConnIds::default());
        let mut log = Log::default();
        let pool_buffer = Bytes::from(vec![b'z'; 1 << 20]);
        let held = |payload: Bytes| Segment {
            dir: Default::default(),
            flow: flow(1),
            seq: 10,
            ack: 0,
            flags: ACK,
            payload,
            truncated: false,
            iface: IfaceId::default(),
        };
        // Waiting for a SYN.
        table.segment(held(pool_buffer.slice(..5)), 0, &mut log);
        assert_eq!(table.buffered_bytes(), held_cost(5));
        assert!(pool_buffer.is_unique(), "the waiting segment is a copy");
        // Behind a hole.
        table.segment(seg(flow(1), 0, SYN, b""), 1, &mut log);
        assert_eq!(table.buffered_bytes(), held_cost(5));
        table.segment(held(pool_buffer.slice(..7)), 2, &mut log);
        assert_eq!(table.buffered_bytes(), held_cost(7));
        assert!(pool_buffer.is_unique(), "the held segment is a copy");
        table.assert_consistent();
        table.segment(seg(flow(1), 1, ACK, b"abcdefghi"), 3, &mut log);
        assert_eq!(table.buffered_bytes(), 0);
        assert_eq!(log.0, ["open 1", "data 1 abcdefghi", "data 1 zzzzzzz"]);
    }

    #[test]
    fn truncated_segments_end_the_stream() {
        let mut table = ConnectionTable::new(LIMITS, ConnIds::default());
        let mut log = Log::default();
        table.segment(seg(flow(1), 0, SYN, b""), 0, &mut log);
        table.segment(seg(flow(1), 1, ACK, b"a"), 0, &mut log);
        let mut cut = seg(flow(1), 2, ACK, b"b");
        cut.truncated = true;
        table.segment(cut, 1, &mut log);
        assert_eq!(log.0, ["open 1", "data 1 a", "close 1 gap"]);
    }

    /// Tables that share their ids (one per shard) number connections
    /// from 1 in the order they are announced, whichever table holds
    /// them: a connection is announced when it carries something, not
    /// at its SYN.
    #[test]
    fn ids_are_unique_across_tables_and_follow_the_announcements() {
        let ids = ConnIds::default();
        let mut first = ConnectionTable::new(LIMITS, ids.clone());
        let mut second = ConnectionTable::new(LIMITS, ids);
        let mut log = Log::default();
        first.segment(seg(flow(1), 0, SYN, b""), 0, &mut log);
        second.segment(seg(flow(2), 0, SYN, b""), 0, &mut log);
        second.segment(seg(flow(2), 1, ACK, b"b"), 1, &mut log);
        first.segment(seg(flow(1), 1, ACK, b"a"), 2, &mut log);
        second.segment(seg(flow(3), 0, SYN, b""), 3, &mut log);
        second.segment(seg(flow(3), 1, FIN, b"c"), 4, &mut log);
        assert_eq!(
            log.0,
            [
                "open 1",
                "data 1 b",
                "open 2",
                "data 2 a",
                "open 3",
                "data 3 c",
                "close 3 fin"
            ]
        );
        first.close_all(CloseReason::Shutdown, &mut log);
        second.close_all(CloseReason::Shutdown, &mut log);
        assert_eq!(&log.0[7..], ["close 2 shutdown", "close 1 shutdown"]);
    }

    // --deliver acked.

    const ACKED: TableLimits = TableLimits {
        deliver: Delivery::Acked,
        ..LIMITS
    };

    /// A client segment that acknowledges the server's stream up to `ack`.
    fn cli(f: FlowKey, seq: u32, ack: u32, flags: TcpFlags, payload: &[u8]) -> Segment {
        Segment {
            ack,
            flags: flags | ACK,
            ..seg(f, seq, flags, payload)
        }
    }

    /// A server segment that acknowledges the client's stream up to `ack`.
    fn srv(f: FlowKey, seq: u32, ack: u32, flags: TcpFlags, payload: &[u8]) -> Segment {
        Segment {
            dir: Direction::Server,
            ..cli(f, seq, ack, flags, payload)
        }
    }

    /// A handshake with its ACK numbers: the client's ISN 99, the server's
    /// 499.
    fn acked_handshake(table: &mut ConnectionTable, f: FlowKey, log: &mut Log) {
        table.segment(seg(f, 99, SYN, b""), 0, log);
        table.segment(srv(f, 499, 100, SYN_ACK, b""), 1, log);
        table.segment(cli(f, 100, 500, ACK, b""), 2, log);
    }

    #[test]
    fn acked_bytes_are_delivered_as_the_peers_acks_cover_them() {
        let mut table = ConnectionTable::new(ACKED, ConnIds::default());
        let mut log = Log::default();
        let f = flow(1);
        acked_handshake(&mut table, f, &mut log);
        table.segment(cli(f, 100, 500, ACK, b"hello world"), 3, &mut log);
        assert!(log.0.is_empty(), "not acknowledged yet");
        assert_eq!(table.buffered_bytes(), 11 + SEGMENT_OVERHEAD);
        table.assert_consistent();
        // A partial ACK splits the waiting slice.
        table.segment(srv(f, 500, 106, ACK, b""), 4, &mut log);
        assert_eq!(log.0, ["open 1", "data 1 hello "]);
        assert_eq!(table.buffered_bytes(), 5 + SEGMENT_OVERHEAD);
        table.assert_consistent();
        // An older ACK changes nothing; the answer waits for the client's.
        table.segment(srv(f, 500, 103, ACK, b"OK"), 5, &mut log);
        assert_eq!(log.0.len(), 2);
        table.segment(srv(f, 502, 111, ACK, b""), 6, &mut log);
        table.segment(cli(f, 111, 502, ACK, b""), 7, &mut log);
        assert_eq!(log.0[2..], ["data 1 world", "answer 1 OK"]);
        assert_eq!(table.buffered_bytes(), 0);
        // The FINs count once acknowledged, each by the other side.
        table.segment(cli(f, 111, 502, FIN, b""), 8, &mut log);
        table.segment(srv(f, 502, 111, FIN, b""), 9, &mut log);
        table.segment(cli(f, 112, 503, ACK, b""), 10, &mut log);
        assert_eq!(table.len(), 1, "the client's FIN is not acknowledged");
        table.assert_consistent();
        table.segment(srv(f, 503, 112, ACK, b""), 11, &mut log);
        assert_eq!(log.0[4..], ["close 1 fin"]);
        assert!(table.is_empty());
        assert_eq!(table.stats().delivered_bytes, 13);
        assert_eq!(table.stats().unacked_bytes, 0);
    }

    #[test]
    fn data_events_say_how_far_their_sender_acknowledged_the_other_stream() {
        for deliver in [Delivery::Seen, Delivery::Acked] {
            let limits = TableLimits { deliver, ..LIMITS };
            let mut table = ConnectionTable::new(limits, ConnIds::default());
            let mut events = Vec::new();
            let mut sink = |_, event| {
                if let StreamEvent::Data {
                    dir, peer_acked, ..
                } = event
                {
                    events.push((dir, peer_acked));
                }
            };
            let f = flow(1);
            table.segment(seg(f, 99, SYN, b""), 0, &mut sink);
            table.segment(srv(f, 499, 100, SYN_ACK, b""), 1, &mut sink);
            table.segment(cli(f, 100, 500, ACK, b"GET"), 2, &mut sink);
            table.segment(srv(f, 500, 103, ACK, b"200 OK"), 3, &mut sink);
            table.segment(cli(f, 103, 504, ACK, b"!"), 4, &mut sink);
            table.segment(srv(f, 506, 104, ACK, b""), 5, &mut sink);
            table.segment(cli(f, 104, 506, ACK, b""), 6, &mut sink);
            let want = match deliver {
                // As each arrived: the client had acknowledged nothing of
                // the answers, then 4 of their bytes; the server 3 bytes.
                Delivery::Seen => vec![
                    (Direction::Client, 0),
                    (Direction::Server, 3),
                    (Direction::Client, 4),
                ],
                // As each was acknowledged: "GET" by the answer, "200 "
                // by "!", "!" by the server's ACK, "OK" by the client's.
                Delivery::Acked => vec![
                    (Direction::Client, 0),
                    (Direction::Server, 3),
                    (Direction::Client, 4),
                    (Direction::Server, 4),
                ],
            };
            assert_eq!(events, want, "{deliver:?}");
        }
    }

    #[test]
    fn unacknowledged_bytes_are_never_delivered() {
        let mut table = ConnectionTable::new(ACKED, ConnIds::default());
        let mut log = Log::default();
        // An RST: what the server did not acknowledge is lost with it.
        let f = flow(1);
        acked_handshake(&mut table, f, &mut log);
        table.segment(cli(f, 100, 500, ACK, b"abc"), 3, &mut log);
        table.segment(srv(f, 500, 102, ACK, b""), 4, &mut log);
        table.segment(cli(f, 103, 500, ACK, b"def"), 5, &mut log);
        table.segment(seg(f, 106, RST, b""), 6, &mut log);
        assert_eq!(log.0, ["open 1", "data 1 ab", "close 1 rst"]);
        assert_eq!(table.stats().unacked_bytes, 4);
        // Idle, shutdown.
        for port in [2, 3] {
            acked_handshake(&mut table, flow(port), &mut log);
            table.segment(cli(flow(port), 100, 500, ACK, b"xyz"), 7, &mut log);
        }
        table.tick(8 + LIMITS.idle_timeout_ns, &mut log);
        assert_eq!(
            log.0[3..],
            ["open 2", "close 2 idle", "open 3", "close 3 idle"]
        );
        acked_handshake(&mut table, flow(4), &mut log);
        table.segment(cli(flow(4), 100, 500, FIN, b"q"), 20_000, &mut log);
        table.close_all(CloseReason::Shutdown, &mut log);
        assert_eq!(log.0[7..], ["open 4", "close 4 shutdown"]);
        assert_eq!(table.stats().unacked_bytes, 4 + 3 + 3 + 1);
        assert_eq!(table.stats().delivered_bytes, 2);
        assert_eq!(table.buffered_bytes(), 0);
    }

    #[test]
    fn a_different_copy_of_waiting_bytes_closes_with_gap() {
        let mut table = ConnectionTable::new(ACKED, ConnIds::default());
        let mut log = Log::default();
        let f = flow(1);
        acked_handshake(&mut table, f, &mut log);
        table.segment(cli(f, 100, 500, ACK, b"abcdef"), 3, &mut log);
        table.segment(srv(f, 500, 102, ACK, b""), 4, &mut log);
        // Identical retransmissions, whole or overlapping, are fine; so is
        // another copy of bytes already acknowledged (the receiver has
        // them).
        table.segment(cli(f, 100, 500, ACK, b"abcdef"), 5, &mut log);
        table.segment(cli(f, 103, 500, ACK, b"defgh"), 6, &mut log);
        table.segment(cli(f, 100, 500, ACK, b"XY"), 7, &mut log);
        assert_eq!(table.stats().conflicting_copies, 0);
        table.assert_consistent();
        // Another copy of bytes still waiting: which did the server take?
        table.segment(cli(f, 104, 500, ACK, b"eX"), 8, &mut log);
        assert_eq!(log.0, ["open 1", "data 1 ab", "close 1 gap"]);
        assert_eq!(table.stats().conflicting_copies, 1);
        assert_eq!(table.stats().missing_bytes, 0);
        assert_eq!(table.stats().unacked_bytes, 6);
        assert!(table.is_empty());
        // Also once the FIN was reached but not acknowledged.
        let g = flow(2);
        acked_handshake(&mut table, g, &mut log);
        table.segment(cli(g, 100, 500, FIN, b"bye"), 9, &mut log);
        table.segment(cli(g, 100, 500, FIN, b"bye"), 10, &mut log);
        table.segment(cli(g, 100, 500, FIN, b"BYE"), 11, &mut log);
        assert_eq!(log.0[3..], ["open 2", "close 2 gap"]);
        assert_eq!(table.stats().conflicting_copies, 2);
    }

    #[test]
    fn a_blind_spoof_far_ahead_acknowledges_nothing_and_stretches_nothing() {
        let mut table = ConnectionTable::new(ACKED, ConnIds::default());
        let mut log = Log::default();
        let f = flow(1);
        acked_handshake(&mut table, f, &mut log);
        table.segment(cli(f, 100, 500, ACK, b"hello"), 3, &mut log);
        let far = 500u32.wrapping_add(1 << 29);
        // A server pure ACK out of the server's window: its ACK is not
        // taken, and it does not make `far` look sent.
        table.segment(srv(f, far, 105, ACK, b""), 4, &mut log);
        assert!(log.0.is_empty(), "{:?}", log.0);
        assert_eq!(table.stats().invalid_acks, 1);
        // So a client ACK of `far` acknowledges bytes never sent.
        table.segment(cli(f, 105, far, ACK, b"evil"), 5, &mut log);
        assert_eq!(table.stats().invalid_acks, 2);
        // Nor is an RST there believed.
        table.segment(srv(f, far, 0, RST, b""), 6, &mut log);
        assert_eq!(table.len(), 1);
        table.segment(srv(f, 500, 105, ACK, b""), 7, &mut log);
        assert_eq!(log.0, ["open 1", "data 1 hello"]);
        table.assert_consistent();
    }

    #[test]
    fn a_segment_acknowledging_bytes_never_sent_is_ignored() {
        for deliver in [Delivery::Seen, Delivery::Acked] {
            let limits = TableLimits { deliver, ..LIMITS };
            let mut table = ConnectionTable::new(limits, ConnIds::default());
            let mut log = Log::default();
            let f = flow(1);
            acked_handshake(&mut table, f, &mut log);
            table.segment(srv(f, 500, 100, ACK, b"hi"), 3, &mut log);
            // The server sent 2 bytes: an ACK of 10 is a spoof.
            table.segment(cli(f, 100, 510, ACK, b"evil"), 4, &mut log);
            table.segment(cli(f, 100, 502, ACK, b"good"), 5, &mut log);
            table.segment(srv(f, 502, 104, ACK, b""), 6, &mut log);
            table.assert_consistent();
            match deliver {
                Delivery::Seen => {
                    assert_eq!(log.0, ["open 1", "answer 1 hi", "data 1 evil"]);
                    assert_eq!(table.stats().invalid_acks, 0);
                }
                Delivery::Acked => {
                    assert_eq!(log.0, ["open 1", "answer 1 hi", "data 1 good"]);
                    assert_eq!(table.stats().invalid_acks, 1);
                }
            }
        }
    }

    #[test]
    fn an_rst_is_believed_at_the_receivers_ack_or_its_senders_edge() {
        let mut table = ConnectionTable::new(ACKED, ConnIds::default());
        let mut log = Log::default();
        let setup = |table: &mut ConnectionTable, f, log: &mut Log| {
            acked_handshake(table, f, log);
            table.segment(cli(f, 100, 500, ACK, b"abcdef"), 3, log);
            table.segment(srv(f, 500, 103, ACK, b""), 4, log);
        };
        let f = flow(1);
        setup(&mut table, f, &mut log);
        // Inside what the client sent, but neither the server's RCV.NXT
        // nor the client's SND.NXT; and far away.
        for seq in [101, 104, 105, 103 + (1 << 31)] {
            table.segment(seg(f, seq, RST, b""), 5, &mut log);
        }
        assert_eq!(table.stats().ignored_rsts, 4);
        assert_eq!(table.len(), 1);
        table.assert_consistent();
        // The server's last ACK.
        table.segment(seg(f, 103, RST, b""), 6, &mut log);
        assert_eq!(log.0, ["open 1", "data 1 abc", "close 1 rst"]);
        // The client's edge.
        let g = flow(2);
        setup(&mut table, g, &mut log);
        table.segment(seg(g, 106, RST, b""), 7, &mut log);
        assert_eq!(log.0[3..], ["open 2", "data 2 abc", "close 2 rst"]);
        // The server's RST at the client's last ACK of its stream.
        let h = flow(3);
        setup(&mut table, h, &mut log);
        table.segment(srv(h, 500, 106, ACK, b"xy"), 8, &mut log);
        table.segment(ans(h, 501, RST, b""), 9, &mut log);
        assert_eq!(table.stats().ignored_rsts, 5, "501 is neither");
        table.segment(ans(h, 500, RST, b""), 9, &mut log);
        assert_eq!(
            log.0[6..],
            ["open 3", "data 3 abc", "data 3 def", "close 3 rst"]
        );
        assert_eq!(table.stats().unacked_bytes, 3 + 3 + 2, "def twice, then xy");
    }

    #[test]
    fn waiting_bytes_over_the_reorder_budget_close_with_gap() {
        let mut table = ConnectionTable::new(ACKED, ConnIds::default());
        let mut log = Log::default();
        let f = flow(1);
        acked_handshake(&mut table, f, &mut log);
        table.segment(cli(f, 100, 500, ACK, &[b'a'; 300]), 3, &mut log);
        table.segment(cli(f, 400, 500, ACK, &[b'b'; 300]), 4, &mut log);
        const { assert!(2 * (300 + SEGMENT_OVERHEAD) > ACKED.reorder.max_bytes) };
        assert_eq!(log.0, ["open 1", "close 1 gap"]);
        assert_eq!(table.stats().unacked_overflow, 1);
        assert_eq!(table.stats().unacked_bytes, 600);
        assert_eq!(table.buffered_bytes(), 0);
    }

    proptest! {
        /// The duplex property under `acked`: each segment carries an ACK
        /// of its peer's SYN only, and pure ACKs of all the peer has shown
        /// so far come in between at random, then final ones: each
        /// direction is delivered whole, in order, with `peer_acked`
        /// never going back, and the connection ends `fin`.
        #[test]
        fn acked_duplex_streams_are_whole_in_any_order(
            segments in (0usize..3000, 0usize..3000, 1usize..700).prop_flat_map(
                |(client, server, cut)| {
                    let f = flow(9);
                    let mut segments = pieces(f, Direction::Client, 99, client, cut);
                    segments.extend(pieces(f, Direction::Server, 499, server, cut));
                    let n = segments.len();
                    (Just(segments).prop_shuffle(), prop::collection::vec(0u8..4, n))
                        .prop_map(move |(segments, acks)| (client, server, segments, acks))
                }
            )
        ) {
            let (client, server, segments, acks) = segments;
            let limits = TableLimits {
                max_buffered_bytes: 1 << 24,
                reorder: ReorderLimits {
                    max_bytes: 1 << 22,
                    max_wait_ns: 5_000,
                },
                ..ACKED
            };
            let mut table = ConnectionTable::new(limits, ConnIds::default());
            let f = flow(9);
            let mut events = Vec::new();
            let mut sink = |_, event| events.push(event);
            table.segment(seg(f, 99, SYN, b""), 0, &mut sink);
            table.segment(srv(f, 499, 100, SYN_ACK, b""), 0, &mut sink);
            let isn = [99u32, 499];
            // Just past what each direction has shown so far (its FIN
            // counts one).
            let mut shown = [isn[0] + 1, isn[1] + 1];
            let pure_ack = |dir: Direction, shown: &[u32; 2]| {
                let other = peer(dir) as usize;
                let seq = isn[dir as usize] + 1;
                Segment { dir, ..cli(f, seq, shown[other], ACK, b"") }
            };
            for (mut segment, ack) in segments.into_iter().zip(acks) {
                let dir = segment.dir;
                segment.ack = isn[peer(dir) as usize] + 1;
                let end = segment.seq + segment.payload.len() as u32
                    + u32::from(segment.flags.contains(TcpFlags::FIN));
                shown[dir as usize] = shown[dir as usize].max(end);
                table.segment(segment, 0, &mut sink);
                table.assert_consistent();
                // Now and then the other side acknowledges what it has.
                if ack == 0 {
                    table.segment(pure_ack(peer(dir), &shown), 0, &mut sink);
                    table.assert_consistent();
                }
            }
            table.segment(pure_ack(Direction::Server, &shown), 0, &mut sink);
            table.segment(pure_ack(Direction::Client, &shown), 0, &mut sink);
            let mut got = [Vec::new(), Vec::new()];
            let mut acked = [0, 0];
            for event in &events[1..events.len() - 1] {
                let StreamEvent::Data { peer_acked, conn: 1, dir, bytes } = event else {
                    panic!("{event:?}");
                };
                got[*dir as usize].extend_from_slice(bytes);
                prop_assert!(*peer_acked >= acked[*dir as usize]);
                acked[*dir as usize] = *peer_acked;
            }
            let want = |dir, len| (0..len).map(|i| stream_byte(dir, i)).collect::<Vec<_>>();
            prop_assert_eq!(&got[0], &want(Direction::Client, client));
            prop_assert_eq!(&got[1], &want(Direction::Server, server));
            prop_assert_eq!(
                events.last(),
                Some(&StreamEvent::Closed { conn: 1, reason: CloseReason::Fin })
            );
            prop_assert!(table.is_empty());
            prop_assert_eq!(table.buffered_bytes(), 0);
            prop_assert_eq!(table.stats().invalid_acks, 0);
        }
    }
}

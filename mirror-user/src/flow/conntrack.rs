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
//! Spoofed segments (RFC 5961, as far as one direction shows): an RST ends
//! a connection only inside the window [`Reassembler::accepts_rst`]
//! describes (or, when it is beyond what the client has shown, once the
//! client's data turns out to end exactly there within the reorder
//! timeout: it overtook them through another ring), and a SYN with another ISN replaces a live connection only
//! once that connection sent its FIN or has been quiet for
//! [`SYN_QUIET_NS`]; other RSTs and SYNs are counted and ignored.

use std::{collections::HashSet, num::NonZeroUsize};

use bytes::Bytes;
use lru::LruCache;

use crate::flow::{
    model::{CloseReason, ConnId, ConnIds, EventSink, FlowKey, StreamEvent},
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
        map.serialize_entry("closed", &Closed(self))?;
        map.serialize_entry("open", &self.open)?;
        map.serialize_entry("held_bytes", &self.held_bytes)?;
        map.end()
    }
}

struct Connection {
    phase: Phase,
    last_seen_ns: u64,
    /// Memory held for this flow (reorder buffer or waiting segments), as
    /// last counted into the table's total.
    held: usize,
}

enum Phase {
    /// Data without a SYN: waiting for the SYN from another CPU's ring.
    Waiting {
        /// Payloads copied out of the pool ([`detach`]).
        segments: Vec<(u32, Bytes, bool)>,
        since_ns: u64,
        /// The sequence space the segments cover, for RST checks.
        span: Span,
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
        stream: Reassembler,
        /// An RST beyond what the client has shown, with when it came: it
        /// ends the connection if the client's data turns out to end
        /// exactly there within the reorder timeout (it overtook them
        /// through another CPU's ring), and is ignored otherwise.
        pending_rst: Option<(u32, u64)>,
    },
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
        }
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

    /// Takes one segment of the client-to-server direction.
    pub fn segment(&mut self, segment: Segment, now_ns: u64, sink: &mut impl EventSink) {
        let Segment {
            flow,
            seq,
            flags,
            payload,
            truncated,
        } = segment;
        if flags.contains(TcpFlags::RST) {
            self.rst(&flow, seq, now_ns, sink);
            return;
        }
        if flags.contains(TcpFlags::SYN) {
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
                        span: Span::new(seq),
                    },
                    last_seen_ns: now_ns,
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
            data_seq,
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
                    stream,
                    pending_rst,
                    ..
                } => {
                    if let Err(hole) = stream.poll(now_ns) {
                        self.gap(&flow, hole, sink);
                    } else if pending_rst.is_some_and(|(_, since)| {
                        now_ns.saturating_sub(since) > self.limits.reorder.max_wait_ns
                    }) {
                        // The data it waited for never came.
                        self.stats.ignored_rsts += 1;
                        let waits = stream.is_waiting();
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

    /// An RST ends its connection if it is where the client's next
    /// sequence number can be; one beyond what the client has shown waits
    /// for its data; others are counted and ignored.
    fn rst(&mut self, flow: &FlowKey, seq: u32, now_ns: u64, sink: &mut impl EventSink) {
        let Some(conn) = self.conns.peek_mut(flow) else {
            self.stats.untracked += 1;
            return;
        };
        let (believed, waiting) = match &mut conn.phase {
            Phase::Waiting { span, .. } => (span.contains(seq), true),
            Phase::Open {
                stream,
                pending_rst,
                ..
            } => {
                if !stream.accepts_rst(seq) && stream.is_ahead(seq) {
                    if pending_rst.replace((seq, now_ns)).is_some() {
                        self.stats.ignored_rsts += 1;
                    }
                    self.timed.insert(*flow);
                    return;
                }
                (stream.accepts_rst(seq), false)
            }
        };
        if !believed {
            self.stats.ignored_rsts += 1;
            return;
        }
        if waiting {
            // The client ended it: what it sent before is delivered.
            self.open_midstream(flow, now_ns, sink);
        }
        self.close(flow, CloseReason::Rst, sink);
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
                Phase::Waiting { segments, .. } => waiting = Some(std::mem::take(segments)),
                // The client sent its FIN and reuses the 4-tuple: the old
                // stream misses bytes before its FIN.
                Phase::Open { stream, .. } if stream.fin_seen() => {
                    match stream.open_hole(HoleCause::Superseded) {
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
        self.open(flow, next, Some(next), false, now_ns, sink);
        // The data that overtook its SYN, now in its place.
        for (seq, payload, fin) in waiting.unwrap_or_default() {
            self.feed(&flow, seq, payload, fin, now_ns, sink);
        }
        SynOutcome::Opened
    }

    /// Opens a waiting flow at the lowest sequence number it holds.
    fn open_midstream(&mut self, flow: &FlowKey, now_ns: u64, sink: &mut impl EventSink) {
        let Some(conn) = self.conns.peek_mut(flow) else {
            return;
        };
        let Phase::Waiting { segments, span, .. } = &mut conn.phase else {
            return;
        };
        let segments = std::mem::take(segments);
        let start = span.first.wrapping_add(span.low as u32);
        self.release(flow);
        self.conns.pop(flow);
        self.timed.remove(flow);
        self.open(*flow, start, None, true, now_ns, sink);
        for (seq, payload, fin) in segments {
            self.feed(flow, seq, payload, fin, now_ns, sink);
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

    /// Starts tracking a connection; consumers hear of it once it carries
    /// something ([`Self::announce`]).
    fn open(
        &mut self,
        flow: FlowKey,
        next_seq: u32,
        syn_next: Option<u32>,
        midstream: bool,
        now_ns: u64,
        sink: &mut impl EventSink,
    ) {
        self.make_room(sink);
        self.conns.put(
            flow,
            Connection {
                phase: Phase::Open {
                    id: None,
                    midstream,
                    carried: false,
                    syn_next,
                    stream: Reassembler::new(next_seq, self.limits.reorder),
                    pending_rst: None,
                },
                last_seen_ns: now_ns,
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
        self.stats.opened += 1;
        if *midstream {
            self.stats.opened_midstream += 1;
        }
        sink.event(
            flow.dst.port(),
            StreamEvent::Opened {
                conn: new,
                src: flow.src,
                dst: flow.dst,
                midstream: *midstream,
            },
        );
        self.bare.pop(flow);
        Some(new)
    }

    fn feed(
        &mut self,
        flow: &FlowKey,
        seq: u32,
        payload: Bytes,
        fin: bool,
        now_ns: u64,
        sink: &mut impl EventSink,
    ) {
        let Some(conn) = self.conns.get_mut(flow) else {
            return;
        };
        conn.last_seen_ns = now_ns;
        let (id, stream, carried, pending_rst) = match &mut conn.phase {
            Phase::Waiting { segments, span, .. } => {
                let cost = held_cost(payload.len());
                span.add(seq, payload.len(), fin);
                segments.push((seq, detach(&payload, true), fin));
                conn.held += cost;
                self.buffered += cost;
                if conn.held > self.limits.reorder.max_bytes {
                    // No room to wait any longer for the SYN.
                    self.open_midstream(flow, now_ns, sink);
                }
                return;
            }
            Phase::Open {
                id,
                stream,
                carried,
                pending_rst,
                ..
            } => (*id, stream, carried, pending_rst),
        };
        self.scratch.clear();
        let result = stream.push(seq, payload, fin, now_ns, &mut self.scratch);
        let finished = stream.is_finished();
        let waits = stream.is_waiting();
        let held = stream.held_bytes();
        // A waiting RST is believed once the client's data ends exactly
        // where it points, and dropped once the data passes it.
        let mut reset = false;
        if let Some((rst_seq, _)) = *pending_rst {
            if stream.shown_seq() == rst_seq {
                reset = true;
            } else if !stream.is_ahead(rst_seq) {
                *pending_rst = None;
                self.stats.ignored_rsts += 1;
            }
        }
        let pending = pending_rst.is_some();
        if !*carried && (stream.fin_seen() || held > 0 || !self.scratch.is_empty()) {
            *carried = true;
            self.bare.pop(flow);
        }
        self.buffered = self.buffered + held - conn.held;
        conn.held = held;
        if !self.scratch.is_empty() {
            let id = match id {
                Some(id) => id,
                None => self.announce(flow, sink).expect("an open connection"),
            };
            let port = flow.dst.port();
            for bytes in self.scratch.drain(..) {
                self.stats.delivered_bytes += bytes.len() as u64;
                sink.event(port, StreamEvent::Data { conn: id, bytes });
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
        tracing::info!(
            src = %flow.src,
            dst = %flow.dst,
            missing_from_seq = hole.seq,
            missing_bytes = hole.len,
            cause = ?hole.cause,
            "closing a connection at a hole in its stream"
        );
        self.stats.missing_bytes += hole.len;
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
                Phase::Waiting { segments, span, .. } => {
                    let counted: usize = segments.iter().map(|(_, p, _)| held_cost(p.len())).sum();
                    assert_eq!(conn.held, counted, "a waiting flow's memory");
                    assert!(self.timed.contains(flow), "a waiting flow has a deadline");
                    for (seq, _, _) in segments {
                        assert!(span.contains(*seq));
                    }
                }
                Phase::Open {
                    id,
                    carried,
                    stream,
                    pending_rst,
                    ..
                } => {
                    stream.assert_consistent();
                    assert!(!stream.is_finished(), "a finished stream stays open");
                    assert_eq!(conn.held, stream.held_bytes(), "a stream's memory");
                    if stream.is_waiting() {
                        assert!(self.timed.contains(flow), "a hole has a deadline");
                    }
                    if let Some((seq, _)) = pending_rst {
                        assert!(self.timed.contains(flow), "a waiting RST has a deadline");
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

    use super::*;

    const LIMITS: TableLimits = TableLimits {
        max_connections: 3,
        max_buffered_bytes: 1000,
        idle_timeout_ns: 10_000,
        reorder: ReorderLimits {
            max_bytes: 800,
            max_wait_ns: 5_000,
        },
    };

    fn flow(client_port: u16) -> FlowKey {
        FlowKey {
            src: SocketAddr::from(([198, 18, 0, 1], client_port)),
            dst: SocketAddr::from(([198, 18, 0, 2], 80)),
        }
    }

    fn seg(flow: FlowKey, seq: u32, flags: TcpFlags, payload: &[u8]) -> Segment {
        Segment {
            flow,
            seq,
            flags,
            payload: Bytes::copy_from_slice(payload),
            truncated: false,
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
                StreamEvent::Data { conn, bytes } => {
                    format!("data {conn} {}", String::from_utf8_lossy(&bytes))
                }
                StreamEvent::Closed { conn, reason } => format!("close {conn} {reason}"),
            });
        }
    }

    const SYN: TcpFlags = TcpFlags::SYN;
    const ACK: TcpFlags = TcpFlags::ACK;
    const FIN: TcpFlags = TcpFlags::FIN.union(TcpFlags::ACK);
    const RST: TcpFlags = TcpFlags::RST;

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
            flow: flow(1),
            seq: 10,
            flags: ACK,
            payload,
            truncated: false,
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
}

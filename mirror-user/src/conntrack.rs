//! The connection table of one flow shard, sans-IO like the reassembler:
//! segments, losses and the current time go in, stream events come out.
//!
//! A connection opens on the client's SYN. Data of a flow without a SYN
//! first waits, within the reorder budget, for a SYN that may still sit in
//! another CPU's ring; when none comes, the flow opens `midstream` at the
//! lowest sequence number seen (a connection that ran before the mirror
//! started, or resumes after a loss). A connection closes on FIN (reached
//! in order), RST, idleness, a hole (`gap`), or eviction when the table or
//! its buffered bytes reach their limits: the least recently seen
//! connection goes first. Every close is an event with its reason.

use std::{collections::HashSet, num::NonZeroUsize};

use bytes::Bytes;
use lru::LruCache;

use crate::{
    reassembly::{Hole, Reassembler, ReorderLimits},
    record::TcpFlags,
    segment::{FlowKey, Segment},
    stream::{CloseReason, ConnId, StreamEvent},
};

/// Limits of one shard's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableLimits {
    pub max_connections: usize,
    /// Payload bytes held in reorder buffers, all connections together.
    pub max_buffered_bytes: usize,
    pub idle_timeout_ns: u64,
    pub reorder: ReorderLimits,
}

/// Receives the events of a table, with the destination port they belong to.
pub trait EventSink {
    fn event(&mut self, port: u16, event: StreamEvent);
}

impl<F: FnMut(u16, StreamEvent)> EventSink for F {
    fn event(&mut self, port: u16, event: StreamEvent) {
        self(port, event)
    }
}

/// What a table did, for the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableStats {
    pub opened: u64,
    pub opened_midstream: u64,
    pub closed: [u64; CloseReason::ALL.len()],
    /// Bytes known to be missing where streams ended with `gap`.
    pub missing_bytes: u64,
    /// Segments of no known connection that could not open one (a pure
    /// ACK or FIN of a connection that started before the mirror), and
    /// segments that arrived after their connection's FIN or RST.
    pub untracked: u64,
    pub delivered_bytes: u64,
}

impl TableStats {
    pub fn closed(&self, reason: CloseReason) -> u64 {
        self.closed[reason as usize]
    }

    pub fn add(&mut self, other: &Self) {
        self.opened += other.opened;
        self.opened_midstream += other.opened_midstream;
        for (total, n) in self.closed.iter_mut().zip(other.closed) {
            *total += n;
        }
        self.missing_bytes += other.missing_bytes;
        self.untracked += other.untracked;
        self.delivered_bytes += other.delivered_bytes;
    }
}

struct Connection {
    phase: Phase,
    last_seen_ns: u64,
    /// Bytes held for this flow (reorder buffer or waiting segments), as
    /// last counted into the table's total.
    held: usize,
}

enum Phase {
    /// Data without a SYN: waiting for the SYN from another CPU's ring.
    Waiting {
        segments: Vec<(u32, Bytes, bool)>,
        since_ns: u64,
    },
    Open {
        id: ConnId,
        /// Sequence number right after the SYN, to recognize its
        /// retransmission.
        syn_next: Option<u32>,
        stream: Reassembler,
    },
}

impl Connection {
    fn id(&self) -> Option<ConnId> {
        match &self.phase {
            Phase::Open { id, .. } => Some(*id),
            Phase::Waiting { .. } => None,
        }
    }
}

/// How long a flow closed by FIN or RST ignores segments without SYN:
/// retransmissions that arrive after the close are not a new connection.
const ENDED_GRACE_NS: u64 = 10_000_000_000;
/// Closed flows remembered at once (the oldest are forgotten first).
const ENDED_CAPACITY: usize = 65536;

pub struct ConnectionTable {
    /// Least recently seen first.
    conns: LruCache<FlowKey, Connection>,
    /// Flows recently closed by FIN or RST, with when they were closed.
    ended: LruCache<FlowKey, u64>,
    /// Flows with a deadline: bytes held behind a hole, a FIN beyond one,
    /// or data waiting for its SYN.
    timed: HashSet<FlowKey>,
    buffered: usize,
    limits: TableLimits,
    next_id: ConnId,
    id_step: ConnId,
    stats: TableStats,
    scratch: Vec<Bytes>,
}

impl ConnectionTable {
    /// A table whose connection ids are `first_id`, `first_id + id_step`,
    /// ... (shards use distinct residues so ids are unique).
    pub fn new(limits: TableLimits, first_id: ConnId, id_step: ConnId) -> Self {
        Self {
            conns: LruCache::unbounded(),
            ended: LruCache::new(NonZeroUsize::new(ENDED_CAPACITY).expect("non-zero")),
            timed: HashSet::new(),
            buffered: 0,
            limits,
            next_id: first_id,
            id_step: id_step.max(1),
            stats: TableStats::default(),
            scratch: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    pub fn buffered_bytes(&self) -> usize {
        self.buffered
    }

    pub fn stats(&self) -> &TableStats {
        &self.stats
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
            self.close(&flow, CloseReason::Rst, sink);
            return;
        }
        if flags.contains(TcpFlags::SYN) {
            self.ended.pop(&flow);
            self.syn(flow, seq, now_ns, sink);
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
                    },
                    last_seen_ns: now_ns,
                    held: 0,
                },
            );
            self.timed.insert(flow);
        }
        if truncated {
            // Bytes the stream carried were not captured (--snaplen).
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
                Phase::Open { stream, .. } => {
                    if let Err(hole) = stream.poll(now_ns) {
                        self.gap(&flow, hole, sink);
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

    fn syn(&mut self, flow: FlowKey, seq: u32, now_ns: u64, sink: &mut impl EventSink) {
        let next = seq.wrapping_add(1);
        let waiting = match self.conns.get_mut(&flow) {
            Some(conn) => match &mut conn.phase {
                Phase::Open { syn_next, .. } if *syn_next == Some(next) => {
                    conn.last_seen_ns = now_ns;
                    return; // a retransmitted SYN
                }
                Phase::Waiting { segments, .. } => Some(std::mem::take(segments)),
                // The 4-tuple was reused: the old connection ended unseen.
                Phase::Open { .. } => {
                    self.close(&flow, CloseReason::Idle, sink);
                    None
                }
            },
            None => None,
        };
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
    }

    /// Opens a waiting flow at the lowest sequence number it holds.
    fn open_midstream(&mut self, flow: &FlowKey, now_ns: u64, sink: &mut impl EventSink) {
        let Some(conn) = self.conns.peek_mut(flow) else {
            return;
        };
        let Phase::Waiting { segments, .. } = &mut conn.phase else {
            return;
        };
        let segments = std::mem::take(segments);
        let Some(first) = segments.first().map(|(seq, _, _)| *seq) else {
            return;
        };
        let start = segments
            .iter()
            .map(|(seq, _, _)| *seq)
            .min_by_key(|seq| seq.wrapping_sub(first) as i32)
            .unwrap_or(first);
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

    /// Makes room for one more flow.
    fn make_room(&mut self, sink: &mut impl EventSink) {
        while self.conns.len() >= self.limits.max_connections.max(1) {
            let Some(oldest) = self.conns.peek_lru().map(|(flow, _)| *flow) else {
                break;
            };
            self.close(&oldest, CloseReason::Evicted, sink);
        }
    }

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
        let id = self.next_id;
        self.next_id += self.id_step;
        self.stats.opened += 1;
        if midstream {
            self.stats.opened_midstream += 1;
        }
        self.conns.put(
            flow,
            Connection {
                phase: Phase::Open {
                    id,
                    syn_next,
                    stream: Reassembler::new(next_seq, self.limits.reorder),
                },
                last_seen_ns: now_ns,
                held: 0,
            },
        );
        sink.event(
            flow.dst.port(),
            StreamEvent::Opened {
                conn: id,
                src: flow.src,
                dst: flow.dst,
                midstream,
            },
        );
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
        let (id, stream) = match &mut conn.phase {
            Phase::Waiting { segments, .. } => {
                let len = payload.len();
                segments.push((seq, payload, fin));
                conn.held += len;
                self.buffered += len;
                if conn.held > self.limits.reorder.max_bytes {
                    // No room to wait any longer for the SYN.
                    self.open_midstream(flow, now_ns, sink);
                }
                return;
            }
            Phase::Open { id, stream, .. } => (*id, stream),
        };
        self.scratch.clear();
        let result = stream.push(seq, payload, fin, now_ns, &mut self.scratch);
        let finished = stream.is_finished();
        let waits = stream.is_waiting();
        let held = stream.held_bytes();
        self.buffered = self.buffered + held - conn.held;
        conn.held = held;
        let port = flow.dst.port();
        for bytes in self.scratch.drain(..) {
            self.stats.delivered_bytes += bytes.len() as u64;
            sink.event(port, StreamEvent::Data { conn: id, bytes });
        }
        match result {
            Err(hole) => self.gap(flow, hole, sink),
            Ok(()) if finished => self.close(flow, CloseReason::Fin, sink),
            Ok(()) if waits => {
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

    /// Ends `flow`: an open connection with a close event, a waiting one
    /// silently (no consumer has seen it).
    fn close(&mut self, flow: &FlowKey, reason: CloseReason, sink: &mut impl EventSink) {
        let Some(conn) = self.conns.pop(flow) else {
            return;
        };
        self.timed.remove(flow);
        self.buffered -= conn.held;
        let Some(id) = conn.id() else {
            self.stats.untracked += 1;
            return;
        };
        self.stats.closed[reason as usize] += 1;
        if matches!(reason, CloseReason::Fin | CloseReason::Rst) {
            self.ended.put(*flow, conn.last_seen_ns);
        }
        sink.event(flow.dst.port(), StreamEvent::Closed { conn: id, reason });
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

    fn seg(flow: FlowKey, seq: u32, flags: u8, payload: &[u8]) -> Segment {
        Segment {
            flow,
            seq,
            flags: TcpFlags(flags),
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

    const SYN: u8 = TcpFlags::SYN;
    const ACK: u8 = TcpFlags::ACK;
    const FIN: u8 = TcpFlags::FIN | TcpFlags::ACK;
    const RST: u8 = TcpFlags::RST;

    #[test]
    fn a_connection_from_syn_to_fin() {
        let mut table = ConnectionTable::new(LIMITS, 1, 1);
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
        let mut table = ConnectionTable::new(LIMITS, 1, 1);
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
        let mut table = ConnectionTable::new(LIMITS, 1, 1);
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
        let mut table = ConnectionTable::new(LIMITS, 1, 1);
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
        let mut table = ConnectionTable::new(LIMITS, 1, 1);
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
        let mut table = ConnectionTable::new(LIMITS, 1, 1);
        let mut log = Log::default();
        let f = flow(1000);
        table.segment(seg(f, 0, SYN, b""), 0, &mut log);
        table.segment(seg(f, 1, ACK, b"ab"), 0, &mut log);
        table.segment(seg(f, 5, ACK, b"ef"), 100, &mut log);
        table.tick(100 + LIMITS.reorder.max_wait_ns, &mut log);
        assert_eq!(log.0.len(), 2, "still waiting");
        table.tick(101 + LIMITS.reorder.max_wait_ns, &mut log);
        assert_eq!(log.0, ["open 1", "data 1 ab", "close 1 gap"]);
        assert_eq!(table.stats().missing_bytes, 2);
        assert_eq!(table.buffered_bytes(), 0);
    }

    #[test]
    fn a_loss_reported_upstream_closes_with_gap() {
        let mut table = ConnectionTable::new(LIMITS, 1, 1);
        let mut log = Log::default();
        table.segment(seg(flow(1), 0, SYN, b""), 0, &mut log);
        table.segment(seg(flow(1), 1, ACK, b"x"), 0, &mut log);
        table.lost(&flow(1), &mut log);
        table.lost(&flow(2), &mut log); // unknown: nothing to close
        assert_eq!(log.0, ["open 1", "data 1 x", "close 1 gap"]);
    }

    #[test]
    fn idle_connections_close() {
        let mut table = ConnectionTable::new(LIMITS, 1, 1);
        let mut log = Log::default();
        table.segment(seg(flow(1), 0, SYN, b""), 0, &mut log);
        table.segment(seg(flow(2), 0, SYN, b""), 5_000, &mut log);
        table.tick(10_000, &mut log);
        assert_eq!(table.len(), 2);
        table.tick(10_001, &mut log);
        assert_eq!(table.len(), 1);
        assert_eq!(log.0.last().unwrap(), "close 1 idle");
    }

    #[test]
    fn the_oldest_idle_connection_is_evicted_at_the_table_limit() {
        let mut table = ConnectionTable::new(LIMITS, 1, 1);
        let mut log = Log::default();
        for (i, port) in [1, 2, 3].into_iter().enumerate() {
            table.segment(seg(flow(port), 0, SYN, b""), i as u64, &mut log);
        }
        // Connection 1 was seen last: 2 is now the least recently seen.
        table.segment(seg(flow(1), 1, ACK, b"y"), 10, &mut log);
        table.segment(seg(flow(4), 0, SYN, b""), 11, &mut log);
        assert!(log.0.contains(&"close 2 evicted".to_owned()), "{:?}", log.0);
        assert_eq!(table.len(), 3);
    }

    #[test]
    fn buffered_bytes_over_the_budget_evict() {
        let mut table = ConnectionTable::new(LIMITS, 1, 1);
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
        let mut table = ConnectionTable::new(LIMITS, 1, 1);
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
        assert_eq!(log.0.last().unwrap(), "open 2");
    }

    #[test]
    fn a_new_syn_on_a_used_tuple_starts_a_new_connection() {
        let mut table = ConnectionTable::new(LIMITS, 1, 1);
        let mut log = Log::default();
        table.segment(seg(flow(1), 0, SYN, b""), 0, &mut log);
        table.segment(seg(flow(1), 1000, SYN, b""), 1, &mut log);
        assert_eq!(log.0, ["open 1", "close 1 idle", "open 2"]);
    }

    #[test]
    fn truncated_segments_end_the_stream() {
        let mut table = ConnectionTable::new(LIMITS, 1, 1);
        let mut log = Log::default();
        table.segment(seg(flow(1), 0, SYN, b""), 0, &mut log);
        table.segment(seg(flow(1), 1, ACK, b"a"), 0, &mut log);
        let mut cut = seg(flow(1), 2, ACK, b"b");
        cut.truncated = true;
        table.segment(cut, 1, &mut log);
        assert_eq!(log.0, ["open 1", "data 1 a", "close 1 gap"]);
    }

    #[test]
    fn ids_step_by_shard_count() {
        let mut table = ConnectionTable::new(LIMITS, 3, 4);
        let mut log = Log::default();
        table.segment(seg(flow(1), 0, SYN, b""), 0, &mut log);
        table.segment(seg(flow(2), 0, SYN, b""), 0, &mut log);
        assert_eq!(log.0, ["open 3", "open 7"]);
        table.close_all(CloseReason::Shutdown, &mut log);
        assert_eq!(&log.0[2..], ["close 3 shutdown", "close 7 shutdown"]);
    }
}

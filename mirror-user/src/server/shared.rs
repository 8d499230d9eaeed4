//! A session's payloads in the shared arena: which data events go to the
//! client as references (`DATA_REF`) instead of bytes, the references it
//! has not returned yet, and what happens when it holds too many.
//!
//! Sans-IO: events in, frames out; the session writes them.

use std::collections::{HashMap, HashSet, VecDeque, hash_map::Entry};

use bytes::Bytes;

use crate::{
    arena::{Arena, CHUNK},
    flow::model::{CloseReason, ConnId, StreamEvent},
    server::protocol::ServerFrame,
};

/// Part of the arena one client may hold unreturned: a client that stops
/// returning references can pin no more than this, so the others (and
/// the pipeline) keep most of the arena.
pub const CLIENT_SHARE_DIVISOR: usize = 4;

/// What a client may hold unreturned: its part of the arena, and no more
/// than a port's channel may hold (`--channel-bytes`, how far any consumer
/// may fall behind).
pub fn client_share(arena: &Arena, channel_bytes: usize) -> usize {
    (arena.size() / CLIENT_SHARE_DIVISOR).min(channel_bytes)
}

/// What each reference costs against the share besides its bytes: the
/// session's record of it, and the padding before it in its chunk. A
/// stream of one-byte payloads cannot make a client hold millions of
/// references within its share.
pub const REFERENCE_COST: usize = 64;

/// Chunks a client's references may keep leased beyond its share in whole
/// chunks: the chunks each flow shard is filling right now, which a
/// client that keeps up also refers to.
pub const CHUNK_SLACK: usize = 4;

/// A client returned more references than it held.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("credit for {count} references, but only {held} were sent and not returned")]
pub struct OverCredit {
    pub count: u32,
    pub held: usize,
}

/// What one session shares of the arena with its client.
pub struct SharedPayloads {
    arena: Arena,
    budget: usize,
    /// Payloads referenced and not yet returned, oldest first: holding
    /// them keeps their chunks out of reuse while the client reads.
    outstanding: VecDeque<Bytes>,
    /// Their cost against the budget: bytes plus [`REFERENCE_COST`] each.
    outstanding_bytes: usize,
    /// The chunks they lie in, with how many lie in each: one reference
    /// keeps its whole chunk out of reuse, so a client that holds one small
    /// payload in each chunk would pin the arena within a small budget.
    pinned: HashMap<u64, u32>,
    /// Chunks beyond which payloads go as bytes instead of references.
    max_chunks: usize,
    /// Connections this client has open.
    open: HashSet<ConnId>,
    /// Connections closed here as lagged whose events still come from the
    /// subscription (until its own `Closed`), to be swallowed.
    dropped: HashSet<ConnId>,
    /// Over its share since the last lag, and no credit since.
    lagging: bool,
}

impl SharedPayloads {
    pub fn with_budget(arena: Arena, budget: usize) -> Self {
        Self {
            arena,
            budget,
            outstanding: VecDeque::new(),
            outstanding_bytes: 0,
            pinned: HashMap::new(),
            max_chunks: budget / CHUNK + CHUNK_SLACK,
            open: HashSet::new(),
            dropped: HashSet::new(),
            lagging: false,
        }
    }

    /// Referenced bytes the client may hold unreturned.
    pub fn share(&self) -> usize {
        self.budget
    }

    /// Whether the client went over its share and has returned nothing
    /// since.
    pub fn lagging(&self) -> bool {
        self.lagging
    }

    /// Bytes referenced and not yet returned, plus [`REFERENCE_COST`]
    /// for each.
    pub fn outstanding_bytes(&self) -> usize {
        self.outstanding_bytes
    }

    /// The frames for `event`, given to `send`. Returns how many
    /// connections were closed as lagged because the client holds its
    /// whole budget (all its open connections: a byte of one of them is
    /// lost to it).
    pub fn translate(&mut self, event: StreamEvent, mut send: impl FnMut(ServerFrame)) -> usize {
        match event {
            StreamEvent::Opened { conn, .. } => {
                self.open.insert(conn);
                send(ServerFrame::Event(event));
            }
            StreamEvent::Closed { conn, .. } => {
                if !self.dropped.remove(&conn) {
                    self.open.remove(&conn);
                    send(ServerFrame::Event(event));
                }
            }
            StreamEvent::Data {
                conn,
                dir,
                peer_acked,
                ref bytes,
            } => {
                if self.dropped.contains(&conn) {
                    return 0;
                }
                let Some(offset) = self.arena.offset_of(bytes) else {
                    // Not in the arena (it was full): the bytes themselves.
                    send(ServerFrame::Event(event));
                    return 0;
                };
                let cost = bytes.len() + REFERENCE_COST;
                if cost > self.budget {
                    // No amount of credit makes room for it: as bytes,
                    // rather than lagging a client that may hold nothing.
                    send(ServerFrame::Event(event));
                    return 0;
                }
                // A connection opened before the client mapped the arena
                // (it subscribed first) is closed as lagged like the others.
                if !self.open.contains(&conn) {
                    self.open.insert(conn);
                }
                if self.outstanding_bytes + cost > self.budget {
                    return self.lag(send);
                }
                let chunk = offset / CHUNK as u64;
                if self.pinned.len() >= self.max_chunks && !self.pinned.contains_key(&chunk) {
                    // The client pins its share in whole chunks already.
                    send(ServerFrame::Event(event));
                    return 0;
                }
                *self.pinned.entry(chunk).or_default() += 1;
                send(ServerFrame::DataRef {
                    conn,
                    dir,
                    peer_acked,
                    offset,
                    len: bytes.len() as u32,
                });
                self.outstanding_bytes += cost;
                if let StreamEvent::Data { bytes, .. } = event {
                    self.outstanding.push_back(bytes);
                }
            }
        }
        0
    }

    fn lag(&mut self, mut send: impl FnMut(ServerFrame)) -> usize {
        let mut closing: Vec<ConnId> = self.open.drain().collect();
        closing.sort_unstable();
        for conn in &closing {
            send(ServerFrame::Event(StreamEvent::Closed {
                conn: *conn,
                reason: CloseReason::Lagged,
            }));
        }
        self.dropped.extend(&closing);
        self.lagging = true;
        closing.len()
    }

    /// The client is done with its oldest `count` references.
    pub fn credit(&mut self, count: u32) -> Result<(), OverCredit> {
        let held = self.outstanding.len();
        if count as usize > held {
            return Err(OverCredit { count, held });
        }
        for bytes in self.outstanding.drain(..count as usize) {
            self.outstanding_bytes -= bytes.len() + REFERENCE_COST;
            let Some(chunk) = self.arena.offset_of(&bytes).map(|at| at / CHUNK as u64) else {
                continue;
            };
            if let Entry::Occupied(mut held) = self.pinned.entry(chunk) {
                *held.get_mut() -= 1;
                if *held.get() == 0 {
                    held.remove();
                }
            }
        }
        if count > 0 {
            self.lagging = false;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{arena::CHUNK, flow::segment::PayloadPool};

    fn opened(conn: ConnId) -> StreamEvent {
        StreamEvent::Opened {
            iface: Default::default(),
            conn,
            src: "198.18.0.1:40000".parse().unwrap(),
            dst: "198.18.0.2:80".parse().unwrap(),
            midstream: false,
        }
    }

    fn data(conn: ConnId, bytes: Bytes) -> StreamEvent {
        StreamEvent::Data {
            peer_acked: 0,
            conn,
            bytes,
            dir: crate::flow::model::Direction::Client,
        }
    }

    fn frames(shared: &mut SharedPayloads, event: StreamEvent) -> (Vec<ServerFrame>, usize) {
        let mut out = Vec::new();
        let lagged = shared.translate(event, |frame| out.push(frame));
        (out, lagged)
    }

    #[test]
    fn arena_payloads_go_as_references_others_as_bytes() {
        let arena = Arena::new(CHUNK).unwrap();
        let mut pool = PayloadPool::with_arena(arena.clone());
        let mut shared = SharedPayloads::with_budget(arena.clone(), 100);
        let first = pool.copy(b"hello");
        let (out, _) = frames(&mut shared, opened(1));
        assert!(matches!(
            out[..],
            [ServerFrame::Event(StreamEvent::Opened { conn: 1, .. })]
        ));
        let (out, _) = frames(&mut shared, data(1, first.clone()));
        assert_eq!(
            out,
            [ServerFrame::DataRef {
                conn: 1,
                dir: Default::default(),
                peer_acked: 0,
                offset: arena.offset_of(&first).unwrap(),
                len: 5
            }]
        );
        let heap = Bytes::from_static(b"inline");
        let (out, _) = frames(&mut shared, data(1, heap.clone()));
        assert_eq!(out, [ServerFrame::Event(data(1, heap))]);
        assert_eq!(shared.outstanding_bytes(), 5 + REFERENCE_COST);
        // The reference keeps the chunk: the pool's own handle is not the
        // only one.
        drop(pool);
        drop(first);
        assert_eq!(arena.counters().in_use_bytes, CHUNK as u64);
        shared.credit(1).unwrap();
        assert_eq!(arena.counters().in_use_bytes, 0);
        assert_eq!(shared.outstanding_bytes(), 0);
    }

    #[test]
    fn credit_for_references_never_sent_is_refused_and_frees_nothing() {
        let arena = Arena::new(CHUNK).unwrap();
        let mut pool = PayloadPool::with_arena(arena.clone());
        let mut shared = SharedPayloads::with_budget(arena.clone(), 1000);
        frames(&mut shared, opened(1));
        frames(&mut shared, data(1, pool.copy(b"abc")));
        drop(pool);
        assert_eq!(shared.credit(2), Err(OverCredit { count: 2, held: 1 }));
        assert_eq!(shared.credit(u32::MAX).unwrap_err().held, 1);
        assert_eq!(arena.counters().in_use_bytes, CHUNK as u64, "still held");
        shared.credit(0).unwrap();
        shared.credit(1).unwrap();
        assert_eq!(shared.credit(1), Err(OverCredit { count: 1, held: 0 }));
    }

    #[test]
    fn a_client_over_its_budget_loses_its_open_connections_as_lagged() {
        let arena = Arena::new(CHUNK).unwrap();
        let mut pool = PayloadPool::with_arena(arena.clone());
        let mut shared = SharedPayloads::with_budget(arena, 10 + 2 * REFERENCE_COST);
        frames(&mut shared, opened(1));
        frames(&mut shared, opened(2));
        frames(&mut shared, data(1, pool.copy(b"12345678")));
        let (out, lagged) = frames(&mut shared, data(2, pool.copy(b"abc")));
        assert_eq!(lagged, 2);
        assert!(shared.lagging());
        let closed = |conn| {
            ServerFrame::Event(StreamEvent::Closed {
                conn,
                reason: CloseReason::Lagged,
            })
        };
        assert_eq!(out, [closed(1), closed(2)]);
        // The rest of those connections is swallowed, their end too.
        assert!(frames(&mut shared, data(1, pool.copy(b"x"))).0.is_empty());
        let fin = StreamEvent::Closed {
            conn: 1,
            reason: CloseReason::Fin,
        };
        assert!(frames(&mut shared, fin).0.is_empty());
        // Returned: a connection that opens afterwards is served.
        shared.credit(1).unwrap();
        assert!(!shared.lagging());
        frames(&mut shared, opened(3));
        let (out, lagged) = frames(&mut shared, data(3, pool.copy(b"abc")));
        assert_eq!(lagged, 0);
        assert!(matches!(
            out[..],
            [ServerFrame::DataRef {
                conn: 3,
                len: 3,
                ..
            }]
        ));
        let fin = StreamEvent::Closed {
            conn: 3,
            reason: CloseReason::Fin,
        };
        assert_eq!(
            frames(&mut shared, fin.clone()).0,
            [ServerFrame::Event(fin)]
        );
    }

    #[test]
    fn a_connection_opened_before_the_arena_was_mapped_is_closed_as_lagged_too() {
        let arena = Arena::new(CHUNK).unwrap();
        let mut pool = PayloadPool::with_arena(arena.clone());
        let mut shared = SharedPayloads::with_budget(arena, 10 + REFERENCE_COST);
        // Connection 7 opened before MAP_ARENA: its OPENED went as a frame
        // of its own, this session never saw it.
        frames(&mut shared, data(7, pool.copy(b"12345678")));
        let (out, lagged) = frames(&mut shared, data(7, pool.copy(b"abc")));
        assert_eq!(lagged, 1, "its byte is lost to the client: it must be told");
        assert_eq!(
            out,
            [ServerFrame::Event(StreamEvent::Closed {
                conn: 7,
                reason: CloseReason::Lagged,
            })]
        );
        assert!(frames(&mut shared, data(7, pool.copy(b"x"))).0.is_empty());
    }

    #[test]
    fn a_payload_larger_than_the_whole_share_goes_as_bytes() {
        let arena = Arena::new(CHUNK).unwrap();
        let mut pool = PayloadPool::with_arena(arena.clone());
        // A share below one payload (a small --channel-bytes).
        let mut shared = SharedPayloads::with_budget(arena, 100);
        frames(&mut shared, opened(1));
        let big = pool.copy(&[5u8; 200]);
        let (out, lagged) = frames(&mut shared, data(1, big.clone()));
        assert_eq!(lagged, 0, "the client holds nothing");
        assert_eq!(out, [ServerFrame::Event(data(1, big))]);
        assert!(!shared.lagging());
        assert_eq!(shared.outstanding_bytes(), 0);
    }

    #[test]
    fn a_client_pins_at_most_its_share_in_whole_chunks() {
        let chunks = CHUNK_SLACK + 3;
        let arena = Arena::new(chunks * CHUNK).unwrap();
        // A share of one chunk: at most 1 + CHUNK_SLACK chunks referred to.
        let mut shared = SharedPayloads::with_budget(arena.clone(), CHUNK);
        frames(&mut shared, opened(1));
        // One small payload in each chunk (a quiet port beside busy ones):
        // a few hundred bytes of budget.
        let payloads: Vec<Bytes> = (0..chunks)
            .map(|_| PayloadPool::with_arena(arena.clone()).copy(b"tiny"))
            .collect();
        let mut refs = 0u32;
        for payload in &payloads {
            let (out, lagged) = frames(&mut shared, data(1, payload.clone()));
            assert_eq!(lagged, 0);
            match &out[..] {
                [ServerFrame::DataRef { .. }] => refs += 1,
                [ServerFrame::Event(StreamEvent::Data { bytes, .. })] => {
                    assert_eq!(&bytes[..], b"tiny")
                }
                other => panic!("unexpected frames {other:?}"),
            }
        }
        assert_eq!(refs as usize, 1 + CHUNK_SLACK);
        drop(payloads);
        assert_eq!(
            arena.counters().in_use_bytes,
            ((1 + CHUNK_SLACK) * CHUNK) as u64,
            "the client pins only the chunks it was referred to"
        );
        // Credited, its chunks are free and references flow again.
        shared.credit(refs).unwrap();
        assert_eq!(arena.counters().in_use_bytes, 0);
        let again = PayloadPool::with_arena(arena.clone()).copy(b"again");
        assert!(matches!(
            frames(&mut shared, data(1, again)).0[..],
            [ServerFrame::DataRef { .. }]
        ));
    }
}

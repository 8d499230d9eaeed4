//! The model of the flow stage: a flow's key, and what consumers receive:
//! connections opening, their in-order bytes, and their end with a reason.

use std::{
    fmt,
    hash::{BuildHasher, Hash},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;

/// The client-to-server direction of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: SocketAddr,
    pub dst: SocketAddr,
}

impl FlowKey {
    /// Which of `shards` owns this flow.
    pub fn shard(&self, shards: usize) -> usize {
        // Fixed keys: the choice only needs to be stable within one run.
        let hash =
            std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
                .hash_one(self);
        (hash % shards.max(1) as u64) as usize
    }
}

/// Which way a connection's bytes went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Direction {
    /// From the client to the server (the only one with `--directions
    /// client`).
    #[default]
    Client,
    /// The server's answers (`--directions both`).
    Server,
}

impl Direction {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Server => "server",
        }
    }
}

/// An interface's name as consumers see it: shared, so that announcing a
/// connection clones a handle, not a string.
pub type Iface = Arc<str>;

/// A connection's number, unique for the life of the mirror.
pub type ConnId = u64;

/// Hands out the connection ids of the whole mirror: unique across the
/// shards' tables and increasing in the order connections are announced,
/// the first being 1. One is taken per announced connection, never per
/// packet.
#[derive(Debug, Clone, Default)]
pub struct ConnIds(Arc<AtomicU64>);

impl ConnIds {
    /// The next id.
    pub fn next(&self) -> ConnId {
        self.0.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// Why a connection's stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// The client's FIN, reached in order, and the server's too when its
    /// answers are followed (`--directions both`): the streams are
    /// complete.
    Fin,
    /// The client (or, with `--directions both`, the server) reset the
    /// connection.
    Rst,
    /// Nothing arrived for the idle timeout (or a SYN with a new ISN took
    /// the 4-tuple of a connection that had been quiet).
    Idle,
    /// Bytes were lost (a hole that was not filled in time, or a loss the
    /// mirror counted on the way, or a SYN took the 4-tuple while bytes
    /// before the FIN were missing): nothing after the hole is delivered.
    Gap,
    /// This consumer fell behind the others and missed events.
    Lagged,
    /// The connection table or its buffers were full; the oldest idle
    /// connection made room.
    Evicted,
    /// The mirror stopped.
    Shutdown,
}

impl CloseReason {
    pub const ALL: [Self; 7] = [
        Self::Fin,
        Self::Rst,
        Self::Idle,
        Self::Gap,
        Self::Lagged,
        Self::Evicted,
        Self::Shutdown,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Fin => "fin",
            Self::Rst => "rst",
            Self::Idle => "idle",
            Self::Gap => "gap",
            Self::Lagged => "lagged",
            Self::Evicted => "evicted",
            Self::Shutdown => "shutdown",
        }
    }

    /// Whether the stream the consumer got is the whole client stream.
    pub const fn is_complete(self) -> bool {
        matches!(self, Self::Fin)
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One event of a mirrored connection (its bytes in either direction). A
/// connection's `Opened` comes before any of its other events, and comes
/// only once it carries something (a byte, a FIN, an RST, or bytes that
/// were lost): a bare SYN produces no event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    Opened {
        conn: ConnId,
        src: SocketAddr,
        dst: SocketAddr,
        /// Already running when mirroring started (no SYN seen): the
        /// stream starts at the first byte the mirror saw.
        midstream: bool,
        /// The interface the connection came through (`NETNS:IF` when it
        /// is in another network namespace); empty when not known.
        iface: Iface,
    },
    /// The next bytes of the stream, shared by every consumer (cloning the
    /// event clones a handle, not the bytes).
    Data {
        conn: ConnId,
        dir: Direction,
        bytes: Bytes,
        /// How far the other direction's stream had been acknowledged by
        /// this direction's sender when these bytes were delivered (bytes
        /// of the other stream, from its first): with both directions, a
        /// consumer interleaves them in the order they were exchanged.
        /// 0 while the other direction is not followed.
        peer_acked: u64,
    },
    Closed {
        conn: ConnId,
        reason: CloseReason,
    },
}

impl StreamEvent {
    pub const fn conn(&self) -> ConnId {
        match self {
            Self::Opened { conn, .. } | Self::Data { conn, .. } | Self::Closed { conn, .. } => {
                *conn
            }
        }
    }

    /// Bytes the server sent: only consumers that show both directions
    /// take them.
    pub const fn is_server_data(&self) -> bool {
        matches!(
            self,
            Self::Data {
                dir: Direction::Server,
                ..
            }
        )
    }

    /// Payload bytes the event carries.
    pub fn data_len(&self) -> usize {
        match self {
            Self::Data { bytes, .. } => bytes.len(),
            _ => 0,
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flow_always_maps_to_the_same_shard() {
        let flow = FlowKey {
            src: "198.18.0.1:40000".parse().unwrap(),
            dst: "198.18.0.2:80".parse().unwrap(),
        };
        let shard = flow.shard(4);
        assert!(shard < 4);
        for _ in 0..10 {
            assert_eq!(flow.shard(4), shard);
        }
        assert_eq!(flow.shard(1), 0);
    }
}

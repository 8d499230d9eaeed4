//! Stream events for the sinks' tests.

use std::net::SocketAddr;

use bytes::Bytes;

use crate::flow::model::{CloseReason, ConnId, Direction, StreamEvent};

/// A connection seen from its SYN.
pub fn opened(conn: ConnId, src: SocketAddr, dst: SocketAddr) -> StreamEvent {
    StreamEvent::Opened {
        iface: Default::default(),
        conn,
        src,
        dst,
        midstream: false,
    }
}

/// A connection picked up midstream.
pub fn opened_midstream(conn: ConnId, src: SocketAddr, dst: SocketAddr) -> StreamEvent {
    StreamEvent::Opened {
        iface: Default::default(),
        conn,
        src,
        dst,
        midstream: true,
    }
}

pub fn data(conn: ConnId, bytes: &'static [u8]) -> StreamEvent {
    StreamEvent::Data {
        peer_acked: 0,
        dir: Default::default(),
        conn,
        bytes: Bytes::from_static(bytes),
    }
}

/// Bytes the server sent (`--directions both`).
pub fn answer(conn: ConnId, bytes: &'static [u8]) -> StreamEvent {
    StreamEvent::Data {
        peer_acked: 0,
        dir: Direction::Server,
        conn,
        bytes: Bytes::from_static(bytes),
    }
}

pub fn closed(conn: ConnId, reason: CloseReason) -> StreamEvent {
    StreamEvent::Closed { conn, reason }
}

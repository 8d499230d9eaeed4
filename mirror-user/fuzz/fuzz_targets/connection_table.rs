//! A connection table driven by arbitrary segment sequences over a few
//! 4-tuples: arbitrary flags, sequence numbers, payloads, losses and time
//! steps, with small limits so that every budget is reached.
//!
//! Every payload byte is a function of its flow and its sequence number,
//! so whatever a connection delivers can be checked against the "true"
//! stream: each connection is announced once before its bytes and closed
//! once, with nothing after; it delivers a contiguous run of its flow's
//! stream (no byte twice, none skipped over a hole, none invented); a
//! `fin` close ends exactly at a FIN the flow sent. Segments go either way
//! (`--directions both`): each direction is checked against its own
//! stream, and a `fin` close ends the client's at one of its FINs and the
//! server's too if it delivered anything. The table's own
//! bookkeeping (memory counts, deadlines, nothing held or delivered past a
//! FIN) is checked after every step, and debug assertions are on. Half
//! the inputs run `--deliver acked`, with arbitrary ACK numbers: bytes
//! then come out as acknowledgements release them, under the same checks.

#![no_main]

use std::{collections::HashMap, net::SocketAddr};

use arbitrary::Arbitrary;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use mirror_user::{
    flow::conntrack::{ConnectionTable, Delivery, TableLimits},
    flow::model::{CloseReason, ConnId, ConnIds, Direction, FlowKey, StreamEvent},
    flow::reassembly::ReorderLimits,
    flow::segment::{Segment, TcpFlags},
};

const FLOWS: usize = 4;
const MAX_OPS: usize = 512;
/// Time advances in steps of this many nanoseconds (10 µs).
const STEP_NS: u64 = 10_000;

#[derive(Arbitrary, Debug)]
struct Input {
    /// Each flow's sequence numbers are near its base.
    bases: [u32; FLOWS],
    max_connections: u8,
    /// Budgets in units of 256 bytes.
    max_buffered: u8,
    reorder_bytes: u8,
    acked: bool,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Segment {
        flow: u8,
        /// From the flow's base; `far` multiplies it by 65536.
        offset: i16,
        far: bool,
        len: u8,
        flags: u8,
        truncated: bool,
        /// The server's answer rather than the client's segment.
        server: bool,
        /// The ACK number, from the other direction's base.
        ack: i16,
        /// Time steps before the segment.
        wait: u16,
    },
    Tick {
        wait: u16,
    },
    Lost {
        flow: u8,
    },
}

fn flow_key(index: usize) -> FlowKey {
    FlowKey {
        src: SocketAddr::from(([198, 18, 0, 1], 1000 + index as u16)),
        dst: SocketAddr::from(([198, 18, 0, 2], 80)),
    }
}

fn flow_index(src: SocketAddr) -> usize {
    usize::from(src.port() - 1000)
}

/// The byte a flow carries at sequence number `seq` in direction `dir`.
fn truth(flow: usize, dir: usize, seq: u32) -> u8 {
    ((seq.wrapping_mul(0x9E37_79B1) >> 24) as u8)
        ^ (flow as u8).wrapping_mul(0x5b)
        ^ (dir as u8).wrapping_mul(0xa5)
}

/// The server's sequence numbers are near its flow's base moved by this.
const SERVER_BASE: u32 = 0x5555_5555;

#[derive(Default)]
struct Conn {
    flow: usize,
    /// Per direction (client, server).
    bytes: [Vec<u8>; 2],
    closed: bool,
}

/// What the flows were sent, and what consumers were told.
#[derive(Default)]
struct Checker {
    /// Per flow and direction: sequence numbers where a stream could
    /// start (any data segment's first byte, a SYN's ISN + 1).
    starts: [[Vec<u32>; 2]; FLOWS],
    /// Per flow and direction: sequence numbers of the FINs sent.
    fins: [[Vec<u32>; 2]; FLOWS],
    conns: HashMap<ConnId, Conn>,
    opened: u64,
    closed: u64,
    data_bytes: u64,
}

impl Checker {
    fn event(&mut self, port: u16, event: StreamEvent) {
        assert_eq!(port, 80);
        match event {
            StreamEvent::Opened { conn, src, dst, .. } => {
                let flow = flow_index(src);
                assert_eq!(flow_key(flow), FlowKey { src, dst });
                let known = self.conns.insert(
                    conn,
                    Conn {
                        flow,
                        ..Conn::default()
                    },
                );
                assert!(known.is_none(), "connection {conn} opened twice");
                self.opened += 1;
            }
            StreamEvent::Data {
                conn, dir, bytes, ..
            } => {
                let c = self.conns.get_mut(&conn).expect("Data before Opened");
                assert!(!c.closed, "Data after Closed");
                assert!(!bytes.is_empty(), "an empty Data event");
                c.bytes[dir as usize].extend_from_slice(&bytes);
                self.data_bytes += bytes.len() as u64;
            }
            StreamEvent::Closed { conn, reason } => {
                let c = self.conns.get_mut(&conn).expect("Closed before Opened");
                assert!(!c.closed, "connection {conn} closed twice");
                c.closed = true;
                self.closed += 1;
                self.check_stream(conn, reason);
            }
        }
    }

    /// Each direction's bytes are the flow's stream that way from some
    /// start on, and a `fin` close ends the client's at one of its FINs
    /// (the server's too, if it delivered any).
    fn check_stream(&self, conn: ConnId, reason: CloseReason) {
        let c = &self.conns[&conn];
        for dir in [0, 1] {
            let bytes = &c.bytes[dir];
            // Nothing to check (the connection may never have seen this
            // direction), unless a `fin` close needs the client's FIN.
            if bytes.is_empty() && (dir == 1 || reason != CloseReason::Fin) {
                continue;
            }
            let fits = |start: u32| {
                let contiguous = bytes
                    .iter()
                    .enumerate()
                    .all(|(i, byte)| *byte == truth(c.flow, dir, start.wrapping_add(i as u32)));
                let end = start.wrapping_add(bytes.len() as u32);
                contiguous && (reason != CloseReason::Fin || self.fins[c.flow][dir].contains(&end))
            };
            assert!(
                self.starts[c.flow][dir].iter().any(|start| fits(*start)),
                "connection {conn} ({reason}) delivered {} bytes in direction {dir} that are \
                 not a run of its stream ending where it should",
                bytes.len()
            );
        }
    }
}

fuzz_target!(|input: Input| {
    let limits = TableLimits {
        max_connections: usize::from(input.max_connections % 4) + 1,
        max_buffered_bytes: (usize::from(input.max_buffered) + 1) * 256,
        idle_timeout_ns: 200_000_000,
        reorder: ReorderLimits {
            max_bytes: (usize::from(input.reorder_bytes) + 1) * 256,
            max_wait_ns: 20_000_000,
        },
        deliver: if input.acked {
            Delivery::Acked
        } else {
            Delivery::Seen
        },
    };
    let mut table = ConnectionTable::new(limits, ConnIds::default());
    let mut checker = Checker::default();
    let mut now = 0u64;
    for op in input.ops.into_iter().take(MAX_OPS) {
        let mut sink = |port, event| checker.event(port, event);
        match op {
            Op::Segment {
                flow,
                offset,
                far,
                len,
                flags,
                truncated,
                server,
                ack,
                wait,
            } => {
                now += u64::from(wait) * STEP_NS;
                let index = usize::from(flow) % FLOWS;
                let (dir, d, base, peer_base) = if server {
                    let base = input.bases[index] ^ SERVER_BASE;
                    (Direction::Server, 1, base, input.bases[index])
                } else {
                    let base = input.bases[index];
                    (Direction::Client, 0, base, base ^ SERVER_BASE)
                };
                let offset = if far {
                    i32::from(offset) << 16
                } else {
                    i32::from(offset)
                };
                let seq = base.wrapping_add(offset as u32);
                let flags = TcpFlags::from_bits_retain(flags);
                let data_seq = seq.wrapping_add(u32::from(flags.contains(TcpFlags::SYN)));
                let payload: Vec<u8> = (0..u32::from(len))
                    .map(|i| truth(index, d, data_seq.wrapping_add(i)))
                    .collect();
                drop(sink);
                checker.starts[index][d].push(data_seq);
                if flags.contains(TcpFlags::FIN) {
                    checker.fins[index][d].push(data_seq.wrapping_add(u32::from(len)));
                }
                let mut sink = |port, event| checker.event(port, event);
                table.segment(
                    Segment {
                        flow: flow_key(index),
                        dir,
                        seq,
                        ack: peer_base.wrapping_add(i32::from(ack) as u32),
                        flags,
                        payload: Bytes::from(payload),
                        truncated,
                        iface: Default::default(),
                    },
                    now,
                    &mut sink,
                );
            }
            Op::Tick { wait } => {
                now += u64::from(wait) * STEP_NS;
                table.tick(now, &mut sink);
            }
            Op::Lost { flow } => {
                table.lost(&flow_key(usize::from(flow) % FLOWS), &mut sink);
            }
        }
        table.assert_consistent();
    }
    table.close_all(CloseReason::Shutdown, &mut |port, event| {
        checker.event(port, event)
    });
    assert!(table.is_empty());
    assert_eq!(table.buffered_bytes(), 0);
    assert!(
        checker.conns.values().all(|c| c.closed),
        "every announced connection is closed at the end"
    );
    let stats = table.stats();
    assert_eq!(stats.opened, checker.opened);
    assert_eq!(stats.closed.iter().sum::<u64>(), checker.closed);
    assert_eq!(stats.delivered_bytes, checker.data_bytes);
});

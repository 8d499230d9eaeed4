//! The shard stage in-process, without the kernel: ring records go in
//! through a router as a drain task hands them over, and stream events come
//! out of the hub to a subscriber.
//!
//! The tests run on tokio's current-thread runtime: the shard tasks run
//! only while the test waits, so what a router did before that (a full
//! queue, a loss report) is settled when the shards see it.

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use bytes::Bytes;
use etherparse::PacketBuilder;
use mirror_common::RecordHeader;

use super::*;
use crate::{
    fanout::{
        hub::HubConfig,
        subscription::{PortFeed, Subscription},
    },
    flow::{model::StreamEvent, reassembly::ReorderLimits, segment::TcpFlags},
};

const PORT: u16 = 80;

/// A hub with a channel for [`PORT`] that shards publish to, and a
/// subscriber of it.
struct Stage {
    hub: Arc<Hub>,
    feed: PortFeed,
    events: Subscription,
}

/// `shards` shards whose queues hold `queue_batches` batches each, and a
/// router to them; no connection idles out or waits for a hole to fill
/// while a test runs.
fn start(shards: usize, queue_batches: usize) -> (Stage, Shards, SegmentRouter) {
    let hub = Arc::new(Hub::new(
        &[PORT],
        HubConfig {
            capacity: 64,
            max_bytes: 64 << 20,
            // Every event with a byte publishes its batch at once.
            batch_bytes: 1,
        },
    ));
    let (feed, events) = hub.subscribe(&[PORT], "test");
    let config = ShardConfig {
        shards,
        queue_batches,
        table: limits(64),
    };
    let shards = Shards::start(config, &hub);
    let router = shards.router();
    (Stage { hub, feed, events }, shards, router)
}

/// Table limits that never close a test's connections on their own: no
/// idle timeout, no reorder deadline.
pub(super) fn limits(max_connections: usize) -> TableLimits {
    TableLimits {
        max_connections,
        max_buffered_bytes: 1 << 20,
        idle_timeout_ns: u64::MAX,
        reorder: ReorderLimits {
            max_bytes: 1 << 20,
            max_wait_ns: u64::MAX,
        },
        deliver: Default::default(),
    }
}

/// The shard stage's (segments, queue drops, undecodable records).
fn counts(counters: &ShardCounters) -> (u64, u64, u64) {
    let ShardSnapshot {
        segments,
        queue_drops,
        undecodable,
        ..
    } = counters.snapshot();
    (segments, queue_drops, undecodable)
}

/// Asserts how many connections the tables closed for each reason, none
/// for the others.
#[track_caller]
fn assert_closes(stats: &TableCounters, expected: &[(CloseReason, u64)]) {
    for reason in CloseReason::ALL {
        let count = expected
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| *n);
        assert_eq!(stats.closed(reason), count, "{reason} closes: {stats:?}");
    }
}

impl Stage {
    /// The subscriber's next event (5 s at most).
    async fn next(&mut self) -> StreamEvent {
        tokio::time::timeout(Duration::from_secs(5), self.events.next())
            .await
            .expect("an event in time")
            .expect("the channel is open")
    }

    /// Stops `shards` (their routers must be gone) and the hub; returns
    /// the tables' statistics and the events the subscriber had not read.
    async fn finish(self, shards: Shards) -> (TableCounters, Vec<StreamEvent>) {
        let stats = shards.finish().await;
        (stats, self.rest().await)
    }

    /// Closes the hub (the shards have stopped); returns the events the
    /// subscriber had not read.
    async fn rest(self) -> Vec<StreamEvent> {
        let Self {
            hub,
            feed,
            mut events,
        } = self;
        hub.close_all();
        drop(feed);
        let mut rest = Vec::new();
        while let Some(event) = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("the subscription ends once the hub is closed")
        {
            rest.push(event);
        }
        rest
    }
}

/// The flow of a client at 198.18.0.1:`client_port` to 198.18.0.2:80.
fn flow(client_port: u16) -> FlowKey {
    FlowKey {
        src: SocketAddr::from(([198, 18, 0, 1], client_port)),
        dst: SocketAddr::from(([198, 18, 0, 2], PORT)),
    }
}

/// The first flow from client port 40000 on that lands on `shard` of
/// `shards`.
fn flow_on(shard: usize, shards: usize) -> FlowKey {
    (40000..41000)
        .map(flow)
        .find(|flow| flow.shard(shards) == shard)
        .expect("a flow for every shard")
}

/// Hands one TCP packet of `flow` to `router` as a drain task does: a
/// ring record of the whole Ethernet frame.
fn feed(router: &mut SegmentRouter, flow: FlowKey, seq: u32, flags: TcpFlags, payload: &[u8]) {
    let (SocketAddr::V4(src), SocketAddr::V4(dst)) = (flow.src, flow.dst) else {
        unreachable!("IPv4 test flows");
    };
    let mut builder = PacketBuilder::ethernet2([2; 6], [4; 6])
        .ipv4(src.ip().octets(), dst.ip().octets(), 64)
        .tcp(src.port(), dst.port(), seq, 65535);
    if flags.contains(TcpFlags::SYN) {
        builder = builder.syn();
    }
    if flags.contains(TcpFlags::FIN) {
        builder = builder.fin();
    }
    if flags.contains(TcpFlags::ACK) {
        builder = builder.ack(1);
    }
    let mut frame = Vec::new();
    builder.write(&mut frame, payload).expect("a test frame");
    record(router, &frame);
}

/// Hands `frame` to `router` as a ring record of an IPv4 packet captured
/// whole.
fn record(router: &mut SegmentRouter, frame: &[u8]) {
    let len = frame.len() as u32;
    let header = RecordHeader {
        ts_ns: 1,
        ifindex: 1,
        wire_len: len,
        cap_len: len,
        cpu: 0,
        flags: 0,
        l3_offset: 14,
        l4_offset: 34,
        netns_cookie: 0,
    };
    router.record(&Record {
        header,
        packet: frame,
    });
}

/// A SYN, then `payload` right after it.
fn open_with(router: &mut SegmentRouter, flow: FlowKey, payload: &[u8]) {
    feed(router, flow, 0, TcpFlags::SYN, b"");
    feed(router, flow, 1, TcpFlags::ACK, payload);
}

impl Stage {
    /// Opens a connection for each flow, its client port as its one byte
    /// (`b'0' + port % 10`), and reads their `Opened` and `Data` events;
    /// returns their ids by client address.
    async fn open_all(
        &mut self,
        router: &mut SegmentRouter,
        flows: &[FlowKey],
    ) -> HashMap<SocketAddr, u64> {
        let byte = |flow: &FlowKey| b'0' + (flow.src.port() % 10) as u8;
        for flow in flows {
            open_with(router, *flow, &[byte(flow)]);
        }
        router.flush().unwrap();
        // Which shard announces its connection first is up to the
        // scheduler.
        let mut ids = HashMap::new();
        let mut bytes = HashMap::new();
        for _ in 0..2 * flows.len() {
            match self.next().await {
                StreamEvent::Opened { conn, src, .. } => {
                    ids.insert(src, conn);
                }
                StreamEvent::Data {
                    conn, bytes: got, ..
                } => {
                    bytes.insert(conn, got);
                }
                other => panic!("{other:?}"),
            }
        }
        for flow in flows {
            let conn = ids[&flow.src];
            assert_eq!(bytes[&conn][..], [byte(flow)], "connection {conn}");
        }
        ids
    }
}

fn opened(conn: u64, flow: FlowKey) -> StreamEvent {
    StreamEvent::Opened {
        iface: Default::default(),
        conn,
        src: flow.src,
        dst: flow.dst,
        midstream: false,
    }
}

fn data(conn: u64, bytes: &'static [u8]) -> StreamEvent {
    StreamEvent::Data {
        peer_acked: 0,
        dir: Default::default(),
        conn,
        bytes: Bytes::from_static(bytes),
    }
}

fn closed(conn: u64, reason: CloseReason) -> StreamEvent {
    StreamEvent::Closed { conn, reason }
}

#[tokio::test]
async fn a_connection_comes_out_opened_then_its_bytes_in_order_then_closed_by_its_fin() {
    let (stage, shards, mut router) = start(2, 16);
    let client = flow(40000);
    feed(&mut router, client, 1000, TcpFlags::SYN, b"");
    // The second piece first, as from another CPU's ring: the shard
    // delivers the bytes in stream order.
    feed(&mut router, client, 1007, TcpFlags::ACK, b"world");
    feed(&mut router, client, 1001, TcpFlags::ACK, b"hello ");
    feed(
        &mut router,
        client,
        1012,
        TcpFlags::FIN | TcpFlags::ACK,
        b"",
    );
    router.flush().unwrap();
    drop(router);
    let counters = shards.counters();
    let (stats, events) = stage.finish(shards).await;
    assert_eq!(
        events,
        [
            opened(1, client),
            data(1, b"hello "),
            data(1, b"world"),
            closed(1, CloseReason::Fin),
        ]
    );
    assert_eq!(counts(&counters), (4, 0, 0));
    assert_eq!(stats.opened, 1);
    assert_closes(&stats, &[(CloseReason::Fin, 1)]);
    assert_eq!(stats.delivered_bytes, 11);
}

/// A drain task never waits for a shard: the batch that does not fit is
/// dropped and counted, and its connection ends as `gap`, never as a
/// stream that looks whole but lacks bytes.
#[tokio::test]
async fn a_full_shard_queue_is_counted_and_its_connection_closes_as_gap() {
    let (mut stage, shards, mut router) = start(1, 1);
    let (client, other) = (flow(40000), flow(40001));
    open_with(&mut router, client, b"abc");
    router.flush().unwrap();
    assert_eq!(stage.next().await, opened(1, client));
    assert_eq!(stage.next().await, data(1, b"abc"));
    // The shard does not run until this task waits: another flow's batch
    // fills its one-batch queue, and the client's next batch is dropped.
    open_with(&mut router, other, b"x");
    router.flush().unwrap();
    feed(&mut router, client, 4, TcpFlags::ACK, b"def");
    feed(&mut router, client, 7, TcpFlags::FIN | TcpFlags::ACK, b"");
    router.flush().unwrap();
    let counters = shards.counters();
    assert_eq!(counts(&counters), (4, 2, 0));
    drop(router);
    let (stats, events) = stage.finish(shards).await;
    let of = |conn| {
        events
            .iter()
            .filter(|event| event.conn() == conn)
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(of(1), [closed(1, CloseReason::Gap)], "{events:?}");
    assert_eq!(
        of(2),
        [
            opened(2, other),
            data(2, b"x"),
            closed(2, CloseReason::Shutdown),
        ],
        "the other flow lost nothing"
    );
    assert_closes(&stats, &[(CloseReason::Gap, 1), (CloseReason::Shutdown, 1)]);
}

/// Flows whose packets the kernel could not put in its ring are reported
/// to their own shard: those connections close as `gap`, the others go on.
#[tokio::test]
async fn flows_reported_lost_close_as_gap_and_the_others_go_on() {
    let (mut stage, shards, mut router) = start(2, 16);
    let (lost, kept) = (flow_on(0, 2), flow_on(1, 2));
    let ids = stage.open_all(&mut router, &[lost, kept]).await;
    let (lost_id, kept_id) = (ids[&lost.src], ids[&kept.src]);
    let mut both = [lost_id, kept_id];
    both.sort_unstable();
    assert_eq!(both, [1, 2], "one numbering across the shards");

    shards.lost_reporter().report([lost]);
    // The shard looks at its losses at its next round (a tick at most).
    assert_eq!(stage.next().await, closed(lost_id, CloseReason::Gap));
    feed(&mut router, kept, 2, TcpFlags::ACK, b"more");
    router.flush().unwrap();
    assert_eq!(stage.next().await, data(kept_id, b"more"));
    drop(router);
    let (stats, rest) = stage.finish(shards).await;
    assert_eq!(rest, [closed(kept_id, CloseReason::Shutdown)]);
    assert_closes(&stats, &[(CloseReason::Gap, 1), (CloseReason::Shutdown, 1)]);
}

/// A shard remembers a bounded number of lost flows; past that it cannot
/// tell which connections lost bytes, and closes all of them as `gap`.
#[tokio::test]
async fn more_lost_flows_than_a_shard_remembers_close_all_its_connections_as_gap() {
    let (mut stage, shards, mut router) = start(1, 16);
    let ids = stage
        .open_all(&mut router, &[flow(40000), flow(40001)])
        .await;
    assert_eq!(ids.len(), 2);
    // None of them is a connection of the shard.
    let strangers = (0..=MAX_LOST_FLOWS as u32).map(|n| FlowKey {
        src: SocketAddr::from(([198, 19, (n >> 8) as u8, n as u8], 1 + (n >> 16) as u16)),
        dst: SocketAddr::from(([198, 18, 0, 2], PORT)),
    });
    shards.lost_reporter().report(strangers);
    let mut ends = [stage.next().await, stage.next().await];
    ends.sort_by_key(StreamEvent::conn);
    assert_eq!(
        ends,
        [closed(1, CloseReason::Gap), closed(2, CloseReason::Gap)]
    );
    drop(router);
    let (stats, rest) = stage.finish(shards).await;
    assert_eq!(rest, []);
    assert_closes(&stats, &[(CloseReason::Gap, 2)]);
}

/// `finish` waits for the routers, so what the drain tasks hand over last
/// still goes out; then every open connection closes as `shutdown`, and
/// one that never carried a byte ends unseen.
#[tokio::test]
async fn finish_takes_the_last_segments_then_closes_what_is_open_as_shutdown() {
    let (stage, shards, mut router) = start(2, 16);
    let (client, bare) = (flow(40000), flow(40001));
    open_with(&mut router, client, b"first ");
    feed(&mut router, bare, 0, TcpFlags::SYN, b"");
    router.flush().unwrap();
    let counters = shards.counters();
    let finishing = tokio::spawn(shards.finish());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!finishing.is_finished(), "a router is still there");
    feed(&mut router, client, 7, TcpFlags::ACK, b"last");
    router.flush().unwrap();
    drop(router);
    let stats = tokio::time::timeout(Duration::from_secs(5), finishing)
        .await
        .expect("the shards stop once the routers are gone")
        .expect("no shard panicked");
    assert_eq!(
        stage.rest().await,
        [
            opened(1, client),
            data(1, b"first "),
            data(1, b"last"),
            closed(1, CloseReason::Shutdown),
        ]
    );
    assert_closes(&stats, &[(CloseReason::Shutdown, 1)]);
    assert_eq!(stats.silent, 1, "the bare SYN");
    let ShardSnapshot {
        segments,
        queue_drops,
        undecodable,
        ..
    } = counters.snapshot();
    assert_eq!((segments, queue_drops, undecodable), (4, 0, 0));
}

#[tokio::test]
async fn a_record_that_is_not_a_tcp_segment_is_counted_and_goes_nowhere() {
    let (stage, shards, mut router) = start(2, 16);
    // An Ethernet frame of zeros: no IP header where the record says.
    record(&mut router, &[0; 60]);
    router.flush().unwrap();
    drop(router);
    let counters = shards.counters();
    let (stats, events) = stage.finish(shards).await;
    assert_eq!(counts(&counters), (0, 0, 1));
    assert_eq!(events, []);
    assert_eq!(stats, TableCounters::default());
}

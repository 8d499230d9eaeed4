//! The fan-out in-process: a hub, its consumers, a batcher.

use bytes::Bytes;

use std::sync::{Arc, atomic::Ordering};

use tokio::time::{Duration, Instant};

use super::{
    batcher::{Batcher, MAX_BATCH_DELAY},
    hub::{Hub, HubConfig},
    subscription::Subscription,
};
use crate::{
    fanout::counters::{PastSessions, PortSnapshot},
    flow::model::{CloseReason, ConnId, Direction, EventSink as _, StreamEvent},
};

const CONFIG: HubConfig = HubConfig {
    capacity: 4,
    max_bytes: 64 << 20,
    batch_bytes: 1 << 10,
};

fn opened(conn: ConnId) -> StreamEvent {
    StreamEvent::Opened {
        iface: Default::default(),
        conn,
        src: "198.18.0.1:1".parse().unwrap(),
        dst: "198.18.0.2:80".parse().unwrap(),
        midstream: false,
    }
}

fn data(conn: ConnId, text: &'static str) -> StreamEvent {
    StreamEvent::Data {
        peer_acked: 0,
        dir: Default::default(),
        conn,
        bytes: Bytes::from_static(text.as_bytes()),
    }
}

fn closed(conn: ConnId, reason: CloseReason) -> StreamEvent {
    StreamEvent::Closed { conn, reason }
}

#[test]
fn capacity_honours_the_byte_budget() {
    let small = HubConfig {
        capacity: 1000,
        max_bytes: 10 * ((1 << 10) + (64 << 10)),
        batch_bytes: 1 << 10,
    };
    assert_eq!(small.effective_capacity(), 10);
    assert_eq!(CONFIG.effective_capacity(), 4);
}

#[tokio::test]
async fn consumers_see_connections_opened_after_they_subscribed() {
    let hub = Hub::new(&[80], CONFIG);
    hub.publish(80, vec![opened(1)]);
    let (_, mut sub) = hub.subscribe(&[80], "late");
    hub.publish(
        80,
        vec![
            data(1, "old"),
            opened(2),
            data(2, "new"),
            closed(1, CloseReason::Fin),
        ],
    );
    hub.publish(80, vec![closed(2, CloseReason::Fin)]);
    drop(hub);
    let mut got = Vec::new();
    while let Some(event) = sub.next().await {
        got.push(event);
    }
    assert_eq!(
        got,
        [opened(2), data(2, "new"), closed(2, CloseReason::Fin)]
    );
}

/// The subscriber protocol and the forwarder take the client's bytes only;
/// other consumers get both directions.
#[tokio::test]
async fn a_client_only_subscription_skips_the_servers_bytes() {
    let hub = Hub::new(&[80], CONFIG);
    let (_, all) = hub.subscribe(&[80], "all");
    let (_, client) = hub.subscribe(&[80], "client");
    let answer = StreamEvent::Data {
        peer_acked: 0,
        dir: Direction::Server,
        conn: 1,
        bytes: Bytes::from_static(b"200 ok"),
    };
    hub.publish(
        80,
        vec![
            opened(1),
            data(1, "GET"),
            answer.clone(),
            closed(1, CloseReason::Fin),
        ],
    );
    drop(hub);
    for (mut sub, expected) in [
        (
            all,
            vec![
                opened(1),
                data(1, "GET"),
                answer,
                closed(1, CloseReason::Fin),
            ],
        ),
        (
            client.client_only(),
            vec![opened(1), data(1, "GET"), closed(1, CloseReason::Fin)],
        ),
    ] {
        let mut got = Vec::new();
        while let Some(event) = sub.next().await {
            got.push(event);
        }
        assert_eq!(got, expected);
    }
}

/// Reads exactly `n` events.
async fn read(sub: &mut Subscription, n: usize) -> Vec<StreamEvent> {
    let mut events = Vec::new();
    for _ in 0..n {
        events.push(sub.next().await.expect("an event"));
    }
    events
}

#[tokio::test]
async fn a_lagging_consumer_loses_only_its_own_connections() {
    let hub = Hub::new(&[80], CONFIG);
    let (_, mut slow) = hub.subscribe(&[80], "slow");
    let (_, mut fast) = hub.subscribe(&[80], "fast");
    hub.publish(80, vec![opened(1), data(1, "a")]);
    assert_eq!(read(&mut slow, 2).await, [opened(1), data(1, "a")]);
    assert_eq!(read(&mut fast, 2).await, [opened(1), data(1, "a")]);
    // The fast consumer keeps up; the slow one reads nothing for more
    // batches than the channel holds.
    for _ in 0..10 {
        hub.publish(80, vec![data(1, "b")]);
        assert_eq!(read(&mut fast, 1).await, [data(1, "b")]);
    }
    let later = vec![opened(2), data(2, "c"), closed(2, CloseReason::Fin)];
    hub.publish(80, later.clone());
    assert_eq!(read(&mut fast, 3).await, later);
    assert_eq!(fast.stats().lags.load(Ordering::Relaxed), 0);

    drop(hub);
    let mut rest = Vec::new();
    while let Some(event) = slow.next().await {
        rest.push(event);
    }
    // Connection 1 ends as lagged, none of its later bytes arrive, and
    // the connection opened afterwards arrives whole.
    let mut expected = vec![closed(1, CloseReason::Lagged)];
    expected.extend(later);
    assert_eq!(rest, expected);
    assert_eq!(slow.stats().lagged_connections.load(Ordering::Relaxed), 1);
    assert_eq!(slow.stats().lags.load(Ordering::Relaxed), 1);
    // The fast consumer still had connection 1 open when the channel
    // ended: it ends explicitly too.
    assert_eq!(fast.next().await, Some(closed(1, CloseReason::Shutdown)));
    assert!(fast.next().await.is_none());
}

#[tokio::test]
async fn ended_sessions_leave_only_their_totals() {
    let hub = Hub::new(&[80], CONFIG);
    let (_, _print) = hub.subscribe(&[80], "print");
    let mut live = hub.subscribe_session(1, "stays\n");
    live.add_port(80, hub.receiver(80).unwrap());
    for id in 2..1002 {
        let mut session = hub.subscribe_session(id, "short");
        session.add_port(80, hub.receiver(80).unwrap());
        hub.publish(80, vec![opened(id), data(id, "abc")]);
        assert_eq!(read(&mut session, 2).await, [opened(id), data(id, "abc")]);
    }
    let (consumers, past) = hub.consumer_totals();
    let names: Vec<(&str, Option<&str>)> = consumers
        .iter()
        .map(|c| (c.name.as_str(), c.client.as_deref()))
        .collect();
    assert_eq!(
        names,
        [("print", None), ("client-1", Some("stays\\n"))],
        "ended sessions are not listed; the client's name is escaped"
    );
    assert_eq!(
        past,
        PastSessions {
            sessions: 1000,
            events: 2000,
            bytes: 3000,
            lags: 0,
            lagged_connections: 0
        }
    );
    drop(live);
    assert_eq!(hub.consumer_totals().1.sessions, 1001);
    assert_eq!(
        hub.consumer_totals().0.len(),
        1,
        "in-process consumers stay"
    );
}

#[test]
fn a_port_opened_and_closed_again_keeps_one_entry() {
    let hub = Hub::new(&[], CONFIG);
    for _ in 0..1000 {
        hub.open_port(9000);
        hub.publish(9000, vec![opened(1)]);
        hub.close_port(9000);
    }
    hub.open_port(9000);
    hub.publish(9000, vec![opened(2)]);
    assert_eq!(
        hub.port_totals(),
        [PortSnapshot {
            port: 9000,
            connections: 1001,
            bytes: 0,
            batches: 1001
        }]
    );
    assert_eq!(hub.closed_ports.lock().len(), 1);
}

#[tokio::test]
async fn batcher_publishes_at_the_byte_threshold_and_on_flush() {
    let hub = Arc::new(Hub::new(&[80, 81], CONFIG));
    let (_, mut sub) = hub.subscribe(&[80, 81], "all");
    let mut batcher = Batcher::new(Arc::clone(&hub));
    let now = Instant::now();
    batcher.at(now).event(80, opened(1));
    batcher.at(now).event(81, opened(2));
    let totals = |hub: &Hub| -> Vec<(u16, u64, u64, u64)> {
        hub.port_totals()
            .iter()
            .map(|t| (t.port, t.connections, t.bytes, t.batches))
            .collect()
    };
    assert_eq!(
        totals(&hub),
        [(80, 0, 0, 0), (81, 0, 0, 0)],
        "nothing sent yet"
    );
    batcher.at(now).event(
        80,
        StreamEvent::Data {
            peer_acked: 0,
            dir: Default::default(),
            conn: 1,
            bytes: Bytes::from(vec![0; 2048]),
        },
    );
    assert_eq!(
        totals(&hub)[0],
        (80, 1, 2048, 1),
        "over the threshold: sent"
    );
    batcher.flush();
    assert_eq!(totals(&hub)[1], (81, 1, 0, 1));
    assert_eq!(batcher.deadline(), None, "nothing pending");
    batcher.at(now).event(81, closed(2, CloseReason::Fin));
    let deadline = batcher.deadline().expect("an event is pending");
    assert_eq!(deadline, now + MAX_BATCH_DELAY, "the time it was given");
    batcher.flush_due(deadline - Duration::from_micros(1));
    assert_eq!(totals(&hub)[1].3, 1, "not due yet");
    batcher.flush_due(deadline);
    assert_eq!(totals(&hub)[1].3, 2, "due: published");
    drop(batcher);
    drop(hub);
    let mut count = 0;
    while sub.next().await.is_some() {
        count += 1;
    }
    // Two opens, the data and a close, then the connection still open
    // when the channels ended closes as shutdown.
    assert_eq!(count, 5);
}

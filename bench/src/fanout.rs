//! The userspace stream pipeline alone, without the kernel: pre-built ring
//! records go through the real payload copy, shard routing, connection
//! tracking, reassembly and hub to 1, 8 and 32 consumer tasks of one port.
//!
//! Each run pushes the same records as fast as the pipeline takes them and
//! stops the clock when the last consumer has read the last event; the
//! channels are sized so that no consumer lags (a lag would show as
//! `lagged` and fewer bytes). Runs alternate: consumer counts and segment
//! sizes round after round.

use std::{
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use etherparse::PacketBuilder;
use mirror_common::RecordHeader;
use mirror_user::{
    fanout::hub::{Hub, HubConfig},
    flow::conntrack::TableLimits,
    flow::reassembly::ReorderLimits,
    kernel::drain::RecordSink,
    kernel::record::Record,
    pipeline::shards::{ShardConfig, Shards},
};

use crate::{
    Options, plot,
    report::Section,
    stats::{Spread, cell},
};

const PORT: u16 = 80;
const CONNECTIONS: usize = 64;
const CONSUMERS: [usize; 3] = [1, 8, 32];
/// A wire-sized segment and a GSO super-packet's worth.
const SEGMENT_SIZES: [usize; 2] = [1448, 64 * 1024 - 54];

struct Sample {
    seconds: f64,
    /// Events and payload bytes each consumer received (the smallest).
    events: u64,
    bytes: u64,
    lagged: u64,
}

pub fn run(options: &Options) -> Section {
    let total_bytes: usize = if options.quick { 8 << 20 } else { 256 << 20 };
    let workloads: Vec<(usize, Vec<Vec<u8>>)> = SEGMENT_SIZES
        .iter()
        .map(|size| (*size, records(*size, total_bytes)))
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut results: Vec<Vec<Sample>> = (0..SEGMENT_SIZES.len() * CONSUMERS.len())
        .map(|_| Vec::new())
        .collect();
    for round in 1..=options.rounds {
        for (w, (size, records)) in workloads.iter().enumerate() {
            for (c, consumers) in CONSUMERS.iter().enumerate() {
                let sample = runtime.block_on(pipeline(records, *consumers));
                eprintln!(
                    "bench: round {round}/{} fanout {size}-byte segments to {consumers:>2} consumers: {:.0} MB/s each",
                    options.rounds,
                    sample.bytes as f64 / sample.seconds / 1e6
                );
                results[w * CONSUMERS.len() + c].push(sample);
            }
        }
    }
    render(&results, total_bytes, options)
}

/// Ring records of `CONNECTIONS` connections (SYN, data, FIN), data
/// interleaved across connections, with neighbouring segments of a
/// connection swapped now and then (the reorder path), `total` payload
/// bytes in all.
pub(crate) fn records(segment: usize, total: usize) -> Vec<Vec<u8>> {
    let per_connection = total / CONNECTIONS / segment;
    let payload = vec![0xa5u8; segment];
    let mut out = Vec::new();
    let frame = |conn: usize, seq: u32, syn: bool, fin: bool, data: &[u8]| {
        let mut builder = PacketBuilder::ethernet2([2; 6], [2; 6])
            .ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64)
            .tcp(10000 + conn as u16, PORT, seq, 65535)
            .ack(1);
        if syn {
            builder = PacketBuilder::ethernet2([2; 6], [2; 6])
                .ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64)
                .tcp(10000 + conn as u16, PORT, seq, 65535)
                .syn();
        } else if fin {
            builder = builder.fin();
        }
        let mut frame = Vec::with_capacity(data.len() + 54);
        builder.write(&mut frame, data).expect("frame");
        record(&frame)
    };
    for conn in 0..CONNECTIONS {
        out.push(frame(conn, 0, true, false, &[]));
    }
    for i in 0..per_connection {
        for conn in 0..CONNECTIONS {
            // Every eighth pair of segments arrives swapped.
            let index = if i % 16 == 8 {
                i + 1
            } else if i % 16 == 9 {
                i - 1
            } else {
                i
            };
            let index = index.min(per_connection - 1);
            let seq = 1 + (index * segment) as u32;
            out.push(frame(conn, seq, false, false, &payload));
        }
    }
    for conn in 0..CONNECTIONS {
        let seq = 1 + (per_connection * segment) as u32;
        out.push(frame(conn, seq, false, true, &[]));
    }
    out
}

fn record(frame: &[u8]) -> Vec<u8> {
    let header = RecordHeader {
        ts_ns: 0,
        ifindex: 1,
        wire_len: frame.len() as u32,
        cap_len: frame.len() as u32,
        cpu: 0,
        flags: 0,
        l3_offset: 14,
        l4_offset: 34,
        netns_cookie: 0,
    };
    Record::encode(&header, frame)
}

async fn pipeline(records: &[Vec<u8>], consumers: usize) -> Sample {
    let hub = Arc::new(Hub::new(
        &[PORT],
        HubConfig {
            capacity: 1 << 16,
            max_bytes: usize::MAX,
            batch_bytes: 256 << 10,
        },
    ));
    let received: Vec<Arc<(AtomicU64, AtomicU64, AtomicU64)>> = (0..consumers)
        .map(|_| Arc::new((AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0))))
        .collect();
    let mut tasks = Vec::new();
    for (i, counts) in received.iter().enumerate() {
        let (_, mut subscription) = hub.subscribe(&[PORT], &format!("bench{i}"));
        let counts = Arc::clone(counts);
        tasks.push(tokio::spawn(async move {
            while let Some(event) = subscription.next().await {
                counts.0.fetch_add(1, Ordering::Relaxed);
                counts
                    .1
                    .fetch_add(event.data_len() as u64, Ordering::Relaxed);
                if matches!(
                    event,
                    mirror_user::flow::model::StreamEvent::Closed {
                        reason: mirror_user::flow::model::CloseReason::Lagged,
                        ..
                    }
                ) {
                    counts.2.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let start = Instant::now();
    push_records(records, &hub).await;
    drop(hub);
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(120), task).await;
    }
    let seconds = start.elapsed().as_secs_f64();
    let min = |f: fn(&(AtomicU64, AtomicU64, AtomicU64)) -> u64| {
        received.iter().map(|c| f(c)).min().unwrap_or(0)
    };
    Sample {
        seconds,
        events: min(|c| c.0.load(Ordering::Relaxed)),
        bytes: min(|c| c.1.load(Ordering::Relaxed)),
        lagged: received.iter().map(|c| c.2.load(Ordering::Relaxed)).sum(),
    }
}

/// Pushes `records` through two shards into `hub` as fast as they take
/// them (no drops: this measures the pipeline, not its shedding), until
/// the shards have published every event.
pub(crate) async fn push_records(records: &[Vec<u8>], hub: &Arc<Hub>) {
    let shards = Shards::start(
        ShardConfig {
            shards: 2,
            // Deep enough that the producer never drops: this measures the
            // pipeline, not its shedding.
            queue_batches: 1 << 16,
            table: TableLimits {
                max_connections: 1 << 16,
                max_buffered_bytes: 1 << 30,
                idle_timeout_ns: 60_000_000_000,
                reorder: ReorderLimits {
                    max_bytes: 16 << 20,
                    max_wait_ns: 10_000_000_000,
                },
                deliver: Default::default(),
            },
        },
        hub,
    );
    let mut router = shards.router();
    for (i, raw) in records.iter().enumerate() {
        router.record(&Record::decode(raw).expect("record"));
        if i % 256 == 255 {
            let _ = router.flush();
            // Let the shards and consumers run, as separate drain tasks would.
            tokio::task::yield_now().await;
        }
    }
    let _ = router.flush();
    drop(router);
    let drops = shards.counters().snapshot().queue_drops;
    assert_eq!(drops, 0, "the bench queue is deep enough");
    shards.finish().await;
}

fn render(results: &[Vec<Sample>], total_bytes: usize, options: &Options) -> Section {
    let mut md = format!(
        "## Fan-out: one port to 1, 8 and 32 consumers\n\n\
         The userspace pipeline alone, without the kernel (payload copy out of ring records, \
         2 shards, reassembly, hub), {CONNECTIONS} connections, {} MiB of payload per run, every \
         eighth pair of segments swapped; consumers are tasks in the same process counting \
         what they receive. {} rounds, medians. A payload is copied once, out of the ring; \
         consumers share it.\n\n\
         | segment bytes | consumers | events/s per consumer | MB/s per consumer (min-max) | MB/s all consumers | lagged closes |\n\
         |---:|---:|---:|---:|---:|---:|\n",
        total_bytes >> 20,
        options.rounds
    );
    let mut missing = Vec::new();
    let mut series = Vec::new();
    for (w, size) in SEGMENT_SIZES.iter().enumerate() {
        let mut points = Vec::new();
        for (c, consumers) in CONSUMERS.iter().enumerate() {
            let runs = &results[w * CONSUMERS.len() + c];
            if runs.len() != options.rounds || runs.iter().any(|s| s.bytes == 0) {
                missing.push(format!(
                    "fanout {size} B to {consumers}: no bytes delivered"
                ));
            }
            let events = Spread::of(runs.iter().map(|s| s.events as f64 / s.seconds));
            let bytes = Spread::of(runs.iter().map(|s| s.bytes as f64 / s.seconds / 1e6));
            let lagged: u64 = runs.iter().map(|s| s.lagged).sum();
            let per_consumer = bytes.map(|b| b.median);
            let _ = writeln!(
                md,
                "| {size} | {consumers} | {} | {} | {} | {lagged} |",
                cell(events.map(|e| e.median), 0),
                bytes.map_or_else(
                    || "-".to_owned(),
                    |b| format!("{:.0} ({:.0}-{:.0})", b.median, b.min, b.max)
                ),
                cell(per_consumer.map(|b| b * *consumers as f64), 0),
            );
            if let Some(b) = per_consumer {
                points.push((*consumers as f64, b));
            }
        }
        series.push((format!("{size}-byte segments"), points));
    }
    md.push_str("\n![fan-out](fanout.svg)\n");
    Section {
        name: "fanout",
        markdown: md,
        plots: vec![(
            "fanout.svg".to_owned(),
            plot::lines(
                "Bytes delivered per consumer, one port, in-process consumers",
                "consumers",
                "MB/s per consumer (median)",
                &series,
            ),
        )],
        missing,
    }
}

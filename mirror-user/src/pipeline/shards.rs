//! Flow shards: each owns the connection table of the flows that hash to
//! it and runs as its own task. The ring drain hands segments over through
//! queues bounded in batches and in bytes and never waits: a full queue
//! drops the batch, counts it, and the affected connections close with
//! `gap`.

use std::{
    collections::HashSet,
    io,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use parking_lot::Mutex;
use tokio::{sync::mpsc, task::JoinHandle, time::Instant};

use crate::{
    fanout::{batcher::Batcher, hub::Hub},
    flow::conntrack::{ConnectionTable, TableCounters, TableLimits},
    flow::model::CloseReason,
    flow::{
        ifaces::IfaceNames,
        model::{ConnIds, FlowKey},
        segment::{PayloadPool, Segment},
    },
    kernel::drain::RecordSink,
    kernel::record::Record,
    telemetry::{counters, registry::Stage},
};

/// Sizes of the shard stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardConfig {
    pub shards: usize,
    /// Batches of segments a shard's queue holds.
    pub queue_batches: usize,
    pub table: TableLimits,
}

/// A drain task sends a shard's batch once it holds this many segments.
const SEGMENTS_PER_BATCH: usize = 256;
/// Memory one shard's queue may hold (payloads and segment structs): the
/// batch count alone would let 64 KiB GRO segments queue 4 GiB per shard.
/// Full-size Ethernet segments fill the 256 default batches at about
/// 95 MiB, so this budget only binds for larger segments.
const SHARD_QUEUE_BYTES: usize = 128 << 20;
/// How often shards look for idle connections and expired holes.
const TICK: Duration = Duration::from_millis(50);
/// Flows remembered per shard as lost before the shard gives up on its
/// whole table (closes every connection as `gap`).
const MAX_LOST_FLOWS: usize = 65536;

counters! {
    /// Counters of the shard stage, shared by the drain and the shards.
    pub struct ShardCounters => ShardSnapshot {
        segments,
        /// Segments dropped because a shard's queue was full.
        queue_drops,
        /// Records that did not decode as TCP segments.
        undecodable,
        /// Flows the kernel reported as having lost packets to a full ring.
        ring_lost_flows,
    }
}

/// The shards' connection tables: the `connections` section of the
/// counters. Each shard publishes a copy of its table's counters every
/// tick (a lock taken once per tick, never per segment).
#[derive(Debug, Default)]
pub struct ConnectionCounters {
    tables: Vec<Arc<Mutex<TableCounters>>>,
}

impl ConnectionCounters {
    /// Summed over shards.
    pub fn total(&self) -> TableCounters {
        let mut total = TableCounters::default();
        for table in &self.tables {
            total.add(&table.lock());
        }
        total
    }
}

impl Stage for ConnectionCounters {
    type Snapshot = TableCounters;

    fn snapshot(&self) -> TableCounters {
        self.total()
    }
}

/// Flows a shard must close as `gap` because a segment of theirs was lost
/// before reaching it. Written on the loss path only; the shard checks the
/// flag once per round.
#[derive(Default)]
struct LostFlows {
    flagged: AtomicBool,
    flows: Mutex<LostSet>,
}

#[derive(Default)]
struct LostSet {
    flows: HashSet<FlowKey>,
    overflow: bool,
}

impl LostFlows {
    fn add(&self, flows: impl IntoIterator<Item = FlowKey>) {
        let mut set = self.flows.lock();
        for flow in flows {
            if set.flows.len() >= MAX_LOST_FLOWS {
                set.overflow = true;
                break;
            }
            set.flows.insert(flow);
        }
        self.flagged.store(true, Ordering::Release);
    }

    fn take(&self) -> Option<LostSet> {
        if !self.flagged.swap(false, Ordering::Acquire) {
            return None;
        }
        let mut set = self.flows.lock();
        Some(std::mem::take(&mut *set))
    }
}

/// Reports flows that lost segments before reaching the shards (a full
/// kernel ring): their connections close as `gap`.
#[derive(Clone)]
pub struct LostReporter {
    lost: Vec<Arc<LostFlows>>,
}

impl LostReporter {
    pub fn report(&self, flows: impl IntoIterator<Item = FlowKey>) {
        for flow in flows {
            self.lost[flow.shard(self.lost.len())].add([flow]);
        }
    }
}

/// Memory a batch holds while it is queued.
fn batch_bytes(batch: &[Segment]) -> usize {
    batch
        .iter()
        .map(|segment| size_of::<Segment>() + segment.payload.len())
        .sum()
}

/// The running shards.
pub struct Shards {
    senders: Vec<mpsc::Sender<Vec<Segment>>>,
    /// Per shard: memory of the batches in its queue.
    queued: Vec<Arc<AtomicUsize>>,
    lost: Vec<Arc<LostFlows>>,
    counters: Arc<ShardCounters>,
    tables: Arc<ConnectionCounters>,
    tasks: Vec<JoinHandle<()>>,
}

impl Shards {
    /// Starts `config.shards` shard tasks publishing to `hub`.
    pub fn start(config: ShardConfig, hub: &Arc<Hub>) -> Self {
        Self::start_naming(config, hub, &IfaceNames::default())
    }

    /// As [`Self::start`], announcing each connection with the name
    /// `ifaces` gives its interface.
    pub fn start_naming(config: ShardConfig, hub: &Arc<Hub>, ifaces: &IfaceNames) -> Self {
        let count = config.shards.max(1);
        let epoch = Instant::now();
        // One numbering for all shards: connection ids are unique and in
        // the order the connections were announced.
        let ids = ConnIds::default();
        let mut shards = Self {
            senders: Vec::with_capacity(count),
            queued: Vec::with_capacity(count),
            lost: Vec::with_capacity(count),
            counters: Arc::new(ShardCounters::default()),
            tables: Arc::default(),
            tasks: Vec::with_capacity(count),
        };
        let mut tables = Vec::with_capacity(count);
        for _ in 0..count {
            let (sender, receiver) = mpsc::channel(config.queue_batches.max(1));
            let lost = Arc::new(LostFlows::default());
            let stats = Arc::new(Mutex::new(TableCounters::default()));
            let table =
                ConnectionTable::new(config.table, ids.clone()).with_iface_names(ifaces.clone());
            let queued = Arc::new(AtomicUsize::new(0));
            let shard = Shard {
                table,
                receiver,
                queued: Arc::clone(&queued),
                lost: Arc::clone(&lost),
                stats: Arc::clone(&stats),
                batcher: Batcher::new(Arc::clone(hub)),
                epoch,
            };
            shards.tasks.push(tokio::spawn(shard.run()));
            shards.senders.push(sender);
            shards.queued.push(queued);
            shards.lost.push(lost);
            tables.push(stats);
        }
        shards.tables = Arc::new(ConnectionCounters { tables });
        shards
    }

    /// A sink for the drain.
    pub fn router(&self) -> SegmentRouter {
        self.router_with(PayloadPool::default())
    }

    /// A sink for the drain.that copies payloads with `pool`.
    pub fn router_with(&self, pool: PayloadPool) -> SegmentRouter {
        SegmentRouter {
            senders: self.senders.clone(),
            queued: self.queued.clone(),
            lost: self.lost.clone(),
            pending: vec![Vec::new(); self.senders.len()],
            pool,
            counters: Arc::clone(&self.counters),
        }
    }

    /// A handle that reports losses that happened before the shards.
    pub fn lost_reporter(&self) -> LostReporter {
        LostReporter {
            lost: self.lost.clone(),
        }
    }

    pub fn counters(&self) -> Arc<ShardCounters> {
        Arc::clone(&self.counters)
    }

    /// The connection tables' counters (refreshed every tick).
    pub fn connection_counters(&self) -> Arc<ConnectionCounters> {
        Arc::clone(&self.tables)
    }

    /// The connection tables' counters summed over shards now.
    pub fn table_stats(&self) -> TableCounters {
        self.tables.total()
    }

    /// Stops the shards once every router is dropped: each closes its
    /// remaining connections as `shutdown` and publishes the last events.
    pub async fn finish(mut self) -> TableCounters {
        self.senders.clear();
        for task in self.tasks.drain(..) {
            if let Err(error) = task.await {
                tracing::error!("a flow shard died, its connections were lost: {error}");
            }
        }
        self.table_stats()
    }
}

struct Shard {
    table: ConnectionTable,
    receiver: mpsc::Receiver<Vec<Segment>>,
    queued: Arc<AtomicUsize>,
    lost: Arc<LostFlows>,
    stats: Arc<Mutex<TableCounters>>,
    batcher: Batcher,
    epoch: Instant,
}

impl Shard {
    /// The connection table's time: nanoseconds since the shards started.
    fn table_ns(&self, now: Instant) -> u64 {
        now.duration_since(self.epoch).as_nanos() as u64
    }

    async fn run(mut self) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // One timer for the batch deadline, moved only when the deadline
        // changes (once per published batch, not per received one).
        let publish = tokio::time::sleep(TICK);
        tokio::pin!(publish);
        let mut armed = None;
        loop {
            let publish_by = self.batcher.deadline();
            if let Some(deadline) = publish_by.filter(|d| armed != Some(*d)) {
                publish.as_mut().reset(deadline);
                armed = Some(deadline);
            }
            tokio::select! {
                batch = self.receiver.recv() => {
                    let Some(batch) = batch else { break };
                    self.queued.fetch_sub(batch_bytes(&batch), Ordering::Relaxed);
                    let now = Instant::now();
                    let now_ns = self.table_ns(now);
                    let mut events = self.batcher.at(now);
                    for segment in batch {
                        self.table.segment(segment, now_ns, &mut events);
                    }
                }
                _ = tick.tick() => {
                    let now = Instant::now();
                    self.table.tick(self.table_ns(now), &mut self.batcher.at(now));
                    *self.stats.lock() = self.table.counters();
                }
                _ = &mut publish, if publish_by.is_some() => {}
            }
            let now = Instant::now();
            self.apply_losses(now);
            self.batcher.flush_due(now);
        }
        let now = Instant::now();
        self.apply_losses(now);
        self.table
            .close_all(CloseReason::Shutdown, &mut self.batcher.at(now));
        self.batcher.flush();
        *self.stats.lock() = self.table.counters();
    }

    fn apply_losses(&mut self, now: Instant) {
        let Some(lost) = self.lost.take() else {
            return;
        };
        if lost.overflow {
            tracing::warn!(
                "too many flows lost at once; closing every connection of the shard as gap"
            );
            self.table
                .close_all(CloseReason::Gap, &mut self.batcher.at(now));
            return;
        }
        let mut events = self.batcher.at(now);
        for flow in &lost.flows {
            self.table.lost(flow, &mut events);
        }
    }
}

/// The drain tasks' sink: decodes records into segments and routes them to
/// their shard's queue in batches.
pub struct SegmentRouter {
    senders: Vec<mpsc::Sender<Vec<Segment>>>,
    queued: Vec<Arc<AtomicUsize>>,
    lost: Vec<Arc<LostFlows>>,
    pending: Vec<Vec<Segment>>,
    pool: PayloadPool,
    counters: Arc<ShardCounters>,
}

impl SegmentRouter {
    fn send(&mut self, shard: usize) {
        let batch = std::mem::take(&mut self.pending[shard]);
        if batch.is_empty() {
            return;
        }
        let count = batch.len() as u64;
        let bytes = batch_bytes(&batch);
        // Several drain tasks send to one shard: reserve, then undo.
        let fits =
            self.queued[shard].fetch_add(bytes, Ordering::Relaxed) + bytes <= SHARD_QUEUE_BYTES;
        let sent = if fits {
            self.senders[shard].try_send(batch)
        } else {
            Err(mpsc::error::TrySendError::Full(batch))
        };
        match sent {
            Ok(()) => {
                self.counters.segments.fetch_add(count, Ordering::Relaxed);
            }
            Err(
                mpsc::error::TrySendError::Full(batch) | mpsc::error::TrySendError::Closed(batch),
            ) => {
                self.queued[shard].fetch_sub(bytes, Ordering::Relaxed);
                self.counters
                    .queue_drops
                    .fetch_add(count, Ordering::Relaxed);
                self.lost[shard].add(batch.into_iter().map(|segment| segment.flow));
            }
        }
    }
}

impl RecordSink for SegmentRouter {
    fn record(&mut self, record: &Record<'_>) {
        match record.segment(&mut self.pool) {
            Ok(segment) => {
                let shard = segment.flow.shard(self.senders.len());
                self.pending[shard].push(segment);
                if self.pending[shard].len() >= SEGMENTS_PER_BATCH {
                    self.send(shard);
                }
            }
            Err(error) => {
                self.counters.undecodable.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("cannot decode a mirrored packet: {error}");
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        for shard in 0..self.senders.len() {
            self.send(shard);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::{
        fanout::hub::HubConfig,
        flow::{ifaces::IfaceId, model::StreamEvent, segment::TcpFlags},
    };

    #[test]
    fn a_shard_queue_is_bounded_in_bytes_too() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let hub = Hub::new(
                &[80],
                HubConfig {
                    capacity: 16,
                    max_bytes: 1 << 20,
                    batch_bytes: 1 << 16,
                },
            );
            let config = ShardConfig {
                shards: 1,
                // Far more batches than the bytes allow.
                queue_batches: 1000,
                table: super::stage_tests::limits(16),
            };
            let shards = Shards::start(config, &Arc::new(hub));
            let mut router = shards.router();
            let payload = Bytes::from(vec![0u8; 64 << 10]);
            let segment = Segment {
                dir: Default::default(),
                flow: FlowKey {
                    src: "198.18.0.1:1000".parse().unwrap(),
                    dst: "198.18.0.2:80".parse().unwrap(),
                },
                seq: 0,
                ack: 0,
                flags: TcpFlags::ACK,
                payload,
                truncated: false,
                iface: IfaceId::default(),
            };
            let batch = vec![segment; SEGMENTS_PER_BATCH];
            let per_batch = batch_bytes(&batch);
            let fit = SHARD_QUEUE_BYTES / per_batch;
            // The shard task does not run until this task yields: nothing
            // leaves the queue meanwhile.
            for _ in 0..fit + 3 {
                router.pending[0] = batch.clone();
                router.send(0);
            }
            let ShardSnapshot {
                segments,
                queue_drops: drops,
                ..
            } = shards.counters().snapshot();
            assert_eq!(segments, (fit * SEGMENTS_PER_BATCH) as u64);
            assert_eq!(drops, (3 * SEGMENTS_PER_BATCH) as u64);
            assert_eq!(
                shards.queued[0].load(Ordering::Relaxed),
                fit * per_batch,
                "dropped batches take their bytes back"
            );
            drop(router);
            shards.finish().await;
        });
    }

    /// The first connection of a run is conn 1, wherever it lands, and
    /// connections opened one after another get 1, 2, 3, ... although
    /// they are spread over several shards.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connection_ids_are_unique_across_shards_and_in_opening_order() {
        let hub = Arc::new(Hub::new(
            &[80],
            HubConfig {
                capacity: 64,
                max_bytes: 64 << 20,
                batch_bytes: 1,
            },
        ));
        let (_feed, mut events) = hub.subscribe(&[80], "test");
        let config = ShardConfig {
            shards: 4,
            queue_batches: 16,
            table: super::stage_tests::limits(64),
        };
        let shards = Shards::start(config, &hub);
        let mut router = shards.router();
        let segment = |flow: FlowKey, seq: u32, flags: TcpFlags, payload: &'static [u8]| Segment {
            dir: Default::default(),
            flow,
            seq,
            ack: 0,
            flags,
            payload: Bytes::from_static(payload),
            truncated: false,
            iface: IfaceId::default(),
        };
        let mut used = HashSet::new();
        for n in 1..=12u16 {
            let flow = FlowKey {
                src: std::net::SocketAddr::from(([198, 18, 0, 1], 40000 + n)),
                dst: "198.18.0.2:80".parse().unwrap(),
            };
            let shard = flow.shard(4);
            used.insert(shard);
            router.pending[shard].push(segment(flow, 0, TcpFlags::SYN, b""));
            router.pending[shard].push(segment(flow, 1, TcpFlags::ACK, b"x"));
            router.send(shard);
            // Wait for its announcement before the next one opens.
            let opened = tokio::time::timeout(Duration::from_secs(5), events.next())
                .await
                .expect("the connection is announced")
                .expect("the channel is open");
            assert_eq!(
                opened,
                StreamEvent::Opened {
                    iface: Default::default(),
                    conn: u64::from(n),
                    src: flow.src,
                    dst: flow.dst,
                    midstream: false,
                },
                "connection {n} (shard {shard})"
            );
            let data = events.next().await.expect("its byte");
            assert_eq!(data.conn(), u64::from(n));
        }
        assert!(used.len() > 1, "the flows landed on shards {used:?}");
        drop(router);
        shards.finish().await;
    }
}

#[cfg(test)]
#[path = "shards_tests.rs"]
mod stage_tests;

//! The drain: one task reads every CPU ring as records arrive, merged in
//! kernel-timestamp order, and hands them to a sink without ever making the
//! kernel wait.

use std::{
    io,
    os::fd::AsRawFd,
    sync::{Arc, atomic::Ordering},
    task::Poll,
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::watch,
};

use mirror_common::{RECORD_HEADER_LEN, RecordHeader};

use crate::{
    kernel::{clock::boot_ns, loader::CpuRing, record::Record, ring_reader::RingReader},
    telemetry::counters,
};

counters! {
    /// Userspace side of the ring stage.
    pub struct DrainCounters => DrainSnapshot {
        /// Records read out of the rings.
        records,
        /// Packet bytes in those records.
        bytes,
        /// Records that could not be decoded (a bug, never bad traffic).
        undecodable,
        /// Records stamped before one already handed on (their CPU was
        /// held up longer than the merge's slack): the flow shards get
        /// them out of kernel order.
        behind_watermark,
        /// Records of the server's answers (`--directions both`): they
        /// reach --pcap, --print-packets and the flow shards.
        server_records,
    }
}

/// Consumer of the records of the rings.
pub trait RecordSink: Send + 'static {
    /// Takes one record; the bytes are borrowed from the ring.
    fn record(&mut self, record: &Record<'_>);
    /// Called after each batch of records.
    fn flush(&mut self) -> io::Result<()>;
}

/// Records, or packet bytes, handed on before the task yields to others;
/// the rest is read right after.
const BATCH: usize = 4096;
const BATCH_BYTES: u64 = 4 << 20;

/// The kernel wakes the reader only once enough data is waiting (see
/// `GLOBAL_WAKEUP_BYTES`); this poll picks up a trickle below that mark, so
/// it bounds the delay a record can wait in the ring.
const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// How far an empty ring's watermark stays behind the clock. A program
/// takes its timestamp just before it reserves and fills its record, so a
/// ring found empty at time t can still receive a record stamped a little
/// before t; a record later than this slack (its CPU was interrupted that
/// long) arrives behind the watermark and is counted.
const WATERMARK_SLACK_NS: u64 = 250_000;

/// When records wait for another ring's watermark, the merge looks again
/// this soon (no wakeup would come for records already in the ring).
const WAIT_RETRY: Duration = Duration::from_millis(1);

/// A ring as the merge reads it: its next record, left in place until it
/// is released.
pub trait RecordSource {
    fn peek(&mut self) -> Option<&[u8]>;
    fn release(&mut self);
}

impl RecordSource for RingReader {
    fn peek(&mut self) -> Option<&[u8]> {
        RingReader::peek(self)
    }

    fn release(&mut self) {
        RingReader::release(self);
    }
}

/// The kernel timestamp of a raw record (0 for one too short to hold it:
/// handed on at once, to be counted as undecodable).
fn record_ns(raw: &[u8]) -> u64 {
    raw.first_chunk::<RECORD_HEADER_LEN>()
        .map_or(0, |head| RecordHeader::from_bytes(head).ts_ns)
}

struct Lane<R> {
    source: R,
    /// Timestamp of the record at the head of the ring, once looked at.
    head_ns: Option<u64>,
    /// With the ring empty: no record stamped before this can still come.
    watermark_ns: u64,
}

impl<R: RecordSource> Lane<R> {
    fn look(&mut self) {
        self.head_ns = self.source.peek().map(record_ns);
    }
}

/// How a round of the merge ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Round {
    /// Every ring is empty.
    Empty,
    /// Records wait until the empty rings' watermarks pass them.
    Waiting,
    /// The round handed on a batch; more is ready.
    Budget,
}

/// The CPU rings read as one sequence in the order the kernel stamped the
/// records (a k-way merge by timestamp), so that the flow shards see each
/// connection's segments in kernel order, whichever CPUs carried them.
/// Records are read in place and released once handed on.
pub struct Merge<R> {
    lanes: Vec<Lane<R>>,
    /// Timestamp of the latest record handed on.
    latest_ns: u64,
}

impl<R: RecordSource> Merge<R> {
    pub fn new(sources: impl IntoIterator<Item = R>) -> Self {
        let lanes = sources
            .into_iter()
            .map(|source| Lane {
                source,
                head_ns: None,
                watermark_ns: 0,
            })
            .collect();
        Self {
            lanes,
            latest_ns: 0,
        }
    }

    /// Hands records to `sink` in timestamp order until the rings are
    /// empty, a record must wait for a watermark, or a batch is done.
    /// `now_ns` reads the kernel's clock (`CLOCK_BOOTTIME`); with `closing`
    /// (the programs are detached, nothing more can come) every record goes.
    pub fn round<S: RecordSink>(
        &mut self,
        sink: &mut S,
        counters: &DrainCounters,
        now_ns: &mut impl FnMut() -> u64,
        closing: bool,
    ) -> Round {
        let (mut records, mut bytes, mut behind) = (0u64, 0u64, 0u64);
        for lane in &mut self.lanes {
            if lane.head_ns.is_none() {
                lane.look();
            }
        }
        let round = loop {
            if records as usize >= BATCH || bytes >= BATCH_BYTES {
                break Round::Budget;
            }
            let Some((next, head_ns)) = self
                .lanes
                .iter()
                .enumerate()
                .filter_map(|(i, lane)| Some((i, lane.head_ns?)))
                .min_by_key(|&(_, head_ns)| head_ns)
            else {
                break Round::Empty;
            };
            let unvouched = |lane: &Lane<R>| lane.head_ns.is_none() && lane.watermark_ns < head_ns;
            if !closing && self.lanes.iter().any(unvouched) {
                // The clock is read before the rings are looked at: a record
                // committed after the look is stamped after this reading,
                // up to the slack.
                let watermark = now_ns().saturating_sub(WATERMARK_SLACK_NS);
                let mut appeared = false;
                for lane in self.lanes.iter_mut().filter(|lane| unvouched(lane)) {
                    lane.look();
                    match lane.head_ns {
                        Some(_) => appeared = true,
                        None => lane.watermark_ns = lane.watermark_ns.max(watermark),
                    }
                }
                if appeared {
                    continue;
                }
                if self.lanes.iter().any(unvouched) {
                    break Round::Waiting;
                }
            }
            if head_ns < self.latest_ns {
                behind += 1;
            }
            self.latest_ns = self.latest_ns.max(head_ns);
            let lane = &mut self.lanes[next];
            if let Some(raw) = lane.source.peek() {
                match Record::decode(raw) {
                    Ok(record) => {
                        records += 1;
                        bytes += record.packet.len() as u64;
                        sink.record(&record);
                    }
                    Err(error) => {
                        counters.undecodable.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!("skipping an undecodable ring record: {error}");
                    }
                }
            }
            lane.source.release();
            lane.look();
        };
        counters.records.fetch_add(records, Ordering::Relaxed);
        counters.bytes.fetch_add(bytes, Ordering::Relaxed);
        counters
            .behind_watermark
            .fetch_add(behind, Ordering::Relaxed);
        round
    }
}

/// Drains every CPU ring into `sink`, merged in kernel order, until `stop`
/// turns true, then reads what is left (the caller detaches the programs
/// first, so nothing is missed).
pub async fn drain_rings<S: RecordSink>(
    rings: Vec<CpuRing>,
    mut sink: S,
    counters: Arc<DrainCounters>,
    mut stop: watch::Receiver<bool>,
) -> io::Result<()> {
    let mut readers = Vec::with_capacity(rings.len());
    let mut ready = Vec::with_capacity(rings.len());
    for ring in rings {
        readers.push(RingReader::new(&ring.ring, ring.size)?);
        ready.push(register_readable(ring.ring)?);
    }
    let mut merge = Merge::new(readers);
    let mut clock = boot_ns;
    tracing::debug!(rings = ready.len(), "ring drain started");
    let mut wait = POLL_INTERVAL;
    loop {
        tokio::select! {
            woke = tokio::time::timeout(wait, any_readable(&ready)) => {
                if let Ok(Err(error)) = woke {
                    return Err(error);
                }
            }
            // The only change ever sent is the stop; a dropped sender stops too.
            _ = stop.changed() => break,
        }
        wait = loop {
            let round = merge.round(&mut sink, &counters, &mut clock, false);
            sink.flush()?;
            match round {
                Round::Budget => tokio::task::yield_now().await,
                Round::Empty => break POLL_INTERVAL,
                Round::Waiting => break WAIT_RETRY,
            }
        };
    }
    while merge.round(&mut sink, &counters, &mut clock, true) == Round::Budget {
        sink.flush()?;
    }
    sink.flush()?;
    tracing::debug!("ring drain stopped");
    Ok(())
}

/// Waits until at least one ring is readable, and takes the readiness of
/// every ring that is: the round that follows reads them all to the end,
/// and a record committed after this wakes the reader again.
async fn any_readable(rings: &[AsyncFd<RingBuf<MapData>>]) -> io::Result<()> {
    std::future::poll_fn(|cx| {
        let mut woke = false;
        for ring in rings {
            if let Poll::Ready(guard) = ring.poll_read_ready(cx) {
                guard?.clear_ready();
                woke = true;
            }
        }
        if woke {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await
}

/// Registers a ring with the reactor for read readiness.
pub fn register_readable<T: AsRawFd>(ring: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: the rings (aya's `RingBuf`, aya-log's `EbpfLogger`) own their
    // map fd and keep it open until they are dropped, and the `AsyncFd`
    // owns the ring, so the fd stays valid while registered.
    Ok(unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }?)
}

/// A sink that only counts (the counters live in [`DrainCounters`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct Discard;

impl RecordSink for Discard {
    fn record(&mut self, _record: &Record<'_>) {}
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, collections::VecDeque, rc::Rc};

    use super::*;

    /// A ring whose records the test adds while the merge reads it.
    #[derive(Clone, Default)]
    struct FakeRing(Rc<RefCell<VecDeque<Vec<u8>>>>);

    impl FakeRing {
        /// Adds a record stamped `ts_ns` whose one packet byte is `tag`.
        fn push(&self, ts_ns: u64, tag: u8) {
            let header = RecordHeader {
                ts_ns,
                cap_len: 1,
                wire_len: 1,
                ..RecordHeader::default()
            };
            self.0
                .borrow_mut()
                .push_back(Record::encode(&header, &[tag]));
        }
    }

    struct Peeked(Vec<u8>);

    impl RecordSource for (FakeRing, Option<Peeked>) {
        fn peek(&mut self) -> Option<&[u8]> {
            if self.1.is_none() {
                self.1 = self.0.0.borrow().front().cloned().map(Peeked);
            }
            self.1.as_ref().map(|peeked| peeked.0.as_slice())
        }

        fn release(&mut self) {
            if self.1.take().is_some() {
                self.0.0.borrow_mut().pop_front();
            }
        }
    }

    /// The tags of the records handed on, in order.
    #[derive(Default)]
    struct Tags(Vec<u8>);

    impl RecordSink for Tags {
        fn record(&mut self, record: &Record<'_>) {
            self.0.push(record.packet[0]);
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn merge_of(rings: &[FakeRing]) -> Merge<(FakeRing, Option<Peeked>)> {
        Merge::new(rings.iter().map(|ring| (ring.clone(), None)))
    }

    const MS: u64 = 1_000_000;

    #[test]
    fn records_of_several_rings_come_out_in_timestamp_order() {
        let rings = [FakeRing::default(), FakeRing::default()];
        for (ts, tag) in [(10, 1), (30, 3), (31, 4), (60, 7)] {
            rings[0].push(ts, tag);
        }
        for (ts, tag) in [(20, 2), (40, 5), (50, 6)] {
            rings[1].push(ts, tag);
        }
        let mut merge = merge_of(&rings);
        let (mut sink, counters) = (Tags::default(), DrainCounters::default());
        let round = merge.round(&mut sink, &counters, &mut || MS, false);
        assert_eq!(round, Round::Empty);
        assert_eq!(sink.0, [1, 2, 3, 4, 5, 6, 7]);
        let counters = counters.snapshot();
        assert_eq!((counters.records, counters.behind_watermark), (7, 0));
    }

    #[test]
    fn a_record_waits_until_the_empty_rings_vouch_for_its_time() {
        let rings = [FakeRing::default(), FakeRing::default()];
        rings[0].push(5 * MS, 1);
        let mut merge = merge_of(&rings);
        let (mut sink, counters) = (Tags::default(), DrainCounters::default());
        // Ring 1 is empty, but within the slack a record stamped earlier
        // could still be on its way into it.
        let mut now = 5 * MS + WATERMARK_SLACK_NS / 2;
        assert_eq!(
            merge.round(&mut sink, &counters, &mut || now, false),
            Round::Waiting
        );
        assert!(sink.0.is_empty());
        // It was: it goes first.
        rings[1].push(5 * MS - 1, 2);
        now = 5 * MS + WATERMARK_SLACK_NS + 1;
        assert_eq!(
            merge.round(&mut sink, &counters, &mut || now, false),
            Round::Empty
        );
        assert_eq!(sink.0, [2, 1]);
        assert_eq!(counters.snapshot().behind_watermark, 0);
    }

    #[test]
    fn a_record_behind_the_watermark_is_counted_and_still_handed_on() {
        let rings = [FakeRing::default(), FakeRing::default()];
        rings[0].push(5 * MS, 1);
        let mut merge = merge_of(&rings);
        let (mut sink, counters) = (Tags::default(), DrainCounters::default());
        let now = 10 * MS;
        assert_eq!(
            merge.round(&mut sink, &counters, &mut || now, false),
            Round::Empty
        );
        rings[1].push(4 * MS, 2);
        rings[0].push(6 * MS, 3);
        assert_eq!(
            merge.round(&mut sink, &counters, &mut || now, false),
            Round::Empty
        );
        assert_eq!(sink.0, [1, 2, 3]);
        assert_eq!(counters.snapshot().behind_watermark, 1);
    }

    #[test]
    fn closing_hands_on_everything_whatever_the_clock() {
        let rings = [FakeRing::default(), FakeRing::default()];
        rings[0].push(5 * MS, 1);
        rings[0].push(7 * MS, 2);
        let mut merge = merge_of(&rings);
        let (mut sink, counters) = (Tags::default(), DrainCounters::default());
        assert_eq!(
            merge.round(&mut sink, &counters, &mut || 0, true),
            Round::Empty
        );
        assert_eq!(sink.0, [1, 2]);
    }

    #[test]
    fn a_full_batch_ends_the_round_and_the_next_goes_on_in_order() {
        let rings = [FakeRing::default(), FakeRing::default()];
        let total = BATCH + 10;
        for i in 0..total as u64 {
            rings[(i % 2) as usize].push(i + 1, (i % 251) as u8);
        }
        let mut merge = merge_of(&rings);
        let (mut sink, counters) = (Tags::default(), DrainCounters::default());
        let now = || total as u64 + WATERMARK_SLACK_NS + 1;
        assert_eq!(
            merge.round(&mut sink, &counters, &mut { now }, false),
            Round::Budget
        );
        assert_eq!(sink.0.len(), BATCH);
        assert_eq!(
            merge.round(&mut sink, &counters, &mut { now }, false),
            Round::Empty
        );
        let expected: Vec<u8> = (0..total as u64).map(|i| (i % 251) as u8).collect();
        assert_eq!(sink.0, expected);
        assert_eq!(counters.snapshot().behind_watermark, 0);
    }

    #[test]
    fn an_undecodable_record_is_counted_and_skipped() {
        let rings = [FakeRing::default()];
        rings[0].0.borrow_mut().push_back(vec![1, 2, 3]);
        rings[0].push(5, 9);
        let mut merge = merge_of(&rings);
        let (mut sink, counters) = (Tags::default(), DrainCounters::default());
        assert_eq!(
            merge.round(&mut sink, &counters, &mut || MS, false),
            Round::Empty
        );
        assert_eq!(sink.0, [9]);
        assert_eq!(counters.snapshot().undecodable, 1);
    }
}

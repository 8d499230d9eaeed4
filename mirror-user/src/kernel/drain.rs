//! One task per CPU ring: reads records out as they arrive and hands them
//! to a sink, without ever making the kernel wait.

use std::{
    io,
    os::fd::AsRawFd,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::watch,
};

use crate::{kernel::loader::CpuRing, kernel::record::Record, telemetry::counters};

counters! {
    /// Userspace side of the ring stage, shared by the drain tasks.
    pub struct DrainCounters => DrainSnapshot {
        /// Records read out of the rings.
        records,
        /// Packet bytes in those records.
        bytes,
        /// Records that could not be decoded (a bug, never bad traffic).
        undecodable,
    }
}

/// Consumer of the records of one ring.
pub trait RecordSink: Send + 'static {
    /// Takes one record; the bytes are borrowed from the ring.
    fn record(&mut self, record: &Record<'_>);
    /// Called after each batch of records.
    fn flush(&mut self) -> io::Result<()>;
}

/// Records read per batch before the task yields to others; readiness is
/// kept, so the rest is read right after.
const BATCH: usize = 4096;

/// Packet bytes read per batch before the task yields. The rings of two
/// CPUs can carry one flow, and reassembly must hold whatever one ring's
/// batch runs ahead of the other's: 4096 GRO packets are 200 MiB, far past
/// the reorder budget (measured: bulk iperf3 closed as "gap" every second
/// with no packet lost), 1 MiB keeps the rings within a few MiB.
const BATCH_BYTES: u64 = 1 << 20;

/// The kernel wakes the reader only once enough data is waiting (see
/// `GLOBAL_WAKEUP_BYTES`); this poll picks up a trickle below that mark, so
/// it bounds the delay a record can wait in the ring.
const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// Drains `ring` into `sink` until `stop` turns true, then reads what is
/// left (the caller detaches the program first, so nothing is missed).
pub async fn drain_ring<S: RecordSink>(
    ring: CpuRing,
    mut sink: S,
    counters: Arc<DrainCounters>,
    mut stop: watch::Receiver<bool>,
) -> io::Result<()> {
    let cpu = ring.cpu;
    let mut fd = register_readable(ring.ring)?;
    tracing::debug!(cpu, "ring drain started");
    loop {
        tokio::select! {
            ready = tokio::time::timeout(POLL_INTERVAL, fd.readable_mut()) => {
                match ready {
                    Ok(guard) => {
                        let mut guard = guard?;
                        let drained_all = read_batch(guard.get_inner_mut(), &mut sink, &counters);
                        sink.flush()?;
                        if drained_all {
                            guard.clear_ready();
                        } else {
                            tokio::task::yield_now().await;
                        }
                    }
                    Err(_elapsed) => {
                        read_all(fd.get_mut(), &mut sink, &counters);
                        sink.flush()?;
                    }
                }
            }
            // The only change ever sent is the stop; a dropped sender stops too.
            _ = stop.changed() => break,
        }
    }
    read_all(fd.get_mut(), &mut sink, &counters);
    sink.flush()?;
    tracing::debug!(cpu, "ring drain stopped");
    Ok(())
}

fn read_all<S: RecordSink>(ring: &mut RingBuf<MapData>, sink: &mut S, counters: &DrainCounters) {
    while !read_batch(ring, sink, counters) {}
}

/// Reads up to [`BATCH`] records or [`BATCH_BYTES`]; true when the ring is
/// empty.
fn read_batch<S: RecordSink>(
    ring: &mut RingBuf<MapData>,
    sink: &mut S,
    counters: &DrainCounters,
) -> bool {
    let (mut records, mut bytes) = (0u64, 0u64);
    let mut empty = false;
    for _ in 0..BATCH {
        if bytes >= BATCH_BYTES {
            break;
        }
        let Some(item) = ring.next() else {
            empty = true;
            break;
        };
        match Record::decode(&item) {
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
    counters.records.fetch_add(records, Ordering::Relaxed);
    counters.bytes.fetch_add(bytes, Ordering::Relaxed);
    empty
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

//! Held segments cost what the budgets count: out-of-order bytes, however
//! small and wherever they were copied from, stay within
//! `--max-buffered-bytes` of real heap memory.
//!
//! A binary of its own because its global allocator counts every
//! allocation of the process (as glibc sizes it: the usable size plus the
//! chunk header), which would disturb other tests; the tests here run one
//! at a time for the same reason.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    net::SocketAddr,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use mirror_user::{
    flow::conntrack::{ConnectionTable, TableLimits},
    flow::model::{CloseReason, ConnIds, StreamEvent},
    flow::reassembly::ReorderLimits,
    flow::{
        model::FlowKey,
        segment::{PayloadPool, Segment, TcpFlags},
    },
};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Heap bytes an allocation really takes: glibc's usable size plus the
/// 8-byte chunk header.
fn chunk(ptr: *mut u8) -> usize {
    // SAFETY: `ptr` was returned by the system allocator and not freed.
    unsafe { libc::malloc_usable_size(ptr.cast()) + 8 }
}

fn add(ptr: *mut u8) {
    if !ptr.is_null() {
        let live = LIVE.fetch_add(chunk(ptr), Ordering::Relaxed) + chunk(ptr);
        PEAK.fetch_max(live, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded to the system allocator unchanged; the
// counting only reads the sizes of live allocations.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, forwarded.
        let ptr = unsafe { System.alloc(layout) };
        add(ptr);
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, forwarded.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        add(ptr);
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(chunk(ptr), Ordering::Relaxed);
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = chunk(ptr);
        // SAFETY: the caller's contract, forwarded.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            LIVE.fetch_sub(old, Ordering::Relaxed);
            add(new);
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Starts measuring: the peak is reset to what is live now, returned.
fn baseline() -> usize {
    let live = LIVE.load(Ordering::Relaxed);
    PEAK.store(live, Ordering::Relaxed);
    live
}

fn flow(client_port: u16) -> FlowKey {
    FlowKey {
        src: SocketAddr::from(([198, 18, 0, 1], client_port)),
        dst: SocketAddr::from(([198, 18, 0, 2], 80)),
    }
}

fn limits(budget: usize) -> TableLimits {
    TableLimits {
        max_connections: 1000,
        max_buffered_bytes: budget,
        idle_timeout_ns: u64::MAX,
        reorder: ReorderLimits {
            max_bytes: budget,
            max_wait_ns: u64::MAX,
        },
        deliver: Default::default(),
    }
}

/// Counts what consumers would get, keeping nothing.
#[derive(Default)]
struct Tally {
    data_bytes: usize,
    evicted: usize,
}

impl Tally {
    fn sink(&mut self) -> impl FnMut(u16, StreamEvent) + '_ {
        |_, event| match event {
            StreamEvent::Data { bytes, .. } => self.data_bytes += bytes.len(),
            StreamEvent::Closed {
                reason: CloseReason::Evicted,
                ..
            } => self.evicted += 1,
            _ => {}
        }
    }
}

fn segment(flow: FlowKey, seq: u32, flags: TcpFlags, payload: bytes::Bytes) -> Segment {
    Segment {
        dir: Default::default(),
        flow,
        seq,
        ack: 0,
        flags,
        payload,
        truncated: false,
        iface: Default::default(),
    }
}

/// Room for what is not held: the pool's current 1 MiB buffer, the table's
/// maps and the connections themselves.
const SLACK: usize = 3 << 20;

#[test]
fn a_million_one_byte_segments_out_of_order_stay_within_the_budget() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let budget = 16 << 20;
    let mut pool = PayloadPool::default();
    let mut table = ConnectionTable::new(limits(budget), ConnIds::default());
    let mut tally = Tally::default();
    let connections = 100u16;
    for port in 0..connections {
        table.segment(
            segment(flow(port), 0, TcpFlags::SYN, bytes::Bytes::new()),
            0,
            &mut tally.sink(),
        );
    }
    let before = baseline();
    for i in 0..1_000_000u32 {
        let port = (i % u32::from(connections)) as u16;
        // Every other byte after a missing first one: nothing is ever in
        // order, nothing coalesces.
        let seq = 3 + 2 * (i / u32::from(connections));
        let payload = pool.copy(&[i as u8]);
        table.segment(
            segment(flow(port), seq, TcpFlags::ACK, payload),
            u64::from(i),
            &mut tally.sink(),
        );
    }
    let peak = PEAK.load(Ordering::Relaxed) - before;
    let held_now = LIVE.load(Ordering::Relaxed) - before;
    eprintln!(
        "peak {peak}, now {held_now}, counted {} bytes",
        table.buffered_bytes()
    );
    assert!(
        peak <= budget + SLACK,
        "{peak} bytes of heap at the peak for a budget of {budget}"
    );
    assert!(
        held_now <= table.buffered_bytes() + SLACK,
        "{held_now} bytes of heap held, {} counted",
        table.buffered_bytes()
    );
    assert!(
        tally.evicted > 0,
        "the budget was reached (else this proves nothing)"
    );
    assert_eq!(tally.data_bytes, 0, "nothing was ever in order");
    assert!(table.buffered_bytes() <= budget);
}

#[test]
fn held_bytes_do_not_pin_the_pool_buffers_they_were_copied_into() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let budget = 1 << 20;
    let buffer = PayloadPool::DEFAULT_BUFFER;
    let mut pool = PayloadPool::new(buffer);
    let mut table = ConnectionTable::new(limits(budget), ConnIds::default());
    let mut tally = Tally::default();
    let f = flow(1);
    table.segment(
        segment(f, 0, TcpFlags::SYN, bytes::Bytes::new()),
        0,
        &mut tally.sink(),
    );
    let before = baseline();
    let filler = vec![0u8; buffer - 1];
    for i in 0..64u32 {
        // One held byte, then the rest of its pool buffer goes to
        // segments that are delivered and dropped: each held byte is the
        // last user of a 1 MiB buffer.
        let held = pool.copy(b"x");
        table.segment(
            segment(f, 3 + 2 * i, TcpFlags::ACK, held),
            0,
            &mut tally.sink(),
        );
        drop(pool.copy(&filler));
    }
    let peak = PEAK.load(Ordering::Relaxed) - before;
    assert!(
        peak <= budget + SLACK,
        "{peak} bytes of heap at the peak for 64 held bytes"
    );
    assert_eq!(tally.evicted, 0, "64 small segments fit the budget");
}

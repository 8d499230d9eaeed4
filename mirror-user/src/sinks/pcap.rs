//! `--pcap FILE`: the mirrored packets (before reassembly) in a capture
//! file for Wireshark, tshark and tcpdump: pcapng by default (interface
//! name, nanosecond timestamps), or classic pcap with nanosecond
//! timestamps; written with the `pcap-file` crate.
//!
//! The writer is a bounded consumer on a thread of its own (file writes
//! block): the drain offers packets with `try_send`, so a disk that cannot
//! keep up drops packets and counts them, never slows the drain; the queue
//! is bounded in packets and in bytes. A write error (a full disk, an
//! unwritable file) stops this sink with one clear message; mirroring and
//! the other consumers go on.
//!
//! Files are created through their directory's descriptor, never through a
//! symlink and never over an existing file ([`OutputDir`]): the first one
//! before the mirror drops root (then given to the user it runs as), the
//! rotated ones after, as that user. A rotated name that is taken is
//! skipped.
//!
//! Packets come from one ring per CPU, read at different moments, so they
//! arrive out of order across CPUs; a capture is written in time order (as
//! tcpdump's is, and as Wireshark's stream analysis needs): packets wait in
//! a bounded window ([`ORDER_WINDOW`], [`ORDER_HELD`]) and leave it oldest
//! first. With `--directions both` the server's packets (seen at TC
//! egress) are in the same order, and pcapng marks each packet inbound or
//! outbound (the `epb_flags` option of its block).

use std::{
    borrow::Cow,
    cmp::Reverse,
    collections::{BinaryHeap, VecDeque},
    ffi::OsString,
    fs::File,
    io::{self, BufWriter, IoSlice, Write},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
        mpsc::{self, SyncSender, TrySendError},
    },
    thread::JoinHandle,
    time::Duration,
};

use bytes::Bytes;
use pcap_file::{
    DataLink, TsResolution,
    pcap::{PcapHeader, PcapPacket, PcapWriter},
    pcapng::{
        PcapNgWriter,
        blocks::{
            enhanced_packet::{EnhancedPacketBlock, EnhancedPacketOption},
            interface_description::{InterfaceDescriptionBlock, InterfaceDescriptionOption},
        },
    },
};

use crate::{
    files::{FileId, OutputDir, OutputDirError, Owner, Special},
    flow::segment::PayloadPool,
    kernel::clock::WallClock,
    kernel::record::Record,
    telemetry::counters,
};

/// Packets queued for the writer before new ones are dropped.
const QUEUE: usize = 8192;
/// Bytes queued for the writer before new packets are dropped (8192 GRO
/// packets of 64 KiB would be 512 MiB).
const QUEUE_BYTES: usize = 64 << 20;
/// How long a packet waits for older ones from other CPUs' rings.
const ORDER_WINDOW: Duration = Duration::from_millis(100);
/// Most packets waiting; beyond, the oldest is written at once.
const ORDER_HELD: usize = 16384;
/// Most bytes waiting; beyond, the oldest is written at once (at 1 GB/s
/// the window alone would hold 100 MB).
const ORDER_HELD_BYTES: usize = 64 << 20;
/// How long the writer sleeps between rounds while packets come: the
/// queue fills at most this long between rounds (at 10 Gbit/s, 1.25 MB).
const POLL_INTERVAL: Duration = Duration::from_millis(1);
/// Empty rounds before the writer waits in the channel instead.
const IDLE_POLLS: u32 = 20;
/// What a queued packet costs beyond its bytes: its handle and timestamps.
const PACKET_OVERHEAD: usize = std::mem::size_of::<Packet>();

/// Capture file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PcapFormat {
    /// Classic pcap, nanosecond timestamps.
    Pcap,
    /// pcapng with the interface's name and nanosecond timestamps.
    Pcapng,
}

/// Settings of the capture.
#[derive(Debug, Clone)]
pub struct PcapConfig {
    /// File to write, `-` for standard output.
    pub path: PathBuf,
    pub format: PcapFormat,
    /// Start a new file once this many bytes were written (not on stdout).
    pub rotate_size: Option<u64>,
    /// Keep at most this many files, deleting the oldest.
    pub keep: Option<usize>,
    /// Interface name recorded in pcapng.
    pub iface: String,
    pub snaplen: u32,
}

counters! {
    /// Counters of the capture.
    pub struct PcapCounters => PcapSnapshot {
        written,
        /// Dropped because the writer's queue was full (a slow disk).
        dropped,
        /// Not written because the sink had stopped on an error.
        failed,
        files,
    }
}

struct Packet {
    unix_ns: u64,
    wire_len: u32,
    /// pcapng's `epb_flags`: [`INBOUND`] or [`OUTBOUND`].
    flags: u32,
    data: Bytes,
}

/// `epb_flags` of a packet seen at ingress (TC or XDP): bits 0-1 are the
/// direction, 1 inbound.
const INBOUND: u32 = 1;
/// `epb_flags` of a packet seen at TC egress: 2 outbound.
const OUTBOUND: u32 = 2;

impl Packet {
    /// Memory the packet holds while it waits: its bytes (a slice of the
    /// sink's own payload buffers, filled in order) and its handle.
    fn cost(&self) -> usize {
        self.data.len() + PACKET_OVERHEAD
    }
}

/// Where the capture goes, opened before the mirror drops root.
pub enum PcapOutput {
    Stdout,
    /// A file the mirror created (rotation creates the next ones beside it).
    File {
        dir: OutputDir,
        name: OsString,
        file: File,
        id: FileId,
    },
    /// An existing character device or FIFO (`/dev/null`, a named pipe).
    Special(File),
}

#[derive(Debug, thiserror::Error)]
pub enum PcapOpenError {
    #[error(transparent)]
    Dir(#[from] OutputDirError),
    #[error(
        "{} already exists: the mirror never overwrites a file; remove it or name a new one",
        .0.display()
    )]
    Exists(PathBuf),
    #[error(
        "{} is a pipe or device of another user (uid {uid}), who could read the capture from it: remove it, or make the pipe as root, or use --pcap - and a shell pipe",
        .path.display()
    )]
    OtherOwner { path: PathBuf, uid: u32 },
    #[error("--pcap-rotate-size needs a regular file, and {} is a device or a pipe", .0.display())]
    RotateSpecial(PathBuf),
    #[error("cannot create the capture file {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Opens the capture's first file for `config` (before the mirror drops
/// root: the file is given to `owner`).
pub fn open_output(config: &PcapConfig, owner: Option<Owner>) -> Result<PcapOutput, PcapOpenError> {
    if config.path == Path::new("-") {
        return Ok(PcapOutput::Stdout);
    }
    let io_error = |source| PcapOpenError::Io {
        path: config.path.clone(),
        source,
    };
    let (dir, name) = OutputDir::of_file(&config.path)?;
    match dir.create_new(&name) {
        Ok((file, id)) => {
            OutputDir::give(&file, owner).map_err(io_error)?;
            Ok(PcapOutput::File {
                dir,
                name,
                file,
                id,
            })
        }
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {
            // Only a device or a pipe of root or of this user is written as
            // it is; never a file, never through a symlink.
            match dir.open_special(&name).map_err(io_error)? {
                Special::Open(_) if config.rotate_size.is_some() => {
                    Err(PcapOpenError::RotateSpecial(config.path.clone()))
                }
                Special::Open(file) => Ok(PcapOutput::Special(file)),
                Special::OtherOwner(uid) => Err(PcapOpenError::OtherOwner {
                    path: config.path.clone(),
                    uid,
                }),
                Special::NotSpecial => Err(PcapOpenError::Exists(config.path.clone())),
            }
        }
        Err(error) => Err(io_error(error)),
    }
}

impl PcapOutput {
    /// After the drop: rotation creates files as the user the mirror runs
    /// as, so that user must be able to write the directory.
    pub fn check_rotation(&self, config: &PcapConfig, user: &str) -> Result<(), OutputDirError> {
        match self {
            Self::File { dir, .. } if config.rotate_size.is_some() => dir.check_writable(user),
            _ => Ok(()),
        }
    }
}

/// Time order across rings: packets are released oldest first once they
/// are [`ORDER_WINDOW`] older than the newest seen (or the wall clock).
struct Reorder {
    held: BinaryHeap<Reverse<Held>>,
    /// What the held packets cost ([`Packet::cost`]).
    held_bytes: usize,
    newest_ns: u64,
    arrival: u64,
}

struct Held(u64, u64, Packet);

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        (self.0, self.1) == (other.0, other.1)
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Held {
    /// By timestamp, then by arrival (packets of one ring keep their order).
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.0, self.1).cmp(&(other.0, other.1))
    }
}

impl Reorder {
    fn new() -> Self {
        Self {
            held: BinaryHeap::new(),
            held_bytes: 0,
            newest_ns: 0,
            arrival: 0,
        }
    }

    fn push(&mut self, packet: Packet) {
        self.newest_ns = self.newest_ns.max(packet.unix_ns);
        self.arrival += 1;
        self.held_bytes += packet.cost();
        self.held
            .push(Reverse(Held(packet.unix_ns, self.arrival, packet)));
    }

    fn pop(&mut self) -> Option<Packet> {
        let Reverse(Held(_, _, packet)) = self.held.pop()?;
        self.held_bytes -= packet.cost();
        Some(packet)
    }

    /// The next packet that may be written now (`now_ns`: wall clock).
    fn pop_ready(&mut self, now_ns: u64) -> Option<Packet> {
        let horizon = self
            .newest_ns
            .max(now_ns)
            .saturating_sub(ORDER_WINDOW.as_nanos() as u64);
        let Reverse(oldest) = self.held.peek()?;
        if oldest.0 <= horizon || self.held.len() > ORDER_HELD || self.held_bytes > ORDER_HELD_BYTES
        {
            self.pop()
        } else {
            None
        }
    }

    /// Every packet left, oldest first.
    fn pop_any(&mut self) -> Option<Packet> {
        self.pop()
    }
}

fn now_unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The drain's handle on the writer: copies each record's packet out of
/// the ring and offers it, never waiting.
pub struct PcapSink {
    queue: SyncSender<Packet>,
    /// What the queue holds ([`Packet::cost`]), shared with the writer.
    queued_bytes: Arc<AtomicUsize>,
    counters: Arc<PcapCounters>,
    clock: WallClock,
    pool: PayloadPool,
}

impl Clone for PcapSink {
    fn clone(&self) -> Self {
        Self {
            queue: self.queue.clone(),
            queued_bytes: Arc::clone(&self.queued_bytes),
            counters: Arc::clone(&self.counters),
            clock: self.clock,
            pool: PayloadPool::default(),
        }
    }
}

impl PcapSink {
    pub fn offer(&mut self, record: &Record<'_>) {
        let cost = record.packet.len() + PACKET_OVERHEAD;
        // Reserve the bytes first, so that the copy is not made for a
        // packet the queue cannot take.
        if self.queued_bytes.fetch_add(cost, Ordering::Relaxed) + cost > QUEUE_BYTES {
            self.queued_bytes.fetch_sub(cost, Ordering::Relaxed);
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let packet = Packet {
            unix_ns: self.clock.unix_ns(record.header.ts_ns),
            wire_len: record.header.wire_len,
            flags: if record.egress() { OUTBOUND } else { INBOUND },
            data: self.pool.copy(record.packet),
        };
        match self.queue.try_send(packet) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.queued_bytes.fetch_sub(cost, Ordering::Relaxed);
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => {
                self.queued_bytes.fetch_sub(cost, Ordering::Relaxed);
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Starts the writer thread; the thread ends when every [`PcapSink`] is
/// dropped, after writing what it was given.
pub fn start(
    config: PcapConfig,
    output: PcapOutput,
    clock: WallClock,
) -> (PcapSink, Arc<PcapCounters>, JoinHandle<()>) {
    let counters = Arc::new(PcapCounters::default());
    let (queue, packets) = mpsc::sync_channel(QUEUE);
    let queued_bytes = Arc::new(AtomicUsize::new(0));
    let inbox = Inbox {
        packets,
        queued_bytes: Arc::clone(&queued_bytes),
    };
    let thread_counters = Arc::clone(&counters);
    let handle = std::thread::Builder::new()
        .name("pcap writer".into())
        .spawn(move || write_all(&config, output, &inbox, &thread_counters))
        .expect("spawn the pcap writer thread");
    let sink = PcapSink {
        queue,
        queued_bytes,
        counters: Arc::clone(&counters),
        clock,
        pool: PayloadPool::default(),
    };
    (sink, counters, handle)
}

/// The writer's end of the queue.
struct Inbox {
    packets: mpsc::Receiver<Packet>,
    queued_bytes: Arc<AtomicUsize>,
}

impl Inbox {
    fn recv_timeout(&self, timeout: Duration) -> Result<Packet, mpsc::RecvTimeoutError> {
        let packet = self.packets.recv_timeout(timeout)?;
        self.queued_bytes
            .fetch_sub(packet.cost(), Ordering::Relaxed);
        Ok(packet)
    }

    fn try_recv(&self) -> Result<Packet, mpsc::TryRecvError> {
        let packet = self.packets.try_recv()?;
        self.queued_bytes
            .fetch_sub(packet.cost(), Ordering::Relaxed);
        Ok(packet)
    }

    fn recv(&self) -> Option<Packet> {
        let packet = self.packets.recv().ok()?;
        self.queued_bytes
            .fetch_sub(packet.cost(), Ordering::Relaxed);
        Some(packet)
    }
}

fn write_all(config: &PcapConfig, output: PcapOutput, packets: &Inbox, counters: &PcapCounters) {
    let mut files = Rotation::new(output);
    let mut writer = match files.next_writer(config, counters) {
        Ok(writer) => writer,
        Err(error) => {
            report(config, &error);
            fail_rest(packets, counters);
            return;
        }
    };
    let mut order = Reorder::new();
    let mut in_file = 0u64;
    let mut open = true;
    let mut idle_polls = 0;
    let mut ready = Vec::with_capacity(WRITE_BATCH);
    while open {
        // While packets come, take what is queued and sleep between rounds
        // rather than wait in `recv`: a receiver blocked in the channel costs
        // each drain's `try_send` a wake-up (a futex call and a context
        // switch per packet, measured at about a tenth of the capture's
        // CPU on bulk traffic). Once idle, wait in the channel again.
        let mut taken = false;
        loop {
            match packets.try_recv() {
                Ok(packet) => {
                    order.push(packet);
                    taken = true;
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        if taken {
            idle_polls = 0;
        } else if open && idle_polls < IDLE_POLLS {
            idle_polls += 1;
            std::thread::sleep(POLL_INTERVAL);
        } else if open {
            // Wake up now and then even without packets, to release the
            // ones that aged out of the window.
            match packets.recv_timeout(ORDER_WINDOW / 4) {
                Ok(packet) => {
                    order.push(packet);
                    idle_polls = 0;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => open = false,
            }
        }
        let now = now_unix_ns();
        loop {
            // The packets written together: up to WRITE_BATCH, and none past
            // the current file's end when files rotate.
            let room = config
                .rotate_size
                .map_or(u64::MAX, |limit| limit.saturating_sub(in_file));
            let mut batch_bytes = 0u64;
            while ready.len() < WRITE_BATCH && (ready.is_empty() || batch_bytes < room) {
                let next = if open {
                    order.pop_ready(now)
                } else {
                    order.pop_any()
                };
                let Some(packet) = next else { break };
                batch_bytes += packet.data.len() as u64;
                ready.push(packet);
            }
            if ready.is_empty() {
                break;
            }
            let written = write_batch(
                &mut writer,
                &mut files,
                &mut in_file,
                &ready,
                config,
                counters,
            );
            let count = ready.len() as u64;
            ready.clear();
            match written {
                Ok(written) => {
                    counters.written.fetch_add(written, Ordering::Relaxed);
                }
                Err(error) => {
                    report(config, &error);
                    counters
                        .failed
                        .fetch_add(count + order.held.len() as u64, Ordering::Relaxed);
                    fail_rest(packets, counters);
                    return;
                }
            }
        }
    }
    if let Err(error) = writer.finish() {
        report(config, &error);
    }
}

/// Writes packets, starting the next file first when the current one is
/// full; returns how many were written.
fn write_batch(
    writer: &mut Writer,
    files: &mut Rotation,
    in_file: &mut u64,
    packets: &[Packet],
    config: &PcapConfig,
    counters: &PcapCounters,
) -> io::Result<u64> {
    if config.rotate_size.is_some_and(|limit| *in_file >= limit) {
        let next = files.next_writer(config, counters)?;
        std::mem::replace(writer, next).finish()?;
        *in_file = 0;
    }
    *in_file += writer.write_batch(packets)? as u64;
    Ok(packets.len() as u64)
}

fn report(config: &PcapConfig, error: &io::Error) {
    tracing::error!(
        "the capture to {} stopped: {error}; mirroring and the other consumers go on",
        config.path.display()
    );
}

/// Counts what arrives after the sink stopped.
fn fail_rest(packets: &Inbox, counters: &PcapCounters) {
    while packets.recv().is_some() {
        counters.failed.fetch_add(1, Ordering::Relaxed);
    }
}

/// tcpdump's naming with `-C`: `FILE`, then `FILE1`, `FILE2`, ... (a name
/// that is taken is skipped); with a limit, the oldest files are deleted.
struct Rotation {
    output: Option<PcapOutput>,
    /// The directory and name of the first file, for the next ones.
    base: Option<(OutputDir, OsString)>,
    index: u64,
    made: VecDeque<(OsString, FileId)>,
}

impl Rotation {
    fn new(output: PcapOutput) -> Self {
        Self {
            output: Some(output),
            base: None,
            index: 0,
            made: VecDeque::new(),
        }
    }

    fn next_writer(&mut self, config: &PcapConfig, counters: &PcapCounters) -> io::Result<Writer> {
        let out: Box<dyn Write + Send> = match self.output.take() {
            Some(PcapOutput::Stdout) => Box::new(io::stdout()),
            Some(PcapOutput::Special(file)) => Box::new(file),
            Some(PcapOutput::File {
                dir,
                name,
                file,
                id,
            }) => {
                self.made.push_back((name.clone(), id));
                self.base = Some((dir, name));
                Box::new(file)
            }
            None => {
                let Some((dir, base)) = &self.base else {
                    return Err(io::Error::other("only a file can be rotated"));
                };
                let names = (self.index + 1..self.index + 10_001).map(|index| {
                    let mut name = base.clone();
                    name.push(index.to_string());
                    (index, name)
                });
                let mut created = None;
                for (index, name) in names {
                    self.index = index;
                    match dir.create_new(&name) {
                        Ok((file, id)) => {
                            created = Some((name, file, id));
                            break;
                        }
                        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
                        Err(error) => return Err(error),
                    }
                }
                let (name, file, id) = created
                    .ok_or_else(|| io::Error::other("10000 rotation names in a row are taken"))?;
                self.made.push_back((name, id));
                if let Some(keep) = config.keep {
                    while self.made.len() > keep.max(1) {
                        if let Some((oldest, id)) = self.made.pop_front() {
                            dir.remove(&oldest, id)?;
                        }
                    }
                }
                Box::new(file)
            }
        };
        counters.files.fetch_add(1, Ordering::Relaxed);
        Writer::new(BufWriter::with_capacity(1 << 20, out), config)
    }
}

enum Writer {
    Pcap(PcapWriter<BufWriter<Box<dyn Write + Send>>>),
    PcapNg(PcapNgWriter<BufWriter<Box<dyn Write + Send>>>),
}

/// Packets written by one `writev` (three buffers each; IOV_MAX is 1024).
const WRITE_BATCH: usize = 256;
/// pcapng's enhanced packet block (type 6), in the section's byte order:
/// the native one, as `PcapNgWriter::new` writes the section header.
const ENHANCED_PACKET_BLOCK: u32 = 6;

/// Bytes of the one option of a packet block: `epb_flags` (code 2, length
/// 4, the flags word), then the end of options.
const EPB_OPTIONS: usize = 12;

/// Writes `packets` as pcapng enhanced packet blocks on interface 0 with
/// their `epb_flags`, byte for byte as `pcap-file` writes them.
fn write_packet_blocks(out: &mut impl Write, packets: &[Packet]) -> io::Result<usize> {
    let mut heads = [[0u8; 28]; WRITE_BATCH];
    let mut tails = [[0u8; 3 + EPB_OPTIONS + 4]; WRITE_BATCH];
    let mut tail_lens = [0usize; WRITE_BATCH];
    let mut total = 0;
    for (index, packet) in packets.iter().enumerate().take(WRITE_BATCH) {
        let len = packet.data.len();
        let pad = (4 - len % 4) % 4;
        let block_len = 32 + len + pad + EPB_OPTIONS;
        let fields = [
            ENHANCED_PACKET_BLOCK,
            block_len as u32,
            0,
            (packet.unix_ns >> 32) as u32,
            packet.unix_ns as u32,
            len as u32,
            packet.wire_len,
        ];
        for (slot, field) in heads[index].chunks_exact_mut(4).zip(fields) {
            slot.copy_from_slice(&field.to_ne_bytes());
        }
        let tail = &mut tails[index][pad..];
        tail[0..2].copy_from_slice(&2u16.to_ne_bytes());
        tail[2..4].copy_from_slice(&4u16.to_ne_bytes());
        tail[4..8].copy_from_slice(&packet.flags.to_ne_bytes());
        // The end of options (code 0, length 0) is zeros already.
        tail[EPB_OPTIONS..EPB_OPTIONS + 4].copy_from_slice(&(block_len as u32).to_ne_bytes());
        tail_lens[index] = pad + EPB_OPTIONS + 4;
        total += block_len;
    }
    let mut slices = [IoSlice::new(&[]); 3 * WRITE_BATCH];
    let count = packets.len().min(WRITE_BATCH);
    for (index, packet) in packets.iter().take(count).enumerate() {
        slices[3 * index] = IoSlice::new(&heads[index]);
        slices[3 * index + 1] = IoSlice::new(&packet.data);
        // The padding's zeros, the options, then the length again.
        slices[3 * index + 2] = IoSlice::new(&tails[index][..tail_lens[index]]);
    }
    let mut rest = &mut slices[..3 * count];
    while !rest.is_empty() {
        match out.write_vectored(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => IoSlice::advance_slices(&mut rest, written),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(total)
}

fn pcap_error(error: pcap_file::PcapError) -> io::Error {
    match error {
        pcap_file::PcapError::IoError(io) => io,
        other => io::Error::other(other.to_string()),
    }
}

impl Writer {
    fn new(out: BufWriter<Box<dyn Write + Send>>, config: &PcapConfig) -> io::Result<Self> {
        match config.format {
            PcapFormat::Pcap => {
                let header = PcapHeader {
                    snaplen: config.snaplen,
                    datalink: DataLink::ETHERNET,
                    ts_resolution: TsResolution::NanoSecond,
                    ..PcapHeader::default()
                };
                PcapWriter::with_header(out, header)
                    .map(Self::Pcap)
                    .map_err(pcap_error)
            }
            PcapFormat::Pcapng => {
                let mut writer = PcapNgWriter::new(out).map_err(pcap_error)?;
                let interface = InterfaceDescriptionBlock {
                    linktype: DataLink::ETHERNET,
                    snaplen: config.snaplen,
                    options: vec![
                        InterfaceDescriptionOption::IfName(Cow::Owned(config.iface.clone())),
                        // Enhanced packet blocks carry nanoseconds (10^-9 s).
                        InterfaceDescriptionOption::IfTsResol(9),
                    ],
                };
                writer.write_pcapng_block(interface).map_err(pcap_error)?;
                Ok(Self::PcapNg(writer))
            }
        }
    }

    fn write(&mut self, packet: &Packet) -> io::Result<usize> {
        let timestamp = Duration::from_nanos(packet.unix_ns);
        match self {
            Self::Pcap(writer) => writer
                .write_packet(&PcapPacket::new(timestamp, packet.wire_len, &packet.data))
                .map_err(pcap_error),
            Self::PcapNg(writer) => writer
                .write_pcapng_block(EnhancedPacketBlock {
                    interface_id: 0,
                    timestamp,
                    original_len: packet.wire_len,
                    data: Cow::Borrowed(&packet.data),
                    options: vec![EnhancedPacketOption::Flags(packet.flags)],
                })
                .map_err(pcap_error),
        }
    }

    /// Writes packets in order; returns the bytes written. pcapng's
    /// packet blocks are written here rather than by `pcap-file`, which
    /// copies each packet into the buffer with a write per field: each
    /// packet's header, bytes and trailer go out in one `writev` for the
    /// batch (profiled: the copy was a quarter of the capture's CPU on
    /// bulk traffic).
    fn write_batch(&mut self, packets: &[Packet]) -> io::Result<usize> {
        match self {
            Self::Pcap(_) => {
                let mut written = 0;
                for packet in packets {
                    written += self.write(packet)?;
                }
                Ok(written)
            }
            Self::PcapNg(writer) => write_packet_blocks(writer.get_mut(), packets),
        }
    }

    fn finish(self) -> io::Result<()> {
        match self {
            Self::Pcap(writer) => writer.into_writer().flush(),
            Self::PcapNg(writer) => writer.into_inner().flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use mirror_common::RecordHeader;
    use pcap_file::{pcap::PcapReader, pcapng::PcapNgReader};

    use super::*;

    fn config(dir: &Path, format: PcapFormat) -> PcapConfig {
        PcapConfig {
            path: dir.join("capture"),
            format,
            rotate_size: None,
            keep: None,
            iface: "veth7".into(),
            snaplen: 65568,
        }
    }

    fn record(frame: &[u8], ts_ns: u64, flags: u32) -> Vec<u8> {
        Record::encode(
            &RecordHeader {
                ts_ns,
                ifindex: 2,
                wire_len: frame.len() as u32 + 100,
                cap_len: frame.len() as u32,
                cpu: 0,
                flags,
                l3_offset: 14,
                l4_offset: 34,
                netns_cookie: 0,
            },
            frame,
        )
    }

    fn capture(config: &PcapConfig, frames: &[&[u8]]) -> Arc<PcapCounters> {
        let output = open_output(config, None).expect("open the capture");
        let (mut sink, counters, writer) = start(config.clone(), output, WallClock::new());
        for (i, frame) in frames.iter().enumerate() {
            // Every other one an answer of the server, seen at egress.
            let flags = if i % 2 == 1 {
                mirror_common::record_flags::SERVER_TO_CLIENT | mirror_common::record_flags::EGRESS
            } else {
                0
            };
            let raw = record(frame, 1_000 + i as u64, flags);
            sink.offer(&Record::decode(&raw).unwrap());
        }
        drop(sink);
        writer.join().unwrap();
        counters
    }

    #[test]
    fn only_pipes_of_root_or_this_user_are_written() {
        use std::os::unix::fs::OpenOptionsExt as _;
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: only root can plant another user's pipe");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), PcapFormat::Pcapng);
        let fifo = |owner: u32| {
            let _ = fs::remove_file(&config.path);
            nix::unistd::mkfifo(
                &config.path,
                nix::sys::stat::Mode::from_bits_truncate(0o600),
            )
            .unwrap();
            std::os::unix::fs::chown(&config.path, Some(owner), Some(owner)).unwrap();
            // Someone reads already: a writer's open does not wait.
            File::options()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&config.path)
                .unwrap()
        };
        // Planted by another user where the capture was to go: refused,
        // its reader gets nothing.
        let mut theirs = fifo(65534);
        let refused = open_output(&config, None);
        assert!(
            matches!(refused, Err(PcapOpenError::OtherOwner { uid: 65534, .. })),
            "{:?}",
            refused.map(|_| ())
        );
        let mut stolen = Vec::new();
        let _ = std::io::Read::read_to_end(&mut theirs, &mut stolen);
        assert!(stolen.is_empty());
        // This user's own pipe is written as it is.
        let _ours = fifo(nix::unistd::Uid::effective().as_raw());
        assert!(matches!(
            open_output(&config, None),
            Ok(PcapOutput::Special(_))
        ));
        // A symlink to a device is never followed.
        fs::remove_file(&config.path).unwrap();
        std::os::unix::fs::symlink("/dev/null", &config.path).unwrap();
        assert!(matches!(
            open_output(&config, None),
            Err(PcapOpenError::Exists(_))
        ));
    }

    /// The packet blocks written by hand are byte for byte those of
    /// `pcap-file`, for every padding, in batches larger than one `writev`.
    #[test]
    fn packet_blocks_are_those_of_pcap_file() {
        let packets: Vec<Packet> = (0..WRITE_BATCH + 9)
            .map(|n| Packet {
                unix_ns: 1_700_000_000_123_456_789 + n as u64 * 4_321,
                wire_len: (n % 7) as u32 + 60,
                flags: if n % 3 == 0 { OUTBOUND } else { INBOUND },
                data: Bytes::from(vec![n as u8; n % 7]),
            })
            .collect();
        let mut ours = Vec::new();
        for batch in packets.chunks(WRITE_BATCH) {
            write_packet_blocks(&mut ours, batch).unwrap();
        }
        let mut theirs = PcapNgWriter::new(Vec::new()).unwrap();
        theirs
            .write_pcapng_block(InterfaceDescriptionBlock {
                linktype: DataLink::ETHERNET,
                snaplen: 0,
                options: Vec::new(),
            })
            .unwrap();
        let header_len = theirs.get_mut().len();
        for packet in &packets {
            theirs
                .write_pcapng_block(EnhancedPacketBlock {
                    interface_id: 0,
                    timestamp: Duration::from_nanos(packet.unix_ns),
                    original_len: packet.wire_len,
                    data: Cow::Borrowed(&packet.data),
                    options: vec![EnhancedPacketOption::Flags(packet.flags)],
                })
                .unwrap();
        }
        assert_eq!(ours, theirs.get_mut()[header_len..]);
    }

    #[test]
    fn pcapng_keeps_names_timestamps_and_lengths() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), PcapFormat::Pcapng);
        let counters = capture(&config, &[b"first frame", b"second"]);
        assert_eq!(counters.written.load(Ordering::Relaxed), 2);
        let mut reader = PcapNgReader::new(File::open(&config.path).unwrap()).unwrap();
        let interface = &reader.interfaces().first().cloned();
        let mut packets = Vec::new();
        let mut directions = Vec::new();
        while let Some(block) = reader.next_block() {
            if let pcap_file::pcapng::Block::EnhancedPacket(epb) = block.unwrap() {
                packets.push((epb.data.to_vec(), epb.original_len, epb.timestamp));
                let flags = |option: &EnhancedPacketOption<'_>| match option {
                    EnhancedPacketOption::Flags(flags) => Some(*flags),
                    _ => None,
                };
                directions.push(epb.options.iter().map(flags).collect::<Vec<_>>());
            }
        }
        assert_eq!(packets.len(), 2);
        assert_eq!(
            directions,
            [[Some(INBOUND)], [Some(OUTBOUND)]],
            "the client's packet inbound, the server's outbound"
        );
        assert_eq!(packets[0].0, b"first frame");
        assert_eq!(packets[0].1, 11 + 100, "the length on the wire");
        assert!(
            packets[1].2 > packets[0].2,
            "nanosecond timestamps kept apart"
        );
        let interface = interface
            .clone()
            .or_else(|| reader.interfaces().first().cloned())
            .unwrap();
        assert!(
            interface
                .options
                .iter()
                .any(|o| matches!(o, InterfaceDescriptionOption::IfName(name) if name == "veth7"))
        );
        assert!(
            interface
                .options
                .contains(&InterfaceDescriptionOption::IfTsResol(9))
        );
    }

    #[test]
    fn packets_of_different_rings_are_written_in_time_order() {
        let packet = |unix_ns: u64| Packet {
            unix_ns,
            wire_len: 1,
            flags: INBOUND,
            data: Bytes::new(),
        };
        let mut order = Reorder::new();
        // Ring A's packets 10, 30; ring B's packet 20 arrives last.
        order.push(packet(10));
        order.push(packet(30));
        assert!(order.pop_ready(0).is_none(), "inside the window: wait");
        order.push(packet(20));
        let window = ORDER_WINDOW.as_nanos() as u64;
        let mut out = Vec::new();
        while let Some(p) = order.pop_ready(40 + window) {
            out.push(p.unix_ns);
        }
        assert_eq!(out, [10, 20, 30]);
        order.push(packet(5));
        assert_eq!(
            order.pop_any().map(|p| p.unix_ns),
            Some(5),
            "late ones still go out"
        );
    }

    #[test]
    fn pcap_has_nanosecond_timestamps() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), PcapFormat::Pcap);
        capture(&config, &[b"abc"]);
        let mut reader = PcapReader::new(File::open(&config.path).unwrap()).unwrap();
        assert_eq!(reader.header().ts_resolution, TsResolution::NanoSecond);
        assert_eq!(reader.header().datalink, DataLink::ETHERNET);
        let packet = reader.next_packet().unwrap().unwrap();
        assert_eq!(packet.data.as_ref(), b"abc");
        assert!(reader.next_packet().is_none());
    }

    #[test]
    fn rotation_keeps_the_newest_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(dir.path(), PcapFormat::Pcap);
        config.rotate_size = Some(1000);
        config.keep = Some(2);
        let frame = [7u8; 600];
        let counters = capture(&config, &[&frame[..]; 7]);
        assert_eq!(counters.written.load(Ordering::Relaxed), 7);
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        // Two packets per file: capture, capture1 .. capture3; the newest two stay.
        assert_eq!(names, ["capture2", "capture3"]);
    }

    #[test]
    fn a_full_disk_stops_the_sink_with_counts() {
        let config = PcapConfig {
            path: PathBuf::from("/dev/full"),
            ..config(Path::new("/tmp"), PcapFormat::Pcapng)
        };
        let frame = [1u8; 60_000];
        let counters = capture(&config, &[&frame[..]; 40]);
        assert_eq!(
            counters.written.load(Ordering::Relaxed) + counters.failed.load(Ordering::Relaxed),
            40
        );
        assert!(
            counters.failed.load(Ordering::Relaxed) > 0,
            "writes to /dev/full fail"
        );
    }

    #[test]
    fn existing_files_and_links_are_never_written() {
        use std::os::unix::fs::{PermissionsExt as _, symlink};
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), PcapFormat::Pcap);
        fs::write(&config.path, b"someone's file").unwrap();
        let error = open_output(&config, None).err().expect("refused");
        assert!(error.to_string().contains("never overwrites"), "{error}");
        assert_eq!(fs::read(&config.path).unwrap(), b"someone's file");

        let victim = dir.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        fs::remove_file(&config.path).unwrap();
        symlink(&victim, &config.path).unwrap();
        assert!(open_output(&config, None).is_err(), "a symlink is refused");
        assert_eq!(fs::read(&victim).unwrap(), b"precious");

        // Rotation skips a planted name and never writes through it.
        fs::remove_file(&config.path).unwrap();
        let mut rotating = config.clone();
        rotating.rotate_size = Some(1000);
        symlink(&victim, dir.path().join("capture2")).unwrap();
        let frame = [7u8; 600];
        let counters = capture(&rotating, &[&frame[..]; 7]);
        assert_eq!(counters.written.load(Ordering::Relaxed), 7);
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        for name in ["capture", "capture1", "capture3", "capture4"] {
            let mode = fs::metadata(dir.path().join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{name}");
        }
    }

    #[test]
    fn the_queue_is_bounded_in_bytes() {
        let (queue, packets) = mpsc::sync_channel(QUEUE);
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let counters = Arc::new(PcapCounters::default());
        let mut sink = PcapSink {
            queue,
            queued_bytes: Arc::clone(&queued_bytes),
            counters: Arc::clone(&counters),
            clock: WallClock::new(),
            pool: PayloadPool::default(),
        };
        // Nobody writes: 64 KiB packets fill the byte budget long before
        // the queue's 8192 slots.
        let frame = vec![0u8; 64 << 10];
        let raw = record(&frame, 1, 0);
        for _ in 0..2000 {
            sink.offer(&Record::decode(&raw).unwrap());
        }
        let held = packets.try_iter().count();
        assert!(
            held > 0 && held * frame.len() <= QUEUE_BYTES,
            "{held} packets held"
        );
        assert_eq!(
            counters.dropped.load(Ordering::Relaxed),
            2000 - held as u64,
            "every packet over the budget is counted"
        );
        assert!(queued_bytes.load(Ordering::Relaxed) <= QUEUE_BYTES);
    }

    #[test]
    fn the_order_window_is_bounded_in_bytes() {
        let mut order = Reorder::new();
        let big = Bytes::from(vec![0u8; 1 << 20]);
        for i in 0..(ORDER_HELD_BYTES >> 20) as u64 + 2 {
            order.push(Packet {
                flags: INBOUND,
                unix_ns: 1_000 + i,
                wire_len: 1,
                data: big.clone(),
            });
        }
        // All inside the time window, but over the byte budget: the
        // oldest goes out at once.
        assert_eq!(order.pop_ready(0).map(|p| p.unix_ns), Some(1_000));
        while order.pop_ready(0).is_some() {}
        assert!(order.held_bytes <= ORDER_HELD_BYTES);
    }
}

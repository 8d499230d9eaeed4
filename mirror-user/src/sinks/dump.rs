//! `--dump-dir DIR`: each connection's client-to-server bytes in a file of
//! its own, named as tcpflow names them, with a sidecar that says how the
//! connection ended.
//!
//! A file only ever holds bytes that were delivered in order. Its sidecar
//! `NAME.meta` (JSON) is created with it (`"reason": null` while the
//! connection is open) and gives the reason once it ends: anything but
//! `fin` means the stream in the file is a prefix of what the client sent
//! (`gap`, `lagged`, ...). Files are created as [`OutputDir`] creates them:
//! a name that is taken, even by a dangling symlink, is skipped for the
//! next tcpflow suffix.
//!
//! With `--directions both`, the server's bytes go into the reverse
//! tcpflow file (`SERVER-CLIENT`, created at the first byte the server
//! sent); the connection's one sidecar names it and counts its bytes.

use std::{
    collections::HashMap,
    ffi::{OsStr, OsString},
    fs::File,
    io::{self, IoSlice, Write as _},
    net::{IpAddr, SocketAddr},
    num::NonZeroUsize,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use lru::LruCache;
use serde::Serialize;

use crate::{
    fanout::{counters::ConsumerCounters, subscription::Subscription},
    files::{FileId, OutputDir},
    flow::model::{CloseReason, ConnId, Direction, Iface, StreamEvent},
};

/// Files kept open at once; others are reopened to append when data comes.
const OPEN_FILES: usize = 256;
/// tcpflow suffixes tried for one 4-tuple before the connection is not
/// dumped (a directory full of planted names, or a 4-tuple reused
/// thousands of times).
const MAX_SUFFIX: u32 = 10_000;
/// Events of one connection written with one `writev`.
const MAX_IOVECS: usize = 128;
/// Batches handed to the writer thread and not yet taken.
const BATCHES_IN_FLIGHT: usize = 8;

/// tcpflow's name for a flow: `198.018.000.001.40000-198.018.000.002.00080`
/// (IPv4 octets and ports zero-padded; IPv6 as eight 4-digit groups).
pub fn tcpflow_name(src: SocketAddr, dst: SocketAddr) -> String {
    fn end(addr: SocketAddr) -> String {
        let port = addr.port();
        match addr.ip() {
            IpAddr::V4(v4) => {
                let [a, b, c, d] = v4.octets();
                format!("{a:03}.{b:03}.{c:03}.{d:03}.{port:05}")
            }
            IpAddr::V6(v6) => {
                let [a, b, c, d, e, f, g, h] = v6.segments();
                format!("{a:04x}:{b:04x}:{c:04x}:{d:04x}:{e:04x}:{f:04x}:{g:04x}:{h:04x}.{port:05}")
            }
        }
    }
    format!("{}-{}", end(src), end(dst))
}

/// tcpflow's names for one 4-tuple, in the order they are taken: `NAME`,
/// then `NAMEc1`, `NAMEc2`, ...
fn tcpflow_names(name: &str) -> impl Iterator<Item = String> + '_ {
    std::iter::once(name.to_owned()).chain((1..MAX_SUFFIX).map(move |n| format!("{name}c{n}")))
}

fn meta_name(name: &OsStr) -> OsString {
    let mut meta = name.to_os_string();
    meta.push(".meta");
    meta
}

/// What the sidecar of a connection says.
#[derive(Debug, Serialize)]
struct Meta<'a> {
    conn: ConnId,
    src: String,
    dst: String,
    /// The interface it came through (`NETNS:IF` for another namespace);
    /// absent where unknown.
    #[serde(skip_serializing_if = "str::is_empty")]
    iface: &'a str,
    midstream: bool,
    bytes: u64,
    /// How the connection ended; `null` while it is open.
    reason: Option<&'a str>,
    /// Whether the file holds the whole client stream (and the server's
    /// file the server's, if there is one).
    complete: bool,
    /// The file of the server's bytes, once it sent any.
    #[serde(skip_serializing_if = "Option::is_none")]
    server_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    server_bytes: Option<u64>,
}

/// The file of a connection's server bytes (`--directions both`).
enum ServerFile {
    /// The server has sent nothing yet.
    None,
    Open {
        name: OsString,
        id: FileId,
        bytes: u64,
        /// Replaced behind the mirror's back: nothing more goes there.
        abandoned: bool,
    },
    /// No name was free: the server's bytes are not dumped.
    Refused,
}

struct Flow {
    name: OsString,
    id: FileId,
    meta_id: FileId,
    src: SocketAddr,
    dst: SocketAddr,
    midstream: bool,
    iface: Iface,
    bytes: u64,
    server: ServerFile,
    /// The file was replaced behind the mirror's back: nothing more is
    /// written for this connection.
    abandoned: bool,
}

/// Writes the events of one subscription into a directory.
pub struct DumpWriter {
    dir: OutputDir,
    flows: HashMap<ConnId, Flow>,
    /// Open files by connection and direction.
    open: LruCache<(ConnId, Direction), File>,
}

impl DumpWriter {
    /// Writes into `dir` (see [`OutputDir`] for how files are created).
    pub fn new(dir: OutputDir) -> Self {
        Self {
            dir,
            flows: HashMap::new(),
            open: LruCache::new(NonZeroUsize::new(OPEN_FILES).expect("non-zero")),
        }
    }

    /// Writes one event. An error is one the whole dump cannot go on after
    /// (a full disk, a directory gone); a file replaced behind the mirror's
    /// back only ends that connection's file, with a warning.
    pub fn handle(&mut self, event: &StreamEvent) -> io::Result<()> {
        match event {
            StreamEvent::Opened {
                iface,
                conn,
                src,
                dst,
                midstream,
            } => self.open_flow(*conn, *src, *dst, *midstream, iface),
            StreamEvent::Data {
                peer_acked: _,
                conn,
                dir,
                bytes,
            } => self.write_data(*conn, *dir, &[IoSlice::new(bytes)]),
            StreamEvent::Closed { conn, reason } => {
                self.open.pop(&(*conn, Direction::Client));
                self.open.pop(&(*conn, Direction::Server));
                match self.flows.remove(conn) {
                    Some(flow) if !flow.abandoned => self.write_meta(*conn, &flow, Some(*reason)),
                    _ => Ok(()),
                }
            }
        }
    }

    /// Writes a batch of events: each run of one connection's data goes
    /// to its file in one `writev` (up to [`MAX_IOVECS`] events), not one
    /// `write` per event.
    pub fn handle_batch(&mut self, events: &[StreamEvent]) -> io::Result<()> {
        let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
        let mut rest = events;
        while let Some(first) = rest.first() {
            let StreamEvent::Data { conn, dir, .. } = first else {
                self.handle(first)?;
                rest = &rest[1..];
                continue;
            };
            let mut count = 0;
            for event in rest.iter().take(MAX_IOVECS) {
                match event {
                    StreamEvent::Data {
                        peer_acked: _,
                        conn: next,
                        dir: next_dir,
                        bytes,
                    } if next == conn && next_dir == dir => {
                        slices[count] = IoSlice::new(bytes);
                        count += 1;
                    }
                    _ => break,
                }
            }
            self.write_data(*conn, *dir, &slices[..count])?;
            rest = &rest[count..];
        }
        Ok(())
    }

    /// Appends `bytes` to the connection's file, reopening it (safely) if
    /// it left the open-file cache.
    fn write_data(
        &mut self,
        conn: ConnId,
        dir: Direction,
        bytes: &[IoSlice<'_>],
    ) -> io::Result<()> {
        if dir == Direction::Server {
            return self.write_answer(conn, bytes);
        }
        let key = (conn, dir);
        let Some(flow) = self.flows.get_mut(&conn) else {
            return Ok(());
        };
        if flow.abandoned {
            return Ok(());
        }
        if self.open.get(&key).is_none() {
            match self.dir.reopen(&flow.name, flow.id, false) {
                Ok(file) => {
                    self.open.put(key, file);
                }
                Err(error) => {
                    abandon(&self.dir, flow, &error);
                    return Ok(());
                }
            }
        }
        if let Some(file) = self.open.get_mut(&key) {
            write_all_vectored(file, bytes)?;
        }
        flow.bytes += bytes.iter().map(|slice| slice.len() as u64).sum::<u64>();
        Ok(())
    }

    /// Appends the server's `bytes` to the connection's reverse file,
    /// created at the first of them under the first free tcpflow name.
    fn write_answer(&mut self, conn: ConnId, bytes: &[IoSlice<'_>]) -> io::Result<()> {
        let key = (conn, Direction::Server);
        let Some(flow) = self.flows.get_mut(&conn) else {
            return Ok(());
        };
        if flow.abandoned {
            return Ok(());
        }
        if let ServerFile::None = flow.server {
            let base = tcpflow_name(flow.dst, flow.src);
            let mut names = tcpflow_names(&base).map(OsString::from);
            flow.server = match self.dir.create_first_free(names.by_ref())? {
                Some((name, file, id)) => {
                    self.open.put(key, file);
                    ServerFile::Open {
                        name,
                        id,
                        bytes: 0,
                        abandoned: false,
                    }
                }
                None => {
                    tracing::warn!(
                        "the answers of connection {conn} are not dumped: {MAX_SUFFIX} names for {base} in {} are taken",
                        self.dir
                    );
                    ServerFile::Refused
                }
            };
        }
        let ServerFile::Open {
            name,
            id,
            bytes: written,
            abandoned,
        } = &mut flow.server
        else {
            return Ok(());
        };
        if *abandoned {
            return Ok(());
        }
        if self.open.get(&key).is_none() {
            match self.dir.reopen(name, *id, false) {
                Ok(file) => {
                    self.open.put(key, file);
                }
                Err(error) => {
                    *abandoned = true;
                    tracing::warn!(
                        "stopped dumping into {}: {error}",
                        self.dir.display_name(name).display()
                    );
                    return Ok(());
                }
            }
        }
        if let Some(file) = self.open.get_mut(&key) {
            write_all_vectored(file, bytes)?;
        }
        *written += bytes.iter().map(|slice| slice.len() as u64).sum::<u64>();
        Ok(())
    }

    /// Creates the connection's file and its sidecar under the first
    /// tcpflow name whose file and sidecar are both free.
    fn open_flow(
        &mut self,
        conn: ConnId,
        src: SocketAddr,
        dst: SocketAddr,
        midstream: bool,
        iface: &Iface,
    ) -> io::Result<()> {
        let base = tcpflow_name(src, dst);
        let mut names = tcpflow_names(&base).map(OsString::from);
        loop {
            let Some((name, file, id)) = self.dir.create_first_free(names.by_ref())? else {
                tracing::warn!(
                    "connection {conn} is not dumped: {MAX_SUFFIX} names for {base} in {} are taken",
                    self.dir
                );
                return Ok(());
            };
            match self.dir.create_new(&meta_name(&name)) {
                Ok((_, meta_id)) => {
                    self.open.put((conn, Direction::Client), file);
                    let flow = Flow {
                        name,
                        id,
                        meta_id,
                        src,
                        dst,
                        midstream,
                        iface: Iface::clone(iface),
                        bytes: 0,
                        server: ServerFile::None,
                        abandoned: false,
                    };
                    self.write_meta(conn, &flow, None)?;
                    self.flows.insert(conn, flow);
                    return Ok(());
                }
                // Something already has the sidecar's name: give the name
                // back and take the next one.
                Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {
                    drop(file);
                    self.dir.remove(&name, id)?;
                }
                Err(error) => return Err(error),
            }
        }
    }

    fn write_meta(&self, conn: ConnId, flow: &Flow, reason: Option<CloseReason>) -> io::Result<()> {
        let meta = Meta {
            conn,
            src: flow.src.to_string(),
            dst: flow.dst.to_string(),
            iface: &flow.iface,
            midstream: flow.midstream,
            bytes: flow.bytes,
            reason: reason.map(CloseReason::as_str),
            complete: reason.is_some_and(CloseReason::is_complete) && !flow.midstream,
            server_file: None,
            server_bytes: None,
        };
        let meta = match &flow.server {
            ServerFile::Open { name, bytes, .. } => Meta {
                server_file: Some(name.to_string_lossy().into_owned()),
                server_bytes: Some(*bytes),
                ..meta
            },
            ServerFile::None | ServerFile::Refused => meta,
        };
        let mut json = serde_json::to_vec(&meta).map_err(io::Error::other)?;
        json.push(b'\n');
        let name = meta_name(&flow.name);
        match self.dir.reopen(&name, flow.meta_id, true) {
            Ok(mut file) => file.write_all(&json),
            Err(error) => {
                tracing::warn!("the sidecar of connection {conn} is not written: {error}");
                Ok(())
            }
        }
    }
}

/// `write_all` for several buffers (std's `write_all_vectored` is not
/// stable yet).
fn write_all_vectored(file: &mut File, slices: &[IoSlice<'_>]) -> io::Result<()> {
    let mut owned = [IoSlice::new(&[]); MAX_IOVECS];
    owned[..slices.len()].copy_from_slice(slices);
    let mut rest = &mut owned[..slices.len()];
    while !rest.is_empty() {
        match file.write_vectored(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => IoSlice::advance_slices(&mut rest, written),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// Stops writing a connection whose file is no longer the one the mirror
/// created (replaced or removed by someone else).
fn abandon(dir: &OutputDir, flow: &mut Flow, error: &io::Error) {
    flow.abandoned = true;
    tracing::warn!(
        "stopped dumping into {}: {error}",
        dir.display_name(&flow.name).display()
    );
}

/// What the writer thread does with a batch of events: [`DumpWriter`], or
/// a test's sink.
pub trait BatchSink: Send + 'static {
    fn write_batch(&mut self, events: &[StreamEvent]) -> io::Result<()>;
}

impl BatchSink for DumpWriter {
    fn write_batch(&mut self, events: &[StreamEvent]) -> io::Result<()> {
        self.handle_batch(events)
    }
}

/// How much the writer thread may have queued and not yet written before
/// connections are closed as `lagged` for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Payload bytes.
    pub bytes: usize,
    /// Events (`Opened` and `Data`; a `Closed` is always queued, one per
    /// connection queued).
    pub events: usize,
}

impl QueueLimits {
    pub const DEFAULT: Self = Self {
        bytes: 64 << 20,
        events: 1 << 16,
    };
}

/// Payload bytes and events queued for the writer thread and not yet
/// written: the consumer task adds, the thread subtracts.
#[derive(Default)]
struct Queued {
    bytes: AtomicUsize,
    events: AtomicUsize,
}

/// Writes every event of `subscription` into `dir` until the mirror stops.
/// The files are written by a thread of their own; a slow disk makes only
/// this consumer lag (see [`feed_writer`]), it never slows the mirror.
pub async fn dump_events(subscription: Subscription, dir: OutputDir) -> io::Result<()> {
    feed_writer(subscription, DumpWriter::new(dir), QueueLimits::DEFAULT).await
}

/// Hands the events of `subscription` to `sink` on a thread of its own,
/// in batches, through a queue bounded by `limits`. This task never waits
/// for the thread: when the queue is full, the connections whose events
/// cannot be queued are closed for the sink as `lagged` (counted in the
/// consumer's `lags` and `lagged_connections`), and their later events are
/// dropped. Ends when the subscription ends and the thread has written
/// everything, with the thread's error if it failed.
pub async fn feed_writer<S: BatchSink>(
    mut subscription: Subscription,
    mut sink: S,
    limits: QueueLimits,
) -> io::Result<()> {
    let (batches, mut taken) = tokio::sync::mpsc::channel::<Vec<StreamEvent>>(BATCHES_IN_FLIGHT);
    // Written batches come back to be filled again: no allocation per batch
    // once the pool is warm.
    let (give_back, pool) =
        std::sync::mpsc::sync_channel::<Vec<StreamEvent>>(BATCHES_IN_FLIGHT + 2);
    let (done_tx, done) = tokio::sync::oneshot::channel::<io::Result<()>>();
    let queued = Arc::new(Queued::default());
    let thread_queued = Arc::clone(&queued);
    std::thread::Builder::new()
        .name("mirror-dump".into())
        .spawn(move || {
            let mut result = Ok(());
            while let Some(mut batch) = taken.blocking_recv() {
                result = sink.write_batch(&batch);
                let bytes: usize = batch.iter().map(StreamEvent::data_len).sum();
                let events = batch
                    .iter()
                    .filter(|event| !matches!(event, StreamEvent::Closed { .. }))
                    .count();
                thread_queued.bytes.fetch_sub(bytes, Ordering::Relaxed);
                thread_queued.events.fetch_sub(events, Ordering::Relaxed);
                batch.clear();
                let _ = give_back.try_send(batch);
                if result.is_err() {
                    break;
                }
            }
            let _ = done_tx.send(result);
        })?;

    let mut feeder = Feeder {
        limits,
        queued,
        batch: Vec::new(),
        dropped: std::collections::HashSet::new(),
        lagging: false,
    };
    loop {
        tokio::select! {
            permit = batches.reserve(), if !feeder.batch.is_empty() => {
                let Ok(permit) = permit else { break };
                let next = pool.try_recv().unwrap_or_default();
                permit.send(std::mem::replace(&mut feeder.batch, next));
            }
            event = subscription.next() => {
                let Some(event) = event else { break };
                feeder.admit(event, subscription.stats());
                while subscription.queued() > 0 {
                    if let Some(event) = subscription.next().await {
                        feeder.admit(event, subscription.stats());
                    }
                }
            }
        }
    }
    if !feeder.batch.is_empty() {
        // The thread may have failed: its result says why.
        let _ = batches.send(std::mem::take(&mut feeder.batch)).await;
    }
    drop(batches);
    done.await
        .unwrap_or_else(|_| Err(io::Error::other("the dump's writer thread panicked")))
}

/// The consumer task's side of the writer's queue.
struct Feeder {
    limits: QueueLimits,
    queued: Arc<Queued>,
    /// Events not yet handed to the thread.
    batch: Vec<StreamEvent>,
    /// Connections closed as `lagged` here, until their `Closed` comes.
    dropped: std::collections::HashSet<ConnId>,
    /// The last event was refused: one lag until one is queued again.
    lagging: bool,
}

impl Feeder {
    fn admit(&mut self, event: StreamEvent, stats: &ConsumerCounters) {
        let conn = event.conn();
        if !self.dropped.is_empty() && self.dropped.contains(&conn) {
            if matches!(event, StreamEvent::Closed { .. }) {
                self.dropped.remove(&conn);
            }
            return;
        }
        if matches!(event, StreamEvent::Closed { .. }) {
            self.batch.push(event);
            return;
        }
        let len = event.data_len();
        let bytes = self.queued.bytes.load(Ordering::Relaxed);
        let events = self.queued.events.load(Ordering::Relaxed);
        if bytes + len > self.limits.bytes || events >= self.limits.events {
            if !self.lagging {
                self.lagging = true;
                stats.lags.fetch_add(1, Ordering::Relaxed);
            }
            stats.lagged_connections.fetch_add(1, Ordering::Relaxed);
            self.dropped.insert(conn);
            if matches!(event, StreamEvent::Data { .. }) {
                self.batch.push(StreamEvent::Closed {
                    conn,
                    reason: CloseReason::Lagged,
                });
            }
            return;
        }
        self.lagging = false;
        self.queued.bytes.fetch_add(len, Ordering::Relaxed);
        self.queued.events.fetch_add(1, Ordering::Relaxed);
        self.batch.push(event);
    }
}

#[cfg(test)]
mod tests {
    use std::{
        fs,
        path::{Path, PathBuf},
    };

    use std::time::Duration;

    use super::*;
    use crate::sinks::test_events::{answer, closed, data, opened, opened_midstream};

    fn writer_in(dir: &Path) -> DumpWriter {
        DumpWriter::new(OutputDir::open_or_create(dir, None).unwrap())
    }

    /// The sidecar `name` in `dir`, parsed.
    fn sidecar(dir: &Path, name: &str) -> serde_json::Value {
        serde_json::from_slice(&fs::read(dir.join(name)).unwrap()).unwrap()
    }

    /// A file outside the dump directory, holding `precious`, for planted
    /// links to point to; the directory goes when the first value drops.
    fn victim_elsewhere() -> (tempfile::TempDir, PathBuf) {
        let elsewhere = tempfile::tempdir().unwrap();
        let victim = elsewhere.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        (elsewhere, victim)
    }

    /// A sink that writes nothing until `release` is sent to or dropped,
    /// then records what it was given.
    struct Blocked {
        release: std::sync::mpsc::Receiver<()>,
        seen: Arc<std::sync::Mutex<Vec<StreamEvent>>>,
    }

    impl BatchSink for Blocked {
        fn write_batch(&mut self, events: &[StreamEvent]) -> io::Result<()> {
            let _ = self.release.recv();
            self.seen.lock().unwrap().extend(events.iter().cloned());
            Ok(())
        }
    }

    fn consumer(
        hub: &crate::fanout::hub::Hub,
        name: &str,
    ) -> crate::fanout::counters::ConsumerSnapshot {
        let (consumers, _) = hub.consumer_totals();
        consumers.into_iter().find(|c| c.name == name).unwrap()
    }

    /// A writer that does not write (a hung disk) makes the dump lag alone:
    /// its task goes on taking events, so the hub never drops any for the
    /// other consumer, which gets every byte; the dump's connections that
    /// did not fit the queue end as `lagged`, counted, and nothing of theirs
    /// is written after the gap.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_blocked_writer_makes_only_the_dump_lag() {
        use crate::fanout::hub::{Hub, HubConfig};
        let hub = Hub::new(
            &[80],
            HubConfig {
                capacity: 4,
                max_bytes: 64 << 20,
                batch_bytes: 1 << 10,
            },
        );
        let (dump_feed, dump) = hub.subscribe(&[80], "dump-dir");
        let (print_feed, mut print) = hub.subscribe(&[80], "print");
        let (release, blocked) = std::sync::mpsc::channel();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = Blocked {
            release: blocked,
            seen: Arc::clone(&seen),
        };
        let limits = QueueLimits {
            bytes: 10 << 10,
            events: 100,
        };
        let dumping = tokio::spawn(feed_writer(dump, sink, limits));

        // 40 connections of 4 KiB each, in 240 batches: far more than the
        // hub's 4 slots, so a consumer that stopped taking would lag there.
        // Each batch is taken by both consumers before the next is sent.
        let src: SocketAddr = "198.18.0.1:40000".parse().unwrap();
        let dst: SocketAddr = "198.18.0.2:80".parse().unwrap();
        let chunk = bytes::Bytes::from(vec![b'x'; 1 << 10]);
        let mut printed = 0;
        let mut sent = 0;
        for conn in 0..40 {
            let mut events = vec![opened(conn, src, dst)];
            events.extend((0..4).map(|_| StreamEvent::Data {
                peer_acked: 0,
                dir: Default::default(),
                conn,
                bytes: chunk.clone(),
            }));
            events.push(closed(conn, CloseReason::Fin));
            for event in events {
                hub.publish(80, vec![event]);
                sent += 1;
                if let StreamEvent::Data { bytes, .. } = print.next().await.unwrap() {
                    printed += bytes.len();
                }
                let taken = tokio::time::timeout(Duration::from_secs(5), async {
                    while consumer(&hub, "dump-dir").events < sent {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                })
                .await;
                assert!(taken.is_ok(), "the dump's task stopped taking events");
            }
        }
        hub.close_all();
        drop((dump_feed, print_feed));
        assert!(print.next().await.is_none());
        assert_eq!(printed, (40 * 4) << 10, "the other consumer got every byte");
        let other = consumer(&hub, "print");
        assert_eq!((other.lags, other.lagged_connections), (0, 0));

        // The writer is still blocked, yet the dump's task took everything:
        // at most 10 KiB fit the queue, the rest was closed as lagged.
        let stats = consumer(&hub, "dump-dir");
        assert_eq!(
            stats.bytes,
            (40 * 4) << 10,
            "the hub dropped nothing for it"
        );
        assert!(stats.lags >= 1, "{stats:?}");
        assert!(
            (37..=40).contains(&stats.lagged_connections),
            "{stats:?}: no more than 3 connections fit 10 KiB"
        );

        drop(release);
        dumping.await.unwrap().unwrap();
        let seen = seen.lock().unwrap();
        let mut lagged = 0;
        let mut written = HashMap::<ConnId, usize>::new();
        for event in seen.iter() {
            match event {
                StreamEvent::Data { conn, bytes, .. } => {
                    *written.entry(*conn).or_default() += bytes.len();
                }
                StreamEvent::Closed { conn, reason } => {
                    let bytes = written.get(conn).copied().unwrap_or(0);
                    if *reason == CloseReason::Lagged {
                        lagged += 1;
                        assert!(bytes < 4 << 10, "connection {conn} lagged with every byte");
                    } else {
                        assert_eq!(bytes, 4 << 10, "connection {conn} closed as {reason:?}");
                    }
                }
                StreamEvent::Opened { .. } => {}
            }
        }
        let total: usize = written.values().sum();
        assert!(total <= 10 << 10, "{total} bytes queued past the limit");
        assert!(lagged >= 1, "a lagged connection's file says so");
    }

    #[test]
    fn names_follow_tcpflow() {
        assert_eq!(
            tcpflow_name(
                "198.18.0.1:40000".parse().unwrap(),
                "198.18.0.2:80".parse().unwrap()
            ),
            "198.018.000.001.40000-198.018.000.002.00080"
        );
        assert_eq!(
            tcpflow_name(
                "[2001:db8::1]:1".parse().unwrap(),
                "[::1]:80".parse().unwrap()
            ),
            "2001:0db8:0000:0000:0000:0000:0000:0001.00001-0000:0000:0000:0000:0000:0000:0000:0001.00080"
        );
    }

    #[test]
    fn writes_streams_and_sidecars() {
        writes_streams_and_sidecars_by(false);
    }

    #[test]
    fn writes_streams_and_sidecars_in_batches() {
        writes_streams_and_sidecars_by(true);
    }

    fn writes_streams_and_sidecars_by(batch: bool) {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = writer_in(dir.path());
        let src: SocketAddr = "198.18.0.1:40000".parse().unwrap();
        let dst: SocketAddr = "198.18.0.2:80".parse().unwrap();
        let events = [
            opened(1, src, dst),
            data(1, b"hel"),
            data(1, b"lo "),
            opened_midstream(2, src, dst),
            data(1, b"world"),
            data(2, b"tail"),
            closed(1, CloseReason::Fin),
            closed(2, CloseReason::Gap),
        ];
        if batch {
            writer.handle_batch(&events).unwrap();
        } else {
            for event in &events {
                writer.handle(event).unwrap();
            }
        }
        let name = tcpflow_name(src, dst);
        assert_eq!(fs::read(dir.path().join(&name)).unwrap(), b"hello world");
        assert_eq!(
            fs::read(dir.path().join(format!("{name}c1"))).unwrap(),
            b"tail"
        );
        let meta = sidecar(dir.path(), &format!("{name}.meta"));
        assert_eq!(meta["reason"], "fin");
        assert_eq!(meta["complete"], true);
        assert_eq!(meta["bytes"], 11);
        let meta = sidecar(dir.path(), &format!("{name}c1.meta"));
        assert_eq!(meta["reason"], "gap");
        assert_eq!(meta["complete"], false);
        assert!(meta.get("server_file").is_none(), "no answers: {meta}");
    }

    #[test]
    fn answers_go_to_the_reverse_file_with_one_sidecar() {
        for batch in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let mut writer = writer_in(dir.path());
            let src: SocketAddr = "198.18.0.1:40000".parse().unwrap();
            let dst: SocketAddr = "198.18.0.2:80".parse().unwrap();
            let events = [
                opened(1, src, dst),
                data(1, b"GET "),
                answer(1, b"HTTP"),
                data(1, b"/"),
                answer(1, b"/1.1"),
                answer(1, b" 200"),
                closed(1, CloseReason::Fin),
            ];
            if batch {
                writer.handle_batch(&events).unwrap();
            } else {
                for event in &events {
                    writer.handle(event).unwrap();
                }
            }
            let name = tcpflow_name(src, dst);
            let reverse = tcpflow_name(dst, src);
            assert_eq!(fs::read(dir.path().join(&name)).unwrap(), b"GET /");
            assert_eq!(
                fs::read(dir.path().join(&reverse)).unwrap(),
                b"HTTP/1.1 200"
            );
            let meta = sidecar(dir.path(), &format!("{name}.meta"));
            assert_eq!(meta["reason"], "fin");
            assert_eq!(meta["bytes"], 5);
            assert_eq!(meta["server_file"], reverse.as_str());
            assert_eq!(meta["server_bytes"], 12);
            assert!(!dir.path().join(format!("{reverse}.meta")).exists());
        }
    }

    #[test]
    fn a_run_longer_than_one_writev_is_written_in_order() {
        const DIGITS: &[u8] = b"0123456789";
        let dir = tempfile::tempdir().unwrap();
        let mut writer = writer_in(dir.path());
        let src: SocketAddr = "198.18.0.1:40000".parse().unwrap();
        let dst: SocketAddr = "198.18.0.2:80".parse().unwrap();
        let mut events = vec![opened(1, src, dst)];
        events.extend((0..3 * MAX_IOVECS + 5).map(|n| data(1, &DIGITS[n % 10..n % 10 + 1])));
        events.push(closed(1, CloseReason::Fin));
        writer.handle_batch(&events).unwrap();
        let expected: Vec<u8> = (0..3 * MAX_IOVECS + 5).map(|n| DIGITS[n % 10]).collect();
        let name = tcpflow_name(src, dst);
        assert_eq!(fs::read(dir.path().join(&name)).unwrap(), expected);
        let meta = sidecar(dir.path(), &format!("{name}.meta"));
        assert_eq!(meta["bytes"], expected.len());
    }

    #[test]
    fn more_connections_than_open_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = writer_in(dir.path());
        let dst: SocketAddr = "198.18.0.2:80".parse().unwrap();
        let count = OPEN_FILES as u64 + 10;
        for conn in 0..count {
            let src = SocketAddr::from(([198, 18, 0, 1], 10000 + conn as u16));
            writer.handle(&opened(conn, src, dst)).unwrap();
        }
        for conn in 0..count {
            writer.handle(&data(conn, b"ab")).unwrap();
            writer.handle(&data(conn, b"cd")).unwrap();
        }
        let src = SocketAddr::from(([198, 18, 0, 1], 10000));
        assert_eq!(
            fs::read(dir.path().join(tcpflow_name(src, dst))).unwrap(),
            b"abcd"
        );
        assert!(writer.open.len() <= OPEN_FILES);
    }

    #[test]
    fn planted_names_are_skipped_and_never_followed() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let (elsewhere, victim) = victim_elsewhere();
        let src: SocketAddr = "198.18.0.1:40000".parse().unwrap();
        let dst: SocketAddr = "198.18.0.2:80".parse().unwrap();
        let name = tcpflow_name(src, dst);
        // A dangling symlink at the first name, symlinks at the next
        // names' sidecars.
        let dangling = elsewhere.path().join("created-through-a-link");
        symlink(&dangling, dir.path().join(&name)).unwrap();
        symlink(&victim, dir.path().join(format!("{name}.meta"))).unwrap();
        symlink(&victim, dir.path().join(format!("{name}c1.meta"))).unwrap();

        let mut writer = writer_in(dir.path());
        for event in [
            opened(1, src, dst),
            data(1, b"stream"),
            closed(1, CloseReason::Fin),
        ] {
            writer.handle(&event).unwrap();
        }

        assert_eq!(
            fs::read(&victim).unwrap(),
            b"precious",
            "nothing written through a link"
        );
        assert!(
            !dangling.exists(),
            "nothing created through a dangling link"
        );
        assert!(
            !dir.path().join(format!("{name}c1")).exists(),
            "a name whose sidecar is taken is given back"
        );
        let file = dir.path().join(format!("{name}c2"));
        assert_eq!(fs::read(&file).unwrap(), b"stream");
        let meta = sidecar(dir.path(), &format!("{name}c2.meta"));
        assert_eq!(meta["reason"], "fin");
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        for link in [
            name.clone(),
            format!("{name}.meta"),
            format!("{name}c1.meta"),
        ] {
            assert!(
                fs::symlink_metadata(dir.path().join(&link))
                    .unwrap()
                    .file_type()
                    .is_symlink(),
                "{link} left as it was"
            );
        }
    }

    #[test]
    fn a_file_swapped_after_eviction_is_not_followed() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let (_elsewhere, victim) = victim_elsewhere();
        let mut writer = writer_in(dir.path());
        let dst: SocketAddr = "198.18.0.2:80".parse().unwrap();
        let src = |conn: u64| SocketAddr::from(([198, 18, 0, 1], 10000 + conn as u16));
        let count = OPEN_FILES as u64 + 1;
        for conn in 0..count {
            writer.handle(&opened(conn, src(conn), dst)).unwrap();
            writer.handle(&data(conn, b"ab")).unwrap();
        }
        // Connection 0's file left the open-file cache; replace it.
        let first = dir.path().join(tcpflow_name(src(0), dst));
        fs::remove_file(&first).unwrap();
        symlink(&victim, &first).unwrap();
        // And connection 1's by another regular file of the same name.
        let second = dir.path().join(tcpflow_name(src(1), dst));
        fs::remove_file(&second).unwrap();
        fs::write(&second, b"planted").unwrap();
        for conn in 0..count {
            writer.handle(&data(conn, b"cd")).unwrap();
            writer.handle(&closed(conn, CloseReason::Fin)).unwrap();
        }
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert_eq!(fs::read(&second).unwrap(), b"planted");
        let third = dir.path().join(tcpflow_name(src(2), dst));
        assert_eq!(fs::read(third).unwrap(), b"abcd", "the others go on");
    }

    #[test]
    fn directories_others_may_write_are_refused() {
        use std::os::unix::fs::{PermissionsExt as _, symlink};
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        fs::create_dir(&shared).unwrap();
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o777)).unwrap();
        let error = OutputDir::open_or_create(&shared, None).unwrap_err();
        assert!(
            error.to_string().contains("may be written by other users"),
            "{error}"
        );
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o1777)).unwrap();
        OutputDir::open_or_create(&shared, None).expect("the sticky bit makes it safe");

        let link = dir.path().join("link");
        symlink(&shared, &link).unwrap();
        let error = OutputDir::open_or_create(&link, None).unwrap_err();
        assert!(error.to_string().contains("symbolic link"), "{error}");

        let created = dir.path().join("new");
        OutputDir::open_or_create(&created, None).unwrap();
        assert_eq!(
            fs::metadata(&created).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let error = OutputDir::open_or_create(&dir.path().join("a/b"), None).unwrap_err();
        assert!(
            error.to_string().contains("parent does not exist"),
            "{error}"
        );
    }
}

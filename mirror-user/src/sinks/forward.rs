//! `--forward [PORT=]HOST:PORT`: replays each mirrored connection's
//! client-to-server bytes to another address (a staging copy of the
//! service), as GoReplay and tcpcopy do, for any TCP protocol.
//!
//! Per target, one hub consumer: every sampled connection gets its own
//! connection to the target and task; its bytes are written in order, the
//! target's answers are read and discarded, `fin` half-closes, every other
//! end aborts (RST). Each connection's queue is bounded: a target that
//! cannot keep up costs its shadow connections (aborted, counted), never
//! the mirror, the service or other consumers. Connection attempts retry
//! with backoff; a target that keeps failing is left alone for a growing
//! while (up to [`MAX_BACKOFF`]), then tried again.
//!
//! With `--compare` the shadow's answers are read into a
//! [`Comparator`](super::compare::Comparator) instead, beside the
//! production server's answers from the hub, and each shadow connection
//! ends with a result: counted, and a line of `--compare-report`.

use std::{
    collections::HashMap,
    fmt,
    hash::{BuildHasher, BuildHasherDefault, DefaultHasher},
    net::SocketAddr,
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpStream, tcp::OwnedReadHalf},
    sync::mpsc,
    task::{JoinHandle, JoinSet},
};

use crate::{
    fanout::subscription::Subscription,
    flow::model::{CloseReason, ConnId, Direction, StreamEvent},
    sinks::{
        compare::{Budget, Comparator, Incomplete, ShadowEnd, TARGET_BUDGET, Verdict},
        compare_report::{self, ReportSink},
    },
    telemetry::registry::Stage,
};

/// Events queued per shadow connection: a backstop only, the byte budget
/// (which counts [`EVENT_COST`] per event) is what binds. A request
/// stream of tiny events (redis-benchmark with one connection: ~50k
/// events/s) overflowed 256 events whenever the shadow's task waited a few
/// milliseconds for a CPU on a loaded 2-core machine.
const CONNECTION_QUEUE: usize = 1 << 16;
/// What a queued event costs beside its payload: its queue slot and its
/// `Bytes` handle, rounded up.
const EVENT_COST: usize = 64;
/// Bytes queued per shadow connection (payload plus [`EVENT_COST`] per
/// event) before it is aborted as too slow: about what a socket's send
/// buffer takes (Linux's default `tcp_wmem` maximum is 4 MiB), so a target
/// that keeps up absorbs bursts and one that does not costs its
/// connection, not the node's memory.
const CONNECTION_QUEUE_BYTES: usize = 4 << 20;
/// Payload bytes queued for one target, all its shadow connections
/// together: bounds the forwarder's memory below `--forward-max-conns`
/// times [`CONNECTION_QUEUE_BYTES`]. A connection whose bytes do not fit
/// is aborted as too slow.
const TARGET_QUEUE_BYTES: usize = 64 << 20;
/// Attempts to connect one shadow connection.
const CONNECT_ATTEMPTS: u32 = 3;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// Longest pause of a target that keeps failing.
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How long a write to the target may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// After a half-close, how long to wait for the target to finish.
const LINGER: Duration = Duration::from_secs(10);

/// A `--forward` value: `[PORT=]HOST:PORT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardTarget {
    /// Only connections to this mirrored port; `None`: every port.
    pub port: Option<u16>,
    pub addr: SocketAddr,
}

impl FromStr for ForwardTarget {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!(
                "'{text}' is not a forward target: use IP:PORT, or PORT=IP:PORT to forward one mirrored port"
            )
        };
        let (port, addr) = match text.split_once('=') {
            Some((port, addr)) => {
                let port: u16 = port.trim().parse().map_err(|_| bad())?;
                if port == 0 {
                    return Err(bad());
                }
                (Some(port), addr)
            }
            None => (None, text),
        };
        let addr = addr.trim().parse().map_err(|_| bad())?;
        Ok(Self { port, addr })
    }
}

impl fmt::Display for ForwardTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(port) => write!(f, "{port}={}", self.addr),
            None => write!(f, "{}", self.addr),
        }
    }
}

/// Settings shared by every target.
#[derive(Debug, Clone, Copy)]
pub struct ForwardConfig {
    /// Shadow connections open at once, per target; more are skipped.
    pub max_connections: usize,
    /// Percentage of connections forwarded, chosen by hash of the 4-tuple.
    pub sample_percent: u8,
}

/// `--compare`: what every target's forwarder needs.
#[derive(Debug, Clone)]
pub struct CompareConfig {
    /// `--compare-timeout`.
    pub timeout: Duration,
    /// `--compare-report`; `None`: results are only counted.
    pub report: Option<ReportSink>,
}

/// Counters of one target.
#[derive(Debug, Default)]
pub struct ForwardCounters {
    /// Shadow connections established.
    pub opened: AtomicU64,
    /// Ended with the client's FIN, every byte written.
    pub completed: AtomicU64,
    /// Could not connect (after retries, or while the target was paused).
    pub failed: AtomicU64,
    /// Aborted, by the mirrored connection's close reason.
    pub aborted: [AtomicU64; CloseReason::ALL.len()],
    /// Aborted because the target did not take the bytes fast enough, or
    /// failed while writing.
    pub aborted_target: AtomicU64,
    pub skipped_sample: AtomicU64,
    pub skipped_limit: AtomicU64,
    /// Connections picked up midstream are not replayed: their first bytes
    /// are not the start of the client's stream.
    pub skipped_midstream: AtomicU64,
    pub bytes_written: AtomicU64,
    /// `--compare` results: same, differs, incomplete.
    pub compared: [AtomicU64; 3],
    /// Report lines dropped: the report's queue was full, or writing it
    /// failed.
    pub report_dropped: AtomicU64,
}

impl ForwardCounters {
    fn count_result(&self, verdict: &Verdict) {
        let index = match verdict {
            Verdict::Same => 0,
            Verdict::Differs { .. } => 1,
            Verdict::Incomplete(_) => 2,
        };
        self.compared[index].fetch_add(1, Ordering::Relaxed);
    }

    /// The target's entry in the `forward` section.
    pub fn snapshot(&self, target: &ForwardTarget) -> ForwardSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ForwardSnapshot {
            name: target.to_string(),
            opened: get(&self.opened),
            completed: get(&self.completed),
            failed: get(&self.failed),
            aborted: Aborted {
                by_reason: CloseReason::ALL.map(|reason| get(&self.aborted[reason as usize])),
                target: get(&self.aborted_target),
            },
            skipped: Skipped {
                sample: get(&self.skipped_sample),
                limit: get(&self.skipped_limit),
                midstream: get(&self.skipped_midstream),
            },
            bytes_written: get(&self.bytes_written),
            compared: Compared {
                same: get(&self.compared[0]),
                differs: get(&self.compared[1]),
                incomplete: get(&self.compared[2]),
            },
            report_dropped: get(&self.report_dropped),
        }
    }
}

/// [`ForwardCounters`] of one target at one moment.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ForwardSnapshot {
    /// The target, `IP:PORT`.
    pub name: String,
    pub opened: u64,
    pub completed: u64,
    pub failed: u64,
    pub aborted: Aborted,
    pub skipped: Skipped,
    pub bytes_written: u64,
    /// `--compare` results.
    pub compared: Compared,
    pub report_dropped: u64,
}

/// Compared shadow connections, by result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Compared {
    pub same: u64,
    pub differs: u64,
    pub incomplete: u64,
}

/// Aborted shadow connections: by the mirrored connection's close reason,
/// and `target` for the target's own failures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Aborted {
    pub by_reason: [u64; CloseReason::ALL.len()],
    pub target: u64,
}

impl serde::Serialize for Aborted {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(CloseReason::ALL.len() + 1))?;
        for (reason, count) in CloseReason::ALL.iter().zip(self.by_reason) {
            map.serialize_entry(reason.as_str(), &count)?;
        }
        map.serialize_entry("target", &self.target)?;
        map.end()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Skipped {
    pub sample: u64,
    pub limit: u64,
    pub midstream: u64,
}

/// Every target's counters: the `forward` section.
#[derive(Debug, Default)]
pub struct ForwardTargets(pub Vec<(ForwardTarget, Arc<ForwardCounters>)>);

impl Stage for ForwardTargets {
    type Snapshot = Vec<ForwardSnapshot>;

    fn snapshot(&self) -> Vec<ForwardSnapshot> {
        self.0
            .iter()
            .map(|(target, counters)| counters.snapshot(target))
            .collect()
    }
}

/// Whether a connection is forwarded: a stable choice per 4-tuple, so a
/// sampled connection is forwarded whole.
pub fn sampled(src: SocketAddr, dst: SocketAddr, percent: u8) -> bool {
    if percent >= 100 {
        return true;
    }
    let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one((src, dst));
    hash % 100 < u64::from(percent)
}

/// When the target may be tried again, after failures.
#[derive(Default)]
struct Health {
    paused_until: Option<Instant>,
    backoff: Duration,
}

enum Command {
    Data(Bytes),
    Finish,
    Abort(CloseReason),
}

/// Payload bytes queued for a shadow connection and for its whole target.
struct Queued {
    connection: AtomicUsize,
    target: Arc<AtomicUsize>,
}

impl Queued {
    /// Counts `len` more bytes if both budgets allow them. Only the
    /// target's consumer loop reserves (shadow tasks only release), so a
    /// check and then an add cannot overshoot.
    fn reserve(&self, len: usize) -> bool {
        if self.connection.load(Ordering::Relaxed) + len > CONNECTION_QUEUE_BYTES
            || self.target.load(Ordering::Relaxed) + len > TARGET_QUEUE_BYTES
        {
            return false;
        }
        self.connection.fetch_add(len, Ordering::Relaxed);
        self.target.fetch_add(len, Ordering::Relaxed);
        true
    }

    fn release(&self, len: usize) {
        self.connection.fetch_sub(len, Ordering::Relaxed);
        self.target.fetch_sub(len, Ordering::Relaxed);
    }
}

impl Drop for Queued {
    /// Whatever the connection still had queued leaves the target's budget.
    fn drop(&mut self) {
        let left = self.connection.swap(0, Ordering::Relaxed);
        self.target.fetch_sub(left, Ordering::Relaxed);
    }
}

/// A shadow connection as the consumer loop sees it.
struct ShadowQueue {
    commands: mpsc::Sender<Command>,
    queued: Arc<Queued>,
    /// `--compare`: fed with production's answers here, with the shadow's
    /// by the shadow task.
    compared: Option<Arc<Mutex<Comparator>>>,
}

/// What a shadow task needs to compare and report its connection.
struct CompareTask {
    comparator: Arc<Mutex<Comparator>>,
    timeout: Duration,
    report: Option<ReportSink>,
    conn: ConnId,
    src: SocketAddr,
    dst: SocketAddr,
    target: ForwardTarget,
}

impl CompareTask {
    /// Counts the result (`otherwise` if it is not settled) and writes its
    /// report line.
    fn finish(self, stats: &ForwardCounters, otherwise: Incomplete) {
        let outcome = self.comparator.lock().outcome(otherwise);
        stats.count_result(&outcome.verdict);
        if let Some(report) = &self.report {
            // Named as in the counters (`PORT=IP:PORT` for one port's).
            let target = self.target.to_string();
            let line = compare_report::line(self.conn, self.src, self.dst, &target, &outcome);
            if !report.send(line) {
                stats.report_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Replays the connections of `subscription` to `target` until the mirror
/// stops; with `compare`, compares the answers too.
pub async fn forward(
    subscription: Subscription,
    target: ForwardTarget,
    config: ForwardConfig,
    compare: Option<CompareConfig>,
    stats: Arc<ForwardCounters>,
) -> std::io::Result<()> {
    // A shadow server gets the client's requests; the real server's
    // answers are never replayed, only compared.
    let mut subscription = if compare.is_some() {
        subscription
    } else {
        subscription.client_only()
    };
    let health = Arc::new(Mutex::new(Health::default()));
    let active = Arc::new(AtomicUsize::new(0));
    let queued_for_target = Arc::new(AtomicUsize::new(0));
    let budget = Arc::new(Budget::new(TARGET_BUDGET));
    let mut connections: HashMap<ConnId, ShadowQueue> = HashMap::new();
    let mut tasks = JoinSet::new();
    while let Some(event) = subscription.next().await {
        match event {
            StreamEvent::Opened {
                iface: _,
                conn,
                src,
                dst,
                midstream,
            } => {
                if target.port.is_some_and(|port| port != dst.port()) {
                    // PORT=: another mirrored port's connection.
                } else if midstream {
                    stats.skipped_midstream.fetch_add(1, Ordering::Relaxed);
                } else if !sampled(src, dst, config.sample_percent) {
                    stats.skipped_sample.fetch_add(1, Ordering::Relaxed);
                } else if active.load(Ordering::Relaxed) >= config.max_connections {
                    stats.skipped_limit.fetch_add(1, Ordering::Relaxed);
                } else {
                    let (commands, queue) = mpsc::channel(CONNECTION_QUEUE);
                    let queued = Arc::new(Queued {
                        connection: AtomicUsize::new(0),
                        target: Arc::clone(&queued_for_target),
                    });
                    active.fetch_add(1, Ordering::Relaxed);
                    let compare = compare.as_ref().map(|compare| CompareTask {
                        comparator: Arc::new(Mutex::new(Comparator::new(&budget))),
                        timeout: compare.timeout,
                        report: compare.report.clone(),
                        conn,
                        src,
                        dst,
                        target,
                    });
                    let compared = compare.as_ref().map(|c| Arc::clone(&c.comparator));
                    // Reaps the tasks that ended, so the set stays small.
                    while tasks.try_join_next().is_some() {}
                    tasks.spawn(shadow(
                        target.addr,
                        queue,
                        Arc::clone(&queued),
                        Arc::clone(&stats),
                        Arc::clone(&health),
                        Arc::clone(&active),
                        compare,
                    ));
                    connections.insert(
                        conn,
                        ShadowQueue {
                            commands,
                            queued,
                            compared,
                        },
                    );
                }
            }
            StreamEvent::Data {
                conn,
                bytes,
                dir: Direction::Server,
                ..
            } => {
                if let Some(compared) = connections.get(&conn).and_then(|s| s.compared.as_ref()) {
                    compared.lock().production(&bytes);
                }
            }
            StreamEvent::Data { conn, bytes, .. } => {
                let Some(shadow) = connections.get(&conn) else {
                    continue;
                };
                let len = bytes.len() + EVENT_COST;
                let sent = shadow.queued.reserve(len)
                    && match shadow.commands.try_send(Command::Data(bytes)) {
                        Ok(()) => true,
                        Err(_) => {
                            shadow.queued.release(len);
                            false
                        }
                    };
                if !sent {
                    // Too slow (or gone): dropping the sender aborts it.
                    if let Some(compared) = connections.remove(&conn).and_then(|s| s.compared) {
                        compared.lock().fail(Incomplete::ShadowTooSlow);
                    }
                    stats.aborted_target.fetch_add(1, Ordering::Relaxed);
                }
            }
            StreamEvent::Closed { conn, reason } => {
                if let Some(shadow) = connections.remove(&conn) {
                    if let Some(compared) = &shadow.compared {
                        compared.lock().production_ended(reason);
                    }
                    let command = if reason == CloseReason::Fin {
                        Command::Finish
                    } else {
                        Command::Abort(reason)
                    };
                    if shadow.commands.try_send(command).is_err() {
                        if let Some(compared) = &shadow.compared {
                            compared.lock().fail(Incomplete::ShadowTooSlow);
                        }
                        stats.aborted_target.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
    drop(connections);
    if compare.is_some() {
        // Their results belong in the final counters and the report: the
        // shadows get a bounded while to finish.
        let finished = async { while tasks.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(LINGER + WRITE_TIMEOUT, finished).await;
    }
    // The others finish on their own (their ends are counted as they come).
    tasks.detach_all();
    Ok(())
}

/// One shadow connection: connect, write in order, discard or compare
/// the answers.
async fn shadow(
    addr: SocketAddr,
    mut queue: mpsc::Receiver<Command>,
    queued: Arc<Queued>,
    stats: Arc<ForwardCounters>,
    health: Arc<Mutex<Health>>,
    active: Arc<AtomicUsize>,
    compare: Option<CompareTask>,
) {
    let _active = ActiveGuard(active);
    let Some(stream) = connect(addr, &health).await else {
        stats.failed.fetch_add(1, Ordering::Relaxed);
        if let Some(compare) = compare {
            compare.finish(&stats, Incomplete::ShadowUnreachable);
        }
        return;
    };
    stats.opened.fetch_add(1, Ordering::Relaxed);
    let (reader, mut writer) = stream.into_split();
    let mut answers = read_answers(reader, compare.as_ref().map(|c| Arc::clone(&c.comparator)));
    let otherwise = loop {
        match queue.recv().await {
            Some(Command::Data(bytes)) => {
                let written = tokio::time::timeout(WRITE_TIMEOUT, writer.write_all(&bytes)).await;
                queued.release(bytes.len() + EVENT_COST);
                match written {
                    Ok(Ok(())) => {
                        stats
                            .bytes_written
                            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    }
                    Ok(Err(_)) => {
                        stats.aborted_target.fetch_add(1, Ordering::Relaxed);
                        break Incomplete::ShadowReset;
                    }
                    Err(_) => {
                        stats.aborted_target.fetch_add(1, Ordering::Relaxed);
                        break Incomplete::ShadowTooSlow;
                    }
                }
            }
            Some(Command::Finish) => {
                if let Some(compare) = &compare {
                    // The client closed once it had its answers: the shadow
                    // gets as long (some servers, redis among them, drop
                    // answers not sent yet when they read the end).
                    shadow_caught_up(&compare.comparator, &answers, compare.timeout).await;
                }
                // Half-close like the client did, and let the target
                // answer before closing.
                let _ = writer.shutdown().await;
                match &compare {
                    Some(compare) => {
                        last_answers(&compare.comparator, &mut answers, compare.timeout).await;
                    }
                    None => {
                        let _ = tokio::time::timeout(LINGER, &mut answers).await;
                    }
                }
                answers.abort();
                stats.completed.fetch_add(1, Ordering::Relaxed);
                if let Some(compare) = compare {
                    compare.finish(&stats, Incomplete::ShadowTimeout);
                }
                return;
            }
            Some(Command::Abort(reason)) => {
                stats.aborted[reason as usize].fetch_add(1, Ordering::Relaxed);
                break Incomplete::Production(reason);
            }
            // The consumer dropped it: too slow, or the mirror stopped.
            None => break Incomplete::Shutdown,
        }
    };
    // An incomplete stream must not look complete to the target: reset
    // the connection instead of closing it in order.
    let _ = socket2::SockRef::from(writer.as_ref()).set_linger(Some(Duration::ZERO));
    // Dropping the write half would send a FIN first; the socket closes
    // (with the reset) when the reader, in the cancelled task, is dropped.
    writer.forget();
    answers.abort();
    if let Some(compare) = compare {
        compare.finish(&stats, otherwise);
    }
}

/// Reads the target's answers until it closes: into `comparator`, or
/// discarded.
fn read_answers(
    mut reader: OwnedReadHalf,
    comparator: Option<Arc<Mutex<Comparator>>>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let end = match reader.read(&mut buf).await {
                Ok(0) => ShadowEnd::Eof,
                Ok(n) => {
                    if let Some(comparator) = &comparator {
                        comparator.lock().shadow(&buf[..n]);
                    }
                    continue;
                }
                Err(_) => ShadowEnd::Reset,
            };
            if let Some(comparator) = &comparator {
                comparator.lock().shadow_ended(end);
            }
            return;
        }
    })
}

/// How often [`shadow_caught_up`] looks.
const CATCH_UP_POLL: Duration = Duration::from_millis(10);

/// Before the half-close: waits until the shadow answered as many bytes as
/// production, or closed, or sent nothing for `quiet`.
async fn shadow_caught_up(
    comparator: &Mutex<Comparator>,
    answers: &JoinHandle<()>,
    quiet: Duration,
) {
    let mut seen = comparator.lock().shadow_bytes();
    let mut since = Instant::now();
    while !comparator.lock().caught_up() && !answers.is_finished() {
        let now = Instant::now();
        let bytes = comparator.lock().shadow_bytes();
        if bytes != seen {
            (seen, since) = (bytes, now);
        } else if now.duration_since(since) >= quiet {
            return;
        }
        tokio::time::sleep(CATCH_UP_POLL).await;
    }
}

/// After the half-close: waits until the shadow closes, or stays quiet for
/// `quiet` (its answers are then taken as ended), or the comparison is
/// settled; [`LINGER`] (or twice `quiet`) at most.
async fn last_answers(
    comparator: &Mutex<Comparator>,
    answers: &mut JoinHandle<()>,
    quiet: Duration,
) {
    let deadline = Instant::now() + LINGER.max(quiet * 2);
    loop {
        let (settled, seen) = {
            let comparator = comparator.lock();
            (comparator.is_settled(), comparator.shadow_bytes())
        };
        if settled {
            return;
        }
        if tokio::time::timeout(quiet, &mut *answers).await.is_ok() {
            // The reader recorded how the answers ended.
            return;
        }
        let mut comparator = comparator.lock();
        if comparator.shadow_bytes() == seen || Instant::now() >= deadline {
            comparator.shadow_ended(ShadowEnd::Quiet);
            return;
        }
    }
}

struct ActiveGuard(Arc<AtomicUsize>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Connects with retries; `None` when the target is paused or keeps
/// failing (which pauses it for longer).
async fn connect(addr: SocketAddr, health: &Mutex<Health>) -> Option<TcpStream> {
    let paused = health
        .lock()
        .paused_until
        .is_some_and(|until| Instant::now() < until);
    if paused {
        return None;
    }
    let mut backoff = FIRST_BACKOFF;
    for attempt in 1..=CONNECT_ATTEMPTS {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                let mut health = health.lock();
                health.paused_until = None;
                health.backoff = Duration::ZERO;
                return Some(stream);
            }
            Ok(Err(error)) => {
                tracing::debug!(
                    "cannot connect to the forward target {addr} (attempt {attempt}): {error}"
                );
            }
            Err(_) => tracing::debug!("connecting to the forward target {addr} timed out"),
        }
        if attempt < CONNECT_ATTEMPTS {
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
    }
    let mut health = health.lock();
    health.backoff = (health.backoff * 2).clamp(FIRST_BACKOFF, MAX_BACKOFF);
    health.paused_until = Some(Instant::now() + health.backoff);
    tracing::warn!(
        "the forward target {addr} refuses connections; pausing it for {:?}",
        health.backoff
    );
    None
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;
    use crate::{
        fanout::hub::{Hub, HubConfig},
        sinks::test_events::{closed, data, opened, opened_midstream},
    };

    /// A listening target, and its `--forward` value.
    async fn listening_target() -> (TcpListener, ForwardTarget) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = ForwardTarget {
            port: None,
            addr: listener.local_addr().unwrap(),
        };
        (listener, target)
    }

    /// A forwarder to `target` of every connection (up to eight at once)
    /// that the returned hub publishes on port 80; its channel holds
    /// `capacity` events.
    fn start_forward(
        target: ForwardTarget,
        capacity: usize,
    ) -> (
        Hub,
        Arc<ForwardCounters>,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ) {
        start_forward_with(target, capacity, None)
    }

    fn start_forward_with(
        target: ForwardTarget,
        capacity: usize,
        compare: Option<CompareConfig>,
    ) -> (
        Hub,
        Arc<ForwardCounters>,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ) {
        let hub = Hub::new(
            &[80],
            HubConfig {
                capacity,
                max_bytes: 1 << 30,
                batch_bytes: 1 << 16,
            },
        );
        let (_, subscription) = hub.subscribe(&[80], "forward");
        let stats = Arc::new(ForwardCounters::default());
        let config = ForwardConfig {
            max_connections: 8,
            sample_percent: 100,
        };
        let task = tokio::spawn(forward(
            subscription,
            target,
            config,
            compare,
            Arc::clone(&stats),
        ));
        (hub, stats, task)
    }

    /// Closes the hub's channels; the forwarder must then end cleanly.
    async fn stop_forward(hub: Hub, task: tokio::task::JoinHandle<std::io::Result<()>>) {
        hub.close_all();
        drop(hub);
        task.await.unwrap().unwrap();
    }

    /// Waits (at most `limit`) until `done`; panics with `what` otherwise.
    async fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + limit;
        while !done() {
            assert!(Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[test]
    fn targets_parse() {
        let t: ForwardTarget = "198.18.1.2:80".parse().unwrap();
        assert_eq!(
            (t.port, t.addr.to_string()),
            (None, "198.18.1.2:80".to_owned())
        );
        let t: ForwardTarget = "8080=[2001:db8::2]:80".parse().unwrap();
        assert_eq!(t.port, Some(8080));
        assert_eq!(t.to_string(), "8080=[2001:db8::2]:80");
        for bad in ["", "host", "0=1.2.3.4:80", "x=1.2.3.4:80", "1.2.3.4"] {
            assert!(bad.parse::<ForwardTarget>().is_err(), "{bad}");
        }
    }

    #[test]
    fn sampling_is_stable_and_near_the_percentage() {
        let dst: SocketAddr = "198.18.0.2:80".parse().unwrap();
        let picked = (0..10_000)
            .filter(|i| {
                let src = SocketAddr::from(([198, 18, 0, 1], 10_000 + *i as u16));
                let first = sampled(src, dst, 50);
                assert_eq!(first, sampled(src, dst, 50), "stable");
                first
            })
            .count();
        assert!((4500..5500).contains(&picked), "{picked}");
        let src = SocketAddr::from(([198, 18, 0, 1], 1));
        assert!(sampled(src, dst, 100));
        assert!(!sampled(src, dst, 0));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn streams_are_replayed_and_ends_honoured() {
        let (listener, target) = listening_target().await;
        // The target keeps what each connection sends, and how it ended.
        let server = tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..2 {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut bytes = Vec::new();
                let ended = socket.read_to_end(&mut bytes).await;
                got.push((bytes, ended.is_ok()));
            }
            got.sort();
            got
        });
        let (hub, stats, task) = start_forward(target, 64);
        let src = |port| SocketAddr::from(([198, 18, 0, 1], port));
        let dst: SocketAddr = "198.18.0.2:80".parse().unwrap();
        hub.publish(
            80,
            vec![
                opened(1, src(1000), dst),
                opened(2, src(1001), dst),
                opened_midstream(3, src(1002), dst),
                data(1, b"GET /a HTTP/1.1\r\n"),
                data(2, b"GET /b"),
                data(1, b"\r\n"),
                closed(1, CloseReason::Fin),
                closed(2, CloseReason::Gap),
            ],
        );
        let got = tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .unwrap()
            .unwrap();
        // The completed one arrives whole and closed in order; the aborted
        // one is reset (read_to_end fails) or cut short.
        assert!(
            got.contains(&(b"GET /a HTTP/1.1\r\n\r\n".to_vec(), true)),
            "{got:?}"
        );
        assert!(
            !got.iter().any(|(bytes, ok)| bytes == b"GET /b" && *ok),
            "{got:?}"
        );
        stop_forward(hub, task).await;
        // The shadow tasks count their end after the target closes its
        // side, which may come after the forwarder's own end.
        wait_until(
            Duration::from_secs(10),
            "the shadow connections never ended",
            || {
                stats.completed.load(Ordering::Relaxed)
                    + stats.aborted[CloseReason::Gap as usize].load(Ordering::Relaxed)
                    >= 2
            },
        )
        .await;
        assert_eq!(stats.completed.load(Ordering::Relaxed), 1);
        assert_eq!(
            stats.aborted[CloseReason::Gap as usize].load(Ordering::Relaxed),
            1
        );
        assert_eq!(stats.skipped_midstream.load(Ordering::Relaxed), 1);
        assert_eq!(stats.opened.load(Ordering::Relaxed), 2);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn answers_are_compared_and_reported() {
        let (listener, target) = listening_target().await;
        // The shadow answers each request with "pong <request>" and closes
        // once the request stream ends.
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let _ = socket.read_to_end(&mut request).await;
                    let _ = socket.write_all(b"pong ").await;
                    let _ = socket.write_all(&request).await;
                });
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("report.jsonl");
        let (report, writer) =
            compare_report::start(compare_report::open_report(&path, None).unwrap()).unwrap();
        let compare = CompareConfig {
            timeout: Duration::from_millis(500),
            report: Some(report),
        };
        let (hub, stats, task) = start_forward_with(target, 64, Some(compare));
        let src = |port| SocketAddr::from(([198, 18, 0, 1], port));
        let dst: SocketAddr = "198.18.0.2:80".parse().unwrap();
        let answer = |conn, bytes: &'static [u8]| StreamEvent::Data {
            conn,
            dir: Direction::Server,
            bytes: Bytes::from_static(bytes),
            peer_acked: 0,
        };
        hub.publish(
            80,
            vec![
                opened(1, src(1000), dst),
                opened(2, src(1001), dst),
                opened(3, src(1002), dst),
                data(1, b"ping"),
                data(2, b"ping"),
                data(3, b"ping"),
                answer(1, b"pong ping"),
                answer(2, b"pong pin"),
                answer(2, b"x"),
                answer(3, b"pong"),
                closed(1, CloseReason::Fin),
                closed(2, CloseReason::Fin),
                closed(3, CloseReason::Rst),
            ],
        );
        let counted = || {
            stats
                .compared
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .sum::<u64>()
        };
        wait_until(Duration::from_secs(10), "three results", || counted() == 3).await;
        stop_forward(hub, task).await;
        writer.await.unwrap();
        let snapshot = stats.snapshot(&target);
        assert_eq!(
            snapshot.compared,
            Compared {
                same: 1,
                differs: 1,
                incomplete: 1
            }
        );
        assert_eq!(snapshot.report_dropped, 0);
        let mut lines: Vec<serde_json::Value> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        lines.sort_by_key(|line| line["conn"].as_u64());
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert_eq!(lines[0]["result"], "same");
        assert_eq!(lines[0]["shadow_bytes"], 9);
        assert_eq!(lines[1]["result"], "differs");
        assert_eq!(lines[1]["offset"], 8);
        assert_eq!(lines[1]["production"], "x");
        assert_eq!(lines[1]["shadow"], "g");
        assert_eq!(lines[2]["result"], "incomplete");
        assert_eq!(lines[2]["reason"], "production_rst");
        assert_eq!(lines[2]["src"], "198.18.0.1:1002");
    }

    #[test]
    fn queued_bytes_are_bounded_per_connection_and_per_target() {
        let target = Arc::new(AtomicUsize::new(0));
        let queue = || Queued {
            connection: AtomicUsize::new(0),
            target: Arc::clone(&target),
        };
        let a = queue();
        assert!(a.reserve(CONNECTION_QUEUE_BYTES));
        assert!(!a.reserve(1), "the connection's budget is full");
        a.release(10);
        assert!(a.reserve(10));
        let others: Vec<Queued> = (1..TARGET_QUEUE_BYTES / CONNECTION_QUEUE_BYTES)
            .map(|_| {
                let q = queue();
                assert!(q.reserve(CONNECTION_QUEUE_BYTES));
                q
            })
            .collect();
        let late = queue();
        assert!(!late.reserve(1), "the target's budget is full");
        drop(a);
        assert!(late.reserve(1), "an ended connection gives its bytes back");
        drop(others);
        drop(late);
        assert_eq!(target.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_target_that_stops_reading_loses_its_connection_by_bytes() {
        // It accepts, then reads nothing: the socket buffers fill, writes
        // wait, and the queue grows by bytes (few, large events: far below
        // the event count budget).
        let (listener, target) = listening_target().await;
        let server = tokio::spawn(async move { listener.accept().await.unwrap() });
        let (hub, stats, task) = start_forward(target, 128);
        hub.publish(
            80,
            vec![opened(
                1,
                "198.18.0.1:1000".parse().unwrap(),
                "198.18.0.2:80".parse().unwrap(),
            )],
        );
        let _accepted = tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .unwrap()
            .unwrap();
        let chunk = Bytes::from(vec![b'x'; 1 << 20]);
        let chunks: usize = 64;
        assert!(chunks < CONNECTION_QUEUE, "the byte budget is what trips");
        for _ in 0..chunks {
            hub.publish(
                80,
                vec![StreamEvent::Data {
                    peer_acked: 0,
                    dir: Default::default(),
                    conn: 1,
                    bytes: chunk.clone(),
                }],
            );
            tokio::task::yield_now().await;
        }
        wait_until(
            Duration::from_secs(20),
            "the shadow connection was never aborted",
            || stats.aborted_target.load(Ordering::Relaxed) > 0,
        )
        .await;
        let written = stats.bytes_written.load(Ordering::Relaxed);
        assert!(
            written < (chunks << 20) as u64,
            "{written} bytes written: the target stopped reading"
        );
        stop_forward(hub, task).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_target_that_is_down_fails_fast_and_is_tried_again() {
        // A port nothing listens on.
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        let health = Mutex::new(Health::default());
        assert!(connect(addr, &health).await.is_none());
        let paused_until = health.lock().paused_until.expect("paused");
        assert!(connect(addr, &health).await.is_none(), "paused: no attempt");
        // Once it listens again and the pause is over, it connects.
        let listener = TcpListener::bind(addr).await.unwrap();
        tokio::time::sleep(paused_until.saturating_duration_since(Instant::now())).await;
        assert!(connect(addr, &health).await.is_some());
        assert!(health.lock().paused_until.is_none());
        drop(listener);
    }
}

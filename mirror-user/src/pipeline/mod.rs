//! `mirror run` as one pipeline: the privileged [`setup`], then every
//! stage started in the order data flows back from the consumers (so that
//! each stage has somewhere to send before it receives anything), and
//! stopped in the order data flows through them, in one place
//! ([`Running::shutdown`]):
//!
//! ```text
//! kernel rings -> drain (merge) -> flow shards -> hub -> print, dump, forward,
//!                            \-> packet print, pcap        subscriber sessions
//! ```

pub mod report;
pub mod setup;
pub mod shards;

use std::{
    io,
    os::fd::BorrowedFd,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::{
    sync::{mpsc, watch},
    task::{JoinError, JoinHandle, JoinSet},
};

use crate::{
    arena::Arena,
    control::{
        Control, Request,
        ports::{AllowList, PortRegistry},
    },
    fanout::hub::{Hub, HubConfig},
    flow::segment::PayloadPool,
    kernel::{
        attach::{self, AUTO_REASON, AttachError, AttachMode},
        clock::WallClock,
        drain::{DrainCounters, RecordSink, drain_rings, register_readable},
        hotplug::{Hotplug, InterfaceCounters},
        loader::Mirror,
        privileged_helper::Helper,
        record::Record,
    },
    nats::{
        NatsConfig,
        publish::{NatsCounters, publish_events},
    },
    pipeline::{
        report::Report,
        setup::{Setup, Watched},
        shards::{SegmentRouter, ShardConfig, Shards},
    },
    server::{
        ArenaStage, ServerCounters,
        listener::{self, SendBufferForcer},
        session::SessionContext,
    },
    sinks::{
        compare_report,
        dump::dump_events,
        forward::{
            CompareConfig, ForwardConfig, ForwardCounters, ForwardTarget, ForwardTargets, forward,
        },
        pcap::{self, PcapSink},
        print::{PrintFormat, print_events},
        print_packets::{PacketFormat, PacketPrinter},
    },
    telemetry::{endpoint, registry::Registry},
};

/// How often the flows that lost packets to a full ring are collected.
const LOST_FLOWS_POLL: Duration = Duration::from_millis(10);
/// How long the exit waits for the comparison report's last lines.
const REPORT_FLUSH: Duration = Duration::from_secs(5);

/// The stages after the kernel and what they feed.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub hub: HubConfig,
    pub shards: ShardConfig,
    /// `--print`: stream events on standard output.
    pub print: Option<PrintFormat>,
    /// `--print-packets`: packets on standard output.
    pub print_packets: Option<PacketFormat>,
    /// `--forward`: a shadow target each.
    pub forward: Vec<ForwardTarget>,
    pub forward_config: ForwardConfig,
    /// `--compare`: the forwarders compare the answers; its timeout.
    pub compare: Option<Duration>,
    /// Ports clients may add or subscribe to beyond the mirrored ones.
    pub allow: AllowList,
    pub max_client_ports: usize,
    /// `--arena-size`: bytes of the payload arena; 0 for none.
    pub arena_size: usize,
    /// `--nats`: publish to JetStream.
    pub nats: Option<NatsConfig>,
}

/// Why the pipeline could not stop cleanly, or a stage of it failed.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("a mirror task failed")]
    TaskFailed(#[source] io::Error),
    #[error("a mirror task died: {0}")]
    TaskDied(String),
    #[error("cannot remove the mirror's TC filter")]
    DetachClsact(#[source] io::Error),
    #[error(transparent)]
    Detach(#[from] AttachError),
}

/// The privileged helper is how the server enlarges a local client's
/// send buffer once the mirror has given up root.
impl SendBufferForcer for Helper {
    fn force_send_buffer(&self, socket: BorrowedFd<'_>, bytes: usize) -> io::Result<()> {
        Helper::force_send_buffer(self, socket, bytes)
    }
}

/// `mirror run` from its privileged start to its report.
pub struct Pipeline;

impl Pipeline {
    /// Starts every stage on the current runtime: the consumers subscribe
    /// before any segment reaches the shards (they see every connection
    /// from its start), the rings are drained last.
    pub fn start(setup: Setup, config: PipelineConfig) -> Running {
        let Setup {
            iface,
            ports,
            attach: attach_mode,
            mut mirror,
            watched,
            ifaces,
            listeners,
            server_config,
            dump_dir,
            pcap,
            compare_report,
            helper,
            metrics,
            hotplug,
            nats_creds,
            ..
        } = setup;

        // The consumers follow the ports `ports add` adds.
        let hub = Arc::new(Hub::new(&ports, config.hub));
        let registry = PortRegistry::new(&ports, config.allow, config.max_client_ports);
        let mut control = Control::new(registry, Arc::clone(&hub));
        let mut consumers = JoinSet::new();
        if let Some(format) = config.print {
            let (feed, subscription) = hub.subscribe(&ports, "print");
            control.follow_own_ports(feed);
            consumers.spawn(print_events(subscription, format));
        }
        if let Some(dir) = dump_dir {
            let (feed, subscription) = hub.subscribe(&ports, "dump-dir");
            control.follow_own_ports(feed);
            consumers.spawn(dump_events(subscription, dir));
        }
        let mut forwards = Vec::new();
        // The report's writer ends once every forwarder and shadow task
        // let its sink go: joined with the consumers.
        let report = compare_report.and_then(|file| {
            let (sink, written) = compare_report::start(file)
                .map_err(|error| {
                    tracing::warn!("no comparison report: its writer did not start: {error}");
                })
                .ok()?;
            consumers.spawn(async move {
                // A file that takes nothing (a FIFO nobody reads, a hung
                // disk) must not hold up the exit.
                if tokio::time::timeout(REPORT_FLUSH, written).await.is_err() {
                    tracing::warn!(
                        "the comparison report did not take its last lines within {} s (a stalled reader or a hung disk): they are lost",
                        REPORT_FLUSH.as_secs()
                    );
                }
                Ok(())
            });
            Some(sink)
        });
        let compare = config
            .compare
            .map(|timeout| CompareConfig { timeout, report });
        for target in &config.forward {
            let (feed, subscription) = hub.subscribe(&ports, &format!("forward-{target}"));
            control.follow_own_ports(feed);
            let stats = Arc::new(ForwardCounters::default());
            consumers.spawn(forward(
                subscription,
                *target,
                config.forward_config,
                compare.clone(),
                Arc::clone(&stats),
            ));
            forwards.push((*target, stats));
        }
        drop(compare);
        // Sent once the shards are done and the hub closed: the server, and
        // a NATS publisher whose window NATS does not empty, stop then.
        let (server_stop_tx, server_stop_rx) = watch::channel(false);
        let nats_stats = config.nats.clone().map(|nats| {
            let (feed, subscription) = hub.subscribe(&ports, "nats");
            control.follow_own_ports(feed);
            let stats = Arc::new(NatsCounters::default());
            consumers.spawn(publish_events(
                subscription,
                nats,
                nats_creds,
                Arc::clone(&stats),
                server_stop_rx.clone(),
            ));
            stats
        });
        let clock = WallClock::new();
        let pcap = pcap.map(|(pcap_config, output)| pcap::start(pcap_config, output, clock));
        let shards = Shards::start_naming(config.shards, &hub, &ifaces);
        let arena = (config.arena_size > 0)
            .then(|| Arena::new(config.arena_size))
            .and_then(|created| {
                created
                    .inspect_err(|error| {
                        tracing::warn!("{error}; local clients receive bytes instead");
                    })
                    .ok()
            });

        let (control_tx, control_rx) = mpsc::channel(64);
        let server_stop_rx_metrics = server_stop_rx.clone();
        let server_stats = Arc::new(ServerCounters::default());
        let server_task = tokio::spawn(listener::serve(
            listeners,
            SessionContext {
                control: control_tx,
                hub: Arc::clone(&hub),
                stats: Arc::clone(&server_stats),
                config: Arc::clone(&server_config),
                arena: arena.clone(),
            },
            Some(Arc::clone(&helper) as Arc<dyn SendBufferForcer>),
            server_stop_rx,
        ));

        let Some(first) = watched.first() else {
            unreachable!("the setup attaches at least one interface");
        };
        if attach_mode == AttachMode::Auto {
            tracing::info!("attach auto: {} ({AUTO_REASON})", first.attachment);
        }
        let port_list: Vec<String> = ports.iter().map(ToString::to_string).collect();
        tracing::info!(
            "mirroring TCP to port {} on {} at {}; stop with Ctrl-C",
            port_list.join(", "),
            iface,
            first.attachment
        );
        for endpoint in &server_config.endpoints {
            tracing::info!(
                "clients connect at {endpoint} (mirror tail --connect {endpoint} --port P)"
            );
        }

        let (stop_tx, stop_rx) = watch::channel(false);
        let drain_counters = Arc::new(DrainCounters::default());
        let mut drains = JoinSet::new();
        let (pcap_sink, pcap_counters, pcap_writer) = match pcap {
            Some((sink, counters, writer)) => (Some(sink), Some(counters), Some(writer)),
            None => (None, None, None),
        };
        let pool = match &arena {
            Some(arena) => PayloadPool::with_arena(arena.clone()),
            None => PayloadPool::default(),
        };
        let sink = RunSink {
            counters: Arc::clone(&drain_counters),
            router: shards.router_with(pool),
            packets: config
                .print_packets
                .map(|format| PacketPrinter::new(format, &iface, clock).naming(ifaces.clone())),
            pcap: pcap_sink.clone(),
        };
        drains.spawn(drain_rings(
            mirror.take_rings(),
            sink,
            Arc::clone(&drain_counters),
            stop_rx.clone(),
        ));
        let shard_counters = shards.counters();
        let lost_task = mirror.take_lost_flows().map(|mut lost| {
            let shards_lost = shards.lost_reporter();
            let counters = Arc::clone(&shard_counters);
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                let mut poll = tokio::time::interval(LOST_FLOWS_POLL);
                loop {
                    let stopping = tokio::select! {
                        _ = poll.tick() => false,
                        _ = stop.changed() => true,
                    };
                    let flows = lost.take();
                    counters
                        .ring_lost_flows
                        .fetch_add(flows.len() as u64, Ordering::Relaxed);
                    shards_lost.report(flows);
                    if stopping {
                        break;
                    }
                }
            })
        });
        if let Some(logger) = mirror.take_kernel_log() {
            tokio::spawn(async move {
                let Ok(mut fd) = register_readable(logger) else {
                    return;
                };
                while let Ok(mut guard) = fd.readable_mut().await {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
            });
        }

        let hotplugging = hotplug.is_some();
        let interface_counters = hotplug.map(|(watch, netns_label)| {
            let counters = Arc::new(InterfaceCounters::default());
            let follow = Hotplug {
                watch,
                netns_label,
                watched: watched
                    .iter()
                    .map(|w| (w.attachment.ifindex, w.attachment.iface.clone()))
                    .collect(),
                names: ifaces.clone(),
                helper: Arc::clone(&helper),
                counters: Arc::clone(&counters),
            };
            tokio::spawn(follow.run(stop_rx.clone()));
            counters
        });

        // The drain holds the capture's only handle now: it ends with it.
        drop(pcap_sink);
        // Every stage's counters, in data-path order: what the report,
        // STATS and the metrics endpoint read.
        let mut registry = Registry::new();
        registry.register("kernel", mirror.kernel_counters());
        registry.register("rings", mirror.ring_fills());
        registry.register("drain", drain_counters);
        registry.register("shards", shard_counters);
        registry.register("connections", shards.connection_counters());
        registry.register_sections(Arc::clone(&hub));
        registry.register("server", server_stats);
        registry.register("arena", Arc::new(ArenaStage(arena)));
        if let Some(counters) = interface_counters {
            registry.register("interfaces", counters);
        }
        registry.register("forward", Arc::new(ForwardTargets(forwards)));
        if let Some(pcap) = pcap_counters {
            registry.register("pcap", pcap);
        }
        if let Some(nats) = nats_stats {
            registry.register("nats", nats);
        }
        let registry = Arc::new(registry);
        let metrics_task = metrics.map(|listener| {
            let registry = Arc::clone(&registry);
            let mut stop = server_stop_rx_metrics;
            tokio::spawn(async move {
                let stopped = async move {
                    let _ = stop.wait_for(|stop| *stop).await;
                };
                if let Err(error) = endpoint::serve(listener, registry, stopped).await {
                    tracing::warn!("the metrics endpoint stopped: {error}");
                }
            })
        });
        Running {
            mirror,
            watched,
            hotplug: hotplugging,
            helper,
            hub,
            control,
            control_rx,
            consumers,
            drains,
            stop_tx,
            lost_task,
            pcap_writer,
            shards,
            server_task,
            server_stop_tx,
            registry,
            metrics_task,
            early_end: None,
        }
    }
}

/// A task's end: its own result, or its panic.
type Ended = Result<io::Result<()>, JoinError>;

/// The running pipeline.
pub struct Running {
    mirror: Mirror,
    watched: Vec<Watched>,
    /// The helper attaches interfaces that appear later.
    hotplug: bool,
    helper: Arc<Helper>,
    hub: Arc<Hub>,
    control: Control,
    control_rx: mpsc::Receiver<Request>,
    consumers: JoinSet<io::Result<()>>,
    drains: JoinSet<io::Result<()>>,
    /// Tells the drain (and the lost-flows task) to stop.
    stop_tx: watch::Sender<bool>,
    lost_task: Option<JoinHandle<()>>,
    pcap_writer: Option<std::thread::JoinHandle<()>>,
    shards: Shards,
    server_task: JoinHandle<()>,
    server_stop_tx: watch::Sender<bool>,
    registry: Arc<Registry>,
    /// Serves `--metrics` until the server stops.
    metrics_task: Option<JoinHandle<()>>,
    /// A drain or consumer that ended before the stop.
    early_end: Option<Ended>,
}

impl Running {
    /// The main task's work: answers control requests (port changes, the
    /// counters) until `stop` completes or a drain or consumer ends on its
    /// own.
    pub async fn serve_until(&mut self, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        self.early_end = loop {
            tokio::select! {
                () = &mut stop => break None,
                ended = self.drains.join_next() => break ended,
                // join_next on an empty set is ready at once.
                ended = self.consumers.join_next(), if !self.consumers.is_empty() => break ended,
                Some(request) = self.control_rx.recv() => match request {
                    Request::Stats { reply } => {
                        let _ = reply.send(self.registry.document().to_json().to_string());
                    }
                    Request::Ports(request) => self.control.handle(request, &mut self.mirror),
                },
            }
        };
    }

    /// Stops every stage in order and returns the counters. The program is
    /// detached first, so that the final drain reads every record it wrote
    /// and the counters match what was delivered; then each stage ends
    /// after the one that feeds it: rings, lost flows, the capture's
    /// writer, shards (which close the remaining connections as
    /// `shutdown`), the hub's channels, the server, the consumers.
    pub async fn shutdown(self) -> Result<Report, PipelineError> {
        let Self {
            mut mirror,
            watched,
            hotplug,
            helper,
            hub,
            control,
            control_rx,
            mut consumers,
            mut drains,
            stop_tx,
            lost_task,
            pcap_writer,
            shards,
            server_task,
            server_stop_tx,
            registry,
            metrics_task,
            early_end,
        } = self;
        // Requests still in flight get "the mirror is stopping".
        drop(control_rx);

        let mut detached = Ok(());
        // Hot-plugged links are the helper's: it lets go of them on DETACH.
        let mut clsact = hotplug;
        for Watched { attachment, .. } in watched {
            if attachment.clsact_filters().is_empty() {
                let result = attach::detach(&mut mirror, attachment).map_err(PipelineError::from);
                detached = detached.and(result);
            } else {
                clsact = true;
            }
        }
        if clsact {
            // A filter needs CAP_NET_ADMIN to go: the helper removes them
            // (and the hot-plugged links).
            let result = helper.detach_clsact().map_err(PipelineError::DetachClsact);
            detached = detached.and(result);
        }
        let _ = stop_tx.send(true);
        let mut failure = early_end.and_then(task_failure);
        while let Some(ended) = drains.join_next().await {
            failure = failure.or(task_failure(ended));
        }
        if let Some(task) = lost_task {
            let _ = task.await;
        }
        if let Some(writer) = pcap_writer {
            // The drains are done: the writer finishes what it was given.
            let _ = tokio::task::spawn_blocking(move || writer.join()).await;
        }
        shards.finish().await;
        // The shards are gone; with the channels closed, the consumers and the
        // sessions see their ends once they have read everything.
        hub.close_all();
        let _ = server_stop_tx.send(true);
        let _ = server_task.await;
        if let Some(task) = metrics_task {
            let _ = task.await;
        }
        drop(control);
        drop(hub);
        while let Some(ended) = consumers.join_next().await {
            failure = failure.or(task_failure(ended));
        }
        detached?;
        // Every stage has stopped: the counters are final.
        Ok(Report {
            counters: registry.document(),
            failure,
        })
    }
}

/// What the drain feeds: the shards, the packet printer, the capture.
struct RunSink {
    counters: Arc<DrainCounters>,
    router: SegmentRouter,
    packets: Option<PacketPrinter>,
    pcap: Option<PcapSink>,
}

impl RecordSink for RunSink {
    fn record(&mut self, record: &Record<'_>) {
        if let Some(packets) = &mut self.packets {
            packets.record(record);
        }
        if let Some(pcap) = &mut self.pcap {
            pcap.offer(record);
        }
        // The server's answers (`--directions both`) are counted apart; the
        // shards take them as their connection's other direction.
        if record.server_to_client() {
            self.counters.server_records.fetch_add(1, Ordering::Relaxed);
        }
        self.router.record(record);
    }

    fn flush(&mut self) -> io::Result<()> {
        self.router.flush()?;
        match &mut self.packets {
            Some(packets) => packets.flush(),
            None => Ok(()),
        }
    }
}

fn task_failure(ended: Ended) -> Option<PipelineError> {
    match ended {
        Ok(Ok(())) => None,
        // Whoever read our standard output went away (`mirror ... | head`):
        // an ordinary way to stop, as for tcpdump.
        Ok(Err(error)) if error.kind() == io::ErrorKind::BrokenPipe => None,
        Ok(Err(error)) => Some(PipelineError::TaskFailed(error)),
        Err(panic) => Some(PipelineError::TaskDied(panic.to_string())),
    }
}

//! `mirror run`: load, attach, drain the rings into flow shards, fan the
//! streams out to the consumers; on SIGINT/SIGTERM detach, finish every
//! stage in order and print the counters.

use std::{
    io,
    os::fd::BorrowedFd,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use mirror_user::{
    control::ports::PortRegistry,
    control::{Control, Request},
    fanout::hub::{Hub, HubConfig},
    files::OutputDir,
    flow::conntrack::{TableLimits, TableStats},
    flow::reassembly::ReorderLimits,
    kernel::attach::{self, AUTO_REASON, AttachMode, Attachment},
    kernel::clock::WallClock,
    kernel::drain::{RecordSink, drain_ring, register_readable},
    kernel::loader::{self, LoadOptions, Mirror},
    kernel::privileged_helper::{Helper, Plan as HelperPlan},
    kernel::privileges::{self, Identity},
    kernel::record::Record,
    pipeline::shards::{SegmentRouter, ShardConfig, ShardCounters, Shards},
    server::client,
    server::{
        ServerConfig, ServerStats,
        listener::{self, BoundListener, SendBufferForcer},
        session::SessionContext,
    },
    sinks::{
        dump::dump_events,
        forward::{ForwardConfig, ForwardStats, ForwardTarget, forward},
        pcap::{self, PcapConfig, PcapCounters, PcapOutput, PcapSink},
        print::{PrintFormat, print_events},
        print_packets::{PacketFormat, PacketPrinter},
    },
    telemetry::counters::{self, DrainCounters, KernelCounters, StreamSummary, Summary},
};

use crate::cli::{RunArgs, StreamArgs};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, watch},
    task::{JoinError, JoinSet},
};
use tracing_subscriber::filter::LevelFilter;

/// Batch size of the hub: one channel slot per this many payload bytes.
const BATCH_BYTES: usize = 256 << 10;
/// How often the flows that lost packets to a full ring are collected.
const LOST_FLOWS_POLL: Duration = Duration::from_millis(10);

/// What the privileged start leaves for the rest of the run: the kernel
/// side attached, the sockets bound, the output files open, and the
/// privileged helper that outlives the drop.
pub struct Prepared {
    args: RunArgs,
    mirror: Mirror,
    attachment: Attachment,
    listeners: Vec<BoundListener>,
    server_config: Arc<ServerConfig>,
    dump_dir: Option<OutputDir>,
    pcap: Option<(PcapConfig, PcapOutput)>,
    helper: Arc<Helper>,
}

/// The part of `mirror run` that needs root: load, open the files, bind,
/// attach, start the privileged helper; then give up root (`--user`).
///
/// Runs before the async runtime starts, on the only thread, so that the
/// drop covers every thread the mirror will ever have.
pub fn prepare(args: RunArgs, log_level: LevelFilter) -> anyhow::Result<Prepared> {
    let pcap_to_stdout = args.sinks.pcap.as_deref() == Some(std::path::Path::new("-"));
    if pcap_to_stdout && (args.print.is_some() || args.print_packets.is_some()) {
        anyhow::bail!(
            "--pcap - writes the capture to standard output, so --print and --print-packets cannot be used with it"
        );
    }
    privileges::check()?;
    let identity = Identity::resolve(args.user.as_deref())?;
    // Fail on a wrong interface name before loading anything.
    attach::interface_index(&args.iface)?;

    let mut mirror = Mirror::load(&LoadOptions {
        snaplen: args.snaplen,
        ring_size: args.ring_size.unwrap_or_else(loader::default_ring_size),
        kernel_log_level: aya_log_level(log_level),
    })?;

    // Files before sockets before the kernel: a bad path fails before
    // anything is attached.
    let dump_dir = args
        .dump_dir
        .as_deref()
        .map(|dir| {
            let dir = OutputDir::open_or_create(dir, identity.owner())?;
            identity.check_may_write(&dir).map(|()| dir)
        })
        .transpose()?;
    let pcap = args
        .sinks
        .pcap
        .as_ref()
        .map(|path| {
            let config = PcapConfig {
                path: path.clone(),
                format: args.sinks.pcap_format,
                rotate_size: args.sinks.pcap_rotate_size,
                keep: args.sinks.pcap_keep,
                iface: args.iface.clone(),
                snaplen: args.snaplen,
            };
            if config.rotate_size.is_some() && path.as_os_str() != "-" {
                // Rotated files are created as the user the mirror becomes.
                identity.check_may_write(&OutputDir::of_file(path)?.0)?;
            }
            anyhow::Ok((
                config.clone(),
                pcap::open_output(&config, identity.owner())?,
            ))
        })
        .transpose()?;

    let token = match &args.server.token_file {
        // Its errors name the file and say what to do.
        Some(path) => Some(client::read_token(path)?),
        None => None,
    };
    let server_config = Arc::new(ServerConfig {
        endpoints: args.server.endpoints(),
        token,
        max_clients: args.server.max_clients,
        write_timeout: args.server.client_timeout,
        name: format!("mirror {} on {}", env!("CARGO_PKG_VERSION"), args.iface),
    });
    let listeners = listener::bind(&server_config)?;

    // Ports next: the program mirrors from the first packet it sees.
    for port in &args.ports {
        mirror
            .set_port(port.get(), true)
            .with_context(|| format!("cannot subscribe port {port}"))?;
    }
    let attachment = attach::attach(&mut mirror, &args.iface, args.attach, args.tc_netlink)?;
    // From here on an error must leave nothing attached. TCX and XDP links
    // go with the process; a clsact filter stays: the helper removes it
    // once it runs (also when a later step fails), before that the mirror,
    // which still may.
    let helper = match Helper::spawn(&HelperPlan {
        clsact: attachment.clsact_filter(),
        sockets: listeners
            .iter()
            .filter_map(BoundListener::socket_file)
            .collect(),
    }) {
        Ok(helper) => helper,
        Err(error) => {
            if let Err(detach) = attach::detach(&mut mirror, attachment) {
                tracing::warn!("{detach}");
            }
            return Err(error).context("cannot start the mirror's privileged helper");
        }
    };

    identity.assume()?;
    if let Some(dir) = &dump_dir {
        dir.check_writable(&identity.name)?;
    }
    if let Some((config, output)) = &pcap {
        output.check_rotation(config, &identity.name)?;
    }
    tracing::debug!("running as {} from now on", identity.name);
    Ok(Prepared {
        args,
        mirror,
        attachment,
        listeners,
        server_config,
        dump_dir,
        pcap,
        helper: Arc::new(helper),
    })
}

/// The privileged helper as the server's way to enlarge send buffers.
struct HelperSendBuffer(Arc<Helper>);

impl SendBufferForcer for HelperSendBuffer {
    fn force_send_buffer(&self, socket: BorrowedFd<'_>, bytes: usize) -> io::Result<()> {
        self.0.force_send_buffer(socket, bytes)
    }
}

pub async fn run(prepared: Prepared) -> anyhow::Result<()> {
    let Prepared {
        args,
        mut mirror,
        attachment,
        listeners,
        server_config,
        dump_dir,
        pcap,
        helper,
    } = prepared;
    // Watching the signals before saying "mirroring": from then on a
    // SIGINT or SIGTERM detaches in order and prints the counters.
    let mut sigint = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let ports: Vec<u16> = args.ports.iter().map(|p| p.get()).collect();

    // Consumers subscribe before any segment reaches the shards, so they
    // see every connection from its start; they follow the ports `ports
    // add` adds.
    let hub = Arc::new(Hub::new(&ports, hub_config(&args.streams)));
    let registry = PortRegistry::new(&ports, args.server.allow(), args.server.max_client_ports);
    let mut control = Control::new(registry, Arc::clone(&hub));
    let mut consumers = JoinSet::new();
    if let Some(format) = args.print {
        let (feed, subscription) = hub.subscribe(&ports, "print");
        control.follow_own_ports(feed);
        consumers.spawn(print_events(subscription, format));
    }
    if let Some(dir) = dump_dir {
        let (feed, subscription) = hub.subscribe(&ports, "dump-dir");
        control.follow_own_ports(feed);
        consumers.spawn(dump_events(subscription, dir));
    }
    let forward_config = ForwardConfig {
        max_connections: args.sinks.forward_max_conns,
        sample_percent: args.sinks.forward_sample,
    };
    let mut forwards = Vec::new();
    for target in &args.sinks.forward {
        let (feed, subscription) = hub.subscribe(&ports, &format!("forward {target}"));
        control.follow_own_ports(feed);
        let stats = Arc::new(ForwardStats::default());
        consumers.spawn(forward(
            subscription,
            *target,
            forward_config,
            Arc::clone(&stats),
        ));
        forwards.push((*target, stats));
    }
    let clock = WallClock::new();
    let pcap = pcap.map(|(config, output)| pcap::start(config, output, clock));
    let shards = Shards::start(shard_config(&args.streams), &hub);

    let (control_tx, mut control_rx) = mpsc::channel(64);
    let (server_stop_tx, server_stop_rx) = watch::channel(false);
    let server_stats = Arc::new(ServerStats::default());
    let server_task = tokio::spawn(listener::serve(
        listeners,
        SessionContext {
            control: control_tx,
            hub: Arc::clone(&hub),
            stats: Arc::clone(&server_stats),
            config: Arc::clone(&server_config),
        },
        Some(Arc::new(HelperSendBuffer(Arc::clone(&helper)))),
        server_stop_rx,
    ));

    if args.attach == AttachMode::Auto {
        tracing::info!("attach auto: {} ({AUTO_REASON})", attachment.point);
    }
    let port_list: Vec<String> = ports.iter().map(ToString::to_string).collect();
    tracing::info!(
        "mirroring TCP to port {} on {} at {}; stop with Ctrl-C",
        port_list.join(", "),
        args.iface,
        attachment.point
    );
    for endpoint in &server_config.endpoints {
        tracing::info!("clients connect at {endpoint} (mirror tail --connect {endpoint} --port P)");
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let drain_counters = Arc::new(DrainCounters::default());
    let mut drains = JoinSet::new();
    let (pcap_sink, pcap_counters, pcap_writer) = match pcap {
        Some((sink, counters, writer)) => (Some(sink), Some(counters), Some(writer)),
        None => (None, None, None),
    };
    for ring in mirror.take_rings() {
        let sink = RunSink {
            router: shards.router(),
            packets: args
                .print_packets
                .map(|format| PacketPrinter::new(format, &args.iface, clock)),
            pcap: pcap_sink.clone(),
        };
        drains.spawn(drain_ring(
            ring,
            sink,
            Arc::clone(&drain_counters),
            stop_rx.clone(),
        ));
    }
    let lost_flows = mirror.take_lost_flows();
    let ring_lost_flows = Arc::new(AtomicU64::new(0));
    let lost_task = lost_flows.map(|mut lost| {
        let shards_lost = shards.lost_reporter();
        let counter = Arc::clone(&ring_lost_flows);
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut poll = tokio::time::interval(LOST_FLOWS_POLL);
            loop {
                let stopping = tokio::select! {
                    _ = poll.tick() => false,
                    _ = stop.changed() => true,
                };
                let flows = lost.take();
                counter.fetch_add(flows.len() as u64, Ordering::Relaxed);
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

    // The drain tasks hold the capture's only handles now: it ends with them.
    drop(pcap_sink);
    let stages = Stages {
        drain: Arc::clone(&drain_counters),
        shards: shards.counters(),
        ring_lost_flows: Arc::clone(&ring_lost_flows),
        hub: Arc::clone(&hub),
        server: Arc::clone(&server_stats),
        forwards,
        pcap: pcap_counters,
    };
    // The main task: control requests until a signal or a task ends.
    let early_end = loop {
        tokio::select! {
            _ = sigint.recv() => break None,
            _ = sigterm.recv() => break None,
            ended = drains.join_next() => break ended,
            // join_next on an empty set is ready at once.
            ended = consumers.join_next(), if !consumers.is_empty() => break ended,
            Some(request) = control_rx.recv() => match request {
                Request::Stats { reply } => {
                    let json = mirror
                        .counters()
                        .map(|kernel| stages.json(kernel, shards.table_stats()))
                        .unwrap_or_else(|e| serde_json::json!({"error": e.to_string()}));
                    let _ = reply.send(json.to_string());
                }
                request => control.handle(request, &mut mirror),
            },
        }
    };
    // Requests still in flight get "the mirror is stopping".
    drop(control_rx);

    // Detach first, so that the final drain reads every record the program
    // wrote and the counters match what was delivered. Then each stage ends
    // after the one that feeds it: rings, lost flows, shards (which close
    // the remaining connections as "shutdown"), consumers.
    let detached = match attachment.clsact_filter() {
        // A filter needs CAP_NET_ADMIN to go: the helper removes it.
        Some(_) => helper
            .detach_clsact()
            .context("cannot remove the mirror's TC filter"),
        None => attach::detach(&mut mirror, attachment).map_err(anyhow::Error::from),
    };
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
    let table = shards.finish().await;
    let kernel = mirror
        .counters()
        .context("cannot read the kernel counters")?;
    // The shards are gone; with the channels closed, the consumers and the
    // sessions see their ends once they have read everything.
    hub.close_all();
    let _ = server_stop_tx.send(true);
    let _ = server_task.await;
    drop(control);
    drop(hub);
    while let Some(ended) = consumers.join_next().await {
        failure = failure.or(task_failure(ended));
    }
    detached?;

    if args.print == Some(PrintFormat::Json) || args.print_packets == Some(PacketFormat::Json) {
        println!("{}", stages.json(kernel, table));
    } else {
        eprintln!("{}", stages.summary(kernel, table));
        eprintln!("server: {}", stages.server);
        for (target, stats) in &stages.forwards {
            eprintln!("forward {target}: {}", flat_fields(&stats.to_json(target)));
        }
        if let Some(pcap) = &stages.pcap {
            let fields: Vec<String> = pcap
                .fields()
                .iter()
                .map(|(n, v)| format!("{n}={v}"))
                .collect();
            eprintln!("pcap: {}", fields.join(" "));
        }
    }
    failure.map_or(Ok(()), Err)
}

/// `name=value` pairs of a counters object, nested names joined by dots.
fn flat_fields(json: &serde_json::Value) -> String {
    let fields: Vec<String> = counters::flatten(json)
        .iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect();
    fields.join(" ")
}

/// Handles on every stage's counters, to build the summary at any time.
struct Stages {
    drain: Arc<DrainCounters>,
    shards: Arc<ShardCounters>,
    ring_lost_flows: Arc<AtomicU64>,
    hub: Arc<Hub>,
    server: Arc<ServerStats>,
    forwards: Vec<(ForwardTarget, Arc<ForwardStats>)>,
    pcap: Option<Arc<PcapCounters>>,
}

impl Stages {
    fn summary(&self, kernel: KernelCounters, table: TableStats) -> Summary {
        let (segments, queue_drops, undecodable) = self.shards.snapshot();
        let (consumers, past_sessions) = self.hub.consumer_totals();
        Summary {
            kernel,
            drain: self.drain.snapshot(),
            streams: StreamSummary {
                segments,
                queue_drops,
                undecodable,
                ring_lost_flows: self.ring_lost_flows.load(Ordering::Relaxed),
                table,
                ports: self.hub.port_totals(),
                consumers,
                past_sessions,
            },
        }
    }

    /// The counters document, with the server's, forwarders' and
    /// capture's counters.
    fn json(&self, kernel: KernelCounters, table: TableStats) -> serde_json::Value {
        let mut json = self.summary(kernel, table).to_json();
        json["server"] = self.server.to_json();
        json["forward"] = self
            .forwards
            .iter()
            .map(|(target, stats)| stats.to_json(target))
            .collect();
        if let Some(pcap) = &self.pcap {
            json["pcap"] = pcap
                .fields()
                .iter()
                .map(|(name, value)| ((*name).to_owned(), serde_json::Value::from(*value)))
                .collect::<serde_json::Map<_, _>>()
                .into();
        }
        json
    }
}

/// What each drain task feeds: the shards, the packet printer, the capture.
struct RunSink {
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

fn shard_config(args: &StreamArgs) -> ShardConfig {
    let shards = args
        .shards
        .unwrap_or_else(|| aya::util::online_cpus().map_or(1, |cpus| cpus.len()))
        .max(1);
    ShardConfig {
        shards,
        queue_batches: args.shard_queue,
        // The table limits are for the whole mirror: each shard gets its share.
        table: TableLimits {
            max_connections: args.max_connections.div_ceil(shards),
            max_buffered_bytes: (args.max_buffered_bytes as usize).div_ceil(shards),
            idle_timeout_ns: args.idle_timeout.as_nanos() as u64,
            reorder: ReorderLimits {
                max_bytes: args.reorder_bytes as usize,
                max_wait_ns: args.reorder_timeout.as_nanos() as u64,
            },
        },
    }
}

fn hub_config(args: &StreamArgs) -> HubConfig {
    HubConfig {
        capacity: args.channel_capacity,
        max_bytes: args.channel_bytes as usize,
        batch_bytes: BATCH_BYTES,
    }
}

fn task_failure(ended: Result<io::Result<()>, JoinError>) -> Option<anyhow::Error> {
    match ended {
        Ok(Ok(())) => None,
        // Whoever read our standard output went away (`mirror ... | head`):
        // an ordinary way to stop, as for tcpdump.
        Ok(Err(error)) if error.kind() == io::ErrorKind::BrokenPipe => None,
        Ok(Err(error)) => Some(anyhow::Error::new(error).context("a mirror task failed")),
        Err(panic) => Some(anyhow::anyhow!("a mirror task died: {panic}")),
    }
}

/// aya-log's numbering: 0 off, 1 error, 2 warn, 3 info, 4 debug, 5 trace.
fn aya_log_level(level: LevelFilter) -> u8 {
    match level.into_level() {
        None => 0,
        Some(tracing::Level::ERROR) => 1,
        Some(tracing::Level::WARN) => 2,
        Some(tracing::Level::INFO) => 3,
        Some(tracing::Level::DEBUG) => 4,
        Some(tracing::Level::TRACE) => 5,
    }
}

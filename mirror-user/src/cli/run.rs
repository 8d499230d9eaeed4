//! `mirror run`: its arguments mapped onto the stages' configurations, the
//! privileged start, then the pipeline until SIGINT or SIGTERM, and its
//! counters.

use std::{num::NonZeroU16, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::Args;
use mirror_common::MAX_SNAPLEN;
use mirror_user::{
    control::ports::AllowList,
    fanout::hub::HubConfig,
    flow::{
        conntrack::{Delivery, TableLimits},
        reassembly::ReorderLimits,
    },
    kernel::{
        attach::{self, AttachMode, Directions},
        loader::{self, LoadOptions, Sample},
        netns::{IfaceArg, ProcessExit},
    },
    nats::{NatsConfig, NatsServers, Retention, default_node, parse_node, parse_prefix},
    pipeline::{
        Pipeline, PipelineConfig,
        setup::{NetnsArg, Setup, SetupConfig},
        shards::ShardConfig,
    },
    server::{Endpoint, ServerConfig},
    sinks::{
        forward::{ForwardConfig, ForwardTarget},
        pcap::{PcapConfig, PcapFormat},
        print::PrintFormat,
        print_packets::PacketFormat,
    },
};
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::filter::LevelFilter;

use crate::cli::{Choice, one_of, parse_duration, parse_port, parse_size};

pub const EXAMPLES: &str = "\
Examples:
  # Print the connections to a local service on port 8080, with their bytes:
  mirror run --iface lo --port 8080 --print text
  # (then, in another terminal: curl http://127.0.0.1:8080/)

  # Keep each connection's request bytes in a file, as tcpflow does:
  mirror run --iface eth0 --port 80 --dump-dir /tmp/flows

  # One JSON line per packet, first 256 bytes of each:
  mirror run --iface eth0 --port 80 --port 443 --snaplen 256 --print-packets json

  # Every interface of a pod (its network namespace), from the node:
  mirror run --pid 4242 --port 8080 --print text
  mirror run --netns pod1 --port 8080 --print json
  # Two interfaces of two namespaces in one mirror:
  mirror run --iface pod1:eth0 --iface pod2:eth0 --port 8080 --print text

Needs root, or the capabilities CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN. Once attached it
runs as --user (default nobody) with no capability left, as tcpdump -Z does.
Stop with Ctrl-C: the program is detached and the counters are printed.";

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("watched").required(true).multiple(true).args(["iface", "netns", "pid"])))]
pub struct RunArgs {
    /// Interface to watch (ingress traffic), e.g. eth0 or lo; repeatable.
    /// `NETNS:IF` names interface IF of the network namespace NETNS (a
    /// name under /var/run/netns); a plain IF is in --netns / --pid when
    /// given. Connections say which interface they came through.
    #[arg(short, long, value_name = "IF")]
    pub iface: Vec<IfaceArg>,

    /// Watch the network namespace NETNS (a name under /var/run/netns, or
    /// a path such as /proc/PID/ns/net) rather than the mirror's own:
    /// every interface of it but lo unless --iface names some. The
    /// mirror's sockets, files and metrics stay in its own namespace.
    #[arg(long, value_name = "NETNS", conflicts_with = "pid")]
    pub netns: Option<String>,

    /// Watch the network namespace of process PID (e.g. a pod's), as
    /// --netns does.
    #[arg(long, value_name = "PID")]
    pub pid: Option<u32>,

    /// Destination TCP port to mirror (repeatable).
    #[arg(short, long = "port", value_name = "P", required = true, value_parser = parse_port)]
    pub ports: Vec<NonZeroU16>,

    /// Where to attach the program. `auto` picks the attach point that costs
    /// the watched traffic least on this interface (TC).
    #[arg(long, value_parser = one_of(ATTACH_MODES), default_value = "auto")]
    pub attach: AttachMode,

    /// Which directions of each connection to capture: `client` (what
    /// clients send, at ingress) or `both` (also the servers' answers, at
    /// TC egress). Default: `both` with TC (auto, tc), `client` with XDP,
    /// which has no egress hook.
    #[arg(long, value_parser = one_of(DIRECTIONS))]
    pub directions: Option<Directions>,

    /// When a stream's byte is delivered: `acked` once the other side's
    /// ACK covers it (what the receiver's TCP took; needs --directions
    /// both, where it is the default) or `seen` as soon as it arrived in
    /// order (the default with --directions client).
    #[arg(long, value_parser = one_of(DELIVERIES))]
    pub deliver: Option<Delivery>,

    /// Bytes of each packet to keep, from the start of the Ethernet header
    /// (headers up to TCP are always kept). Default: the whole packet, up to
    /// 64 KiB GSO/GRO super-packets.
    #[arg(long, value_name = "N", default_value_t = MAX_SNAPLEN, value_parser = parse_snaplen)]
    pub snaplen: u32,

    /// Percentage of connections to mirror: whole connections, chosen in
    /// the kernel by a hash of their addresses and ports (seeded at random
    /// on every start), so the others are never copied. `--forward-sample`
    /// applies on top, to the connections mirrored.
    #[arg(long, value_name = "PERCENT", default_value_t = 100, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub sample: u8,

    /// Print stream events to standard output: each connection opening,
    /// its bytes in order, and its end with a reason (fin, rst, idle, gap,
    /// lagged, evicted, shutdown).
    #[arg(long, value_name = "FORMAT", value_parser = one_of(PRINT_FORMATS))]
    pub print: Option<PrintFormat>,

    /// Print one line per mirrored packet (before reassembly) instead.
    #[arg(long, value_name = "FORMAT", conflicts_with = "print", value_parser = one_of(PACKET_FORMATS))]
    pub print_packets: Option<PacketFormat>,

    /// Write each connection's client-to-server bytes to a file of its own
    /// in DIR, named as tcpflow names them; `NAME.meta` says how the
    /// connection ended (anything but "fin" means the file is a prefix).
    /// DIR is created (mode 0700, owned by --user) if missing; an existing
    /// DIR must be writable by --user.
    #[arg(long, value_name = "DIR")]
    pub dump_dir: Option<PathBuf>,

    /// Started as root: once the program is attached and the sockets and
    /// files are open, run as USER with no capability left, as tcpdump -Z
    /// does. Files the mirror creates later (dump files, rotated captures)
    /// belong to USER. `--user root` keeps root (not recommended).
    #[arg(long, value_name = "USER", default_value = None)]
    pub user: Option<String>,

    /// Serve the counters at http://IP:PORT/metrics for Prometheus (and
    /// /healthz), e.g. 127.0.0.1:9464. Anyone who can reach the address
    /// reads the counters: bind a local or a management address.
    #[arg(long, value_name = "IP:PORT")]
    pub metrics: Option<std::net::SocketAddr>,

    #[command(flatten)]
    pub streams: StreamArgs,

    #[command(flatten)]
    pub server: ServerArgs,

    #[command(flatten)]
    pub sinks: SinkArgs,

    #[command(flatten)]
    pub nats: NatsArgs,

    /// Size of each CPU's ring buffer in bytes (a power of two, at least
    /// one page; suffixes K, M, G). Default: 128 MiB shared by the online
    /// CPUs, between 4 and 64 MiB each.
    #[arg(long, value_name = "BYTES", value_parser = parse_ring_size)]
    pub ring_size: Option<u32>,

    /// Attach TC through a netlink clsact filter even where TCX links exist
    /// (for testing the cleanup of filters left behind by a killed mirror).
    #[arg(long, hide = true)]
    pub tc_netlink: bool,
}

/// Shadow forwarding and capture files.
#[derive(Debug, Args)]
#[command(next_help_heading = "Forwarding and capture")]
pub struct SinkArgs {
    /// Replay each mirrored connection's client bytes to a copy of the
    /// service at IP:PORT (answers are discarded, or compared with
    /// --compare); PORT=IP:PORT for the connections of one mirrored port
    /// only. Repeatable.
    #[arg(long, value_name = "[PORT=]IP:PORT")]
    pub forward: Vec<ForwardTarget>,

    /// Compare each shadow connection's answers with the production
    /// server's, byte for byte (any TCP protocol): every connection ends
    /// `same`, `differs` (at an offset) or `incomplete` (with a reason),
    /// counted per target. Needs --directions both.
    #[arg(long, requires = "forward")]
    pub compare: bool,

    /// Write one JSON line per compared connection to FILE (a new file,
    /// mode 0600; an existing /dev/null or pipe is written as it is).
    #[arg(long, value_name = "FILE", requires = "compare")]
    pub compare_report: Option<PathBuf>,

    /// Once production's connection ended, a shadow that sends nothing
    /// for this long (and has not closed) is taken as done answering.
    // A shadow on the same network answers within milliseconds; a few
    // seconds leave room for a loaded one without keeping many shadow
    // connections open.
    #[arg(long, value_name = "DURATION", default_value = "3s", value_parser = parse_duration, requires = "compare")]
    pub compare_timeout: Duration,

    /// Shadow connections open at once, per target; more are skipped.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub forward_max_conns: usize,

    /// Percentage of connections to forward, whole connections chosen by
    /// a hash of their addresses.
    #[arg(long, value_name = "PERCENT", default_value_t = 100, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub forward_sample: u8,

    /// Write the mirrored packets (before reassembly) to a capture file;
    /// `-` writes to standard output (`mirror run ... --pcap - | tshark -r -`).
    #[arg(long, value_name = "FILE")]
    pub pcap: Option<PathBuf>,

    /// Capture file format.
    #[arg(long, value_parser = one_of(PCAP_FORMATS), default_value = "pcapng")]
    pub pcap_format: PcapFormat,

    /// Start a new capture file (FILE1, FILE2, ...) after this many bytes.
    #[arg(long, value_name = "BYTES", value_parser = parse_size, requires = "pcap")]
    pub pcap_rotate_size: Option<u64>,

    /// Keep only the newest N capture files.
    #[arg(long, value_name = "N", requires = "pcap_rotate_size")]
    pub pcap_keep: Option<usize>,
}

/// Publishing to NATS JetStream (README "Fleets: NATS JetStream").
#[derive(Debug, Args)]
#[command(next_help_heading = "NATS JetStream")]
pub struct NatsArgs {
    /// Publish every stream event to JetStream at these servers
    /// (nats://HOST:PORT, comma-separated; one of a cluster is enough).
    #[arg(long, value_name = "URL")]
    pub nats: Option<NatsServers>,

    /// NATS credentials file (.creds), read at the start.
    #[arg(long, value_name = "FILE", requires = "nats")]
    pub nats_creds: Option<PathBuf>,

    /// Subjects are PREFIX.NODE.PORT.CONN; the stream (PREFIX uppercased,
    /// dots as _) takes PREFIX.>.
    #[arg(long, value_name = "PREFIX", default_value = "mirror", value_parser = parse_prefix)]
    pub nats_subject: String,

    /// This node's name in the subjects. Default: the host name.
    #[arg(long, value_name = "NAME", value_parser = parse_node)]
    pub node_name: Option<String>,

    /// The stream's size limit, when the mirror creates it (oldest
    /// messages go first).
    #[arg(long, value_name = "BYTES", default_value = "1G", value_parser = parse_size)]
    pub nats_max_bytes: u64,

    /// The stream's age limit, when the mirror creates it.
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = parse_duration)]
    pub nats_max_age: Duration,

    /// The stream's replicas, when the mirror creates it (at most 5).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    pub nats_replicas: u8,
}

impl NatsArgs {
    fn config(&self) -> Option<NatsConfig> {
        self.nats.as_ref().map(|servers| NatsConfig {
            servers: servers.clone(),
            prefix: self.nats_subject.clone(),
            node: self.node_name.clone().unwrap_or_else(default_node),
            retention: Retention {
                max_bytes: self.nats_max_bytes,
                max_age: self.nats_max_age,
                replicas: usize::from(self.nats_replicas),
            },
        })
    }
}

/// The subscriber server that `mirror tail`, `ports` and `stats` talk to.
#[derive(Debug, Args)]
#[command(next_help_heading = "Subscriber server")]
pub struct ServerArgs {
    /// Where to accept clients: unix:PATH (mode 0600) or IP:PORT (needs
    /// --token-file); repeatable; `none` for no server.
    #[arg(long, value_name = "ADDR", default_value = "unix:/run/mirror/mirror.sock", value_parser = parse_listen)]
    pub listen: Vec<Listen>,

    /// File holding the token TCP clients must prove they know (it is never sent).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// Ports clients may add or subscribe to beyond the mirrored ones
    /// (ranges, e.g. 8000-8100,9000; repeatable). Default: none.
    #[arg(long, value_name = "PORTS", value_parser = AllowList::parse)]
    pub allow_ports: Vec<AllowList>,

    /// Clients served at once.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub max_clients: usize,

    /// Ports one client may subscribe to.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub max_client_ports: usize,

    /// A client whose socket takes no data for this long is disconnected
    /// (its connections already ended as "lagged" meanwhile).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub client_timeout: Duration,

    /// Shared memory for payloads, which local clients (`mirror tail` over
    /// the Unix socket) read in place instead of receiving copies; a page
    /// takes memory when first written (chunks are reused lowest first).
    /// Whole MiB; 0: no arena, every client gets bytes.
    #[arg(long, value_name = "BYTES", default_value = "256M", value_parser = parse_arena_size)]
    pub arena_size: u64,
}

impl ServerArgs {
    /// The listening addresses (none with `--listen none`).
    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.listen
            .iter()
            .filter_map(|l| match l {
                Listen::At(endpoint) => Some(endpoint.clone()),
                Listen::None => None,
            })
            .collect()
    }

    pub fn allow(&self) -> AllowList {
        let mut all = AllowList::default();
        for list in &self.allow_ports {
            all.extend(list.clone());
        }
        all
    }
}

/// A `--listen` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    At(Endpoint),
    None,
}

fn parse_listen(text: &str) -> Result<Listen, String> {
    if text == "none" {
        Ok(Listen::None)
    } else {
        text.parse().map(Listen::At)
    }
}

/// Limits of connection tracking, reassembly and fan-out.
#[derive(Debug, Args)]
#[command(next_help_heading = "Streams")]
pub struct StreamArgs {
    /// Flow shards (tasks that track connections); default: online CPUs.
    #[arg(long, value_name = "N")]
    pub shards: Option<usize>,

    /// Batches of segments each shard's queue holds; a full queue drops
    /// the batch and its connections end as "gap".
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub shard_queue: usize,

    /// Connections tracked at once; at the limit the oldest idle one is
    /// closed as "evicted".
    #[arg(long, value_name = "N", default_value_t = 65536)]
    pub max_connections: usize,

    /// Memory held in reorder buffers, all connections together (each held
    /// segment counts its payload plus about 140 bytes); over it the
    /// oldest idle connections are closed as "evicted".
    #[arg(long, value_name = "BYTES", default_value = "256M", value_parser = parse_size)]
    pub max_buffered_bytes: u64,

    /// A connection without packets for this long is closed as "idle".
    #[arg(long, value_name = "DURATION", default_value = "2m", value_parser = parse_duration)]
    pub idle_timeout: Duration,

    /// Memory one connection may hold behind a hole (counted as for
    /// --max-buffered-bytes) before it is closed as "gap". A flow's packets move between CPU rings when its sender
    /// migrates, and a busy CPU's ring can be read tens of milliseconds
    /// after another's: 4 MiB closed healthy flows as "gap" on a saturated
    /// 2-core machine, 16 MiB did not.
    #[arg(long, value_name = "BYTES", default_value = "16M", value_parser = parse_size)]
    pub reorder_bytes: u64,

    /// How long a hole may stay open before its connection is closed as
    /// "gap" (a TCP retransmission fills a real one within an RTO).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub reorder_timeout: Duration,

    /// Batches of events each port's channel holds before a slow consumer
    /// lags (its connections end as "lagged").
    #[arg(long, value_name = "N", default_value_t = 4096)]
    pub channel_capacity: usize,

    /// Bytes each port's channel may hold (memory used only while a
    /// consumer is behind); lowers the capacity if needed. What a stalled
    /// consumer keeps alive is memory the ring drain must write into cold:
    /// measured on bulk iperf3 (2 cores, 32 MiB L3), 256M made the kernel
    /// ring overflow beside a stalled consumer in every run, 32M in none.
    #[arg(long, value_name = "BYTES", default_value = "32M", value_parser = parse_size)]
    pub channel_bytes: u64,
}

/// `--attach`.
const ATTACH_MODES: &[Choice<AttachMode>] = &[
    (
        "auto",
        "The attach point that costs the traffic least on this interface",
        AttachMode::Auto,
    ),
    (
        "tc",
        "TC ingress (TCX link where the kernel has it, else a clsact filter)",
        AttachMode::Tc,
    ),
    (
        "xdp",
        "XDP, native if the driver supports it, else generic",
        AttachMode::Xdp,
    ),
    ("xdp-skb", "Generic (skb) XDP", AttachMode::XdpSkb),
    (
        "xdp-drv",
        "Native (driver) XDP; fails where the driver has none",
        AttachMode::XdpDrv,
    ),
];

/// `--directions`.
const DIRECTIONS: &[Choice<Directions>] = &[
    (
        "client",
        "What clients send to the ports (ingress)",
        Directions::Client,
    ),
    (
        "both",
        "Also what the servers answer (TC egress; not with XDP)",
        Directions::Both,
    ),
];

/// `--deliver`.
const DELIVERIES: &[Choice<Delivery>] = &[
    (
        "acked",
        "Once the other side's ACK covers it (needs --directions both)",
        Delivery::Acked,
    ),
    (
        "seen",
        "As soon as it arrived in order at the interface",
        Delivery::Seen,
    ),
];

impl RunArgs {
    /// `--directions`, or what the attach mode captures by default.
    pub fn directions(&self) -> Directions {
        self.directions
            .unwrap_or_else(|| attach::default_directions(self.attach))
    }
}

/// `--deliver`, or its default for `directions`.
fn delivery(directions: Directions, deliver: Option<Delivery>) -> anyhow::Result<Delivery> {
    match (directions, deliver) {
        (Directions::Client, Some(Delivery::Acked)) => anyhow::bail!(
            "--deliver acked needs the servers' ACKs: add --directions both, or use --deliver seen"
        ),
        (Directions::Client, _) => Ok(Delivery::Seen),
        (Directions::Both, deliver) => Ok(deliver.unwrap_or(Delivery::Acked)),
    }
}

/// `--print`.
const PRINT_FORMATS: &[Choice<PrintFormat>] = &[
    ("text", "tcpdump-like text", PrintFormat::Text),
    ("json", "One JSON object per line", PrintFormat::Json),
];

/// `--print-packets`.
const PACKET_FORMATS: &[Choice<PacketFormat>] = &[
    ("text", "tcpdump-like text", PacketFormat::Text),
    ("json", "One JSON object per line", PacketFormat::Json),
];

/// `--pcap-format`.
const PCAP_FORMATS: &[Choice<PcapFormat>] = &[
    (
        "pcap",
        "Classic pcap, nanosecond timestamps",
        PcapFormat::Pcap,
    ),
    (
        "pcapng",
        "pcapng with the interface's name and nanosecond timestamps",
        PcapFormat::Pcapng,
    ),
];

fn parse_snaplen(text: &str) -> Result<u32, String> {
    match text.trim().parse::<u32>() {
        Ok(n) if (1..=MAX_SNAPLEN).contains(&n) => Ok(n),
        _ => Err(format!(
            "'{text}' is not a snap length: use a number of bytes from 1 to {MAX_SNAPLEN}"
        )),
    }
}

/// Page size assumed for the lower bound; the kernel checks the real one.
const MIN_RING_SIZE: u64 = 4096;

/// Rings are allocated per CPU; 1 GiB each is far beyond any useful size.
const MAX_RING_SIZE: u64 = 1 << 30;

fn parse_arena_size(text: &str) -> Result<u64, String> {
    if text.trim() == "0" {
        return Ok(0);
    }
    match parse_size(text) {
        Ok(n) if n % (1 << 20) == 0 && n <= 64 << 30 => Ok(n),
        _ => Err(format!(
            "'{text}' is not an arena size: use whole MiB up to 64G, such as 256M, or 0 for none"
        )),
    }
}

fn parse_ring_size(text: &str) -> Result<u32, String> {
    match parse_size(text) {
        Ok(n) if n.is_power_of_two() && (MIN_RING_SIZE..=MAX_RING_SIZE).contains(&n) => {
            Ok(n as u32)
        }
        _ => Err(format!(
            "'{text}' is not a ring size: use a power of two from 4K to 1G, such as 8M"
        )),
    }
}

/// `mirror run` once its privileged start is done.
pub struct Prepared {
    setup: Setup,
    config: PipelineConfig,
    /// The counters go to standard output as JSON (`--print json`).
    json_report: bool,
}

/// The part of `mirror run` that needs root ([`Setup::privileged`]).
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
    // Before anything is loaded: a mistake costs nothing.
    attach::check_directions(args.attach, args.directions())?;
    let deliver = delivery(args.directions(), args.deliver)?;
    if args.sinks.compare && args.directions() != Directions::Both {
        anyhow::bail!(
            "--compare compares the shadow's answers with the production server's, which only --directions both captures: add --directions both"
        );
    }
    let setup = Setup::privileged(setup_config(&args, log_level)?)?;
    Ok(Prepared {
        setup,
        config: pipeline_config(&args, deliver),
        json_report: args.print == Some(PrintFormat::Json)
            || args.print_packets == Some(PacketFormat::Json),
    })
}

pub async fn run(prepared: Prepared) -> anyhow::Result<()> {
    // Watching the signals before saying "mirroring": from then on a
    // SIGINT or SIGTERM detaches in order and prints the counters.
    let mut sigint = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut setup = prepared.setup;
    let watched_process = setup.take_watched_process();
    let mut running = Pipeline::start(setup, prepared.config);
    running
        .serve_until(async {
            tokio::select! {
                _ = sigint.recv() => {}
                _ = sigterm.recv() => {}
                () = process_exited(watched_process) => {}
            }
        })
        .await;
    let report = running.shutdown().await?;
    if prepared.json_report {
        println!("{}", report.to_json());
    } else {
        eprintln!("{report}");
    }
    report.failure.map_or(Ok(()), |failure| Err(failure.into()))
}

/// Completes when the process of `--pid` has exited; never without one.
async fn process_exited(watched: Option<ProcessExit>) {
    let Some(watched) = watched else {
        return std::future::pending().await;
    };
    let pid = watched.pid;
    match watched.exited().await {
        Ok(()) => tracing::warn!(
            "process {pid}, whose network namespace the mirror watches, has exited: the mirror stops"
        ),
        Err(error) => {
            tracing::warn!("cannot watch process {pid} any more ({error}); the mirror goes on");
            std::future::pending::<()>().await;
        }
    }
}

fn setup_config(args: &RunArgs, log_level: LevelFilter) -> anyhow::Result<SetupConfig> {
    let sample = if args.sample >= 100 {
        Sample::ALL
    } else {
        Sample::random(args.sample).context("cannot draw a random seed for --sample")?
    };
    let netns = match (&args.netns, args.pid) {
        (Some(netns), _) => Some(NetnsArg::Named(netns.clone())),
        (None, Some(pid)) => Some(NetnsArg::Pid(pid)),
        (None, None) => None,
    };
    let watched = watched_label(args);
    Ok(SetupConfig {
        ifaces: args.iface.clone(),
        netns,
        ports: args.ports.iter().map(|p| p.get()).collect(),
        attach: args.attach,
        directions: args.directions(),
        tc_netlink: args.tc_netlink,
        user: args.user.clone(),
        load: LoadOptions {
            snaplen: args.snaplen,
            ring_size: args.ring_size.unwrap_or_else(loader::default_ring_size),
            kernel_log_level: aya_log_level(log_level),
            sample,
            // Set by the privileged start once it knows the namespaces.
            netns_path: None,
        },
        dump_dir: args.dump_dir.clone(),
        pcap: args.sinks.pcap.as_ref().map(|path| PcapConfig {
            path: path.clone(),
            format: args.sinks.pcap_format,
            rotate_size: args.sinks.pcap_rotate_size,
            keep: args.sinks.pcap_keep,
            iface: watched.clone(),
            snaplen: args.snaplen,
        }),
        server: ServerConfig {
            endpoints: args.server.endpoints(),
            token: None,
            max_clients: args.server.max_clients,
            write_timeout: args.server.client_timeout,
            name: format!("mirror {} on {watched}", env!("CARGO_PKG_VERSION")),
        },
        compare_report: args.sinks.compare_report.clone(),
        token_file: args.server.token_file.clone(),
        nats_creds: args.nats.nats_creds.clone(),
        metrics: args.metrics,
    })
}

/// The watched interfaces as the command line names them.
fn watched_label(args: &RunArgs) -> String {
    let netns = match (&args.netns, args.pid) {
        (Some(netns), _) => Some(netns.clone()),
        (None, Some(pid)) => Some(format!("pid{pid}")),
        (None, None) => None,
    };
    let ifaces: Vec<String> = args.iface.iter().map(ToString::to_string).collect();
    match (netns, ifaces.is_empty()) {
        (Some(netns), true) => netns,
        (Some(netns), false) => format!("{} (in {netns})", ifaces.join(", ")),
        (None, _) => ifaces.join(", "),
    }
}

fn pipeline_config(args: &RunArgs, deliver: Delivery) -> PipelineConfig {
    PipelineConfig {
        hub: hub_config(&args.streams),
        shards: shard_config(&args.streams, deliver),
        print: args.print,
        print_packets: args.print_packets,
        forward: args.sinks.forward.clone(),
        forward_config: ForwardConfig {
            max_connections: args.sinks.forward_max_conns,
            sample_percent: args.sinks.forward_sample,
        },
        compare: args.sinks.compare.then_some(args.sinks.compare_timeout),
        allow: args.server.allow(),
        max_client_ports: args.server.max_client_ports,
        arena_size: args.server.arena_size as usize,
        nats: args.nats.config(),
    }
}

fn shard_config(args: &StreamArgs, deliver: Delivery) -> ShardConfig {
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
            deliver,
        },
    }
}

fn hub_config(args: &StreamArgs) -> HubConfig {
    HubConfig {
        capacity: args.channel_capacity,
        max_bytes: args.channel_bytes as usize,
        batch_bytes: HubConfig::BATCH_BYTES,
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

#[cfg(test)]
mod tests {
    use std::num::NonZeroU16;

    use super::*;
    use clap::Parser as _;

    use crate::cli::{Cli, Command};

    fn run_args(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let argv = ["mirror", "run"].iter().chain(args).copied();
        Cli::try_parse_from(argv).map(|cli| match cli.command {
            Command::Run(run) => *run,
            other => panic!("not run: {other:?}"),
        })
    }

    #[test]
    fn nats_flags() {
        let args = run_args(&["-i", "lo", "-p", "80"]).unwrap();
        assert!(args.nats.config().is_none(), "off unless --nats");
        let args = run_args(&[
            "-i",
            "lo",
            "-p",
            "80",
            "--nats",
            "nats://127.0.0.1:4222,nats://127.0.0.1:4223",
            "--node-name",
            "web-1",
            "--nats-subject",
            "fleet.mirror",
            "--nats-replicas",
            "3",
            "--nats-max-age",
            "1h",
        ])
        .unwrap();
        let config = args.nats.config().unwrap();
        assert_eq!(config.servers.0.len(), 2);
        assert_eq!(
            (config.node.as_str(), config.prefix.as_str()),
            ("web-1", "fleet.mirror")
        );
        assert_eq!(config.retention.replicas, 3);
        assert_eq!(config.retention.max_age, Duration::from_secs(3600));
        assert_eq!(config.retention.max_bytes, 1 << 30);
        for bad in [
            &["--nats-creds", "x.creds"][..],
            &["--nats", "nats://127.0.0.1:4222", "--node-name", "a.b"],
            &["--nats", "nats://127.0.0.1:4222", "--nats-subject", "m.*"],
            &["--nats", "nats://127.0.0.1:4222", "--nats-replicas", "0"],
        ] {
            let mut all = vec!["-i", "lo", "-p", "80"];
            all.extend(bad);
            assert!(run_args(&all).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sample_percent_bounds_and_seed() {
        let args = run_args(&["-i", "lo", "-p", "80"]).unwrap();
        assert_eq!(args.sample, 100);
        let config = setup_config(&args, LevelFilter::OFF).unwrap();
        assert_eq!(config.load.sample, Sample::ALL, "no hashing by default");
        let args = run_args(&["-i", "lo", "-p", "80", "--sample", "10"]).unwrap();
        assert_eq!(args.sample, 10);
        let seeds: Vec<u32> = (0..4)
            .map(|_| {
                setup_config(&args, LevelFilter::OFF)
                    .unwrap()
                    .load
                    .sample
                    .seed
            })
            .collect();
        assert!(
            seeds.iter().any(|seed| *seed != seeds[0]),
            "a new seed each start: {seeds:?}"
        );
        for bad in ["0", "101", "-1", "ten", "50.5"] {
            assert!(
                run_args(&["-i", "lo", "-p", "80", "--sample", bad]).is_err(),
                "--sample {bad}"
            );
        }
    }

    #[test]
    fn sink_options() {
        let args = run_args(&["-i", "lo", "-p", "80"]).unwrap();
        assert!(args.sinks.forward.is_empty());
        assert_eq!(args.sinks.forward_sample, 100);
        assert_eq!(args.sinks.pcap_format, PcapFormat::Pcapng);
        let args = run_args(&[
            "-i",
            "lo",
            "-p",
            "80",
            "--forward",
            "198.18.1.2:80",
            "--forward",
            "80=198.18.1.3:8080",
            "--forward-sample",
            "50",
            "--pcap",
            "/tmp/c.pcapng",
            "--pcap-format",
            "pcap",
            "--pcap-rotate-size",
            "10M",
            "--pcap-keep",
            "3",
        ])
        .unwrap();
        assert_eq!(args.sinks.forward.len(), 2);
        assert_eq!(args.sinks.forward[1].port, Some(80));
        assert_eq!(args.sinks.forward_sample, 50);
        assert_eq!(args.sinks.pcap_rotate_size, Some(10 << 20));
        assert_eq!(args.sinks.pcap_keep, Some(3));
        assert!(run_args(&["-i", "lo", "-p", "80", "--forward-sample", "101"]).is_err());
        assert!(run_args(&["-i", "lo", "-p", "80", "--pcap-keep", "3"]).is_err());
        assert!(run_args(&["-i", "lo", "-p", "80", "--forward", "nowhere"]).is_err());
    }

    #[test]
    fn compare_options() {
        let args = run_args(&["-i", "lo", "-p", "80"]).unwrap();
        assert!(!args.sinks.compare);
        assert_eq!(pipeline_config(&args, Delivery::Seen).compare, None);
        let args = run_args(&[
            "-i",
            "lo",
            "-p",
            "80",
            "--directions",
            "both",
            "--forward",
            "198.18.1.2:80",
            "--compare",
            "--compare-report",
            "/tmp/r.jsonl",
            "--compare-timeout",
            "500ms",
        ])
        .unwrap();
        assert_eq!(
            pipeline_config(&args, Delivery::Seen).compare,
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            setup_config(&args, LevelFilter::OFF)
                .unwrap()
                .compare_report,
            Some(PathBuf::from("/tmp/r.jsonl"))
        );
        let args = run_args(&[
            "-i",
            "lo",
            "-p",
            "80",
            "--forward",
            "1.2.3.4:80",
            "--compare",
        ]);
        assert_eq!(
            pipeline_config(&args.unwrap(), Delivery::Seen).compare,
            Some(Duration::from_secs(3)),
            "the default timeout"
        );
        assert!(
            run_args(&["-i", "lo", "-p", "80", "--compare"]).is_err(),
            "--compare needs --forward"
        );
        assert!(
            run_args(&["-i", "lo", "-p", "80", "--compare-report", "/tmp/r"]).is_err(),
            "--compare-report needs --compare"
        );
        let err = prepare(
            run_args(&[
                "-i",
                "lo",
                "-p",
                "80",
                "--directions",
                "client",
                "--forward",
                "1.2.3.4:80",
                "--compare",
            ])
            .unwrap(),
            LevelFilter::OFF,
        )
        .err()
        .expect("refused without --directions both");
        assert!(err.to_string().contains("add --directions both"), "{err}");
    }

    #[test]
    fn server_options() {
        let args = run_args(&["-i", "lo", "-p", "1"]).unwrap();
        assert_eq!(args.server.endpoints(), [Endpoint::default()]);
        assert_eq!(args.server.allow().to_string(), "none");
        let args = run_args(&[
            "-i",
            "lo",
            "-p",
            "1",
            "--listen",
            "unix:/tmp/a.sock",
            "--listen",
            "127.0.0.1:7000",
            "--allow-ports",
            "8000-8002",
            "--allow-ports",
            "9000",
            "--token-file",
            "/t",
            "--client-timeout",
            "5s",
        ])
        .unwrap();
        assert_eq!(args.server.endpoints().len(), 2);
        assert_eq!(args.server.allow().to_string(), "8000-8002,9000");
        assert_eq!(args.server.client_timeout, Duration::from_secs(5));
        let args = run_args(&["-i", "lo", "-p", "1", "--listen", "none"]).unwrap();
        assert!(args.server.endpoints().is_empty());
        assert!(run_args(&["-i", "lo", "-p", "1", "--listen", "nowhere"]).is_err());
        assert!(run_args(&["-i", "lo", "-p", "1", "--allow-ports", "80-70"]).is_err());
    }

    #[test]
    fn run_defaults() {
        let args = run_args(&["--iface", "lo", "--port", "8080"]).unwrap();
        assert_eq!(args.iface, ["lo".parse().unwrap()]);
        assert_eq!(args.ports, [NonZeroU16::new(8080).unwrap()]);
        assert_eq!(args.attach, AttachMode::Auto);
        assert_eq!(
            args.directions(),
            Directions::Both,
            "TC captures both by default"
        );
        assert_eq!(args.snaplen, MAX_SNAPLEN);
        assert_eq!(args.print, None);
        assert_eq!(args.print_packets, None);
        assert_eq!(args.dump_dir, None);
        assert_eq!(args.ring_size, None);
        assert_eq!(args.streams.shards, None);
        assert_eq!(args.streams.idle_timeout, Duration::from_secs(120));
        assert_eq!(args.streams.reorder_timeout, Duration::from_secs(1));
        assert_eq!(args.streams.max_buffered_bytes, 256 << 20);
        assert_eq!(args.streams.channel_bytes, 32 << 20);
        assert!(!args.tc_netlink);
    }

    #[test]
    fn run_all_options() {
        let args = run_args(&[
            "-i",
            "eth0",
            "-p",
            "80",
            "--port",
            "443",
            "--attach",
            "xdp-drv",
            "--snaplen",
            "128",
            "--print",
            "json",
            "--ring-size",
            "64K",
        ])
        .unwrap();
        assert_eq!(args.iface, ["eth0".parse().unwrap()]);
        let ports: Vec<u16> = args.ports.iter().map(|p| p.get()).collect();
        assert_eq!(ports, [80, 443]);
        assert_eq!(args.attach, AttachMode::XdpDrv);
        assert_eq!(args.snaplen, 128);
        assert_eq!(args.print, Some(PrintFormat::Json));
        assert_eq!(args.ring_size, Some(64 << 10));
    }

    #[test]
    fn interfaces_and_namespaces() {
        let args = run_args(&["-i", "a:eth0", "-i", "eth1", "-p", "1", "--pid", "7"]).unwrap();
        assert_eq!(args.iface.len(), 2);
        assert_eq!(args.iface[0].netns.as_deref(), Some("a"));
        assert_eq!(args.pid, Some(7));
        assert_eq!(watched_label(&args), "a:eth0, eth1 (in pid7)");
        let args = run_args(&["--netns", "pod1", "-p", "1"]).unwrap();
        assert!(args.iface.is_empty());
        assert_eq!(watched_label(&args), "pod1");
        assert!(
            run_args(&["-p", "1"]).is_err(),
            "an interface or a namespace is needed"
        );
        assert!(run_args(&["--netns", "a", "--pid", "1", "-p", "1"]).is_err());
        let err = run_args(&["-i", "pod1:", "-p", "1"]).unwrap_err();
        assert!(err.to_string().contains("names no interface"), "{err}");
    }

    #[test]
    fn every_attach_mode_parses() {
        for (name, mode) in [
            ("auto", AttachMode::Auto),
            ("tc", AttachMode::Tc),
            ("xdp", AttachMode::Xdp),
            ("xdp-skb", AttachMode::XdpSkb),
            ("xdp-drv", AttachMode::XdpDrv),
        ] {
            let args = run_args(&["-i", "lo", "-p", "1", "--attach", name]).unwrap();
            assert_eq!(args.attach, mode, "{name}");
        }
        assert!(run_args(&["-i", "lo", "-p", "1", "--attach", "ebpf"]).is_err());
        for (name, directions) in [("client", Directions::Client), ("both", Directions::Both)] {
            let args = run_args(&["-i", "lo", "-p", "1", "--directions", name]).unwrap();
            assert_eq!(args.directions(), directions, "{name}");
        }
        assert!(run_args(&["-i", "lo", "-p", "1", "--directions", "server"]).is_err());
    }

    #[test]
    fn delivery_follows_the_directions_unless_given() {
        let deliver = |extra: &[&str]| {
            let mut argv = vec!["-i", "lo", "-p", "1"];
            argv.extend_from_slice(extra);
            let args = run_args(&argv).unwrap();
            delivery(args.directions(), args.deliver).map_err(|e| e.to_string())
        };
        // TC (the default attach) captures both directions: acked.
        assert_eq!(deliver(&[]), Ok(Delivery::Acked));
        assert_eq!(deliver(&["--attach", "xdp"]), Ok(Delivery::Seen));
        assert_eq!(deliver(&["--directions", "both"]), Ok(Delivery::Acked));
        assert_eq!(
            deliver(&["--directions", "both", "--deliver", "seen"]),
            Ok(Delivery::Seen)
        );
        assert_eq!(deliver(&["--deliver", "seen"]), Ok(Delivery::Seen));
        assert_eq!(deliver(&["--directions", "client"]), Ok(Delivery::Seen));
        let refused = deliver(&["--directions", "client", "--deliver", "acked"]).unwrap_err();
        assert!(
            refused.contains("add --directions both, or use --deliver seen"),
            "{refused}"
        );
        assert!(run_args(&["-i", "lo", "-p", "1", "--deliver", "read"]).is_err());
    }

    #[test]
    fn bad_ports_are_refused_with_a_clear_message() {
        for bad in ["0", "65536", "-1", "http", ""] {
            let arg = format!("--port={bad}");
            let err = run_args(&["--iface", "lo", &arg]).unwrap_err();
            assert!(
                err.to_string().contains("use a number from 1 to 65535"),
                "{bad}: {err}"
            );
        }
        assert!(run_args(&["--iface", "lo"]).is_err(), "a port is required");
    }

    #[test]
    fn snaplen_bounds() {
        assert_eq!(
            run_args(&["-i", "lo", "-p", "1", "--snaplen", "1"])
                .unwrap()
                .snaplen,
            1
        );
        let max = MAX_SNAPLEN.to_string();
        let args = run_args(&["-i", "lo", "-p", "1", "--snaplen", &max]).unwrap();
        assert_eq!(args.snaplen, MAX_SNAPLEN);
        let over = (MAX_SNAPLEN + 1).to_string();
        for bad in ["0", over.as_str(), "x"] {
            let result = run_args(&["-i", "lo", "-p", "1", "--snaplen", bad]);
            assert!(result.is_err(), "{bad}");
        }
    }

    #[test]
    fn stream_options() {
        let args = run_args(&[
            "-i",
            "lo",
            "-p",
            "1",
            "--dump-dir",
            "/tmp/x",
            "--shards",
            "3",
            "--shard-queue",
            "1",
            "--max-connections",
            "10",
            "--max-buffered-bytes",
            "1M",
            "--idle-timeout",
            "500ms",
            "--reorder-bytes",
            "64K",
            "--reorder-timeout",
            "2s",
            "--channel-capacity",
            "8",
            "--channel-bytes",
            "1G",
        ])
        .unwrap();
        assert_eq!(args.dump_dir, Some(PathBuf::from("/tmp/x")));
        let s = &args.streams;
        assert_eq!(s.shards, Some(3));
        assert_eq!(s.shard_queue, 1);
        assert_eq!(s.max_connections, 10);
        assert_eq!(s.max_buffered_bytes, 1 << 20);
        assert_eq!(s.idle_timeout, Duration::from_millis(500));
        assert_eq!(s.reorder_bytes, 64 << 10);
        assert_eq!(s.reorder_timeout, Duration::from_secs(2));
        assert_eq!(s.channel_capacity, 8);
        assert_eq!(s.channel_bytes, 1 << 30);
        assert!(run_args(&["-i", "lo", "-p", "1", "--idle-timeout", "soon"]).is_err());
        assert!(
            run_args(&[
                "-i",
                "lo",
                "-p",
                "1",
                "--print",
                "text",
                "--print-packets",
                "json"
            ])
            .is_err()
        );
    }

    #[test]
    fn ring_sizes() {
        assert_eq!(parse_ring_size("4096"), Ok(4096));
        assert_eq!(parse_ring_size("4k"), Ok(4096));
        assert_eq!(parse_ring_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_ring_size("1G"), Ok(1 << 30));
        for bad in ["3000", "2K", "2G", "8X", "", "M"] {
            assert!(parse_ring_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn arena_sizes() {
        assert_eq!(parse_arena_size("256M"), Ok(256 << 20));
        assert_eq!(parse_arena_size("0"), Ok(0));
        assert_eq!(parse_arena_size("1G"), Ok(1 << 30));
        for bad in ["1500K", "1", "65G", "", "-1"] {
            assert!(parse_arena_size(bad).is_err(), "{bad}");
        }
    }
}

//! Command line of the `mirror` binary.

use std::{num::NonZeroU16, path::PathBuf, time::Duration};

use clap::{
    Args, Parser, Subcommand,
    builder::{PossibleValue, PossibleValuesParser, TypedValueParser},
};
use mirror_common::MAX_SNAPLEN;

use mirror_user::{
    control::ports::AllowList,
    kernel::attach::AttachMode,
    server::Endpoint,
    sinks::{
        forward::ForwardTarget, pcap::PcapFormat, print::PrintFormat, print_packets::PacketFormat,
    },
};

pub mod run;
pub mod tail;

/// Mirror the TCP traffic of chosen ports, kernel-assisted, without ever
/// touching it.
#[derive(Debug, Parser)]
#[command(name = "mirror", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach to an interface and mirror the TCP traffic to the given ports.
    #[command(after_long_help = RUN_EXAMPLES)]
    Run(Box<RunArgs>),
    /// Connect to a running mirror and print (or dump) the streams of ports.
    #[command(after_long_help = TAIL_EXAMPLES)]
    Tail(TailArgs),
    /// List, add or remove the ports a running mirror mirrors.
    Ports(PortsArgs),
    /// Print every counter of a running mirror.
    Stats(StatsArgs),
    /// The privileged helper `mirror run` starts for itself (internal).
    #[command(name = "privileged-helper", hide = true)]
    PrivilegedHelper,
}

const TAIL_EXAMPLES: &str = "\
Examples:
  # Follow port 8080 of the mirror listening on the default socket:
  mirror tail --port 8080

  # Keep each connection in a file, from a mirror on another host:
  mirror tail --connect 198.18.0.2:7000 --token-file token --port 80 --dump-dir flows";

/// How to reach a running mirror.
#[derive(Debug, Args)]
pub struct ConnectArgs {
    /// The mirror's address: unix:PATH or IP:PORT.
    #[arg(long, global = true, value_name = "ADDR", default_value_t = Endpoint::default())]
    pub connect: Endpoint,

    /// File holding the token (required by TCP listeners).
    #[arg(long, global = true, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct TailArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,

    /// Port to follow (repeatable); ports the mirror does not mirror yet
    /// must be inside its --allow-ports.
    #[arg(short, long = "port", value_name = "P", required = true, value_parser = parse_port)]
    pub ports: Vec<NonZeroU16>,

    /// How to print events.
    #[arg(long, value_parser = one_of(TAIL_FORMATS), default_value = "text")]
    pub format: PrintFormat,

    /// Write each connection to a file in DIR instead (as `mirror run
    /// --dump-dir` does).
    #[arg(long, value_name = "DIR")]
    pub dump_dir: Option<PathBuf>,

    /// Started as root: once connected (and DIR opened), run as USER, as
    /// tcpdump -Z does (DIR, if created, belongs to USER). `--user root`
    /// keeps root. Default: nobody.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
}

/// `mirror tail --format`.
const TAIL_FORMATS: &[Choice<PrintFormat>] = &[
    (
        "text",
        "One line per event, data shown as escaped text",
        PrintFormat::Text,
    ),
    (
        "json",
        "One JSON object per line, as `mirror run --print json`",
        PrintFormat::Json,
    ),
    (
        "hex",
        "Events as text, data as a hex dump",
        PrintFormat::Hex,
    ),
];

#[derive(Debug, Args)]
pub struct PortsArgs {
    #[command(subcommand)]
    pub action: PortsAction,

    #[command(flatten)]
    pub connect: ConnectArgs,
}

#[derive(Debug, Subcommand)]
pub enum PortsAction {
    /// The mirrored ports, with why each is mirrored.
    List,
    /// Mirror a port until `remove` (it must be inside --allow-ports).
    Add {
        #[arg(value_parser = parse_port)]
        port: NonZeroU16,
    },
    /// Stop mirroring a port added with `add`.
    Remove {
        #[arg(value_parser = parse_port)]
        port: NonZeroU16,
    },
}

#[derive(Debug, Args)]
pub struct StatsArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,

    /// Refresh every second, in place, until interrupted.
    #[arg(long)]
    pub watch: bool,

    /// Print the raw JSON document.
    #[arg(long, conflicts_with = "watch")]
    pub json: bool,
}

const RUN_EXAMPLES: &str = "\
Examples:
  # Print the connections to a local service on port 8080, with their bytes:
  mirror run --iface lo --port 8080 --print text
  # (then, in another terminal: curl http://127.0.0.1:8080/)

  # Keep each connection's request bytes in a file, as tcpflow does:
  mirror run --iface eth0 --port 80 --dump-dir /tmp/flows

  # One JSON line per packet, first 256 bytes of each:
  mirror run --iface eth0 --port 80 --port 443 --snaplen 256 --print-packets json

Needs root, or the capabilities CAP_BPF and CAP_NET_ADMIN. Once attached it
runs as --user (default nobody) with no capability left, as tcpdump -Z does.
Stop with Ctrl-C: the program is detached and the counters are printed.";

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Interface to watch (ingress traffic), e.g. eth0 or lo.
    #[arg(short, long, value_name = "IF")]
    pub iface: String,

    /// Destination TCP port to mirror (repeatable).
    #[arg(short, long = "port", value_name = "P", required = true, value_parser = parse_port)]
    pub ports: Vec<NonZeroU16>,

    /// Where to attach the program. `auto` picks the attach point that costs
    /// the watched traffic least on this interface (TC).
    #[arg(long, value_parser = one_of(ATTACH_MODES), default_value = "auto")]
    pub attach: AttachMode,

    /// Bytes of each packet to keep, from the start of the Ethernet header
    /// (headers up to TCP are always kept). Default: the whole packet, up to
    /// 64 KiB GSO/GRO super-packets.
    #[arg(long, value_name = "N", default_value_t = MAX_SNAPLEN, value_parser = parse_snaplen)]
    pub snaplen: u32,

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

    #[command(flatten)]
    pub streams: StreamArgs,

    #[command(flatten)]
    pub server: ServerArgs,

    #[command(flatten)]
    pub sinks: SinkArgs,

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
    /// service at IP:PORT (answers are discarded); PORT=IP:PORT for the
    /// connections of one mirrored port only. Repeatable.
    #[arg(long, value_name = "[PORT=]IP:PORT")]
    pub forward: Vec<ForwardTarget>,

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

/// A command-line name for a value of a domain enum, with its help: the
/// enums stay where their stage is, free of clap.
type Choice<T> = (&'static str, &'static str, T);

/// A value parser that takes one of `choices` by name.
fn one_of<T: Clone + Send + Sync + 'static>(
    choices: &'static [Choice<T>],
) -> impl TypedValueParser<Value = T> {
    PossibleValuesParser::new(
        choices
            .iter()
            .map(|(name, help, _)| PossibleValue::new(*name).help(*help)),
    )
    .map(move |name| {
        choices
            .iter()
            .find(|(known, _, _)| *known == name)
            .map(|(_, _, value)| value.clone())
            .expect("clap accepts only the names of the choices")
    })
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

/// Parses a TCP port, 1 to 65535.
pub fn parse_port(text: &str) -> Result<NonZeroU16, String> {
    text.trim()
        .parse::<u16>()
        .ok()
        .and_then(NonZeroU16::new)
        .ok_or_else(|| format!("'{text}' is not a TCP port: use a number from 1 to 65535"))
}

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

/// Parses a byte count with an optional K, M or G suffix (powers of 1024).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let (digits, unit) = match trimmed.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => trimmed.split_at(i),
        None => (trimmed, ""),
    };
    let multiplier: u64 = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        _ => 0,
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .filter(|n| *n > 0)
        .ok_or_else(|| {
            format!("'{text}' is not a size: use a number of bytes, such as 512K or 64M")
        })
}

/// Parses a duration such as `500ms`, `2s` or `5m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|_| {
        format!("'{text}' is not a duration: use a number with a unit, such as 500ms, 2s or 5m")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let argv = ["mirror", "run"].iter().chain(args).copied();
        Cli::try_parse_from(argv).map(|cli| match cli.command {
            Command::Run(run) => *run,
            other => panic!("not run: {other:?}"),
        })
    }

    fn command(args: &[&str]) -> Result<Command, clap::Error> {
        Cli::try_parse_from(std::iter::once("mirror").chain(args.iter().copied()))
            .map(|c| c.command)
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
    fn client_commands() {
        match command(&[
            "tail",
            "-p",
            "80",
            "--format",
            "hex",
            "--connect",
            "127.0.0.1:7000",
        ])
        .unwrap()
        {
            Command::Tail(tail) => {
                assert_eq!(tail.format, PrintFormat::Hex);
                assert_eq!(tail.connect.connect.to_string(), "127.0.0.1:7000");
            }
            other => panic!("{other:?}"),
        }
        assert!(command(&["tail"]).is_err(), "a port is required");
        match command(&["ports", "list", "--connect", "unix:/tmp/x.sock"]).unwrap() {
            Command::Ports(PortsArgs {
                action: PortsAction::List,
                connect,
            }) => {
                assert_eq!(connect.connect.to_string(), "unix:/tmp/x.sock");
            }
            other => panic!("{other:?}"),
        }
        match command(&["ports", "add", "8080"]).unwrap() {
            Command::Ports(PortsArgs {
                action: PortsAction::Add { port },
                connect,
            }) => {
                assert_eq!(port.get(), 8080);
                assert_eq!(connect.connect, Endpoint::default());
            }
            other => panic!("{other:?}"),
        }
        assert!(command(&["ports", "remove", "0"]).is_err());
        assert!(matches!(
            command(&["stats", "--watch"]).unwrap(),
            Command::Stats(StatsArgs { watch: true, .. })
        ));
        assert!(command(&["stats", "--watch", "--json"]).is_err());
    }

    #[test]
    fn run_defaults() {
        let args = run_args(&["--iface", "lo", "--port", "8080"]).unwrap();
        assert_eq!(args.iface, "lo");
        assert_eq!(args.ports, [NonZeroU16::new(8080).unwrap()]);
        assert_eq!(args.attach, AttachMode::Auto);
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
        assert_eq!(args.iface, "eth0");
        let ports: Vec<u16> = args.ports.iter().map(|p| p.get()).collect();
        assert_eq!(ports, [80, 443]);
        assert_eq!(args.attach, AttachMode::XdpDrv);
        assert_eq!(args.snaplen, 128);
        assert_eq!(args.print, Some(PrintFormat::Json));
        assert_eq!(args.ring_size, Some(64 << 10));
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
    fn sizes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("2k"), Ok(2048));
        assert!(parse_size("0").is_err());
        assert!(parse_size("1T").is_err());
        assert!(parse_size("99999999999G").is_err(), "overflow");
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
}

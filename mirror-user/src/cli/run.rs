//! `mirror run`: its arguments mapped onto the stages' configurations, the
//! privileged start, then the pipeline until SIGINT or SIGTERM, and its
//! counters.

use anyhow::Context as _;
use mirror_user::{
    fanout::hub::HubConfig,
    flow::{conntrack::TableLimits, reassembly::ReorderLimits},
    kernel::loader::{self, LoadOptions},
    pipeline::{
        Pipeline, PipelineConfig,
        setup::{Setup, SetupConfig},
        shards::ShardConfig,
    },
    server::ServerConfig,
    sinks::{
        forward::ForwardConfig, pcap::PcapConfig, print::PrintFormat, print_packets::PacketFormat,
    },
};
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::filter::LevelFilter;

use crate::cli::{RunArgs, StreamArgs};

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
    let setup = Setup::privileged(setup_config(&args, log_level))?;
    Ok(Prepared {
        setup,
        config: pipeline_config(&args),
        json_report: args.print == Some(PrintFormat::Json)
            || args.print_packets == Some(PacketFormat::Json),
    })
}

pub async fn run(prepared: Prepared) -> anyhow::Result<()> {
    // Watching the signals before saying "mirroring": from then on a
    // SIGINT or SIGTERM detaches in order and prints the counters.
    let mut sigint = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut running = Pipeline::start(prepared.setup, prepared.config);
    running
        .serve_until(async {
            tokio::select! {
                _ = sigint.recv() => {}
                _ = sigterm.recv() => {}
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

fn setup_config(args: &RunArgs, log_level: LevelFilter) -> SetupConfig {
    SetupConfig {
        iface: args.iface.clone(),
        ports: args.ports.iter().map(|p| p.get()).collect(),
        attach: args.attach,
        tc_netlink: args.tc_netlink,
        user: args.user.clone(),
        load: LoadOptions {
            snaplen: args.snaplen,
            ring_size: args.ring_size.unwrap_or_else(loader::default_ring_size),
            kernel_log_level: aya_log_level(log_level),
        },
        dump_dir: args.dump_dir.clone(),
        pcap: args.sinks.pcap.as_ref().map(|path| PcapConfig {
            path: path.clone(),
            format: args.sinks.pcap_format,
            rotate_size: args.sinks.pcap_rotate_size,
            keep: args.sinks.pcap_keep,
            iface: args.iface.clone(),
            snaplen: args.snaplen,
        }),
        server: ServerConfig {
            endpoints: args.server.endpoints(),
            token: None,
            max_clients: args.server.max_clients,
            write_timeout: args.server.client_timeout,
            name: format!("mirror {} on {}", env!("CARGO_PKG_VERSION"), args.iface),
        },
        token_file: args.server.token_file.clone(),
    }
}

fn pipeline_config(args: &RunArgs) -> PipelineConfig {
    PipelineConfig {
        hub: hub_config(&args.streams),
        shards: shard_config(&args.streams),
        print: args.print,
        print_packets: args.print_packets,
        forward: args.sinks.forward.clone(),
        forward_config: ForwardConfig {
            max_connections: args.sinks.forward_max_conns,
            sample_percent: args.sinks.forward_sample,
        },
        allow: args.server.allow(),
        max_client_ports: args.server.max_client_ports,
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

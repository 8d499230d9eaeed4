//! `mirror run`: load, attach, drain, and on SIGINT/SIGTERM detach and
//! print the counters.

use std::{io, sync::Arc};

use anyhow::Context as _;
use mirror_user::{
    attach::{self, AUTO_REASON},
    cli::{AttachMode, PrintFormat, RunArgs},
    clock::WallClock,
    counters::{DrainCounters, Summary},
    drain::{Discard, drain_ring, register_readable},
    loader::{self, LoadOptions, Mirror},
    print::PacketPrinter,
    privileges,
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
    task::{JoinError, JoinSet},
};
use tracing_subscriber::filter::LevelFilter;

pub async fn run(args: RunArgs, log_level: LevelFilter) -> anyhow::Result<()> {
    privileges::check()?;
    // Fail on a wrong interface name before loading anything.
    attach::interface_index(&args.iface)?;

    let mut mirror = Mirror::load(&LoadOptions {
        snaplen: args.snaplen,
        ring_size: args.ring_size.unwrap_or_else(loader::default_ring_size),
        kernel_log_level: aya_log_level(log_level),
    })?;
    // Ports first: the program mirrors from the first packet it sees.
    for port in &args.ports {
        mirror
            .set_port(port.get(), true)
            .with_context(|| format!("cannot subscribe port {port}"))?;
    }
    let attachment = attach::attach(&mut mirror, &args.iface, args.attach, args.tc_netlink)?;
    let ports: Vec<String> = args.ports.iter().map(ToString::to_string).collect();
    if args.attach == AttachMode::Auto {
        tracing::info!("attach auto: {} ({AUTO_REASON})", attachment.point);
    }
    tracing::info!(
        "mirroring TCP to port {} on {} at {}; stop with Ctrl-C",
        ports.join(", "),
        args.iface,
        attachment.point
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let drain_counters = Arc::new(DrainCounters::default());
    let clock = WallClock::new();
    let mut drains = JoinSet::new();
    for ring in mirror.take_rings() {
        let counters = Arc::clone(&drain_counters);
        let stop = stop_rx.clone();
        match args.print {
            Some(format) => {
                let printer = PacketPrinter::new(format, &args.iface, clock);
                drains.spawn(drain_ring(ring, printer, counters, stop));
            }
            None => {
                drains.spawn(drain_ring(ring, Discard, counters, stop));
            }
        }
    }
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

    let mut sigint = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let early_end = tokio::select! {
        _ = sigint.recv() => None,
        _ = sigterm.recv() => None,
        ended = drains.join_next() => ended,
    };

    // Detach first, so that the final drain below reads every record the
    // program wrote and the counters match what was printed.
    let detached = attach::detach(&mut mirror, attachment);
    let _ = stop_tx.send(true);
    let mut failure = early_end.and_then(drain_failure);
    while let Some(ended) = drains.join_next().await {
        failure = failure.or(drain_failure(ended));
    }
    detached?;

    let summary = Summary {
        kernel: mirror
            .counters()
            .context("cannot read the kernel counters")?,
        drain: drain_counters.snapshot(),
    };
    if args.print == Some(PrintFormat::Json) {
        println!("{}", summary.to_json());
    } else {
        eprintln!("{summary}");
    }
    failure.map_or(Ok(()), Err)
}

fn drain_failure(ended: Result<io::Result<()>, JoinError>) -> Option<anyhow::Error> {
    match ended {
        Ok(Ok(())) => None,
        // Whoever read our standard output went away (`mirror ... | head`):
        // an ordinary way to stop, as for tcpdump.
        Ok(Err(error)) if error.kind() == io::ErrorKind::BrokenPipe => None,
        Ok(Err(error)) => Some(anyhow::Error::new(error).context("a ring drain failed")),
        Err(panic) => Some(anyhow::anyhow!("a ring drain task died: {panic}")),
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

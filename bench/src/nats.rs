//! The NATS JetStream consumer (`mirror run --nats`): the userspace
//! pipeline of the fan-out scenario feeding one publishing consumer,
//! against a local single-server JetStream (file storage in a scratch
//! directory, removed after). Its cost `c` is the mirror process's CPU
//! seconds per GB published beyond those of the same run with a consumer
//! that only counts; the server's own CPU is shown beside it.

use std::{
    fmt::Write as _,
    net::TcpListener,
    process::{Command, Stdio},
    sync::{Arc, atomic::Ordering},
    thread,
    time::{Duration, Instant},
};

use mirror_tests::netns::KillOnDrop;
use mirror_user::{
    fanout::hub::{Hub, HubConfig},
    nats::{
        NatsConfig, Retention,
        publish::{NatsCounters, publish_events},
    },
};

use crate::{
    Options,
    fanout::{push_records, records},
    procstat::cpu_seconds,
    report::Section,
    stats::{Spread, cell},
};

const PORT: u16 = 80;
const SEGMENT: usize = 64 * 1024 - 54;

struct Sample {
    seconds: f64,
    cpu: f64,
    server_cpu: f64,
    bytes: u64,
}

pub fn run(options: &Options) -> Section {
    let total_bytes: usize = if options.quick { 8 << 20 } else { 128 << 20 };
    let records = records(SEGMENT, total_bytes);
    let store = tempfile::tempdir().expect("scratch directory");
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let server = KillOnDrop(
        Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js"])
            .args(["-sd", &store.path().display().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server (cargo xtask setup installs it)"),
    );
    thread::sleep(Duration::from_millis(500));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let url = format!("nats://127.0.0.1:{port}");
    let mut baseline = Vec::new();
    let mut nats = Vec::new();
    for round in 1..=options.rounds {
        baseline.push(runtime.block_on(pipeline(&records, None, server.0.id())));
        let sample = runtime.block_on(pipeline(&records, Some(&url), server.0.id()));
        eprintln!(
            "bench: round {round}/{} nats: {:.0} MB/s published",
            options.rounds,
            sample.bytes as f64 / sample.seconds / 1e6
        );
        nats.push(sample);
    }
    drop(server);
    render(&baseline, &nats, total_bytes, options)
}

/// One run: `records` through the pipeline to one consumer, publishing
/// to `url` (or only counting), until the consumer is done.
async fn pipeline(records: &[Vec<u8>], url: Option<&str>, server: u32) -> Sample {
    let hub = Arc::new(Hub::new(
        &[PORT],
        HubConfig {
            capacity: 1 << 16,
            max_bytes: usize::MAX,
            batch_bytes: 256 << 10,
        },
    ));
    let (_, mut subscription) = hub.subscribe(&[PORT], "bench");
    let stats = Arc::new(NatsCounters::default());
    // Never signalled: the bench waits for every acknowledgement.
    let (_running, closing) = tokio::sync::watch::channel(false);
    let task = match url {
        Some(url) => tokio::spawn(publish_events(
            subscription,
            NatsConfig {
                servers: url.parse().expect("url"),
                prefix: "bench".into(),
                node: "bench".into(),
                retention: Retention {
                    max_bytes: 1 << 30,
                    max_age: Duration::from_secs(600),
                    replicas: 1,
                },
            },
            None,
            Arc::clone(&stats),
            closing,
        )),
        None => {
            let stats = Arc::clone(&stats);
            tokio::spawn(async move {
                while let Some(event) = subscription.next().await {
                    stats
                        .bytes
                        .fetch_add(event.data_len() as u64, Ordering::Relaxed);
                }
                Ok(())
            })
        }
    };
    let (cpu, server_cpu) = (cpu_seconds(std::process::id()), cpu_seconds(server));
    let start = Instant::now();
    push_records(records, &hub).await;
    drop(hub);
    let _ = tokio::time::timeout(Duration::from_secs(120), task).await;
    Sample {
        seconds: start.elapsed().as_secs_f64(),
        cpu: cpu_seconds(std::process::id()) - cpu,
        server_cpu: cpu_seconds(server) - server_cpu,
        bytes: stats.bytes.load(Ordering::Relaxed),
    }
}

fn render(baseline: &[Sample], nats: &[Sample], total_bytes: usize, options: &Options) -> Section {
    let gb = total_bytes as f64 / 1e9;
    let mut missing = Vec::new();
    // The counting consumer's bytes are every byte the pipeline delivered.
    let delivered = baseline.iter().map(|s| s.bytes).min().unwrap_or(0);
    if delivered == 0 || nats.iter().any(|s| s.bytes < delivered) {
        missing.push("nats: not every byte was acknowledged".to_owned());
    }
    let base_cpu = Spread::of(baseline.iter().map(|s| s.cpu)).map_or(0.0, |s| s.median);
    let c = Spread::of(nats.iter().map(|s| (s.cpu - base_cpu) / gb)).map(|s| s.median);
    let server = Spread::of(nats.iter().map(|s| s.server_cpu / gb)).map(|s| s.median);
    let rate = Spread::of(nats.iter().map(|s| s.bytes as f64 / s.seconds / 1e6));
    let mut md = format!(
        "## NATS JetStream consumer\n\n\
         The fan-out scenario's pipeline ({SEGMENT}-byte segments, {} MiB per run) feeding one \
         `--nats` consumer, publishing to a local single nats-server (JetStream, file storage), \
         every message acknowledged; {} rounds, medians. `c` is the mirror's CPU seconds per GB \
         beyond the same run with a consumer that only counts.\n\n\
         | MB/s published (min-max) | c: mirror CPU s/GB | nats-server CPU s/GB |\n\
         |---:|---:|---:|\n",
        total_bytes >> 20,
        options.rounds
    );
    let _ = writeln!(
        md,
        "| {} | {} | {} |",
        rate.map_or_else(
            || "-".to_owned(),
            |r| format!("{:.0} ({:.0}-{:.0})", r.median, r.min, r.max)
        ),
        cell(c, 2),
        cell(server, 2),
    );
    Section {
        name: "nats",
        markdown: md,
        plots: Vec::new(),
        missing,
    }
}

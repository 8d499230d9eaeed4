//! A stalled consumer beside a reading one: the reading one's
//! completeness and throughput against running alone. The stalled one is
//! a `mirror tail` stopped with SIGSTOP after subscribing; its lag must
//! cost only itself.

use std::{fmt::Write as _, time::Instant};

use mirror_tests::mirror_process::{ClientProcess, MirrorProcess, tail_totals};
use mirror_user::flow::model::CloseReason;

use crate::{
    Options,
    bed::{Bed, IFACE},
    load::{self, Traffic},
    report::Section,
    stats::{Spread, cell, spread_cell},
};

const CASES: [&str; 2] = [
    "reading consumer alone",
    "reading consumer + stalled consumer",
];

struct Sample {
    gbps: f64,
    completeness: f64,
    consumer_mb_per_s: f64,
    reading_lagged: u64,
    stalled_lagged: u64,
    too_slow: u64,
    ring_full: u64,
}

/// How long the stalled consumer reads after it is woken, before it stops.
const STALLED_WAKE: std::time::Duration = std::time::Duration::from_secs(2);

pub fn run(options: &Options) -> Section {
    let bed = Bed::new();
    let traffic = Traffic::Bulk { streams: 1 };
    let port = traffic.port().to_string();
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(), Vec::new()];
    for round in 1..=options.rounds {
        for (c, name) in CASES.iter().enumerate() {
            let mirror = MirrorProcess::start_quiet(
                &bed.server,
                &["--iface", IFACE, "--port", &port, "--attach", "tc"],
            );
            let tail_args = ["--port", port.as_str(), "--format", "text"];
            let reading = ClientProcess::tail(None, &mirror.endpoint(), &tail_args);
            let stalled = (c == 1).then(|| {
                let stalled = ClientProcess::tail(None, &mirror.endpoint(), &tail_args);
                stalled.signal(libc::SIGSTOP);
                stalled
            });
            let start = Instant::now();
            let load = load::run(traffic, &bed, options.seconds);
            let wall = start.elapsed().as_secs_f64();
            crate::watch::settle_consumers(&mirror.endpoint());
            reading.signal(libc::SIGINT);
            let (_, reading_err) = reading.wait(std::time::Duration::from_secs(20));
            let reading_totals = tail_totals(&reading_err);
            let stalled_lagged = stalled.map_or(0, |stalled| {
                // Awake again, it reads what waited in its socket, then
                // learns that it lagged: its connections end as `lagged`.
                stalled.signal(libc::SIGCONT);
                std::thread::sleep(STALLED_WAKE);
                stalled.signal(libc::SIGINT);
                let (_, err) = stalled.wait(std::time::Duration::from_secs(20));
                tail_totals(&err).closed(CloseReason::Lagged)
            });
            let output = mirror.interrupt();
            let sample = Sample {
                gbps: load.throughput,
                completeness: reading_totals.data_bytes as f64 / load.server_bytes.max(1) as f64,
                consumer_mb_per_s: reading_totals.data_bytes as f64 / wall / 1e6,
                reading_lagged: reading_totals.closed(CloseReason::Lagged),
                stalled_lagged,
                too_slow: output.counter("server.too_slow"),
                ring_full: output.kernel("ring_full"),
            };
            eprintln!(
                "bench: isolation round {round}/{} {name:<38} {:6.2} Gbit/s, reading consumer {:.4} complete",
                options.rounds, sample.gbps, sample.completeness
            );
            samples[c].push(sample);
        }
    }
    render(&samples, options)
}

fn render(samples: &[Vec<Sample>], options: &Options) -> Section {
    let mut missing = Vec::new();
    let alone = Spread::of(samples[0].iter().map(|s| s.gbps)).map(|s| s.median);
    let mut md = format!(
        "## Isolation: a stalled consumer beside a reading one\n\n\
         Bulk TCP (iperf3, 1 stream) mirrored with `--attach tc`; one `mirror tail` reads \
         every stream to /dev/null, and in the second case another one subscribes to the same \
         port and is then stopped (SIGSTOP) for the whole run. {} rounds of {} s, cases \
         alternating. The stalled consumer's connections must end as `lagged` (or its session \
         be closed as too slow), the reading one's must not.\n\n\
         | case | service Gbit/s | ratio to alone | reading consumer completeness | reading consumer MB/s | reading consumer lagged closes | stalled consumer lagged closes | sessions closed too slow | ring full |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        options.rounds, options.seconds
    );
    for (name, runs) in CASES.iter().zip(samples) {
        if runs.len() != options.rounds {
            missing.push(format!("isolation {name}: {} runs", runs.len()));
        }
        let gbps = Spread::of(runs.iter().map(|s| s.gbps));
        let sum = |f: fn(&Sample) -> u64| runs.iter().map(f).sum::<u64>();
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} |",
            spread_cell(gbps, 2),
            cell(gbps.zip(alone).map(|(g, a)| g.median / a), 2),
            spread_cell(Spread::of(runs.iter().map(|s| s.completeness)), 4),
            cell(
                Spread::of(runs.iter().map(|s| s.consumer_mb_per_s)).map(|s| s.median),
                0
            ),
            sum(|s| s.reading_lagged),
            sum(|s| s.stalled_lagged),
            sum(|s| s.too_slow),
            sum(|s| s.ring_full),
        );
        if runs.iter().any(|s| s.gbps <= 0.0) {
            missing.push(format!("isolation {name}: no throughput"));
        }
    }
    Section {
        name: "isolation",
        markdown: md,
        plots: Vec::new(),
        missing,
    }
}

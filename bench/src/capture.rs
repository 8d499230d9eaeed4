//! The service's throughput and the capture's completeness beside every
//! way of watching it, on the same traffic, measured side by side in one
//! run: cases alternate round after round (forwards, then backwards), and
//! every figure is a median with its range.

use std::{collections::BTreeMap, fmt::Write as _, time::Instant};

use crate::{
    Options,
    bed::Bed,
    load::{self, Load, Traffic},
    plot::{self, Bar, Kind, Panel},
    procstat::{cpu_seconds, peak_rss_mib},
    report::Section,
    stats::{Spread, cell, spread_cell},
    watch::{Consumer, Delivered, Watcher, Watching, command},
};

/// One run of one case.
#[derive(Debug, Clone)]
pub(crate) struct Sample {
    pub(crate) load: Load,
    /// CPU seconds the watcher's processes used during the run.
    cpu_seconds: Option<f64>,
    wall_seconds: f64,
    peak_rss_mib: Option<f64>,
    /// Share of what the service received that reached the watcher's
    /// output: stream bytes for the mirror, packets for the tools.
    completeness: Option<f64>,
    losses: Vec<(&'static str, u64)>,
}

/// Every case's runs, for one kind of traffic.
#[derive(Default)]
struct Results {
    samples: BTreeMap<(usize, usize), Vec<Sample>>,
    /// Cases a tool refused to run, with what it said.
    refused: BTreeMap<usize, String>,
}

pub fn run(options: &Options) -> Section {
    let bed = Bed::with_shadow();
    let mut results = Results::default();
    for round in 1..=options.rounds {
        let mut order: Vec<usize> = (0..Watcher::CASES.len()).collect();
        if round % 2 == 0 {
            order.reverse();
        }
        for (t, traffic) in Traffic::ALL.iter().enumerate() {
            for &w in &order {
                let watcher = Watcher::CASES[w];
                if results.refused.contains_key(&w) || !watcher.applies_to(*traffic) {
                    continue;
                }
                match measure(&bed, *traffic, watcher, options.seconds) {
                    Ok(sample) => {
                        eprintln!(
                            "bench: capture round {round}/{} {:<28} {:<42} {:10.2} {} completeness {}",
                            options.rounds,
                            traffic.name(),
                            watcher.name(),
                            sample.load.throughput,
                            traffic.unit(),
                            cell(sample.completeness, 4),
                        );
                        results.samples.entry((t, w)).or_default().push(sample);
                    }
                    Err(why) => {
                        eprintln!("bench: {} refused: {why}", watcher.name());
                        results.refused.insert(w, why);
                    }
                }
            }
        }
    }
    render(&results, options)
}

pub(crate) fn measure(
    bed: &Bed,
    traffic: Traffic,
    watcher: Watcher,
    seconds: u32,
) -> Result<Sample, String> {
    let before = bed.counters();
    let watching = Watching::start(watcher, bed, traffic.port())?;
    let pids = watching.pids();
    let cpu = || pids.iter().map(|pid| cpu_seconds(*pid)).sum::<f64>();
    let cpu_before = cpu();
    let start = Instant::now();
    let load = load::run(traffic, bed, seconds);
    let wall_seconds = start.elapsed().as_secs_f64();
    watching.settle();
    let cpu_used = cpu() - cpu_before;
    let peak_rss: f64 = pids.iter().map(|pid| peak_rss_mib(*pid)).sum();
    let observed = watching.stop();
    let iface = bed.counters().since(before);
    let completeness = observed.delivered.map(|delivered| match delivered {
        Delivered::Bytes(bytes) => bytes as f64 / load.server_bytes.max(1) as f64,
        Delivered::Packets {
            captured,
            both_directions,
        } => {
            let seen = if both_directions {
                iface.rx_packets + iface.tx_packets
            } else {
                iface.rx_packets
            };
            captured as f64 / seen.max(1) as f64
        }
    });
    let watched = !pids.is_empty();
    Ok(Sample {
        load,
        cpu_seconds: watched.then_some(cpu_used),
        wall_seconds,
        peak_rss_mib: watched.then_some(peak_rss),
        completeness,
        losses: observed.losses,
    })
}

/// Medians of one case.
pub(crate) struct Figures {
    pub(crate) throughput: Option<Spread>,
    pub(crate) ratio: Option<Spread>,
    p99_ms: Option<Spread>,
    pub(crate) completeness: Option<Spread>,
    pub(crate) cpu_percent: Option<Spread>,
    pub(crate) cpu_per_gb: Option<Spread>,
    rss_mib: Option<Spread>,
    /// Each loss counter summed over the runs.
    pub(crate) losses: Vec<(&'static str, u64)>,
}

impl Figures {
    pub(crate) fn of(samples: &[Sample], baseline: Option<f64>) -> Self {
        let throughput = Spread::of(samples.iter().map(|s| s.load.throughput));
        let mut losses: Vec<(&'static str, u64)> = Vec::new();
        for sample in samples {
            for (name, count) in &sample.losses {
                match losses.iter_mut().find(|(n, _)| n == name) {
                    Some((_, total)) => *total += count,
                    None => losses.push((name, *count)),
                }
            }
        }
        Self {
            throughput,
            ratio: throughput.zip(baseline).map(|(s, b)| s.ratio_to(b)),
            p99_ms: Spread::of(samples.iter().filter_map(|s| s.load.p99_ms)),
            completeness: Spread::of(samples.iter().filter_map(|s| s.completeness)),
            cpu_percent: Spread::of(
                samples
                    .iter()
                    .filter_map(|s| Some(s.cpu_seconds? / s.wall_seconds * 100.0)),
            ),
            cpu_per_gb: Spread::of(
                samples
                    .iter()
                    .filter_map(|s| Some(s.cpu_seconds? / (s.load.server_bytes as f64 / 1e9))),
            ),
            rss_mib: Spread::of(samples.iter().filter_map(|s| s.peak_rss_mib)),
            losses,
        }
    }
}

fn render(results: &Results, options: &Options) -> Section {
    let mut md = String::new();
    let mut missing = Vec::new();
    let mut throughput_panels = Vec::new();
    let mut completeness_panels = Vec::new();
    let mut verdicts = Vec::new();
    let mut consumers = String::new();
    let _ = writeln!(
        md,
        "## Capture: the service beside each way of watching it\n\n\
         A client and a server namespace joined by a veth pair (default offloads: GSO/GRO \
         packets up to 64 KiB); every watcher runs on the server's interface. {} rounds of {} s \
         per case, cases alternating (forwards, then backwards); medians with min-max. \
         *Ratio* is the service's throughput over the baseline's median in the same run. \
         *Completeness*: for the mirror, stream bytes its consumer (`mirror tail --format text \
         > /dev/null`, a separate process on the Unix socket; the other kinds of consumer are \
         described with their table) received over the bytes the server received; for the tools, packets captured over packets the interface received \
         (both directions for xdpdump, which has no filter), from their own counters. *CPU* is \
         the watcher's processes (mirror and consumer) only: the in-kernel cost is charged to \
         the service and shows in its throughput and in the kernel section. Losses are each \
         watcher's own counters, summed over all runs. With `--sample 10` the kernel copies a \
         tenth of the connections (whole ones, by hash): its completeness is the share of the \
         traffic those connections carried, near 0.1 with many connections, 0 or 1 with one.\n",
        options.rounds, options.seconds
    );
    for (t, traffic) in Traffic::ALL.iter().enumerate() {
        let baseline = results
            .samples
            .get(&(t, 0))
            .and_then(|s| Spread::of(s.iter().map(|s| s.load.throughput)))
            .map(|s| s.median);
        let _ = writeln!(
            md,
            "### {} ({})\n\n| case | {} | ratio | {}completeness | losses | CPU % | CPU s/GB | peak RSS MiB |\n|---|---:|---:|{}---:|---|---:|---:|---:|",
            traffic.name(),
            traffic.describe(),
            traffic.unit(),
            if traffic.is_bulk() { "" } else { "p99 ms | " },
            if traffic.is_bulk() { "" } else { "---:|" },
        );
        let mut throughput_bars = Vec::new();
        let mut completeness_bars = Vec::new();
        let mut row_figures = Vec::new();
        for (w, watcher) in Watcher::CASES.iter().enumerate() {
            if !watcher.applies_to(*traffic) {
                continue;
            }
            if let Some(why) = results.refused.get(&w) {
                let _ = writeln!(
                    md,
                    "| {} | refused by this kernel: `{why}` | | {}| | | | | |",
                    watcher.name(),
                    if traffic.is_bulk() { "" } else { "| " },
                );
                if *watcher != Watcher::XdpdumpFentry {
                    missing.push(format!(
                        "{}: {} refused: {why}",
                        traffic.name(),
                        watcher.name()
                    ));
                }
                continue;
            }
            let samples = results.samples.get(&(t, w)).map_or(&[][..], Vec::as_slice);
            let figures = Figures::of(samples, baseline);
            check(&mut missing, *traffic, *watcher, samples, &figures, options);
            let losses = figures
                .losses
                .iter()
                .map(|(name, count)| format!("{name} {count}"))
                .collect::<Vec<_>>()
                .join(", ");
            let _ = writeln!(
                md,
                "| {} | {} | {} | {}{} | {} | {} | {} | {} |",
                watcher.name(),
                spread_cell(figures.throughput, if traffic.is_bulk() { 2 } else { 0 }),
                cell(figures.ratio.map(|s| s.median), 2),
                if traffic.is_bulk() {
                    String::new()
                } else {
                    format!("{} | ", cell(figures.p99_ms.map(|s| s.median), 2))
                },
                spread_cell(figures.completeness, 4),
                if losses.is_empty() {
                    "-".to_owned()
                } else {
                    losses
                },
                cell(figures.cpu_percent.map(|s| s.median), 0),
                cell(figures.cpu_per_gb.map(|s| s.median), 2),
                cell(figures.rss_mib.map(|s| s.median), 0),
            );
            let kind = match watcher {
                Watcher::Nothing => Kind::Baseline,
                Watcher::Mirror { .. }
                | Watcher::MirrorSampled { .. }
                | Watcher::MirrorBoth
                | Watcher::Consumer(_) => Kind::Mirror,
                _ => Kind::Peer,
            };
            if let Some(ratio) = figures.ratio {
                throughput_bars.push(Bar {
                    label: watcher.label().to_owned(),
                    kind,
                    spread: ratio,
                });
            }
            if let Some(completeness) = figures.completeness {
                completeness_bars.push(Bar {
                    label: watcher.label().to_owned(),
                    kind,
                    spread: completeness,
                });
            }
            row_figures.push((*watcher, figures));
        }
        md.push('\n');
        if traffic.is_bulk() {
            consumer_rows(&mut consumers, *traffic, &row_figures);
        }
        verdicts.push(verdict(*traffic, &row_figures, &results.refused));
        throughput_panels.push(Panel {
            title: traffic.name().to_owned(),
            bars: throughput_bars,
        });
        completeness_panels.push(Panel {
            title: traffic.name().to_owned(),
            bars: completeness_bars,
        });
    }
    let mut summary = String::from("### Where the mirror stands\n\n");
    for line in verdicts {
        let _ = writeln!(summary, "- {line}");
    }
    let _ = writeln!(
        summary,
        "\n### Each kind of consumer beside tcpdump\n\n\
         The mirror (tc) with one consumer of each kind, and tcpdump, on the same bulk traffic \
         in the same run. *Service ratio*: iperf3's throughput beside it over nothing attached. \
         *c*: CPU-seconds of the watcher's processes (`/proc/PID/stat`, the mirror with its \
         writer threads, plus `mirror tail` where there is one; not the forwarder's sink) per \
         GB the server received. *Completeness*: stream bytes the consumer delivered (the \
         tail's count, the dump sidecars' byte counts, the forwarder's bytes written to the \
         sink) over bytes the server received; for the capture files, packets written over \
         packets the interface received. Losses summed over the runs: `gap` closes, `lagged` \
         closes (the consumer fell behind), `ring_full` records, then the consumer's own. The \
         dump case empties its stream files every 100 ms (a tmpfs holds them in memory), the \
         sidecars keep the counts.\n\n\
         | consumer | command | traffic | service ratio | c (CPU s/GB) | completeness | gap / lagged / ring_full | other losses |\n\
         |---|---|---|---:|---:|---:|---|---|\n{consumers}\n\
         ![throughput](capture-throughput.svg)\n\n![completeness](capture-completeness.svg)\n"
    );
    // The summary first, the tables after it.
    let (heading, tables) = md.split_once('\n').unwrap_or((&md, ""));
    let (intro, tables) = tables.split_once("### ").unwrap_or((tables, ""));
    let markdown = format!("{heading}\n{intro}{summary}### {tables}");
    Section {
        name: "capture",
        markdown,
        plots: vec![
            (
                "capture-throughput.svg".to_owned(),
                plot::bars(
                    "The service's throughput beside each watcher (ratio to nothing attached)",
                    "ratio to baseline (median; whisker: min-max)",
                    &throughput_panels,
                    Some(1.0),
                ),
            ),
            (
                "capture-completeness.svg".to_owned(),
                plot::bars(
                    "Completeness: share of the traffic each watcher delivered",
                    "mirror: stream bytes delivered / received; tools: packets captured / seen",
                    &completeness_panels,
                    Some(1.0),
                ),
            ),
        ],
        missing,
    }
}

/// The consumer kinds' rows of one bulk traffic, with tcpdump's.
fn consumer_rows(out: &mut String, traffic: Traffic, rows: &[(Watcher, Figures)]) {
    let kinds = std::iter::once(Watcher::Mirror {
        attach: "tc",
        subscribed: true,
    })
    .chain(Consumer::ALL.map(Watcher::Consumer))
    .chain([Watcher::Tcpdump]);
    for watcher in kinds {
        let Some((_, figures)) = rows.iter().find(|(w, _)| *w == watcher) else {
            continue;
        };
        let loss = |name: &str| {
            figures
                .losses
                .iter()
                .find(|(n, _)| *n == name)
                .map_or_else(|| "-".to_owned(), |(_, count)| count.to_string())
        };
        let mirror = watcher != Watcher::Tcpdump;
        let others = figures
            .losses
            .iter()
            .filter(|(name, _)| !["gap closes", "lagged", "ring full"].contains(name))
            .map(|(name, count)| format!("{name} {count}"))
            .collect::<Vec<_>>()
            .join(", ");
        let packets = matches!(
            watcher,
            Watcher::Tcpdump | Watcher::Consumer(Consumer::Pcap)
        );
        let label = if watcher == Watcher::Tcpdump {
            "tcpdump -B 65536".to_owned()
        } else if mirror && !matches!(watcher, Watcher::Consumer(_)) {
            "mirror tail, Unix socket".to_owned()
        } else {
            watcher.name().trim_start_matches("mirror tc, ").to_owned()
        };
        let _ = writeln!(
            out,
            "| {label} | {} | {} | {} | {} | {}{} | {} | {} |",
            command(watcher),
            traffic.name(),
            cell(figures.ratio.map(|s| s.median), 2),
            cell(figures.cpu_per_gb.map(|s| s.median), 2),
            spread_cell(figures.completeness, 4),
            if packets { " (packets)" } else { "" },
            if mirror {
                format!(
                    "{} / {} / {}",
                    loss("gap closes"),
                    loss("lagged"),
                    loss("ring full")
                )
            } else {
                "- / - / -".to_owned()
            },
            if others.is_empty() {
                "-".to_owned()
            } else {
                others
            },
        );
    }
}

/// Every figure a case must have produced.
fn check(
    missing: &mut Vec<String>,
    traffic: Traffic,
    watcher: Watcher,
    samples: &[Sample],
    figures: &Figures,
    options: &Options,
) {
    let what = format!("{}: {}", traffic.name(), watcher.name());
    if samples.len() != options.rounds {
        missing.push(format!(
            "{what}: {} runs of {}",
            samples.len(),
            options.rounds
        ));
    }
    let mut need = |present: bool, figure: &str| {
        if !present {
            missing.push(format!("{what}: no {figure}"));
        }
    };
    need(
        samples.iter().all(|s| s.load.throughput > 0.0),
        "throughput",
    );
    need(figures.ratio.is_some(), "ratio to baseline");
    need(
        samples.iter().all(|s| s.load.server_bytes > 0),
        "bytes received by the server",
    );
    if !traffic.is_bulk() {
        need(figures.p99_ms.is_some(), "p99 latency");
    }
    if watcher.captures() {
        need(
            samples.iter().all(|s| s.completeness.is_some()),
            "completeness",
        );
        need(
            samples.iter().all(|s| !s.losses.is_empty()),
            "loss counters",
        );
    }
    if watcher != Watcher::Nothing {
        need(samples.iter().all(|s| s.cpu_seconds.is_some()), "CPU time");
        need(
            samples
                .iter()
                .all(|s| s.peak_rss_mib.is_some_and(|r| r > 0.0)),
            "peak RSS",
        );
    }
}

/// One sentence: the mirror as `--attach auto` runs it on a veth (TC) with
/// its consumer, against each peer, on one traffic.
fn verdict(
    traffic: Traffic,
    rows: &[(Watcher, Figures)],
    refused: &BTreeMap<usize, String>,
) -> String {
    let describe = |watcher: Watcher| -> Option<String> {
        let (_, figures) = rows.iter().find(|(w, _)| *w == watcher)?;
        let ratio = figures.ratio?.median;
        let completeness = figures.completeness.map_or_else(String::new, |c| {
            format!(", {:.2} % complete", c.median * 100.0)
        });
        Some(format!("{ratio:.2} of the baseline{completeness}"))
    };
    let mirror = Watcher::Mirror {
        attach: "tc",
        subscribed: true,
    };
    let mirror_ratio = rows
        .iter()
        .find(|(w, _)| *w == mirror)
        .and_then(|(_, f)| f.ratio)
        .map_or(0.0, |r| r.median);
    let peers = [
        Watcher::Tcpdump,
        Watcher::Netsniff,
        Watcher::XdpdumpPcap,
        Watcher::XdpdumpXdp,
    ];
    let mut ahead = Vec::new();
    let mut behind = Vec::new();
    let mut figures = Vec::new();
    for peer in peers {
        let Some(text) = describe(peer) else { continue };
        figures.push(format!("{} {text}", peer.label()));
        let ratio = rows
            .iter()
            .find(|(w, _)| *w == peer)
            .and_then(|(_, f)| f.ratio)
            .map_or(0.0, |r| r.median);
        if mirror_ratio >= ratio {
            ahead.push(peer.label());
        } else {
            behind.push(peer.label());
        }
    }
    let standing = match (ahead.is_empty(), behind.is_empty()) {
        (false, true) => "more than beside any peer".to_owned(),
        (true, false) => "less than beside any peer".to_owned(),
        _ => format!(
            "more than beside {}, less than beside {}",
            ahead.join(", "),
            behind.join(", ")
        ),
    };
    let fentry = refused
        .iter()
        .find(|(w, _)| Watcher::CASES[**w] == Watcher::XdpdumpFentry)
        .map_or_else(String::new, |_| {
            "; xdpdump's fentry mode was refused by this kernel".to_owned()
        });
    format!(
        "**{}**: beside the mirror (tc, as `--attach auto` picks on veth, with one consumer reading every stream) the service keeps {} ({standing}); with `--sample 10` {}; beside the peers: {}{fentry}.",
        traffic.name(),
        describe(mirror).unwrap_or_else(|| "-".to_owned()),
        describe(Watcher::MirrorSampled { percent: 10 }).unwrap_or_else(|| "-".to_owned()),
        figures.join("; "),
    )
}

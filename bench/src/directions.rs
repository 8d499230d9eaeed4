//! What following the server's answers costs: the mirror with one `mirror
//! tail` reading every stream, `--directions client` beside `--directions
//! both`, on the same traffic, cases alternating round after round as in
//! the capture scenario.

use std::fmt::Write as _;

use crate::{
    Options,
    bed::Bed,
    capture::{Figures, Sample, measure},
    load::Traffic,
    report::Section,
    stats::{cell, spread_cell},
    watch::{Watcher, command},
};

/// The baseline, then the client's direction, then both.
const CASES: [Watcher; 3] = [
    Watcher::Nothing,
    Watcher::Mirror {
        attach: "tc",
        subscribed: true,
    },
    Watcher::MirrorBoth,
];

pub fn run(options: &Options) -> Section {
    let bed = Bed::new();
    let mut samples: Vec<Vec<Vec<Sample>>> =
        vec![vec![Vec::new(); CASES.len()]; Traffic::ALL.len()];
    let mut missing = Vec::new();
    for round in 1..=options.rounds {
        let mut order: Vec<usize> = (0..CASES.len()).collect();
        if round % 2 == 0 {
            order.reverse();
        }
        for (t, traffic) in Traffic::ALL.iter().enumerate() {
            for &c in &order {
                match measure(&bed, *traffic, CASES[c], options.seconds) {
                    Ok(sample) => {
                        eprintln!(
                            "bench: directions round {round}/{} {:<28} {:<42} {:10.2} {}",
                            options.rounds,
                            traffic.name(),
                            CASES[c].name(),
                            sample.load.throughput,
                            traffic.unit(),
                        );
                        samples[t][c].push(sample);
                    }
                    Err(why) => missing.push(format!("{}: {why}", CASES[c].name())),
                }
            }
        }
    }
    let mut md = String::from("## The second direction\n\n");
    let _ = writeln!(
        md,
        "The mirror with one `mirror tail` on the Unix socket reading every stream, \
         following the client's bytes (`--directions client`) or both \
         directions (`--directions both`), on the same traffic, {} alternating round(s) of \
         {} s. *ratio*: throughput over nothing attached; *c*: CPU seconds of the mirror \
         and `mirror tail` per GB the service received; *delivered*: stream bytes \
         `mirror tail` received per byte the service received (the answers are on top of \
         it with both directions); *lagged*: connections `mirror tail` lost.\n",
        options.rounds, options.seconds
    );
    let _ = writeln!(md, "| case | command |\n|---|---|");
    for watcher in &CASES[1..] {
        let _ = writeln!(md, "| {} | {} |", watcher.name(), command(*watcher));
    }
    let _ = writeln!(
        md,
        "\n| traffic | client: ratio | client: c | client: CPU % | client: delivered | client: lagged | both: ratio | both: c | both: CPU % | both: delivered | both: lagged |\n|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for (t, traffic) in Traffic::ALL.iter().enumerate() {
        let baseline = Figures::of(&samples[t][0], None)
            .throughput
            .map(|s| s.median);
        let mut row = format!("| {} |", traffic.name());
        for (c, watcher) in CASES.iter().enumerate().skip(1) {
            let figures = Figures::of(&samples[t][c], baseline);
            let lagged = figures
                .losses
                .iter()
                .find(|(name, _)| *name == "lagged")
                .map_or_else(|| "-".to_owned(), |(_, count)| count.to_string());
            for (what, value) in [
                ("ratio", figures.ratio.map(|s| s.median)),
                ("c", figures.cpu_per_gb.map(|s| s.median)),
            ] {
                if value.is_none() {
                    missing.push(format!("{} {}: {what}", traffic.name(), watcher.name()));
                }
            }
            let _ = write!(
                row,
                " {} | {} | {} | {} | {} |",
                cell(figures.ratio.map(|s| s.median), 2),
                cell(figures.cpu_per_gb.map(|s| s.median), 2),
                cell(figures.cpu_percent.map(|s| s.median), 0),
                spread_cell(figures.completeness, 4),
                lagged,
            );
        }
        let _ = writeln!(md, "{row}");
    }
    Section {
        name: "directions",
        markdown: md,
        plots: Vec::new(),
        missing,
    }
}

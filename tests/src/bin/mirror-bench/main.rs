//! `cargo xtask bench`: benchmarks measured side by side in one run.
//!
//! - `attach`: the service's throughput on a veth pair beside each way of
//!   watching it (needs root: network namespaces, BPF).
//! - `fanout`: the userspace stream pipeline alone (payload copy, shards,
//!   reassembly, hub) delivering to 1, 8 and 64 consumers.
//! - `http`: an nginx's requests per second beside the mirror and its
//!   shadow forwarder (needs root).

mod attach;
mod fanout;
mod http;

use std::path::PathBuf;

pub struct Options {
    pub rounds: usize,
    pub seconds: u32,
    pub quick: bool,
    pub out_dir: Option<PathBuf>,
}

fn main() {
    let mut options = Options {
        rounds: 5,
        seconds: 8,
        quick: false,
        out_dir: None,
    };
    let mut scenarios = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--quick" => {
                options.quick = true;
                options.rounds = 1;
                options.seconds = 2;
            }
            "--rounds" => options.rounds = value().parse().expect("--rounds N"),
            "--seconds" => options.seconds = value().parse().expect("--seconds N"),
            "--out-dir" => options.out_dir = Some(PathBuf::from(value())),
            "--scenario" => scenarios.push(value()),
            other => panic!(
                "unknown argument {other}: use --quick, --rounds N, --seconds N, --out-dir DIR, --scenario attach|fanout|http"
            ),
        }
    }
    if scenarios.is_empty() {
        scenarios = vec!["attach".to_owned(), "fanout".to_owned(), "http".to_owned()];
    }
    for scenario in scenarios {
        let (file, table) = match scenario.as_str() {
            "attach" => ("attach-modes.md", attach::run(&options)),
            "fanout" => ("fanout.md", fanout::run(&options)),
            "http" => ("http.md", http::run(&options)),
            other => panic!("unknown scenario {other}: attach, fanout or http"),
        };
        println!("{table}");
        if let Some(dir) = &options.out_dir {
            let path = dir.join(file);
            std::fs::write(&path, &table)
                .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
            eprintln!("bench: wrote {}", path.display());
        }
    }
}

/// Median of `values` (sorted in place).
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.is_empty() {
        0.0
    } else if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}

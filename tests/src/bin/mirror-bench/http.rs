//! Requests per second of an nginx beside the mirror: nothing attached,
//! the mirror alone (reassembling, no consumer), and the mirror forwarding
//! every connection to a shadow nginx. wrk drives keep-alive connections;
//! cases alternate round after round.

use std::{collections::BTreeMap, fmt::Write as _, process::Stdio};

use mirror_tests::{
    mirror_process::MirrorProcess,
    netns::{TestNet, in_ns, spawn, wait_listening},
    web::Nginx,
};

use crate::{Options, median};

const PRIMARY: &str = "198.18.0.2";
const SHADOW: &str = "198.18.1.2";

const CASES: [(&str, &[&str]); 4] = [
    ("no mirror (baseline)", &[]),
    (
        "mirror, port 80 reassembled, no consumer",
        &["--iface", "pri0", "--port", "80"],
    ),
    (
        "mirror forwarding to a discarding sink (the forwarder's own cost)",
        &[
            "--iface",
            "pri0",
            "--port",
            "80",
            "--forward",
            "198.18.1.2:9",
        ],
    ),
    (
        "mirror forwarding to a shadow nginx on the same 2 cores",
        &[
            "--iface",
            "pri0",
            "--port",
            "80",
            "--forward",
            "198.18.1.2:80",
        ],
    ),
];

#[derive(Default, Clone, Copy)]
struct Sample {
    requests_per_second: f64,
    p99_ms: f64,
}

pub fn run(options: &Options) -> String {
    let mut net = TestNet::new();
    let client = net.namespace("hcli");
    let primary = net.namespace("hpri");
    let shadow = net.namespace("hsha");
    net.veth(
        (&client, "cli0", "198.18.0.1/24"),
        (&primary, "pri0", "198.18.0.2/24"),
    );
    net.veth(
        (&primary, "pri1", "198.18.1.1/24"),
        (&shadow, "sha0", "198.18.1.2/24"),
    );
    let dir = tempfile_dir();
    let _primary_web = Nginx::start(&primary, PRIMARY, &dir.join("primary"));
    let _shadow_web = Nginx::start(&shadow, SHADOW, &dir.join("shadow"));
    // The discard service: reads every connection to the end, answers nothing.
    let _discard = spawn(in_ns(&shadow, "socat").args([
        "-u",
        "TCP-LISTEN:9,reuseaddr,fork",
        "OPEN:/dev/null",
    ]));
    wait_listening(&shadow, 9);

    let mut samples: BTreeMap<usize, Vec<Sample>> = BTreeMap::new();
    for round in 1..=options.rounds {
        for (index, (name, args)) in CASES.iter().enumerate() {
            let mirror = (!args.is_empty()).then(|| MirrorProcess::start_quiet(&primary, args));
            let sample = wrk(&client, options.seconds);
            if let Some(mirror) = mirror {
                let _ = mirror.interrupt();
            }
            eprintln!(
                "bench: round {round}/{} {name:<48} {:9.0} req/s p99 {:.2} ms",
                options.rounds, sample.requests_per_second, sample.p99_ms
            );
            samples.entry(index).or_default().push(sample);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    render(&samples, options)
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("mirror-bench-http-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// wrk with 16 keep-alive connections on 2 threads for `seconds`.
fn wrk(client: &str, seconds: u32) -> Sample {
    let out = in_ns(client, "wrk")
        .args(["-t2", "-c16", &format!("-d{seconds}s"), "--latency"])
        .arg(format!("http://{PRIMARY}/bench"))
        .stdin(Stdio::null())
        .output()
        .expect("wrk");
    let text = String::from_utf8_lossy(&out.stdout);
    let requests_per_second = text
        .lines()
        .find_map(|line| line.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    let p99_ms = text
        .lines()
        .find_map(|line| line.trim().strip_prefix("99%"))
        .map_or(0.0, |v| duration_ms(v.trim()));
    Sample {
        requests_per_second,
        p99_ms,
    }
}

/// wrk's durations: `812.00us`, `1.23ms`, `2.01s`.
fn duration_ms(text: &str) -> f64 {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().unwrap_or(0.0);
    match unit {
        "us" => value / 1000.0,
        "ms" => value,
        "s" => value * 1000.0,
        "m" => value * 60_000.0,
        _ => value,
    }
}

fn render(samples: &BTreeMap<usize, Vec<Sample>>, options: &Options) -> String {
    let mut base: Vec<f64> = samples[&0].iter().map(|s| s.requests_per_second).collect();
    let base = median(&mut base);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "HTTP (nginx, wrk: 2 threads, 16 keep-alive connections) over a veth pair, {} rounds x {} s, cases alternating.\n",
        options.rounds, options.seconds
    );
    let _ = writeln!(
        out,
        "| case | requests/s (median) | min-max | ratio to baseline | p99 latency ms (median) |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|");
    for (index, (name, _)) in CASES.iter().enumerate() {
        let runs = &samples[&index];
        let mut rps: Vec<f64> = runs.iter().map(|s| s.requests_per_second).collect();
        let (min, max) = rps
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
        let med = median(&mut rps);
        let mut p99: Vec<f64> = runs.iter().map(|s| s.p99_ms).collect();
        let _ = writeln!(
            out,
            "| {name} | {med:.0} | {min:.0}-{max:.0} | {:.2} | {:.2} |",
            med / base,
            median(&mut p99)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_durations() {
        assert_eq!(duration_ms("812.00us"), 0.812);
        assert_eq!(duration_ms("1.23ms"), 1.23);
        assert_eq!(duration_ms("2.00s"), 2000.0);
    }
}

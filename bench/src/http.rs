//! Requests per second of an nginx beside the mirror: nothing attached,
//! the mirror alone (reassembling, no consumer), and the mirror forwarding
//! every connection to a shadow nginx. wrk drives keep-alive connections;
//! cases alternate round after round.

use std::{collections::BTreeMap, fmt::Write as _, process::Stdio};

use mirror_tests::{
    bed::TestBed,
    mirror_process::MirrorProcess,
    netns::{in_ns, spawn, wait_listening},
    web::Nginx,
};

use crate::{
    Options,
    load::parse_wrk,
    report::Section,
    stats::{Spread, cell, spread_cell},
};

const PRIMARY: &str = TestBed::SERVER_IP;
const SHADOW: &str = TestBed::SHADOW_IP;

const CASES: [(&str, &[&str]); 4] = [
    ("no mirror (baseline)", &[]),
    (
        "mirror, port 80 reassembled, no consumer",
        &["--iface", "srv0", "--port", "80"],
    ),
    (
        "mirror forwarding to a discarding sink (the forwarder's own cost)",
        &[
            "--iface",
            "srv0",
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
            "srv0",
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

pub fn run(options: &Options) -> Section {
    // The client, the primary (the bed's server) and the shadow behind it.
    let mut bed = TestBed::new();
    let shadow = bed.add_shadow();
    let (client, primary) = (&bed.client, &bed.server);
    let _primary_web = Nginx::start(primary, PRIMARY, &bed.path("primary"));
    let _shadow_web = Nginx::start(&shadow, SHADOW, &bed.path("shadow"));
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
            let mirror = (!args.is_empty()).then(|| MirrorProcess::start_quiet(primary, args));
            let sample = wrk(client, options.seconds);
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
    render(&samples, options)
}

/// wrk with 16 keep-alive connections on 2 threads for `seconds`.
fn wrk(client: &str, seconds: u32) -> Sample {
    let out = in_ns(client, "wrk")
        .args(["-t2", "-c16", &format!("-d{seconds}s"), "--latency"])
        .arg(format!("http://{PRIMARY}/bench"))
        .stdin(Stdio::null())
        .output()
        .expect("wrk");
    let (requests_per_second, p99_ms) = parse_wrk(&String::from_utf8_lossy(&out.stdout));
    Sample {
        requests_per_second,
        p99_ms: p99_ms.unwrap_or(0.0),
    }
}

fn render(samples: &BTreeMap<usize, Vec<Sample>>, options: &Options) -> Section {
    let base = Spread::of(samples[&0].iter().map(|s| s.requests_per_second)).map(|s| s.median);
    let mut md = format!(
        "## Shadow forwarding: nginx beside the mirror replaying its requests\n\n\
         HTTP (nginx answering `ok`; wrk: 2 threads, 16 keep-alive connections) over a veth \
         pair; the forwarder replays every mirrored connection to a second namespace, where a \
         discarding sink or a shadow nginx answers. {} rounds of {} s, cases alternating.\n\n\
         | case | requests/s (min-max) | ratio to baseline | p99 latency ms |\n|---|---:|---:|---:|\n",
        options.rounds, options.seconds
    );
    let mut missing = Vec::new();
    for (index, (name, _)) in CASES.iter().enumerate() {
        let runs = &samples[&index];
        let rps = Spread::of(runs.iter().map(|s| s.requests_per_second));
        if runs.iter().any(|s| s.requests_per_second <= 0.0) || rps.is_none() {
            missing.push(format!("forward {name}: no requests/s"));
        }
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {} |",
            spread_cell(rps, 0),
            cell(rps.zip(base).map(|(r, b)| r.median / b), 2),
            cell(
                Spread::of(runs.iter().map(|s| s.p99_ms)).map(|s| s.median),
                2
            ),
        );
    }
    Section {
        name: "forward",
        markdown: md,
        plots: Vec::new(),
        missing,
    }
}

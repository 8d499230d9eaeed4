//! The service's throughput beside each way of watching it, measured side
//! by side in one run on a veth pair between two network namespaces, cases
//! alternating round after round (the machine is noisy: medians and ranges,
//! ratios to the baseline of the same run).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use mirror_tests::{
    mirror_process::MirrorProcess,
    netns::{TestNet, in_ns, run_in, spawn, wait_listening},
};
use serde_json::Value;

use crate::{Options, median};

const PORT: u16 = 5201;
const UNSUBSCRIBED_PORT: &str = "5999";

#[derive(Clone, Copy)]
enum Watcher {
    Nothing,
    Mirror {
        attach: &'static str,
        subscribed: bool,
    },
    Tcpdump,
}

struct Case {
    name: &'static str,
    watcher: Watcher,
}

const CASES: [Case; 8] = [
    Case {
        name: "no capture (baseline)",
        watcher: Watcher::Nothing,
    },
    Case {
        name: "mirror tc, port not subscribed",
        watcher: Watcher::Mirror {
            attach: "tc",
            subscribed: false,
        },
    },
    Case {
        name: "mirror tc, mirroring",
        watcher: Watcher::Mirror {
            attach: "tc",
            subscribed: true,
        },
    },
    Case {
        name: "mirror xdp generic, port not subscribed",
        watcher: Watcher::Mirror {
            attach: "xdp-skb",
            subscribed: false,
        },
    },
    Case {
        name: "mirror xdp generic, mirroring",
        watcher: Watcher::Mirror {
            attach: "xdp-skb",
            subscribed: true,
        },
    },
    Case {
        name: "mirror xdp native, port not subscribed",
        watcher: Watcher::Mirror {
            attach: "xdp-drv",
            subscribed: false,
        },
    },
    Case {
        name: "mirror xdp native, mirroring",
        watcher: Watcher::Mirror {
            attach: "xdp-drv",
            subscribed: true,
        },
    },
    Case {
        name: "tcpdump -B 65536, same port",
        watcher: Watcher::Tcpdump,
    },
];

/// One measured run of one case.
#[derive(Debug, Default, Clone)]
struct Sample {
    gbps: f64,
    /// CPU seconds of the capture process per GB the service received.
    cpu_per_gb: Option<f64>,
    /// Packets the capture lost (ring full; tcpdump: dropped by kernel).
    lost: u64,
    captured: u64,
}

/// Runs every case `options.rounds` times in alternation; returns the table.
pub fn run(options: &Options) -> String {
    let mut net = TestNet::new();
    let client = net.namespace("bcli");
    let server = net.namespace("bsrv");
    net.veth(
        (&client, "cli0", "198.18.0.1/24"),
        (&server, "srv0", "198.18.0.2/24"),
    );
    let _iperf_server = spawn(
        in_ns(&server, "iperf3")
            .args(["-s", "-p", &PORT.to_string()])
            .stdout(Stdio::null()),
    );
    wait_listening(&server, PORT);

    let mut samples: BTreeMap<usize, Vec<Sample>> = BTreeMap::new();
    for round in 1..=options.rounds {
        for (index, case) in CASES.iter().enumerate() {
            let sample = measure(&client, &server, case.watcher, options.seconds);
            eprintln!(
                "bench: round {round}/{} {:<40} {:6.2} Gbit/s lost {}",
                options.rounds, case.name, sample.gbps, sample.lost
            );
            samples.entry(index).or_default().push(sample);
        }
    }
    render(&samples, options)
}

fn measure(client: &str, server: &str, watcher: Watcher, seconds: u32) -> Sample {
    let port = PORT.to_string();
    let running = match watcher {
        Watcher::Nothing => Running::Nothing,
        Watcher::Mirror { attach, subscribed } => {
            let port = if subscribed {
                port.as_str()
            } else {
                UNSUBSCRIBED_PORT
            };
            Running::Mirror(MirrorProcess::start_quiet(
                server,
                &["--iface", "srv0", "--port", port, "--attach", attach],
            ))
        }
        Watcher::Tcpdump => Running::Tcpdump(start_tcpdump(server)),
    };
    let cpu_before = running.pid().map(cpu_seconds);
    let report = run_in(
        client,
        "iperf3",
        &[
            "-c",
            "198.18.0.2",
            "-p",
            &port,
            "-t",
            &seconds.to_string(),
            "-J",
        ],
    );
    let report: Value = serde_json::from_slice(&report.stdout).expect("iperf3 JSON");
    let received = &report["end"]["sum_received"];
    let gbps = received["bits_per_second"]
        .as_f64()
        .expect("bits_per_second")
        / 1e9;
    let gbytes = received["bytes"].as_f64().expect("bytes") / 1e9;
    let cpu_per_gb = running
        .pid()
        .map(cpu_seconds)
        .zip(cpu_before)
        .map(|(after, before)| (after - before) / gbytes);
    let (lost, captured) = running.stop();
    Sample {
        gbps,
        cpu_per_gb,
        lost,
        captured,
    }
}

enum Running {
    Nothing,
    Mirror(MirrorProcess),
    Tcpdump(Child),
}

impl Running {
    fn pid(&self) -> Option<u32> {
        match self {
            Self::Nothing => None,
            Self::Mirror(mirror) => Some(mirror.pid()),
            Self::Tcpdump(child) => Some(child.id()),
        }
    }

    /// Stops the watcher; returns (lost, captured) packets.
    fn stop(self) -> (u64, u64) {
        match self {
            Self::Nothing => (0, 0),
            Self::Mirror(mirror) => {
                let output = mirror.interrupt();
                (output.kernel("ring_full"), output.kernel("mirrored"))
            }
            Self::Tcpdump(mut child) => {
                // SAFETY: plain kill(2) on our own child.
                unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
                let stderr = child.stderr.take().expect("piped");
                let _ = child.wait();
                let text: Vec<String> = BufReader::new(stderr)
                    .lines()
                    .map_while(Result::ok)
                    .collect();
                let count = |what: &str| {
                    text.iter()
                        .find(|line| line.ends_with(what))
                        .and_then(|line| line.split_whitespace().next()?.parse().ok())
                        .unwrap_or(0)
                };
                (
                    count("packets dropped by kernel"),
                    count("packets captured"),
                )
            }
        }
    }
}

fn start_tcpdump(server: &str) -> Child {
    let mut child = in_ns(server, "tcpdump")
        .args(["-i", "srv0", "-B", "65536", "-s", "0", "-w", "/dev/null"])
        .arg(format!("tcp dst port {PORT}"))
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tcpdump");
    // tcpdump says "listening on ..." once its socket is bound.
    let stderr = child.stderr.take().expect("piped");
    let mut reader = BufReader::new(stderr);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut line = String::new();
    while Instant::now() < deadline {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line.contains("listening on") {
            break;
        }
    }
    child.stderr = Some(reader.into_inner());
    child
}

/// User + system CPU seconds of a process so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<f64>().ok())
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz
}

fn render(samples: &BTreeMap<usize, Vec<Sample>>, options: &Options) -> String {
    let mut baseline: Vec<f64> = samples[&0].iter().map(|s| s.gbps).collect();
    let baseline = median(&mut baseline);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Bulk TCP (iperf3, 1 stream) over a veth pair, {} rounds x {} s, cases alternating.\n",
        options.rounds, options.seconds
    );
    let _ = writeln!(
        out,
        "| case | Gbit/s (median) | min-max | ratio to baseline | capture CPU s/GB | lost / captured packets |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|");
    for (index, case) in CASES.iter().enumerate() {
        let runs = &samples[&index];
        let mut gbps: Vec<f64> = runs.iter().map(|s| s.gbps).collect();
        let (min, max) = gbps
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), g| (lo.min(*g), hi.max(*g)));
        let med = median(&mut gbps);
        let mut cpu: Vec<f64> = runs.iter().filter_map(|s| s.cpu_per_gb).collect();
        let cpu = if cpu.is_empty() {
            "-".to_owned()
        } else {
            format!("{:.3}", median(&mut cpu))
        };
        let lost: u64 = runs.iter().map(|s| s.lost).sum();
        let captured: u64 = runs.iter().map(|s| s.captured).sum();
        let _ = writeln!(
            out,
            "| {} | {med:.2} | {min:.2}-{max:.2} | {:.2} | {cpu} | {lost} / {captured} |",
            case.name,
            med / baseline
        );
    }
    out
}

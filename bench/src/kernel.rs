//! What the kernel programs cost per packet: measured by the kernel itself
//! on live traffic (`kernel.bpf_stats_enabled`: run time / run count), and
//! by BPF_PROG_TEST_RUN with a repeat count on crafted 64- and 1500-byte
//! frames.

use std::{fmt::Write as _, fs, time::Duration};

use aya::programs::{TestRun as _, TestRunOptions, loaded_programs};
use etherparse::PacketBuilder;
use mirror_common::{Counter, PROG_TC, PROG_XDP};
use mirror_tests::mirror_process::MirrorProcess;
use mirror_user::kernel::{
    btf::NetnsPath,
    loader::{CpuRing, LoadOptions, Mirror, ProgramKind, Sample},
};

use crate::{
    Options,
    bed::{Bed, IFACE},
    load::{self, Traffic},
    plot::{self, Bar, Kind, Panel},
    report::Section,
    stats::{Spread, spread_cell},
};

const SUBSCRIBED: u16 = 8080;
const OTHER: u16 = 9090;
const FRAME_SIZES: [usize; 2] = [64, 1500];
/// Runs per BPF_PROG_TEST_RUN call: the kernel times them as a whole.
const REPEAT: u32 = 1000;

pub fn run(options: &Options) -> Section {
    let mut missing = Vec::new();
    let (live_md, live_bars) = live(options, &mut missing);
    let (test_md, test_bars) = test_runs(options, &mut missing);
    let markdown = format!(
        "## Kernel: cost per packet of the in-kernel filter and copy\n\n{live_md}\n{test_md}\n![kernel cost](kernel-cost.svg)\n"
    );
    Section {
        name: "kernel",
        markdown,
        plots: vec![(
            "kernel-cost.svg".to_owned(),
            plot::bars(
                "Nanoseconds per packet in the mirror's kernel program",
                "ns per packet (median; whisker: min-max)",
                &[
                    Panel {
                        title: "live traffic (bpf_stats: run time / run count)".to_owned(),
                        bars: live_bars,
                    },
                    Panel {
                        title: "BPF_PROG_TEST_RUN, repeat 1000".to_owned(),
                        bars: test_bars,
                    },
                ],
                None,
            ),
        )],
        missing,
    }
}

/// Turns `kernel.bpf_stats_enabled` on, and back to what it was on drop.
struct BpfStats(String);

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> Self {
        let before = fs::read_to_string(BPF_STATS).unwrap_or_else(|_| "0".to_owned());
        fs::write(BPF_STATS, "1").expect("enable kernel.bpf_stats_enabled");
        Self(before)
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = fs::write(BPF_STATS, self.0.trim());
    }
}

/// Run time and run count of the newest loaded program called `name`
/// (the mirror just started: nothing else loads ours meanwhile).
fn program_stats(name: &str) -> Option<(Duration, u64)> {
    loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str() == Some(name))
        .max_by_key(|p| p.id())
        .map(|p| (p.run_time(), p.run_count()))
}

struct LiveSample {
    ns_per_packet: f64,
    bytes_per_packet: f64,
    packets: u64,
}

fn live(options: &Options, missing: &mut Vec<String>) -> (String, Vec<Bar>) {
    let bed = Bed::new();
    let _stats = BpfStats::enable();
    let seconds = options.seconds.min(4);
    let traffics = [
        Traffic::Bulk { streams: 1 },
        Traffic::Requests { close: false },
    ];
    let cases: Vec<(&str, Traffic, bool)> = ["tc", "xdp-skb", "xdp-drv"]
        .into_iter()
        .flat_map(|attach| {
            traffics
                .into_iter()
                .flat_map(move |t| [false, true].map(|subscribed| (attach, t, subscribed)))
        })
        .collect();
    let mut samples: Vec<Vec<LiveSample>> = cases.iter().map(|_| Vec::new()).collect();
    for round in 1..=options.rounds {
        for (i, (attach, traffic, subscribed)) in cases.iter().enumerate() {
            let port = if *subscribed { traffic.port() } else { OTHER };
            let mirror = MirrorProcess::start_quiet(
                &bed.server,
                &[
                    "--iface",
                    IFACE,
                    "--port",
                    &port.to_string(),
                    "--attach",
                    attach,
                ],
            );
            let before = bed.counters();
            load::run(*traffic, &bed, seconds);
            let iface = bed.counters().since(before);
            let name = if *attach == "tc" { PROG_TC } else { PROG_XDP };
            let stats = program_stats(name);
            let output = mirror.interrupt();
            let Some((run_time, run_count)) = stats.filter(|(_, count)| *count > 0) else {
                missing.push(format!("bpf_stats of {name} ({attach}): no runs counted"));
                continue;
            };
            let sample = LiveSample {
                ns_per_packet: run_time.as_nanos() as f64 / run_count as f64,
                bytes_per_packet: iface.rx_bytes as f64 / iface.rx_packets.max(1) as f64,
                packets: run_count,
            };
            if *subscribed && output.kernel("mirrored") == 0 {
                missing.push(format!("{attach} {}: nothing mirrored", traffic.name()));
            }
            eprintln!(
                "bench: kernel round {round}/{} {attach:<8} {:<28} {:<14} {:7.0} ns/packet, {:6.0} B/packet",
                options.rounds,
                traffic.name(),
                if *subscribed {
                    "mirrored"
                } else {
                    "not subscribed"
                },
                sample.ns_per_packet,
                sample.bytes_per_packet
            );
            samples[i].push(sample);
        }
    }
    let mut md = format!(
        "Live traffic, measured by the kernel (`kernel.bpf_stats_enabled=1`, which itself adds a \
         little per run): the program's total run time over its run count, on the server's \
         interface, {} rounds of {seconds} s. With TC and generic XDP a packet is a GRO/GSO \
         super-packet of up to 64 KiB; native XDP on veth turns those off, so it sees MTU-sized \
         packets (and many more of them). *Mirrored*: the port subscribed, each packet copied \
         whole into the CPU's ring; no consumer.\n\n\
         | attach | traffic | port | ns per packet | mean packet bytes | packets per run |\n\
         |---|---|---|---:|---:|---:|\n",
        options.rounds
    );
    let mut bars = Vec::new();
    for ((attach, traffic, subscribed), runs) in cases.iter().zip(&samples) {
        if runs.len() != options.rounds {
            missing.push(format!(
                "bpf_stats {attach} {}: {} runs",
                traffic.name(),
                runs.len()
            ));
        }
        let ns = Spread::of(runs.iter().map(|s| s.ns_per_packet));
        let bytes = Spread::of(runs.iter().map(|s| s.bytes_per_packet));
        let packets = Spread::of(runs.iter().map(|s| s.packets as f64));
        let state = if *subscribed {
            "mirrored"
        } else {
            "not subscribed"
        };
        let _ = writeln!(
            md,
            "| {attach} | {} | {state} | {} | {:.0} | {:.0} |",
            traffic.name(),
            spread_cell(ns, 0),
            bytes.map_or(0.0, |s| s.median),
            packets.map_or(0.0, |s| s.median),
        );
        if let Some(ns) = ns {
            bars.push(Bar {
                label: format!(
                    "{attach} {} {}",
                    if traffic.is_bulk() {
                        "bulk"
                    } else {
                        "requests"
                    },
                    if *subscribed { "mirrored" } else { "unsub." }
                ),
                kind: if *subscribed {
                    Kind::Mirror
                } else {
                    Kind::Baseline
                },
                spread: ns,
            });
        }
    }
    (md, bars)
}

/// An IPv4 TCP frame of `size` bytes (Ethernet header included) to `port`.
fn frame(size: usize, port: u16) -> Vec<u8> {
    let mut frame = Vec::with_capacity(size);
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64)
        .tcp(40000, port, 1000, 64240)
        .ack(1)
        .write(&mut frame, &vec![0x5a; size - 54])
        .expect("frame");
    frame
}

fn test_runs(options: &Options, missing: &mut Vec<String>) -> (String, Vec<Bar>) {
    let batches = if options.quick { 5 } else { 200 };
    let mut mirror = Mirror::load(&LoadOptions {
        snaplen: mirror_common::MAX_SNAPLEN,
        ring_size: 16 << 20,
        kernel_log_level: 0,
        sample: Sample::ALL,
        netns_path: None,
    })
    .expect("load the mirror's programs");
    mirror.set_port(SUBSCRIBED, true).expect("subscribe");
    let mut rings = mirror.take_rings();
    let mut md = format!(
        "BPF_PROG_TEST_RUN: one IPv4 TCP frame run {REPEAT} times per call (the kernel's own \
         timing), {batches} calls per case, rings emptied between calls so that every mirrored \
         run really copies; median and range over calls.\n\n\
         | program | frame bytes | port | ns per run |\n|---|---:|---|---:|\n"
    );
    let mut bars = Vec::new();
    // The namespace cookie's cost, where the kernel says where it is.
    let mut cookies = NetnsPath::of_running_kernel().ok().map(|path| {
        let mut cookies = Mirror::load(&LoadOptions {
            snaplen: mirror_common::MAX_SNAPLEN,
            ring_size: 16 << 20,
            kernel_log_level: 0,
            sample: Sample::ALL,
            netns_path: Some(path),
        })
        .expect("load the mirror's programs");
        cookies.set_port(SUBSCRIBED, true).expect("subscribe");
        let rings = cookies.take_rings();
        (cookies, rings)
    });
    for kind in [ProgramKind::Tc, ProgramKind::Xdp] {
        for size in FRAME_SIZES {
            // The namespace cookie (several namespaces watched) only on
            // mirrored packets: the others never reach it.
            for (subscribed, with_cookie) in [(false, false), (true, false), (true, true)] {
                let data = frame(size, if subscribed { SUBSCRIBED } else { OTHER });
                let (mirror, rings) = match (with_cookie, &mut cookies) {
                    (false, _) => (&mut mirror, &mut rings),
                    (true, Some((cookies, cookie_rings))) => (cookies, cookie_rings),
                    (true, None) => continue,
                };
                let before = mirror.counters().expect("counters");
                let mut per_run = Vec::new();
                for _ in 0..batches {
                    let options = TestRunOptions {
                        data_in: Some(&data),
                        repeat: REPEAT,
                        ..TestRunOptions::default()
                    };
                    let result = match kind {
                        ProgramKind::Tc => mirror.tc().expect("tc").test_run(options),
                        ProgramKind::Xdp => mirror.xdp().expect("xdp").test_run(options),
                        ProgramKind::TcEgress => {
                            mirror.tc_egress().expect("tc egress").test_run(options)
                        }
                    }
                    .expect("test run");
                    per_run.push(result.duration.as_nanos() as f64);
                    drain(rings);
                }
                let moved = mirror.counters().expect("counters").since(&before);
                let expected = u64::from(REPEAT) * batches as u64;
                let counter = if subscribed {
                    Counter::Mirrored
                } else {
                    Counter::NotSubscribed
                };
                let program = match kind {
                    ProgramKind::Tc => "tc",
                    ProgramKind::Xdp => "xdp",
                    ProgramKind::TcEgress => "tc-egress",
                };
                if moved.get(counter) != expected {
                    missing.push(format!(
                        "test run {program} {size} B: {} {} of {expected}",
                        moved.get(counter),
                        counter.name()
                    ));
                }
                let spread = Spread::of(per_run);
                let state = match (subscribed, with_cookie) {
                    (false, _) => "not subscribed",
                    (true, false) => "mirrored",
                    (true, true) => "mirrored, namespace cookie",
                };
                let _ = writeln!(
                    md,
                    "| {program} | {size} | {state} | {} |",
                    spread_cell(spread, 1)
                );
                if let Some(spread) = spread {
                    let label = match (subscribed, with_cookie) {
                        (false, _) => "unsub.",
                        (true, false) => "mirrored",
                        (true, true) => "mirrored+netns",
                    };
                    bars.push(Bar {
                        label: format!("{program} {size} B {label}"),
                        kind: if subscribed {
                            Kind::Mirror
                        } else {
                            Kind::Baseline
                        },
                        spread,
                    });
                }
            }
        }
    }
    (md, bars)
}

fn drain(rings: &mut [CpuRing]) {
    for ring in rings {
        while ring.ring.next().is_some() {}
    }
}

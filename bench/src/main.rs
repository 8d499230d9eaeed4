//! `cargo xtask bench`: the mirror measured side by side with tcpdump,
//! netsniff-ng and xdpdump on the same traffic, in one run (needs root:
//! network namespaces, BPF). Writes `bench/results.md` and SVG plots.
//!
//! Scenarios:
//! - `capture`: bulk, small-request and short-connection traffic beside
//!   every watcher: throughput ratio, p99, completeness, CPU, memory, loss;
//!   on bulk traffic also each kind of consumer (`mirror tail` over Unix
//!   and TCP, `--dump-dir`, `--pcap`, `--forward`) beside tcpdump;
//! - `directions`: `--directions client` beside `--directions both`, each
//!   with a `mirror tail`: what following the answers costs;
//! - `kernel`: the kernel program's cost per packet (bpf_stats on live
//!   traffic, BPF_PROG_TEST_RUN on crafted frames);
//! - `isolation`: a stalled consumer beside a reading one;
//! - `fanout`: the userspace pipeline to 1, 8 and 32 consumers;
//! - `forward`: nginx beside the shadow forwarder;
//! - `nats`: the pipeline publishing to a local JetStream.
//!
//! `--quick` runs everything once, briefly, into a temporary directory and
//! fails if any figure is missing (how fast does not matter there).

mod bed;
mod capture;
mod directions;
mod fanout;
mod http;
mod isolation;
mod kernel;
mod load;
mod nats;
mod plot;
mod procstat;
mod report;
mod stats;
mod tmpfs;
mod tools;
mod watch;

use std::{
    path::PathBuf,
    sync::atomic::{AtomicI32, Ordering},
};

pub struct Options {
    pub rounds: usize,
    pub seconds: u32,
    pub quick: bool,
}

const USAGE: &str = "use --quick, --rounds N, --seconds N, --out-dir DIR, --scenario capture|directions|kernel|isolation|fanout|forward|nats";

fn main() {
    clean_up_on_signal();
    let mut options = Options {
        rounds: 3,
        seconds: 8,
        quick: false,
    };
    let mut out_dir = None;
    let mut scenarios = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| fail(&format!("{arg} needs a value")))
        };
        match arg.as_str() {
            "--quick" => options.quick = true,
            "--rounds" => options.rounds = value().parse().unwrap_or_else(|_| fail(USAGE)),
            "--seconds" => options.seconds = value().parse().unwrap_or_else(|_| fail(USAGE)),
            "--out-dir" => out_dir = Some(PathBuf::from(value())),
            "--scenario" => scenarios.push(value()),
            other => fail(&format!("unknown argument {other}: {USAGE}")),
        }
    }
    if options.quick {
        options.rounds = 1;
        options.seconds = 1;
    }
    if scenarios.is_empty() {
        scenarios = report::ORDER.iter().map(|s| (*s).to_owned()).collect();
    }
    // Without --out-dir the results (printed as they come) go to a
    // directory that is kept only when a figure is missing.
    let temporary = out_dir.is_none();
    let out_dir = out_dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("mirror-bench-quick-{}", std::process::id()))
    });
    std::fs::create_dir_all(&out_dir).expect("create the output directory");
    let stamp = report::stamp();
    let mut missing = Vec::new();
    for scenario in &scenarios {
        eprintln!("bench: scenario {scenario}");
        let section = match scenario.as_str() {
            "capture" => capture::run(&options),
            "directions" => directions::run(&options),
            "kernel" => kernel::run(&options),
            "isolation" => isolation::run(&options),
            "fanout" => fanout::run(&options),
            "forward" | "http" => http::run(&options),
            "nats" => nats::run(&options),
            other => fail(&format!("unknown scenario {other}: {USAGE}")),
        };
        println!("{}", section.markdown);
        for (file, svg) in &section.plots {
            if !svg.starts_with("<svg") || !svg.contains("<rect") {
                missing.push(format!("{file}: not a drawn SVG"));
            }
        }
        if section.markdown.contains("NaN") || section.markdown.contains("inf ") {
            missing.push(format!("{}: a figure is not a number", section.name));
        }
        missing.extend(section.missing.iter().cloned());
        report::write_section(&out_dir, &section, &stamp);
    }
    report::assemble(&out_dir, &report::machine());
    if !missing.is_empty() {
        eprintln!(
            "bench: figures missing (the results are in {}):",
            out_dir.display()
        );
        for what in &missing {
            eprintln!("  - {what}");
        }
        std::process::exit(1);
    }
    if temporary {
        let _ = std::fs::remove_dir_all(&out_dir);
    } else {
        eprintln!("bench: wrote {}", out_dir.join("results.md").display());
    }
    if options.quick {
        eprintln!("bench: every figure was produced");
    }
}

/// Ctrl-C, SIGTERM or SIGHUP: the test bed is removed (namespaces, and
/// every tool and server running in them) before the process ends, since
/// the signal gives no destructor a chance to run. A handler (not a
/// blocked mask: spawned programs inherit the mask, and the tools are
/// stopped with SIGINT) wakes a thread through a pipe.
fn clean_up_on_signal() {
    static WAKE: AtomicI32 = AtomicI32::new(-1);
    extern "C" fn on_signal(_: libc::c_int) {
        let byte = 1u8;
        // SAFETY: write(2) is async-signal-safe; the fd stays open for the
        // life of the process.
        unsafe { libc::write(WAKE.load(Ordering::Relaxed), (&raw const byte).cast(), 1) };
    }
    let mut fds = [0; 2];
    // SAFETY: pipe2(2) into a local array; signal(2) with a handler that
    // only writes to that pipe.
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return;
        }
        WAKE.store(fds[1], Ordering::Relaxed);
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::signal(signal, on_signal as *const () as libc::sighandler_t);
        }
    }
    let read_end = fds[0];
    std::thread::spawn(move || {
        let mut byte = 0u8;
        // SAFETY: a blocking read of one byte into a local.
        while unsafe { libc::read(read_end, (&raw mut byte).cast(), 1) } < 0 {}
        eprintln!("bench: interrupted; removing the test bed");
        tmpfs::unmount_all();
        mirror_tests::bed::remove_own_leftovers();
        std::process::exit(130);
    });
}

fn fail(message: &str) -> ! {
    eprintln!("mirror-bench: {message}");
    std::process::exit(2);
}

//! `cargo xtask`: setup, build, run, test and lint of the mirror.
//!
//! Every step that needs a tool first runs the part of `setup` that
//! provides it, so a new user never has to know the order.

mod layering;
mod packaging;
mod setup;
mod shell;

use std::{
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

use crate::shell::{cargo_nightly, cargo_stable, run};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "Build, run and test the mirror")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what this machine lacks: rust-src for nightly, bpf-linker
    /// built against nightly's own LLVM, and the Debian packages the tests
    /// use. Idempotent and quick when everything is there.
    Setup,
    /// Build the eBPF object (target/ebpf/bpfel-unknown-none/release/mirror-ebpf).
    BuildEbpf,
    /// Build the eBPF object and the `mirror` binary that embeds it
    /// (target/release/mirror).
    Build,
    /// Build, then run `mirror ARGS` (default: watch port 8080 on lo and
    /// print each packet).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Setup, build, lint and every test, privileged ones included (run as root).
    Test {
        /// Extra arguments for `cargo test` after `--` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The layering of mirror-user/src, cargo fmt --check and clippy -D
    /// warnings on every crate.
    Lint,
    /// Offline checks of packaging/: systemd-analyze verify and security on
    /// the unit, kubernetes-validate on the manifests, hadolint on the
    /// Containerfile, and the flags they pass against `mirror run --help`
    /// (of $MIRROR_BIN if set, else of a fresh build).
    CheckPackaging,
    /// Run the fuzz targets (cargo-fuzz on nightly, in mirror-user/fuzz):
    /// the subscriber protocol's decoders, the ring record decoder, and
    /// the connection table on arbitrary segment sequences. A failing
    /// input is kept in mirror-user/fuzz/artifacts/TARGET/.
    Fuzz {
        /// Seconds of fuzzing per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only this target (repeatable): protocol_frames, ring_records,
        /// connection_table.
        #[arg(long)]
        target: Vec<String>,
    },
    /// Side-by-side benchmarks against tcpdump, netsniff-ng and xdpdump
    /// (run as root): writes bench/results.md and SVG plots in bench/.
    Bench {
        /// A short smoke run of every scenario (1 round, 1 s per case) into
        /// a temporary directory; fails if any figure is missing.
        #[arg(long)]
        quick: bool,
        /// Only this scenario (repeatable): capture, kernel, isolation,
        /// fanout, forward. Its section of results.md is replaced.
        #[arg(long)]
        scenario: Vec<String>,
        /// Rounds; every case runs once per round, in alternation.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Seconds of traffic per run.
        #[arg(long, default_value_t = 8)]
        seconds: u32,
    },
}

/// What `cargo xtask run` runs without arguments.
const DEFAULT_RUN_ARGS: [&str; 6] = ["run", "--iface", "lo", "--port", "8080", "--print"];

fn main() {
    let cli = Cli::parse();
    if let Err(error) = dispatch(cli.command) {
        eprintln!("xtask: {error:#}");
        std::process::exit(1);
    }
}

fn dispatch(task: Task) -> Result<()> {
    let root = workspace_root();
    match task {
        Task::Setup => setup::all(&root),
        Task::BuildEbpf => build_ebpf(&root).map(drop),
        Task::Build => build(&root).map(drop),
        Task::Run { args } => {
            let binary = build(&root)?;
            let args = if args.is_empty() {
                DEFAULT_RUN_ARGS
                    .iter()
                    .map(|s| (*s).to_owned())
                    .chain(["text".to_owned()])
                    .collect()
            } else {
                args
            };
            eprintln!("xtask: running {} {}", binary.display(), args.join(" "));
            let error = Command::new(&binary).args(&args).exec();
            Err(error).with_context(|| format!("cannot run {}", binary.display()))
        }
        Task::Test { args } => test(&root, &args),
        Task::Bench {
            quick,
            scenario,
            rounds,
            seconds,
        } => bench(&root, quick, &scenario, rounds, seconds),
        Task::CheckPackaging => {
            // MIRROR_BIN, as for the privileged tests: a binary built already.
            let binary = match std::env::var_os("MIRROR_BIN") {
                Some(binary) => PathBuf::from(binary),
                None => build(&root)?,
            };
            packaging::check(&root, &binary, &setup::packaging_tools()?)
        }
        Task::Lint => {
            setup::toolchain(&root)?;
            build_ebpf(&root)?;
            lint(&root)
        }
        Task::Fuzz { seconds, target } => {
            let object = build_ebpf(&root)?;
            fuzz(&root, &object, seconds, &target)
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn ebpf_target_dir(root: &Path) -> PathBuf {
    root.join("target/ebpf")
}

/// Builds the eBPF object and returns its path.
fn build_ebpf(root: &Path) -> Result<PathBuf> {
    let linker = setup::toolchain(root)?;
    run(cargo_nightly(&root.join("mirror-ebpf"))
        .args(["build", "--release", "--target-dir"])
        .arg(ebpf_target_dir(root))
        .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", &linker))?;
    let object = ebpf_target_dir(root).join("bpfel-unknown-none/release/mirror-ebpf");
    if !object.is_file() {
        bail!(
            "the eBPF build finished but {} is missing",
            object.display()
        );
    }
    Ok(object)
}

/// Builds everything and returns the path of the `mirror` binary.
fn build(root: &Path) -> Result<PathBuf> {
    let object = build_ebpf(root)?;
    run(cargo_stable(root)
        .args([
            "build",
            "--release",
            "--package",
            "mirror-user",
            "--bin",
            "mirror",
        ])
        .env("MIRROR_EBPF_OBJECT", &object))?;
    Ok(root.join("target/release/mirror"))
}

fn lint(root: &Path) -> Result<()> {
    // Before the slow steps: which module of mirror-user may use which.
    layering::check(root)?;
    let object = ebpf_target_dir(root).join("bpfel-unknown-none/release/mirror-ebpf");
    run(cargo_stable(root).args(["fmt", "--all", "--", "--check"]))?;
    // The fuzz crate is its own workspace.
    run(cargo_stable(root).args([
        "fmt",
        "--manifest-path",
        "mirror-user/fuzz/Cargo.toml",
        "--",
        "--check",
    ]))?;
    run(cargo_nightly(&root.join("mirror-ebpf")).args(["fmt", "--", "--check"]))?;
    run(cargo_stable(root)
        .args([
            "clippy",
            "--release",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])
        .env("MIRROR_EBPF_OBJECT", &object))?;
    // The eBPF crate is checked with its own toolchain and target, in a
    // target directory of its own so that it does not evict the build.
    run(cargo_nightly(&root.join("mirror-ebpf"))
        .args(["clippy", "--release", "--target-dir"])
        .arg(root.join("target/ebpf-clippy"))
        .args(["--", "-D", "warnings"]))?;
    Ok(())
}

fn bench(root: &Path, quick: bool, scenarios: &[String], rounds: u32, seconds: u32) -> Result<()> {
    setup::all(root)?;
    let binary = build(root)?;
    if !setup::is_root() {
        bail!("the benchmark creates network namespaces and loads BPF programs: run it as root");
    }
    let object = ebpf_target_dir(root).join("bpfel-unknown-none/release/mirror-ebpf");
    bench_run(root, &binary, &object, quick, scenarios, rounds, seconds)
}

fn bench_run(
    root: &Path,
    binary: &Path,
    object: &Path,
    quick: bool,
    scenarios: &[String],
    rounds: u32,
    seconds: u32,
) -> Result<()> {
    let out = root.join("bench");
    std::fs::create_dir_all(&out)?;
    let mut command = cargo_stable(root);
    command
        .args(["run", "--release", "--package", "mirror-bench", "--"])
        .env("MIRROR_EBPF_OBJECT", object)
        .env("MIRROR_BIN", binary);
    for scenario in scenarios {
        command.args(["--scenario", scenario]);
    }
    if quick {
        // Results go to a temporary directory: bench/ keeps the last full run.
        command.arg("--quick");
    } else {
        command
            .args([
                "--rounds",
                &rounds.to_string(),
                "--seconds",
                &seconds.to_string(),
            ])
            .arg("--out-dir")
            .arg(&out);
    }
    run(&mut command)
}

fn test(root: &Path, extra: &[String]) -> Result<()> {
    setup::all(root)?;
    let binary = build(root)?;
    lint(root)?;
    packaging::check(root, &binary, &setup::packaging_tools()?)?;
    if !setup::is_root() {
        bail!(
            "the end-to-end tests create network namespaces and load BPF programs: run `cargo xtask test` as root (e.g. with sudo)"
        );
    }
    let object = ebpf_target_dir(root).join("bpfel-unknown-none/release/mirror-ebpf");
    run(cargo_stable(root)
        .args(["test", "--release", "--workspace"])
        .args(extra)
        .env("MIRROR_EBPF_OBJECT", &object)
        .env("MIRROR_BIN", &binary)
        // A privileged test that finds itself without root fails here
        // instead of skipping.
        .env("MIRROR_REQUIRE_PRIVILEGED", "1"))?;
    if extra.is_empty() {
        // Every fuzz target briefly, so that none of them rots.
        fuzz(root, &object, 20, &[])?;
        // The benchmark's smoke run, so that the harness never rots: it
        // checks that every figure is produced, not how fast anything is.
        bench_run(root, &binary, &object, true, &[], 0, 0)?;
    }
    Ok(())
}

/// The fuzz targets of mirror-user/fuzz.
const FUZZ_TARGETS: [&str; 3] = ["protocol_frames", "ring_records", "connection_table"];

/// Builds the fuzz targets, then runs each for `seconds` on its corpus
/// (mirror-user/fuzz/corpus/TARGET, kept out of git) and its seeds
/// (mirror-user/fuzz/seeds/TARGET, in git).
fn fuzz(root: &Path, object: &Path, seconds: u64, only: &[String]) -> Result<()> {
    if let Some(unknown) = only.iter().find(|t| !FUZZ_TARGETS.contains(&t.as_str())) {
        bail!(
            "there is no fuzz target {unknown}; the targets are {}",
            FUZZ_TARGETS.join(", ")
        );
    }
    let cargo_fuzz = setup::cargo_fuzz(root)?;
    let dir = root.join("mirror-user/fuzz");
    // Debug assertions and overflow checks on: the targets rely on them.
    run(fuzz_command(&cargo_fuzz, &dir, object).args(["build", "--debug-assertions"]))?;
    let targets: Vec<&str> = if only.is_empty() {
        FUZZ_TARGETS.to_vec()
    } else {
        only.iter().map(String::as_str).collect()
    };
    for target in targets {
        let corpus = dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("cannot create {}", corpus.display()))?;
        let mut command = fuzz_command(&cargo_fuzz, &dir, object);
        command
            .args(["run", "--debug-assertions", target])
            .arg(&corpus);
        let seeds = dir.join("seeds").join(target);
        if seeds.is_dir() {
            command.arg(&seeds);
        }
        command.args(["--", &format!("-max_total_time={seconds}")]);
        run(&mut command).with_context(|| {
            format!(
                "the fuzz target {target} failed: the input is in {}; rerun it with \
                 `cargo +nightly fuzz run --debug-assertions {target} FILE` in {}",
                dir.join("artifacts").join(target).display(),
                dir.display()
            )
        })?;
    }
    Ok(())
}

/// `cargo fuzz` on nightly in the fuzz crate, with the eBPF object that
/// mirror-user's build script embeds.
fn fuzz_command(cargo_fuzz: &Path, dir: &Path, object: &Path) -> Command {
    let mut command = Command::new(cargo_fuzz);
    // As a cargo subcommand it expects its own name first.
    command.arg("fuzz").current_dir(dir);
    shell::clear_outer_cargo_env(&mut command);
    command
        .env("RUSTUP_TOOLCHAIN", "nightly")
        .env("MIRROR_EBPF_OBJECT", object);
    command
}

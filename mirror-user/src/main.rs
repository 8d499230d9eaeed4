//! `mirror`: kernel-assisted TCP traffic mirror.

mod cli;

use std::process::ExitCode;

use clap::Parser;
use cli::{Cli, Command};
use tokio::runtime::Builder;
use tracing_subscriber::{EnvFilter, filter::LevelFilter};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let max_level = filter.max_level_hint().unwrap_or(LevelFilter::TRACE);
    // Also installs the `log` bridge that carries aya-log's kernel records.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();

    let result = match cli.command {
        // The helper is synchronous and never starts a runtime.
        Command::PrivilegedHelper => cli::privileged_helper::run(),
        // The privileged part of `run` happens before the runtime starts
        // any thread, so that giving up root covers them all.
        Command::Run(args) => cli::run::prepare(*args, max_level)
            .and_then(|prepared| block_on(Builder::new_multi_thread(), cli::run::run(prepared))),
        // No-new-privileges and the bounding set are per thread: `tail`
        // gives up root on its only thread, so that every thread made
        // later (tokio's blocking pool) is a copy of the unprivileged one.
        Command::Tail(args) => block_on(Builder::new_current_thread(), cli::tail::run(args)),
        Command::Ports(args) => block_on(Builder::new_multi_thread(), cli::ports::run(args)),
        Command::Stats(args) => block_on(Builder::new_multi_thread(), cli::stats::run(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // Whoever read our output went away (`mirror stats | head`): the
        // ordinary end of a command-line tool, as for tcpdump.
        Err(error) if is_broken_pipe(&error) => ExitCode::SUCCESS,
        Err(error) => {
            // One sentence per cause, never a backtrace (RUST_BACKTRACE
            // would make anyhow's Debug output print one).
            eprintln!("mirror: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `work` on a runtime built by `runtime` (multi-threaded, or on this
/// thread only).
fn block_on(
    mut runtime: Builder,
    work: impl Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    runtime
        .enable_all()
        .build()
        .map_err(|error| anyhow::anyhow!("cannot start the async runtime: {error}"))?
        .block_on(work)
}

fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

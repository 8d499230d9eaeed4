//! `mirror`: kernel-assisted TCP traffic mirror.

mod run;
mod tail;

use std::process::ExitCode;

use clap::Parser;
use mirror_user::cli::{Cli, Command};
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

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("mirror: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run::run(*args, max_level).await,
            Command::Tail(args) => tail::tail(args).await,
            Command::Ports(args) => tail::ports(args).await,
            Command::Stats(args) => tail::stats(args).await,
        }
    });
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

fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

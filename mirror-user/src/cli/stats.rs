//! `mirror stats`: every counter of a running mirror.

use std::io::Write as _;

use clap::Args;
use mirror_user::telemetry::registry::Document;

use crate::cli::{ConnectArgs, connect};

#[derive(Debug, Args)]
pub struct StatsArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,

    /// Refresh every second, in place, until interrupted.
    #[arg(long)]
    pub watch: bool,

    /// Print the raw JSON document.
    #[arg(long, conflicts_with = "watch")]
    pub json: bool,
}

pub async fn run(args: StatsArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.connect, "mirror stats").await?;
    loop {
        let json = client.stats().await?;
        let mut out = std::io::stdout().lock();
        if args.json {
            writeln!(out, "{json}")?;
            return Ok(());
        }
        if args.watch {
            // Home and clear: the table is redrawn in place.
            write!(out, "\x1b[H\x1b[2J")?;
        }
        for (name, value) in Document::from_json(&json).flatten() {
            writeln!(out, "{name:<48} {value}")?;
        }
        out.flush()?;
        if !args.watch {
            return Ok(());
        }
        drop(out);
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

//! `mirror ports`: list, add or remove the ports a running mirror mirrors.

use std::{io::Write as _, num::NonZeroU16};

use clap::{Args, Subcommand};

use crate::cli::{ConnectArgs, connect, parse_port};

#[derive(Debug, Args)]
pub struct PortsArgs {
    #[command(subcommand)]
    pub action: PortsAction,

    #[command(flatten)]
    pub connect: ConnectArgs,
}

#[derive(Debug, Subcommand)]
pub enum PortsAction {
    /// The mirrored ports, with why each is mirrored.
    List,
    /// Mirror a port until `remove` (it must be inside --allow-ports).
    Add {
        #[arg(value_parser = parse_port)]
        port: NonZeroU16,
    },
    /// Stop mirroring a port added with `add`.
    Remove {
        #[arg(value_parser = parse_port)]
        port: NonZeroU16,
    },
}

pub async fn run(args: PortsArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.connect, "mirror ports").await?;
    match args.action {
        PortsAction::List => {
            let ports = client.list_ports().await?;
            let mut out = std::io::stdout().lock();
            writeln!(out, "{:>5}  {:<14} subscribers", "port", "mirrored by")?;
            for info in ports {
                let why = match (info.command_line, info.added) {
                    (true, _) => "command line",
                    (false, true) => "ports add",
                    (false, false) => "subscribers",
                };
                writeln!(out, "{:>5}  {why:<14} {}", info.port, info.subscribers)?;
            }
        }
        PortsAction::Add { port } => {
            client.add_port(port.get()).await?;
            eprintln!("mirror ports: port {port} is mirrored");
        }
        PortsAction::Remove { port } => {
            client.remove_port(port.get()).await?;
            eprintln!("mirror ports: port {port} was removed");
        }
    }
    Ok(())
}

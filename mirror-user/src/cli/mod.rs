//! Command line of the `mirror` binary: one module per subcommand, each
//! with its arguments (clap derive) mapped onto the stages' own
//! configurations. Only this module knows clap.

use std::{num::NonZeroU16, path::PathBuf, time::Duration};

use clap::{
    Args, Parser, Subcommand,
    builder::{PossibleValue, PossibleValuesParser, TypedValueParser},
};
use mirror_user::server::{
    Endpoint,
    client::{self, Client},
};

pub mod ports;
pub mod privileged_helper;
pub mod run;
pub mod stats;
pub mod tail;

/// Mirror the TCP traffic of chosen ports, kernel-assisted, without ever
/// touching it.
#[derive(Debug, Parser)]
#[command(name = "mirror", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach to an interface and mirror the TCP traffic to the given ports.
    #[command(after_long_help = run::EXAMPLES)]
    Run(Box<run::RunArgs>),
    /// Connect to a running mirror and print (or dump) the streams of ports.
    #[command(after_long_help = tail::EXAMPLES)]
    Tail(tail::TailArgs),
    /// List, add or remove the ports a running mirror mirrors.
    Ports(ports::PortsArgs),
    /// Print every counter of a running mirror.
    Stats(stats::StatsArgs),
    /// The privileged helper `mirror run` starts for itself (internal).
    #[command(name = "privileged-helper", hide = true)]
    PrivilegedHelper,
}

/// How to reach a running mirror.
#[derive(Debug, Args)]
pub struct ConnectArgs {
    /// The mirror's address: unix:PATH or IP:PORT.
    #[arg(long, global = true, value_name = "ADDR", default_value_t = Endpoint::default())]
    pub connect: Endpoint,

    /// File holding the token (required by TCP listeners).
    #[arg(long, global = true, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
}

/// A command-line name for a value of a domain enum, with its help: the
/// enums stay where their stage is, free of clap.
pub type Choice<T> = (&'static str, &'static str, T);

/// A value parser that takes one of `choices` by name.
pub fn one_of<T: Clone + Send + Sync + 'static>(
    choices: &'static [Choice<T>],
) -> impl TypedValueParser<Value = T> {
    PossibleValuesParser::new(
        choices
            .iter()
            .map(|(name, help, _)| PossibleValue::new(*name).help(*help)),
    )
    .map(move |name| {
        choices
            .iter()
            .find(|(known, _, _)| *known == name)
            .map(|(_, _, value)| value.clone())
            .expect("clap accepts only the names of the choices")
    })
}

/// Parses a TCP port, 1 to 65535.
pub fn parse_port(text: &str) -> Result<NonZeroU16, String> {
    text.trim()
        .parse::<u16>()
        .ok()
        .and_then(NonZeroU16::new)
        .ok_or_else(|| format!("'{text}' is not a TCP port: use a number from 1 to 65535"))
}

/// Parses a byte count with an optional unit: `512`, `64K`, `16M`, `1G`
/// (K, KB and KiB alike are powers of 1024, as in the defaults shown by
/// `--help`). Units past G are refused: no size here comes near a
/// terabyte, so one is a typo.
pub fn parse_size(text: &str) -> Result<u64, String> {
    const SIZES: parse_size::Config = parse_size::Config::new().with_binary();
    let bad = || format!("'{text}' is not a size: use a number of bytes, such as 512K or 64M");
    let text = text.trim();
    if text
        .chars()
        .any(|c| matches!(c.to_ascii_uppercase(), 'T' | 'P' | 'E'))
    {
        return Err(bad());
    }
    SIZES
        .parse_size(text)
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(bad)
}

/// Parses a duration such as `500ms`, `2s` or `5m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|_| {
        format!("'{text}' is not a duration: use a number with a unit, such as 500ms, 2s or 5m")
    })
}

pub async fn connect(args: &ConnectArgs, name: &str) -> anyhow::Result<Client> {
    let token = match &args.token_file {
        Some(path) => Some(
            // Its errors name the file and say what to do.
            client::read_token(path)?,
        ),
        None => None,
    };
    Ok(Client::connect(&args.connect, token.as_deref(), name).await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{
        ports::{PortsAction, PortsArgs},
        stats::StatsArgs,
    };
    use mirror_user::sinks::print::PrintFormat;

    fn command(args: &[&str]) -> Result<Command, clap::Error> {
        Cli::try_parse_from(std::iter::once("mirror").chain(args.iter().copied()))
            .map(|c| c.command)
    }

    #[test]
    fn client_commands() {
        match command(&[
            "tail",
            "-p",
            "80",
            "--format",
            "hex",
            "--connect",
            "127.0.0.1:7000",
        ])
        .unwrap()
        {
            Command::Tail(tail) => {
                assert_eq!(tail.format, PrintFormat::Hex);
                assert_eq!(tail.connect.connect.to_string(), "127.0.0.1:7000");
            }
            other => panic!("{other:?}"),
        }
        assert!(command(&["tail"]).is_err(), "a port is required");
        match command(&["ports", "list", "--connect", "unix:/tmp/x.sock"]).unwrap() {
            Command::Ports(PortsArgs {
                action: PortsAction::List,
                connect,
            }) => {
                assert_eq!(connect.connect.to_string(), "unix:/tmp/x.sock");
            }
            other => panic!("{other:?}"),
        }
        match command(&["ports", "add", "8080"]).unwrap() {
            Command::Ports(PortsArgs {
                action: PortsAction::Add { port },
                connect,
            }) => {
                assert_eq!(port.get(), 8080);
                assert_eq!(connect.connect, Endpoint::default());
            }
            other => panic!("{other:?}"),
        }
        assert!(command(&["ports", "remove", "0"]).is_err());
        assert!(matches!(
            command(&["stats", "--watch"]).unwrap(),
            Command::Stats(StatsArgs { watch: true, .. })
        ));
        assert!(command(&["stats", "--watch", "--json"]).is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("2k"), Ok(2048));
        assert!(parse_size("0").is_err());
        assert!(parse_size("1T").is_err());
        assert!(parse_size("99999999999G").is_err(), "overflow");
    }
}

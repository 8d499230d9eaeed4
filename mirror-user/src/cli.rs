//! Command line of the `mirror` binary.

use std::num::NonZeroU16;

use clap::{Args, Parser, Subcommand, ValueEnum};
use mirror_common::MAX_SNAPLEN;

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
    #[command(after_long_help = RUN_EXAMPLES)]
    Run(RunArgs),
}

const RUN_EXAMPLES: &str = "\
Examples:
  # Print every packet sent to a local service on port 8080:
  mirror run --iface lo --port 8080 --print text
  # (then, in another terminal: curl http://127.0.0.1:8080/)

  # JSON lines for two ports on eth0, first 256 bytes of each packet:
  mirror run --iface eth0 --port 80 --port 443 --snaplen 256 --print json

Needs root, or the capabilities CAP_BPF and CAP_NET_ADMIN.
Stop with Ctrl-C: the program is detached and the counters are printed.";

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Interface to watch (ingress traffic), e.g. eth0 or lo.
    #[arg(short, long, value_name = "IF")]
    pub iface: String,

    /// Destination TCP port to mirror (repeatable).
    #[arg(short, long = "port", value_name = "P", required = true, value_parser = parse_port)]
    pub ports: Vec<NonZeroU16>,

    /// Where to attach the program. `auto` picks the attach point that costs
    /// the watched traffic least on this interface (TC).
    #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
    pub attach: AttachMode,

    /// Bytes of each packet to keep, from the start of the Ethernet header
    /// (headers up to TCP are always kept). Default: the whole packet, up to
    /// 64 KiB GSO/GRO super-packets.
    #[arg(long, value_name = "N", default_value_t = MAX_SNAPLEN, value_parser = parse_snaplen)]
    pub snaplen: u32,

    /// Write one line per mirrored packet to standard output.
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub print: Option<PrintFormat>,

    /// Size of each CPU's ring buffer in bytes (a power of two, at least
    /// one page; suffixes K, M, G). Default: 128 MiB shared by the online
    /// CPUs, between 4 and 64 MiB each.
    #[arg(long, value_name = "BYTES", value_parser = parse_ring_size)]
    pub ring_size: Option<u32>,

    /// Attach TC through a netlink clsact filter even where TCX links exist
    /// (for testing the cleanup of filters left behind by a killed mirror).
    #[arg(long, hide = true)]
    pub tc_netlink: bool,
}

/// Where the program is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AttachMode {
    /// The attach point that costs the traffic least on this interface.
    Auto,
    /// TC ingress (TCX link where the kernel has it, else a clsact filter).
    Tc,
    /// XDP, native if the driver supports it, else generic.
    Xdp,
    /// Generic (skb) XDP.
    XdpSkb,
    /// Native (driver) XDP; fails where the driver has none.
    XdpDrv,
}

/// Format of `--print` lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PrintFormat {
    /// tcpdump-like text.
    Text,
    /// One JSON object per line.
    Json,
}

/// Parses a TCP port, 1 to 65535.
pub fn parse_port(text: &str) -> Result<NonZeroU16, String> {
    text.trim()
        .parse::<u16>()
        .ok()
        .and_then(NonZeroU16::new)
        .ok_or_else(|| format!("'{text}' is not a TCP port: use a number from 1 to 65535"))
}

fn parse_snaplen(text: &str) -> Result<u32, String> {
    match text.trim().parse::<u32>() {
        Ok(n) if (1..=MAX_SNAPLEN).contains(&n) => Ok(n),
        _ => Err(format!(
            "'{text}' is not a snap length: use a number of bytes from 1 to {MAX_SNAPLEN}"
        )),
    }
}

/// Page size assumed for the lower bound; the kernel checks the real one.
const MIN_RING_SIZE: u64 = 4096;
/// Rings are allocated per CPU; 1 GiB each is far beyond any useful size.
const MAX_RING_SIZE: u64 = 1 << 30;

fn parse_ring_size(text: &str) -> Result<u32, String> {
    let trimmed = text.trim();
    let (digits, unit) = match trimmed.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => trimmed.split_at(i),
        None => (trimmed, ""),
    };
    let multiplier: u64 = match unit.to_ascii_uppercase().as_str() {
        "" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        _ => 0,
    };
    let bytes = digits.parse::<u64>().ok().map(|n| n * multiplier);
    match bytes {
        Some(n) if n.is_power_of_two() && (MIN_RING_SIZE..=MAX_RING_SIZE).contains(&n) => {
            Ok(n as u32)
        }
        _ => Err(format!(
            "'{text}' is not a ring size: use a power of two from 4K to 1G, such as 8M"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let argv = ["mirror", "run"].iter().chain(args).copied();
        Cli::try_parse_from(argv).map(|cli| match cli.command {
            Command::Run(run) => run,
        })
    }

    #[test]
    fn run_defaults() {
        let args = run_args(&["--iface", "lo", "--port", "8080"]).unwrap();
        assert_eq!(args.iface, "lo");
        assert_eq!(args.ports, [NonZeroU16::new(8080).unwrap()]);
        assert_eq!(args.attach, AttachMode::Auto);
        assert_eq!(args.snaplen, MAX_SNAPLEN);
        assert_eq!(args.print, None);
        assert_eq!(args.ring_size, None);
        assert!(!args.tc_netlink);
    }

    #[test]
    fn run_all_options() {
        let args = run_args(&[
            "-i",
            "eth0",
            "-p",
            "80",
            "--port",
            "443",
            "--attach",
            "xdp-drv",
            "--snaplen",
            "128",
            "--print",
            "json",
            "--ring-size",
            "64K",
        ])
        .unwrap();
        assert_eq!(args.iface, "eth0");
        let ports: Vec<u16> = args.ports.iter().map(|p| p.get()).collect();
        assert_eq!(ports, [80, 443]);
        assert_eq!(args.attach, AttachMode::XdpDrv);
        assert_eq!(args.snaplen, 128);
        assert_eq!(args.print, Some(PrintFormat::Json));
        assert_eq!(args.ring_size, Some(64 << 10));
    }

    #[test]
    fn every_attach_mode_parses() {
        for (name, mode) in [
            ("auto", AttachMode::Auto),
            ("tc", AttachMode::Tc),
            ("xdp", AttachMode::Xdp),
            ("xdp-skb", AttachMode::XdpSkb),
            ("xdp-drv", AttachMode::XdpDrv),
        ] {
            let args = run_args(&["-i", "lo", "-p", "1", "--attach", name]).unwrap();
            assert_eq!(args.attach, mode, "{name}");
        }
        assert!(run_args(&["-i", "lo", "-p", "1", "--attach", "ebpf"]).is_err());
    }

    #[test]
    fn bad_ports_are_refused_with_a_clear_message() {
        for bad in ["0", "65536", "-1", "http", ""] {
            let arg = format!("--port={bad}");
            let err = run_args(&["--iface", "lo", &arg]).unwrap_err();
            assert!(
                err.to_string().contains("use a number from 1 to 65535"),
                "{bad}: {err}"
            );
        }
        assert!(run_args(&["--iface", "lo"]).is_err(), "a port is required");
    }

    #[test]
    fn snaplen_bounds() {
        assert_eq!(
            run_args(&["-i", "lo", "-p", "1", "--snaplen", "1"])
                .unwrap()
                .snaplen,
            1
        );
        let max = MAX_SNAPLEN.to_string();
        let args = run_args(&["-i", "lo", "-p", "1", "--snaplen", &max]).unwrap();
        assert_eq!(args.snaplen, MAX_SNAPLEN);
        let over = (MAX_SNAPLEN + 1).to_string();
        for bad in ["0", over.as_str(), "x"] {
            let result = run_args(&["-i", "lo", "-p", "1", "--snaplen", bad]);
            assert!(result.is_err(), "{bad}");
        }
    }

    #[test]
    fn ring_sizes() {
        assert_eq!(parse_ring_size("4096"), Ok(4096));
        assert_eq!(parse_ring_size("4k"), Ok(4096));
        assert_eq!(parse_ring_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_ring_size("1G"), Ok(1 << 30));
        for bad in ["3000", "2K", "2G", "8X", "", "M"] {
            assert!(parse_ring_size(bad).is_err(), "{bad}");
        }
    }
}

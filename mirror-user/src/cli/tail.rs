//! `mirror tail`: follow the streams of ports of a running mirror.

use std::{num::NonZeroU16, path::PathBuf};

use anyhow::Context as _;
use clap::Args;
use futures_util::FutureExt as _;
use mirror_user::{
    files::OutputDir,
    flow::model::StreamEvent,
    kernel::privileges::Identity,
    nats::{
        NatsServers, parse_node, parse_prefix, read_creds,
        rebuild::{NatsReader, ReaderConfig},
        stream_name,
    },
    server::client::Client,
    server::protocol::VERSION,
    sinks::{
        dump::DumpWriter,
        print::{EventTotals, PrintFormat, format_event},
    },
};
use std::{
    fs::File,
    io::{BufWriter, Write as _},
    os::fd::AsFd as _,
};

use tokio::signal::unix::{SignalKind, signal};

use crate::cli::{Choice, ConnectArgs, connect, one_of, parse_port};

pub const EXAMPLES: &str = "\
Examples:
  # Follow port 8080 of the mirror listening on the default socket:
  mirror tail --port 8080

  # Keep each connection in a file, from a mirror on another host:
  mirror tail --connect 198.18.0.2:7000 --token-file token --port 80 --dump-dir flows

  # The connections node web1 published to NATS JetStream, as files:
  mirror tail --nats nats://10.0.0.5:4222 --node web1 --port 80 --dump-dir flows";
#[derive(Debug, Args)]
pub struct TailArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,

    /// Port to follow (repeatable); ports the mirror does not mirror yet
    /// must be inside its --allow-ports.
    #[arg(short, long = "port", value_name = "P", required = true, value_parser = parse_port)]
    pub ports: Vec<NonZeroU16>,

    /// How to print events.
    #[arg(long, value_parser = one_of(TAIL_FORMATS), default_value = "text")]
    pub format: PrintFormat,

    /// Write each connection to a file in DIR instead (as `mirror run
    /// --dump-dir` does).
    #[arg(long, value_name = "DIR")]
    pub dump_dir: Option<PathBuf>,

    /// Started as root: once connected (and DIR opened), run as USER, as
    /// tcpdump -Z does (DIR, if created, belongs to USER). `--user root`
    /// keeps root. Default: nobody.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,

    #[command(flatten)]
    pub nats: TailNatsArgs,
}

/// Reading from NATS JetStream instead of a running mirror.
#[derive(Debug, Args)]
#[command(next_help_heading = "NATS JetStream")]
pub struct TailNatsArgs {
    /// Read the streams `mirror run --nats` published, from these NATS
    /// servers (nats://HOST:PORT, comma-separated), instead of a mirror.
    #[arg(long, value_name = "URL", conflicts_with = "connect")]
    pub nats: Option<NatsServers>,

    /// NATS credentials file (.creds).
    #[arg(long, value_name = "FILE", requires = "nats")]
    pub nats_creds: Option<PathBuf>,

    /// The subject prefix the mirrors publish under.
    #[arg(long, value_name = "PREFIX", default_value = "mirror", value_parser = parse_prefix, requires = "nats")]
    pub nats_subject: String,

    /// Only this node's connections (its --node-name). Default: every node's.
    #[arg(long, value_name = "NAME", value_parser = parse_node, requires = "nats")]
    pub node: Option<String>,

    /// A durable consumer of this name: a later tail with the same name
    /// goes on where this one stopped. Default: from the stream's start.
    #[arg(long, value_name = "NAME", value_parser = parse_node, requires = "nats")]
    pub durable: Option<String>,
}

/// Where the events come from.
enum Source {
    Mirror(Client),
    Nats(NatsReader),
}

impl Source {
    async fn next_event(&mut self) -> anyhow::Result<Option<StreamEvent>> {
        Ok(match self {
            Self::Mirror(client) => client.next_event().await?,
            Self::Nats(reader) => reader.next_event().await?,
        })
    }

    fn name(&self, args: &TailArgs) -> String {
        match self {
            Self::Mirror(client) => format!("{} ({})", args.connect.connect, client.server()),
            Self::Nats(_) => format!(
                "NATS stream {} at {}",
                stream_name(&args.nats.nats_subject),
                args.nats
                    .nats
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default()
            ),
        }
    }
}

/// `mirror tail --format`.
const TAIL_FORMATS: &[Choice<PrintFormat>] = &[
    (
        "text",
        "One line per event, data shown as escaped text",
        PrintFormat::Text,
    ),
    (
        "json",
        "One JSON object per line, as `mirror run --print json`",
        PrintFormat::Json,
    ),
    (
        "hex",
        "Events as text, data as a hex dump",
        PrintFormat::Hex,
    ),
];

pub async fn run(args: TailArgs) -> anyhow::Result<()> {
    // Listening before saying "following": a SIGINT or SIGTERM from then
    // on ends the loop below and still prints the totals.
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let ports: Vec<u16> = args.ports.iter().map(|p| p.get()).collect();
    // Started as root: become --user once connected, as `mirror run` does.
    let identity = if nix::unistd::Uid::effective().is_root() || args.user.is_some() {
        Some(Identity::resolve(args.user.as_deref())?)
    } else {
        None
    };
    let start = async {
        if let Some(servers) = &args.nats.nats {
            let creds = args
                .nats
                .nats_creds
                .as_deref()
                .map(read_creds)
                .transpose()?;
            let config = ReaderConfig {
                servers: servers.clone(),
                prefix: args.nats.nats_subject.clone(),
                node: args.nats.node.clone(),
                ports: ports.clone(),
                durable: args.nats.durable.clone(),
            };
            return anyhow::Ok(Source::Nats(
                NatsReader::connect(&config, creds.as_deref()).await?,
            ));
        }
        let mut client = connect(&args.connect, "mirror tail").await?;
        if client.version() < VERSION {
            eprintln!(
                "mirror tail: the mirror refused protocol version {VERSION} (it is of an earlier release); connected again with version {}: the server's bytes will not be shown",
                client.version()
            );
        }
        client.subscribe(&ports).await?;
        anyhow::Ok(Source::Mirror(client))
    };
    let mut client = tokio::select! {
        client = start => client?,
        _ = interrupt.recv() => return Ok(()),
        _ = terminate.recv() => return Ok(()),
    };
    // Connected and the directory open: nothing needs root any more.
    let dump = match &args.dump_dir {
        Some(dir) => Some((
            dir,
            OutputDir::open_or_create(dir, identity.as_ref().and_then(Identity::owner)).and_then(
                |opened| match &identity {
                    Some(identity) => identity.check_may_write(&opened).map(|()| opened),
                    None => Ok(opened),
                },
            )?,
        )),
        None => None,
    };
    if let Some(identity) = &identity {
        identity.assume()?;
    }
    let mut dump = match dump {
        Some((path, dir)) => {
            if let Some(identity) = &identity {
                dir.check_writable(&identity.name)
                    .with_context(|| format!("cannot write into {}", path.display()))?;
            }
            Some(DumpWriter::new(dir))
        }
        None => None,
    };
    let port_list: Vec<String> = ports.iter().map(ToString::to_string).collect();
    eprintln!(
        "mirror tail: following port {} of {}; stop with Ctrl-C",
        port_list.join(", "),
        client.name(&args),
    );
    // Standard output written directly, blocking: an asynchronous stdout
    // hands every write to a thread of its own and back (a third of
    // `mirror tail`'s time at 1 GB/s), and while the output blocks there is
    // nothing else to do (the mirror ends the connections of a client that
    // stops reading as lagged, whatever the reason).
    let mut out = BufWriter::with_capacity(
        1 << 20,
        File::from(std::io::stdout().as_fd().try_clone_to_owned()?),
    );
    let mut line = String::new();
    let mut totals = EventTotals::default();
    // Events for the dump, written together: a run of one connection's
    // data is one writev.
    let mut batch = DumpBatch::default();
    let result = loop {
        if interrupt.recv().now_or_never().is_some() || terminate.recv().now_or_never().is_some() {
            break Ok(());
        }
        // Flush only when no further event is already here: one write per
        // burst, not per event, yet nothing waits in the buffer.
        let event = match client.next_event().now_or_never() {
            Some(event) => event,
            None => {
                if let Some(dump) = &mut dump
                    && let Err(error) = batch.write(dump)
                {
                    break Err(error.into());
                }
                if let Err(error) = out.flush() {
                    break output_ended(error);
                }
                tokio::select! {
                    event = client.next_event() => event,
                    _ = interrupt.recv() => Ok(None),
                    _ = terminate.recv() => Ok(None),
                }
            }
        };
        let event = match event {
            Ok(Some(event)) => event,
            Ok(None) => break Ok(()),
            Err(error) => break Err(error),
        };
        totals.count(&event);
        if let Some(dump) = &mut dump {
            if batch.push(event)
                && let Err(error) = batch.write(dump)
            {
                break Err(error.into());
            }
            continue;
        }
        line.clear();
        format_event(&event, args.format, &mut line);
        if let Err(error) = out.write_all(line.as_bytes()) {
            break output_ended(error);
        }
    };
    let written = match &mut dump {
        Some(dump) => batch.write(dump),
        None => Ok(()),
    };
    let flushed = out.flush();
    eprintln!("mirror tail: {totals}");
    written?;
    result?;
    flushed.or_else(output_ended)
}

/// Events waiting to be written to the dump. Bounded in bytes too: data
/// read from the mirror's arena is returned only once written, and a
/// client that holds too much of it loses its connections.
#[derive(Default)]
struct DumpBatch {
    events: Vec<StreamEvent>,
    bytes: usize,
}

impl DumpBatch {
    const EVENTS: usize = 256;
    const BYTES: usize = 1 << 20;

    /// Adds an event; true when the batch should be written.
    fn push(&mut self, event: StreamEvent) -> bool {
        self.bytes += event.data_len();
        self.events.push(event);
        self.events.len() >= Self::EVENTS || self.bytes >= Self::BYTES
    }

    fn write(&mut self, dump: &mut DumpWriter) -> std::io::Result<()> {
        let written = dump.handle_batch(&self.events);
        self.events.clear();
        self.bytes = 0;
        written
    }
}

/// A closed pipe means whoever read our output went away (`mirror tail |
/// head`): a normal end, not an error.
fn output_ended(error: std::io::Error) -> anyhow::Result<()> {
    if error.kind() == std::io::ErrorKind::BrokenPipe {
        Ok(())
    } else {
        Err(error.into())
    }
}

//! `mirror tail`, `mirror ports`, `mirror stats`: clients of a running
//! mirror.

use std::io::Write as _;

use anyhow::Context as _;
use futures_util::FutureExt as _;
use mirror_user::{
    files::OutputDir,
    kernel::privileges::Identity,
    server::client::{self, Client},
    sinks::{
        dump::DumpWriter,
        print::{EventTotals, format_event},
    },
    telemetry::counters,
};

use crate::cli::{ConnectArgs, PortsAction, PortsArgs, StatsArgs, TailArgs};
use tokio::{
    io::{AsyncWriteExt as _, BufWriter},
    signal::unix::{SignalKind, signal},
};

async fn connect(args: &ConnectArgs, name: &str) -> anyhow::Result<Client> {
    let token = match &args.token_file {
        Some(path) => Some(
            // Its errors name the file and say what to do.
            client::read_token(path)?,
        ),
        None => None,
    };
    Ok(Client::connect(&args.connect, token.as_deref(), name).await?)
}

pub async fn tail(args: TailArgs) -> anyhow::Result<()> {
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
        let mut client = connect(&args.connect, "mirror tail").await?;
        client.subscribe(&ports).await?;
        anyhow::Ok(client)
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
        "mirror tail: following port {} of {} ({}); stop with Ctrl-C",
        port_list.join(", "),
        args.connect.connect,
        client.server()
    );
    let mut out = BufWriter::with_capacity(1 << 16, tokio::io::stdout());
    let mut line = String::new();
    let mut totals = EventTotals::default();
    let result = loop {
        if interrupt.recv().now_or_never().is_some() || terminate.recv().now_or_never().is_some() {
            break Ok(());
        }
        // Flush only when no further event is already here: one write per
        // burst, not per event, yet nothing waits in the buffer.
        let event = match client.next_event().now_or_never() {
            Some(event) => event,
            None => {
                if let Err(error) = out.flush().await {
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
            Err(error) => break Err(error.into()),
        };
        totals.count(&event);
        if let Some(dump) = &mut dump {
            if let Err(error) = dump.handle(&event) {
                break Err(error.into());
            }
            continue;
        }
        line.clear();
        format_event(&event, args.format, &mut line);
        if let Err(error) = out.write_all(line.as_bytes()).await {
            break output_ended(error);
        }
    };
    let flushed = out.flush().await;
    eprintln!("mirror tail: {totals}");
    result?;
    flushed.or_else(output_ended)
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

pub async fn ports(args: PortsArgs) -> anyhow::Result<()> {
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

pub async fn stats(args: StatsArgs) -> anyhow::Result<()> {
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
        for (name, value) in counters::flatten(&json) {
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

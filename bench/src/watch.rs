//! Each way of watching the service: nothing, the mirror (not subscribed,
//! or subscribed with one consumer of each kind), tcpdump, netsniff-ng and
//! xdpdump, started, settled and stopped alike, and what each says it
//! captured and lost.

use std::{
    collections::BTreeMap,
    fs,
    io::Read as _,
    os::unix::fs::OpenOptionsExt as _,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use mirror_tests::mirror_process::{ClientProcess, MirrorProcess, running_counters, tail_totals};
use mirror_user::flow::model::CloseReason;
use serde_json::Value;
use tempfile::TempDir;

use crate::{
    bed::{Bed, IFACE},
    load::Traffic,
    tmpfs::{Emptier, Tmpfs},
    tools::{Tool, count_before, error_line},
};

/// A port no traffic goes to: the mirror attached, filtering everything
/// out in the kernel.
const UNSUBSCRIBED_PORT: &str = "5999";

/// Where the mirror listens for `mirror tail` over TCP, on the server
/// namespace's loopback.
const TCP_LISTEN: &str = "127.0.0.1:7000";

/// The tmpfs of the file-writing cases: what the dump emptier lets pile up
/// between two passes, or the capture's two kept files and the current one.
const TMPFS_MIB: u64 = 2048;

/// Capture files rotate at this size, two kept: a bulk case writes
/// gigabytes.
const PCAP_ROTATE: &str = "256M";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watcher {
    Nothing,
    /// `mirror run` with `attach`; when `subscribed`, the traffic's port is
    /// mirrored and a `mirror tail` reads every stream to /dev/null.
    Mirror {
        attach: &'static str,
        subscribed: bool,
    },
    /// `mirror run --attach tc --directions both` on the traffic's port, a
    /// `mirror tail` reading both directions of every stream (the
    /// `directions` scenario, beside `Mirror { attach: "tc", subscribed:
    /// true }`, which follows the client's bytes only).
    MirrorBoth,
    /// `mirror run --attach tc --sample PERCENT` on the traffic's port,
    /// with a `mirror tail` consumer: the kernel copies only that share of
    /// the connections.
    MirrorSampled {
        percent: u8,
    },
    /// `mirror run --attach tc` on the traffic's port with one consumer of
    /// another kind than `mirror tail` on the Unix socket (which is
    /// `Mirror { attach: "tc", subscribed: true }`).
    Consumer(Consumer),
    /// tcpdump -B 65536 -w /dev/null, filtered on the port.
    Tcpdump,
    /// netsniff-ng --out /dev/null, filtered on the port.
    Netsniff,
    /// xdpdump on an interface without XDP: its libpcap (legacy) mode.
    XdpdumpPcap,
    /// xdpdump --load-xdp-program: its own native XDP capture program.
    XdpdumpXdp,
    /// xdpdump on the mirror's XDP program (fentry/fexit tracing).
    XdpdumpFentry,
}

impl Watcher {
    pub const CASES: [Self; 17] = [
        Self::Nothing,
        Self::Mirror {
            attach: "tc",
            subscribed: false,
        },
        Self::Mirror {
            attach: "xdp-skb",
            subscribed: false,
        },
        Self::Mirror {
            attach: "xdp-drv",
            subscribed: false,
        },
        Self::Mirror {
            attach: "tc",
            subscribed: true,
        },
        Self::Mirror {
            attach: "xdp-skb",
            subscribed: true,
        },
        Self::Mirror {
            attach: "xdp-drv",
            subscribed: true,
        },
        Self::MirrorSampled { percent: 10 },
        Self::Consumer(Consumer::TailTcp),
        Self::Consumer(Consumer::DumpDir),
        Self::Consumer(Consumer::Pcap),
        Self::Consumer(Consumer::Forward),
        Self::Tcpdump,
        Self::Netsniff,
        Self::XdpdumpPcap,
        Self::XdpdumpXdp,
        Self::XdpdumpFentry,
    ];

    pub fn name(self) -> String {
        match self {
            Self::Nothing => "nothing attached (baseline)".to_owned(),
            Self::Mirror { attach, subscribed } => {
                let mode = match attach {
                    "tc" => "tc",
                    "xdp-skb" => "xdp generic",
                    _ => "xdp native",
                };
                if subscribed {
                    format!("mirror {mode}, mirroring, 1 consumer")
                } else {
                    format!("mirror {mode}, port not subscribed")
                }
            }
            Self::MirrorSampled { percent } => {
                format!("mirror tc, --sample {percent}, 1 consumer")
            }
            Self::MirrorBoth => "mirror tc, --directions both, 1 consumer".to_owned(),
            Self::Consumer(consumer) => format!("mirror tc, {}", consumer.name()),
            Self::Tcpdump => "tcpdump -B 65536, port filter".to_owned(),
            Self::Netsniff => "netsniff-ng, port filter".to_owned(),
            Self::XdpdumpPcap => "xdpdump, pcap mode (no filter)".to_owned(),
            Self::XdpdumpXdp => "xdpdump --load-xdp-program (no filter)".to_owned(),
            Self::XdpdumpFentry => "xdpdump -p mirror_xdp (fentry)".to_owned(),
        }
    }

    /// A short label for plots.
    pub fn label(self) -> &'static str {
        match self {
            Self::Nothing => "baseline",
            Self::Mirror {
                attach: "tc",
                subscribed: false,
            } => "mirror tc, unsub.",
            Self::Mirror {
                attach: "xdp-skb",
                subscribed: false,
            } => "mirror xdp-skb, unsub.",
            Self::Mirror {
                subscribed: false, ..
            } => "mirror xdp-drv, unsub.",
            Self::Mirror { attach: "tc", .. } => "mirror tc",
            Self::Mirror {
                attach: "xdp-skb", ..
            } => "mirror xdp-skb",
            Self::Mirror { .. } => "mirror xdp-drv",
            Self::MirrorSampled { .. } => "mirror tc, sampled",
            Self::MirrorBoth => "mirror tc, both",
            Self::Consumer(consumer) => consumer.label(),
            Self::Tcpdump => "tcpdump",
            Self::Netsniff => "netsniff-ng",
            Self::XdpdumpPcap => "xdpdump pcap",
            Self::XdpdumpXdp => "xdpdump xdp",
            Self::XdpdumpFentry => "xdpdump fentry",
        }
    }

    /// Whether it hands over what it captured (so completeness applies).
    pub fn captures(self) -> bool {
        !matches!(
            self,
            Self::Nothing
                | Self::Mirror {
                    subscribed: false,
                    ..
                }
        )
    }

    /// Whether the case runs on `traffic`: the other consumer kinds are
    /// measured where they cost most, on bulk traffic.
    pub fn applies_to(self, traffic: Traffic) -> bool {
        !matches!(self, Self::Consumer(_)) || traffic.is_bulk()
    }
}

/// The consumers of `mirror run` besides `mirror tail` on the Unix socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consumer {
    /// `mirror tail` over a TCP listener on loopback, with the token.
    TailTcp,
    /// `--dump-dir` on a tmpfs, in the mirror's process.
    DumpDir,
    /// `--pcap` to a rotating file on a tmpfs.
    Pcap,
    /// `--forward` to a discarding sink in a namespace behind the server.
    Forward,
}

impl Consumer {
    pub const ALL: [Self; 4] = [Self::TailTcp, Self::DumpDir, Self::Pcap, Self::Forward];

    fn name(self) -> &'static str {
        match self {
            Self::TailTcp => "mirror tail over TCP (token)",
            Self::DumpDir => "--dump-dir on a tmpfs",
            Self::Pcap => "--pcap to a file on a tmpfs",
            Self::Forward => "--forward to a discarding sink",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::TailTcp => "mirror tail tcp",
            Self::DumpDir => "mirror dump-dir",
            Self::Pcap => "mirror pcap",
            Self::Forward => "mirror forward",
        }
    }
}

/// The command lines of the mirror's consumer kinds and of tcpdump, as a
/// user would type them for the traffic's port `P`.
pub fn command(watcher: Watcher) -> &'static str {
    match watcher {
        Watcher::Mirror {
            attach: "tc",
            subscribed: true,
        } => {
            "`mirror run --iface IF --port P --attach tc --directions client` + `mirror tail --port P --format text > /dev/null`"
        }
        Watcher::Consumer(Consumer::TailTcp) => {
            "`mirror run ... --listen 127.0.0.1:7000 --token-file F` + `mirror tail --connect 127.0.0.1:7000 --token-file F --port P --format text > /dev/null`"
        }
        Watcher::MirrorBoth => {
            "`mirror run --iface IF --port P --attach tc --directions both` + `mirror tail --port P --format text > /dev/null`"
        }
        Watcher::Consumer(Consumer::DumpDir) => "`mirror run ... --dump-dir TMPFS`",
        Watcher::Consumer(Consumer::Pcap) => {
            "`mirror run ... --pcap TMPFS/capture.pcapng --pcap-rotate-size 256M --pcap-keep 2`"
        }
        Watcher::Consumer(Consumer::Forward) => "`mirror run ... --forward SINK_IP:9`",
        Watcher::Tcpdump => "`tcpdump -i IF -B 65536 -s 0 -w /dev/null tcp dst port P`",
        _ => "",
    }
}

/// What a watcher captured, to compare with what the service received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// Stream bytes the mirror's consumer received.
    Bytes(u64),
    /// Packets a tool captured; `both_directions` when it captures what
    /// the interface sends as well as what it receives (no filter).
    Packets {
        captured: u64,
        both_directions: bool,
    },
}

/// What a stopped watcher reported.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub delivered: Option<Delivered>,
    /// Its own loss counters, stage by stage.
    pub losses: Vec<(&'static str, u64)>,
}

/// A watcher running on the server's interface.
pub struct Watching {
    watcher: Watcher,
    // Declared (so dropped) before what they use: the files, the socket.
    consumer: Option<ClientProcess>,
    mirror: Option<MirrorProcess>,
    tool: Option<(Watcher, Tool)>,
    emptier: Option<Emptier>,
    tmpfs: Option<Tmpfs>,
    /// The Unix endpoint of a mirror given `--listen` by the case, and the
    /// directory of its socket (and of the token file).
    own_listener: Option<(String, TempDir)>,
}

impl Watching {
    /// Starts `watcher` on the bed server's interface for traffic to
    /// `port`; `Err` holds why a tool refused to run.
    pub fn start(watcher: Watcher, bed: &Bed, port: u16) -> Result<Self, String> {
        let (ns, iface) = (bed.server.as_str(), IFACE);
        let port = port.to_string();
        let filter = format!("tcp dst port {port}");
        let mut watching = Self {
            watcher,
            consumer: None,
            mirror: None,
            tool: None,
            emptier: None,
            tmpfs: None,
            own_listener: None,
        };
        let tool = |program: &str, args: &[&str], ready: &str| {
            Tool::start(ns, program, args, ready).map(|tool| Some((watcher, tool)))
        };
        match watcher {
            Watcher::Nothing => {}
            Watcher::Mirror { attach, subscribed } => {
                let mirrored = if subscribed {
                    port.as_str()
                } else {
                    UNSUBSCRIBED_PORT
                };
                // The client's direction, as the tools it is compared with
                // capture (`both` is the default with TC since the answers
                // are followed: MirrorBoth measures that).
                let mirror = MirrorProcess::start_quiet(
                    ns,
                    &[
                        "--iface",
                        iface,
                        "--port",
                        mirrored,
                        "--attach",
                        attach,
                        "--directions",
                        "client",
                    ],
                );
                if subscribed {
                    watching.consumer = Some(ClientProcess::tail(
                        None,
                        &mirror.endpoint(),
                        &["--port", &port, "--format", "text"],
                    ));
                }
                watching.mirror = Some(mirror);
            }
            Watcher::MirrorBoth => {
                let mirror = MirrorProcess::start_quiet(
                    ns,
                    &[
                        "--iface",
                        iface,
                        "--port",
                        &port,
                        "--attach",
                        "tc",
                        "--directions",
                        "both",
                    ],
                );
                watching.consumer = Some(ClientProcess::tail(
                    None,
                    &mirror.endpoint(),
                    &["--port", &port, "--format", "text"],
                ));
                watching.mirror = Some(mirror);
            }
            Watcher::MirrorSampled { percent } => {
                let percent = percent.to_string();
                let mirror = MirrorProcess::start_quiet(
                    ns,
                    &[
                        "--iface", iface, "--port", &port, "--attach", "tc", "--sample", &percent,
                    ],
                );
                watching.consumer = Some(ClientProcess::tail(
                    None,
                    &mirror.endpoint(),
                    &["--port", &port, "--format", "text"],
                ));
                watching.mirror = Some(mirror);
            }
            Watcher::Consumer(consumer) => watching.start_consumer(consumer, bed, &port),
            Watcher::Tcpdump => {
                watching.tool = tool(
                    "tcpdump",
                    &[
                        "-i",
                        iface,
                        "-B",
                        "65536",
                        "-s",
                        "0",
                        "-w",
                        "/dev/null",
                        &filter,
                    ],
                    "listening on",
                )?;
            }
            Watcher::Netsniff => {
                watching.tool = tool(
                    "netsniff-ng",
                    &[
                        "--in",
                        iface,
                        "--out",
                        "/dev/null",
                        "-f",
                        &filter,
                        "--silent",
                    ],
                    "Running!",
                )?;
            }
            Watcher::XdpdumpPcap => {
                watching.tool = tool("xdpdump", &["-i", iface, "-w", "/dev/null"], "listening on")?;
            }
            Watcher::XdpdumpXdp => {
                watching.tool = tool(
                    "xdpdump",
                    &["-i", iface, "--load-xdp-program", "-w", "/dev/null"],
                    "listening on",
                )?;
            }
            Watcher::XdpdumpFentry => {
                let mirror = MirrorProcess::start_quiet(
                    ns,
                    &[
                        "--iface",
                        iface,
                        "--port",
                        UNSUBSCRIBED_PORT,
                        "--attach",
                        "xdp-drv",
                    ],
                );
                watching.mirror = Some(mirror);
                watching.tool = tool(
                    "xdpdump",
                    &["-i", iface, "-p", "mirror_xdp", "-w", "/dev/null"],
                    "listening on",
                )
                .map_err(|text| error_line(&text))?;
            }
        }
        Ok(watching)
    }

    /// `mirror run --attach tc` on `port` with `consumer`.
    fn start_consumer(&mut self, consumer: Consumer, bed: &Bed, port: &str) {
        let ns = bed.server.as_str();
        // The case's own Unix listener, for `mirror stats`: a mirror given
        // any --listen gets no default one.
        let dir = mirror_tests::bed::scratch_dir();
        let endpoint = format!("unix:{}", dir.path().join("mirror.sock").display());
        // The client's direction, as tcpdump beside it captures.
        let mut args: Vec<String> = [
            "--iface",
            IFACE,
            "--port",
            port,
            "--attach",
            "tc",
            "--directions",
            "client",
            "--listen",
            &endpoint,
        ]
        .map(str::to_owned)
        .to_vec();
        let token = dir.path().join("token");
        match consumer {
            Consumer::TailTcp => {
                write_token(&token);
                let token = token.display().to_string();
                args.extend(["--listen", TCP_LISTEN, "--token-file", &token].map(str::to_owned));
            }
            Consumer::DumpDir | Consumer::Pcap => {
                let tmpfs = Tmpfs::mount(TMPFS_MIB, nobody());
                let path = tmpfs.path().display().to_string();
                if consumer == Consumer::DumpDir {
                    args.extend(["--dump-dir".to_owned(), path]);
                    self.emptier = Some(Emptier::start(tmpfs.path()));
                } else {
                    args.extend(
                        [
                            "--pcap",
                            &format!("{path}/capture.pcapng"),
                            "--pcap-rotate-size",
                            PCAP_ROTATE,
                            "--pcap-keep",
                            "2",
                        ]
                        .map(str::to_owned),
                    );
                }
                self.tmpfs = Some(tmpfs);
            }
            Consumer::Forward => {
                let sink = bed
                    .shadow_sink
                    .expect("the capture bed has a shadow namespace");
                args.extend(["--forward", sink].map(str::to_owned));
            }
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mirror = MirrorProcess::start_quiet(ns, &args);
        if consumer == Consumer::TailTcp {
            // Over TCP from the mirror's namespace, as a client on the
            // node would connect.
            let token = token.display().to_string();
            self.consumer = Some(ClientProcess::tail(
                Some(ns),
                TCP_LISTEN,
                &["--token-file", &token, "--port", port, "--format", "text"],
            ));
        }
        self.mirror = Some(mirror);
        self.own_listener = Some((endpoint, dir));
    }

    /// Where `mirror stats` reaches the running mirror.
    fn endpoint(&self) -> Option<String> {
        match &self.own_listener {
            Some((endpoint, _)) => Some(endpoint.clone()),
            None => self.mirror.as_ref().map(MirrorProcess::endpoint),
        }
    }

    /// Every process doing the watching (the mirror and its consumer).
    pub fn pids(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        pids.extend(self.mirror.as_ref().map(MirrorProcess::pid));
        pids.extend(self.consumer.as_ref().map(ClientProcess::pid));
        pids.extend(self.tool.as_ref().map(|(_, tool)| tool.pid()));
        pids
    }

    /// Waits until what the traffic left in rings and queues has reached
    /// the consumer (its count stops moving), so that a watcher is not
    /// stopped with data still on its way.
    pub fn settle(&self) {
        if self.mirror.is_none() {
            thread::sleep(Duration::from_millis(500));
            return;
        }
        if (self.consumer.is_some() || matches!(self.watcher, Watcher::Consumer(_)))
            && let Some(endpoint) = self.endpoint()
        {
            settle_consumers(&endpoint);
        }
    }

    pub fn stop(self) -> Observed {
        let mut observed = Observed::default();
        if let Some(consumer) = self.consumer {
            consumer.signal(libc::SIGINT);
            let (_, stderr) = consumer.wait(Duration::from_secs(20));
            let totals = tail_totals(&stderr);
            observed.delivered = Some(Delivered::Bytes(totals.data_bytes));
            observed
                .losses
                .push(("lagged", totals.closed(CloseReason::Lagged)));
        }
        if let Some((watcher, tool)) = self.tool {
            let text = tool.stop();
            let count = |label: &str| {
                count_before(&text, label)
                    .unwrap_or_else(|| panic!("{watcher:?} printed no \"{label}\":\n{text}"))
            };
            let (captured, dropped, both_directions) = match watcher {
                Watcher::Tcpdump => (
                    count("packets captured"),
                    ("dropped by kernel", count("packets dropped by kernel")),
                    false,
                ),
                Watcher::Netsniff => (
                    count("packets passed filter"),
                    ("out of space", count("packets failed filter")),
                    false,
                ),
                Watcher::XdpdumpPcap => (
                    count("packets captured"),
                    ("dropped by kernel", count("packets dropped by kernel")),
                    true,
                ),
                _ => (
                    count("packets captured"),
                    (
                        "dropped by perf ring",
                        count("packets dropped by perf ring"),
                    ),
                    false,
                ),
            };
            observed.delivered = Some(Delivered::Packets {
                captured,
                both_directions,
            });
            observed.losses.insert(0, dropped);
        }
        if let Some(mirror) = self.mirror {
            let output = mirror.interrupt();
            assert!(output.status.success(), "mirror failed: {}", output.stderr);
            let stage = |name: &'static str, counter: &str| (name, output.counter(counter));
            // Counters of every entry of a list (`forward.<target>.*`,
            // `consumers.<name>.*`) whose name starts with `prefix` and
            // ends with `suffix`, summed.
            let sum = |prefix: &str, suffix: &str| -> u64 {
                output
                    .counters
                    .iter()
                    .filter(|(name, _)| name.starts_with(prefix) && name.ends_with(suffix))
                    .map(|(_, value)| value)
                    .sum()
            };
            let mut losses = vec![
                stage("ring full", "kernel.ring_full"),
                stage("queue drops", "shards.queue_drops"),
                stage("gap closes", "connections.closed.gap"),
            ];
            match self.watcher {
                Watcher::Consumer(Consumer::DumpDir) => {
                    drop(self.emptier);
                    let tmpfs = self.tmpfs.as_ref().expect("the dump case has a tmpfs");
                    let dumped = Dumped::read(tmpfs.path());
                    observed.delivered = Some(Delivered::Bytes(dumped.bytes));
                    losses.push(("lagged", dumped.reasons.get("lagged").copied().unwrap_or(0)));
                    losses.push((
                        "files not closed",
                        dumped.reasons.get("open").copied().unwrap_or(0),
                    ));
                }
                Watcher::Consumer(Consumer::Pcap) => {
                    observed.delivered = Some(Delivered::Packets {
                        captured: output.counter("pcap.written"),
                        both_directions: false,
                    });
                    losses.push(stage("pcap dropped", "pcap.dropped"));
                    losses.push(stage("pcap failed", "pcap.failed"));
                }
                Watcher::Consumer(Consumer::Forward) => {
                    observed.delivered = Some(Delivered::Bytes(sum("forward.", ".bytes_written")));
                    losses.push(("lagged", sum("consumers.forward", ".lagged_connections")));
                    losses.push((
                        "shadow aborted",
                        output
                            .counters
                            .iter()
                            .filter(|(name, _)| {
                                name.starts_with("forward.") && name.contains(".aborted.")
                            })
                            .map(|(_, value)| value)
                            .sum(),
                    ));
                    losses.push(("shadow failed", sum("forward.", ".failed")));
                }
                _ if observed
                    .delivered
                    .is_some_and(|d| matches!(d, Delivered::Bytes(_))) =>
                {
                    losses.append(&mut observed.losses);
                    losses.push(stage("too slow", "server.too_slow"));
                }
                _ => losses.clear(),
            }
            if !losses.is_empty() {
                observed.losses = losses;
            }
        }
        observed
    }
}

/// What a dump directory holds once the mirror has stopped, from the
/// sidecars (the stream files themselves were emptied as they grew).
#[derive(Debug, Default, PartialEq, Eq)]
struct Dumped {
    /// Stream bytes written, summed over the connections.
    bytes: u64,
    /// Connections by close reason (`open` for a sidecar without one).
    reasons: BTreeMap<String, u64>,
}

impl Dumped {
    fn read(dir: &Path) -> Self {
        let mut dumped = Self::default();
        for entry in fs::read_dir(dir).expect("the dump directory").flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "meta") {
                continue;
            }
            let mut text = String::new();
            fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(&path)
                .and_then(|mut file| file.read_to_string(&mut text))
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            dumped.add(&text);
        }
        dumped
    }

    fn add(&mut self, meta: &str) {
        let meta: Value = serde_json::from_str(meta)
            .unwrap_or_else(|e| panic!("a sidecar that is not JSON ({e}): {meta}"));
        self.bytes += meta["bytes"]
            .as_u64()
            .expect("a sidecar with its byte count");
        let reason = meta["reason"].as_str().unwrap_or("open").to_owned();
        *self.reasons.entry(reason).or_default() += 1;
    }
}

/// A token file for a TCP listener: random, owned by root, mode 0600.
fn write_token(path: &Path) {
    let mut random = [0u8; 24];
    fs::File::open("/dev/urandom")
        .and_then(|mut urandom| urandom.read_exact(&mut random))
        .expect("read /dev/urandom");
    let token: String = random.iter().map(|b| format!("{b:02x}")).collect();
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
    std::io::Write::write_all(&mut file, token.as_bytes()).expect("write the token");
}

/// The user `mirror run` becomes by default (`--user nobody`).
fn nobody() -> u32 {
    nix::unistd::User::from_name("nobody")
        .ok()
        .flatten()
        .map_or(65534, |user| user.uid.as_raw())
}

/// Waits (10 s at most) until the bytes the mirror at `endpoint` has
/// handed to its consumers stop moving.
pub fn settle_consumers(endpoint: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = None;
    let mut still = 0;
    while Instant::now() < deadline && still < 3 {
        thread::sleep(Duration::from_millis(150));
        let now = delivered_to_consumers(endpoint);
        still = if Some(now) == last { still + 1 } else { 0 };
        last = Some(now);
    }
}

/// Stream bytes the mirror has handed to its consumers so far, and packets
/// written to its capture file.
fn delivered_to_consumers(endpoint: &str) -> u64 {
    running_counters(endpoint)
        .iter()
        .filter(|(name, _)| {
            (name.starts_with("consumers.") && name.ends_with(".bytes")) || *name == "pcap.written"
        })
        .map(|(_, count)| count)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sidecars_are_summed_by_reason() {
        let mut dumped = Dumped::default();
        dumped.add(r#"{"conn":1,"src":"a","dst":"b","midstream":false,"bytes":10,"reason":"fin","complete":true}"#);
        dumped.add(r#"{"conn":2,"src":"a","dst":"b","midstream":false,"bytes":5,"reason":"lagged","complete":false}"#);
        dumped.add(r#"{"conn":3,"src":"a","dst":"b","midstream":false,"bytes":0,"reason":null,"complete":false}"#);
        assert_eq!(dumped.bytes, 15);
        assert_eq!(
            dumped.reasons,
            BTreeMap::from([
                ("fin".to_owned(), 1),
                ("lagged".to_owned(), 1),
                ("open".to_owned(), 1)
            ])
        );
    }
}

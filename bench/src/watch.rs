//! Each way of watching the service: nothing, the mirror (not subscribed,
//! or subscribed with one consumer reading every stream), tcpdump,
//! netsniff-ng and xdpdump, started, settled and stopped alike, and what
//! each says it captured and lost.

use std::{
    thread,
    time::{Duration, Instant},
};

use mirror_tests::mirror_process::{ClientProcess, MirrorProcess, running_counters, tail_totals};
use mirror_user::flow::model::CloseReason;

use crate::tools::{Tool, count_before, error_line};

/// A port no traffic goes to: the mirror attached, filtering everything
/// out in the kernel.
const UNSUBSCRIBED_PORT: &str = "5999";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watcher {
    Nothing,
    /// `mirror run` with `attach`; when `subscribed`, the traffic's port is
    /// mirrored and a `mirror tail` reads every stream to /dev/null.
    Mirror {
        attach: &'static str,
        subscribed: bool,
    },
    /// `mirror run --attach tc --sample PERCENT` on the traffic's port,
    /// with a `mirror tail` consumer: the kernel copies only that share of
    /// the connections.
    MirrorSampled {
        percent: u8,
    },
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
    pub const CASES: [Self; 13] = [
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
    mirror: Option<MirrorProcess>,
    consumer: Option<ClientProcess>,
    tool: Option<(Watcher, Tool)>,
}

impl Watching {
    /// Starts `watcher` on `iface` in `ns` for traffic to `port`; `Err`
    /// holds why a tool refused to run.
    pub fn start(watcher: Watcher, ns: &str, iface: &str, port: u16) -> Result<Self, String> {
        let port = port.to_string();
        let filter = format!("tcp dst port {port}");
        let mut watching = Self {
            mirror: None,
            consumer: None,
            tool: None,
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
                let mirror = MirrorProcess::start_quiet(
                    ns,
                    &["--iface", iface, "--port", mirrored, "--attach", attach],
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
        let Some(mirror) = &self.mirror else {
            thread::sleep(Duration::from_millis(500));
            return;
        };
        if self.consumer.is_some() {
            settle_consumers(&mirror.endpoint());
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
            if observed
                .delivered
                .is_some_and(|d| matches!(d, Delivered::Bytes(_)))
            {
                let stage = |name: &'static str, counter: &str| (name, output.counter(counter));
                let mut losses = vec![
                    stage("ring full", "kernel.ring_full"),
                    stage("queue drops", "shards.queue_drops"),
                    stage("gap closes", "connections.closed.gap"),
                ];
                losses.append(&mut observed.losses);
                losses.push(stage("too slow", "server.too_slow"));
                observed.losses = losses;
            }
        }
        observed
    }
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

/// Stream bytes the mirror has handed to its consumers so far.
fn delivered_to_consumers(endpoint: &str) -> u64 {
    running_counters(endpoint)
        .iter()
        .filter(|(name, _)| name.starts_with("consumers.") && name.ends_with(".bytes"))
        .map(|(_, bytes)| bytes)
        .sum()
}

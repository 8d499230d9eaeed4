//! The privileged start of `mirror run`: load, open the files, bind,
//! attach, start the privileged helper; then give up root (`--user`).
//!
//! It runs before the async runtime starts, on the only thread, so that
//! giving up root covers every thread the mirror will ever have
//! (no_new_privs and the bounding set are per thread).

use std::{
    fs::File,
    io,
    net::{SocketAddr, TcpListener},
    os::fd::{AsFd, OwnedFd},
    path::PathBuf,
    sync::Arc,
};

use aya::maps::MapError;

use crate::{
    files::{OutputDir, OutputDirError},
    flow::ifaces::{IfaceId, IfaceNames},
    kernel::{
        attach::{self, AttachError, AttachMode, Attachment, Directions},
        btf::NetnsPath,
        hotplug::LinkWatch,
        loader::{LoadError, LoadOptions, Mirror},
        netns::{IfaceArg, Netns, NetnsError, ProcessExit},
        privileged_helper::{Helper, HotplugFds, Plan as HelperPlan},
        privileges::{self, Identity, PrivilegeError},
    },
    nats::{NatsError, read_creds},
    server::{
        ServerConfig,
        client::{self, TokenError},
        listener::{self, BoundListener, ServerError},
    },
    sinks::{
        compare_report::{self, ReportOpenError},
        pcap::{self, PcapConfig, PcapOpenError, PcapOutput},
    },
    telemetry::endpoint,
};

/// `--netns` or `--pid`: the namespace whose interfaces the mirror
/// watches (its own when neither is given).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetnsArg {
    /// A name under /var/run/netns, or a path.
    Named(String),
    /// The namespace of this process.
    Pid(u32),
}

/// What the privileged start needs.
#[derive(Debug, Clone)]
pub struct SetupConfig {
    /// `--iface`, each `IF` (of `netns`) or `NETNS:IF`; none: every
    /// interface of `netns` but lo.
    pub ifaces: Vec<IfaceArg>,
    pub netns: Option<NetnsArg>,
    /// Ports mirrored from the first packet on.
    pub ports: Vec<u16>,
    pub attach: AttachMode,
    /// `--directions`: with `Both`, TC egress too.
    pub directions: Directions,
    /// Attach TC through a clsact filter even where TCX links exist.
    pub tc_netlink: bool,
    /// Who the mirror becomes (`None`: nobody).
    pub user: Option<String>,
    pub load: LoadOptions,
    pub dump_dir: Option<PathBuf>,
    pub pcap: Option<PcapConfig>,
    /// `--compare-report`: the comparison report file.
    pub compare_report: Option<PathBuf>,
    /// The server's settings; its token is read from `token_file` here,
    /// while the file is still readable.
    pub server: ServerConfig,
    pub token_file: Option<PathBuf>,
    /// `--nats-creds`: read here, while the file is still readable.
    pub nats_creds: Option<PathBuf>,
    /// `--metrics`: where Prometheus scrapes the counters.
    pub metrics: Option<SocketAddr>,
}

/// Why the privileged start failed (each error says what to do).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Privileges(#[from] PrivilegeError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Files(#[from] OutputDirError),
    #[error(transparent)]
    Pcap(#[from] PcapOpenError),
    #[error(transparent)]
    CompareReport(#[from] ReportOpenError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error(transparent)]
    Nats(#[from] NatsError),
    #[error("cannot subscribe port {port}")]
    Port {
        port: u16,
        #[source]
        source: MapError,
    },
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error(transparent)]
    Metrics(#[from] endpoint::BindError),
    #[error("cannot start the mirror's privileged helper")]
    Helper(#[source] io::Error),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("--iface {iface} is given twice: give each interface once")]
    Twice { iface: String },
    #[error(
        "{first} and {second} both have interface index {ifindex} in their namespaces, and the mirror cannot tell their packets apart on this kernel ({why}): watch them with two mirrors"
    )]
    SameIndex {
        first: String,
        second: String,
        ifindex: u32,
        why: String,
    },
    #[error(
        "{iface} is in another network namespace, where the mirror attaches through TCX links only (Linux 6.6 or newer, without --tc-netlink), or XDP"
    )]
    ClsactElsewhere { iface: String },
}

/// An interface the mirror watches, before it is attached.
#[derive(Debug)]
struct Target {
    netns: Arc<Netns>,
    iface: String,
    /// How the output names it: `IF`, or `NETNS:IF`.
    label: String,
    ifindex: u32,
    /// The namespace's cookie when records carry it (see
    /// [`netns_cookies`]), else 0.
    netns_cookie: u64,
}

/// The interfaces `config` names, each looked up in its namespace; refuses
/// one given twice.
fn targets(config: &SetupConfig, default: &Arc<Netns>) -> Result<Vec<Target>, SetupError> {
    let wanted: Vec<(Arc<Netns>, String)> = if config.ifaces.is_empty() {
        default
            .interfaces()?
            .into_iter()
            .map(|iface| (Arc::clone(default), iface))
            .collect()
    } else {
        let mut namespaces: Vec<Arc<Netns>> = vec![Arc::clone(default)];
        let mut wanted = Vec::new();
        for arg in &config.ifaces {
            let netns = match &arg.netns {
                None => Arc::clone(default),
                Some(name) => {
                    let opened = Netns::named(name)?;
                    match namespaces.iter().find(|known| ***known == opened) {
                        Some(known) => Arc::clone(known),
                        None => {
                            let opened = Arc::new(opened);
                            namespaces.push(Arc::clone(&opened));
                            opened
                        }
                    }
                }
            };
            wanted.push((netns, arg.iface.clone()));
        }
        wanted
    };
    let mut targets: Vec<Target> = Vec::with_capacity(wanted.len());
    for (netns, iface) in wanted {
        let ifindex = netns.run(|| attach::interface_index(&iface))??;
        let label = netns.iface_label(&iface);
        if targets
            .iter()
            .any(|known| known.ifindex == ifindex && *known.netns == *netns)
        {
            return Err(SetupError::Twice { iface: label });
        }
        let tc = matches!(attach::resolve(config.attach), AttachMode::Tc);
        if !netns.is_own() && tc && !attach::uses_tcx(config.tc_netlink) {
            // The privileged helper removes clsact filters from its own
            // namespace only.
            return Err(SetupError::ClsactElsewhere { iface: label });
        }
        targets.push(Target {
            netns,
            iface,
            label,
            ifindex,
            netns_cookie: 0,
        });
    }
    Ok(targets)
}

/// Two targets in different namespaces with one index (a pod's `eth0`
/// often has the same as another pod's): the programs then write the
/// namespace's cookie into each record, found along the offsets the
/// kernel's BTF gives, and each target learns its namespace's cookie.
/// Only then: following the pointers costs 60 to 100 ns per mirrored
/// packet (`cargo xtask bench --scenario kernel`), and distinct indexes
/// name the interfaces alone. Without BTF (or `SO_NETNS_COOKIE`, Linux
/// 5.14) such targets are refused.
fn netns_cookies(targets: &mut [Target]) -> Result<Option<NetnsPath>, SetupError> {
    let clash = targets.iter().enumerate().find_map(|(i, target)| {
        targets[..i]
            .iter()
            .find(|known| known.ifindex == target.ifindex)
            .map(|known| (known, target))
    });
    let Some((first, second)) = clash else {
        return Ok(None);
    };
    let found = kernel_memory_readable()
        .and_then(|()| NetnsPath::of_running_kernel().map_err(|error| error.to_string()))
        .and_then(|path| {
            let cookies = targets
                .iter()
                .map(|target| target.netns.cookie().map_err(|error| error.to_string()))
                .collect::<Result<Vec<u64>, String>>()?;
            Ok((path, cookies))
        });
    match found {
        Ok((path, cookies)) => {
            for (target, cookie) in targets.iter_mut().zip(cookies) {
                target.netns_cookie = cookie;
            }
            Ok(Some(path))
        }
        Err(why) => Err(SetupError::SameIndex {
            first: first.label.clone(),
            second: second.label.clone(),
            ifindex: second.ifindex,
            why,
        }),
    }
}

/// Whether BPF programs may read kernel memory (`bpf_probe_read_kernel`):
/// not under lockdown's confidentiality mode, where loading them would
/// fail with a verifier message instead of the sentence above.
fn kernel_memory_readable() -> Result<(), String> {
    match std::fs::read_to_string("/sys/kernel/security/lockdown") {
        Ok(modes) if modes.contains("[confidentiality]") => Err(
            "kernel lockdown (confidentiality) forbids BPF programs to read kernel memory"
                .to_owned(),
        ),
        // Without the file there is no lockdown.
        _ => Ok(()),
    }
}

/// Attaches to every target, in order; on an error detaches those attached
/// before.
fn attach_all(
    mirror: &mut Mirror,
    targets: Vec<Target>,
    (mode, directions, tc_netlink): (AttachMode, Directions, bool),
) -> Result<Vec<Watched>, SetupError> {
    let mut watched: Vec<Watched> = Vec::with_capacity(targets.len());
    for target in targets {
        let attached = target
            .netns
            .run(|| attach::attach(mirror, &target.iface, mode, directions, tc_netlink));
        let failure: SetupError = match attached {
            Ok(Ok(attachment)) => {
                watched.push(Watched {
                    label: target.label,
                    attachment,
                    netns_cookie: target.netns_cookie,
                });
                continue;
            }
            Ok(Err(error)) => error.into(),
            Err(error) => error.into(),
        };
        for done in watched {
            if let Err(detach) = attach::detach(mirror, done.attachment) {
                tracing::warn!("{detach}");
            }
        }
        return Err(failure);
    }
    Ok(watched)
}

/// The TC programs' descriptors, for the helper to attach later.
fn hotplug_programs(
    mirror: &mut Mirror,
    directions: Directions,
) -> Result<(OwnedFd, Option<OwnedFd>), SetupError> {
    let program = |program: &aya::programs::SchedClassifier| {
        program
            .fd()
            .map_err(|error| SetupError::Helper(io::Error::other(error)))?
            .as_fd()
            .try_clone_to_owned()
            .map_err(SetupError::Helper)
    };
    let ingress = program(mirror.tc()?)?;
    let egress = match directions {
        Directions::Both => Some(program(mirror.tc_egress()?)?),
        Directions::Client => None,
    };
    Ok((ingress, egress))
}

/// An attached interface and its name in the output.
#[derive(Debug)]
pub struct Watched {
    pub label: String,
    pub attachment: Attachment,
    /// What records from it carry as `netns_cookie`.
    pub netns_cookie: u64,
}

/// What the privileged start leaves for the rest of the run: the kernel
/// side attached, the sockets bound, the output files open, and the
/// privileged helper that outlives the drop.
pub struct Setup {
    /// What the output and the log call the watched interfaces.
    pub(super) iface: String,
    pub(super) ports: Vec<u16>,
    pub(super) attach: AttachMode,
    pub(super) mirror: Mirror,
    pub(super) watched: Vec<Watched>,
    pub(super) ifaces: IfaceNames,
    pub(super) listeners: Vec<BoundListener>,
    pub(super) server_config: Arc<ServerConfig>,
    pub(super) dump_dir: Option<OutputDir>,
    pub(super) pcap: Option<(PcapConfig, PcapOutput)>,
    pub(super) compare_report: Option<File>,
    pub(super) helper: Arc<Helper>,
    pub(super) metrics: Option<TcpListener>,
    /// `--pid`: that process's end.
    watched_process: Option<ProcessExit>,
    /// Hot-plug: the namespace's link notifications, and its label.
    pub(super) hotplug: Option<(LinkWatch, String)>,
    /// The NATS credentials' content (`--nats-creds`).
    pub(super) nats_creds: Option<String>,
}

impl Setup {
    /// Does everything that needs root, in an order that leaves nothing
    /// attached when a step fails, then becomes `config.user`.
    pub fn privileged(config: SetupConfig) -> Result<Self, SetupError> {
        privileges::check()?;
        let identity = Identity::resolve(config.user.as_deref())?;
        // Fail on a wrong namespace or interface name before loading
        // anything.
        let watched_process = match &config.netns {
            Some(NetnsArg::Pid(pid)) => Some(ProcessExit::open(*pid)?),
            _ => None,
        };
        let default = Arc::new(match &config.netns {
            Some(NetnsArg::Named(name)) => Netns::named(name)?,
            Some(NetnsArg::Pid(pid)) => Netns::of_pid(*pid)?,
            None => Netns::current()?,
        });
        if let Some(process) = &watched_process
            && !process.is_running()
        {
            // It exited after its pidfd was opened: the namespace just
            // opened may be another process's that took its pid.
            return Err(NetnsError::NoSuchProcess { pid: process.pid }.into());
        }
        // Hot-plug: listening before the interfaces are listed, so that
        // none appears unheard in between. TCX only: the helper attaches
        // through links (clsact in another namespace is refused anyway).
        let hotplug = (config.netns.is_some()
            && config.ifaces.is_empty()
            && attach::resolve(config.attach) == AttachMode::Tc)
            .then(|| default.run(LinkWatch::open))
            .transpose()?
            .transpose()
            .map_err(|source| NetnsError::List {
                label: default.to_string(),
                source,
            })?;
        if config.netns.is_some() && config.ifaces.is_empty() && hotplug.is_none() {
            tracing::info!(
                "interfaces that appear in {default} later are not watched: hot-plug attaches at TC only (--attach tc or auto)"
            );
        }
        let mut targets = targets(&config, &default)?;
        let load = LoadOptions {
            netns_path: netns_cookies(&mut targets)?,
            ..config.load
        };
        let iface = targets
            .iter()
            .map(|target| target.label.as_str())
            .collect::<Vec<_>>()
            .join(", ");

        let mut mirror = Mirror::load(&load)?;

        // Files before sockets before the kernel: a bad path fails before
        // anything is attached.
        let dump_dir = config
            .dump_dir
            .as_deref()
            .map(|dir| {
                let dir = OutputDir::open_or_create(dir, identity.owner())?;
                identity.check_may_write(&dir).map(|()| dir)
            })
            .transpose()?;
        let pcap = config
            .pcap
            .as_ref()
            .map(|pcap_config| {
                let path = &pcap_config.path;
                if pcap_config.rotate_size.is_some() && path.as_os_str() != "-" {
                    // Rotated files are created as the user the mirror becomes.
                    identity.check_may_write(&OutputDir::of_file(path)?.0)?;
                }
                Ok::<_, SetupError>((
                    pcap_config.clone(),
                    pcap::open_output(pcap_config, identity.owner())?,
                ))
            })
            .transpose()?;
        let compare_report = config
            .compare_report
            .as_deref()
            .map(|path| compare_report::open_report(path, identity.owner()))
            .transpose()?;

        let token = match &config.token_file {
            // Its errors name the file and say what to do.
            Some(path) => Some(client::read_token(path)?),
            None => None,
        };
        let nats_creds = config.nats_creds.as_deref().map(read_creds).transpose()?;
        let server_config = Arc::new(ServerConfig {
            token,
            ..config.server
        });
        let listeners = listener::bind(&server_config)?;
        let metrics = config.metrics.map(endpoint::bind).transpose()?;

        // Ports next: the program mirrors from the first packet it sees.
        for port in &config.ports {
            mirror
                .set_port(*port, true)
                .map_err(|source| SetupError::Port {
                    port: *port,
                    source,
                })?;
        }
        let watched = attach_all(
            &mut mirror,
            targets,
            (config.attach, config.directions, config.tc_netlink),
        )?;
        // From here on an error must leave nothing attached. TCX and XDP links
        // go with the process; a clsact filter stays: the helper removes it
        // once it runs (also when a later step fails), before that the mirror,
        // which still may.
        let programs = match &hotplug {
            Some(_) => Some(hotplug_programs(&mut mirror, config.directions)?),
            None => None,
        };
        let helper = match Helper::spawn(&HelperPlan {
            hotplug: programs.as_ref().map(|(ingress, egress)| HotplugFds {
                netns: default.as_fd(),
                ingress: ingress.as_fd(),
                egress: egress.as_ref().map(AsFd::as_fd),
            }),
            clsact: watched
                .iter()
                .flat_map(|watched| watched.attachment.clsact_filters())
                .collect(),
            sockets: listeners
                .iter()
                .filter_map(BoundListener::socket_file)
                .collect(),
        }) {
            Ok(helper) => helper,
            Err(error) => {
                for done in watched {
                    if let Err(detach) = attach::detach(&mut mirror, done.attachment) {
                        tracing::warn!("{detach}");
                    }
                }
                return Err(SetupError::Helper(error));
            }
        };

        identity.assume()?;
        if let Some(dir) = &dump_dir {
            dir.check_writable(&identity.name)?;
        }
        if let Some((pcap_config, output)) = &pcap {
            output.check_rotation(pcap_config, &identity.name)?;
        }
        tracing::debug!("running as {} from now on", identity.name);
        let ifaces = IfaceNames::default();
        for watched in &watched {
            ifaces.insert(
                IfaceId {
                    netns: watched.netns_cookie,
                    index: watched.attachment.ifindex,
                },
                &watched.label,
            );
        }
        Ok(Self {
            iface,
            ports: config.ports,
            attach: config.attach,
            mirror,
            watched,
            ifaces,
            listeners,
            server_config,
            dump_dir,
            pcap,
            compare_report,
            helper: Arc::new(helper),
            metrics,
            watched_process,
            hotplug: hotplug.map(|watch| (watch, default.label().to_owned())),
            nats_creds,
        })
    }

    /// With `--pid`: that process's end, which ends the mirror (see
    /// [`ProcessExit`]).
    pub fn take_watched_process(&mut self) -> Option<ProcessExit> {
        self.watched_process.take()
    }
}

//! The privileged start of `mirror run`: load, open the files, bind,
//! attach, start the privileged helper; then give up root (`--user`).
//!
//! It runs before the async runtime starts, on the only thread, so that
//! giving up root covers every thread the mirror will ever have
//! (no_new_privs and the bounding set are per thread).

use std::{
    io,
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    sync::Arc,
};

use aya::maps::MapError;

use crate::{
    files::{OutputDir, OutputDirError},
    kernel::{
        attach::{self, AttachError, AttachMode, Attachment, Directions},
        loader::{LoadError, LoadOptions, Mirror},
        privileged_helper::{Helper, Plan as HelperPlan},
        privileges::{self, Identity, PrivilegeError},
    },
    nats::{NatsError, read_creds},
    server::{
        ServerConfig,
        client::{self, TokenError},
        listener::{self, BoundListener, ServerError},
    },
    sinks::pcap::{self, PcapConfig, PcapOpenError, PcapOutput},
    telemetry::endpoint,
};

/// What the privileged start needs.
#[derive(Debug, Clone)]
pub struct SetupConfig {
    pub iface: String,
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
}

/// What the privileged start leaves for the rest of the run: the kernel
/// side attached, the sockets bound, the output files open, and the
/// privileged helper that outlives the drop.
pub struct Setup {
    pub(super) iface: String,
    pub(super) ports: Vec<u16>,
    pub(super) attach: AttachMode,
    pub(super) mirror: Mirror,
    pub(super) attachment: Attachment,
    pub(super) listeners: Vec<BoundListener>,
    pub(super) server_config: Arc<ServerConfig>,
    pub(super) dump_dir: Option<OutputDir>,
    pub(super) pcap: Option<(PcapConfig, PcapOutput)>,
    pub(super) helper: Arc<Helper>,
    pub(super) metrics: Option<TcpListener>,
    /// The NATS credentials' content (`--nats-creds`).
    pub(super) nats_creds: Option<String>,
}

impl Setup {
    /// Does everything that needs root, in an order that leaves nothing
    /// attached when a step fails, then becomes `config.user`.
    pub fn privileged(config: SetupConfig) -> Result<Self, SetupError> {
        privileges::check()?;
        let identity = Identity::resolve(config.user.as_deref())?;
        // Fail on a wrong interface name before loading anything.
        attach::interface_index(&config.iface)?;

        let mut mirror = Mirror::load(&config.load)?;

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
        let attachment = attach::attach(
            &mut mirror,
            &config.iface,
            config.attach,
            config.directions,
            config.tc_netlink,
        )?;
        // From here on an error must leave nothing attached. TCX and XDP links
        // go with the process; a clsact filter stays: the helper removes it
        // once it runs (also when a later step fails), before that the mirror,
        // which still may.
        let helper = match Helper::spawn(&HelperPlan {
            clsact: attachment.clsact_filters(),
            sockets: listeners
                .iter()
                .filter_map(BoundListener::socket_file)
                .collect(),
        }) {
            Ok(helper) => helper,
            Err(error) => {
                if let Err(detach) = attach::detach(&mut mirror, attachment) {
                    tracing::warn!("{detach}");
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
        Ok(Self {
            iface: config.iface,
            ports: config.ports,
            attach: config.attach,
            mirror,
            attachment,
            listeners,
            server_config,
            dump_dir,
            pcap,
            helper: Arc::new(helper),
            metrics,
            nats_creds,
        })
    }
}

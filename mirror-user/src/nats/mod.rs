//! `--nats URL`: the mirror's streams published to NATS JetStream, so that
//! a fleet of mirrors lands in one place and `mirror tail --nats` reads any
//! node's connections back, whole or explicitly cut.
//!
//! One message per stream event on `PREFIX.<node>.<port>.<conn>`; its body
//! is the event's frame of the subscriber protocol (docs/protocol.md,
//! without the length prefix: a NATS message has its own), its headers the
//! metadata a reader filters and rebuilds by ([`header`]). Every message
//! of a connection carries its sequence number (`Mirror-Seq`, 0 for the
//! open): a reader sees where a connection's messages start, whether one
//! is missing, and puts retried ones back in order ([`rebuild`]).

pub mod publish;
pub mod rebuild;

use std::{
    fs::File,
    io::{self, Read as _},
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use async_nats::ServerAddr;
use tokio::sync::Notify;

/// Names of the headers every message carries.
pub mod header {
    /// The `--node-name` of the mirror that published it.
    pub const NODE: &str = "Mirror-Node";
    /// A random id of the mirror's run: connection numbers restart with
    /// each run, so a reader keys connections by node, run and number.
    pub const RUN: &str = "Mirror-Run";
    pub const CONN: &str = "Mirror-Conn";
    /// The mirrored (server) port.
    pub const PORT: &str = "Mirror-Port";
    /// `opened`, `data` or `closed`.
    pub const KIND: &str = "Mirror-Kind";
    /// The message's place in its connection, from 0 (the open).
    pub const SEQ: &str = "Mirror-Seq";
    /// The client's and the server's address, on every message: a reader
    /// that starts after the open (retention dropped it) still names the
    /// connection.
    pub const SRC: &str = "Mirror-Src";
    pub const DST: &str = "Mirror-Dst";
    /// Data: `client` or `server`.
    pub const DIR: &str = "Mirror-Dir";
    /// Closed: the close reason (`fin`, `lagged`, ...).
    pub const REASON: &str = "Mirror-Reason";
    /// JetStream's deduplication id: a publish retried after a lost
    /// acknowledgement is stored once.
    pub const MSG_ID: &str = "Nats-Msg-Id";
}

/// The message kinds of [`header::KIND`].
pub mod kind {
    pub const OPENED: &str = "opened";
    pub const DATA: &str = "data";
    pub const CLOSED: &str = "closed";
}

/// `--nats URL[,URL...]`: the servers to connect to (any of a cluster is
/// enough; the client learns the others from it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsServers(pub Vec<ServerAddr>);

impl FromStr for NatsServers {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let servers = text
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(|url| {
                url.parse::<ServerAddr>().map_err(|error| {
                    format!("'{url}' is not a NATS server address ({error}): use nats://HOST:PORT")
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if servers.is_empty() {
            return Err("no NATS server given: use nats://HOST:PORT[,nats://HOST:PORT...]".into());
        }
        Ok(Self(servers))
    }
}

impl std::fmt::Display for NatsServers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls: Vec<String> = self
            .0
            .iter()
            .map(|server| format!("{}:{}", server.host(), server.port()))
            .collect();
        f.write_str(&urls.join(","))
    }
}

/// Checks a subject prefix (`--nats-subject`): dot-separated tokens
/// without wildcards or spaces.
pub fn parse_prefix(text: &str) -> Result<String, String> {
    let valid = !text.is_empty() && text.split('.').all(valid_token);
    if valid {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "'{text}' is not a NATS subject prefix: use tokens of letters, digits, '-' and '_' joined by dots, such as mirror or fleet.mirror"
        ))
    }
}

/// Checks a node name (`--node-name`): one subject token.
pub fn parse_node(text: &str) -> Result<String, String> {
    if valid_token(text) {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "'{text}' is not a node name: use letters, digits, '-' and '_' (it is one token of the NATS subject)"
        ))
    }
}

fn valid_token(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= 128
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// This host's name as a node name: characters a subject token cannot
/// hold (an FQDN's dots) become `_`.
pub fn default_node() -> String {
    // The UTS namespace's name, as hostname(1) prints it.
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name = name.trim();
    let node: String = name
        .chars()
        .take(128)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if node.is_empty() { "node".into() } else { node }
}

/// The JetStream stream of a prefix: `mirror` -> `MIRROR`, `fleet.mirror`
/// -> `FLEET_MIRROR` (stream names hold no dot).
pub fn stream_name(prefix: &str) -> String {
    prefix.replace('.', "_").to_ascii_uppercase()
}

/// The subject of one connection's messages.
pub fn subject(prefix: &str, node: &str, port: u16, conn: u64) -> String {
    format!("{prefix}.{node}.{port}.{conn}")
}

/// The retention of the stream the mirror creates when it is missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub max_bytes: u64,
    pub max_age: Duration,
    pub replicas: usize,
}

/// Everything `mirror run --nats` needs besides the credentials.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    pub servers: NatsServers,
    pub prefix: String,
    pub node: String,
    pub retention: Retention,
}

/// Why NATS could not be used.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("cannot read the NATS credentials file {path}: {source}")]
    Creds {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the NATS credentials file {path} may be read by group or others (mode {mode:03o}): it holds a secret key, run `chmod 600 {path}`",
        path = path.display()
    )]
    CredsExposed { path: PathBuf, mode: u32 },
    #[error(
        "the NATS credentials file {path} is not a credentials file: give the .creds file `nsc` or your NATS operator made",
        path = path.display()
    )]
    CredsInvalid { path: PathBuf },
    #[error("cannot connect to NATS at {servers}: {message}")]
    Connect { servers: String, message: String },
    #[error(
        "cannot read the JetStream stream {stream}: {message}; is `mirror run --nats` publishing with this --nats-subject?"
    )]
    Stream { stream: String, message: String },
    #[error("cannot read messages of the stream {stream}: {message}")]
    Consume { stream: String, message: String },
}

/// Credentials files are small: a JWT and a seed.
const MAX_CREDS: u64 = 64 << 10;

/// Reads a `.creds` file while the mirror may still (started as root): a
/// regular file of root or of this user, readable by its owner alone.
/// Returns its content for the client.
pub fn read_creds(path: &Path) -> Result<String, NatsError> {
    let error = |source| NatsError::Creds {
        path: path.to_owned(),
        source,
    };
    // Non-blocking: a FIFO in the file's place does not hang the start;
    // no symlink in the last place: one planted there could point at
    // another secret file of root's.
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_NOFOLLOW)
        .open(path)
        .map_err(error)?;
    let meta = file.metadata().map_err(error)?;
    if !meta.is_file() {
        return Err(NatsError::CredsInvalid {
            path: path.to_owned(),
        });
    }
    if meta.uid() != 0 && meta.uid() != nix::unistd::Uid::effective().as_raw() {
        return Err(error(io::Error::other(format!(
            "it belongs to another user (uid {}), who can change it: use a file of root or of this user",
            meta.uid()
        ))));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(NatsError::CredsExposed {
            path: path.to_owned(),
            mode,
        });
    }
    let mut text = String::new();
    file.take(MAX_CREDS + 1)
        .read_to_string(&mut text)
        .map_err(error)?;
    if text.len() as u64 > MAX_CREDS || !text.contains("NATS USER JWT") {
        return Err(NatsError::CredsInvalid {
            path: path.to_owned(),
        });
    }
    Ok(text)
}

/// Connection options shared by the publisher and the reader: a name the
/// server shows, the credentials, and reconnecting forever in the
/// background (the first connection too: the mirror starts while NATS is
/// down, and publishes once it is up). `connected` is notified at each
/// (re)connection.
pub async fn connect(
    servers: &NatsServers,
    creds: Option<&str>,
    name: &str,
    connected: Option<Arc<Notify>>,
) -> Result<async_nats::Client, NatsError> {
    let failed = |message: String| NatsError::Connect {
        servers: servers.to_string(),
        message,
    };
    let mut options = async_nats::ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        // Room for the publisher's window twice (all of it is sent again at
        // a reconnect), above the 2048 of the default; the window's bytes
        // bound what the queue holds.
        .client_capacity(2 * publish::WINDOW + 64)
        .event_callback(move |event| {
            let connected = connected.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        tracing::info!("NATS: connected");
                        if let Some(connected) = connected {
                            connected.notify_one();
                        }
                    }
                    async_nats::Event::Disconnected => {
                        tracing::warn!("NATS: disconnected; reconnecting")
                    }
                    other => tracing::debug!("NATS: {other}"),
                }
            }
        });
    if let Some(creds) = creds {
        options = options
            .credentials(creds)
            .map_err(|error| failed(error.to_string()))?;
    }
    options
        .connect(servers.0.clone())
        .await
        .map_err(|error| failed(error.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_subjects() {
        assert_eq!(stream_name("fleet.mirror"), "FLEET_MIRROR");
        assert_eq!(subject("mirror", "a", 80, 7), "mirror.a.80.7");
        assert!(parse_prefix("fleet.mirror").is_ok());
        for bad in ["", "a..b", "a.*", "a.>", "a b", ".a"] {
            assert!(parse_prefix(bad).is_err(), "{bad:?}");
        }
        assert!(parse_node("node-1_a").is_ok());
        for bad in ["", "a.b", "*", ">", "a b", "é"] {
            assert!(parse_node(bad).is_err(), "{bad:?}");
        }
        assert!(parse_node(&default_node()).is_ok());
        let servers: NatsServers = "nats://127.0.0.1:4222, nats://127.0.0.1:4223"
            .parse()
            .unwrap();
        assert_eq!(servers.0.len(), 2);
        assert!("".parse::<NatsServers>().is_err());
        assert!("nats://[::1".parse::<NatsServers>().is_err());
    }

    #[test]
    fn creds_files_must_be_secret_and_look_like_creds() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, content: &str, mode: u32| {
            let path = dir.path().join(name);
            std::fs::write(&path, content).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            path
        };
        let creds = "-----BEGIN NATS USER JWT-----\nx\n------END NATS USER JWT------\n";
        assert_eq!(read_creds(&write("good", creds, 0o600)).unwrap(), creds);
        assert!(matches!(
            read_creds(&write("open", creds, 0o644)),
            Err(NatsError::CredsExposed { mode: 0o644, .. })
        ));
        assert!(matches!(
            read_creds(&write("other", "hello", 0o600)),
            Err(NatsError::CredsInvalid { .. })
        ));
        assert!(matches!(
            read_creds(dir.path()),
            Err(NatsError::CredsInvalid { .. })
        ));
        assert!(matches!(
            read_creds(&dir.path().join("missing")),
            Err(NatsError::Creds { .. })
        ));
        // A planted symlink to a good creds file is not followed.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path().join("good"), &link).unwrap();
        assert!(matches!(read_creds(&link), Err(NatsError::Creds { .. })));
    }
}

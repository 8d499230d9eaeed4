//! The subscriber server: Unix-socket and TCP listeners and one task per
//! client session. A session is one more hub consumer (drop-on-lag applies
//! to it alone); its socket writes have a time budget, after which a
//! client that stopped reading is disconnected. Port changes go to the main
//! task as [`crate::control::Request`]s.
//!
//! A connection takes a client slot (`--max-clients`) only once its hello
//! passed (over TCP: once it proved that it knows the token, answering the
//! server's challenge): until then it is one of at most
//! [`session::MAX_AWAITING_HELLO`] per listening address, for at most
//! [`session::HELLO_TIMEOUT`], so that silent or slow connections cannot keep a
//! client with the token out.
//!
//! The protocol is in `docs/protocol.md` and [`protocol`]; [`listener`]
//! binds and accepts, [`session`] serves one client, [`wire`] writes its
//! frames, [`client`] is the other end.

pub mod client;
pub mod listener;
pub mod protocol;
pub mod session;
#[cfg(test)]
mod tests;
pub mod wire;

use std::{
    fmt,
    net::SocketAddr,
    path::PathBuf,
    str::FromStr,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

/// Where `mirror run` listens by default, and `mirror tail` connects.
pub const DEFAULT_SOCKET: &str = "/run/mirror/mirror.sock";

/// A listening address: `unix:PATH` or `HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl FromStr for Endpoint {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("'unix:' needs a path, such as unix:/run/mirror/mirror.sock".to_owned());
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        text.parse::<SocketAddr>().map(Self::Tcp).map_err(|_| {
            format!("'{text}' is not an address: use unix:PATH, or IP:PORT such as 127.0.0.1:7000")
        })
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
            Self::Tcp(addr) => write!(f, "{addr}"),
        }
    }
}

impl Default for Endpoint {
    fn default() -> Self {
        Self::Unix(PathBuf::from(DEFAULT_SOCKET))
    }
}

/// Settings of the server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub endpoints: Vec<Endpoint>,
    /// What TCP clients must prove they know (Unix-socket clients are
    /// trusted by the socket's file permissions).
    pub token: Option<String>,
    pub max_clients: usize,
    /// How long a write to a client may wait before the client is dropped.
    pub write_timeout: Duration,
    /// What the server calls itself in its welcome.
    pub name: String,
}

/// Counters of the server.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections waiting for their hello now.
    pub awaiting_hello: AtomicU64,
    /// Clients served now (their hello passed).
    pub active: AtomicU64,
    /// Refused at hello: wrong proof of the token, version, or too many
    /// clients.
    pub refused: AtomicU64,
    /// Left after the server's challenge without answering it: most often
    /// a client with another token, which refuses a server whose proof
    /// does not match its token.
    pub unanswered_challenges: AtomicU64,
    /// Closed before their hello to make room for a newer connection
    /// ([`MAX_AWAITING_HELLO`]).
    pub hello_evicted: AtomicU64,
    /// Closed for sending no hello within [`HELLO_TIMEOUT`].
    pub hello_timeouts: AtomicU64,
    /// Closed because they stopped reading for longer than the budget.
    pub too_slow: AtomicU64,
    /// Closed for a malformed frame.
    pub bad_frames: AtomicU64,
}

impl ServerStats {
    /// `(name, value)` of every counter.
    pub fn fields(&self) -> [(&'static str, u64); 9] {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        [
            ("accepted", get(&self.accepted)),
            ("awaiting_hello", get(&self.awaiting_hello)),
            ("active", get(&self.active)),
            ("refused", get(&self.refused)),
            ("unanswered_challenges", get(&self.unanswered_challenges)),
            ("hello_evicted", get(&self.hello_evicted)),
            ("hello_timeouts", get(&self.hello_timeouts)),
            ("too_slow", get(&self.too_slow)),
            ("bad_frames", get(&self.bad_frames)),
        ]
    }

    pub fn to_json(&self) -> serde_json::Value {
        self.fields()
            .iter()
            .map(|(name, value)| ((*name).to_owned(), serde_json::Value::from(*value)))
            .collect::<serde_json::Map<_, _>>()
            .into()
    }
}

impl fmt::Display for ServerStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fields: Vec<String> = self
            .fields()
            .iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect();
        f.write_str(&fields.join(" "))
    }
}

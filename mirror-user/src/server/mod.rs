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
pub mod shared;
#[cfg(test)]
mod tests;
pub mod wire;

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use crate::{
    arena::{Arena, ArenaSnapshot},
    telemetry::{counters, registry::Stage},
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

/// The payload arena's counters as a stage of the counters document
/// (zeros when the mirror runs without one).
pub struct ArenaStage(pub Option<Arena>);

impl Stage for ArenaStage {
    type Snapshot = ArenaSnapshot;

    fn snapshot(&self) -> ArenaSnapshot {
        self.0.as_ref().map(Arena::counters).unwrap_or_default()
    }
}

counters! {
    /// Counters of the server.
    pub struct ServerCounters => ServerSnapshot {
        /// Connections accepted.
        accepted,
        /// Connections waiting for their hello now.
        awaiting_hello,
        /// Clients served now (their hello passed).
        active,
        /// Refused at hello: wrong proof of the token, version, or too many
        /// clients.
        refused,
        /// Left after the server's challenge without answering it: most often
        /// a client with another token, which refuses a server whose proof
        /// does not match its token.
        unanswered_challenges,
        /// Closed before their hello to make room for a newer connection
        /// ([`session::MAX_AWAITING_HELLO`]).
        hello_evicted,
        /// Closed for sending no hello within [`session::HELLO_TIMEOUT`].
        hello_timeouts,
        /// Closed because they stopped reading for longer than the budget.
        too_slow,
        /// Closed for a malformed frame.
        bad_frames,
        /// Sessions that mapped the payload arena.
        arena_clients,
        /// Closed for returning references to the arena they never held.
        bad_credits,
    }
}

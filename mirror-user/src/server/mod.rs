//! The subscriber server: Unix-socket and TCP listeners and one task per
//! client session. A session is one more hub consumer (drop-on-lag applies
//! to it alone); its socket writes have a time budget, after which a
//! client that stopped reading is disconnected. Port changes go to the main
//! task as [`control::Request`]s.
//!
//! A connection takes a client slot (`--max-clients`) only once its hello
//! passed (over TCP: once it proved that it knows the token, answering the
//! server's challenge): until then it is one of at most
//! [`MAX_AWAITING_HELLO`] per listening address, for at most
//! [`HELLO_TIMEOUT`], so that silent or slow connections cannot keep a
//! client with the token out.
//!
//! The protocol is in `docs/protocol.md` and [`crate::server::protocol`].

pub mod client;
pub mod protocol;
pub mod wire;

use std::{
    collections::VecDeque,
    fmt, io,
    net::SocketAddr,
    os::fd::{AsFd as _, BorrowedFd},
    path::{Path, PathBuf},
    str::FromStr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::BytesMut;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch},
    task::JoinSet,
    time::Instant,
};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::{
    control::Request,
    control::ports::{PolicyError, SessionId},
    fanout::hub::{Hub, Subscription},
    files::OutputDir,
    kernel::privileged_helper::{self, SocketFile},
    server::protocol::{
        ClientFrame, ErrorCode, MAX_FRAME, MAX_HELLO_FRAME, Nonce, ServerFrame, VERSION,
        client_name, client_proof_holds, hello_version, new_nonce, server_proof,
    },
    server::wire::SessionWire,
    text::printable,
};

/// Where `mirror run` listens by default, and `mirror tail` connects.
pub const DEFAULT_SOCKET: &str = "/run/mirror/mirror.sock";
/// A connection must have sent its whole hello (over TCP, its answer to
/// the challenge too) this long after it was accepted; a client says hello
/// at once, and a connection that waits holds a place among the
/// [`MAX_AWAITING_HELLO`].
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(3);
/// Tokens shorter than this are warned about: anyone who can connect to a
/// TCP listener gets a proof made with the token, and can test guesses of
/// it offline.
pub const SHORT_TOKEN: usize = 16;
/// Connections of one listening address that may wait for their hello at
/// once. One more makes the oldest go (it had the longest to say hello): a
/// client that says hello as it connects gets served while a flood of
/// silent connections lasts, unless that flood opens this many connections
/// in the time its hello takes to arrive. Each address has its own, so that
/// connections to a TCP listener never push out a local client.
pub const MAX_AWAITING_HELLO: usize = 16;

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

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(
        "another mirror (or another program) already listens on {0}: stop it, or give this one another address with --listen"
    )]
    InUse(Endpoint),
    #[error(
        "listening on TCP ({0}) needs a token: give one with --token-file (clients pass the same file)"
    )]
    TokenRequired(Endpoint),
    #[error(
        "{0} exists and is not a socket: remove it yourself, or give the mirror another --listen path"
    )]
    NotASocket(Endpoint),
    #[error("cannot listen on {endpoint}: {source}")]
    Dir {
        endpoint: Endpoint,
        #[source]
        source: crate::files::OutputDirError,
    },
    #[error("cannot listen on {endpoint}: {source}")]
    Bind {
        endpoint: Endpoint,
        #[source]
        source: io::Error,
    },
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

/// A listener bound before the mirror gives up root (a blocking socket,
/// made asynchronous when the server starts).
pub enum BoundListener {
    Unix(std::os::unix::net::UnixListener, SocketFileGuard),
    Tcp(std::net::TcpListener),
}

impl BoundListener {
    /// The socket file, for the privileged helper's plan.
    pub fn socket_file(&self) -> Option<&SocketFile> {
        match self {
            Self::Unix(_, guard) => Some(&guard.0),
            Self::Tcp(_) => None,
        }
    }
}

/// A listener of the running server (with the guard of its socket file).
enum Listener {
    Unix(
        UnixListener,
        #[expect(dead_code, reason = "held for its Drop")] SocketFileGuard,
    ),
    Tcp(TcpListener),
}

/// Removes the socket file when the server stops, if it is still ours and
/// the mirror may (after the drop the privileged helper does it).
pub struct SocketFileGuard(SocketFile);

impl Drop for SocketFileGuard {
    fn drop(&mut self) {
        let _ = self.0.remove();
    }
}

/// Binds every endpoint (before anything is attached, so that a bad
/// address fails early, and before the mirror gives up root).
pub fn bind(config: &ServerConfig) -> Result<Vec<BoundListener>, ServerError> {
    let mut listeners = Vec::new();
    for endpoint in &config.endpoints {
        let bind_error = |source| ServerError::Bind {
            endpoint: endpoint.clone(),
            source,
        };
        match endpoint {
            Endpoint::Unix(path) => {
                let (listener, file) = bind_unix(path, endpoint)?;
                listeners.push(BoundListener::Unix(listener, SocketFileGuard(file)));
            }
            Endpoint::Tcp(addr) => {
                if config.token.is_none() {
                    return Err(ServerError::TokenRequired(endpoint.clone()));
                }
                let listener = std::net::TcpListener::bind(addr).map_err(bind_error)?;
                if !addr.ip().is_loopback() {
                    tracing::warn!(
                        "listening on {addr}, which is not a loopback address: mirrored traffic is sensitive, keep the token secret and the port firewalled"
                    );
                }
                listeners.push(BoundListener::Tcp(listener));
            }
        }
    }
    Ok(listeners)
}

/// Binds a Unix socket at `path` with mode 0600 from its first moment.
///
/// The socket's own inode is given mode 0600 before `bind`, which creates
/// the file with that mode (Linux takes the new file's mode from the
/// socket's inode), so there is no moment when others could connect; and
/// `bind` never replaces an existing file. The directory of `path` is
/// created (0700) when missing, and refused when other users may write it
/// without the sticky bit. A socket left by a mirror that did not exit
/// cleanly (nothing accepts on it) is removed; anything else at `path` — a
/// file, a symlink, a directory, a socket something listens on — is an
/// error, and is left as it is.
fn bind_unix(
    path: &Path,
    endpoint: &Endpoint,
) -> Result<(std::os::unix::net::UnixListener, SocketFile), ServerError> {
    use nix::sys::stat::{Mode, SFlag, fchmod};
    let bind_error = |source: io::Error| ServerError::Bind {
        endpoint: endpoint.clone(),
        source,
    };
    let dir = socket_directory(path).map_err(|error| ServerError::Dir {
        endpoint: endpoint.clone(),
        source: error,
    })?;
    let name = path
        .file_name()
        .ok_or_else(|| bind_error(io::Error::other("the path has no file name")))?;
    match dir.kind_of(name).map_err(bind_error)? {
        None => {}
        Some((kind, id)) if kind == SFlag::S_IFSOCK => {
            if listening(path).map_err(bind_error)? {
                return Err(ServerError::InUse(endpoint.clone()));
            }
            tracing::info!("removing the stale socket {}", path.display());
            match dir.remove(name, id) {
                // Gone since it was checked: the place is free.
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                other => other.map_err(bind_error)?,
            }
        }
        Some(_) => return Err(ServerError::NotASocket(endpoint.clone())),
    }
    let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)
        .map_err(bind_error)?;
    fchmod(&socket, Mode::from_bits_truncate(0o600)).map_err(|e| bind_error(e.into()))?;
    let address = socket2::SockAddr::unix(path).map_err(bind_error)?;
    socket.bind(&address).map_err(|error| match error.kind() {
        // Something appeared at the path since it was checked.
        io::ErrorKind::AddrInUse => ServerError::NotASocket(endpoint.clone()),
        _ => bind_error(error),
    })?;
    socket.listen(1024).map_err(bind_error)?;
    let Some((kind, id)) = dir.kind_of(name).map_err(bind_error)? else {
        return Err(bind_error(io::Error::other(
            "the socket vanished after bind",
        )));
    };
    if kind != SFlag::S_IFSOCK {
        return Err(ServerError::NotASocket(endpoint.clone()));
    }
    // The helper removes the file through the directory it was bound in.
    let file = SocketFile::new(
        dir.as_fd().try_clone_to_owned().map_err(bind_error)?,
        name.to_owned(),
        path.to_path_buf(),
        id.dev_ino(),
    )
    .map_err(bind_error)?;
    Ok((socket.into(), file))
}

/// Whether something listens on the socket at `path`, asked without
/// waiting: a blocking connect to a listener whose backlog is full waits
/// for a place, for as long as it takes (someone may have planted that
/// listener). A full backlog (EAGAIN) means a listener too; only a refused
/// connection means a socket nothing listens on any more.
fn listening(path: &Path) -> io::Result<bool> {
    let probe = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    probe.set_nonblocking(true)?;
    match probe.connect(&socket2::SockAddr::unix(path)?) {
        Ok(()) => Ok(true),
        Err(error) if error.kind() == io::ErrorKind::WouldBlock => Ok(true),
        Err(error) if error.raw_os_error() == Some(libc::EINPROGRESS) => Ok(true),
        Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => Ok(false),
        // Gone since it was checked.
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(error),
    }
}

/// Opens (creating it 0700 when missing) the directory of a socket path.
fn socket_directory(path: &Path) -> Result<OutputDir, crate::files::OutputDirError> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    OutputDir::open_or_create(parent, None)
}

/// What every session needs.
#[derive(Clone)]
pub struct SessionContext {
    pub control: mpsc::Sender<Request>,
    pub hub: Arc<Hub>,
    pub stats: Arc<ServerStats>,
    pub config: Arc<ServerConfig>,
}

/// Accepts clients until `shutdown` turns true; then lets every session
/// deliver its last events and returns.
pub async fn serve(
    listeners: Vec<BoundListener>,
    context: SessionContext,
    send_buffer: Option<Arc<dyn SendBufferForcer>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let short_token = context
        .config
        .token
        .as_ref()
        .filter(|token| token.len() < SHORT_TOKEN);
    if let Some(token) = short_token
        && listeners.iter().any(|l| matches!(l, BoundListener::Tcp(_)))
    {
        tracing::warn!(
            "the token is {} bytes long: anyone who can connect to the TCP listener can test guesses of it offline; use a random token of at least {SHORT_TOKEN} bytes (`head -c 32 /dev/urandom | base64 > FILE`)",
            token.len()
        );
    }
    let mut sessions = JoinSet::new();
    let mut next_id: SessionId = 0;
    let clients = Arc::new(Semaphore::new(
        context.config.max_clients.min(Semaphore::MAX_PERMITS),
    ));
    let (accepted_tx, mut accepted) = mpsc::channel::<Accepted>(64);
    let mut acceptors = JoinSet::new();
    for listener in listeners {
        let listener = match start_listener(listener) {
            Ok(listener) => listener,
            Err(error) => {
                tracing::error!("cannot serve clients on a listener: {error}");
                continue;
            }
        };
        let accepted_tx = accepted_tx.clone();
        acceptors.spawn(accept_loop(
            listener,
            accepted_tx,
            Arc::clone(&context.stats),
            send_buffer.clone(),
        ));
    }
    drop(accepted_tx);
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            connection = accepted.recv() => {
                let Some(connection) = connection else { break };
                next_id += 1;
                sessions.spawn(session(
                    connection,
                    next_id,
                    context.clone(),
                    Arc::clone(&clients),
                    shutdown.clone(),
                ));
            }
            // Reap finished sessions as they end.
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    }
    acceptors.abort_all();
    while sessions.join_next().await.is_some() {}
}

/// A client's byte stream, over either kind of socket.
pub trait Connection: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Connection for T {}

/// Makes a listener bound before the runtime started asynchronous.
fn start_listener(listener: BoundListener) -> io::Result<Listener> {
    Ok(match listener {
        BoundListener::Unix(listener, file) => {
            listener.set_nonblocking(true)?;
            Listener::Unix(UnixListener::from_std(listener)?, file)
        }
        BoundListener::Tcp(listener) => {
            listener.set_nonblocking(true)?;
            Listener::Tcp(TcpListener::from_std(listener)?)
        }
    })
}

/// A connection just accepted.
struct Accepted {
    connection: Box<dyn Connection>,
    /// TCP listeners check the token.
    needs_token: bool,
    at: Instant,
    ticket: HelloTicket,
}

/// The connections of one listening address that wait for their hello,
/// oldest first, each with the way to tell it to go.
#[derive(Default)]
struct AwaitingHello(Mutex<AwaitingQueue>);

#[derive(Default)]
struct AwaitingQueue {
    next: u64,
    waiting: VecDeque<(u64, oneshot::Sender<()>)>,
}

impl AwaitingHello {
    /// A place for a new connection; when [`MAX_AWAITING_HELLO`] wait
    /// already, the oldest is told to go.
    fn admit(self: &Arc<Self>, stats: &Arc<ServerStats>) -> HelloTicket {
        let (evict, evicted) = oneshot::channel();
        let mut queue = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if queue.waiting.len() >= MAX_AWAITING_HELLO
            && let Some((_, oldest)) = queue.waiting.pop_front()
        {
            let _ = oldest.send(());
        }
        let id = queue.next;
        queue.next += 1;
        queue.waiting.push_back((id, evict));
        stats.awaiting_hello.fetch_add(1, Ordering::Relaxed);
        HelloTicket {
            awaiting: Arc::clone(self),
            id,
            evicted,
            stats: Arc::clone(stats),
        }
    }
}

/// A connection's place among those that wait for their hello; given back
/// when dropped.
struct HelloTicket {
    awaiting: Arc<AwaitingHello>,
    id: u64,
    /// Completes when a newer connection took the place.
    evicted: oneshot::Receiver<()>,
    stats: Arc<ServerStats>,
}

impl Drop for HelloTicket {
    fn drop(&mut self) {
        let mut queue = self.awaiting.0.lock().unwrap_or_else(|p| p.into_inner());
        queue.waiting.retain(|(id, _)| *id != self.id);
        self.stats.awaiting_hello.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A client's place among the `--max-clients`; given back when dropped.
struct ClientSlot {
    _permit: OwnedSemaphorePermit,
    stats: Arc<ServerStats>,
}

impl ClientSlot {
    fn take(clients: &Arc<Semaphore>, stats: &Arc<ServerStats>) -> Option<Self> {
        let permit = Arc::clone(clients).try_acquire_owned().ok()?;
        stats.active.fetch_add(1, Ordering::Relaxed);
        Some(Self {
            _permit: permit,
            stats: Arc::clone(stats),
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.stats.active.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn accept_loop(
    listener: Listener,
    accepted: mpsc::Sender<Accepted>,
    stats: Arc<ServerStats>,
    send_buffer: Option<Arc<dyn SendBufferForcer>>,
) {
    let awaiting = Arc::new(AwaitingHello::default());
    loop {
        let result: io::Result<(Box<dyn Connection>, bool)> = match &listener {
            Listener::Unix(listener, _) => listener.accept().await.map(|(stream, _)| {
                enlarge_send_buffer(&stream, send_buffer.as_deref());
                (Box::new(stream) as Box<dyn Connection>, false)
            }),
            Listener::Tcp(listener) => listener.accept().await.map(|(stream, _)| {
                let _ = stream.set_nodelay(true);
                (Box::new(stream) as Box<dyn Connection>, true)
            }),
        };
        match result {
            Ok((connection, needs_token)) => {
                stats.accepted.fetch_add(1, Ordering::Relaxed);
                let connection = Accepted {
                    connection,
                    needs_token,
                    at: Instant::now(),
                    ticket: awaiting.admit(&stats),
                };
                if accepted.send(connection).await.is_err() {
                    return;
                }
            }
            Err(error) => {
                // Out of file descriptors and the like: wait, then retry.
                tracing::warn!("cannot accept a client: {error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

type Wire = SessionWire;

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .big_endian()
        .length_field_length(4)
        .max_frame_length(MAX_FRAME)
        .new_codec()
}

/// Frames a client connection (the client library uses the same codec).
pub fn frame<C: AsyncRead + AsyncWrite>(connection: C) -> Framed<C, LengthDelimitedCodec> {
    // A large read buffer: a burst of 64 KiB data frames comes in in few
    // system calls.
    Framed::with_capacity(connection, codec(), FRAME_BUFFER)
}

/// The client's read buffer, and the bytes a session's queued frames may
/// gather before it writes them.
const FRAME_BUFFER: usize = 1 << 20;

fn error(code: ErrorCode, fatal: bool, message: impl Into<String>) -> ServerFrame {
    ServerFrame::Error {
        code,
        fatal,
        message: message.into(),
    }
}

/// Bytes a Unix socket session may have on their way to its client.
///
/// A local consumer and the traffic it watches share the CPUs; when they
/// are saturated, each side waits a scheduler slice (milliseconds) for the
/// other. With the default 208 KiB buffer a `mirror tail` received about
/// 100 MB/s of a 1 GB/s bulk stream on a 2-core machine and lagged; the
/// buffer must cover those waits.
pub const UNIX_SEND_BUFFER: usize = privileged_helper::MAX_SEND_BUFFER;

/// Sets a socket's send buffer past `net.core.wmem_max`, which needs
/// CAP_NET_ADMIN: once the mirror has given up root, its privileged helper
/// does it.
pub trait SendBufferForcer: Send + Sync {
    fn force_send_buffer(&self, socket: BorrowedFd<'_>, bytes: usize) -> io::Result<()>;
}

/// Sets the session's send buffer to [`UNIX_SEND_BUFFER`]: past
/// `net.core.wmem_max` with SO_SNDBUFFORCE (through `forcer`, or here
/// while the mirror is still privileged), else as far as that limit allows.
fn enlarge_send_buffer(stream: &tokio::net::UnixStream, forcer: Option<&dyn SendBufferForcer>) {
    let fd = stream.as_fd();
    let forced = forcer
        .is_some_and(|forcer| forcer.force_send_buffer(fd, UNIX_SEND_BUFFER).is_ok())
        || nix::sys::socket::setsockopt(
            &fd,
            nix::sys::socket::sockopt::SndBufForce,
            &UNIX_SEND_BUFFER,
        )
        .is_ok();
    if !forced {
        let _ = socket2::SockRef::from(stream).set_send_buffer_size(UNIX_SEND_BUFFER);
    }
}

/// Why a session ended early.
enum End {
    Client,
    Refused,
    TooSlow,
    BadFrame,
    /// Sent no hello in time.
    HelloTimeout,
    /// Made room for a newer connection before its hello.
    Evicted,
    /// Left after the challenge without answering it.
    Unanswered,
}

async fn session(
    accepted: Accepted,
    id: SessionId,
    context: SessionContext,
    clients: Arc<Semaphore>,
    shutdown: watch::Receiver<bool>,
) {
    let stats = Arc::clone(&context.stats);
    let Accepted {
        connection,
        needs_token,
        at,
        ticket,
    } = accepted;
    // Until its hello passed, a connection may send no more than a hello.
    let mut before_hello = codec();
    before_hello.set_max_frame_length(MAX_HELLO_FRAME);
    let mut wire = SessionWire::new(Framed::new(connection, before_hello));
    let greeting = Greeting {
        needs_token,
        deadline: at + HELLO_TIMEOUT,
        ticket,
        clients: &clients,
    };
    let end = match hello(&mut wire, greeting, &context, shutdown.clone()).await {
        Ok((name, slot)) => {
            tracing::info!(session = id, client = %printable(&name), "client connected");
            let end = serve_session(&mut wire, id, &name, &context, shutdown).await;
            let _ = context
                .control
                .send(Request::EndSession { session: id })
                .await;
            drop(slot);
            end
        }
        Err(end) => end,
    };
    let counter = match end {
        End::Refused => &stats.refused,
        End::TooSlow => &stats.too_slow,
        End::BadFrame => &stats.bad_frames,
        End::HelloTimeout => &stats.hello_timeouts,
        End::Evicted => &stats.hello_evicted,
        End::Unanswered => &stats.unanswered_challenges,
        End::Client => return,
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Writes one frame, and any queued before it, within the write budget.
async fn send(wire: &mut Wire, context: &SessionContext, frame: &ServerFrame) -> Result<(), End> {
    wire.queue(frame);
    flush(wire, context).await
}

async fn flush(wire: &mut Wire, context: &SessionContext) -> Result<(), End> {
    match tokio::time::timeout(context.config.write_timeout, wire.flush()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(End::Client),
        Err(_) => Err(End::TooSlow),
    }
}

/// What the hello of a connection is checked against.
struct Greeting<'a> {
    needs_token: bool,
    /// The hello must have arrived by then.
    deadline: Instant,
    /// Its place among the connections that wait for their hello.
    ticket: HelloTicket,
    clients: &'a Arc<Semaphore>,
}

/// Runs the hello; returns the client's name (cut to
/// [`crate::server::protocol::MAX_CLIENT_NAME`] bytes) and its client slot.
async fn hello(
    wire: &mut Wire,
    greeting: Greeting<'_>,
    context: &SessionContext,
    shutdown: watch::Receiver<bool>,
) -> Result<(String, ClientSlot), End> {
    let Greeting {
        needs_token,
        deadline,
        mut ticket,
        clients,
    } = greeting;
    let outcome = greet(wire, needs_token, deadline, &mut ticket, context, shutdown).await;
    // The hello passed or failed: its place is free before anything more is
    // written (a refused client that does not read holds nothing).
    drop(ticket);
    let name = match outcome {
        Ok(name) => name,
        Err(Refusal { end, answer }) => {
            if let Some(answer) = answer {
                let _ = send(wire, context, &answer).await;
            }
            return Err(end);
        }
    };
    let Some(slot) = ClientSlot::take(clients, &context.stats) else {
        let message = format!(
            "the mirror serves at most {} clients at once",
            context.config.max_clients
        );
        let _ = send(
            wire,
            context,
            &error(ErrorCode::TooManyClients, true, message),
        )
        .await;
        return Err(End::Refused);
    };
    wire.set_max_frame_length(MAX_FRAME);
    let welcome = ServerFrame::Welcome {
        version: VERSION,
        server: context.config.name.clone(),
    };
    send(wire, context, &welcome).await?;
    Ok((client_name(&name).to_owned(), slot))
}

/// How a hello failed: the session's end, and the fatal error to send.
struct Refusal {
    end: End,
    answer: Option<ServerFrame>,
}

impl Refusal {
    fn new(end: End, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            end,
            answer: Some(error(code, true, message)),
        }
    }

    fn bad_frame(message: impl Into<String>) -> Self {
        Self::new(End::BadFrame, ErrorCode::BadFrame, message)
    }

    fn silent(end: End) -> Self {
        Self { end, answer: None }
    }
}

/// Reads the `Hello` and, on a TCP listener, challenges the client: the
/// server proves that it knows the token, then checks the client's proof
/// (docs/protocol.md, "Authentication"). Returns the client's name.
async fn greet(
    wire: &mut Wire,
    needs_token: bool,
    deadline: Instant,
    ticket: &mut HelloTicket,
    context: &SessionContext,
    mut shutdown: watch::Receiver<bool>,
) -> Result<String, Refusal> {
    let first = read_before_welcome(wire, deadline, ticket, &mut shutdown, End::Client).await?;
    // Read before the rest of the frame, whose layout depends on it.
    if let Some(version) = hello_version(&first)
        && version != VERSION
    {
        let message = format!(
            "this mirror speaks protocol version {VERSION}, the client {version}: use a client of the mirror's release"
        );
        return Err(Refusal::new(
            End::Refused,
            ErrorCode::UnsupportedVersion,
            message,
        ));
    }
    let (name, client_nonce) = match ClientFrame::decode(&first) {
        Ok(ClientFrame::Hello { name, nonce, .. }) => (name, nonce),
        Ok(_) => return Err(Refusal::bad_frame("the first frame must be a hello")),
        Err(decode_error) => return Err(Refusal::bad_frame(format!("bad frame: {decode_error}"))),
    };
    if !needs_token {
        return Ok(name);
    }
    let Some(token) = context.config.token.as_deref() else {
        // `bind` refuses a TCP listener without a token.
        let message = "this listener has no token to check";
        return Err(Refusal::new(End::Refused, ErrorCode::Internal, message));
    };
    let server_nonce = server_nonce()?;
    let challenge = ServerFrame::Challenge {
        nonce: server_nonce,
        proof: server_proof(token.as_bytes(), &client_nonce, &server_nonce),
    };
    send(wire, context, &challenge)
        .await
        .map_err(Refusal::silent)?;
    let answer =
        read_before_welcome(wire, deadline, ticket, &mut shutdown, End::Unanswered).await?;
    match ClientFrame::decode(&answer) {
        Ok(ClientFrame::Auth { proof })
            if client_proof_holds(token.as_bytes(), &server_nonce, &client_nonce, &proof) =>
        {
            Ok(name)
        }
        Ok(ClientFrame::Auth { .. }) => Err(Refusal::new(
            End::Refused,
            ErrorCode::BadToken,
            "wrong token: pass the mirror's token file with --token-file",
        )),
        Ok(_) => Err(Refusal::bad_frame(
            "the answer to a challenge must be an auth",
        )),
        Err(decode_error) => Err(Refusal::bad_frame(format!("bad frame: {decode_error}"))),
    }
}

fn server_nonce() -> Result<Nonce, Refusal> {
    new_nonce().map_err(|cause| {
        tracing::error!("cannot draw a random nonce for a client's hello: {cause}");
        Refusal::new(
            End::Refused,
            ErrorCode::Internal,
            "the mirror cannot draw a random nonce",
        )
    })
}

/// The next frame of a connection that has not been welcomed, by the
/// hello's deadline and unless a newer connection takes its place;
/// `if_closed` is how the session ends when the client leaves instead.
async fn read_before_welcome(
    wire: &mut Wire,
    deadline: Instant,
    ticket: &mut HelloTicket,
    shutdown: &mut watch::Receiver<bool>,
    if_closed: End,
) -> Result<BytesMut, Refusal> {
    let read = tokio::select! {
        read = tokio::time::timeout_at(deadline, wire.next()) => read,
        // Completes only with a value: the sender stays queued until it is
        // used, or until the ticket (held here) drops.
        Ok(()) = &mut ticket.evicted => {
            let message = format!(
                "more than {MAX_AWAITING_HELLO} connections are waiting to say hello to the mirror: try again"
            );
            return Err(Refusal::new(End::Evicted, ErrorCode::TooManyClients, message));
        }
        _ = shutdown.changed() => return Err(Refusal::silent(End::Client)),
    };
    match read {
        Ok(Some(Ok(bytes))) => Ok(bytes),
        // The codec's own errors (a frame over the limit); any other is
        // the connection's end.
        Ok(Some(Err(cause))) if cause.kind() == io::ErrorKind::InvalidData => Err(Refusal {
            end: End::BadFrame,
            answer: Some(error_frame_for(&cause)),
        }),
        Ok(Some(Err(_)) | None) => Err(Refusal::silent(if_closed)),
        Err(_) => {
            let message = format!(
                "the hello was not done within {} s of connecting",
                HELLO_TIMEOUT.as_secs()
            );
            Err(Refusal::new(
                End::HelloTimeout,
                ErrorCode::BadFrame,
                message,
            ))
        }
    }
}

fn error_frame_for(cause: &io::Error) -> ServerFrame {
    error(ErrorCode::BadFrame, true, format!("bad frame: {cause}"))
}

/// Asks the main task and waits for its answer.
async fn ask<T>(
    context: &SessionContext,
    request: impl FnOnce(oneshot::Sender<T>) -> Request,
) -> Option<T> {
    let (reply, answer) = oneshot::channel();
    context.control.send(request(reply)).await.ok()?;
    answer.await.ok()
}

fn policy_error(error: &PolicyError) -> ServerFrame {
    let code = match error {
        PolicyError::NotAllowed { .. } | PolicyError::CommandLine(_) | PolicyError::NotAdded(_) => {
            ErrorCode::PortNotAllowed
        }
        PolicyError::TooManyPorts { .. } => ErrorCode::TooManyPorts,
    };
    error_frame(code, error.to_string())
}

fn error_frame(code: ErrorCode, message: String) -> ServerFrame {
    error(code, false, message)
}

async fn serve_session(
    wire: &mut Wire,
    id: SessionId,
    name: &str,
    context: &SessionContext,
    mut shutdown: watch::Receiver<bool>,
) -> End {
    let mut subscription = context.hub.subscribe_session(id, name);
    loop {
        tokio::select! {
            frame = wire.next() => {
                let bytes = match frame {
                    None => return End::Client,
                    Some(Err(error)) => {
                        let _ = send(wire, context, &error_frame_for(&error)).await;
                        return End::BadFrame;
                    }
                    Some(Ok(bytes)) => bytes,
                };
                let request = match ClientFrame::decode(&bytes) {
                    Ok(request) => request,
                    Err(decode_error) => {
                        let message = format!("bad frame: {decode_error}");
                        let _ = send(wire, context, &error(ErrorCode::BadFrame, true, message)).await;
                        return End::BadFrame;
                    }
                };
                let reply = handle(request, id, &mut subscription, context).await;
                if let Err(end) = send(wire, context, &reply).await {
                    return end;
                }
            }
            event = subscription.next(), if !subscription.is_idle() => {
                let Some(event) = event else { return End::Client };
                let flush = subscription.queued() == 0;
                if let Err(end) = write_event(wire, context, flush, &event).await {
                    tracing::warn!(session = id, "client stopped reading; disconnecting it");
                    return end;
                }
            }
            _ = shutdown.changed() => {
                // The mirror stops: deliver what is left (the hub has
                // closed every channel, so this ends), then close.
                while let Some(event) = subscription.next().await {
                    let flush = subscription.queued() == 0;
                    if write_event(wire, context, flush, &event).await.is_err() {
                        break;
                    }
                }
                return End::Client;
            }
        }
    }
}

/// Queues an event; writes when `now` (no other event is waiting) or when
/// enough is queued, so a burst goes out in few writes.
async fn write_event(
    wire: &mut Wire,
    context: &SessionContext,
    now: bool,
    event: &crate::flow::model::StreamEvent,
) -> Result<(), End> {
    wire.queue(&ServerFrame::from_event(event));
    if now || wire.queued_bytes() >= FRAME_BUFFER {
        flush(wire, context).await
    } else {
        Ok(())
    }
}

async fn handle(
    request: ClientFrame,
    id: SessionId,
    subscription: &mut Subscription,
    context: &SessionContext,
) -> ServerFrame {
    let unavailable = || error(ErrorCode::Internal, false, "the mirror is stopping");
    match request {
        ClientFrame::Hello { .. } => error(ErrorCode::BadFrame, false, "hello was already sent"),
        ClientFrame::Auth { .. } => error(
            ErrorCode::BadFrame,
            false,
            "auth answers a challenge, and the hello is over",
        ),
        ClientFrame::Subscribe { ports } => {
            let answer = ask(context, |reply| Request::Subscribe {
                session: id,
                ports,
                reply,
            })
            .await;
            match answer {
                Some(Ok(receivers)) => {
                    for (port, receiver) in receivers {
                        if !subscription.ports().contains(&port) {
                            subscription.add_port(port, receiver);
                        }
                    }
                    ServerFrame::Ok
                }
                Some(Err(policy)) => policy_error(&policy),
                None => unavailable(),
            }
        }
        ClientFrame::Unsubscribe { ports } => {
            for port in &ports {
                subscription.remove_port(*port);
            }
            match ask(context, |reply| Request::Unsubscribe {
                session: id,
                ports,
                reply,
            })
            .await
            {
                Some(()) => ServerFrame::Ok,
                None => unavailable(),
            }
        }
        ClientFrame::Stats => match ask(context, |reply| Request::Stats { reply }).await {
            // The document's lists are bounded (counters::MAX_LISTED_*);
            // should it still not fit (with the type byte), the client
            // gets an error, not a frame it must refuse.
            Some(json) if json.len() < MAX_FRAME => ServerFrame::Stats { json },
            Some(json) => error(
                ErrorCode::Internal,
                false,
                format!(
                    "the counters ({} bytes) do not fit in one frame: report this as a bug",
                    json.len()
                ),
            ),
            None => unavailable(),
        },
        ClientFrame::ListPorts => match ask(context, |reply| Request::ListPorts { reply }).await {
            Some(ports) => ServerFrame::Ports { ports },
            None => unavailable(),
        },
        ClientFrame::AddPort { port } => {
            match ask(context, |reply| Request::AddPort { port, reply }).await {
                Some(Ok(())) => ServerFrame::Ok,
                Some(Err(policy)) => policy_error(&policy),
                None => unavailable(),
            }
        }
        ClientFrame::RemovePort { port } => {
            match ask(context, |reply| Request::RemovePort { port, reply }).await {
                Some(Ok(())) => ServerFrame::Ok,
                Some(Err(policy)) => policy_error(&policy),
                None => unavailable(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::BytesMut;
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpStream,
        task::JoinHandle,
    };

    use super::*;
    use crate::{
        control::ports::{AllowList, PortRegistry},
        control::{Control, PortMap},
        fanout::hub::HubConfig,
        server::client::{Client, ClientError},
        server::protocol::{
            MAX_CLIENT_NAME, MAX_TOKEN, NONCE_LEN, Proof, client_proof, server_proof_holds,
        },
        telemetry::counters::{StreamSummary, Summary},
    };

    #[test]
    fn unix_sockets_are_bound_0600_and_replace_only_stale_sockets() {
        use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("m.sock");
        let endpoint = Endpoint::Unix(path.clone());
        let (listener, _) = bind_unix(&path, &endpoint).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let parent = std::fs::metadata(dir.path().join("sub")).unwrap();
        assert_eq!(parent.permissions().mode() & 0o777, 0o700, "created 0700");
        // A live socket: another mirror listens.
        assert!(matches!(
            bind_unix(&path, &endpoint),
            Err(ServerError::InUse(_))
        ));
        // A stale one (nothing accepts): replaced.
        drop(listener);
        let (_listener, _) = bind_unix(&path, &endpoint).expect("the stale socket is replaced");
        // Anything else is left alone.
        for (name, make) in [
            ("file", &|p: &Path| std::fs::write(p, b"keep").unwrap() as _),
            ("link", &|p: &Path| {
                std::os::unix::fs::symlink("/etc/passwd", p).unwrap() as _
            }),
            ("dir", &|p: &Path| std::fs::create_dir(p).unwrap() as _),
        ] as [(&str, &dyn Fn(&Path)); 3]
        {
            let other = dir.path().join(name);
            make(&other);
            let error = bind_unix(&other, &Endpoint::Unix(other.clone())).unwrap_err();
            assert!(
                matches!(error, ServerError::NotASocket(_)),
                "{name}: {error}"
            );
        }
        assert_eq!(std::fs::read(dir.path().join("file")).unwrap(), b"keep");
    }

    /// A listener whose backlog is full (someone planted it, or a mirror
    /// stopped accepting) keeps a blocking connect waiting for a place,
    /// forever: the stale-socket check must not wait, and must take it for
    /// a live socket, which stays.
    #[test]
    fn a_socket_with_a_full_backlog_is_in_use_and_checked_without_waiting() {
        use std::os::unix::fs::MetadataExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.sock");
        let address = socket2::SockAddr::unix(&path).unwrap();
        let unix = || socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None);
        let planted = unix().unwrap();
        planted.bind(&address).unwrap();
        planted.listen(0).unwrap();
        let planted_ino = std::fs::symlink_metadata(&path).unwrap().ino();
        let mut waiting = Vec::new();
        for _ in 0..64 {
            let client = unix().unwrap();
            client.set_nonblocking(true).unwrap();
            match client.connect(&address) {
                Ok(()) => waiting.push(client),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) => panic!("filling the backlog: {error}"),
            }
        }
        assert!(waiting.len() < 64, "the backlog never filled up");

        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let endpoint = Endpoint::Unix(path.clone());
        let checked = path.clone();
        // On a thread of its own: a check that waits would never return.
        std::thread::spawn(move || {
            let _ = done_tx.send(bind_unix(&checked, &endpoint).map(|_| ()));
        });
        let result = done_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the stale-socket check waited for a place in the full backlog");
        assert!(matches!(result, Err(ServerError::InUse(_))), "{result:?}");
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!(meta.ino(), planted_ino, "the live socket is left alone");
    }

    const TOKEN: &str = "s3cret-token";

    struct NoMap;

    impl PortMap for NoMap {
        fn set_port(&mut self, _: u16, _: bool) -> Result<(), String> {
            Ok(())
        }
    }

    /// A server on 127.0.0.1 (and on a Unix socket, when asked) with a
    /// main task that answers port requests and the counters (those of
    /// the hub and the server).
    struct Harness {
        endpoint: Endpoint,
        unix: Option<(Endpoint, tempfile::TempDir)>,
        stats: Arc<ServerStats>,
        stop: watch::Sender<bool>,
        server: JoinHandle<()>,
    }

    impl Harness {
        async fn start(max_clients: usize) -> Self {
            Self::start_with(max_clients, false).await
        }

        async fn start_with(max_clients: usize, with_unix: bool) -> Self {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let endpoint = Endpoint::Tcp(listener.local_addr().unwrap());
            let mut listeners = vec![BoundListener::Tcp(listener)];
            let unix = with_unix.then(|| {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("m.sock");
                let endpoint = Endpoint::Unix(path.clone());
                let (listener, file) = bind_unix(&path, &endpoint).unwrap();
                listeners.push(BoundListener::Unix(listener, SocketFileGuard(file)));
                (endpoint, dir)
            });
            let hub = Arc::new(Hub::new(
                &[80],
                HubConfig {
                    capacity: 16,
                    max_bytes: 1 << 30,
                    batch_bytes: 1 << 16,
                },
            ));
            let stats = Arc::new(ServerStats::default());
            let (control_tx, mut control_rx) = mpsc::channel(64);
            let registry = PortRegistry::new(&[80], AllowList::parse("9000").unwrap(), 4);
            let mut control = Control::new(registry, Arc::clone(&hub));
            let (counters_hub, counters_server) = (Arc::clone(&hub), Arc::clone(&stats));
            tokio::spawn(async move {
                while let Some(request) = control_rx.recv().await {
                    match request {
                        Request::Stats { reply } => {
                            let (consumers, past_sessions) = counters_hub.consumer_totals();
                            let mut json = Summary {
                                kernel: Default::default(),
                                drain: Default::default(),
                                streams: StreamSummary {
                                    consumers,
                                    past_sessions,
                                    ..StreamSummary::default()
                                },
                            }
                            .to_json();
                            json["server"] = counters_server.to_json();
                            let _ = reply.send(json.to_string());
                        }
                        request => control.handle(request, &mut NoMap),
                    }
                }
            });
            let config = ServerConfig {
                endpoints: vec![endpoint.clone()],
                token: Some(TOKEN.to_owned()),
                max_clients,
                write_timeout: Duration::from_secs(1),
                name: "mirror under test".to_owned(),
            };
            let (stop, stop_rx) = watch::channel(false);
            let server = tokio::spawn(serve(
                listeners,
                SessionContext {
                    control: control_tx,
                    hub,
                    stats: Arc::clone(&stats),
                    config: Arc::new(config),
                },
                None,
                stop_rx,
            ));
            Self {
                endpoint,
                unix,
                stats,
                stop,
                server,
            }
        }

        fn addr(&self) -> SocketAddr {
            match self.endpoint {
                Endpoint::Tcp(addr) => addr,
                Endpoint::Unix(_) => unreachable!("TCP only"),
            }
        }

        async fn client(&self, name: &str) -> Result<Client, ClientError> {
            Client::connect(&self.endpoint, Some(TOKEN), name).await
        }

        fn counter(&self, name: &str) -> u64 {
            self.stats
                .fields()
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| *v)
                .unwrap()
        }

        /// Waits (at most 10 s) until `done` holds.
        async fn wait_until(&self, what: &str, done: impl Fn(&Self) -> bool) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !done(self) {
                assert!(Instant::now() < deadline, "{what}: {}", self.stats);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }

        async fn stop(self) {
            let _ = self.stop.send(true);
            tokio::time::timeout(Duration::from_secs(10), self.server)
                .await
                .expect("the server stops")
                .unwrap();
        }
    }

    /// A frame as it goes on the wire, length first.
    fn wire(frame: &ClientFrame) -> Vec<u8> {
        let mut body = BytesMut::new();
        frame.encode(&mut body);
        let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&body);
        bytes
    }

    fn hello(name: &str, nonce: Nonce) -> Vec<u8> {
        wire(&ClientFrame::Hello {
            version: VERSION,
            name: name.to_owned(),
            nonce,
        })
    }

    fn auth(proof: Proof) -> Vec<u8> {
        wire(&ClientFrame::Auth { proof })
    }

    /// Sends a hello with `nonce` and reads the challenge, after checking
    /// that the server proved it knows [`TOKEN`]; returns the server's
    /// nonce and proof.
    async fn challenged(stream: &mut TcpStream, nonce: Nonce) -> (Nonce, Proof) {
        stream.write_all(&hello("raw", nonce)).await.unwrap();
        match read_frame(stream).await {
            Some(ServerFrame::Challenge {
                nonce: server_nonce,
                proof,
            }) => {
                assert!(
                    server_proof_holds(TOKEN.as_bytes(), &nonce, &server_nonce, &proof),
                    "the server proves it knows the token"
                );
                (server_nonce, proof)
            }
            other => panic!("a challenge: {other:?}"),
        }
    }

    /// The whole hello of a client that knows [`TOKEN`], on a raw socket;
    /// returns the server's answer to the `Auth`.
    async fn raw_hello(stream: &mut TcpStream, name: &str) -> Option<ServerFrame> {
        let nonce = new_nonce().unwrap();
        stream.write_all(&hello(name, nonce)).await.unwrap();
        let Some(ServerFrame::Challenge {
            nonce: server_nonce,
            ..
        }) = read_frame(stream).await
        else {
            panic!("a challenge");
        };
        let proof = client_proof(TOKEN.as_bytes(), &server_nonce, &nonce);
        stream.write_all(&auth(proof)).await.unwrap();
        read_frame(stream).await
    }

    /// Reads one frame, or `None` at the end of the stream.
    async fn read_frame(stream: &mut TcpStream) -> Option<ServerFrame> {
        let mut length = [0u8; 4];
        stream.read_exact(&mut length).await.ok()?;
        let mut frame = vec![0u8; u32::from_be_bytes(length) as usize];
        stream.read_exact(&mut frame).await.ok()?;
        Some(ServerFrame::decode(&frame).expect("a well-formed frame"))
    }

    /// Reads until the server closes the connection; returns the frames.
    async fn until_closed(stream: &mut TcpStream, within: Duration) -> Vec<ServerFrame> {
        let mut frames = Vec::new();
        tokio::time::timeout(within, async {
            while let Some(frame) = read_frame(stream).await {
                frames.push(frame);
            }
        })
        .await
        .expect("the server closes the connection in time");
        frames
    }

    fn fatal_code(frames: &[ServerFrame]) -> Option<ErrorCode> {
        match frames {
            [ServerFrame::Error { code, fatal, .. }] => fatal.then_some(*code),
            _ => None,
        }
    }

    /// docs/protocol.md states the limits the code applies.
    #[test]
    fn the_documented_limits_are_the_code() {
        let doc = include_str!("../../../docs/protocol.md");
        let doc = doc.split_whitespace().collect::<Vec<_>>().join(" ");
        for stated in [
            format!("whole within **{} seconds** of", HELLO_TIMEOUT.as_secs()),
            format!("a hello not done within {} s", HELLO_TIMEOUT.as_secs()),
            format!("at most **{MAX_AWAITING_HELLO}** connections per listening address"),
            format!("a {}th makes the oldest", MAX_AWAITING_HELLO + 1),
            format!("A token is at most **{MAX_TOKEN} bytes**"),
            format!("warns about a token shorter than {SHORT_TOKEN} bytes"),
            format!(
                "within **{} seconds**",
                crate::server::client::HELLO_EXCHANGE_TIMEOUT.as_secs()
            ),
            format!(
                "keeps its first {} bytes",
                crate::server::protocol::MAX_CLIENT_NAME
            ),
            format!(
                "at most {} ports",
                crate::telemetry::counters::MAX_LISTED_PORTS
            ),
            format!(
                "and {} consumers",
                crate::telemetry::counters::MAX_LISTED_CONSUMERS
            ),
            format!("{} MiB ({MAX_FRAME} bytes)", MAX_FRAME >> 20),
            format!("may be at most {MAX_HELLO_FRAME} bytes long (the longest `HELLO`)"),
            format!("version in `HELLO` and `WELCOME` is {VERSION}."),
        ] {
            assert!(
                doc.contains(&stated),
                "docs/protocol.md should say: {stated}"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn silent_connections_take_no_client_slot_and_are_closed() {
        let server = Harness::start(1).await;
        let mut silent = Vec::new();
        for _ in 0..40 {
            silent.push(TcpStream::connect(server.addr()).await.unwrap());
        }
        server
            .wait_until("every connection accepted", |s| s.counter("accepted") == 40)
            .await;
        // An evicted connection gives its place back once its session has
        // sent the error, a moment after the newer one took it.
        server
            .wait_until("the oldest connections evicted", |s| {
                s.counter("awaiting_hello") == MAX_AWAITING_HELLO as u64
            })
            .await;
        // The one client slot is still free, and a client that says hello
        // is served at once, well before the silent ones time out.
        let started = Instant::now();
        let mut client = server.client("holder").await.expect("served");
        client.stats().await.expect("stats");
        assert!(
            started.elapsed() < HELLO_TIMEOUT / 2,
            "{:?}",
            started.elapsed()
        );
        assert_eq!(server.counter("active"), 1);
        // The slot is taken now.
        assert!(matches!(
            server.client("second").await,
            Err(ClientError::TooMany(_))
        ));
        // Every silent connection is closed: the oldest to make room, the
        // rest when their time is up.
        let mut evicted = 0;
        let mut timed_out = 0;
        for stream in &mut silent {
            let frames = until_closed(stream, HELLO_TIMEOUT + Duration::from_secs(2)).await;
            match fatal_code(&frames) {
                Some(ErrorCode::TooManyClients) => evicted += 1,
                Some(ErrorCode::BadFrame) => timed_out += 1,
                other => panic!("{other:?}: {frames:?}"),
            }
        }
        assert!(started.elapsed() >= HELLO_TIMEOUT / 2);
        // The holder's connection pushed the oldest out; the refused one
        // took the place the holder left.
        assert_eq!(timed_out, MAX_AWAITING_HELLO - 1, "{}", server.stats);
        assert_eq!(evicted + timed_out, 40);
        server
            .wait_until("counted", |s| s.counter("awaiting_hello") == 0)
            .await;
        assert_eq!(server.counter("hello_evicted"), evicted as u64);
        assert_eq!(server.counter("hello_timeouts"), timed_out as u64);
        assert_eq!(server.counter("active"), 1, "the holder is still served");
        client.stats().await.expect("still served");
        drop(client);
        server
            .wait_until("the holder left", |s| s.counter("active") == 0)
            .await;
        server.stop().await;
    }

    #[tokio::test]
    async fn a_slow_hello_is_cut_at_the_deadline() {
        let server = Harness::start(4).await;
        let mut stream = TcpStream::connect(server.addr()).await.unwrap();
        // Half a hello, then nothing.
        let bytes = hello("slow", [0; NONCE_LEN]);
        stream.write_all(&bytes[..bytes.len() / 2]).await.unwrap();
        let started = Instant::now();
        let frames = until_closed(&mut stream, HELLO_TIMEOUT + Duration::from_secs(2)).await;
        assert_eq!(fatal_code(&frames), Some(ErrorCode::BadFrame), "{frames:?}");
        assert!(started.elapsed() >= HELLO_TIMEOUT - Duration::from_millis(100));
        server.stop().await;
    }

    #[tokio::test]
    async fn before_its_hello_a_connection_may_send_no_more_than_a_hello() {
        let server = Harness::start(4).await;
        let mut stream = TcpStream::connect(server.addr()).await.unwrap();
        // Announces a frame one byte longer than the longest hello: refused
        // before its body arrives.
        let length = (crate::server::protocol::MAX_HELLO_FRAME as u32 + 1).to_be_bytes();
        stream.write_all(&length).await.unwrap();
        let frames = until_closed(&mut stream, Duration::from_secs(2)).await;
        assert_eq!(fatal_code(&frames), Some(ErrorCode::BadFrame), "{frames:?}");
        // The longest hello passes, and larger frames are allowed after it.
        let mut client = Client::connect(
            &server.endpoint,
            Some(TOKEN),
            &"n".repeat(crate::server::protocol::MAX_NAME),
        )
        .await
        .expect("served");
        let many: Vec<u16> = (1..=2000).collect();
        assert!(matches!(
            client.subscribe(&many).await,
            Err(ClientError::PortNotAllowed(_))
        ));
        client.stats().await.expect("still served");
        server.stop().await;
    }

    #[tokio::test]
    async fn the_hello_proves_the_token_both_ways() {
        let server = Harness::start(4).await;
        let mut stream = TcpStream::connect(server.addr()).await.unwrap();
        let nonce: Nonce = new_nonce().unwrap();
        let (server_nonce, _) = challenged(&mut stream, nonce).await;
        assert_ne!(server_nonce, nonce);
        // Challenged, not yet proved: still one of those waiting, no client.
        assert_eq!(server.counter("awaiting_hello"), 1);
        assert_eq!(server.counter("active"), 0);
        let proof = client_proof(TOKEN.as_bytes(), &server_nonce, &nonce);
        stream.write_all(&auth(proof)).await.unwrap();
        match read_frame(&mut stream).await {
            Some(ServerFrame::Welcome { version, server }) => {
                assert_eq!((version, server.as_str()), (VERSION, "mirror under test"));
            }
            other => panic!("a welcome: {other:?}"),
        }
        server
            .wait_until("served", |s| {
                s.counter("active") == 1 && s.counter("awaiting_hello") == 0
            })
            .await;
        // Past the hello, an auth is out of turn but not fatal.
        stream.write_all(&auth(proof)).await.unwrap();
        assert!(matches!(
            read_frame(&mut stream).await,
            Some(ServerFrame::Error {
                code: ErrorCode::BadFrame,
                fatal: false,
                ..
            })
        ));
        // The client library does the same.
        let mut client = server.client("library").await.expect("served");
        assert_eq!(client.server(), "mirror under test");
        client.stats().await.expect("stats");
        assert_eq!(server.counter("refused"), 0);
        assert_eq!(server.counter("unanswered_challenges"), 0);
        server.stop().await;
    }

    #[tokio::test]
    async fn a_client_with_another_token_is_refused_and_counted() {
        let server = Harness::start(4).await;
        // The client finds that the server's proof is not made with its
        // token, and leaves without proving anything.
        for wrong in ["s3cret", "s3cret-tokenX", "S3cret-token"] {
            let refused = Client::connect(&server.endpoint, Some(wrong), "t").await;
            let error = refused.err().expect("refused");
            assert!(
                matches!(error, ClientError::ServerUnknown { .. }),
                "{wrong:?}: {error}"
            );
            assert_eq!(
                error.to_string(),
                format!(
                    "the server at {} does not know the token: it is not the mirror you meant, or it was started with another token file",
                    server.endpoint
                )
            );
        }
        server
            .wait_until("three challenges left unanswered", |s| {
                s.counter("unanswered_challenges") == 3 && s.counter("awaiting_hello") == 0
            })
            .await;
        // A client that sends a proof made with another token (one that
        // does not check the server's) is refused by the server.
        let mut stream = TcpStream::connect(server.addr()).await.unwrap();
        let nonce = new_nonce().unwrap();
        let (server_nonce, _) = challenged(&mut stream, nonce).await;
        let wrong = client_proof(b"s3cret-tokenX", &server_nonce, &nonce);
        stream.write_all(&auth(wrong)).await.unwrap();
        let frames = until_closed(&mut stream, Duration::from_secs(5)).await;
        assert_eq!(fatal_code(&frames), Some(ErrorCode::BadToken), "{frames:?}");
        // No token, or one longer than any the mirror accepts: the client
        // library refuses before it connects.
        assert!(matches!(
            Client::connect(&server.endpoint, None, "t").await,
            Err(ClientError::TokenRequired { .. })
        ));
        assert!(matches!(
            Client::connect(&server.endpoint, Some(""), "t").await,
            Err(ClientError::TokenRequired { .. })
        ));
        let long = format!("{TOKEN}{}", "x".repeat(MAX_TOKEN));
        assert!(matches!(
            Client::connect(&server.endpoint, Some(&long), "t").await,
            Err(ClientError::TokenTooLong(_))
        ));
        server
            .wait_until("counted", |s| s.counter("refused") == 1)
            .await;
        assert_eq!(server.counter("accepted"), 4);
        assert_eq!(server.counter("active"), 0);
        assert_eq!(server.counter("unanswered_challenges"), 3);
        assert!(server.client("right").await.is_ok());
        server.stop().await;
    }

    #[tokio::test]
    async fn a_recorded_or_reflected_proof_fails_on_another_connection() {
        let server = Harness::start(4).await;
        // A session that passed, as an eavesdropper records it.
        let nonce = new_nonce().unwrap();
        let mut first = TcpStream::connect(server.addr()).await.unwrap();
        let (first_server_nonce, first_server_proof) = challenged(&mut first, nonce).await;
        let recorded = client_proof(TOKEN.as_bytes(), &first_server_nonce, &nonce);
        first.write_all(&auth(recorded)).await.unwrap();
        assert!(matches!(
            read_frame(&mut first).await,
            Some(ServerFrame::Welcome { .. })
        ));
        // The same hello again: the server's nonce is another, and the
        // recorded answer fails.
        let mut replay = TcpStream::connect(server.addr()).await.unwrap();
        let (replay_server_nonce, _) = challenged(&mut replay, nonce).await;
        assert_ne!(replay_server_nonce, first_server_nonce);
        replay.write_all(&auth(recorded)).await.unwrap();
        let frames = until_closed(&mut replay, Duration::from_secs(5)).await;
        assert_eq!(fatal_code(&frames), Some(ErrorCode::BadToken), "{frames:?}");
        // The server's own proof sent back to it, on this connection or on
        // one whose hello carries the first connection's server nonce.
        let mut reflect = TcpStream::connect(server.addr()).await.unwrap();
        let (_, own_proof) = challenged(&mut reflect, nonce).await;
        reflect.write_all(&auth(own_proof)).await.unwrap();
        let frames = until_closed(&mut reflect, Duration::from_secs(5)).await;
        assert_eq!(fatal_code(&frames), Some(ErrorCode::BadToken), "{frames:?}");
        let mut swapped = TcpStream::connect(server.addr()).await.unwrap();
        challenged(&mut swapped, first_server_nonce).await;
        swapped.write_all(&auth(first_server_proof)).await.unwrap();
        let frames = until_closed(&mut swapped, Duration::from_secs(5)).await;
        assert_eq!(fatal_code(&frames), Some(ErrorCode::BadToken), "{frames:?}");
        server
            .wait_until("counted", |s| s.counter("refused") == 3)
            .await;
        assert_eq!(server.counter("active"), 1, "the first session only");
        server.stop().await;
    }

    #[tokio::test]
    async fn a_challenged_connection_keeps_its_waiting_place_until_it_answers() {
        let server = Harness::start(4).await;
        // Challenged, and silent after that.
        let mut challenged_only = TcpStream::connect(server.addr()).await.unwrap();
        challenged(&mut challenged_only, new_nonce().unwrap()).await;
        assert_eq!(server.counter("awaiting_hello"), 1);
        // Silent connections fill the other places; one more pushes the
        // oldest out: the challenged one.
        let mut silent = Vec::new();
        for _ in 0..MAX_AWAITING_HELLO {
            silent.push(TcpStream::connect(server.addr()).await.unwrap());
        }
        let frames = until_closed(&mut challenged_only, Duration::from_secs(2)).await;
        assert_eq!(
            fatal_code(&frames),
            Some(ErrorCode::TooManyClients),
            "{frames:?}"
        );
        server
            .wait_until("evicted", |s| s.counter("hello_evicted") == 1)
            .await;
        drop(silent);
        // A challenge left unanswered ends at the hello's deadline.
        let mut late = TcpStream::connect(server.addr()).await.unwrap();
        let started = Instant::now();
        challenged(&mut late, new_nonce().unwrap()).await;
        let frames = until_closed(&mut late, HELLO_TIMEOUT + Duration::from_secs(2)).await;
        assert_eq!(fatal_code(&frames), Some(ErrorCode::BadFrame), "{frames:?}");
        assert!(started.elapsed() >= HELLO_TIMEOUT - Duration::from_millis(100));
        server
            .wait_until("timed out", |s| s.counter("hello_timeouts") == 1)
            .await;
        server.stop().await;
    }

    #[tokio::test]
    async fn another_version_is_told_so_whatever_its_hello_holds() {
        let server = Harness::start(4).await;
        // A version 1 hello: version, token, name.
        let mut v1 = vec![0x01, 0, 1, 0, 5];
        v1.extend_from_slice(b"token");
        v1.extend_from_slice(&[0, 2]);
        v1.extend_from_slice(b"v1");
        let mut framed = (v1.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(&v1);
        let mut stream = TcpStream::connect(server.addr()).await.unwrap();
        stream.write_all(&framed).await.unwrap();
        let frames = until_closed(&mut stream, Duration::from_secs(5)).await;
        assert_eq!(
            fatal_code(&frames),
            Some(ErrorCode::UnsupportedVersion),
            "{frames:?}"
        );
        let [ServerFrame::Error { message, .. }] = &frames[..] else {
            unreachable!("one error");
        };
        assert!(
            message.starts_with("this mirror speaks protocol version 2, the client 1"),
            "{message}"
        );
        assert_eq!(server.counter("refused"), 1);
        server.stop().await;
    }

    #[tokio::test]
    async fn a_unix_socket_session_has_no_challenge() {
        use tokio::net::UnixStream;
        let server = Harness::start_with(4, true).await;
        let (unix, _dir) = server.unix.as_ref().expect("a Unix listener");
        let Endpoint::Unix(path) = unix else {
            unreachable!("a Unix endpoint")
        };
        let mut stream = UnixStream::connect(path).await.unwrap();
        stream
            .write_all(&hello("local", [0; NONCE_LEN]))
            .await
            .unwrap();
        let mut length = [0u8; 4];
        stream.read_exact(&mut length).await.unwrap();
        let mut frame = vec![0u8; u32::from_be_bytes(length) as usize];
        stream.read_exact(&mut frame).await.unwrap();
        assert!(
            matches!(ServerFrame::decode(&frame), Ok(ServerFrame::Welcome { .. })),
            "{frame:?}"
        );
        // The client library, given a token or none.
        let mut clients = Vec::new();
        for token in [Some(TOKEN), None] {
            let mut client = Client::connect(unix, token, "local").await.expect("served");
            client.stats().await.expect("stats");
            clients.push(client);
        }
        server
            .wait_until("three local clients", |s| s.counter("active") == 3)
            .await;
        assert_eq!(server.counter("unanswered_challenges"), 0);
        drop(stream);
        server.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ended_sessions_leave_only_their_totals() {
        let server = Harness::start(64).await;
        const TASKS: usize = 8;
        const SESSIONS: usize = TASKS * 40;
        let mut tasks = JoinSet::new();
        for i in 0..TASKS {
            let endpoint = server.endpoint.clone();
            tasks.spawn(async move {
                for n in 0..SESSIONS / TASKS {
                    let mut client = Client::connect(&endpoint, Some(TOKEN), &format!("c{i}-{n}"))
                        .await
                        .expect("served");
                    client.subscribe(&[80]).await.expect("subscribed");
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
        let mut client = server.client("observer").await.unwrap();
        let past = |json: &serde_json::Value| {
            crate::telemetry::counters::flatten(json)
                .get("consumers.past_sessions.sessions")
                .copied()
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let json = loop {
            let json = client.stats().await.unwrap();
            if past(&json) == Some(SESSIONS as u64) || Instant::now() > deadline {
                break json;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(past(&json), Some(SESSIONS as u64), "{json}");
        // Only the observer is listed, by its session and its name.
        let consumers = json["consumers"].as_array().unwrap();
        assert_eq!(consumers.len(), 2, "{json}");
        assert_eq!(consumers[0]["client"], "observer");
        assert!(
            consumers[0]["name"]
                .as_str()
                .unwrap()
                .starts_with("client-")
        );
        assert_eq!(consumers[1]["name"], "past_sessions");
        server.stop().await;
    }

    #[tokio::test]
    async fn client_names_are_cut_and_escaped() {
        let server = Harness::start(4).await;
        let forged = format!("xy\nkernel: seen=999 \u{1b}[2J\u{202e}{}", "é".repeat(100));
        let mut stream = TcpStream::connect(server.addr()).await.unwrap();
        assert!(matches!(
            raw_hello(&mut stream, &forged).await,
            Some(ServerFrame::Welcome { .. })
        ));
        let mut client = server.client("observer").await.unwrap();
        let json = client.stats().await.unwrap();
        let name = json["consumers"][0]["client"].as_str().unwrap().to_owned();
        assert!(name.chars().all(|c| !c.is_control()), "{name:?}");
        assert!(
            name.starts_with("xy\\nkernel: seen=999 \\u{1b}[2J\\u{202e}é"),
            "{name:?}"
        );
        // Cut at a character boundary below 64 bytes: 27 bytes of ASCII,
        // control and format characters, then 18 two-byte characters.
        let kept = crate::server::protocol::client_name(&forged);
        assert_eq!(kept.len(), MAX_CLIENT_NAME - 1);
        assert!(name.ends_with(&"é".repeat(18)) && !name.ends_with(&"é".repeat(19)));
        for key in crate::telemetry::counters::flatten(&json).keys() {
            assert!(key.chars().all(|c| !c.is_control()), "{key:?}");
        }
        drop(stream);
        server.stop().await;
    }
}

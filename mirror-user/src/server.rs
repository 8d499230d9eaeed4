//! The subscriber server: Unix-socket and TCP listeners and one task per
//! client session. A session is one more hub consumer (drop-on-lag applies
//! to it alone); its socket writes have a time budget, after which a
//! client that stopped reading is disconnected. Port changes go to the main
//! task as [`control::Request`]s.
//!
//! A connection takes a client slot (`--max-clients`) only once its hello
//! passed: until then it is one of at most [`MAX_AWAITING_HELLO`] per
//! listening address, for at most [`HELLO_TIMEOUT`], so that silent or
//! slow connections cannot keep a client with the token out.
//!
//! The protocol is in `docs/protocol.md` and [`crate::protocol`].

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

use subtle::ConstantTimeEq as _;
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
    hub::{Hub, Subscription},
    output_dir::OutputDir,
    ports::{PolicyError, SessionId},
    privileged_helper::SocketFile,
    protocol::{
        ClientFrame, ErrorCode, MAX_FRAME, MAX_HELLO_FRAME, MAX_TOKEN, ServerFrame, VERSION,
        client_name, printable,
    },
    session_wire::SessionWire,
};

/// Where `mirror run` listens by default, and `mirror tail` connects.
pub const DEFAULT_SOCKET: &str = "/run/mirror/mirror.sock";
/// A connection must have sent its whole hello this long after it was
/// accepted; a client says hello at once, and a connection that waits
/// holds a place among the [`MAX_AWAITING_HELLO`].
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(3);
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
        source: crate::output_dir::OutputDirError,
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
    /// Required from TCP clients (Unix-socket clients are trusted by the
    /// socket's file permissions).
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
    /// Refused at hello: wrong token, version, or too many clients.
    pub refused: AtomicU64,
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
    pub fn fields(&self) -> [(&'static str, u64); 8] {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        [
            ("accepted", get(&self.accepted)),
            ("awaiting_hello", get(&self.awaiting_hello)),
            ("active", get(&self.active)),
            ("refused", get(&self.refused)),
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
fn socket_directory(path: &Path) -> Result<OutputDir, crate::output_dir::OutputDirError> {
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
pub const UNIX_SEND_BUFFER: usize = 8 << 20;

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

/// Reads and checks the hello; returns the client's name (cut to
/// [`crate::protocol::MAX_CLIENT_NAME`] bytes) and its client slot.
async fn hello(
    wire: &mut Wire,
    greeting: Greeting<'_>,
    context: &SessionContext,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(String, ClientSlot), End> {
    let Greeting {
        needs_token,
        deadline,
        mut ticket,
        clients,
    } = greeting;
    let read = tokio::select! {
        read = tokio::time::timeout_at(deadline, wire.next()) => read,
        Ok(()) = &mut ticket.evicted => {
            let message = format!(
                "more than {MAX_AWAITING_HELLO} connections are waiting to say hello to the mirror: try again"
            );
            let _ = send(wire, context, &error(ErrorCode::TooManyClients, true, message)).await;
            return Err(End::Evicted);
        }
        _ = shutdown.changed() => return Err(End::Client),
    };
    // The hello is here (or will not come): the place is free.
    drop(ticket);
    let frame = match read {
        Ok(Some(Ok(bytes))) => ClientFrame::decode(&bytes),
        Ok(Some(Err(error))) => {
            let _ = send(wire, context, &error_frame_for(&error)).await;
            return Err(End::BadFrame);
        }
        Ok(None) => return Err(End::Client),
        Err(_) => {
            let message = format!(
                "no hello within {} s of connecting",
                HELLO_TIMEOUT.as_secs()
            );
            let _ = send(wire, context, &error(ErrorCode::BadFrame, true, message)).await;
            return Err(End::HelloTimeout);
        }
    };
    let (version, token, name) = match frame {
        Ok(ClientFrame::Hello {
            version,
            token,
            name,
        }) => (version, token, name),
        Ok(_) => {
            let message = "the first frame must be a hello";
            let _ = send(wire, context, &error(ErrorCode::BadFrame, true, message)).await;
            return Err(End::BadFrame);
        }
        Err(decode_error) => {
            let message = format!("bad frame: {decode_error}");
            let _ = send(wire, context, &error(ErrorCode::BadFrame, true, message)).await;
            return Err(End::BadFrame);
        }
    };
    let refuse = async |wire: &mut Wire, code, message: String| {
        let _ = send(wire, context, &error(code, true, message)).await;
        Err(End::Refused)
    };
    if version != VERSION {
        let message =
            format!("this mirror speaks protocol version {VERSION}, the client {version}");
        return refuse(wire, ErrorCode::UnsupportedVersion, message).await;
    }
    if token.len() > MAX_TOKEN {
        let message = format!("the token is longer than {MAX_TOKEN} bytes");
        return refuse(wire, ErrorCode::BadToken, message).await;
    }
    if needs_token && !token_matches(context.config.token.as_deref(), &token) {
        let message = "wrong token: pass the mirror's token file with --token-file".to_owned();
        return refuse(wire, ErrorCode::BadToken, message).await;
    }
    let Some(slot) = ClientSlot::take(clients, &context.stats) else {
        let message = format!(
            "the mirror serves at most {} clients at once",
            context.config.max_clients
        );
        return refuse(wire, ErrorCode::TooManyClients, message).await;
    };
    wire.set_max_frame_length(MAX_FRAME);
    let welcome = ServerFrame::Welcome {
        version: VERSION,
        server: context.config.name.clone(),
    };
    send(wire, context, &welcome).await?;
    Ok((client_name(&name).to_owned(), slot))
}

/// Whether `given` is the expected token, in a time that depends on
/// neither token: both are compared as [`MAX_TOKEN`]-byte blocks, so that
/// neither the first wrong byte nor the token's length shows in the time.
fn token_matches(expected: Option<&str>, given: &str) -> bool {
    let Some(expected) = expected else {
        return false;
    };
    if expected.len() > MAX_TOKEN || given.len() > MAX_TOKEN {
        return false;
    }
    let block = |token: &str| {
        let mut block = [0u8; MAX_TOKEN];
        block[..token.len()].copy_from_slice(token.as_bytes());
        block
    };
    let same_length = (expected.len() as u64).ct_eq(&(given.len() as u64));
    (block(expected).ct_eq(&block(given)) & same_length).into()
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
    event: &crate::stream::StreamEvent,
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
        client::{Client, ClientError},
        control::{Control, PortMap},
        counters::{StreamSummary, Summary},
        hub::HubConfig,
        ports::{AllowList, PortRegistry},
        protocol::MAX_CLIENT_NAME,
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

    /// A server on 127.0.0.1 with a main task that answers port requests
    /// and the counters (those of the hub and the server).
    struct Harness {
        endpoint: Endpoint,
        stats: Arc<ServerStats>,
        stop: watch::Sender<bool>,
        server: JoinHandle<()>,
    }

    impl Harness {
        async fn start(max_clients: usize) -> Self {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let endpoint = Endpoint::Tcp(listener.local_addr().unwrap());
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
                vec![BoundListener::Tcp(listener)],
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

    fn hello(token: &str, name: &str) -> Vec<u8> {
        let mut body = BytesMut::new();
        ClientFrame::Hello {
            version: VERSION,
            token: token.to_owned(),
            name: name.to_owned(),
        }
        .encode(&mut body);
        let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&body);
        bytes
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
        let doc = include_str!("../../docs/protocol.md");
        let doc = doc.split_whitespace().collect::<Vec<_>>().join(" ");
        for stated in [
            format!("whole within **{} seconds** of", HELLO_TIMEOUT.as_secs()),
            format!("none within {} s", HELLO_TIMEOUT.as_secs()),
            format!("at most **{MAX_AWAITING_HELLO}** connections per listening address"),
            format!("a {}th makes the oldest", MAX_AWAITING_HELLO + 1),
            format!("A token is at most **{MAX_TOKEN} bytes**"),
            format!("at most {MAX_TOKEN} bytes)"),
            format!("keeps its first {} bytes", crate::protocol::MAX_CLIENT_NAME),
            format!("at most {} ports", crate::counters::MAX_LISTED_PORTS),
            format!("and {} consumers", crate::counters::MAX_LISTED_CONSUMERS),
            format!("{} MiB ({MAX_FRAME} bytes)", MAX_FRAME >> 20),
            format!("may be at most {MAX_HELLO_FRAME} bytes long (the longest `HELLO`)"),
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
        let bytes = hello(TOKEN, "slow");
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
        let length = (crate::protocol::MAX_HELLO_FRAME as u32 + 1).to_be_bytes();
        stream.write_all(&length).await.unwrap();
        let frames = until_closed(&mut stream, Duration::from_secs(2)).await;
        assert_eq!(fatal_code(&frames), Some(ErrorCode::BadFrame), "{frames:?}");
        // The longest hello passes, and larger frames are allowed after it.
        let mut client = Client::connect(
            &server.endpoint,
            Some(TOKEN),
            &"n".repeat(crate::protocol::MAX_NAME),
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
    async fn tokens_are_checked_whole() {
        let server = Harness::start(4).await;
        for wrong in ["", "s3cret", "s3cret-tokenX", "S3cret-token"] {
            let refused = Client::connect(&server.endpoint, Some(wrong), "t").await;
            assert!(matches!(refused, Err(ClientError::BadToken)), "{wrong:?}");
        }
        // A longer token than any the mirror accepts, past the client
        // library's own check.
        let mut stream = TcpStream::connect(server.addr()).await.unwrap();
        let long = format!("{TOKEN}{}", "x".repeat(MAX_TOKEN));
        stream.write_all(&hello(&long, "long")).await.unwrap();
        let frames = until_closed(&mut stream, Duration::from_secs(5)).await;
        assert_eq!(fatal_code(&frames), Some(ErrorCode::BadToken), "{frames:?}");
        assert!(matches!(
            Client::connect(&server.endpoint, Some(&long), "t").await,
            Err(ClientError::TokenTooLong(_))
        ));
        assert_eq!(server.counter("refused"), 5);
        assert!(server.client("right").await.is_ok());
        server.stop().await;
    }

    #[test]
    fn token_comparison() {
        assert!(token_matches(Some("abc"), "abc"));
        assert!(!token_matches(Some("abc"), "abd"));
        assert!(!token_matches(Some("abc"), "ab"));
        assert!(!token_matches(Some("abc"), "abc\0"));
        assert!(!token_matches(Some(""), "\0"));
        assert!(!token_matches(None, ""));
        let longest = "t".repeat(MAX_TOKEN);
        assert!(token_matches(Some(&longest), &longest));
        let longer = "t".repeat(MAX_TOKEN + 1);
        assert!(!token_matches(Some(&longer), &longer));
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
            crate::counters::flatten(json)
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
        stream.write_all(&hello(TOKEN, &forged)).await.unwrap();
        assert!(matches!(
            read_frame(&mut stream).await,
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
        let kept = crate::protocol::client_name(&forged);
        assert_eq!(kept.len(), MAX_CLIENT_NAME - 1);
        assert!(name.ends_with(&"é".repeat(18)) && !name.ends_with(&"é".repeat(19)));
        for key in crate::counters::flatten(&json).keys() {
            assert!(key.chars().all(|c| !c.is_control()), "{key:?}");
        }
        drop(stream);
        server.stop().await;
    }
}

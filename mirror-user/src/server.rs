//! The subscriber server: Unix-socket and TCP listeners and one task per
//! client session. A session is one more hub consumer (drop-on-lag applies
//! to it alone); its socket writes have a time budget, after which a
//! client that stopped reading is disconnected. Port changes go to the main
//! task as [`control::Request`]s.
//!
//! The protocol is in `docs/protocol.md` and [`crate::protocol`].

use std::{
    fmt, io,
    net::SocketAddr,
    os::fd::{AsFd as _, BorrowedFd},
    path::{Path, PathBuf},
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
    sync::{mpsc, oneshot, watch},
    task::JoinSet,
};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::{
    control::Request,
    hub::{Hub, Subscription},
    output_dir::OutputDir,
    ports::{PolicyError, SessionId},
    privileged_helper::SocketFile,
    protocol::{ClientFrame, ErrorCode, MAX_FRAME, ServerFrame, VERSION},
    session_wire::SessionWire,
};

/// Where `mirror run` listens by default, and `mirror tail` connects.
pub const DEFAULT_SOCKET: &str = "/run/mirror/mirror.sock";
/// A client must say hello within this time.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

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
        "another mirror already listens on {0}: stop it, or give this one another address with --listen"
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
    pub accepted: AtomicU64,
    pub active: AtomicU64,
    /// Refused at hello: wrong token, version, or too many clients.
    pub refused: AtomicU64,
    /// Closed because they stopped reading for longer than the budget.
    pub too_slow: AtomicU64,
    /// Closed for a malformed frame.
    pub bad_frames: AtomicU64,
}

impl ServerStats {
    /// `(name, value)` of every counter.
    pub fn fields(&self) -> [(&'static str, u64); 5] {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        [
            ("accepted", get(&self.accepted)),
            ("active", get(&self.active)),
            ("refused", get(&self.refused)),
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
/// The socket is bound in a fresh 0700 directory beside `path`, given mode
/// 0600 there (no other user can reach it yet), then renamed into place
/// without replacing anything (renameat2 RENAME_NOREPLACE). The directory
/// of `path` is created (0700) when missing, and refused when other users
/// may write it without the sticky bit. A socket left by a mirror that did
/// not exit cleanly (nothing accepts on it) is removed; anything else at
/// `path` — a file, a symlink, a directory — is an error, left as it is.
fn bind_unix(
    path: &Path,
    endpoint: &Endpoint,
) -> Result<(std::os::unix::net::UnixListener, SocketFile), ServerError> {
    use nix::{
        fcntl::{RenameFlags, renameat2},
        sys::stat::{FchmodatFlags, Mode, SFlag, fchmodat, mkdirat},
        unistd::{UnlinkatFlags, unlinkat},
    };
    let bind_error = |source: io::Error| ServerError::Bind {
        endpoint: endpoint.clone(),
        source,
    };
    let errno = |error: nix::errno::Errno| bind_error(error.into());
    let dir = socket_directory(path).map_err(|error| ServerError::Dir {
        endpoint: endpoint.clone(),
        source: error,
    })?;
    let name = path
        .file_name()
        .ok_or_else(|| bind_error(io::Error::other("the path has no file name")))?;
    match dir.kind_of(name).map_err(bind_error)? {
        None => {}
        Some((kind, _)) if kind == SFlag::S_IFSOCK => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ServerError::InUse(endpoint.clone()));
            }
            tracing::info!("removing the stale socket {}", path.display());
            unlinkat(dir.as_fd(), name, UnlinkatFlags::NoRemoveDir).map_err(errno)?;
        }
        Some(_) => return Err(ServerError::NotASocket(endpoint.clone())),
    }
    let private = format!(".mirror-bind-{}", std::process::id());
    mkdirat(
        dir.as_fd(),
        private.as_str(),
        Mode::from_bits_truncate(0o700),
    )
    .map_err(errno)?;
    let private_path = dir.path().join(&private);
    let bound = (|| {
        let listener =
            std::os::unix::net::UnixListener::bind(private_path.join("s")).map_err(bind_error)?;
        let private_fd = nix::fcntl::open(
            &private_path,
            nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_NOFOLLOW
                | nix::fcntl::OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno)?;
        fchmodat(
            &private_fd,
            "s",
            Mode::from_bits_truncate(0o600),
            FchmodatFlags::FollowSymlink,
        )
        .map_err(errno)?;
        renameat2(
            &private_fd,
            "s",
            dir.as_fd(),
            name,
            RenameFlags::RENAME_NOREPLACE,
        )
        .map_err(|error| match error {
            nix::errno::Errno::EEXIST => ServerError::NotASocket(endpoint.clone()),
            other => errno(other),
        })?;
        Ok(listener)
    })();
    let _ = unlinkat(dir.as_fd(), private.as_str(), UnlinkatFlags::RemoveDir);
    let listener = bound?;
    let Some((_, id)) = dir.kind_of(name).map_err(bind_error)? else {
        return Err(bind_error(io::Error::other(
            "the socket vanished after bind",
        )));
    };
    let (dev, ino) = id.dev_ino();
    Ok((
        listener,
        SocketFile {
            path: path.to_path_buf(),
            dev,
            ino,
        },
    ))
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
    let (accepted_tx, mut accepted) = mpsc::channel::<(Box<dyn Connection>, bool)>(64);
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
        acceptors.spawn(accept_loop(listener, accepted_tx, send_buffer.clone()));
    }
    drop(accepted_tx);
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            connection = accepted.recv() => {
                let Some((connection, needs_token)) = connection else { break };
                next_id += 1;
                let context = context.clone();
                let shutdown = shutdown.clone();
                sessions.spawn(session(connection, next_id, needs_token, context, shutdown));
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

async fn accept_loop(
    listener: Listener,
    accepted: mpsc::Sender<(Box<dyn Connection>, bool)>,
    send_buffer: Option<Arc<dyn SendBufferForcer>>,
) {
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
            Ok(connection) => {
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
const UNIX_SEND_BUFFER: usize = 8 << 20;

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
}

async fn session(
    connection: Box<dyn Connection>,
    id: SessionId,
    needs_token: bool,
    context: SessionContext,
    shutdown: watch::Receiver<bool>,
) {
    let stats = Arc::clone(&context.stats);
    stats.accepted.fetch_add(1, Ordering::Relaxed);
    let active = stats.active.fetch_add(1, Ordering::Relaxed) + 1;
    let mut wire = SessionWire::new(Framed::new(connection, codec()));
    let end = if active as usize > context.config.max_clients {
        let message = format!(
            "the mirror serves at most {} clients at once",
            context.config.max_clients
        );
        let _ = send(
            &mut wire,
            &context,
            &error(ErrorCode::TooManyClients, true, message),
        )
        .await;
        End::Refused
    } else {
        match hello(&mut wire, needs_token, &context).await {
            Ok(name) => {
                tracing::info!(session = id, client = %name, "client connected");
                let end = serve_session(&mut wire, id, &name, &context, shutdown).await;
                let _ = context
                    .control
                    .send(Request::EndSession { session: id })
                    .await;
                end
            }
            Err(end) => end,
        }
    };
    match end {
        End::Refused => stats.refused.fetch_add(1, Ordering::Relaxed),
        End::TooSlow => stats.too_slow.fetch_add(1, Ordering::Relaxed),
        End::BadFrame => stats.bad_frames.fetch_add(1, Ordering::Relaxed),
        End::Client => 0,
    };
    stats.active.fetch_sub(1, Ordering::Relaxed);
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

/// Reads and checks the hello; returns the client's name.
async fn hello(
    wire: &mut Wire,
    needs_token: bool,
    context: &SessionContext,
) -> Result<String, End> {
    let frame = match tokio::time::timeout(HELLO_TIMEOUT, wire.next()).await {
        Ok(Some(Ok(bytes))) => ClientFrame::decode(&bytes),
        Ok(Some(Err(error))) => {
            let _ = send(wire, context, &error_frame_for(&error)).await;
            return Err(End::BadFrame);
        }
        Ok(None) | Err(_) => return Err(End::Client),
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
    if version != VERSION {
        let message =
            format!("this mirror speaks protocol version {VERSION}, the client {version}");
        let _ = send(
            wire,
            context,
            &error(ErrorCode::UnsupportedVersion, true, message),
        )
        .await;
        return Err(End::Refused);
    }
    if needs_token && context.config.token.as_deref() != Some(token.as_str()) {
        let message = "wrong token: pass the mirror's token file with --token-file";
        let _ = send(wire, context, &error(ErrorCode::BadToken, true, message)).await;
        return Err(End::Refused);
    }
    let welcome = ServerFrame::Welcome {
        version: VERSION,
        server: context.config.name.clone(),
    };
    send(wire, context, &welcome).await?;
    Ok(name)
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
    let (_, mut subscription) = context.hub.subscribe(&[], &format!("client {id} {name}"));
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
            Some(json) => ServerFrame::Stats { json },
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
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            "unix:/tmp/m.sock".parse::<Endpoint>(),
            Ok(Endpoint::Unix(PathBuf::from("/tmp/m.sock")))
        );
        assert_eq!(
            "127.0.0.1:7000".parse::<Endpoint>(),
            Ok(Endpoint::Tcp("127.0.0.1:7000".parse().unwrap()))
        );
        assert_eq!(
            "[::1]:7000".parse::<Endpoint>().unwrap().to_string(),
            "[::1]:7000"
        );
        assert!("unix:".parse::<Endpoint>().is_err());
        assert!("localhost".parse::<Endpoint>().is_err());
        assert_eq!(
            Endpoint::default().to_string(),
            format!("unix:{DEFAULT_SOCKET}")
        );
    }
}

//! The server's listening sockets: bound while the mirror is still root
//! (a Unix socket 0600 from its first moment), then accepted from by the
//! running server, which hands each connection to a session task.

use std::{
    io,
    os::fd::{AsFd as _, BorrowedFd},
    path::Path,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::{
    net::{TcpListener, UnixListener},
    sync::{Semaphore, mpsc, watch},
    task::JoinSet,
    time::Instant,
};

use crate::{
    control::ports::SessionId,
    files::OutputDir,
    kernel::privileged_helper::{self, SocketFile},
    server::{
        Endpoint, ServerConfig, ServerCounters,
        session::{Accepted, AwaitingHello, SessionContext, session},
        wire::Connection,
    },
};

/// Tokens shorter than this are warned about: anyone who can connect to a
/// TCP listener gets a proof made with the token, and can test guesses of
/// it offline.
pub const SHORT_TOKEN: usize = 16;

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
pub struct SocketFileGuard(pub(super) SocketFile);

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
pub(super) fn bind_unix(
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
    accepted: mpsc::Sender<Accepted>,
    stats: Arc<ServerCounters>,
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

#[cfg(test)]
mod tests {
    use super::*;

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
}

//! A client of the subscriber server, used by `mirror tail`, `mirror
//! ports` and `mirror stats`, and by tests.
//!
//! Over TCP the client sends its token to no one: it checks the server's
//! proof that it knows the token before it proves its own
//! (docs/protocol.md, "Authentication").
//!
//! Requests are answered in order, but stream events arrive between the
//! answers: while waiting for an answer, events are queued for
//! [`Client::next_event`].
//!
//! Over a Unix socket the client maps the mirror's payload arena
//! (docs/protocol.md, "Shared memory"): data events then hold bytes of the
//! read-only mapping, not copies, and each is returned to the mirror
//! (credited) once the last handle of its bytes is dropped. Holding them
//! long makes the mirror close this client's connections as lagged. They
//! stay intact only while the session lasts: once the client is dropped
//! (or the mirror ended the session and `--client-timeout` passed), the
//! mirror reuses that memory, so copy what must outlive the client.

use std::{
    collections::VecDeque,
    fs::File,
    io::{self, IoSliceMut, Read as _},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
    },
    path::Path,
    sync::Arc,
    time::Duration,
};

use bytes::BytesMut;
use futures_util::{FutureExt as _, SinkExt as _};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
use parking_lot::Mutex;
use tokio::{
    io::Interest,
    net::{TcpStream, UnixStream},
    sync::Notify,
};
use tokio_stream::StreamExt as _;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::{
    arena::{ArenaError, ArenaView},
    control::ports::PortInfo,
    flow::model::StreamEvent,
    server::protocol::{
        ClientFrame, ErrorCode, MAX_TOKEN, OLDEST_VERSION, ProtocolError, ServerFrame, VERSION,
        client_name, client_proof, new_nonce, server_proof_holds,
    },
    server::{Endpoint, protocol::frame, wire::Connection},
    text::printable,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot connect to the mirror at {endpoint} ({source}): is `mirror run` running, with --listen {endpoint}?"
    )]
    Connect {
        endpoint: Endpoint,
        #[source]
        source: io::Error,
    },
    #[error(
        "the mirror refused the token: pass the token file the mirror was started with (--token-file)"
    )]
    BadToken,
    #[error(
        "the server at {endpoint} does not know the token: it is not the mirror you meant, or it was started with another token file"
    )]
    ServerUnknown { endpoint: Endpoint },
    #[error(
        "connecting to the mirror at {endpoint} needs its token: pass the token file the mirror was started with (--token-file)"
    )]
    TokenRequired { endpoint: Endpoint },
    #[error(
        "the mirror at {endpoint} did not finish the hello within {} s: check that `mirror run --listen {endpoint}` runs there and is not overloaded",
        HELLO_EXCHANGE_TIMEOUT.as_secs()
    )]
    HelloTimeout { endpoint: Endpoint },
    #[error(
        "the mirror at {endpoint} could not read the hello ({message}): it may be of another release than this client; use the client of the mirror's release"
    )]
    HelloRefused { endpoint: Endpoint, message: String },
    #[error("the mirror speaks another protocol version: {0}")]
    Version(String),
    #[error("{0}")]
    PortNotAllowed(String),
    #[error("{0}")]
    TooMany(String),
    #[error("the mirror reported an error: {0}")]
    Server(String),
    #[error("the mirror closed the connection")]
    Closed,
    #[error("the mirror sent an unexpected frame: {0}")]
    Unexpected(String),
    #[error("the mirror sent a malformed frame: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("connection to the mirror failed: {0}")]
    Io(#[from] io::Error),
    #[error("the token is {0} bytes long; the mirror accepts at most {MAX_TOKEN}")]
    TokenTooLong(usize),
    #[error(transparent)]
    Arena(#[from] ArenaError),
}

impl ClientError {
    fn from_error_frame(code: ErrorCode, message: String) -> Self {
        // The message is shown to people: nothing in it may drive their
        // terminal.
        let message = printable(&message).into_owned();
        match code {
            ErrorCode::BadToken => Self::BadToken,
            ErrorCode::UnsupportedVersion => Self::Version(message),
            ErrorCode::PortNotAllowed => Self::PortNotAllowed(message),
            ErrorCode::TooManyPorts | ErrorCode::TooManyClients => Self::TooMany(message),
            _ => Self::Server(message),
        }
    }
}

/// How long a client waits for the whole hello, connecting included: an
/// address where something accepts connections but never answers does not
/// keep it waiting.
pub const HELLO_EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Client {
    wire: Framed<Box<dyn Connection>, LengthDelimitedCodec>,
    events: VecDeque<StreamEvent>,
    server: String,
    /// The protocol version of the session.
    version: u16,
    /// The mirror's arena, once mapped.
    arena: Option<ClientArena>,
}

/// Whether a client asks for the mirror's payload arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArenaUse {
    /// Over a Unix socket, when the mirror offers one.
    Auto,
    /// Never: every data event carries its bytes.
    Never,
}

/// References returned in one `CREDIT` at least (or an eighth of the
/// client's share of the arena in bytes), unless the client is about to
/// wait for the mirror, when it returns all it can.
pub const CREDIT_BATCH: u32 = 64;

struct ClientArena {
    view: ArenaView,
    credits: Arc<Credits>,
}

/// The references received, in order, and which of them are done with.
struct Credits {
    /// Bytes done with that are worth a `CREDIT` on their own.
    batch_bytes: u64,
    state: Mutex<CreditState>,
    /// Woken when references can be returned while the client waits.
    ready: Notify,
}

#[derive(Default)]
struct CreditState {
    /// Sequence number of the oldest reference not yet done with.
    first: u64,
    /// From `first` on: the length of each reference, and whether it is
    /// done with. Credits go in order, so a reference done with behind one
    /// still held waits for it.
    done: VecDeque<(u32, bool)>,
    /// Done with, in order, and not yet returned.
    returnable: u32,
    returnable_bytes: u64,
}

impl Credits {
    fn new(share: u64) -> Self {
        Self {
            batch_bytes: share / 8,
            state: Mutex::default(),
            ready: Notify::new(),
        }
    }

    fn issue(self: &Arc<Self>, len: u32) -> CreditGuard {
        let mut state = self.state.lock();
        let seq = state.first + state.done.len() as u64;
        state.done.push_back((len, false));
        CreditGuard {
            credits: Arc::clone(self),
            seq,
        }
    }

    fn finish(&self, seq: u64) {
        let mut state = self.state.lock();
        let Some(index) = seq.checked_sub(state.first) else {
            return;
        };
        if let Some((_, done)) = state.done.get_mut(index as usize) {
            *done = true;
        }
        let mut freed = false;
        while let Some(&(len, true)) = state.done.front() {
            state.done.pop_front();
            state.first += 1;
            state.returnable += 1;
            state.returnable_bytes += u64::from(len);
            freed = true;
        }
        if freed && (self.worth_sending(&state) || state.done.is_empty()) {
            self.ready.notify_one();
        }
    }

    fn worth_sending(&self, state: &CreditState) -> bool {
        state.returnable >= CREDIT_BATCH || state.returnable_bytes >= self.batch_bytes
    }

    /// References to return now: all that are done with when `all` or
    /// when they are worth a `CREDIT`, else none.
    fn take(&self, all: bool) -> u32 {
        let mut state = self.state.lock();
        if state.returnable > 0 && (all || self.worth_sending(&state)) {
            state.returnable_bytes = 0;
            std::mem::take(&mut state.returnable)
        } else {
            0
        }
    }
}

/// Held by the bytes of one reference; done with when dropped.
struct CreditGuard {
    credits: Arc<Credits>,
    seq: u64,
}

impl Drop for CreditGuard {
    fn drop(&mut self) {
        self.credits.finish(self.seq);
    }
}

impl Client {
    /// Connects and says hello, within [`HELLO_EXCHANGE_TIMEOUT`]. Over
    /// TCP, client and server prove to each other that they know `token`,
    /// which is never sent; over a Unix socket the token is not used.
    /// `name` is cut to [`crate::server::protocol::MAX_CLIENT_NAME`] bytes.
    pub async fn connect(
        endpoint: &Endpoint,
        token: Option<&str>,
        name: &str,
    ) -> Result<Self, ClientError> {
        Self::connect_with(endpoint, token, name, ArenaUse::Auto).await
    }

    /// [`Self::connect`], choosing whether to map the mirror's arena.
    pub async fn connect_with(
        endpoint: &Endpoint,
        token: Option<&str>,
        name: &str,
        arena: ArenaUse,
    ) -> Result<Self, ClientError> {
        // A Unix socket is protected by its file's permissions, and its
        // server never asks for a token: nothing of it goes to whatever
        // process has bound a socket at the path (a shared directory, a
        // mirror that has ended).
        let token = match endpoint {
            Endpoint::Unix(_) => None,
            Endpoint::Tcp(_) => match token.filter(|token| !token.is_empty()) {
                None => {
                    return Err(ClientError::TokenRequired {
                        endpoint: endpoint.clone(),
                    });
                }
                Some(token) if token.len() > MAX_TOKEN => {
                    return Err(ClientError::TokenTooLong(token.len()));
                }
                Some(token) => Some(token.as_bytes()),
            },
        };
        let greet = |version| {
            tokio::time::timeout(
                HELLO_EXCHANGE_TIMEOUT,
                Self::connect_and_greet(endpoint, token, name, arena, version),
            )
        };
        let timeout = |_| ClientError::HelloTimeout {
            endpoint: endpoint.clone(),
        };
        match greet(VERSION).await.map_err(timeout)? {
            // A mirror of an earlier release: once more in its version,
            // which carries the client's bytes only.
            Err(ClientError::Version(_)) => greet(OLDEST_VERSION).await.map_err(timeout)?,
            greeted => greeted,
        }
    }

    async fn connect_and_greet(
        endpoint: &Endpoint,
        token: Option<&[u8]>,
        name: &str,
        arena: ArenaUse,
        version: u16,
    ) -> Result<Self, ClientError> {
        let connect_error = |source| ClientError::Connect {
            endpoint: endpoint.clone(),
            source,
        };
        let connection: Box<dyn Connection> = match endpoint {
            Endpoint::Unix(path) => {
                Box::new(UnixStream::connect(path).await.map_err(connect_error)?)
            }
            Endpoint::Tcp(addr) => {
                let stream = TcpStream::connect(addr).await.map_err(connect_error)?;
                let _ = stream.set_nodelay(true);
                Box::new(stream)
            }
        };
        let mut client = Self {
            wire: frame(connection),
            events: VecDeque::new(),
            server: String::new(),
            version,
            arena: None,
        };
        let client_nonce = new_nonce()?;
        client
            .send(&ClientFrame::Hello {
                version,
                name: client_name(name).to_owned(),
                nonce: client_nonce,
            })
            .await?;
        let unknown = || ClientError::ServerUnknown {
            endpoint: endpoint.clone(),
        };
        let server = match (token, client.hello_answer(endpoint).await?) {
            (None, ServerFrame::Welcome { server, .. }) => server,
            (None, ServerFrame::Challenge { .. }) => {
                return Err(ClientError::Unexpected(
                    "a challenge on a Unix socket, where a mirror never asks for the token: it is not the mirror you meant".into(),
                ));
            }
            (Some(token), ServerFrame::Challenge { nonce, proof }) => {
                if !server_proof_holds(token, &client_nonce, &nonce, &proof) {
                    return Err(unknown());
                }
                client
                    .send(&ClientFrame::Auth {
                        proof: client_proof(token, &nonce, &client_nonce),
                    })
                    .await?;
                match client.hello_answer(endpoint).await? {
                    ServerFrame::Welcome { server, .. } => server,
                    other => return Err(ClientError::Unexpected(format!("{other:?}"))),
                }
            }
            // A welcome without a challenge: that server proved nothing.
            (Some(_), ServerFrame::Welcome { .. }) => return Err(unknown()),
            (_, other) => return Err(ClientError::Unexpected(format!("{other:?}"))),
        };
        client.server = printable(&server).into_owned();
        if arena == ArenaUse::Auto && client.wire.get_ref().unix().is_some() {
            client.map_arena().await?;
        }
        Ok(client)
    }

    /// Asks for the mirror's arena and maps it; a mirror that does not
    /// offer it answers `ERROR(9)`, and data keeps coming as bytes.
    async fn map_arena(&mut self) -> Result<(), ClientError> {
        self.send(&ClientFrame::MapArena).await?;
        // Nothing is subscribed yet: the answer is the next frame, and the
        // descriptor comes with its first byte, which must be read with
        // recvmsg (a plain read would drop the descriptor).
        if !self.wire.read_buffer().is_empty() {
            return Err(ClientError::Unexpected(
                "frames before the answer to MAP_ARENA".into(),
            ));
        }
        let fd = self.receive_with_fd().await?;
        match self.read_frame().await?.ok_or(ClientError::Closed)? {
            ServerFrame::Arena { size, share } => {
                let fd = fd.ok_or_else(|| {
                    ClientError::Unexpected("an arena without its descriptor".into())
                })?;
                self.arena = Some(ClientArena {
                    view: ArenaView::map(fd, size)?,
                    credits: Arc::new(Credits::new(share)),
                });
                Ok(())
            }
            ServerFrame::Error {
                code: ErrorCode::NoArena,
                ..
            } => Ok(()),
            ServerFrame::Error { code, message, .. } => {
                Err(ClientError::from_error_frame(code, message))
            }
            other => Err(ClientError::Unexpected(format!(
                "{other:?} in answer to MAP_ARENA"
            ))),
        }
    }

    /// Reads what the socket holds into the frame buffer, with the
    /// descriptor that came with it, if any.
    async fn receive_with_fd(&mut self) -> Result<Option<OwnedFd>, ClientError> {
        let mut buffer = vec![0u8; 4096];
        let mut control = nix::cmsg_space!([RawFd; 1]);
        let socket = self
            .wire
            .get_ref()
            .unix()
            .ok_or_else(|| ClientError::Unexpected("no Unix socket".into()))?;
        let (read, fd) = socket
            .async_io(Interest::READABLE, || {
                let mut iov = [IoSliceMut::new(&mut buffer)];
                let message = recvmsg::<()>(
                    socket.as_raw_fd(),
                    &mut iov,
                    Some(&mut control),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                )
                .map_err(io::Error::from)?;
                let mut fd = None;
                // A truncated control message still closes what it held.
                if let Ok(cmsgs) = message.cmsgs() {
                    for cmsg in cmsgs {
                        if let ControlMessageOwned::ScmRights(fds) = cmsg {
                            for raw in fds {
                                // SAFETY: the kernel just gave us this
                                // descriptor; nothing else owns it.
                                let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                                fd.get_or_insert(owned);
                            }
                        }
                    }
                }
                Ok((message.bytes, fd))
            })
            .await?;
        if read == 0 {
            return Err(ClientError::Closed);
        }
        self.wire
            .read_buffer_mut()
            .extend_from_slice(&buffer[..read]);
        Ok(fd)
    }

    /// Whether the mirror's arena is mapped (data arrives as references).
    pub fn uses_arena(&self) -> bool {
        self.arena.is_some()
    }

    /// The server's answer during the hello, which holds no stream event.
    async fn hello_answer(&mut self, endpoint: &Endpoint) -> Result<ServerFrame, ClientError> {
        match self.read().await?.ok_or(ClientError::Closed)? {
            // A mirror of version 1 reads a hello of version 2 or 3 as
            // malformed.
            ServerFrame::Error {
                code: ErrorCode::BadFrame,
                message,
                ..
            } => Err(ClientError::HelloRefused {
                endpoint: endpoint.clone(),
                message: printable(&message).into_owned(),
            }),
            ServerFrame::Error { code, message, .. } => {
                Err(ClientError::from_error_frame(code, message))
            }
            frame @ (ServerFrame::Challenge { .. } | ServerFrame::Welcome { .. }) => Ok(frame),
            other => Err(ClientError::Unexpected(format!(
                "{other:?} before the welcome"
            ))),
        }
    }

    /// How the server described itself.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The protocol version of the session: [`VERSION`], or
    /// [`OLDEST_VERSION`] with a mirror of an earlier release (which sends
    /// the client's bytes only).
    pub fn version(&self) -> u16 {
        self.version
    }

    pub async fn subscribe(&mut self, ports: &[u16]) -> Result<(), ClientError> {
        self.request_ok(&ClientFrame::Subscribe {
            ports: ports.to_vec(),
        })
        .await
    }

    pub async fn unsubscribe(&mut self, ports: &[u16]) -> Result<(), ClientError> {
        self.request_ok(&ClientFrame::Unsubscribe {
            ports: ports.to_vec(),
        })
        .await
    }

    pub async fn add_port(&mut self, port: u16) -> Result<(), ClientError> {
        self.request_ok(&ClientFrame::AddPort { port }).await
    }

    pub async fn remove_port(&mut self, port: u16) -> Result<(), ClientError> {
        self.request_ok(&ClientFrame::RemovePort { port }).await
    }

    pub async fn list_ports(&mut self) -> Result<Vec<PortInfo>, ClientError> {
        self.send(&ClientFrame::ListPorts).await?;
        match self.answer().await? {
            ServerFrame::Ports { ports } => Ok(ports),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Every counter of the mirror, as JSON.
    pub async fn stats(&mut self) -> Result<serde_json::Value, ClientError> {
        self.send(&ClientFrame::Stats).await?;
        match self.answer().await? {
            ServerFrame::Stats { json } => serde_json::from_str(&json)
                .map_err(|e| ClientError::Unexpected(format!("stats that are not JSON: {e}"))),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// The next stream event; `None` when the mirror closed the connection.
    pub async fn next_event(&mut self) -> Result<Option<StreamEvent>, ClientError> {
        if let Some(event) = self.events.pop_front() {
            return Ok(Some(event));
        }
        match self.read().await? {
            None => Ok(None),
            Some(frame) => match frame {
                ServerFrame::Error { code, message, .. } => {
                    Err(ClientError::from_error_frame(code, message))
                }
                ServerFrame::Event(event) => Ok(Some(event)),
                _ => Err(ClientError::Unexpected("an answer to no request".into())),
            },
        }
    }

    async fn request_ok(&mut self, request: &ClientFrame) -> Result<(), ClientError> {
        self.send(request).await?;
        match self.answer().await? {
            ServerFrame::Ok => Ok(()),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    async fn send(&mut self, frame: &ClientFrame) -> Result<(), ClientError> {
        let mut buf = BytesMut::new();
        frame.encode(&mut buf);
        self.wire.send(buf.freeze()).await?;
        Ok(())
    }

    /// The next frame, references turned into data events; returns the
    /// references done with before it waits, and in batches meanwhile.
    async fn read(&mut self) -> Result<Option<ServerFrame>, ClientError> {
        let Some(arena) = &self.arena else {
            return self.read_frame().await;
        };
        let credits = Arc::clone(&arena.credits);
        let frame = loop {
            if let Some(frame) = self.wire.next().now_or_never() {
                break frame;
            }
            self.return_credits(true).await;
            tokio::select! {
                frame = self.wire.next() => break frame,
                () = credits.ready.notified() => {}
            }
        };
        let frame = match frame {
            None => return Ok(None),
            Some(bytes) => ServerFrame::decode_shared(bytes?.freeze())?,
        };
        self.return_credits(false).await;
        match frame {
            ServerFrame::DataRef {
                conn,
                dir,
                peer_acked,
                offset,
                len,
            } => {
                let guard = credits.issue(len);
                let arena = self.arena.as_ref().expect("checked above");
                let bytes = arena.view.bytes(offset, len, guard).ok_or_else(|| {
                    ClientError::Unexpected(format!(
                        "a reference to {len} bytes at {offset}, outside the arena of {} bytes",
                        arena.view.size()
                    ))
                })?;
                Ok(Some(ServerFrame::Event(StreamEvent::Data {
                    peer_acked,
                    conn,
                    bytes,
                    dir,
                })))
            }
            frame => Ok(Some(frame)),
        }
    }

    async fn read_frame(&mut self) -> Result<Option<ServerFrame>, ClientError> {
        match self.wire.next().await {
            None => Ok(None),
            Some(bytes) => Ok(Some(ServerFrame::decode_shared(bytes?.freeze())?)),
        }
    }

    /// Returns the references done with: all, or those worth a `CREDIT`.
    /// A connection that fails here is reported by the next read, after
    /// the frames the mirror sent before it closed.
    async fn return_credits(&mut self, all: bool) {
        let Some(arena) = &self.arena else {
            return;
        };
        let count = arena.credits.take(all);
        if count > 0 {
            let _ = self.send(&ClientFrame::Credit { count }).await;
        }
    }

    /// The answer to the last request; events that come first are queued.
    async fn answer(&mut self) -> Result<ServerFrame, ClientError> {
        loop {
            let frame = self.read().await?.ok_or(ClientError::Closed)?;
            if let ServerFrame::Error { code, message, .. } = frame {
                return Err(ClientError::from_error_frame(code, message));
            }
            match frame {
                ServerFrame::Event(event) => self.events.push_back(event),
                answer => return Ok(answer),
            }
        }
    }
}

/// Why a token file cannot be used (each message names the file).
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot open the token file {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the token file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("the token file {path} is not a regular file: give a file that holds the token")]
    NotAFile { path: String },
    #[error(
        "the token file {path} may be read by group or others (mode {mode:03o}): a token is a secret, run `chmod 600 {path}`"
    )]
    Exposed { path: String, mode: u32 },
    #[error(
        "the token file {path} belongs to another user (uid {uid}), who can read or change the token: use a file of root or of the user running this command"
    )]
    OtherOwner { path: String, uid: u32 },
    #[error(
        "the token file {path} holds no token: write one into it (e.g. `head -c 32 /dev/urandom | base64 > {path}`)"
    )]
    Empty { path: String },
    #[error(
        "the token in {path} is longer than {MAX_TOKEN} bytes, the most the mirror accepts: write a shorter one"
    )]
    TooLong { path: String },
    #[error("the token in {path} is not UTF-8 text: write a text token")]
    NotText { path: String },
}

/// Reads a token file: its content without surrounding whitespace, at most
/// [`MAX_TOKEN`] bytes. The server (`mirror run`) and the clients apply the
/// same rules: the file must be a regular file of root or of this process's
/// user, readable by its owner alone, and hold a token.
pub fn read_token(path: &Path) -> Result<String, TokenError> {
    let shown = || path.display().to_string();
    // Non-blocking: opening a FIFO put in the token's place does not wait
    // for a writer (the type check below then refuses it).
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|source| TokenError::Open {
            path: shown(),
            source,
        })?;
    // The opened file's own metadata: a path looked up again could be
    // another file by then.
    let meta = file.metadata().map_err(|source| TokenError::Read {
        path: shown(),
        source,
    })?;
    if !meta.is_file() {
        return Err(TokenError::NotAFile { path: shown() });
    }
    // Owner-only means nothing if the owner is someone else: a token file
    // planted where the mirror's was to be written is known to its owner.
    if meta.uid() != 0 && meta.uid() != nix::unistd::Uid::effective().as_raw() {
        return Err(TokenError::OtherOwner {
            path: shown(),
            uid: meta.uid(),
        });
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(TokenError::Exposed {
            path: shown(),
            mode,
        });
    }
    // Room for the longest token, surrounding whitespace, and one byte
    // more to tell a token that is too long.
    let limit = MAX_TOKEN + 64;
    let mut bytes = Vec::with_capacity(limit);
    file.take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| TokenError::Read {
            path: shown(),
            source,
        })?;
    if bytes.len() > limit {
        return Err(TokenError::TooLong { path: shown() });
    }
    let text = String::from_utf8(bytes).map_err(|_| TokenError::NotText { path: shown() })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(TokenError::Empty { path: shown() });
    }
    if token.len() > MAX_TOKEN {
        return Err(TokenError::TooLong { path: shown() });
    }
    Ok(token.to_owned())
}

#[cfg(test)]
mod tests {
    use std::{fs, path::PathBuf};

    use super::*;
    use crate::server::protocol::NONCE_LEN;

    fn token_file(dir: &Path, name: &str, content: &[u8], mode: u32) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, content).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn token_files_must_be_secret_and_hold_a_token() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let good = token_file(d, "good", b"  s3cret\n", 0o600);
        assert_eq!(read_token(&good).unwrap(), "s3cret");
        let owner_only = token_file(d, "ro", b"s3cret", 0o400);
        assert_eq!(read_token(&owner_only).unwrap(), "s3cret");
        let longest = token_file(d, "longest", &[b'x'; MAX_TOKEN], 0o600);
        assert_eq!(read_token(&longest).unwrap().len(), MAX_TOKEN);

        for mode in [0o640, 0o604, 0o660, 0o644, 0o601] {
            let path = token_file(d, &format!("m{mode:o}"), b"s3cret", mode);
            let error = read_token(&path).unwrap_err();
            assert!(matches!(error, TokenError::Exposed { .. }), "{mode:o}");
            let message = error.to_string();
            assert!(
                message.contains(&format!("chmod 600 {}", path.display())),
                "{message}"
            );
        }
        for (name, content) in [("empty", &b""[..]), ("blank", b" \n\t\n")] {
            let path = token_file(d, name, content, 0o600);
            assert!(
                matches!(read_token(&path), Err(TokenError::Empty { .. })),
                "{name}"
            );
        }
        // Longer than the mirror accepts: refused, never cut.
        let long = token_file(d, "long", &[b'x'; MAX_TOKEN + 1], 0o600);
        assert!(matches!(read_token(&long), Err(TokenError::TooLong { .. })));
        let huge = token_file(d, "huge", &vec![b'x'; 1 << 20], 0o600);
        assert!(matches!(read_token(&huge), Err(TokenError::TooLong { .. })));
        let binary = token_file(d, "binary", b"\xff\xfe", 0o600);
        assert!(matches!(
            read_token(&binary),
            Err(TokenError::NotText { .. })
        ));
        assert!(matches!(
            read_token(&d.join("missing")),
            Err(TokenError::Open { .. })
        ));
        assert!(matches!(read_token(d), Err(TokenError::NotAFile { .. })));
        // Owner-only, but the owner is someone else: they know the token.
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped the rest: only root can plant another user's file");
            return;
        }
        let planted = token_file(d, "planted", b"s3cret", 0o600);
        std::os::unix::fs::chown(&planted, Some(65534), Some(65534)).unwrap();
        assert!(matches!(
            read_token(&planted),
            Err(TokenError::OtherOwner { uid: 65534, .. })
        ));
    }

    #[test]
    fn a_fifo_in_place_of_a_token_file_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // No writer ever comes: a blocking open would wait forever.
        assert!(matches!(
            read_token(&fifo),
            Err(TokenError::NotAFile { .. })
        ));
    }

    #[test]
    fn a_symlink_is_judged_by_the_file_it_names() {
        let dir = tempfile::tempdir().unwrap();
        let exposed = token_file(dir.path(), "exposed", b"s3cret", 0o644);
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&exposed, &link).unwrap();
        assert!(matches!(read_token(&link), Err(TokenError::Exposed { .. })));
    }

    const TOKEN: &str = "the-right-token";

    /// Everything a fake server received on its connection, until the
    /// client closed it.
    struct Recorded {
        bytes: Vec<u8>,
    }

    impl Recorded {
        /// The frames received; panics if the bytes are not whole frames.
        fn frames(&self) -> Vec<ClientFrame> {
            let mut frames = Vec::new();
            let mut rest = &self.bytes[..];
            while !rest.is_empty() {
                let length = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
                frames.push(ClientFrame::decode(&rest[4..4 + length]).expect("a client frame"));
                rest = &rest[4 + length..];
            }
            frames
        }

        /// Nothing received holds the token or anything derived from it:
        /// one `Hello` (a version, a name and a random nonce), and nothing
        /// else.
        fn assert_nothing_of_the_token(&self) {
            let token = TOKEN.as_bytes();
            assert!(
                !self.bytes.windows(token.len()).any(|w| w == token),
                "the token itself was sent"
            );
            match &self.frames()[..] {
                [ClientFrame::Hello { version, name, .. }] => {
                    assert_eq!((*version, name.as_str()), (VERSION, "victim"));
                }
                other => panic!("only a hello may reach a fake server: {other:?}"),
            }
        }
    }

    /// Accepts one connection, sends `answer` (whole frames, length
    /// first) once the client's first frame arrived, and records every
    /// byte until the client closes.
    async fn fake_tcp_server(
        answer: impl FnOnce(&ClientFrame) -> Vec<u8> + Send + 'static,
    ) -> (Endpoint, tokio::task::JoinHandle<Recorded>) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = Endpoint::Tcp(listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let length = stream.read_u32().await.unwrap() as usize;
            let mut hello = vec![0; length];
            stream.read_exact(&mut hello).await.unwrap();
            let mut bytes = (length as u32).to_be_bytes().to_vec();
            bytes.extend_from_slice(&hello);
            let reply = answer(&ClientFrame::decode(&hello).expect("a client frame"));
            stream.write_all(&reply).await.unwrap();
            tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut bytes))
                .await
                .expect("the client closes the connection")
                .expect("read until the end");
            Recorded { bytes }
        });
        (endpoint, task)
    }

    /// Connects to a fake server that answers with `answer`: the client
    /// must refuse it, and the fake server must have received nothing of
    /// the token. Returns the fake server's address and the refusal.
    async fn refused_by_fake_server(
        answer: impl FnOnce(&ClientFrame) -> Vec<u8> + Send + 'static,
    ) -> (Endpoint, ClientError) {
        let (endpoint, fake) = fake_tcp_server(answer).await;
        let error = Client::connect(&endpoint, Some(TOKEN), "victim")
            .await
            .err()
            .expect("refused");
        fake.await.unwrap().assert_nothing_of_the_token();
        (endpoint, error)
    }

    fn framed(frame: &ServerFrame) -> Vec<u8> {
        let mut out = BytesMut::new();
        let payload = frame.encode_wire(VERSION, &mut out);
        assert!(payload.is_none());
        out.to_vec()
    }

    /// A mirror of the release before version 3 refuses a version 3 hello
    /// with `ERROR(2)`: the client says hello once more in version 2, and
    /// reads its stream frames as the client's bytes.
    #[tokio::test]
    async fn a_version_2_mirror_is_greeted_again_in_version_2() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let old_mirror = tokio::spawn(async move {
            let mut hellos = Vec::new();
            for _ in 0..2 {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut length = [0u8; 4];
                stream.read_exact(&mut length).await.unwrap();
                let mut hello = vec![0u8; u32::from_be_bytes(length) as usize];
                stream.read_exact(&mut hello).await.unwrap();
                let Ok(ClientFrame::Hello { version, .. }) = ClientFrame::decode(&hello) else {
                    panic!("a hello: {hello:?}");
                };
                hellos.push(version);
                if version != 2 {
                    let refusal = framed(&ServerFrame::Error {
                        code: ErrorCode::UnsupportedVersion,
                        fatal: true,
                        message: format!(
                            "this mirror speaks protocol version 2, the client {version}: use a client of the mirror's release"
                        ),
                    });
                    stream.write_all(&refusal).await.unwrap();
                    continue;
                }
                let mut answer = framed(&ServerFrame::Welcome {
                    version: 2,
                    server: "old".into(),
                });
                // OPENED and DATA as version 2 has them.
                answer.extend_from_slice(&[0, 0, 0, 24, 0x82, 0, 0, 0, 0, 0, 0, 0, 1]);
                answer.extend_from_slice(&[4, 127, 0, 0, 1, 0x9c, 0x40, 4, 127, 0, 0, 1, 0, 80, 0]);
                answer.extend_from_slice(&[0, 0, 0, 14, 0x83, 0, 0, 0, 0, 0, 0, 0, 1]);
                answer.extend_from_slice(b"GET /");
                stream.write_all(&answer).await.unwrap();
                let mut rest = Vec::new();
                let _ = stream.read_to_end(&mut rest).await;
            }
            hellos
        });
        let endpoint = Endpoint::Unix(path);
        let mut client = Client::connect_with(&endpoint, None, "tail", ArenaUse::Never)
            .await
            .expect("served in version 2");
        assert_eq!((client.version(), client.server()), (2, "old"));
        assert!(matches!(
            client.next_event().await.unwrap(),
            Some(StreamEvent::Opened { conn: 1, .. })
        ));
        assert_eq!(
            client.next_event().await.unwrap(),
            Some(StreamEvent::Data {
                conn: 1,
                dir: crate::flow::model::Direction::Client,
                bytes: bytes::Bytes::from_static(b"GET /"),
                peer_acked: 0,
            })
        );
        drop(client);
        assert_eq!(old_mirror.await.unwrap(), [VERSION, 2]);
    }

    #[tokio::test]
    async fn a_fake_server_gets_nothing_of_the_token_and_is_refused() {
        // A random challenge: the fake server cannot make the proof.
        let (endpoint, error) = refused_by_fake_server(|_| {
            framed(&ServerFrame::Challenge {
                nonce: new_nonce().unwrap(),
                proof: new_nonce().unwrap(),
            })
        })
        .await;
        assert_eq!(
            error.to_string(),
            format!(
                "the server at {endpoint} does not know the token: it is not the mirror you meant, or it was started with another token file"
            )
        );
    }

    #[tokio::test]
    async fn a_replayed_challenge_or_a_welcome_without_one_is_refused() {
        // A challenge a real mirror made for another connection (another
        // client nonce), replayed.
        let (_, refused) = refused_by_fake_server(|_| {
            let (old_client_nonce, server_nonce) = ([7; NONCE_LEN], [9; NONCE_LEN]);
            framed(&ServerFrame::Challenge {
                nonce: server_nonce,
                proof: crate::server::protocol::server_proof(
                    TOKEN.as_bytes(),
                    &old_client_nonce,
                    &server_nonce,
                ),
            })
        })
        .await;
        assert!(
            matches!(refused, ClientError::ServerUnknown { .. }),
            "{refused:?}"
        );
        // A welcome at once: that server proved nothing.
        let (_, refused) = refused_by_fake_server(|_| {
            framed(&ServerFrame::Welcome {
                version: VERSION,
                server: "fake".into(),
            })
        })
        .await;
        assert!(
            matches!(refused, ClientError::ServerUnknown { .. }),
            "{refused:?}"
        );
    }

    #[tokio::test]
    async fn a_server_that_knows_the_token_gets_a_proof_for_its_challenge_only() {
        use crate::server::protocol::{client_proof_holds, server_proof};
        let server_nonce = [0x42; NONCE_LEN];
        let (endpoint, server) = fake_tcp_server(move |hello| {
            let ClientFrame::Hello { nonce, .. } = hello else {
                panic!("a hello first: {hello:?}");
            };
            let mut reply = framed(&ServerFrame::Challenge {
                nonce: server_nonce,
                proof: server_proof(TOKEN.as_bytes(), nonce, &server_nonce),
            });
            reply.extend(framed(&ServerFrame::Welcome {
                version: VERSION,
                server: "knows the token".into(),
            }));
            reply
        })
        .await;
        let client = Client::connect(&endpoint, Some(TOKEN), "victim")
            .await
            .expect("served");
        assert_eq!(client.server(), "knows the token");
        drop(client);
        let recorded = server.await.unwrap();
        assert!(
            !recorded
                .bytes
                .windows(TOKEN.len())
                .any(|w| w == TOKEN.as_bytes())
        );
        match &recorded.frames()[..] {
            [
                ClientFrame::Hello { nonce, .. },
                ClientFrame::Auth { proof },
            ] => assert!(client_proof_holds(
                TOKEN.as_bytes(),
                &server_nonce,
                nonce,
                proof
            )),
            other => panic!("a hello and an auth: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_silent_server_fails_the_client_within_the_timeout() {
        // Connections complete in the kernel's backlog; nothing accepts or
        // answers them.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = Endpoint::Tcp(listener.local_addr().unwrap());
        let started = std::time::Instant::now();
        let outcome = tokio::time::timeout(
            HELLO_EXCHANGE_TIMEOUT + Duration::from_secs(5),
            Client::connect(&endpoint, Some(TOKEN), "victim"),
        )
        .await
        .expect("the client gives up by itself");
        let elapsed = started.elapsed();
        let error = outcome.err().expect("no hello, no client");
        assert!(matches!(error, ClientError::HelloTimeout { .. }), "{error}");
        assert!(error.to_string().contains("within 5 s"), "{error}");
        assert!(
            elapsed >= HELLO_EXCHANGE_TIMEOUT - Duration::from_millis(50)
                && elapsed < HELLO_EXCHANGE_TIMEOUT + Duration::from_secs(1),
            "{elapsed:?}"
        );
        drop(listener);
    }

    #[tokio::test]
    async fn nothing_of_the_token_goes_to_a_unix_socket() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        // Whatever listens at the path asks for a proof, as a TCP mirror
        // would.
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let length = stream.read_u32().await.unwrap() as usize;
            let mut bytes = (length as u32).to_be_bytes().to_vec();
            let mut hello = vec![0; length];
            stream.read_exact(&mut hello).await.unwrap();
            bytes.extend_from_slice(&hello);
            let challenge = framed(&ServerFrame::Challenge {
                nonce: [1; NONCE_LEN],
                proof: [2; NONCE_LEN],
            });
            stream.write_all(&challenge).await.unwrap();
            stream.read_to_end(&mut bytes).await.unwrap();
            Recorded { bytes }
        });
        let refused = Client::connect(&Endpoint::Unix(path), Some(TOKEN), "victim").await;
        assert!(
            matches!(refused, Err(ClientError::Unexpected(_))),
            "{:?}",
            refused.err()
        );
        server.await.unwrap().assert_nothing_of_the_token();
    }

    #[test]
    fn references_are_credited_in_order_once_done_with() {
        let credits = Arc::new(Credits::new(8 << 20));
        let guards: Vec<CreditGuard> = (0..3).map(|_| credits.issue(1000)).collect();
        let mut guards = guards.into_iter();
        let (first, second, third) = (
            guards.next().unwrap(),
            guards.next().unwrap(),
            guards.next().unwrap(),
        );
        drop(second);
        assert_eq!(credits.take(true), 0, "the oldest is still held");
        drop(first);
        assert_eq!(credits.take(false), 0, "two are not worth a frame alone");
        assert_eq!(credits.take(true), 2);
        assert_eq!(credits.take(true), 0, "returned once");
        drop(third);
        assert_eq!(credits.take(true), 1);
        // A batch is worth a frame on its own: by count, or by bytes.
        for _ in 0..CREDIT_BATCH {
            drop(credits.issue(1));
        }
        assert_eq!(credits.take(false), CREDIT_BATCH);
        drop(credits.issue(1 << 20));
        assert_eq!(credits.take(false), 1);
    }
}

//! One client session: the hello (over TCP a mutual challenge on the
//! token), then requests answered in order between the stream events of
//! the ports it subscribed. A connection takes a client slot
//! (`--max-clients`) only once its hello passed; until then it is one of
//! at most [`MAX_AWAITING_HELLO`] per listening address, for at most
//! [`HELLO_TIMEOUT`].

use std::{
    collections::VecDeque,
    io,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::BytesMut;
use parking_lot::Mutex;
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch},
    time::Instant,
};
use tokio_util::codec::Framed;

use crate::{
    arena::Arena,
    control::{
        PortRequest, Request,
        ports::{PolicyError, SessionId},
    },
    fanout::{counters::ConsumerCounters, hub::Hub, subscription::Subscription},
    flow::model::StreamEvent,
    server::{
        ServerConfig, ServerCounters,
        protocol::{
            ClientFrame, ErrorCode, FRAME_BUFFER, MAX_FRAME, MAX_HELLO_FRAME, Nonce,
            OLDEST_VERSION, ServerFrame, VERSION, client_name, client_proof_holds, codec,
            hello_version, new_nonce, server_proof, speaks,
        },
        shared::{SharedPayloads, client_share},
        wire::{Connection, SessionWire},
    },
    text::printable,
};

/// A connection must have sent its whole hello (over TCP, its answer to
/// the challenge too) this long after it was accepted; a client says hello
/// at once, and a connection that waits holds a place among the
/// [`MAX_AWAITING_HELLO`].
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(3);

/// Connections of one listening address that may wait for their hello at
/// once. One more makes the oldest go (it had the longest to say hello): a
/// client that says hello as it connects gets served while a flood of
/// silent connections lasts, unless that flood opens this many connections
/// in the time its hello takes to arrive. Each address has its own, so that
/// connections to a TCP listener never push out a local client.
pub const MAX_AWAITING_HELLO: usize = 16;

/// What every session needs.
#[derive(Clone)]
pub struct SessionContext {
    pub control: mpsc::Sender<Request>,
    pub hub: Arc<Hub>,
    pub stats: Arc<ServerCounters>,
    pub config: Arc<ServerConfig>,
    /// The payload arena, offered to local clients; `None`: every client
    /// gets bytes.
    pub arena: Option<Arena>,
}

/// Referenced payload worth waking a client for: frames that only refer
/// to the arena are written once this much is referenced (or an eighth of
/// the client's share, if less: it can return only what it received), or
/// [`REFERENCE_DELAY`] after the first of them, rather than one write
/// per event (a reference frame is 34 bytes, 25 in version 2; each write
/// wakes the client).
pub const REFERENCE_BATCH: usize = 4 << 20;

/// The longest a reference waits for others to go with it.
pub const REFERENCE_DELAY: Duration = Duration::from_millis(2);

/// A connection just accepted.
pub(super) struct Accepted {
    pub(super) connection: Box<dyn Connection>,
    /// TCP listeners check the token.
    pub(super) needs_token: bool,
    pub(super) at: Instant,
    pub(super) ticket: HelloTicket,
}

/// The connections of one listening address that wait for their hello,
/// oldest first, each with the way to tell it to go.
#[derive(Default)]
pub(super) struct AwaitingHello(Mutex<AwaitingQueue>);

#[derive(Default)]
struct AwaitingQueue {
    next: u64,
    waiting: VecDeque<(u64, oneshot::Sender<()>)>,
}

impl AwaitingHello {
    /// A place for a new connection; when [`MAX_AWAITING_HELLO`] wait
    /// already, the oldest is told to go.
    pub(super) fn admit(self: &Arc<Self>, stats: &Arc<ServerCounters>) -> HelloTicket {
        let (evict, evicted) = oneshot::channel();
        let mut queue = self.0.lock();
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
pub(super) struct HelloTicket {
    awaiting: Arc<AwaitingHello>,
    id: u64,
    /// Completes when a newer connection took the place.
    evicted: oneshot::Receiver<()>,
    stats: Arc<ServerCounters>,
}

impl Drop for HelloTicket {
    fn drop(&mut self) {
        let mut queue = self.awaiting.0.lock();
        queue.waiting.retain(|(id, _)| *id != self.id);
        self.stats.awaiting_hello.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A client's place among the `--max-clients`; given back when dropped.
struct ClientSlot {
    _permit: OwnedSemaphorePermit,
    stats: Arc<ServerCounters>,
}

impl ClientSlot {
    fn take(clients: &Arc<Semaphore>, stats: &Arc<ServerCounters>) -> Option<Self> {
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

type Wire = SessionWire;

fn error(code: ErrorCode, fatal: bool, message: impl Into<String>) -> ServerFrame {
    ServerFrame::Error {
        code,
        fatal,
        message: message.into(),
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
    /// Returned references it never held.
    BadCredit,
}

pub(super) async fn session(
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
    let mut outbox = Outbox::default();
    let end = match hello(&mut wire, greeting, &context, shutdown.clone()).await {
        Ok((name, version, slot)) => {
            tracing::info!(session = id, client = %printable(&name), version, "client connected");
            let end = serve_session(
                &mut wire,
                id,
                &name,
                version,
                &context,
                &mut outbox,
                shutdown.clone(),
            )
            .await;
            let _ = context
                .control
                .send(Request::Ports(PortRequest::EndSession { session: id }))
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
        End::BadCredit => &stats.bad_credits,
        End::Client => return,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    linger(&mut wire, &context, outbox, shutdown).await;
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
/// [`crate::server::protocol::MAX_CLIENT_NAME`] bytes), the protocol
/// version it speaks, and its client slot.
async fn hello(
    wire: &mut Wire,
    greeting: Greeting<'_>,
    context: &SessionContext,
    shutdown: watch::Receiver<bool>,
) -> Result<(String, u16, ClientSlot), End> {
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
    let (name, version) = match outcome {
        Ok(hello) => hello,
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
    wire.set_version(version);
    let welcome = ServerFrame::Welcome {
        version,
        server: context.config.name.clone(),
    };
    send(wire, context, &welcome).await?;
    Ok((client_name(&name).to_owned(), version, slot))
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
/// (docs/protocol.md, "Authentication"). Returns the client's name and
/// version.
async fn greet(
    wire: &mut Wire,
    needs_token: bool,
    deadline: Instant,
    ticket: &mut HelloTicket,
    context: &SessionContext,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(String, u16), Refusal> {
    let first = read_before_welcome(wire, deadline, ticket, &mut shutdown, End::Client).await?;
    // Read before the rest of the frame, whose layout depends on it.
    if let Some(version) = hello_version(&first)
        && !speaks(version)
    {
        let message = format!(
            "this mirror speaks protocol versions {OLDEST_VERSION} to {VERSION}, the client {version}: use a client of the mirror's release"
        );
        return Err(Refusal::new(
            End::Refused,
            ErrorCode::UnsupportedVersion,
            message,
        ));
    }
    let (name, version, client_nonce) = match ClientFrame::decode(&first) {
        Ok(ClientFrame::Hello {
            name,
            version,
            nonce,
        }) => (name, version, nonce),
        Ok(_) => return Err(Refusal::bad_frame("the first frame must be a hello")),
        Err(decode_error) => return Err(Refusal::bad_frame(format!("bad frame: {decode_error}"))),
    };
    if !needs_token {
        return Ok((name, version));
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
            Ok((name, version))
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

/// Asks the main task for a port change (`ADD_PORT`, `REMOVE_PORT`) and
/// answers `OK`, the policy's refusal, or that the mirror is stopping.
async fn change_port(
    context: &SessionContext,
    request: impl FnOnce(oneshot::Sender<Result<(), PolicyError>>) -> PortRequest,
) -> ServerFrame {
    match ask(context, |reply| Request::Ports(request(reply))).await {
        Some(Ok(())) => ServerFrame::Ok,
        Some(Err(policy)) => policy_error(&policy),
        None => unavailable(),
    }
}

/// The answer when the main task no longer takes requests.
fn unavailable() -> ServerFrame {
    error(ErrorCode::Internal, false, "the mirror is stopping")
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
    version: u16,
    context: &SessionContext,
    outbox: &mut Outbox,
    mut shutdown: watch::Receiver<bool>,
) -> End {
    let mut subscription = context.hub.subscribe_session(id, name);
    if version < 3 {
        // Version 2 has no frame for the server's bytes.
        subscription = subscription.client_only();
    }
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
                let reply = match request {
                    ClientFrame::Credit { count } => match outbox.credit(count) {
                        Ok(()) => continue,
                        Err(message) => {
                            tracing::warn!(session = id, "{message}; disconnecting the client");
                            let _ = send(wire, context, &error(ErrorCode::BadFrame, true, message)).await;
                            return End::BadCredit;
                        }
                    },
                    ClientFrame::MapArena => match map_arena(wire, context, outbox).await {
                        Ok(None) => continue,
                        Ok(Some(refusal)) => refusal,
                        Err(end) => return end,
                    },
                    request => handle(request, id, &mut subscription, context).await,
                };
                outbox.written();
                if let Err(end) = send(wire, context, &reply).await {
                    return end;
                }
            }
            event = subscription.next(), if !subscription.is_idle() => {
                let Some(event) = event else { return End::Client };
                let idle = subscription.queued() == 0;
                if let Err(end) = write_event(wire, context, outbox, subscription.stats(), idle, event).await {
                    tracing::warn!(session = id, "client stopped reading; disconnecting it");
                    return end;
                }
            }
            () = flush_timer(outbox.flush_at), if outbox.flush_at.is_some() => {
                outbox.written();
                if let Err(end) = flush(wire, context).await {
                    tracing::warn!(session = id, "client stopped reading; disconnecting it");
                    return end;
                }
            }
            _ = shutdown.changed() => {
                // The mirror stops: deliver what is left (the hub has
                // closed every channel, so this ends), then close.
                while let Some(event) = subscription.next().await {
                    let idle = subscription.queued() == 0;
                    if write_event(wire, context, outbox, subscription.stats(), idle, event).await.is_err() {
                        break;
                    }
                }
                let _ = flush(wire, context).await;
                return End::Client;
            }
        }
    }
}

/// Completes at `at`; never without.
async fn flush_timer(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A session the server ends (a fatal error, a client too slow to read)
/// keeps the payloads its client was referred to until the client closes
/// its end (it may still be reading frames the socket held), the write
/// budget passes, or the mirror stops: until then the memory is not
/// reused under the client's reads.
async fn linger(
    wire: &mut Wire,
    context: &SessionContext,
    outbox: Outbox,
    mut shutdown: watch::Receiver<bool>,
) {
    if outbox
        .shared
        .as_ref()
        .is_none_or(|shared| shared.outstanding_bytes() == 0)
    {
        return;
    }
    let until_closed = async {
        let _ = wire.shutdown().await;
        while let Some(Ok(_)) = wire.next().await {}
    };
    tokio::select! {
        _ = tokio::time::timeout(context.config.write_timeout, until_closed) => {}
        _ = shutdown.changed() => {}
    }
    drop(outbox);
}

/// What a session has queued for its client, and what it shares of the
/// arena with it.
#[derive(Default)]
struct Outbox {
    shared: Option<SharedPayloads>,
    /// Set while only references wait to be written: when to write them.
    flush_at: Option<Instant>,
    /// Payload referenced by frames not yet written.
    referenced: usize,
}

impl Outbox {
    fn credit(&mut self, count: u32) -> Result<(), String> {
        match &mut self.shared {
            Some(shared) => shared.credit(count).map_err(|over| over.to_string()),
            None => Err("credit, but no arena was mapped".to_owned()),
        }
    }

    /// Everything queued is being written.
    fn written(&mut self) {
        self.flush_at = None;
        self.referenced = 0;
    }
}

/// Answers `MAP_ARENA`: the arena's descriptor with an `ARENA` frame
/// (`None`), or the refusal to send. From then on the client's data comes
/// as references where it can.
async fn map_arena(
    wire: &mut Wire,
    context: &SessionContext,
    outbox: &mut Outbox,
) -> Result<Option<ServerFrame>, End> {
    if outbox.shared.is_some() {
        return Ok(Some(error(
            ErrorCode::BadFrame,
            false,
            "the arena is already mapped",
        )));
    }
    let arena = match &context.arena {
        Some(arena) if wire.is_unix() => arena,
        Some(_) => {
            return Ok(Some(error(
                ErrorCode::NoArena,
                false,
                "the arena is shared over Unix sockets only",
            )));
        }
        None => {
            return Ok(Some(error(
                ErrorCode::NoArena,
                false,
                "this mirror runs without an arena (--arena-size 0)",
            )));
        }
    };
    let share = client_share(arena, context.hub.config().max_bytes);
    let shared = SharedPayloads::with_budget(arena.clone(), share);
    let frame = ServerFrame::Arena {
        size: arena.size() as u64,
        share: shared.share() as u64,
    };
    outbox.written();
    match tokio::time::timeout(
        context.config.write_timeout,
        wire.send_with_fd(&frame, arena.fd()),
    )
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return Err(End::Client),
        Err(_) => return Err(End::TooSlow),
    }
    context.stats.arena_clients.fetch_add(1, Ordering::Relaxed);
    outbox.shared = Some(shared);
    Ok(None)
}

/// Queues an event. Without the arena, writes when `idle` (no other event
/// is waiting) or when enough is queued, so a burst goes out in few
/// writes; with it, references wait for [`REFERENCE_BATCH`] bytes of
/// payload or [`REFERENCE_DELAY`].
async fn write_event(
    wire: &mut Wire,
    context: &SessionContext,
    outbox: &mut Outbox,
    stats: &ConsumerCounters,
    idle: bool,
    event: StreamEvent,
) -> Result<(), End> {
    let Some(shared) = &mut outbox.shared else {
        wire.queue(&ServerFrame::Event(event));
        if idle || wire.queued_bytes() >= FRAME_BUFFER {
            return flush(wire, context).await;
        }
        return Ok(());
    };
    let mut only_references = true;
    let mut referenced = 0;
    let was_lagging = shared.lagging();
    let lagged = shared.translate(event, |frame| {
        match &frame {
            ServerFrame::DataRef { len, .. } => referenced += *len as usize,
            _ => only_references = false,
        }
        wire.queue(&frame);
    });
    if lagged > 0 {
        stats.lags.fetch_add(1, Ordering::Relaxed);
        stats
            .lagged_connections
            .fetch_add(lagged as u64, Ordering::Relaxed);
    }
    // Once per episode: a client that stays over its share would otherwise
    // log each connection that opens meanwhile.
    if lagged > 0 && !was_lagging {
        tracing::warn!(
            consumer = %stats.name,
            connections = lagged,
            held = shared.outstanding_bytes(),
            "client holds its share of the arena; closing its connections as lagged"
        );
    }
    outbox.referenced += referenced;
    let batch = REFERENCE_BATCH.min(shared.share() / 8);
    let batch_ready = outbox.referenced >= batch || wire.queued_bytes() >= FRAME_BUFFER;
    if batch_ready || (idle && !only_references) {
        outbox.written();
        return flush(wire, context).await;
    }
    if idle && outbox.flush_at.is_none() {
        outbox.flush_at = Some(Instant::now() + REFERENCE_DELAY);
    }
    Ok(())
}

async fn handle(
    request: ClientFrame,
    id: SessionId,
    subscription: &mut Subscription,
    context: &SessionContext,
) -> ServerFrame {
    match request {
        ClientFrame::Hello { .. } => error(ErrorCode::BadFrame, false, "hello was already sent"),
        ClientFrame::Auth { .. } => error(
            ErrorCode::BadFrame,
            false,
            "auth answers a challenge, and the hello is over",
        ),
        ClientFrame::MapArena | ClientFrame::Credit { .. } => {
            error(ErrorCode::Internal, false, "answered by the session loop")
        }
        ClientFrame::Subscribe { ports } => {
            let answer = ask(context, |reply| {
                Request::Ports(PortRequest::Subscribe {
                    session: id,
                    ports,
                    reply,
                })
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
            match ask(context, |reply| {
                Request::Ports(PortRequest::Unsubscribe {
                    session: id,
                    ports,
                    reply,
                })
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
        ClientFrame::ListPorts => match ask(context, |reply| {
            Request::Ports(PortRequest::ListPorts { reply })
        })
        .await
        {
            Some(ports) => ServerFrame::Ports { ports },
            None => unavailable(),
        },
        ClientFrame::AddPort { port } => {
            change_port(context, |reply| PortRequest::AddPort { port, reply }).await
        }
        ClientFrame::RemovePort { port } => {
            change_port(context, |reply| PortRequest::RemovePort { port, reply }).await
        }
    }
}

//! The server in-process: real sockets on 127.0.0.1 and in a temporary
//! directory, a main task that answers port requests, the real client.

use std::time::Duration;

use bytes::BytesMut;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
    task::JoinHandle,
};

use std::sync::Arc;

use tokio::{
    sync::{mpsc, watch},
    task::JoinSet,
    time::Instant,
};

use super::{
    listener::{BoundListener, SHORT_TOKEN, SocketFileGuard, bind_unix, serve},
    protocol::{
        ClientFrame, ErrorCode, MAX_FRAME, MAX_HELLO_FRAME, Nonce, ServerFrame, VERSION, new_nonce,
    },
    session::{HELLO_TIMEOUT, MAX_AWAITING_HELLO, SessionContext},
    *,
};
use crate::{arena::Arena, control::Request, fanout::hub::Hub};
use crate::{
    control::ports::{AllowList, PortRegistry},
    control::{Control, PortMap},
    fanout::hub::HubConfig,
    server::client::{Client, ClientError},
    server::protocol::{
        MAX_CLIENT_NAME, MAX_TOKEN, NONCE_LEN, Proof, client_proof, server_proof_holds,
    },
    telemetry::registry::{Document, Registry},
};

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
    hub: Arc<Hub>,
    endpoint: Endpoint,
    unix: Option<(Endpoint, tempfile::TempDir)>,
    stats: Arc<ServerCounters>,
    stop: watch::Sender<bool>,
    server: JoinHandle<()>,
}

impl Harness {
    async fn start(max_clients: usize) -> Self {
        Self::start_with(max_clients, false).await
    }

    async fn start_with(max_clients: usize, with_unix: bool) -> Self {
        Self::start_full(max_clients, with_unix, None).await
    }

    async fn start_full(max_clients: usize, with_unix: bool, arena: Option<Arena>) -> Self {
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
        let stats = Arc::new(ServerCounters::default());
        let (control_tx, mut control_rx) = mpsc::channel(64);
        let registry = PortRegistry::new(&[80], AllowList::parse("9000").unwrap(), 4);
        let mut control = Control::new(registry, Arc::clone(&hub));
        let mut counters = Registry::new();
        counters.register_sections(Arc::clone(&hub));
        counters.register("server", Arc::clone(&stats));
        tokio::spawn(async move {
            while let Some(request) = control_rx.recv().await {
                match request {
                    Request::Stats { reply } => {
                        let _ = reply.send(counters.document().to_json().to_string());
                    }
                    Request::Ports(request) => control.handle(request, &mut NoMap),
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
                hub: Arc::clone(&hub),
                stats: Arc::clone(&stats),
                config: Arc::new(config),
                arena,
            },
            None,
            stop_rx,
        ));
        Self {
            hub,
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

    /// The Unix listener ([`Self::start_with`] with `with_unix`), and the
    /// path of its socket.
    fn unix(&self) -> (&Endpoint, &std::path::Path) {
        match &self.unix {
            Some((endpoint @ Endpoint::Unix(path), _)) => (endpoint, path),
            _ => unreachable!("started without a Unix listener"),
        }
    }

    async fn client(&self, name: &str) -> Result<Client, ClientError> {
        Client::connect(&self.endpoint, Some(TOKEN), name).await
    }

    fn counter(&self, name: &str) -> u64 {
        serde_json::to_value(self.stats.snapshot()).unwrap()[name]
            .as_u64()
            .unwrap_or_else(|| panic!("no server counter {name}"))
    }

    /// Waits (at most 10 s) until `done` holds.
    async fn wait_until(&self, what: &str, done: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done(self) {
            assert!(
                Instant::now() < deadline,
                "{what}: {:?}",
                self.stats.snapshot()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn stop(self) {
        // As the pipeline does: the channels end, so sessions that deliver
        // what is left before they close come to an end.
        self.hub.close_all();
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
async fn read_frame(stream: &mut (impl AsyncRead + Unpin)) -> Option<ServerFrame> {
    let mut length = [0u8; 4];
    stream.read_exact(&mut length).await.ok()?;
    let mut frame = vec![0u8; u32::from_be_bytes(length) as usize];
    stream.read_exact(&mut frame).await.ok()?;
    Some(ServerFrame::decode(&frame).expect("a well-formed frame"))
}

/// Reads until the server closes the connection; returns the frames.
async fn until_closed(stream: &mut (impl AsyncRead + Unpin), within: Duration) -> Vec<ServerFrame> {
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

/// Asserts that the server closes the connection (within `within`) after
/// one fatal error `code`.
async fn assert_ends_with(
    stream: &mut (impl AsyncRead + Unpin),
    code: ErrorCode,
    within: Duration,
) {
    let frames = until_closed(stream, within).await;
    assert_eq!(fatal_code(&frames), Some(code), "{frames:?}");
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
            crate::fanout::counters::MAX_LISTED_PORTS
        ),
        format!(
            "and {} consumers",
            crate::fanout::counters::MAX_LISTED_CONSUMERS
        ),
        format!("{} MiB ({MAX_FRAME} bytes)", MAX_FRAME >> 20),
        format!("may be at most {MAX_HELLO_FRAME} bytes long (the longest `HELLO`)"),
        format!(
            "The version in `HELLO` is {VERSION}; a server of this release also speaks {}",
            crate::server::protocol::OLDEST_VERSION
        ),
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
    assert_eq!(
        timed_out,
        MAX_AWAITING_HELLO - 1,
        "{:?}",
        server.stats.snapshot()
    );
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
    assert_ends_with(
        &mut stream,
        ErrorCode::BadFrame,
        HELLO_TIMEOUT + Duration::from_secs(2),
    )
    .await;
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
    assert_ends_with(&mut stream, ErrorCode::BadFrame, Duration::from_secs(2)).await;
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
    assert_ends_with(&mut stream, ErrorCode::BadToken, Duration::from_secs(5)).await;
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
    assert_ends_with(&mut replay, ErrorCode::BadToken, Duration::from_secs(5)).await;
    // The server's own proof sent back to it, on this connection or on
    // one whose hello carries the first connection's server nonce.
    let mut reflect = TcpStream::connect(server.addr()).await.unwrap();
    let (_, own_proof) = challenged(&mut reflect, nonce).await;
    reflect.write_all(&auth(own_proof)).await.unwrap();
    assert_ends_with(&mut reflect, ErrorCode::BadToken, Duration::from_secs(5)).await;
    let mut swapped = TcpStream::connect(server.addr()).await.unwrap();
    challenged(&mut swapped, first_server_nonce).await;
    swapped.write_all(&auth(first_server_proof)).await.unwrap();
    assert_ends_with(&mut swapped, ErrorCode::BadToken, Duration::from_secs(5)).await;
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
    assert_ends_with(
        &mut challenged_only,
        ErrorCode::TooManyClients,
        Duration::from_secs(2),
    )
    .await;
    server
        .wait_until("evicted", |s| s.counter("hello_evicted") == 1)
        .await;
    drop(silent);
    // A challenge left unanswered ends at the hello's deadline.
    let mut late = TcpStream::connect(server.addr()).await.unwrap();
    let started = Instant::now();
    challenged(&mut late, new_nonce().unwrap()).await;
    assert_ends_with(
        &mut late,
        ErrorCode::BadFrame,
        HELLO_TIMEOUT + Duration::from_secs(2),
    )
    .await;
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
    // And a newer one, in this version's layout.
    let newer = wire(&ClientFrame::Hello {
        version: VERSION + 1,
        name: "newer".to_owned(),
        nonce: [0; NONCE_LEN],
    });
    for (hello, version) in [(framed, 1), (newer, VERSION + 1)] {
        let mut stream = TcpStream::connect(server.addr()).await.unwrap();
        stream.write_all(&hello).await.unwrap();
        let frames = until_closed(&mut stream, Duration::from_secs(5)).await;
        assert_eq!(
            fatal_code(&frames),
            Some(ErrorCode::UnsupportedVersion),
            "{frames:?}"
        );
        let [ServerFrame::Error { message, .. }] = &frames[..] else {
            unreachable!("one error");
        };
        let says =
            format!("this mirror speaks protocol versions 2 to {VERSION}, the client {version}");
        assert!(message.starts_with(&says), "{message}");
    }
    assert_eq!(VERSION, 3, "version 1 is the one before the oldest spoken");
    server
        .wait_until("counted", |s| s.counter("refused") == 2)
        .await;
    assert_eq!(server.counter("bad_frames"), 0);
    server.stop().await;
}

#[tokio::test]
async fn a_unix_socket_session_has_no_challenge() {
    use tokio::net::UnixStream;
    let server = Harness::start_with(4, true).await;
    let (unix, path) = server.unix();
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
        Document::from_json(json)
            .flatten()
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
    for key in Document::from_json(&json).flatten().keys() {
        assert!(key.chars().all(|c| !c.is_control()), "{key:?}");
    }
    drop(stream);
    server.stop().await;
}

/// A welcomed raw session on TCP.
async fn welcomed(server: &Harness, name: &str) -> TcpStream {
    let mut stream = TcpStream::connect(server.addr()).await.unwrap();
    let answer = raw_hello(&mut stream, name).await;
    assert!(
        matches!(answer, Some(ServerFrame::Welcome { .. })),
        "{answer:?}"
    );
    stream
}

/// Asserts that `answer` is an error `code`, fatal or not, whose message
/// says `says`.
#[track_caller]
fn assert_error(answer: Option<ServerFrame>, code: ErrorCode, fatal: bool, says: &str) {
    match answer {
        Some(ServerFrame::Error {
            code: got,
            fatal: got_fatal,
            message,
        }) if got == code && got_fatal == fatal => {
            assert!(message.contains(says), "{message:?} should say {says:?}");
        }
        other => panic!("an error {code:?} (fatal: {fatal}): {other:?}"),
    }
}

/// Says hello again on a welcomed raw session: an error the session
/// survives (it still answers a request).
async fn hello_again(stream: &mut (impl AsyncRead + AsyncWrite + Unpin)) {
    stream
        .write_all(&hello("again", new_nonce().unwrap()))
        .await
        .unwrap();
    assert_error(
        read_frame(stream).await,
        ErrorCode::BadFrame,
        false,
        "hello was already sent",
    );
    stream.write_all(&wire(&ClientFrame::Stats)).await.unwrap();
    let answer = read_frame(stream).await;
    assert!(
        matches!(answer, Some(ServerFrame::Stats { .. })),
        "still served: {answer:?}"
    );
}

#[tokio::test]
async fn a_second_hello_is_out_of_turn_whenever_it_comes() {
    let server = Harness::start_with(4, true).await;
    // Past the welcome, on TCP: an error the session survives.
    let mut stream = welcomed(&server, "twice").await;
    hello_again(&mut stream).await;
    // The same on a Unix socket, which has no challenge.
    let mut local = tokio::net::UnixStream::connect(server.unix().1)
        .await
        .unwrap();
    local
        .write_all(&hello("local", [0; NONCE_LEN]))
        .await
        .unwrap();
    assert!(matches!(
        read_frame(&mut local).await,
        Some(ServerFrame::Welcome { .. })
    ));
    hello_again(&mut local).await;
    // In place of the answer to the challenge: the hello fails.
    let mut early = TcpStream::connect(server.addr()).await.unwrap();
    challenged(&mut early, new_nonce().unwrap()).await;
    early
        .write_all(&hello("again", new_nonce().unwrap()))
        .await
        .unwrap();
    assert_ends_with(&mut early, ErrorCode::BadFrame, Duration::from_secs(5)).await;
    server
        .wait_until("counted", |s| s.counter("bad_frames") == 1)
        .await;
    assert_eq!(server.counter("active"), 2, "the two welcomed sessions");
    assert_eq!(server.counter("refused"), 0);
    server.stop().await;
}

/// Anything but a whole hello as the first frame ends the connection with
/// a fatal error, counted, and costs the clients nothing.
#[tokio::test]
async fn a_first_frame_that_is_not_a_hello_is_refused_and_counted() {
    let server = Harness::start(1).await;
    let framed = |body: &[u8]| {
        let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(body);
        bytes
    };
    let first_frames = [
        ("a request", wire(&ClientFrame::Stats)),
        (
            "an auth",
            wire(&ClientFrame::Auth {
                proof: client_proof(TOKEN.as_bytes(), &[0; NONCE_LEN], &[0; NONCE_LEN]),
            }),
        ),
        ("an unknown type", framed(&[0x7f, 1, 2, 3])),
        (
            "a hello cut after its version",
            framed(&[0x01, 0x00, VERSION as u8]),
        ),
        ("an empty frame", framed(&[])),
    ];
    for (what, bytes) in &first_frames {
        let mut stream = TcpStream::connect(server.addr()).await.unwrap();
        stream.write_all(bytes).await.unwrap();
        let frames = until_closed(&mut stream, Duration::from_secs(5)).await;
        assert_eq!(
            fatal_code(&frames),
            Some(ErrorCode::BadFrame),
            "{what}: {frames:?}"
        );
    }
    server
        .wait_until("all counted", |s| {
            s.counter("bad_frames") == first_frames.len() as u64 && s.counter("awaiting_hello") == 0
        })
        .await;
    assert_eq!(server.counter("refused"), 0);
    assert_eq!(server.counter("active"), 0, "no client slot was taken");
    // The one client slot is free.
    let mut client = server.client("after them").await.expect("served");
    client.stats().await.expect("stats");
    server.stop().await;
}

/// Past its hello, a frame the server cannot read ends that session alone.
#[tokio::test]
async fn a_bad_frame_after_the_hello_ends_only_its_session() {
    let server = Harness::start(4).await;
    let mut bystander = server.client("bystander").await.expect("served");
    let mut unknown = welcomed(&server, "unknown type").await;
    unknown.write_all(&[0, 0, 0, 2, 0x7f, 0]).await.unwrap();
    assert_ends_with(&mut unknown, ErrorCode::BadFrame, Duration::from_secs(5)).await;
    // A frame announced longer than any the server takes: refused before
    // its body arrives.
    let mut huge = welcomed(&server, "huge").await;
    let length = (MAX_FRAME as u32 + 1).to_be_bytes();
    huge.write_all(&length).await.unwrap();
    assert_ends_with(&mut huge, ErrorCode::BadFrame, Duration::from_secs(5)).await;
    server
        .wait_until("counted", |s| {
            s.counter("bad_frames") == 2 && s.counter("active") == 1
        })
        .await;
    bystander
        .stats()
        .await
        .expect("the other session is still served");
    server.stop().await;
}

/// `--max-clients` counts welcomed clients over every listener; a refused
/// client is told the limit, and a slot that is given back serves the
/// next one.
#[tokio::test]
async fn max_clients_refuses_the_next_client_until_a_slot_is_free() {
    let server = Harness::start_with(2, true).await;
    let (unix, _) = server.unix();
    let first = server.client("first").await.expect("served");
    let mut second = Client::connect(unix, None, "second").await.expect("served");
    // Over TCP the refusal comes after the token was proved.
    let mut refused = TcpStream::connect(server.addr()).await.unwrap();
    assert_error(
        raw_hello(&mut refused, "third").await,
        ErrorCode::TooManyClients,
        true,
        "the mirror serves at most 2 clients at once",
    );
    assert!(matches!(
        Client::connect(unix, None, "fourth").await,
        Err(ClientError::TooMany(_))
    ));
    server
        .wait_until("counted", |s| s.counter("refused") == 2)
        .await;
    assert_eq!(server.counter("active"), 2);
    drop(first);
    server
        .wait_until("the first left", |s| s.counter("active") == 1)
        .await;
    let mut next = server.client("next").await.expect("served in its place");
    next.stats().await.expect("stats");
    second.stats().await.expect("still served");
    assert_eq!(server.counter("refused"), 2);
    server.stop().await;
}

mod arena {
    use bytes::Bytes;
    use tokio::net::UnixStream;

    use super::*;
    use crate::{
        arena::CHUNK,
        flow::{
            model::{CloseReason, Direction, StreamEvent},
            segment::PayloadPool,
        },
        server::client::ArenaUse,
    };

    fn opened(conn: u64) -> StreamEvent {
        StreamEvent::Opened {
            iface: Default::default(),
            conn,
            src: "198.18.0.1:40000".parse().unwrap(),
            dst: "198.18.0.2:80".parse().unwrap(),
            midstream: false,
        }
    }

    fn closed(conn: u64, reason: CloseReason) -> StreamEvent {
        StreamEvent::Closed { conn, reason }
    }

    /// A stream of `len` bytes in payloads of up to 60 000 (as GRO makes
    /// them), copied by `pool`.
    fn payloads(pool: &mut PayloadPool, conn: u64, len: usize) -> (Vec<StreamEvent>, Vec<u8>) {
        let stream: Vec<u8> = (0..len).map(|i| (i * 7 + conn as usize) as u8).collect();
        let events = stream
            .chunks(60_000)
            .map(|chunk| StreamEvent::Data {
                peer_acked: 0,
                conn,
                bytes: pool.copy(chunk),
                dir: Direction::Client,
            })
            .collect();
        (events, stream)
    }

    /// Everything `client` receives of connection `conn` until it closes.
    async fn receive(client: &mut Client, conn: u64) -> (Vec<u8>, CloseReason) {
        let mut stream = Vec::new();
        loop {
            let event = tokio::time::timeout(Duration::from_secs(10), client.next_event())
                .await
                .expect("events in time")
                .expect("no error")
                .expect("not closed");
            match event {
                StreamEvent::Data { conn: c, bytes, .. } if c == conn => {
                    stream.extend_from_slice(&bytes);
                }
                StreamEvent::Closed { conn: c, reason } if c == conn => return (stream, reason),
                _ => {}
            }
        }
    }

    /// A raw local session: hello, then `MAP_ARENA` when asked (its answer
    /// read without taking the descriptor), then a subscription to 80.
    async fn raw_session(path: &std::path::Path, map: bool) -> (UnixStream, Option<ServerFrame>) {
        let mut stream = UnixStream::connect(path).await.unwrap();
        stream
            .write_all(&hello("raw", [0; NONCE_LEN]))
            .await
            .unwrap();
        assert!(matches!(
            read_frame(&mut stream).await,
            Some(ServerFrame::Welcome { .. })
        ));
        let mut answer = None;
        if map {
            stream
                .write_all(&wire(&ClientFrame::MapArena))
                .await
                .unwrap();
            answer = read_frame(&mut stream).await;
        }
        stream
            .write_all(&wire(&ClientFrame::Subscribe { ports: vec![80] }))
            .await
            .unwrap();
        assert_eq!(read_frame(&mut stream).await, Some(ServerFrame::Ok));
        (stream, answer)
    }

    /// Receives `len` bytes of connection `conn` (or its close).
    async fn receive_some(client: &mut Client, conn: u64, len: usize) -> Vec<u8> {
        let mut stream = Vec::new();
        while stream.len() < len {
            let event = tokio::time::timeout(Duration::from_secs(10), client.next_event())
                .await
                .expect("events in time")
                .expect("no error")
                .expect("not closed");
            match event {
                StreamEvent::Data { conn: c, bytes, .. } if c == conn => {
                    stream.extend_from_slice(&bytes);
                }
                StreamEvent::Closed { conn: c, reason } if c == conn => {
                    panic!("closed {reason:?} after {} bytes", stream.len())
                }
                _ => {}
            }
        }
        stream
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn local_clients_read_the_arena_and_return_what_they_read() {
        let arena = Arena::new(64 * CHUNK).unwrap();
        let server = Harness::start_full(4, true, Some(arena.clone())).await;
        let (unix, _) = server.unix();
        let mut shared = Client::connect(unix, None, "shared").await.unwrap();
        let mut bytes = Client::connect_with(unix, None, "bytes", ArenaUse::Never)
            .await
            .unwrap();
        let mut remote = server.client("remote").await.unwrap();
        assert!(shared.uses_arena());
        assert!(!bytes.uses_arena(), "asked for none");
        assert!(!remote.uses_arena(), "TCP: never");
        for client in [&mut shared, &mut bytes, &mut remote] {
            client.subscribe(&[80]).await.unwrap();
        }
        let mut pool = PayloadPool::with_arena(arena.clone());
        // 160 MB: more than the arena, so chunks must come back to be
        // used again.
        for round in 0..32u64 {
            let (events, expected) = payloads(&mut pool, round, 5_000_000);
            let mut batch = vec![opened(round)];
            batch.extend(events);
            batch.push(closed(round, CloseReason::Fin));
            server.hub.publish(80, batch);
            for client in [&mut shared, &mut bytes, &mut remote] {
                let (stream, reason) = receive(client, round).await;
                assert_eq!(reason, CloseReason::Fin);
                assert!(stream == expected, "round {round}: the stream is exact");
            }
        }
        drop(pool);
        assert_eq!(server.counter("arena_clients"), 1);
        assert_eq!(server.counter("bad_credits"), 0);
        assert_eq!(arena.counters().fallback_payloads, 0, "chunks came back");
        // Everything read was returned: the session holds nothing.
        drop(shared);
        server
            .wait_until("the arena is free", |_| arena.counters().in_use_bytes == 0)
            .await;
        server.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_that_returns_nothing_loses_its_connections_and_no_one_else_does() {
        let arena = Arena::new(32 * CHUNK).unwrap();
        let server = Harness::start_full(4, true, Some(arena.clone())).await;
        let (unix, path) = server.unix();
        let mut good = Client::connect(unix, None, "good").await.unwrap();
        assert!(good.uses_arena());
        good.subscribe(&[80]).await.unwrap();
        let (mut hoarder, answer) = raw_session(path, true).await;
        assert_eq!(
            answer,
            Some(ServerFrame::Arena {
                size: 32 * CHUNK as u64,
                share: 8 * CHUNK as u64,
            })
        );
        let mut pool = PayloadPool::with_arena(arena.clone());
        // 12 MB in steps of 1 MB: over the hoarder's share (8 MiB), within
        // the arena; the good client returns what it read at each step.
        let (events, expected) = payloads(&mut pool, 1, 12_000_000);
        server.hub.publish(80, vec![opened(1)]);
        let mut received = Vec::new();
        for step in events.chunks(17) {
            let len: usize = step.iter().map(StreamEvent::data_len).sum();
            server.hub.publish(80, step.to_vec());
            received.extend(receive_some(&mut good, 1, len).await);
        }
        server.hub.publish(80, vec![closed(1, CloseReason::Fin)]);
        let (rest, reason) = receive(&mut good, 1).await;
        assert_eq!(reason, CloseReason::Fin);
        assert!(
            rest.is_empty() && received == expected,
            "the other client gets everything"
        );
        // The hoarder: references up to its share, then the lag.
        let mut referenced = 0u64;
        let end = loop {
            match tokio::time::timeout(Duration::from_secs(10), read_frame(&mut hoarder))
                .await
                .expect("frames in time")
            {
                Some(ServerFrame::DataRef { len, .. }) => referenced += u64::from(len),
                Some(ServerFrame::Event(StreamEvent::Opened { .. })) => {}
                other => break other,
            }
        };
        assert_eq!(
            end,
            Some(ServerFrame::Event(closed(1, CloseReason::Lagged)))
        );
        assert!(
            referenced <= 8 * CHUNK as u64 && referenced > 7 * CHUNK as u64,
            "{referenced}"
        );
        // What it holds stays held, and it still works: a credit makes
        // room for a connection that opens afterwards.
        assert!(arena.counters().in_use_bytes >= 8 * CHUNK as u64);
        hoarder
            .write_all(&wire(&ClientFrame::Credit { count: 1 }))
            .await
            .unwrap();
        hoarder.write_all(&wire(&ClientFrame::Stats)).await.unwrap();
        let Some(ServerFrame::Stats { json }) = read_frame(&mut hoarder).await else {
            panic!("stats");
        };
        let json: serde_json::Value = serde_json::from_str(&json).unwrap();
        let hoarder_stats = json["consumers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["client"] == "raw")
            .expect("the hoarder's counters");
        assert_eq!(hoarder_stats["lagged_connections"], 1);
        server.hub.publish(
            80,
            vec![
                opened(2),
                StreamEvent::Data {
                    peer_acked: 0,
                    conn: 2,
                    bytes: pool.copy(b"after"),
                    dir: Direction::Client,
                },
            ],
        );
        assert!(matches!(
            read_frame(&mut hoarder).await,
            Some(ServerFrame::Event(StreamEvent::Opened { conn: 2, .. }))
        ));
        assert!(matches!(
            read_frame(&mut hoarder).await,
            Some(ServerFrame::DataRef {
                conn: 2,
                len: 5,
                ..
            })
        ));
        server.stop().await;
    }

    #[tokio::test]
    async fn credit_for_references_never_received_closes_only_that_client() {
        let arena = Arena::new(4 * CHUNK).unwrap();
        let server = Harness::start_full(4, true, Some(arena.clone())).await;
        let (unix, path) = server.unix();
        let mut good = Client::connect(unix, None, "good").await.unwrap();
        good.subscribe(&[80]).await.unwrap();
        let (mut hostile, _) = raw_session(path, true).await;
        let mut pool = PayloadPool::with_arena(arena.clone());
        server.hub.publish(
            80,
            vec![
                opened(1),
                StreamEvent::Data {
                    peer_acked: 0,
                    conn: 1,
                    bytes: pool.copy(b"one"),
                    dir: Direction::Client,
                },
            ],
        );
        assert!(matches!(
            read_frame(&mut hostile).await,
            Some(ServerFrame::Event(StreamEvent::Opened { .. }))
        ));
        assert!(matches!(
            read_frame(&mut hostile).await,
            Some(ServerFrame::DataRef { .. })
        ));
        // One received, two returned.
        hostile
            .write_all(&wire(&ClientFrame::Credit { count: 2 }))
            .await
            .unwrap();
        assert_ends_with(&mut hostile, ErrorCode::BadFrame, Duration::from_secs(5)).await;
        server
            .wait_until("counted", |s| s.counter("bad_credits") == 1)
            .await;
        // The good client still has the bytes, and more come.
        server.hub.publish(
            80,
            vec![
                StreamEvent::Data {
                    peer_acked: 0,
                    conn: 1,
                    bytes: pool.copy(b"two"),
                    dir: Direction::Client,
                },
                closed(1, CloseReason::Fin),
            ],
        );
        let (stream, _) = receive(&mut good, 1).await;
        assert_eq!(stream, b"onetwo");
        // Credit without an arena, over a session that never mapped one.
        let (mut plain, _) = raw_session(path, false).await;
        plain
            .write_all(&wire(&ClientFrame::Credit { count: 0 }))
            .await
            .unwrap();
        assert_ends_with(&mut plain, ErrorCode::BadFrame, Duration::from_secs(5)).await;
        server.stop().await;
    }

    #[tokio::test]
    async fn a_session_the_server_ends_keeps_what_its_client_may_still_read() {
        let arena = Arena::new(4 * CHUNK).unwrap();
        let server = Harness::start_full(4, true, Some(arena.clone())).await;
        let (_, path) = server.unix();
        let (mut client, _) = raw_session(path, true).await;
        let mut pool = PayloadPool::with_arena(arena.clone());
        server.hub.publish(
            80,
            vec![
                opened(1),
                StreamEvent::Data {
                    peer_acked: 0,
                    conn: 1,
                    bytes: pool.copy(b"still readable"),
                    dir: Direction::Client,
                },
            ],
        );
        drop(pool);
        read_frame(&mut client).await;
        assert!(matches!(
            read_frame(&mut client).await,
            Some(ServerFrame::DataRef { .. })
        ));
        // A malformed frame: the server ends the session.
        client.write_all(&[0, 0, 0, 1, 0x7f]).await.unwrap();
        assert_ends_with(&mut client, ErrorCode::BadFrame, Duration::from_secs(5)).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            arena.counters().in_use_bytes,
            CHUNK as u64,
            "kept while the client's end is open"
        );
        drop(client);
        server
            .wait_until("freed once the client closed", |_| {
                arena.counters().in_use_bytes == 0
            })
            .await;
        server.stop().await;
    }

    #[tokio::test]
    async fn the_arena_is_refused_over_tcp_and_without_one() {
        let arena = Arena::new(CHUNK).unwrap();
        let server = Harness::start_full(4, true, Some(arena)).await;
        let mut stream = welcomed(&server, "remote").await;
        stream
            .write_all(&wire(&ClientFrame::MapArena))
            .await
            .unwrap();
        assert_error(
            read_frame(&mut stream).await,
            ErrorCode::NoArena,
            false,
            "Unix",
        );
        // Data then comes as bytes.
        stream
            .write_all(&wire(&ClientFrame::Subscribe { ports: vec![80] }))
            .await
            .unwrap();
        assert_eq!(read_frame(&mut stream).await, Some(ServerFrame::Ok));
        server.hub.publish(
            80,
            vec![
                opened(1),
                StreamEvent::Data {
                    peer_acked: 0,
                    conn: 1,
                    bytes: Bytes::from_static(b"x"),
                    dir: Direction::Client,
                },
            ],
        );
        read_frame(&mut stream).await;
        assert!(matches!(
            read_frame(&mut stream).await,
            Some(ServerFrame::Event(StreamEvent::Data { .. }))
        ));
        server.stop().await;
        // A mirror without an arena: the client library goes on with bytes.
        let server = Harness::start_full(4, true, None).await;
        let (unix, path) = server.unix();
        let client = Client::connect(unix, None, "local").await.unwrap();
        assert!(!client.uses_arena());
        let (_, answer) = raw_session(path, true).await;
        assert_error(answer, ErrorCode::NoArena, false, "--arena-size 0");
        server.stop().await;
    }

    /// One frame's bytes (type and body), or `None` at the end.
    async fn read_raw(stream: &mut (impl AsyncRead + Unpin)) -> Option<Vec<u8>> {
        let mut length = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut length))
            .await
            .expect("a frame in time")
            .ok()?;
        let mut frame = vec![0u8; u32::from_be_bytes(length) as usize];
        stream.read_exact(&mut frame).await.ok()?;
        Some(frame)
    }

    /// With both directions in the hub, a version 3 client (the library,
    /// with the arena) receives both, each with its direction and the
    /// other's acknowledged offset, and the interface; a version 2 session
    /// on the same port receives the client's bytes only, in version 2's
    /// frames, as references and as bytes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn version_2_sessions_get_the_clients_bytes_only() {
        let arena = Arena::new(8 * CHUNK).unwrap();
        let server = Harness::start_full(4, true, Some(arena.clone())).await;
        let (unix, path) = server.unix();
        let mut current = Client::connect(unix, None, "v3").await.unwrap();
        assert_eq!((current.version(), current.uses_arena()), (3, true));
        current.subscribe(&[80]).await.unwrap();
        let mut old = UnixStream::connect(path).await.unwrap();
        old.write_all(&wire(&ClientFrame::Hello {
            version: 2,
            name: "v2".into(),
            nonce: [0; NONCE_LEN],
        }))
        .await
        .unwrap();
        assert_eq!(
            read_frame(&mut old).await,
            Some(ServerFrame::Welcome {
                version: 2,
                server: "mirror under test".into()
            })
        );
        old.write_all(&wire(&ClientFrame::MapArena)).await.unwrap();
        assert!(matches!(
            read_frame(&mut old).await,
            Some(ServerFrame::Arena { .. })
        ));
        old.write_all(&wire(&ClientFrame::Subscribe { ports: vec![80] }))
            .await
            .unwrap();
        assert_eq!(read_frame(&mut old).await, Some(ServerFrame::Ok));
        let mut pool = PayloadPool::with_arena(arena.clone());
        let event = |dir, peer_acked, bytes: Bytes| StreamEvent::Data {
            conn: 1,
            dir,
            bytes,
            peer_acked,
        };
        let events = vec![
            StreamEvent::Opened {
                iface: "ns1:veth0".into(),
                conn: 1,
                src: "198.18.0.1:40000".parse().unwrap(),
                dst: "198.18.0.2:80".parse().unwrap(),
                midstream: false,
            },
            event(Direction::Client, 0, pool.copy(b"GET /")),
            event(Direction::Server, 5, pool.copy(b"HTTP/1.1 200")),
            event(Direction::Client, 12, Bytes::from_static(b" again")),
            event(Direction::Server, 11, Bytes::from_static(b" OK")),
            closed(1, CloseReason::Fin),
        ];
        server.hub.publish(80, events.clone());
        let mut received = Vec::new();
        for _ in 0..events.len() {
            let event = tokio::time::timeout(Duration::from_secs(10), current.next_event())
                .await
                .expect("events in time")
                .expect("no error")
                .expect("not closed");
            received.push(event);
        }
        assert_eq!(received, events, "version 3: everything, as it was");
        // Version 2: its own frame types, the client's bytes only.
        let mut frames = Vec::new();
        while let Some(frame) = read_raw(&mut old).await {
            let end = frame[0] == 0x84;
            frames.push(frame);
            if end {
                break;
            }
        }
        let kinds: Vec<u8> = frames.iter().map(|f| f[0]).collect();
        assert_eq!(kinds, [0x82, 0x8b, 0x83, 0x84], "{frames:x?}");
        assert_eq!(
            frames[1].len(),
            1 + 8 + 8 + 4,
            "DATA_REF: conn, offset, len"
        );
        assert_eq!(
            &frames[1][17..],
            &5u32.to_be_bytes(),
            "the client's 5 bytes"
        );
        assert_eq!(&frames[2][9..], b" again");
        assert_eq!(
            ServerFrame::decode(&frames[0]),
            Ok(ServerFrame::Event(StreamEvent::Opened {
                iface: Default::default(),
                conn: 1,
                src: "198.18.0.1:40000".parse().unwrap(),
                dst: "198.18.0.2:80".parse().unwrap(),
                midstream: false,
            }))
        );
        drop(current);
        drop(old);
        server.stop().await;
    }
}

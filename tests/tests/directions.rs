//! `--directions both` on real connections: both directions of a
//! connection are one connection, each reassembled whole into `--dump-dir`
//! (the mirror's own, and `mirror tail`'s over protocol version 3, while a
//! version 2 session gets the client's bytes only), and a connection ends
//! `fin` once both sides sent their FIN, whichever closed first.

use std::{
    collections::BTreeMap,
    fs,
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::unix::net::UnixStream,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use bytes::BytesMut;
use mirror_tests::{
    bed::TestBed,
    mirror_process::{ClientProcess, MirrorOutput, MirrorProcess, tail_totals},
    netns::{in_namespace, in_ns, run_ok},
    root_tests,
    traffic::dumped,
    web::Nginx,
};
use mirror_user::{
    flow::model::{CloseReason, StreamEvent},
    server::protocol::{ClientFrame, NONCE_LEN, ServerFrame},
    sinks::dump::tcpflow_name,
};

const PORT: u16 = 7070;
/// Duplex connections at once.
const CONNECTIONS: usize = 40;
/// Most bytes one side of a connection sends.
const MAX_SEND: usize = 256 << 10;
const DEADLINE: Duration = Duration::from_secs(60);

/// `count` buffers of random bytes, each of a random size in
/// `1..=MAX_SEND`.
fn random_buffers(count: usize) -> Vec<Vec<u8>> {
    let mut random = fs::File::open("/dev/urandom").expect("urandom");
    (0..count)
        .map(|_| {
            let mut size = [0u8; 4];
            random.read_exact(&mut size).expect("random bytes");
            let mut data = vec![0u8; 1 + u32::from_le_bytes(size) as usize % MAX_SEND];
            random.read_exact(&mut data).expect("random bytes");
            data
        })
        .collect()
}

/// Sends `data` on `stream` then half-closes it, while reading what the
/// other side sends until its FIN. Returns what was read.
fn duplex(stream: TcpStream, data: Vec<u8>) -> Vec<u8> {
    stream
        .set_read_timeout(Some(DEADLINE))
        .expect("read timeout");
    stream
        .set_write_timeout(Some(DEADLINE))
        .expect("write timeout");
    let mut writer = stream.try_clone().expect("clone the socket");
    let sending = thread::spawn(move || {
        writer.write_all(&data).expect("send");
        writer.shutdown(Shutdown::Write).expect("half-close");
    });
    let mut received = Vec::new();
    (&stream).read_to_end(&mut received).expect("receive");
    sending.join().expect("the sender");
    received
}

/// What one connection carried: client address, what the client sent,
/// what the server sent.
type Exchange = (SocketAddr, Vec<u8>, Vec<u8>);

/// `CONNECTIONS` connections from the client namespace to a server in the
/// server namespace, each side sending random bytes of a random size while
/// reading the other's, at once.
fn duplex_connections(bed: &TestBed) -> Vec<Exchange> {
    let server_addr = SocketAddr::new(bed.server_ip.parse().unwrap(), PORT);
    let listener = in_namespace(&bed.server, move || {
        TcpListener::bind(server_addr).expect("bind the server")
    });
    listener.set_nonblocking(true).expect("nonblocking");
    let answers = random_buffers(CONNECTIONS);
    let server = thread::spawn(move || {
        let deadline = Instant::now() + DEADLINE;
        let mut handlers = Vec::new();
        for answer in answers {
            let (stream, peer) = loop {
                match listener.accept() {
                    Ok(accepted) => break accepted,
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                        assert!(Instant::now() < deadline, "the clients did not connect");
                        thread::sleep(Duration::from_millis(5));
                    }
                    Err(error) => panic!("accept: {error}"),
                }
            };
            stream.set_nonblocking(false).expect("blocking");
            handlers.push(thread::spawn(move || {
                let received = duplex(stream, answer.clone());
                (peer, received, answer)
            }));
        }
        handlers
            .into_iter()
            .map(|handler| handler.join().expect("a server connection"))
            .collect::<Vec<_>>()
    });
    let streams: Vec<TcpStream> = in_namespace(&bed.client, move || {
        (0..CONNECTIONS)
            .map(|_| TcpStream::connect(server_addr).expect("connect"))
            .collect()
    });
    let clients: Vec<_> = streams
        .into_iter()
        .zip(random_buffers(CONNECTIONS))
        .map(|(stream, request)| {
            let local = stream.local_addr().expect("local address");
            thread::spawn(move || {
                let received = duplex(stream, request.clone());
                (local, request, received)
            })
        })
        .collect();
    let clients: BTreeMap<SocketAddr, (Vec<u8>, Vec<u8>)> = clients
        .into_iter()
        .map(|client| {
            let (local, sent, received) = client.join().expect("a client");
            (local, (sent, received))
        })
        .collect();
    let server = server.join().expect("the server");
    assert_eq!(server.len(), CONNECTIONS);
    server
        .into_iter()
        .map(|(peer, from_client, answer)| {
            let (sent, received) = &clients[&peer];
            assert!(
                *sent == from_client && *received == answer,
                "{peer}: TCP itself delivered"
            );
            (peer, from_client, answer)
        })
        .collect()
}

/// Both directions of 40 duplex connections land byte-identical in
/// `--dump-dir`: the client's in the tcpflow file, the server's in the
/// reverse one, one sidecar ended `fin` for both.
fn duplex_streams_are_dumped_whole() {
    let bed = TestBed::new();
    let dump = bed.new_path("dump");
    let dump_arg = dump.display().to_string();
    let args = [
        "--directions",
        "both",
        "--attach",
        "tc",
        "--ring-size",
        "32M",
        "--dump-dir",
        &dump_arg,
    ];
    let mirror = bed.mirror(PORT, &args, MirrorProcess::start);
    let exchanges = duplex_connections(&bed);
    mirror.wait_for_fin_closes(CONNECTIONS as u64);
    let output = mirror.stop();
    assert_whole_both_ways(&bed, &dump, &exchanges, &output);
}

/// Every exchange is in `dump`, each direction byte-identical in its
/// tcpflow file, the one sidecar ended `fin`; the mirror lost nothing.
fn assert_whole_both_ways(
    bed: &TestBed,
    dump: &Path,
    exchanges: &[Exchange],
    output: &MirrorOutput,
) {
    output.assert_counters(&[
        ("kernel.ring_full", 0),
        ("connections.opened", CONNECTIONS as u64),
        ("connections.closed.fin", CONNECTIONS as u64),
        ("connections.midstream", 0),
    ]);
    let server = format!("{}:{PORT}", bed.server_ip);
    for (client, request, answer) in exchanges {
        let mut parts = dumped(dump, &client.to_string(), &server);
        assert_eq!(parts.len(), 1, "{client}: one file\n{output}");
        let (stream, meta) = parts.remove(0);
        assert!(
            stream == *request,
            "{client}: {} of the {} bytes the client sent ({meta})",
            stream.len(),
            request.len()
        );
        assert_eq!(meta["reason"], "fin", "{client}: {meta}");
        let reverse = tcpflow_name(server.parse().unwrap(), *client);
        assert_eq!(meta["server_file"], reverse.as_str(), "{client}: {meta}");
        assert_eq!(meta["server_bytes"], answer.len() as u64, "{meta}");
        let answered = fs::read(dump.join(&reverse)).expect("the reverse file");
        assert!(
            answered == *answer,
            "{client}: {} of the {} bytes the server sent",
            answered.len(),
            answer.len()
        );
    }
}

/// A version 2 session, said hello to on a raw socket: subscribed to
/// [`PORT`], it reads until `connections` connections closed (or a
/// deadline) and returns each connection's client address, the bytes of
/// its data frames and its close reason, and every frame type it saw.
fn version_2_session(
    socket: &Path,
    connections: usize,
) -> thread::JoinHandle<(V2Streams, Vec<u8>)> {
    fn send(stream: &mut UnixStream, frame: ClientFrame) {
        let mut body = BytesMut::new();
        frame.encode(&mut body);
        stream
            .write_all(&(body.len() as u32).to_be_bytes())
            .and_then(|()| stream.write_all(&body))
            .expect("send a frame");
    }
    fn read(stream: &mut UnixStream) -> Vec<u8> {
        let mut length = [0u8; 4];
        stream.read_exact(&mut length).expect("a frame in time");
        let mut frame = vec![0u8; u32::from_be_bytes(length) as usize];
        stream.read_exact(&mut frame).expect("the whole frame");
        frame
    }
    let mut stream = UnixStream::connect(socket).expect("connect to the mirror");
    stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
    send(
        &mut stream,
        ClientFrame::Hello {
            version: 2,
            name: "version 2".into(),
            nonce: [0; NONCE_LEN],
        },
    );
    assert!(
        matches!(
            ServerFrame::decode(&read(&mut stream)),
            Ok(ServerFrame::Welcome { version: 2, .. })
        ),
        "a version 2 client is welcome"
    );
    send(&mut stream, ClientFrame::Subscribe { ports: vec![PORT] });
    assert_eq!(ServerFrame::decode(&read(&mut stream)), Ok(ServerFrame::Ok));
    thread::spawn(move || {
        let mut streams = V2Streams::new();
        let mut kinds = Vec::new();
        let mut closed = 0;
        while closed < connections {
            let frame = read(&mut stream);
            if !kinds.contains(&frame[0]) {
                kinds.push(frame[0]);
            }
            match ServerFrame::decode(&frame).expect("a well-formed frame") {
                ServerFrame::Event(StreamEvent::Opened { conn, src, .. }) => {
                    streams.insert(conn, (src, Vec::new(), None));
                }
                ServerFrame::Event(StreamEvent::Data { conn, bytes, .. }) => {
                    streams
                        .get_mut(&conn)
                        .expect("opened")
                        .1
                        .extend_from_slice(&bytes);
                }
                ServerFrame::Event(StreamEvent::Closed { conn, reason }) => {
                    streams.get_mut(&conn).expect("opened").2 = Some(reason);
                    closed += 1;
                }
                other => panic!("a stream frame: {other:?}"),
            }
        }
        (streams, kinds)
    })
}

/// What a version 2 session received: by connection, its client, the
/// bytes, the close.
type V2Streams = BTreeMap<u64, (SocketAddr, Vec<u8>, Option<CloseReason>)>;

/// With `--directions both`, `mirror tail` (protocol version 3, the
/// shared-memory arena) dumps both directions of 40 duplex connections
/// byte-identical, as the mirror's own `--dump-dir` does; a version 2
/// session at the same time gets, in version 2's frames, exactly the
/// client's bytes of each.
fn duplex_streams_reach_tail_whole() {
    let bed = TestBed::new();
    let dump = bed.new_path("tail");
    let dump_arg = dump.display().to_string();
    let args = [
        "--directions",
        "both",
        "--attach",
        "tc",
        "--ring-size",
        "32M",
    ];
    let mirror = bed.mirror(PORT, &args, MirrorProcess::start_quiet);
    let tail = ClientProcess::tail(
        None,
        &mirror.endpoint(),
        &["--port", &PORT.to_string(), "--dump-dir", &dump_arg],
    );
    let socket = mirror
        .endpoint()
        .strip_prefix("unix:")
        .expect("a Unix socket")
        .to_owned();
    let old = version_2_session(Path::new(&socket), CONNECTIONS);
    let exchanges = duplex_connections(&bed);
    mirror.wait_for_fin_closes(CONNECTIONS as u64);
    let (v2, kinds) = old.join().expect("the version 2 session");
    let output = mirror.stop();
    let (status, stderr) = tail.wait(Duration::from_secs(30));
    assert!(status.success(), "{stderr}");
    assert!(!stderr.contains("version 2"), "no fallback: {stderr}");
    let totals = tail_totals(&stderr);
    let sent: usize = exchanges.iter().map(|(_, q, a)| q.len() + a.len()).sum();
    assert_eq!(
        (
            totals.connections,
            totals.data_bytes,
            totals.closed(CloseReason::Fin)
        ),
        (CONNECTIONS as u64, sent as u64, CONNECTIONS as u64),
        "{stderr}"
    );
    assert_whole_both_ways(&bed, &dump, &exchanges, &output);
    // Version 2: OPENED, DATA and CLOSED of version 2, the client's bytes.
    kinds
        .iter()
        .for_each(|kind| assert!([0x82, 0x83, 0x84].contains(kind), "{kinds:x?}"));
    assert_eq!(v2.len(), CONNECTIONS);
    let by_client: BTreeMap<SocketAddr, &Vec<u8>> = exchanges
        .iter()
        .map(|(client, request, _)| (*client, request))
        .collect();
    for (conn, (client, bytes, reason)) in &v2 {
        assert_eq!(*reason, Some(CloseReason::Fin), "{conn} {client}");
        assert!(
            bytes == by_client[client],
            "{client}: {} bytes, the client sent {}",
            bytes.len(),
            by_client[client].len()
        );
    }
}

/// What a command printed on its standard output.
fn stdout_of(command: &mut std::process::Command) -> String {
    String::from_utf8_lossy(&run_ok(command).stdout).into_owned()
}

/// `--directions both --pcap`: one exchange in the capture, both
/// directions in time order; tcpdump reads the server's answer, and each
/// packet is marked inbound (the client's, at TC ingress) or outbound (the
/// server's, at egress).
fn both_directions_are_captured_in_time_order() {
    let bed = TestBed::new();
    let file = bed.path("out").join("capture.pcapng");
    let args = [
        "--directions",
        "both",
        "--attach",
        "tc",
        "--pcap",
        file.to_str().expect("a UTF-8 path"),
    ];
    let mirror = bed.mirror(PORT, &args, MirrorProcess::start_quiet);
    let server_addr = SocketAddr::new(bed.server_ip.parse().unwrap(), PORT);
    let listener = in_namespace(&bed.server, move || {
        TcpListener::bind(server_addr).expect("bind the server")
    });
    const REQUEST: &[u8] = b"GET /mirror-request HTTP/1.0\r\n\r\n";
    // An answer of several segments that starts with a marker.
    let answer: Vec<u8> = b"mirror-answer-5f2e "
        .iter()
        .copied()
        .chain((0..20_000).map(|i| b'a' + (i % 26) as u8))
        .collect();
    let served = answer.clone();
    let server = thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        duplex(stream, served)
    });
    let client = in_namespace(&bed.client, move || {
        TcpStream::connect(server_addr).expect("connect")
    });
    let client_addr = client.local_addr().expect("local address");
    assert_eq!(duplex(client, REQUEST.to_vec()), answer, "TCP itself");
    assert_eq!(server.join().expect("the server"), REQUEST);
    mirror.wait_for_fin_closes(1);
    let output = mirror.stop();
    assert_eq!(output.counter("pcap.dropped"), 0, "{output}");
    let headers = stdout_of(
        std::process::Command::new("tcpdump")
            .args(["-nn", "-tt", "--time-stamp-precision=nano", "-r"])
            .arg(&file),
    );
    let (client_ep, server_ep) = (
        format!("{}.{}", client_addr.ip(), client_addr.port()),
        format!("{}.{PORT}", bed.server_ip),
    );
    let (mut from_client, mut from_server, mut last) = (0, 0, 0.0f64);
    for line in headers.lines() {
        let stamp: f64 = line
            .split_whitespace()
            .next()
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("a timestamp first: {line}"));
        assert!(stamp >= last, "time order:\n{headers}");
        last = stamp;
        if line.contains(&format!("{client_ep} > {server_ep}:")) {
            from_client += 1;
        } else if line.contains(&format!("{server_ep} > {client_ep}:")) {
            from_server += 1;
        } else {
            panic!("a packet of another connection: {line}");
        }
    }
    // The handshake and the FINs at least, and the answer's segments.
    assert!(from_client >= 3 && from_server >= 3, "{headers}");
    assert_eq!(
        (from_client + from_server) as u64,
        output.kernel("mirrored"),
        "every mirrored packet is in the file\n{output}"
    );
    let contents = stdout_of(
        std::process::Command::new("tcpdump")
            .args(["-nn", "-A", "-r"])
            .arg(&file),
    );
    assert!(
        contents.contains("mirror-answer-5f2e"),
        "the server's bytes"
    );
    assert!(
        contents.contains("GET /mirror-request"),
        "the client's bytes"
    );
    // Each packet's direction, as pcapng's flags say (1 in, 2 out), by
    // source port.
    let directions = stdout_of(
        std::process::Command::new("tshark")
            .args([
                "-T",
                "fields",
                "-e",
                "tcp.srcport",
                "-e",
                "frame.packet_flags_direction",
                "-r",
            ])
            .arg(&file),
    );
    let mut marked = 0;
    for line in directions.lines() {
        let (port, direction) = line.split_once('\t').unwrap_or((line, ""));
        let expected = if port == PORT.to_string() { "2" } else { "1" };
        assert_eq!(
            direction.trim_start_matches("0x").trim_start_matches('0'),
            expected,
            "{line}\n{directions}"
        );
        marked += 1;
    }
    assert_eq!(marked, from_client + from_server);
}

/// nginx closes first when asked to (`Connection: close`): with both
/// directions followed the connection waits for the client's FIN and ends
/// `fin`, not `idle`; the answers are the server's `data` events.
fn a_server_that_closes_first_ends_fin() {
    let bed = TestBed::new();
    let nginx = Nginx::start(&bed.server, bed.server_ip, &bed.path("nginx"));
    let args = ["--directions", "both", "--attach", "tc", "--print", "json"];
    let mirror = bed.mirror(80, &args, MirrorProcess::start_quiet);
    let url = format!("http://{}/", bed.server_ip);
    const REQUESTS: usize = 20;
    for _ in 0..REQUESTS {
        run_ok(in_ns(&bed.client, "curl").args([
            "-sS",
            "--max-time",
            "10",
            "-H",
            "Connection: close",
            &url,
        ]));
    }
    assert_eq!(nginx.wait_for(REQUESTS).len(), REQUESTS);
    mirror.wait_for_fin_closes(REQUESTS as u64);
    let output = mirror.stop();
    output.assert_counters(&[
        ("connections.opened", REQUESTS as u64),
        ("connections.closed.fin", REQUESTS as u64),
        ("connections.closed.idle", 0),
    ]);
    // Every connection carried its answer, as the server's bytes.
    let mut answered: BTreeMap<u64, u64> = BTreeMap::new();
    for event in &output.events {
        if event["event"] == "data" && event["dir"] == "server" {
            *answered.entry(event["conn"].as_u64().unwrap()).or_default() +=
                event["len"].as_u64().unwrap();
        }
    }
    assert_eq!(answered.len(), REQUESTS, "{answered:?}\n{output}");
    for (conn, bytes) in answered {
        assert!(
            bytes > "HTTP/1.1 200 OK\r\n".len() as u64,
            "connection {conn}: {bytes} bytes"
        );
    }
}

root_tests! {
    veth_tc_duplex_dump => duplex_streams_are_dumped_whole();
    veth_tc_duplex_tail => duplex_streams_reach_tail_whole();
    veth_tc_both_directions_pcap => both_directions_are_captured_in_time_order();
    veth_tc_server_closes_first => a_server_that_closes_first_ends_fin();
}

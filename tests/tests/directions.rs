//! `--directions both` on real connections: both directions of a
//! connection are one connection, each reassembled whole into `--dump-dir`,
//! and a connection ends `fin` once both sides sent their FIN, whichever
//! closed first.

use std::{
    collections::BTreeMap,
    fs,
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::Path,
    thread,
    time::{Duration, Instant},
};

use mirror_tests::{
    bed::TestBed,
    mirror_process::MirrorProcess,
    netns::{in_namespace, in_ns, run_ok},
    root_tests,
    traffic::dumped,
    web::Nginx,
};
use mirror_user::sinks::dump::tcpflow_name;

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
    output.assert_counters(&[
        ("kernel.ring_full", 0),
        ("connections.opened", CONNECTIONS as u64),
        ("connections.closed.fin", CONNECTIONS as u64),
        ("connections.midstream", 0),
    ]);
    let server = format!("{}:{PORT}", bed.server_ip);
    for (client, request, answer) in &exchanges {
        let mut parts = dumped(&dump, &client.to_string(), &server);
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
        let answered = fs::read(Path::new(&dump).join(&reverse)).expect("the reverse file");
        assert!(
            answered == *answer,
            "{client}: {} of the {} bytes the server sent",
            answered.len(),
            answer.len()
        );
    }
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
    veth_tc_server_closes_first => a_server_that_closes_first_ends_fin();
}

//! TCP streams end to end: many concurrent connections reassembled
//! byte-exact, a stalled consumer isolated by drop-on-lag, and losses that
//! always end a stream explicitly as `gap`, never as corrupt bytes.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use mirror_tests::{
    mirror_process::{MirrorOutput, MirrorProcess, Stdout},
    netns::{ClientServer, KillOnDrop, TestNet, in_ns, run_in, spawn, wait_listening},
};
use mirror_user::sinks::dump::tcpflow_name;
use serde_json::Value;

const PORT: u16 = 5201;
const SERVER: &str = "198.18.0.2";
const MIB: usize = 1 << 20;

/// A client and a server namespace on a veth pair, default offloads on.
struct Setup {
    _net: TestNet,
    client: String,
    server: String,
    dir: tempfile::TempDir,
}

fn setup() -> Setup {
    let pair = ClientServer::new();
    Setup {
        _net: pair.net,
        client: pair.client,
        server: pair.server,
        dir: tempfile::tempdir().expect("temp dir"),
    }
}

impl Setup {
    /// Limits what the client sends to `rate` (tc tbf on its veth; the
    /// bucket holds whole 64 KiB GSO packets): a fixed offered load, so a
    /// busy 2-core test machine still has the CPU for the mirror and its
    /// consumers, and results do not depend on how fast the machine is.
    fn shape_client(&self, rate: &str) {
        run_in(
            &self.client,
            "tc",
            &[
                "qdisc", "add", "dev", "cli0", "root", "tbf", "rate", rate, "burst", "512kb",
                "latency", "100ms",
            ],
        );
    }

    fn path(&self, name: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        fs::create_dir_all(&path).expect("mkdir");
        path
    }

    /// A socat server that writes each connection to `DIR/<client port>`.
    fn start_server(&self, dir: &Path) -> KillOnDrop {
        let server = spawn(in_ns(&self.server, "socat").args([
            "-u".to_owned(),
            format!("TCP-LISTEN:{PORT},reuseaddr,fork"),
            format!("SYSTEM:cat > {}/$SOCAT_PEERPORT", dir.display()),
        ]));
        wait_listening(&self.server, PORT);
        server
    }

    /// Sends every file to the server at once, one connection each (bound
    /// to a known client port), and waits until the server holds them all.
    fn send_all(&self, files: &[(u16, PathBuf, usize)], received: &Path) {
        let clients: Vec<KillOnDrop> = files
            .iter()
            .map(|(port, file, _)| {
                spawn(in_ns(&self.client, "socat").args([
                    "-u".to_owned(),
                    format!("OPEN:{}", file.display()),
                    format!("TCP:{SERVER}:{PORT},sourceport={port},reuseaddr"),
                ]))
            })
            .collect();
        for client in clients {
            client.wait_success("a client", Duration::from_secs(120));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        for (port, _, len) in files {
            let path = received.join(port.to_string());
            while fs::metadata(&path).map(|m| m.len() as usize).unwrap_or(0) < *len {
                assert!(
                    Instant::now() < deadline,
                    "the server did not receive {port}"
                );
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// `count` files of random bytes, sizes from `min` to `max` bytes, with the
/// client port each is sent from.
fn random_files(dir: &Path, count: usize, min: usize, max: usize) -> Vec<(u16, PathBuf, usize)> {
    let mut random = fs::File::open("/dev/urandom").expect("urandom");
    (0..count)
        .map(|i| {
            let len = if count > 1 {
                min + (max - min) * i / (count - 1)
            } else {
                min
            };
            let mut data = vec![0u8; len];
            std::io::Read::read_exact(&mut random, &mut data).expect("random bytes");
            let path = dir.join(format!("send-{i}"));
            fs::write(&path, &data).expect("write");
            (41000 + i as u16, path, len)
        })
        .collect()
}

/// The dumped stream and the reason its connection ended.
fn dumped(dump: &Path, client_port: u16) -> Vec<(Vec<u8>, Value)> {
    let src = format!("198.18.0.1:{client_port}").parse().unwrap();
    let dst = format!("{SERVER}:{PORT}").parse().unwrap();
    let base = tcpflow_name(src, dst);
    // A connection cut by a loss continues as a new, midstream one: NAMEc1...
    let mut parts = Vec::new();
    for name in std::iter::once(base.clone()).chain((1..).map(|n| format!("{base}c{n}"))) {
        let path = dump.join(&name);
        let Ok(bytes) = fs::read(&path) else { break };
        let meta = fs::read(dump.join(format!("{name}.meta"))).expect("every file has a sidecar");
        parts.push((bytes, serde_json::from_slice(&meta).expect("sidecar JSON")));
    }
    parts
}

fn counters(output: &MirrorOutput) -> String {
    format!("{:#?}\nstderr:\n{}", output.counters, output.stderr)
}

#[test]
fn twenty_concurrent_connections_are_dumped_byte_identical() {
    let s = setup();
    let received = s.path("received");
    let dump = s.path("dump");
    let files = random_files(&s.path("send"), 20, MIB, 20 * MIB);
    s.shape_client("2gbit");
    let server = s.start_server(&received);
    let dump_arg = dump.display().to_string();
    let mirror = MirrorProcess::start_with(
        &s.server,
        &["--iface", "srv0", "--port", "5201", "--dump-dir", &dump_arg],
        Stdout::Read,
    );
    s.send_all(&files, &received);
    let output = mirror.interrupt();
    drop(server);
    assert!(output.status.success(), "{}", output.stderr);

    for (port, file, len) in &files {
        let sent = fs::read(file).unwrap();
        let server_got = fs::read(received.join(port.to_string())).unwrap();
        assert!(
            server_got == sent,
            "the server received connection {port} intact"
        );
        let parts = dumped(&dump, *port);
        assert_eq!(
            parts.len(),
            1,
            "connection {port}: one file\n{}",
            counters(&output)
        );
        let (stream, meta) = &parts[0];
        assert_eq!(
            stream.len(),
            *len,
            "connection {port}: length\n{}",
            counters(&output)
        );
        assert!(
            stream == &server_got,
            "connection {port}: the dump equals what the server received"
        );
        assert_eq!(meta["reason"], "fin", "connection {port}: {meta}");
        assert_eq!(meta["complete"], true);
    }
    assert_eq!(output.kernel("ring_full"), 0, "{}", counters(&output));
    assert_eq!(
        output.counter("shards.queue_drops"),
        0,
        "{}",
        counters(&output)
    );
    assert_eq!(
        output.counter("connections.closed.gap"),
        0,
        "{}",
        counters(&output)
    );
    assert_eq!(
        output.counter("connections.closed.fin"),
        20,
        "{}",
        counters(&output)
    );
    let total: usize = files.iter().map(|(_, _, len)| len).sum();
    assert_eq!(
        output.counter("ports.5201.bytes"),
        total as u64,
        "{}",
        counters(&output)
    );
    assert_eq!(
        output.counter("consumers.dump-dir.lags"),
        0,
        "{}",
        counters(&output)
    );
}

#[test]
fn a_stalled_consumer_is_closed_as_lagged_and_harms_nothing_else() {
    let s = setup();
    let received = s.path("received");
    let dump = s.path("dump");
    let files = random_files(&s.path("send"), 6, 4 * MIB, 8 * MIB);
    s.shape_client("1gbit");
    let server = s.start_server(&received);
    let dump_arg = dump.display().to_string();
    // The print consumer writes to a pipe nobody reads during the transfer:
    // it stops consuming after 64 KiB. A 16 MiB channel is less than the
    // 36 MiB sent, so it lags; the dump consumer keeps up with the 1 Gbit/s.
    let mirror = MirrorProcess::start_with(
        &s.server,
        &[
            "--iface",
            "srv0",
            "--port",
            "5201",
            "--dump-dir",
            &dump_arg,
            "--print",
            "json",
            "--channel-bytes",
            "16M",
        ],
        Stdout::Stalled,
    );
    s.send_all(&files, &received);
    let output = mirror.interrupt();
    drop(server);
    assert!(output.status.success(), "{}", output.stderr);

    // The reading consumer got every stream whole.
    for (port, _, _) in &files {
        let parts = dumped(&dump, *port);
        assert_eq!(parts.len(), 1, "{port}");
        let server_got = fs::read(received.join(port.to_string())).unwrap();
        assert!(
            parts[0].0 == server_got,
            "connection {port}: the dump is complete"
        );
        assert_eq!(parts[0].1["reason"], "fin");
    }
    assert_eq!(
        output.counter("consumers.dump-dir.lags"),
        0,
        "{}",
        counters(&output)
    );
    // The stalled one lost connections to lag, each closed explicitly, and
    // got no byte of them after the close.
    assert!(
        output.counter("consumers.print.lags") >= 1,
        "{}",
        counters(&output)
    );
    let lagged: Vec<&Value> = output
        .events
        .iter()
        .filter(|e| e["event"] == "closed" && e["reason"] == "lagged")
        .collect();
    assert!(!lagged.is_empty(), "the stalled consumer saw lagged closes");
    let mut closed_at: BTreeMap<u64, usize> = BTreeMap::new();
    for (i, event) in output.events.iter().enumerate() {
        let conn = event["conn"].as_u64().unwrap();
        if event["event"] == "closed" {
            closed_at.insert(conn, i);
        } else if let Some(at) = closed_at.get(&conn) {
            panic!("event {i} of connection {conn} after its close at {at}: {event}");
        }
    }
    // Nothing was dropped on the producer's side.
    assert_eq!(output.kernel("ring_full"), 0, "{}", counters(&output));
    assert_eq!(
        output.counter("shards.queue_drops"),
        0,
        "{}",
        counters(&output)
    );
    assert_eq!(
        output.counter("connections.closed.gap"),
        0,
        "{}",
        counters(&output)
    );
}

#[test]
fn a_tiny_ring_loses_packets_and_every_loss_ends_a_stream_as_gap() {
    let s = setup();
    let received = s.path("received");
    let dump = s.path("dump");
    let files = random_files(&s.path("send"), 6, 8 * MIB, 8 * MIB);
    let server = s.start_server(&received);
    let dump_arg = dump.display().to_string();
    // 256 KiB holds four 64 KiB packets: a burst overflows it at once.
    let mirror = MirrorProcess::start_with(
        &s.server,
        &[
            "--iface",
            "srv0",
            "--port",
            "5201",
            "--dump-dir",
            &dump_arg,
            "--ring-size",
            "256K",
        ],
        Stdout::Read,
    );
    s.send_all(&files, &received);
    let output = mirror.interrupt();
    drop(server);
    assert!(output.status.success(), "{}", output.stderr);

    assert!(
        output.kernel("ring_full") > 0,
        "the ring overflowed\n{}",
        counters(&output)
    );
    assert!(
        output.counter("shards.ring_lost_flows") > 0,
        "{}",
        counters(&output)
    );
    let mut gaps = 0;
    for (port, file, _) in &files {
        let sent = fs::read(file).unwrap();
        for (i, (stream, meta)) in dumped(&dump, *port).iter().enumerate() {
            let midstream = meta["midstream"] == true;
            if !midstream {
                // From the connection's start: a prefix of what was sent.
                assert!(
                    sent.starts_with(stream),
                    "connection {port} part {i}: {} bytes that are not a prefix of the stream ({meta})",
                    stream.len()
                );
            } else {
                // Picked up after a loss: some contiguous piece of it.
                assert!(
                    stream.is_empty()
                        || sent
                            .windows(stream.len().min(4096))
                            .any(|w| w == &stream[..stream.len().min(4096)]),
                    "connection {port} part {i}: midstream bytes not from the stream ({meta})"
                );
            }
            match meta["reason"].as_str() {
                // The FIN ends the stream: a part that reached it holds the
                // stream up to its very end.
                Some("fin") if midstream => {
                    assert!(
                        sent.ends_with(stream),
                        "connection {port} part {i}: a whole tail ({meta})"
                    );
                }
                Some("fin") => {
                    assert_eq!(stream.len(), sent.len(), "complete means whole ({meta})");
                }
                Some("gap") => gaps += 1,
                // A part picked up after a loss whose own FIN was lost
                // too: its end was never seen.
                Some("shutdown") if midstream => {}
                other => panic!("connection {port} part {i} ended as {other:?} ({meta})"),
            }
        }
    }
    assert!(
        gaps > 0,
        "losses show up as gap closes\n{}",
        counters(&output)
    );
    assert_eq!(
        output.counter("connections.closed.gap"),
        gaps,
        "every gap close is counted\n{}",
        counters(&output)
    );
}

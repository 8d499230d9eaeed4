//! TCP streams end to end: many concurrent connections reassembled
//! byte-exact, a stalled consumer isolated by drop-on-lag, and losses that
//! always end a stream explicitly as `gap`, never as corrupt bytes.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use mirror_tests::{
    mirror_process::{MirrorOutput, MirrorProcess, Stdout},
    netns::ClientServer,
    traffic::{MIB, SentFile, dumped, random_files, send_all, shape, start_server},
};
use serde_json::Value;

const PORT: u16 = 5201;
const SERVER: &str = ClientServer::SERVER_IP;

/// A client and a server namespace on a veth pair, and a scratch directory.
struct Setup {
    net: ClientServer,
    dir: tempfile::TempDir,
}

fn setup() -> Setup {
    Setup {
        net: ClientServer::new(),
        dir: tempfile::tempdir().expect("temp dir"),
    }
}

impl Setup {
    fn path(&self, name: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        fs::create_dir_all(&path).expect("mkdir");
        path
    }

    fn files(&self, count: usize, min: usize, max: usize) -> Vec<SentFile> {
        random_files(&self.path("send"), 41000, count, min, max)
    }

    fn dumped(&self, dump: &Path, file: &SentFile) -> Vec<(Vec<u8>, Value)> {
        dumped(
            dump,
            &format!("{}:{}", ClientServer::CLIENT_IP, file.client_port),
            &format!("{SERVER}:{PORT}"),
        )
    }
}

fn counters(output: &MirrorOutput) -> String {
    format!("{:#?}\nstderr:\n{}", output.counters, output.stderr)
}

#[test]
fn twenty_concurrent_connections_are_dumped_byte_identical() {
    let s = setup();
    let received = s.path("received");
    let dump = s.dir.path().join("dump");
    let files = s.files(20, MIB, 20 * MIB);
    shape(&s.net.client, "cli0", "2gbit");
    let server = start_server(&s.net.server, PORT, &received);
    let dump_arg = dump.display().to_string();
    let mirror = MirrorProcess::start_with(
        &s.net.server,
        &["--iface", "srv0", "--port", "5201", "--dump-dir", &dump_arg],
        Stdout::Read,
    );
    send_all(&s.net.client, SERVER, PORT, &files, &received);
    let output = mirror.interrupt();
    drop(server);
    assert!(output.status.success(), "{}", output.stderr);

    for file in &files {
        let (port, len) = (file.client_port, &file.len);
        let sent = file.bytes();
        let server_got = fs::read(received.join(port.to_string())).unwrap();
        assert!(
            server_got == sent,
            "the server received connection {port} intact"
        );
        let parts = s.dumped(&dump, file);
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
    let total: usize = files.iter().map(|file| file.len).sum();
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
    let dump = s.dir.path().join("dump");
    let files = s.files(6, 8 * MIB, 8 * MIB);
    shape(&s.net.client, "cli0", "500mbit");
    let server = start_server(&s.net.server, PORT, &received);
    let dump_arg = dump.display().to_string();
    // The print consumer writes to a pipe nobody reads during the transfer:
    // it stops consuming after 64 KiB. A 32 MiB channel is less than the
    // 48 MiB sent, so it lags; the dump consumer, reading, has half a
    // second of slack at 500 Mbit/s.
    let mirror = MirrorProcess::start_with(
        &s.net.server,
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
            "32M",
        ],
        Stdout::Stalled,
    );
    send_all(&s.net.client, SERVER, PORT, &files, &received);
    let output = mirror.interrupt();
    drop(server);
    assert!(output.status.success(), "{}", output.stderr);

    // The reading consumer got every stream whole.
    for file in &files {
        let port = file.client_port;
        let parts = s.dumped(&dump, file);
        assert_eq!(parts.len(), 1, "{port}");
        let server_got = fs::read(received.join(port.to_string())).unwrap();
        assert!(
            parts[0].0 == server_got,
            "connection {port}: the dump is complete ({} of {} bytes, {})\n{}",
            parts[0].0.len(),
            server_got.len(),
            parts[0].1,
            counters(&output)
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
    let dump = s.dir.path().join("dump");
    let files = s.files(6, 8 * MIB, 8 * MIB);
    let server = start_server(&s.net.server, PORT, &received);
    let dump_arg = dump.display().to_string();
    // 256 KiB holds four 64 KiB packets: a burst overflows it at once.
    let mirror = MirrorProcess::start_with(
        &s.net.server,
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
    send_all(&s.net.client, SERVER, PORT, &files, &received);
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
    for file in &files {
        let port = file.client_port;
        let sent = file.bytes();
        for (i, (stream, meta)) in s.dumped(&dump, file).iter().enumerate() {
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

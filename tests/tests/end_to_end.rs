//! End to end: real servers and clients in network namespaces, default
//! offloads on, the real `mirror` binary attached to the server side.

use std::{fs, io::Read as _, path::Path, process::Stdio, time::Duration};

use mirror_tests::{
    mirror_process::MirrorProcess,
    netns::{
        ClientServer, KillOnDrop, TestNet, attached_programs, in_ns, run_in, shows_attachment,
        spawn, wait_listening,
    },
    streams::unique_payload_by_source,
};
use mirror_user::sinks::dump::tcpflow_name;

const PORT: u16 = 5201;
const UNSUBSCRIBED_PORT: u16 = 5202;
/// Fits in one CPU's ring even if the drain task never ran during the
/// transfer, so the byte count is exact on any machine.
const TRANSFER_BYTES: usize = 16 << 20;
const RING_SIZE: &str = "32M";

/// Where the traffic flows.
enum Topology {
    /// Client and server namespaces joined by a veth pair; the mirror
    /// watches the server's end.
    Veth,
    /// Client and server in one namespace, over its loopback.
    Loopback,
}

struct Hosts {
    _net: TestNet,
    client_ns: String,
    server_ns: String,
    server_ip: &'static str,
    iface: &'static str,
    dir: tempfile::TempDir,
}

fn hosts(topology: Topology) -> Hosts {
    let dir = tempfile::tempdir().expect("temp dir");
    match topology {
        Topology::Veth => {
            let pair = ClientServer::new();
            Hosts {
                _net: pair.net,
                client_ns: pair.client,
                server_ns: pair.server,
                server_ip: ClientServer::SERVER_IP,
                iface: "srv0",
                dir,
            }
        }
        Topology::Loopback => {
            let mut net = TestNet::new();
            let ns = net.namespace("host");
            Hosts {
                _net: net,
                client_ns: ns.clone(),
                server_ns: ns,
                server_ip: "127.0.0.1",
                iface: "lo",
                dir,
            }
        }
    }
}

/// A TCP server (socat) that writes what it receives to `out` and exits
/// when its one client closes.
fn start_sink(ns: &str, port: u16, out: &Path) -> KillOnDrop {
    let sink = spawn(in_ns(ns, "socat").args([
        "-u".to_owned(),
        format!("TCP-LISTEN:{port},reuseaddr"),
        format!("CREATE:{}", out.display()),
    ]));
    wait_listening(ns, port);
    sink
}

fn random_file(path: &Path, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut data))
        .expect("random bytes");
    fs::write(path, &data).expect("write input file");
    data
}

/// Sends a file with socat (client) to a socat sink (server), the mirror
/// attached at `attach` on the server side; checks the transfer, what was
/// mirrored, what was not, and that SIGKILL leaves nothing attached.
fn mirror_transfer(topology: Topology, attach: &str) {
    let hosts = hosts(topology);
    let dir = hosts.dir.path();
    let input = dir.join("in.bin");
    let received = dir.join("out.bin");
    let sent = random_file(&input, TRANSFER_BYTES);

    let port = PORT.to_string();
    let dump = dir.join("dump");
    let dump_arg = dump.display().to_string();
    let mirror = MirrorProcess::start(
        &hosts.server_ns,
        &[
            "--iface",
            hosts.iface,
            "--port",
            &port,
            "--attach",
            attach,
            "--ring-size",
            RING_SIZE,
            "--dump-dir",
            &dump_arg,
        ],
    );

    // Traffic that must not be mirrored: another TCP port, UDP to the
    // mirrored port number, ICMP.
    let other_sink = start_sink(&hosts.server_ns, UNSUBSCRIBED_PORT, &dir.join("other.bin"));
    run_in(
        &hosts.client_ns,
        "socat",
        &[
            "-u",
            &format!("OPEN:{}", input.display()),
            &format!("TCP:{}:{UNSUBSCRIBED_PORT}", hosts.server_ip),
        ],
    );
    other_sink.wait_success("the unsubscribed sink", Duration::from_secs(60));
    run_in(
        &hosts.client_ns,
        "socat",
        &[
            "-u",
            "OPEN:/etc/hostname",
            &format!("UDP:{}:{PORT}", hosts.server_ip),
        ],
    );
    run_in(
        &hosts.client_ns,
        "ping",
        &["-c", "3", "-i", "0.2", "-q", hosts.server_ip],
    );

    // The mirrored transfer.
    let sink = start_sink(&hosts.server_ns, PORT, &received);
    run_in(
        &hosts.client_ns,
        "socat",
        &[
            "-u",
            &format!("OPEN:{}", input.display()),
            &format!("TCP:{}:{PORT}", hosts.server_ip),
        ],
    );
    sink.wait_success("the sink", Duration::from_secs(60));
    let got = fs::read(&received).expect("received file");
    assert!(
        got == sent,
        "the transfer with the mirror attached must be byte-identical ({} of {} bytes arrived)",
        got.len(),
        sent.len()
    );

    let output = mirror.interrupt();
    assert!(output.status.success(), "mirror failed: {}", output.stderr);
    assert_eq!(output.kernel("ring_full"), 0, "{:?}", output.counters);
    assert_eq!(output.kernel("unparseable"), 0, "{:?}", output.counters);
    assert_eq!(
        output.kernel("mirrored"),
        output.packets.len() as u64,
        "every mirrored packet is printed once"
    );
    for packet in &output.packets {
        let dst = packet["dst"].as_str().unwrap();
        assert!(
            dst == format!("{}:{PORT}", hosts.server_ip),
            "only traffic to the subscribed port is mirrored, got {packet}"
        );
        assert_eq!(packet["iface"], hosts.iface);
    }
    let by_source = unique_payload_by_source(&output.packets, PORT);
    assert_eq!(by_source.len(), 1, "one mirrored connection: {by_source:?}");
    let mirrored_bytes = *by_source.values().next().unwrap();
    assert_eq!(
        mirrored_bytes, TRANSFER_BYTES as u64,
        "mirrored payload adds up to what the client sent"
    );
    // The reassembled stream of the one connection is the file.
    let client = by_source.keys().next().unwrap();
    let stream_file = dump.join(tcpflow_name(
        client.parse().unwrap(),
        format!("{}:{PORT}", hosts.server_ip).parse().unwrap(),
    ));
    let stream = fs::read(&stream_file).expect("the dumped stream");
    let meta = fs::read_to_string(format!("{}.meta", stream_file.display())).expect("sidecar");
    assert!(
        stream == sent,
        "dumped stream differs ({} of {} bytes; {meta}); counters {:#?}\nstderr:\n{}",
        stream.len(),
        sent.len(),
        output.counters,
        output.stderr
    );
    assert!(meta.contains(r#""reason":"fin""#), "{meta}");
    assert_eq!(
        output.counter("connections.closed.gap"),
        0,
        "{:?}",
        output.counters
    );
    assert!(output.kernel("not_subscribed") > 0, "{:?}", output.counters);
    // 3 echo requests and 1 datagram at least (plus ARP/ND on veth).
    assert!(output.kernel("not_tcp") >= 4, "{:?}", output.counters);

    // Nothing stays attached after the clean exit...
    let report = attached_programs(&hosts.server_ns, hosts.iface);
    assert!(
        !shows_attachment(&report),
        "attached after SIGINT:\n{report}"
    );
    // ...nor after SIGKILL, which gives the mirror no chance to detach.
    let mirror = MirrorProcess::start(
        &hosts.server_ns,
        &["--iface", hosts.iface, "--port", &port, "--attach", attach],
    );
    let report = attached_programs(&hosts.server_ns, hosts.iface);
    assert!(
        shows_attachment(&report),
        "the check must see a live mirror:\n{report}"
    );
    mirror.kill();
    let report = attached_programs(&hosts.server_ns, hosts.iface);
    assert!(
        !shows_attachment(&report),
        "attached after SIGKILL:\n{report}"
    );
}

#[test]
fn veth_tc() {
    mirror_transfer(Topology::Veth, "tc");
}

#[test]
fn veth_auto_is_tc() {
    mirror_transfer(Topology::Veth, "auto");
}

#[test]
fn veth_xdp_native() {
    mirror_transfer(Topology::Veth, "xdp-drv");
}

#[test]
fn veth_xdp_generic() {
    mirror_transfer(Topology::Veth, "xdp-skb");
}

#[test]
fn loopback_tc() {
    mirror_transfer(Topology::Loopback, "tc");
}

#[test]
fn loopback_xdp_generic() {
    mirror_transfer(Topology::Loopback, "xdp-skb");
}

/// iperf3 (a real bulk client), rate-bounded so the run is short and
/// lossless on any machine: the data connection's mirrored payload is the
/// 37-byte iperf3 cookie plus the bytes that crossed the wire.
#[test]
fn veth_tc_iperf3() {
    const COOKIE: u64 = 37;
    let hosts = hosts(Topology::Veth);
    let port = PORT.to_string();
    let server = spawn(
        in_ns(&hosts.server_ns, "iperf3")
            .args(["-s", "-1", "-p", &port])
            .stdout(Stdio::null()),
    );
    wait_listening(&hosts.server_ns, PORT);
    let mirror = MirrorProcess::start(
        &hosts.server_ns,
        &[
            "--iface",
            hosts.iface,
            "--port",
            &port,
            "--ring-size",
            RING_SIZE,
        ],
    );
    let report = run_in(
        &hosts.client_ns,
        "iperf3",
        &[
            "-c",
            hosts.server_ip,
            "-p",
            &port,
            "-n",
            "48M",
            "-b",
            "2G",
            "-J",
        ],
    );
    let report: serde_json::Value = serde_json::from_slice(&report.stdout).expect("iperf3 JSON");
    let sent = report["end"]["sum_sent"]["bytes"]
        .as_u64()
        .expect("bytes sent");
    let received = report["end"]["sum_received"]["bytes"]
        .as_u64()
        .expect("bytes received");
    // The receiver's count stops when its report is made, possibly before
    // the last bytes are read; the bytes the client sent all crossed the
    // wire.
    assert!(received <= sent && received > 0, "{received} of {sent}");
    server.wait_success("iperf3 -s", Duration::from_secs(30));

    let output = mirror.interrupt();
    assert!(output.status.success(), "{}", output.stderr);
    assert_eq!(output.kernel("ring_full"), 0, "{:?}", output.counters);
    let by_source = unique_payload_by_source(&output.packets, PORT);
    // A control connection (parameters, results) and a data connection.
    assert_eq!(by_source.len(), 2, "{by_source:?}");
    let data = by_source.values().max().copied().unwrap();
    // iperf3's "sent" counts bytes written to the socket, and its server
    // may reset the connection at the end with some of them unread: the
    // wire carried at least what the server read and at most what the
    // client wrote (socat tests check the exact count).
    assert!(
        (COOKIE + received..=COOKIE + sent).contains(&data),
        "data connection: {data} bytes mirrored, server read {received}, client wrote {sent}"
    );
}

/// A clsact filter (the TC fallback without TCX) outlives its process; the
/// privileged helper removes it when the mirror dies, and when both die at
/// once the next mirror on the interface finds and removes it.
#[test]
fn leftover_clsact_filter_is_removed_at_the_next_start() {
    let hosts = hosts(Topology::Veth);
    let port = PORT.to_string();
    let args = [
        "--iface",
        hosts.iface,
        "--port",
        &port,
        "--attach",
        "tc",
        "--tc-netlink",
    ];
    MirrorProcess::start(&hosts.server_ns, &args).kill_with_helper();
    let filters = run_in(
        &hosts.server_ns,
        "tc",
        &["filter", "show", "dev", hosts.iface, "ingress"],
    );
    let filters = String::from_utf8_lossy(&filters.stdout).into_owned();
    assert!(
        filters.contains("mirror_tc"),
        "SIGKILL of the mirror and its helper leaves the filter:\n{filters}"
    );

    let mirror = MirrorProcess::start(&hosts.server_ns, &args);
    let filters = run_in(
        &hosts.server_ns,
        "tc",
        &["filter", "show", "dev", hosts.iface, "ingress"],
    );
    let filters = String::from_utf8_lossy(&filters.stdout).into_owned();
    assert_eq!(
        filters
            .lines()
            .filter(|line| line.contains("mirror_tc"))
            .count(),
        1,
        "only the new mirror's filter remains:\n{filters}"
    );
    let output = mirror.interrupt();
    assert!(output.status.success(), "{}", output.stderr);
    assert!(
        output.stderr.contains("left behind"),
        "says what it removed: {}",
        output.stderr
    );
    let report = attached_programs(&hosts.server_ns, hosts.iface);
    assert!(
        !shows_attachment(&report),
        "attached after SIGINT:\n{report}"
    );
}

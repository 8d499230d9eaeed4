//! End to end: real servers and clients in network namespaces, default
//! offloads on, the real `mirror` binary attached to the server side.

use std::{collections::HashSet, fs, process::Stdio, time::Duration};

use mirror_tests::{
    bed::TestBed,
    mirror_process::MirrorProcess,
    needs_root,
    netns::{
        attached_programs, in_ns, run_in, run_ok, shows_attachment, spawn, tcx_programs,
        wait_listening,
    },
    root_tests,
    streams::unique_payload_by_source,
    traffic::{random_files, send_all, start_server},
};

const PORT: u16 = 5201;
const UNSUBSCRIBED_PORT: u16 = 5202;
const CLIENT_PORT: u16 = 41000;
/// Fits in one CPU's ring even if the drain task never ran during the
/// transfer, so the byte count is exact on any machine.
const TRANSFER_BYTES: usize = 16 << 20;
const RING_SIZE: &str = "32M";

/// Sends a file with socat (client) to a socat server, the mirror attached
/// at `attach` on the server side of `hosts` (a veth pair, or one
/// namespace's loopback); checks the transfer, what was mirrored, what was
/// not, and that SIGKILL leaves nothing attached.
fn mirror_transfer(hosts: &TestBed, attach: &str) {
    let files = random_files(
        &hosts.path("send"),
        CLIENT_PORT,
        1,
        TRANSFER_BYTES,
        TRANSFER_BYTES,
    );
    let sent = files[0].bytes();

    let dump = hosts.new_path("dump");
    let dump_arg = dump.display().to_string();
    let mirror = hosts.mirror(
        PORT,
        &[
            "--attach",
            attach,
            "--ring-size",
            RING_SIZE,
            "--dump-dir",
            &dump_arg,
        ],
        MirrorProcess::start,
    );

    // Traffic that must not be mirrored: another TCP port, UDP to the
    // mirrored port number, ICMP.
    let other = hosts.path("other");
    let other_server = start_server(&hosts.server, UNSUBSCRIBED_PORT, &other);
    send_all(
        &hosts.client,
        hosts.server_ip,
        UNSUBSCRIBED_PORT,
        &files,
        &other,
    );
    drop(other_server);
    run_in(
        &hosts.client,
        "socat",
        &[
            "-u",
            "OPEN:/etc/hostname",
            &format!("UDP:{}:{PORT}", hosts.server_ip),
        ],
    );
    run_in(
        &hosts.client,
        "ping",
        &["-c", "3", "-i", "0.2", "-q", hosts.server_ip],
    );

    // The mirrored transfer.
    let received = hosts.path("received");
    let server = start_server(&hosts.server, PORT, &received);
    send_all(&hosts.client, hosts.server_ip, PORT, &files, &received);
    drop(server);
    let got = fs::read(received.join(CLIENT_PORT.to_string())).expect("received file");
    assert!(
        got == sent,
        "the transfer with the mirror attached must be byte-identical ({} of {} bytes arrived)",
        got.len(),
        sent.len()
    );

    let output = mirror.stop();
    output.assert_counters(&[
        ("kernel.ring_full", 0),
        ("kernel.unparseable", 0),
        ("connections.closed.gap", 0),
    ]);
    assert_eq!(
        output.kernel("mirrored"),
        output.packets.len() as u64,
        "every mirrored packet is printed once"
    );
    // With TC the servers' answers come too (both directions are the
    // default there); XDP sees only what arrives.
    let service = format!("{}:{PORT}", hosts.server_ip);
    for packet in &output.packets {
        let (src, dst) = (
            packet["src"].as_str().unwrap(),
            packet["dst"].as_str().unwrap(),
        );
        assert!(
            dst == service || (src == service && !attach.starts_with("xdp")),
            "only traffic of the subscribed port is mirrored, got {packet}"
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
    hosts.assert_dumped_whole(&dump, &files, PORT, &output);
    assert!(output.kernel("not_subscribed") > 0, "{:?}", output.counters);
    // 3 echo requests and 1 datagram at least (plus ARP/ND on veth).
    assert!(output.kernel("not_tcp") >= 4, "{:?}", output.counters);

    // Nothing stays attached after the clean exit...
    hosts.assert_nothing_attached("after SIGINT");
    // ...nor after SIGKILL, which gives the mirror no chance to detach.
    let mirror = hosts.mirror(PORT, &["--attach", attach], MirrorProcess::start);
    let report = attached_programs(&hosts.server, hosts.iface);
    assert!(
        shows_attachment(&report),
        "the check must see a live mirror:\n{report}"
    );
    mirror.kill();
    hosts.assert_nothing_attached("after SIGKILL");
}

root_tests! {
    veth_tc => mirror_transfer(&TestBed::new(), "tc");
    veth_auto_is_tc => mirror_transfer(&TestBed::new(), "auto");
    veth_xdp_native => mirror_transfer(&TestBed::new(), "xdp-drv");
    veth_xdp_generic => mirror_transfer(&TestBed::new(), "xdp-skb");
    loopback_tc => mirror_transfer(&TestBed::loopback(), "tc");
    loopback_xdp_generic => mirror_transfer(&TestBed::loopback(), "xdp-skb");
}

/// iperf3 (a real bulk client), rate-bounded so the run is short and
/// lossless on any machine: the data connection's mirrored payload is the
/// 37-byte iperf3 cookie plus the bytes that crossed the wire.
#[test]
fn veth_tc_iperf3() {
    needs_root!();
    const COOKIE: u64 = 37;
    let hosts = TestBed::new();
    let port = PORT.to_string();
    let server = spawn(
        in_ns(&hosts.server, "iperf3")
            .args(["-s", "-1", "-p", &port])
            .stdout(Stdio::null()),
    );
    wait_listening(&hosts.server, PORT);
    let mirror = hosts.mirror(PORT, &["--ring-size", RING_SIZE], MirrorProcess::start);
    let report = run_in(
        &hosts.client,
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

    let output = mirror.stop();
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
    needs_root!();
    let hosts = TestBed::new();
    let args = ["--attach", "tc", "--tc-netlink"];
    let ingress_filters = || {
        let out = run_in(
            &hosts.server,
            "tc",
            &["filter", "show", "dev", hosts.iface, "ingress"],
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    hosts
        .mirror(PORT, &args, MirrorProcess::start)
        .kill_with_helper();
    let filters = ingress_filters();
    assert!(
        filters.contains("mirror_tc"),
        "SIGKILL of the mirror and its helper leaves the filter:\n{filters}"
    );

    let mirror = hosts.mirror(PORT, &args, MirrorProcess::start);
    let filters = ingress_filters();
    assert_eq!(
        filters
            .lines()
            .filter(|line| line.contains("mirror_tc"))
            .count(),
        1,
        "only the new mirror's filter remains:\n{filters}"
    );
    let output = mirror.stop();
    assert!(
        output.stderr.contains("left behind"),
        "says what it removed: {}",
        output.stderr
    );
    hosts.assert_nothing_attached("after SIGINT");
}

/// `--directions both`: the server's packets (at TC egress) come with the
/// client's (at ingress), each packet once, on a veth pair and on lo where
/// every packet passes both hooks; the capture file holds both directions
/// as tcpdump reads it; the client's stream is dumped as before; nothing
/// stays attached.
fn both_directions(hosts: &TestBed, extra: &[&str]) {
    let files = random_files(&hosts.path("send"), CLIENT_PORT, 1, 256 << 10, 256 << 10);
    let dump = hosts.new_path("dump");
    let dump_arg = dump.display().to_string();
    let pcap = hosts.new_path("capture.pcap");
    let pcap_arg = pcap.display().to_string();
    let mut args = vec![
        "--directions",
        "both",
        "--ring-size",
        RING_SIZE,
        "--dump-dir",
        &dump_arg,
        "--pcap",
        &pcap_arg,
    ];
    args.extend(extra);
    let mirror = hosts.mirror(PORT, &args, MirrorProcess::start);
    let received = hosts.path("received");
    let server = start_server(&hosts.server, PORT, &received);
    send_all(&hosts.client, hosts.server_ip, PORT, &files, &received);
    drop(server);
    let output = mirror.stop();
    output.assert_counters(&[
        ("kernel.ring_full", 0),
        ("connections.closed.gap", 0),
        ("pcap.dropped", 0),
    ]);

    let server_addr = format!("{}:{PORT}", hosts.server_ip);
    let (answers, requests): (Vec<_>, Vec<_>) = output
        .packets
        .iter()
        .partition(|packet| packet["src"] == server_addr.as_str());
    for packet in &requests {
        assert_eq!(packet["dst"], server_addr.as_str(), "{packet}");
    }
    assert!(
        answers.iter().any(|packet| packet["flags"] == "S."),
        "the server's SYN-ACK is there: {answers:?}"
    );
    assert!(
        answers
            .iter()
            .any(|packet| packet["flags"].as_str().unwrap().contains('F')),
        "and its FIN: {answers:?}"
    );
    assert!(requests.iter().any(|packet| packet["flags"] == "S"));
    assert_eq!(
        output.counter("drain.server_records"),
        answers.len() as u64,
        "{output}"
    );
    assert_eq!(output.kernel("mirrored"), output.packets.len() as u64);
    // The client's stream is what it was with one direction.
    hosts.assert_dumped_whole(&dump, &files, PORT, &output);

    let text = String::from_utf8_lossy(
        &run_ok(
            std::process::Command::new("tcpdump")
                .args(["-nn", "-r"])
                .arg(&pcap),
        )
        .stdout,
    )
    .into_owned();
    let server_dotted = format!("{}.{PORT}", hosts.server_ip);
    let from_server = text
        .lines()
        .filter(|line| line.contains(&format!(" {server_dotted} > ")))
        .count();
    let to_server = text
        .lines()
        .filter(|line| line.contains(&format!(" > {server_dotted}:")))
        .count();
    assert_eq!(
        (from_server, to_server),
        (answers.len(), requests.len()),
        "tcpdump reads both directions from the capture:\n{text}"
    );
    // A packet recorded twice would show twice with the same IP id, TCP
    // timestamps and window (two window updates differ there).
    let verbose = String::from_utf8_lossy(
        &run_ok(
            std::process::Command::new("tcpdump")
                .args(["-nn", "-t", "-v", "-r"])
                .arg(&pcap),
        )
        .stdout,
    )
    .into_owned();
    let mut packets: Vec<String> = Vec::new();
    for line in verbose.lines() {
        match packets.last_mut() {
            Some(packet) if line.starts_with(' ') => packet.push_str(line),
            _ => packets.push(line.to_owned()),
        }
    }
    let distinct: HashSet<&String> = packets.iter().collect();
    assert_eq!(packets.len(), output.packets.len(), "{verbose}");
    assert_eq!(
        distinct.len(),
        packets.len(),
        "no packet is recorded twice:\n{verbose}"
    );

    hosts.assert_nothing_attached("after SIGINT");
    let mut kill_args = vec!["--directions", "both"];
    kill_args.extend(extra);
    let mirror = hosts.mirror(PORT, &kill_args, MirrorProcess::start);
    let report = attached_programs(&hosts.server, hosts.iface);
    assert!(
        report.contains("mirror_egress"),
        "the egress program is attached:\n{report}"
    );
    if extra.is_empty() {
        assert_eq!(
            tcx_programs(&hosts.server, hosts.iface),
            ["mirror_tc", "mirror_egress"]
        );
    }
    mirror.kill();
    // A clsact filter goes through the privileged helper, right after.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while shows_attachment(&attached_programs(&hosts.server, hosts.iface))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    hosts.assert_nothing_attached("after SIGKILL");
}

root_tests! {
    veth_both_directions => both_directions(&TestBed::new(), &[]);
    veth_both_directions_clsact => both_directions(&TestBed::new(), &["--tc-netlink"]);
    loopback_both_directions => both_directions(&TestBed::loopback(), &[]);
}

//! `--sample`: the kernel keeps whole connections by a hash of their
//! 4-tuple. Real connections through the real binary: those kept are
//! dumped whole and byte-identical, the others leave no trace at all (no
//! packet, no file, no stream that starts midway), and the kernel's
//! counters account for every packet to the mirrored port.

use std::{collections::BTreeSet, fs};

use mirror_tests::{
    bed::TestBed,
    mirror_process::MirrorProcess,
    needs_root,
    streams::unique_payload_by_source,
    traffic::{MIB, shape},
};

const PORT: u16 = 5201;
const CLIENT_PORT: u16 = 43000;
const CONNECTIONS: usize = 20;

#[test]
fn a_half_sample_dumps_whole_connections_and_skips_the_rest_entirely() {
    needs_root!();
    let bed = TestBed::new();
    shape(&bed.client, "cli0", "1gbit");
    let transfer = bed.transfer(
        PORT,
        bed.random_files(CLIENT_PORT, CONNECTIONS, 64 << 10, MIB),
    );
    let dump = bed.new_path("dump");
    let mirror = bed.mirror(
        PORT,
        &[
            "--sample",
            "50",
            "--ring-size",
            "32M",
            "--dump-dir",
            dump.to_str().unwrap(),
        ],
        MirrorProcess::start,
    );
    transfer.send_all();
    let output = mirror.stop();

    // The mirror never changes what the service gets.
    for file in &transfer.files {
        let port = file.client_port;
        let got = fs::read(transfer.received.join(port.to_string())).expect("received");
        assert!(got == file.bytes(), "the server received {port} intact");
    }

    // Which connections the kernel kept: those with any mirrored packet.
    let kept_ports: BTreeSet<u16> = output
        .packets
        .iter()
        .map(|packet| {
            let src = packet["src"].as_str().expect("src");
            src.rsplit_once(':').unwrap().1.parse().expect("port")
        })
        .collect();
    let (kept, skipped): (Vec<_>, Vec<_>) = transfer
        .files
        .iter()
        .cloned()
        .partition(|file| kept_ports.contains(&file.client_port));
    assert_eq!(
        kept.len() + skipped.len(),
        CONNECTIONS,
        "only the test's connections were mirrored: {kept_ports:?}"
    );
    // Each side is empty with probability 2^-20 at a fair 50 %.
    assert!(
        !kept.is_empty() && !skipped.is_empty(),
        "a 50 % sample of {CONNECTIONS} connections kept {}\n{output}",
        kept.len()
    );

    // Kept: every packet, so the stream is whole, from its SYN to its FIN.
    for meta in bed.assert_dumped_whole(&dump, &kept, PORT, &output) {
        assert_eq!(meta["complete"], true, "{meta}");
        assert_ne!(meta["midstream"], true, "{meta}");
    }
    let by_source = unique_payload_by_source(&output.packets, PORT);
    for file in &kept {
        let source = format!("{}:{}", bed.client_ip, file.client_port);
        assert_eq!(
            by_source.get(&source).copied(),
            Some(file.len as u64),
            "mirrored payload of {source}"
        );
    }
    // Skipped: nothing at all, not even a part.
    for file in &skipped {
        let parts = bed.dumped(&dump, file, PORT);
        assert!(
            parts.is_empty(),
            "connection {} was not sampled but is dumped: {:?}",
            file.client_port,
            parts.iter().map(|(_, meta)| meta).collect::<Vec<_>>()
        );
    }
    let dumped_files = fs::read_dir(&dump).expect("dump dir").count();
    assert_eq!(dumped_files, 2 * kept.len(), "a stream and a sidecar each");

    // The counters add up: every packet to the port was either mirrored or
    // not sampled, and only the kept connections became streams.
    let kept_bytes: u64 = kept.iter().map(|file| file.len as u64).sum();
    output.assert_counters(&[
        ("kernel.ring_full", 0),
        ("kernel.unparseable", 0),
        ("connections.closed.gap", 0),
        ("connections.opened", kept.len() as u64),
        ("connections.closed.fin", kept.len() as u64),
        ("ports.5201.bytes", kept_bytes),
    ]);
    assert_eq!(
        output.kernel("mirrored"),
        output.packets.len() as u64,
        "every mirrored packet is printed once"
    );
    // A skipped connection sends at least its SYN, its data and its FIN.
    assert!(
        output.kernel("not_sampled") >= 3 * skipped.len() as u64,
        "{output}"
    );
    assert_eq!(
        output.kernel("seen"),
        output.kernel("mirrored")
            + output.kernel("not_sampled")
            + output.kernel("not_subscribed")
            + output.kernel("not_tcp"),
        "every packet has one outcome\n{output}"
    );
}

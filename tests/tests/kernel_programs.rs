//! The kernel programs (XDP, TC ingress, TC egress) run on crafted frames through
//! BPF_PROG_TEST_RUN: the verdict is always XDP_PASS for XDP and "no
//! verdict" (TC_ACT_UNSPEC) for TC, the frame comes back
//! byte-identical, a record appears in the ring exactly when it should,
//! carrying the frame, and exactly the right counter moves.

use aya::programs::{TestRun, TestRunOptions};
use etherparse::{IpHeaders, PacketBuilder, PacketBuilderStep, err::packet::BuildWriteError};
use mirror_common::{Counter, LostFlow, RecordHeader, record_flags};
use mirror_tests::{needs_root, root_tests};
use mirror_user::{
    kernel::btf::NetnsPath,
    kernel::loader::{CpuRing, LoadOptions, Mirror, ProgramKind, Sample},
    kernel::netns::Netns,
    kernel::record::Record,
    telemetry::registry::Stage as _,
};

const PORT: u16 = 8080;
const OTHER_PORT: u16 = 9090;
const XDP_PASS: u32 = 2;
/// TC_ACT_UNSPEC (-1, TCX_NEXT) as the test run reports it: the mirror
/// leaves the verdict to whatever runs after it.
const TC_ACT_UNSPEC: u32 = (-1i32).cast_unsigned();

/// The only verdict each program may return, on every path.
const fn pass(kind: ProgramKind) -> u32 {
    match kind {
        ProgramKind::Xdp => XDP_PASS,
        ProgramKind::Tc | ProgramKind::TcEgress => TC_ACT_UNSPEC,
    }
}

/// A mirror loaded with small rings and `PORT` subscribed.
fn mirror(snaplen: u32) -> (Mirror, Vec<CpuRing>) {
    let mut mirror = Mirror::load(&LoadOptions {
        snaplen,
        ring_size: 1 << 20,
        kernel_log_level: 0,
        sample: Sample::ALL,
        netns_path: None,
    })
    .expect("load the mirror");
    mirror.set_port(PORT, true).expect("subscribe");
    let rings = mirror.take_rings();
    (mirror, rings)
}

/// What the run of one frame through one program produced.
struct Outcome {
    verdict: u32,
    returned: Vec<u8>,
    records: Vec<(RecordHeader, Vec<u8>)>,
    moved: Vec<(Counter, u64)>,
}

/// The kernel refuses (EINVAL) skb test runs of frames whose EtherType
/// announces IP but whose IP header is cut; XDP test runs take them.
fn skb_test_run_refuses(frame: &[u8]) -> bool {
    match u16::from_be_bytes([frame[12], frame[13]]) {
        0x0800 => frame.len() < 14 + 20,
        0x86dd => frame.len() < 14 + 40,
        _ => false,
    }
}

/// Runs `frame` through one program; `None` when the kernel refused the
/// test run as [`skb_test_run_refuses`] says it does.
fn run(
    mirror: &mut Mirror,
    rings: &mut [CpuRing],
    kind: ProgramKind,
    frame: &[u8],
) -> Option<Outcome> {
    let before = mirror.counters().expect("counters");
    let mut out = vec![0u8; frame.len() + 256];
    let options = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ..TestRunOptions::default()
    };
    let result = match kind {
        ProgramKind::Xdp => mirror.xdp().expect("load xdp").test_run(options),
        ProgramKind::Tc => mirror.tc().expect("load tc").test_run(options),
        ProgramKind::TcEgress => mirror
            .tc_egress()
            .expect("load tc egress")
            .test_run(options),
    };
    let refused = kind != ProgramKind::Xdp && skb_test_run_refuses(frame);
    let result = match result {
        Ok(result) => {
            assert!(
                !refused,
                "the kernel now runs {frame:02x?}: drop the exception"
            );
            result
        }
        Err(error) if refused => {
            let source = std::error::Error::source(&error).map(ToString::to_string);
            assert!(
                source.is_some_and(|s| s.contains("Invalid argument")),
                "{error}"
            );
            return None;
        }
        Err(error) => panic!(
            "{kind:?} test run of a {}-byte frame {frame:02x?}: {error} ({:?})",
            frame.len(),
            std::error::Error::source(&error)
        ),
    };
    out.truncate(result.data_size_out as usize);
    // Every run, whatever the frame and whatever happened to it.
    assert_eq!(
        result.return_value,
        pass(kind),
        "{kind:?} verdict for {frame:02x?}"
    );

    let mut records = Vec::new();
    for ring in rings.iter_mut() {
        while let Some(item) = ring.ring.next() {
            let record = Record::decode(&item).expect("decodable record");
            records.push((record.header, record.packet.to_vec()));
        }
    }
    let after = mirror.counters().expect("counters");
    let moved = Counter::ALL
        .iter()
        .map(|c| (*c, after.get(*c) - before.get(*c)))
        .filter(|(_, delta)| *delta != 0)
        .collect();
    Some(Outcome {
        verdict: result.return_value,
        returned: out,
        records,
        moved,
    })
}

/// What a frame must produce.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Mirrored whole, IP header at `l3`, TCP header at `l4`.
    Mirrored { l3: u16, l4: u16, ipv6: bool },
    /// Not mirrored; this counter moves.
    Dropped(Counter),
}

impl Expect {
    /// Mirrored whole, an IPv4 header at `l3` and TCP at `l4`.
    const fn ipv4(l3: u16, l4: u16) -> Self {
        Self::Mirrored {
            l3,
            l4,
            ipv6: false,
        }
    }

    /// Mirrored whole, an IPv6 header at `l3` and TCP at `l4`.
    const fn ipv6(l3: u16, l4: u16) -> Self {
        Self::Mirrored { l3, l4, ipv6: true }
    }
}

/// Checks each named frame against `expect`.
fn check_all(frames: &[(&str, Vec<u8>)], expect: Expect) {
    for (name, frame) in frames {
        check(name, frame, expect);
    }
}

fn check(name: &str, frame: &[u8], expect: Expect) {
    let (mut mirror, mut rings) = mirror(mirror_common::MAX_SNAPLEN);
    for kind in [ProgramKind::Xdp, ProgramKind::Tc] {
        let what = format!("{name} through {kind:?}");
        let Some(outcome) = run(&mut mirror, &mut rings, kind, frame) else {
            continue;
        };
        assert_eq!(outcome.verdict, pass(kind), "{what}: verdict");
        assert_eq!(
            outcome.returned, frame,
            "{what}: the frame must come back untouched"
        );
        match expect {
            Expect::Mirrored { l3, l4, ipv6 } => {
                assert_eq!(
                    outcome.moved,
                    [(Counter::Seen, 1), (Counter::Mirrored, 1)],
                    "{what}: counters"
                );
                assert_eq!(outcome.records.len(), 1, "{what}: one record");
                let (header, packet) = &outcome.records[0];
                assert_eq!(packet.as_slice(), frame, "{what}: record holds the frame");
                assert_eq!(header.wire_len as usize, frame.len(), "{what}");
                assert_eq!(header.cap_len as usize, frame.len(), "{what}");
                assert_eq!(
                    (header.l3_offset, header.l4_offset),
                    (l3, l4),
                    "{what}: offsets"
                );
                assert_eq!(
                    header.flags & record_flags::IPV6 != 0,
                    ipv6,
                    "{what}: ipv6 flag"
                );
                assert_eq!(
                    header.flags & record_flags::XDP != 0,
                    kind == ProgramKind::Xdp,
                    "{what}: program flag"
                );
                assert_eq!(header.flags & record_flags::TRUNCATED, 0, "{what}");
                assert_eq!(header.ifindex, 1, "{what}: test runs arrive on lo");
                assert!(header.ts_ns > 0, "{what}: timestamp");
            }
            Expect::Dropped(counter) => {
                assert_eq!(
                    outcome.moved,
                    [(Counter::Seen, 1), (counter, 1)],
                    "{what}: counters"
                );
                assert!(outcome.records.is_empty(), "{what}: no record");
            }
        }
    }
}

// ---- frames ---------------------------------------------------------------

const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 2];
const IP_A: [u8; 4] = [198, 18, 0, 1];
const IP_B: [u8; 4] = [198, 18, 0, 2];
const IP6_A: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const IP6_B: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

/// The frame `write` builds (etherparse's builders write into a buffer).
fn built(write: impl FnOnce(&mut Vec<u8>) -> Result<(), BuildWriteError>) -> Vec<u8> {
    let mut frame = Vec::new();
    write(&mut frame).expect("a well-formed test frame");
    frame
}

/// Ethernet and IPv4 from A to B, for the builder to go on with.
fn ipv4_from_a() -> PacketBuilderStep<IpHeaders> {
    PacketBuilder::ethernet2(MAC_A, MAC_B).ipv4(IP_A, IP_B, 64)
}

/// Ethernet and IPv6 from A to B, for the builder to go on with.
fn ipv6_from_a() -> PacketBuilderStep<IpHeaders> {
    PacketBuilder::ethernet2(MAC_A, MAC_B).ipv6(IP6_A, IP6_B, 64)
}

fn ipv4_tcp(dst_port: u16, payload: &[u8]) -> Vec<u8> {
    built(|frame| {
        ipv4_from_a()
            .tcp(40000, dst_port, 1000, 64240)
            .ack(1)
            .psh()
            .write(frame, payload)
    })
}

fn ipv6_tcp(dst_port: u16, payload: &[u8]) -> Vec<u8> {
    built(|frame| {
        ipv6_from_a()
            .tcp(40000, dst_port, 1000, 64240)
            .ack(1)
            .write(frame, payload)
    })
}

/// Inserts IPv4 options of `words` 32-bit words (NOPs, then End).
fn with_ipv4_options(mut frame: Vec<u8>, l3: usize, words: usize) -> Vec<u8> {
    let mut options = vec![1u8; words * 4];
    *options.last_mut().unwrap() = 0;
    let at = l3 + 20;
    frame.splice(at..at, options);
    frame[l3] = 0x40 | (5 + words as u8);
    let total = u16::from_be_bytes([frame[l3 + 2], frame[l3 + 3]]) + (words * 4) as u16;
    frame[l3 + 2..l3 + 4].copy_from_slice(&total.to_be_bytes());
    frame
}

/// Inserts IPv6 extension headers (next-header values in `chain`, each 8
/// bytes; a fragment header gets `frag` as offset/flags) before TCP.
fn with_ipv6_extensions(mut frame: Vec<u8>, l3: usize, chain: &[u8], frag: u16) -> Vec<u8> {
    let mut bytes = Vec::new();
    for (i, kind) in chain.iter().enumerate() {
        let next = chain.get(i + 1).copied().unwrap_or(6);
        let mut header = [next, 0, 0, 0, 0, 0, 0, 0];
        if *kind == 44 {
            header[2..4].copy_from_slice(&frag.to_be_bytes());
        }
        if *kind == 51 {
            // AH length is in 4-byte units minus 2: 8 bytes would be 0, but
            // AH needs at least 12 (ICV-less is not valid); use 16 bytes.
            header[1] = 2;
            bytes.extend_from_slice(&header);
            bytes.extend_from_slice(&[0; 8]);
            continue;
        }
        bytes.extend_from_slice(&header);
    }
    let first = chain.first().copied().unwrap_or(6);
    frame[l3 + 6] = first;
    let payload_len = u16::from_be_bytes([frame[l3 + 4], frame[l3 + 5]]) + bytes.len() as u16;
    frame[l3 + 4..l3 + 6].copy_from_slice(&payload_len.to_be_bytes());
    let at = l3 + 40;
    frame.splice(at..at, bytes);
    frame
}

/// Inserts 802.1Q/802.1ad tags after the MAC addresses.
fn with_vlan_tags(mut frame: Vec<u8>, tpids: &[u16]) -> Vec<u8> {
    let mut tags = Vec::new();
    for (i, tpid) in tpids.iter().enumerate() {
        tags.extend_from_slice(&tpid.to_be_bytes());
        tags.extend_from_slice(&(100 + i as u16).to_be_bytes());
    }
    // The original EtherType stays last, after the tags.
    frame.splice(12..12, tags);
    frame
}

/// `frame` with its byte at `at` set to `value`.
fn with_byte(mut frame: Vec<u8>, at: usize, value: u8) -> Vec<u8> {
    frame[at] = value;
    frame
}

fn arp() -> Vec<u8> {
    let mut frame = Vec::new();
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&MAC_A);
    frame.extend_from_slice(&[0x08, 0x06]);
    frame.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&MAC_A);
    frame.extend_from_slice(&IP_A);
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&IP_B);
    frame
}

// ---- cases ----------------------------------------------------------------

root_tests! {
    ipv4_tcp_is_mirrored =>
        check("ipv4", &ipv4_tcp(PORT, b"GET / HTTP/1.1\r\n\r\n"), Expect::ipv4(14, 34));
    ipv6_tcp_is_mirrored => check("ipv6", &ipv6_tcp(PORT, b"payload"), Expect::ipv6(14, 54));
}

#[test]
fn ipv4_with_options_is_mirrored_at_the_ihl_offset() {
    needs_root!();
    for words in [1, 10] {
        let frame = with_ipv4_options(ipv4_tcp(PORT, b"hello"), 14, words);
        let l4 = 34 + 4 * words as u16;
        check(
            &format!("ipv4 + {words} option words"),
            &frame,
            Expect::ipv4(14, l4),
        );
    }
}

#[test]
fn tcp_with_options_is_mirrored() {
    needs_root!();
    let frame = built(|frame| {
        ipv4_from_a()
            .tcp(40000, PORT, 1, 64240)
            .syn()
            .options_raw(&[
                2, 4, 5, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
            ])
            .expect("TCP options")
            .write(frame, &[])
    });
    assert_eq!(
        frame[14 + 20 + 12] >> 4,
        10,
        "data offset covers the options"
    );
    check("tcp options", &frame, Expect::ipv4(14, 34));
}

#[test]
fn ipv6_extension_headers_are_skipped() {
    needs_root!();
    for chain in [&[0u8][..], &[60], &[43], &[44], &[51], &[0, 60, 43, 60]] {
        let frame = with_ipv6_extensions(ipv6_tcp(PORT, b"x"), 14, chain, 0);
        let ext: u16 = chain.iter().map(|k| if *k == 51 { 16 } else { 8 }).sum();
        check(
            &format!("ipv6 + {chain:?}"),
            &frame,
            Expect::ipv6(14, 54 + ext),
        );
    }
}

#[test]
fn ipv6_beyond_what_the_program_follows_is_unsupported() {
    needs_root!();
    let extended = |chain: &[u8], frag| with_ipv6_extensions(ipv6_tcp(PORT, b"x"), 14, chain, frag);
    check_all(
        &[
            (
                "ipv6 + 5 extension headers",
                extended(&[0, 60, 43, 60, 60], 0),
            ),
            // Offset 8 (in 8-byte units, << 3) with M clear: a later fragment.
            ("ipv6 fragment", extended(&[44], 8 << 3)),
            ("ipv6 first fragment", extended(&[44], 1)),
        ],
        Expect::Dropped(Counter::Unsupported),
    );
}

#[test]
fn ipv4_fragments_are_unsupported() {
    needs_root!();
    check_all(
        &[
            // MF
            (
                "ipv4 first fragment",
                with_byte(ipv4_tcp(PORT, b"x"), 14 + 6, 0x20),
            ),
            // Offset 16.
            (
                "ipv4 later fragment",
                with_byte(ipv4_tcp(PORT, b"x"), 14 + 7, 0x10),
            ),
        ],
        Expect::Dropped(Counter::Unsupported),
    );
}

#[test]
fn vlan_tagged_frames_are_mirrored() {
    needs_root!();
    let one = with_vlan_tags(ipv4_tcp(PORT, b"v"), &[0x8100]);
    check("802.1Q", &one, Expect::ipv4(18, 38));
    let two = with_vlan_tags(ipv6_tcp(PORT, b"v"), &[0x88a8, 0x8100]);
    check("802.1ad + 802.1Q", &two, Expect::ipv6(22, 62));
    let three = with_vlan_tags(ipv4_tcp(PORT, b"v"), &[0x88a8, 0x8100, 0x8100]);
    check("three tags", &three, Expect::Dropped(Counter::NotTcp));
}

#[test]
fn other_traffic_is_not_mirrored() {
    needs_root!();
    check_all(
        &[
            ("unsubscribed port", ipv4_tcp(OTHER_PORT, b"x")),
            ("unsubscribed ipv6", ipv6_tcp(OTHER_PORT, b"x")),
        ],
        Expect::Dropped(Counter::NotSubscribed),
    );
    check_all(
        &[
            (
                "udp",
                built(|f| ipv4_from_a().udp(40000, PORT).write(f, b"dns?")),
            ),
            (
                "icmp",
                built(|f| ipv4_from_a().icmpv4_echo_request(1, 1).write(f, &[0; 56])),
            ),
            (
                "icmpv6",
                built(|f| ipv6_from_a().icmpv6_echo_request(1, 1).write(f, &[0; 56])),
            ),
            ("arp", arp()),
        ],
        Expect::Dropped(Counter::NotTcp),
    );
}

#[test]
fn frames_cut_at_every_header_boundary_are_unparseable() {
    needs_root!();
    // The kernel refuses test frames shorter than an Ethernet header
    // (EINVAL), as a device never delivers them; every longer cut is run.
    let cut_frames = [
        (
            "ipv4",
            ipv4_tcp(PORT, b"0123456789"),
            &[14, 15, 16, 24, 33, 34, 40, 46, 53][..],
        ),
        (
            "ipv6",
            with_ipv6_extensions(ipv6_tcp(PORT, b"0123456789"), 14, &[0], 0),
            &[14, 20, 53, 54, 55, 61, 62, 70, 81],
        ),
        (
            "vlan",
            with_vlan_tags(ipv4_tcp(PORT, b"x"), &[0x88a8, 0x8100]),
            &[14, 16, 17, 20, 21, 30],
        ),
    ];
    let mut frames = Vec::new();
    for (name, frame, cuts) in cut_frames {
        for &cut in cuts {
            frames.push((format!("{name} cut at {cut}"), frame[..cut].to_vec()));
        }
    }
    let tcp_offset = 14 + 20 + 12;
    frames.extend([
        // A TCP data offset that claims more header than the packet holds.
        (
            "tcp header past the end".to_owned(),
            with_byte(ipv4_tcp(PORT, &[]), tcp_offset, 0xf0),
        ),
        // TCP data offset below the 20-byte minimum.
        (
            "tcp data offset 4".to_owned(),
            with_byte(ipv4_tcp(PORT, b"abc"), tcp_offset, 0x40),
        ),
        // IPv4 IHL below 5 and a wrong version.
        (
            "ipv4 ihl 4".to_owned(),
            with_byte(ipv4_tcp(PORT, b"x"), 14, 0x44),
        ),
        (
            "ipv4 version 6".to_owned(),
            with_byte(ipv4_tcp(PORT, b"x"), 14, 0x65),
        ),
    ]);
    for (name, frame) in &frames {
        check(name, frame, Expect::Dropped(Counter::Unparseable));
    }
}

#[test]
fn test_frames_below_ethernet_size_are_refused_by_the_kernel() {
    needs_root!();
    let (mut mirror, _rings) = mirror(mirror_common::MAX_SNAPLEN);
    let frame = ipv4_tcp(PORT, b"x");
    let mut out = [0u8; 64];
    let options = TestRunOptions {
        data_in: Some(&frame[..13]),
        data_out: Some(&mut out),
        ..TestRunOptions::default()
    };
    assert!(mirror.tc().unwrap().test_run(options).is_err());
}

#[test]
fn garbage_is_passed_untouched_and_counted_once() {
    needs_root!();
    // A fixed-seed generator: failures reproduce.
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (mut mirror, mut rings) = mirror(mirror_common::MAX_SNAPLEN);
    for i in 0..300 {
        let len = 14 + (next() % 200) as usize;
        let mut frame: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        // Steer a share of the frames into the IP and VLAN parsers.
        match i % 4 {
            0 => frame[12..14].copy_from_slice(&[0x08, 0x00]),
            1 => frame[12..14].copy_from_slice(&[0x86, 0xdd]),
            2 => frame[12..14].copy_from_slice(&[0x81, 0x00]),
            _ => {}
        }
        for kind in [ProgramKind::Xdp, ProgramKind::Tc] {
            let Some(outcome) = run(&mut mirror, &mut rings, kind, &frame) else {
                continue;
            };
            let what = format!("garbage #{i} ({len} bytes) through {kind:?}: {frame:02x?}");
            assert_eq!(outcome.verdict, pass(kind), "{what}");
            assert_eq!(outcome.returned, frame, "{what}");
            assert_eq!(outcome.moved.len(), 2, "{what}: {:?}", outcome.moved);
            assert_eq!(outcome.moved[0], (Counter::Seen, 1), "{what}");
            let (counter, delta) = outcome.moved[1];
            assert_eq!(delta, 1, "{what}");
            let mirrored = counter == Counter::Mirrored;
            assert_eq!(outcome.records.len(), usize::from(mirrored), "{what}");
            if mirrored {
                assert_eq!(outcome.records[0].1, frame, "{what}");
            }
        }
    }
}

#[test]
fn snap_length_truncates_but_keeps_the_headers() {
    needs_root!();
    let frame = ipv4_tcp(PORT, &[0xab; 1000]);
    for (snaplen, expected_cap) in [(100, 100), (1, 54), (2000, frame.len())] {
        let (mut mirror, mut rings) = mirror(snaplen);
        for kind in [ProgramKind::Xdp, ProgramKind::Tc] {
            let what = format!("snaplen {snaplen} through {kind:?}");
            let outcome = run(&mut mirror, &mut rings, kind, &frame).expect("runs");
            let truncated = expected_cap < frame.len();
            let mut expected = vec![(Counter::Seen, 1), (Counter::Mirrored, 1)];
            if truncated {
                expected.push((Counter::Truncated, 1));
            }
            assert_eq!(outcome.moved, expected, "{what}");
            assert_eq!(outcome.verdict, pass(kind), "{what}");
            assert_eq!(outcome.returned, frame, "{what}");
            let (header, packet) = &outcome.records[0];
            assert_eq!(header.cap_len as usize, expected_cap, "{what}");
            assert_eq!(header.wire_len as usize, frame.len(), "{what}");
            assert_eq!(packet.as_slice(), &frame[..expected_cap], "{what}");
            assert_eq!(
                header.flags & record_flags::TRUNCATED != 0,
                truncated,
                "{what}"
            );
            let tcp = Record {
                header: *header,
                packet,
            }
            .tcp()
            .expect("headers are kept");
            assert_eq!(tcp.payload_len, 1000, "{what}: payload length on the wire");
        }
    }
}

#[test]
fn a_full_ring_is_counted_and_the_packet_still_passes() {
    needs_root!();
    let mut mirror = Mirror::load(&LoadOptions {
        snaplen: mirror_common::MAX_SNAPLEN,
        ring_size: 4096,
        kernel_log_level: 0,
        sample: Sample::ALL,
        netns_path: None,
    })
    .expect("load");
    mirror.set_port(PORT, true).unwrap();
    let mut rings = mirror.take_rings();
    pin_to_current_cpu();
    let frame = ipv4_tcp(PORT, &[1; 1400]);
    // Each record takes a 2 KiB class: the second one no longer fits in a
    // page-sized ring (the kernel keeps 8 bytes per record for itself).
    let mut out = vec![0u8; frame.len()];
    let mut full = 0;
    for _ in 0..3 {
        let before = mirror.counters().unwrap();
        let result = mirror
            .tc()
            .unwrap()
            .test_run(TestRunOptions {
                data_in: Some(&frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .unwrap();
        assert_eq!(
            result.return_value, TC_ACT_UNSPEC,
            "a full ring changes nothing"
        );
        assert_eq!(out, frame);
        let delta = mirror.counters().unwrap().since(&before);
        assert_eq!(delta.get(Counter::Seen), 1);
        assert_eq!(
            delta.get(Counter::Mirrored) + delta.get(Counter::RingFull),
            1
        );
        full += delta.get(Counter::RingFull);
    }
    assert!(full >= 1, "a 4 KiB ring cannot hold three 2 KiB records");
    // The ring's fill gauge sees the unread records: one or more 2 KiB
    // classes of the 4 KiB ring.
    let fill = |mirror: &Mirror| -> u64 {
        mirror
            .ring_fills()
            .snapshot()
            .iter()
            .map(|ring| ring.fill_bytes)
            .sum()
    };
    let unread = fill(&mirror);
    assert!(
        (1400..=4096).contains(&unread),
        "{unread} bytes unread in the rings"
    );
    // The flow of the lost packets is reported, once, for its `gap` close.
    let mut lost = mirror.take_lost_flows().expect("lost-flow map");
    let flows = lost.take();
    assert_eq!(flows.len(), 1, "{flows:?}");
    assert_eq!(flows[0].src, "198.18.0.1:40000".parse().unwrap());
    assert_eq!(flows[0].dst, format!("198.18.0.2:{PORT}").parse().unwrap());
    assert!(lost.take().is_empty(), "taking empties the map");
    let mut records = 0;
    for ring in &mut rings {
        while ring.ring.next().is_some() {
            records += 1;
        }
    }
    assert_eq!(
        records,
        3 - full,
        "every record that was not counted as lost arrived"
    );
    assert_eq!(fill(&mirror), 0, "read records leave the fill gauge");
}

/// Frames up to the largest IP packet behind Ethernet and two VLAN tags are
/// captured whole, through XDP multi-buffer (the kernel takes test frames
/// larger than a page only for `frags` programs; TC test runs stop at a
/// page). Longer than 0xffff bytes, the copy goes in two helper calls.
#[test]
fn frames_up_to_64_kib_are_captured_whole() {
    needs_root!();
    let (mut mirror, mut rings) = mirror(mirror_common::MAX_SNAPLEN);
    let biggest_ip = 65535 - 20 - 20;
    for (payload, tags) in [
        (9000, 0),
        (40_000, 0),
        (65_000, 0),
        (biggest_ip, 0),
        (biggest_ip, 2),
    ] {
        let tpids: &[u16] = if tags == 2 { &[0x88a8, 0x8100] } else { &[] };
        let frame = with_vlan_tags(ipv4_tcp(PORT, &vec![0x5a; payload]), tpids);
        let what = format!("{}-byte frame", frame.len());
        let outcome = run(&mut mirror, &mut rings, ProgramKind::Xdp, &frame).expect("runs");
        assert_eq!(outcome.verdict, XDP_PASS, "{what}");
        assert_eq!(outcome.returned, frame, "{what}: untouched");
        assert_eq!(
            outcome.moved,
            [(Counter::Seen, 1), (Counter::Mirrored, 1)],
            "{what}"
        );
        let (header, packet) = &outcome.records[0];
        assert_eq!(header.cap_len as usize, frame.len(), "{what}");
        assert!(packet == &frame, "{what}: the record holds the whole frame");
    }
}

/// Keeps this thread on one CPU, so that every test run writes to one ring.
fn pin_to_current_cpu() {
    // SAFETY: plain syscalls on this thread with a zeroed, then filled set.
    unsafe {
        let cpu = libc::sched_getcpu();
        assert!(cpu >= 0, "sched_getcpu");
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set),
            0
        );
    }
}

#[test]
fn unsubscribing_stops_mirroring_at_once() {
    needs_root!();
    let (mut mirror, mut rings) = mirror(mirror_common::MAX_SNAPLEN);
    let frame = ipv4_tcp(PORT, b"x");
    let outcome = run(&mut mirror, &mut rings, ProgramKind::Tc, &frame).expect("runs");
    assert_eq!(outcome.records.len(), 1);
    mirror.set_port(PORT, false).unwrap();
    let outcome = run(&mut mirror, &mut rings, ProgramKind::Tc, &frame).expect("runs");
    assert!(outcome.records.is_empty());
    assert_eq!(outcome.verdict, TC_ACT_UNSPEC);
    assert_eq!(
        outcome.moved,
        [(Counter::Seen, 1), (Counter::NotSubscribed, 1)]
    );
    assert_eq!(mirror.ports().unwrap(), Vec::<u16>::new());
    mirror.set_port(OTHER_PORT, true).unwrap();
    assert_eq!(mirror.ports().unwrap(), [OTHER_PORT]);
}

/// A mirror of `PORT` that keeps `sample`'s connections only.
fn sampled_mirror(sample: Sample) -> (Mirror, Vec<CpuRing>) {
    let mut mirror = Mirror::load(&LoadOptions {
        snaplen: mirror_common::MAX_SNAPLEN,
        ring_size: 1 << 20,
        kernel_log_level: 0,
        sample,
        netns_path: None,
    })
    .expect("load the mirror");
    mirror.set_port(PORT, true).expect("subscribe");
    let rings = mirror.take_rings();
    (mirror, rings)
}

/// Connection `i` of many distinct ones (source address and port vary,
/// every eighth is IPv6), its key and three of its packets: SYN, data, FIN.
fn connection(i: u16) -> (LostFlow, [Vec<u8>; 3]) {
    let src_port = 20000 + i;
    let mut flow = LostFlow {
        src_port,
        dst_port: PORT,
        ..LostFlow::default()
    };
    let ipv6 = i % 8 == 7;
    let step = |build: &dyn Fn(PacketBuilderStep<IpHeaders>) -> Vec<u8>| {
        if ipv6 {
            let mut src = IP6_A;
            src[14..16].copy_from_slice(&i.to_be_bytes());
            build(PacketBuilder::ethernet2(MAC_A, MAC_B).ipv6(src, IP6_B, 64))
        } else {
            let src = [198, 18, (i >> 8) as u8 | 0x80, i as u8];
            build(PacketBuilder::ethernet2(MAC_A, MAC_B).ipv4(src, IP_B, 64))
        }
    };
    if ipv6 {
        flow.ip_version = 6;
        flow.src_addr = IP6_A;
        flow.src_addr[14..16].copy_from_slice(&i.to_be_bytes());
        flow.dst_addr = IP6_B;
    } else {
        flow.ip_version = 4;
        flow.src_addr[..4].copy_from_slice(&[198, 18, (i >> 8) as u8 | 0x80, i as u8]);
        flow.dst_addr[..4].copy_from_slice(&IP_B);
    }
    let syn = step(&|ip| built(|f| ip.tcp(src_port, PORT, 1, 64240).syn().write(f, &[])));
    let data = step(&|ip| {
        built(|f| {
            ip.tcp(src_port, PORT, 2, 64240)
                .ack(1)
                .psh()
                .write(f, b"GET / HTTP/1.1\r\n\r\n")
        })
    });
    let fin = step(&|ip| built(|f| ip.tcp(src_port, PORT, 20, 64240).ack(1).fin().write(f, &[])));
    (flow, [syn, data, fin])
}

/// With `--sample 50` about half of many connections are mirrored, each
/// whole or not at all, exactly those the userspace hash predicts; the
/// others move `not_sampled`, and every verdict and frame is unchanged.
#[test]
fn sampling_keeps_or_skips_whole_connections() {
    needs_root!();
    let sample = Sample {
        percent: 50,
        seed: 0x5eed_0001,
    };
    let (mut mirror, mut rings) = sampled_mirror(sample);
    let connections = 400u16;
    let mut kept = 0;
    for i in 0..connections {
        let (flow, frames) = connection(i);
        let expected = sample.includes(&flow);
        kept += u32::from(expected);
        for kind in [ProgramKind::Xdp, ProgramKind::Tc] {
            for (n, frame) in frames.iter().enumerate() {
                let what = format!("connection {i} ({flow:?}) packet {n} through {kind:?}");
                let outcome = run(&mut mirror, &mut rings, kind, frame).expect("runs");
                assert_eq!(outcome.verdict, pass(kind), "{what}: verdict");
                assert_eq!(&outcome.returned, frame, "{what}: untouched");
                if expected {
                    assert_eq!(
                        outcome.moved,
                        [(Counter::Seen, 1), (Counter::Mirrored, 1)],
                        "{what}: sampled"
                    );
                    assert_eq!(outcome.records.len(), 1, "{what}");
                    assert_eq!(&outcome.records[0].1, frame, "{what}");
                } else {
                    assert_eq!(
                        outcome.moved,
                        [(Counter::Seen, 1), (Counter::NotSampled, 1)],
                        "{what}: not sampled"
                    );
                    assert!(outcome.records.is_empty(), "{what}: no record");
                }
            }
        }
    }
    let share = f64::from(kept) / f64::from(connections);
    assert!(
        (0.4..=0.6).contains(&share),
        "{kept} of {connections} connections in a 50 % sample"
    );
    // Unsubscribed traffic is not hashed: it stays `not_subscribed`.
    let outcome = run(
        &mut mirror,
        &mut rings,
        ProgramKind::Tc,
        &ipv4_tcp(OTHER_PORT, b"x"),
    )
    .expect("runs");
    assert_eq!(
        outcome.moved,
        [(Counter::Seen, 1), (Counter::NotSubscribed, 1)]
    );
    let totals = mirror.counters().expect("counters");
    assert_eq!(
        totals.get(Counter::NotSampled),
        u64::from(connections - kept as u16) * 6,
        "three packets through two programs per skipped connection"
    );
}

/// A different seed picks a different sample; 100 % mirrors everything
/// whatever the seed.
#[test]
fn the_seed_changes_the_sample_and_100_keeps_all() {
    needs_root!();
    let decisions = |sample: Sample| -> Vec<bool> {
        let (mut mirror, mut rings) = sampled_mirror(sample);
        (0..64)
            .map(|i| {
                let (_, frames) = connection(i);
                let outcome =
                    run(&mut mirror, &mut rings, ProgramKind::Tc, &frames[1]).expect("runs");
                outcome.records.len() == 1
            })
            .collect()
    };
    let one = decisions(Sample {
        percent: 50,
        seed: 1,
    });
    let two = decisions(Sample {
        percent: 50,
        seed: 2,
    });
    assert_ne!(one, two, "the seed decides which connections are kept");
    let all = decisions(Sample {
        percent: 100,
        seed: 3,
    });
    assert!(all.iter().all(|kept| *kept), "100 % keeps every connection");
}

// ---- both directions -------------------------------------------------------

/// A server's answer: from B's `src_port` to A's port 40000.
fn ipv4_answer(src_port: u16, payload: &[u8]) -> Vec<u8> {
    built(|frame| {
        PacketBuilder::ethernet2(MAC_B, MAC_A)
            .ipv4(IP_B, IP_A, 64)
            .tcp(src_port, 40000, 5000, 64240)
            .ack(1001)
            .psh()
            .write(frame, payload)
    })
}

fn ipv6_answer(src_port: u16, payload: &[u8]) -> Vec<u8> {
    built(|frame| {
        PacketBuilder::ethernet2(MAC_B, MAC_A)
            .ipv6(IP6_B, IP6_A, 64)
            .tcp(src_port, 40000, 5000, 64240)
            .ack(1001)
            .write(frame, payload)
    })
}

/// Runs `frame` through `kind` and checks that it came back untouched
/// with the pass verdict; returns what it produced.
fn run_untouched(
    mirror: &mut Mirror,
    rings: &mut [CpuRing],
    kind: ProgramKind,
    frame: &[u8],
    what: &str,
) -> Outcome {
    let outcome = run(mirror, rings, kind, frame).expect("runs");
    assert_eq!(outcome.verdict, pass(kind), "{what}: verdict");
    assert_eq!(outcome.returned, frame, "{what}: untouched");
    outcome
}

/// The egress program mirrors what leaves a subscribed port, flagged as
/// egress and server to client, and nothing else; the ingress programs
/// leave those answers alone.
#[test]
fn the_egress_program_mirrors_the_answers_of_subscribed_ports() {
    needs_root!();
    let (mut mirror, mut rings) = mirror(mirror_common::MAX_SNAPLEN);
    for (answer, ipv6, l4) in [
        (ipv4_answer(PORT, b"HTTP/1.1 200 OK\r\n"), false, 34),
        (ipv6_answer(PORT, b"HTTP/1.1 200 OK\r\n"), true, 54),
        (ipv4_answer(PORT, &[]), false, 34),
    ] {
        let what = format!("answer (ipv6: {ipv6}, {} bytes) at egress", answer.len());
        let outcome = run_untouched(
            &mut mirror,
            &mut rings,
            ProgramKind::TcEgress,
            &answer,
            &what,
        );
        assert_eq!(
            outcome.moved,
            [(Counter::Seen, 1), (Counter::Mirrored, 1)],
            "{what}: counters"
        );
        assert_eq!(outcome.records.len(), 1, "{what}: one record");
        let (header, packet) = &outcome.records[0];
        assert_eq!(packet, &answer, "{what}: the record holds the frame");
        assert_eq!((header.l3_offset, header.l4_offset), (14, l4), "{what}");
        let mut flags = record_flags::EGRESS | record_flags::SERVER_TO_CLIENT;
        if ipv6 {
            flags |= record_flags::IPV6;
        }
        assert_eq!(header.flags, flags, "{what}: flags");
        let raw = Record::encode(header, packet);
        let record = Record::decode(&raw).unwrap();
        assert!(record.server_to_client() && record.egress(), "{what}");
        assert_eq!(record.tcp().unwrap().src.port(), PORT, "{what}");

        for kind in [ProgramKind::Xdp, ProgramKind::Tc] {
            let what = format!("answer (ipv6: {ipv6}) at ingress through {kind:?}");
            let outcome = run_untouched(&mut mirror, &mut rings, kind, &answer, &what);
            assert_eq!(
                outcome.moved,
                [(Counter::Seen, 1), (Counter::NotSubscribed, 1)],
                "{what}: counters"
            );
            assert!(outcome.records.is_empty(), "{what}");
        }
    }
    // What a client sends, and answers from other ports, are not egress's.
    for (name, frame) in [
        ("request", ipv4_tcp(PORT, b"GET /")),
        ("answer from another port", ipv4_answer(OTHER_PORT, b"x")),
        ("non-TCP", arp()),
    ] {
        let what = format!("{name} at egress");
        let outcome = run_untouched(
            &mut mirror,
            &mut rings,
            ProgramKind::TcEgress,
            &frame,
            &what,
        );
        assert!(outcome.records.is_empty(), "{what}: {:?}", outcome.moved);
        assert_eq!(
            outcome.moved.len(),
            2,
            "{what}: seen and one outcome: {:?}",
            outcome.moved
        );
    }
    // The request is ingress's, from the client to the server.
    let request = ipv4_tcp(PORT, b"GET /");
    let outcome = run_untouched(
        &mut mirror,
        &mut rings,
        ProgramKind::Tc,
        &request,
        "request",
    );
    assert_eq!(outcome.records.len(), 1);
    assert_eq!(outcome.records[0].0.flags, 0, "ingress, client to server");
}

/// On lo every packet passes egress, then ingress (test runs are on lo):
/// a packet between two subscribed ports is recorded once, at ingress.
#[test]
fn a_packet_between_two_subscribed_ports_is_recorded_once_on_lo() {
    needs_root!();
    let (mut mirror, mut rings) = mirror(mirror_common::MAX_SNAPLEN);
    mirror.set_port(OTHER_PORT, true).unwrap();
    let frame = ipv4_answer(OTHER_PORT, b"both");
    // Destination port 40000 is not subscribed: egress takes it.
    let outcome = run_untouched(
        &mut mirror,
        &mut rings,
        ProgramKind::TcEgress,
        &frame,
        "egress",
    );
    assert_eq!(outcome.records.len(), 1);
    mirror.set_port(40000, true).unwrap();
    let outcome = run_untouched(
        &mut mirror,
        &mut rings,
        ProgramKind::TcEgress,
        &frame,
        "egress",
    );
    assert_eq!(
        outcome.moved,
        [(Counter::Seen, 1), (Counter::NotSubscribed, 1)],
        "left to ingress"
    );
    let outcome = run_untouched(&mut mirror, &mut rings, ProgramKind::Tc, &frame, "ingress");
    assert_eq!(outcome.records.len(), 1, "recorded at ingress");
    assert_eq!(outcome.records[0].0.flags, 0, "as client to server");
}

/// `--sample` keeps or skips a connection's answers with its requests:
/// the egress program hashes the connection as ingress does.
#[test]
fn answers_are_sampled_with_their_connection() {
    needs_root!();
    let sample = Sample {
        percent: 50,
        seed: 0x5eed_0002,
    };
    let (mut mirror, mut rings) = sampled_mirror(sample);
    let mut kept = 0;
    for i in 0..200u16 {
        let (flow, _) = connection(i);
        let src_port = flow.src_port;
        let answer = if flow.ip_version == 6 {
            let mut dst = IP6_A;
            dst[14..16].copy_from_slice(&i.to_be_bytes());
            built(|f| {
                PacketBuilder::ethernet2(MAC_B, MAC_A)
                    .ipv6(IP6_B, dst, 64)
                    .tcp(PORT, src_port, 9, 64240)
                    .ack(20)
                    .write(f, b"answer")
            })
        } else {
            let dst = [198, 18, (i >> 8) as u8 | 0x80, i as u8];
            built(|f| {
                PacketBuilder::ethernet2(MAC_B, MAC_A)
                    .ipv4(IP_B, dst, 64)
                    .tcp(PORT, src_port, 9, 64240)
                    .ack(20)
                    .write(f, b"answer")
            })
        };
        let expected = sample.includes(&flow);
        kept += u32::from(expected);
        let what = format!("answer of connection {i}");
        let outcome = run_untouched(
            &mut mirror,
            &mut rings,
            ProgramKind::TcEgress,
            &answer,
            &what,
        );
        let outcome_counter = if expected {
            Counter::Mirrored
        } else {
            Counter::NotSampled
        };
        assert_eq!(
            outcome.moved,
            [(Counter::Seen, 1), (outcome_counter, 1)],
            "{what} (in the sample: {expected})"
        );
    }
    assert!((60..=140).contains(&kept), "{kept} of 200 in a 50 % sample");
}

/// A server's answer the ring cannot take is reported as a loss of its
/// connection, under the same client-to-server tuple as a lost request (the
/// flow shards follow both directions under that key), and still passes
/// untouched.
#[test]
fn a_lost_answer_is_reported_under_its_connection() {
    needs_root!();
    let mut mirror = Mirror::load(&LoadOptions {
        snaplen: mirror_common::MAX_SNAPLEN,
        ring_size: 4096,
        kernel_log_level: 0,
        sample: Sample::ALL,
        netns_path: None,
    })
    .expect("load");
    mirror.set_port(PORT, true).unwrap();
    let mut rings = mirror.take_rings();
    pin_to_current_cpu();
    let answer = ipv4_answer(PORT, &[1; 1400]);
    let mut full = 0;
    for n in 0..3 {
        let outcome = run_untouched(
            &mut mirror,
            &mut rings[..0],
            ProgramKind::TcEgress,
            &answer,
            &format!("answer {n}"),
        );
        full += outcome
            .moved
            .iter()
            .filter(|(c, _)| *c == Counter::RingFull)
            .count();
    }
    assert!(full >= 1, "a 4 KiB ring cannot hold three 2 KiB records");
    let mut lost = mirror.take_lost_flows().expect("lost-flow map");
    let answers = lost.take();
    assert_eq!(answers.len(), 1, "one connection lost answers: {answers:?}");
    // The client's own loss is the same connection's.
    let request = ipv4_tcp(PORT, &[2; 1400]);
    let outcome = run_untouched(
        &mut mirror,
        &mut rings[..0],
        ProgramKind::Tc,
        &request,
        "request",
    );
    assert_eq!(outcome.moved, [(Counter::Seen, 1), (Counter::RingFull, 1)]);
    assert_eq!(lost.take(), answers, "the request's loss has the same key");
}

/// Asked to, every program writes the cookie of the network namespace of
/// the packet's interface into the record (a test run's interface is the
/// caller's lo): what tells apart two watched interfaces with one index in
/// two namespaces. Not asked, the records carry 0 and the programs do not
/// look.
#[test]
fn records_carry_the_namespace_cookie_when_asked() {
    needs_root!();
    let own = Netns::current()
        .expect("the test's namespace")
        .cookie()
        .expect("its cookie");
    assert_ne!(own, 0);
    for netns_path in [Some(NetnsPath::of_running_kernel().expect("BTF")), None] {
        let mut mirror = Mirror::load(&LoadOptions {
            snaplen: 256,
            ring_size: 1 << 20,
            kernel_log_level: 0,
            sample: Sample::ALL,
            netns_path,
        })
        .expect("load the mirror");
        mirror.set_port(PORT, true).expect("subscribe");
        let mut rings = mirror.take_rings();
        let expected = if netns_path.is_some() { own } else { 0 };
        for (kind, frame) in [
            (ProgramKind::Xdp, ipv4_tcp(PORT, b"request")),
            (ProgramKind::Tc, ipv6_tcp(PORT, b"request")),
            (ProgramKind::TcEgress, ipv4_answer(PORT, b"answer")),
        ] {
            let what = format!("{kind:?} with {netns_path:?}");
            let outcome = run_untouched(&mut mirror, &mut rings, kind, &frame, &what);
            let [(header, _)] = &outcome.records[..] else {
                panic!("{what}: one record expected, got {}", outcome.records.len());
            };
            assert_eq!(header.netns_cookie, expected, "{what}");
        }
    }
}

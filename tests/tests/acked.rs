//! `--deliver acked` on real connections, against `--deliver seen`: bytes
//! the server's TCP never took (a firewall dropped them, or they
//! acknowledged data the server never sent) are never delivered, and a
//! spoofed RST far outside the window does not end a stream. Under `seen`
//! the same bytes show up: that is what proves these tests can fail.
//!
//! The spoofs are crafted in the client's namespace through a raw socket
//! (with checksums that the server's stack accepts), with the real
//! connection's 4-tuple and sequence numbers read off its SYN-ACK.

use std::{
    io::{Read, Write},
    mem::size_of,
    net::{Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use etherparse::{Ipv4Header, TcpHeader};
use mirror_tests::{
    bed::TestBed,
    mirror_process::MirrorProcess,
    netns::{in_namespace, in_ns, run_ok},
    root_tests,
    traffic::dumped,
};

/// The port an nftables rule in the server's namespace drops.
const DROPPED_PORT: u16 = 7071;
/// The port of the real connection that spoofs target.
const PORT: u16 = 7072;
const DEADLINE: Duration = Duration::from_secs(20);

/// A raw TCP socket in a namespace: it sends segments the test crafts and
/// receives a copy of every TCP segment that arrives there.
struct RawTcp(OwnedFd);

/// TCP flags of a crafted segment.
#[derive(Clone, Copy, Default)]
struct Flags {
    syn: bool,
    rst: bool,
    psh: bool,
}

impl RawTcp {
    fn open(ns: &str) -> Self {
        let fd = in_namespace(ns, || {
            // SAFETY: plain socket(2); the descriptor is owned at once.
            let fd = unsafe {
                libc::socket(
                    libc::AF_INET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    libc::IPPROTO_TCP,
                )
            };
            assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
            // SAFETY: a new descriptor that nothing else owns.
            unsafe { OwnedFd::from_raw_fd(fd) }
        });
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: a valid descriptor and a timeval of the size given.
        let set = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        assert_eq!(set, 0, "SO_RCVTIMEO");
        Self(fd)
    }

    /// Sends a TCP segment from `src` to `dst` (the kernel adds the IP
    /// header, with `src`'s address: the namespace's own).
    fn send(
        &self,
        (src, dst): (SocketAddrV4, SocketAddrV4),
        seq: u32,
        ack: Option<u32>,
        flags: Flags,
        payload: &[u8],
    ) {
        let mut tcp = TcpHeader::new(src.port(), dst.port(), seq, 64240);
        tcp.syn = flags.syn;
        tcp.rst = flags.rst;
        tcp.psh = flags.psh;
        if let Some(ack) = ack {
            tcp.ack = true;
            tcp.acknowledgment_number = ack;
        }
        tcp.checksum = tcp
            .calc_checksum_ipv4_raw(src.ip().octets(), dst.ip().octets(), payload)
            .expect("a small segment");
        let mut segment = tcp.to_bytes().to_vec();
        segment.extend_from_slice(payload);
        let to = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(*dst.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: a valid descriptor, buffer and address of the sizes given.
        let sent = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                segment.as_ptr().cast(),
                segment.len(),
                0,
                (&to as *const libc::sockaddr_in).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        assert_eq!(
            sent,
            segment.len() as isize,
            "sendto: {}",
            std::io::Error::last_os_error()
        );
    }

    /// The sequence and ACK numbers of the first SYN-ACK from `from` to
    /// `to` that arrives within [`DEADLINE`].
    fn syn_ack(&self, from: SocketAddrV4, to: SocketAddrV4) -> (u32, u32) {
        let deadline = Instant::now() + DEADLINE;
        let mut buffer = vec![0u8; 1 << 16];
        while Instant::now() < deadline {
            // SAFETY: a valid descriptor and buffer of the size given.
            let n = unsafe {
                libc::recv(
                    self.0.as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                    0,
                )
            };
            let Ok(n) = usize::try_from(n) else {
                continue; // the receive timeout
            };
            let Ok((ip, rest)) = Ipv4Header::from_slice(&buffer[..n]) else {
                continue;
            };
            let Ok((tcp, _)) = TcpHeader::from_slice(rest) else {
                continue;
            };
            if ip.source == from.ip().octets()
                && ip.destination == to.ip().octets()
                && tcp.source_port == from.port()
                && tcp.destination_port == to.port()
                && tcp.syn
                && tcp.ack
            {
                return (tcp.sequence_number, tcp.acknowledgment_number);
            }
        }
        panic!("no SYN-ACK from {from} to {to} within {DEADLINE:?}");
    }
}

fn v4(addr: SocketAddr) -> SocketAddrV4 {
    match addr {
        SocketAddr::V4(addr) => addr,
        SocketAddr::V6(addr) => panic!("{addr} is not IPv4"),
    }
}

/// `mirror run --directions both --deliver DELIVER --dump-dir` on `port`.
fn start_mirror(bed: &TestBed, port: u16, deliver: &str, dump: &str) -> MirrorProcess {
    let args = [
        "--directions",
        "both",
        "--deliver",
        deliver,
        "--attach",
        "tc",
        "--ring-size",
        "8M",
        "--dump-dir",
        dump,
    ];
    bed.mirror(port, &args, MirrorProcess::start_quiet)
}

/// A handshake attempt and data to a port whose packets an nftables rule
/// drops in the server's namespace, after the mirror saw them: the server
/// never acknowledges the data. `seen` delivers it (it arrived at the
/// interface); `acked` never does, and counts it at the close.
fn data_the_server_never_took(deliver: &str) {
    let bed = TestBed::new();
    for rule in [
        &["add", "table", "inet", "mirror_test"][..],
        &[
            "add",
            "chain",
            "inet",
            "mirror_test",
            "input",
            "{ type filter hook input priority 0; }",
        ],
        &[
            "add",
            "rule",
            "inet",
            "mirror_test",
            "input",
            "tcp",
            "dport",
            "7071",
            "drop",
        ],
    ] {
        run_ok(in_ns(&bed.server, "nft").args(rule));
    }
    let dump = bed.new_path("dump");
    let mirror = start_mirror(&bed, DROPPED_PORT, deliver, &dump.display().to_string());
    let raw = RawTcp::open(&bed.client);
    let client: SocketAddrV4 = format!("{}:40001", bed.client_ip).parse().unwrap();
    let server: SocketAddrV4 = format!("{}:{DROPPED_PORT}", bed.server_ip).parse().unwrap();
    let data = b"bytes the server never acknowledged";
    let isn = 1_000_000u32;
    raw.send(
        (client, server),
        isn,
        None,
        Flags {
            syn: true,
            ..Flags::default()
        },
        b"",
    );
    for _ in 0..2 {
        // The second is a retransmission: still nothing acknowledges it.
        let psh = Flags {
            psh: true,
            ..Flags::default()
        };
        raw.send((client, server), isn + 1, Some(7_000_000), psh, data);
    }
    assert!(
        mirror.wait_for_counters(DEADLINE, |c| c.get("shards.segments") >= Some(&3)),
        "the mirror takes the three segments"
    );
    let output = mirror.stop();
    let parts = dumped(&dump, &client.to_string(), &server.to_string());
    let delivered: Vec<u8> = parts.iter().flat_map(|(bytes, _)| bytes.clone()).collect();
    match deliver {
        "seen" => {
            assert_eq!(delivered, data, "seen: what arrived\n{output}");
            output.assert_counters(&[("connections.delivered_bytes", data.len() as u64)]);
        }
        _ => {
            assert!(delivered.is_empty(), "acked: {delivered:?}\n{output}");
            output.assert_counters(&[
                ("connections.delivered_bytes", 0),
                ("connections.unacked_bytes", data.len() as u64),
                ("connections.closed.shutdown", 1),
            ]);
        }
    }
}

/// A real connection: the client sends a first part, and once the server
/// read it the test spoofs, from the client's namespace with the real
/// 4-tuple, an RST half the sequence space away and a data segment at the
/// client's next sequence number whose ACK acknowledges 100000 bytes the
/// server never sent (Linux drops it: ACK of unsent data). Then the client
/// sends the rest, on the same sequence numbers. `acked` ignores both
/// spoofs (the dump is exactly the real bytes, ended `fin`); `seen` ignores
/// the RST but takes the spoofed bytes as the first copy of their sequence
/// numbers.
fn spoofs_during_a_real_connection(deliver: &str) {
    let bed = TestBed::new();
    let dump = bed.new_path("dump");
    let mirror = start_mirror(&bed, PORT, deliver, &dump.display().to_string());
    let first: Vec<u8> = (0..1000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let rest: Vec<u8> = (0..3000u32).map(|i| b'A' + (i % 26) as u8).collect();
    let spoof = b"SPOOFED!";

    let server_addr: SocketAddr = format!("{}:{PORT}", bed.server_ip).parse().unwrap();
    let listener = in_namespace(&bed.server, move || {
        TcpListener::bind(server_addr).expect("bind the server")
    });
    let (read_first, first_read) = mpsc::channel();
    let first_len = first.len();
    let server = thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
        let mut received = vec![0u8; first_len];
        stream.read_exact(&mut received).expect("the first part");
        read_first.send(()).expect("the test waits");
        stream.read_to_end(&mut received).expect("the rest");
        received
    });
    let raw = RawTcp::open(&bed.client);
    let mut stream = in_namespace(&bed.client, move || {
        TcpStream::connect_timeout(&server_addr, DEADLINE).expect("connect")
    });
    stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let client = v4(stream.local_addr().expect("local address"));
    let tuple = (client, v4(server_addr));
    let (server_isn, client_next) = raw.syn_ack(v4(server_addr), client);
    stream.write_all(&first).expect("send the first part");
    first_read
        .recv_timeout(DEADLINE)
        .expect("the server read the first part");

    let next = client_next.wrapping_add(first.len() as u32);
    let rst = Flags {
        rst: true,
        ..Flags::default()
    };
    raw.send(tuple, next.wrapping_add(1 << 31), None, rst, b"");
    let unsent = server_isn.wrapping_add(1 + 100_000);
    let psh = Flags {
        psh: true,
        ..Flags::default()
    };
    raw.send(tuple, next, Some(unsent), psh, spoof);
    // The spoofs reach the mirror before the real bytes.
    assert!(
        mirror.wait_for_counters(DEADLINE, |c| c.get("connections.ignored_rsts") >= Some(&1)),
        "the mirror takes the RST"
    );

    stream.write_all(&rest).expect("send the rest");
    stream.shutdown(Shutdown::Write).expect("half-close");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).expect("the server's FIN");
    drop(stream);
    let received = server.join().expect("the server");
    let sent: Vec<u8> = first.iter().chain(&rest).copied().collect();
    assert!(received == sent, "TCP itself ignored the spoofs");
    mirror.wait_for_fin_closes(1);
    let output = mirror.stop();

    let mut parts = dumped(&dump, &client.to_string(), &server_addr.to_string());
    assert_eq!(parts.len(), 1, "one file\n{output}");
    let (dumped, meta) = parts.remove(0);
    assert_eq!(meta["reason"], "fin", "{meta}\n{output}");
    match deliver {
        "seen" => {
            let mut with_spoof = sent.clone();
            with_spoof[first.len()..first.len() + spoof.len()].copy_from_slice(spoof);
            assert!(
                dumped == with_spoof,
                "seen: the spoofed copy came first ({} bytes)\n{output}",
                dumped.len()
            );
            output.assert_counters(&[("connections.invalid_acks", 0)]);
        }
        _ => {
            assert!(
                dumped == sent,
                "acked: exactly the bytes the server took ({} bytes, spoof at {:?})\n{output}",
                dumped.len(),
                dumped.windows(spoof.len()).position(|w| w == spoof)
            );
            output.assert_counters(&[
                ("connections.invalid_acks", 1),
                ("connections.conflicting_copies", 0),
                ("connections.unacked_bytes", 0),
            ]);
        }
    }
    output.assert_counters(&[
        ("connections.ignored_rsts", 1),
        ("connections.closed.fin", 1),
        ("connections.closed.rst", 0),
    ]);
}

root_tests! {
    veth_acked_data_the_server_never_took => data_the_server_never_took("acked");
    veth_seen_data_the_server_never_took => data_the_server_never_took("seen");
    veth_acked_spoofs_do_not_count => spoofs_during_a_real_connection("acked");
    veth_seen_spoofed_bytes_show => spoofs_during_a_real_connection("seen");
}

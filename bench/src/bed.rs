//! The test bed every live scenario runs on: the privileged tests' client
//! and server namespaces on a veth pair (default offloads on), with an
//! iperf3 server and an nginx on the server side; with
//! [`Bed::with_shadow`], a third namespace behind the server with a
//! discarding sink for the forwarder. Removed on drop.

use std::process::Stdio;

use mirror_tests::{
    bed::TestBed,
    netns::{KillOnDrop, in_ns, run_in, spawn, wait_listening},
    web::Nginx,
};
use serde_json::Value;

use crate::load::{BULK_PORT, SERVER_IP};

/// The server's interface, where every watcher attaches.
pub const IFACE: &str = "srv0";

/// The discarding sink in the shadow namespace (reads every connection to
/// its end, answers nothing), where `--forward` sends.
pub const SHADOW_SINK: &str = "198.18.1.2:9";

pub struct Bed {
    pub client: String,
    pub server: String,
    pub web: Nginx,
    /// [`SHADOW_SINK`] when the bed has a shadow namespace.
    pub shadow_sink: Option<&'static str>,
    _sink: Option<KillOnDrop>,
    _iperf: KillOnDrop,
    // Last: the namespaces and the scratch directory go after the
    // processes that use them.
    _bed: TestBed,
}

impl Bed {
    pub fn new() -> Self {
        Self::build(false)
    }

    /// The bed plus the shadow namespace and its sink.
    pub fn with_shadow() -> Self {
        Self::build(true)
    }

    fn build(shadow: bool) -> Self {
        let mut bed = TestBed::new();
        assert_eq!((bed.iface, bed.server_ip), (IFACE, SERVER_IP));
        let (client, server) = (bed.client.clone(), bed.server.clone());
        // wrk with `Connection: close` opens ~15 k connections a second:
        // with the default 28 k ephemeral ports and no reuse of TIME_WAIT
        // ports, the second 5-second case found the ports used up and ran
        // at 500 requests/s whatever watched it. Both are per namespace.
        run_in(
            &client,
            "sh",
            &[
                "-c",
                "echo 1024 65535 > /proc/sys/net/ipv4/ip_local_port_range && \
                 echo 1 > /proc/sys/net/ipv4/tcp_tw_reuse",
            ],
        );
        let iperf = spawn(
            in_ns(&server, "iperf3")
                .args(["-s", "-p", &BULK_PORT.to_string()])
                .stdout(Stdio::null()),
        );
        wait_listening(&server, BULK_PORT);
        let web = Nginx::start(&server, SERVER_IP, &bed.path("nginx"));
        let sink = shadow.then(|| {
            let ns = bed.add_shadow();
            let (_, port) = SHADOW_SINK.rsplit_once(':').expect("IP:PORT");
            // Large reads: the sink shares the 2 cores with everything else.
            let sink = spawn(in_ns(&ns, "socat").args([
                "-u",
                "-b",
                "1048576",
                &format!("TCP-LISTEN:{port},reuseaddr,fork"),
                "OPEN:/dev/null",
            ]));
            wait_listening(&ns, port.parse().expect("a port"));
            sink
        });
        Self {
            client,
            server,
            web,
            shadow_sink: shadow.then_some(SHADOW_SINK),
            _sink: sink,
            _iperf: iperf,
            _bed: bed,
        }
    }

    /// The server interface's packet and byte counters so far.
    pub fn counters(&self) -> IfaceCounters {
        let out = run_in(&self.server, "ip", &["-s", "-j", "link", "show", IFACE]);
        let json: Value = serde_json::from_slice(&out.stdout).expect("ip -j link");
        let stats = &json[0]["stats64"];
        let get = |dir: &str, what: &str| stats[dir][what].as_u64().expect("interface counter");
        IfaceCounters {
            rx_packets: get("rx", "packets"),
            rx_bytes: get("rx", "bytes"),
            tx_packets: get("tx", "packets"),
        }
    }
}

/// Counters of the server's interface (a GRO/GSO super-packet counts once).
#[derive(Debug, Clone, Copy, Default)]
pub struct IfaceCounters {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
}

impl IfaceCounters {
    /// What happened between `before` and `self`.
    pub fn since(self, before: Self) -> Self {
        Self {
            rx_packets: self.rx_packets - before.rx_packets,
            rx_bytes: self.rx_bytes - before.rx_bytes,
            tx_packets: self.tx_packets - before.tx_packets,
        }
    }
}

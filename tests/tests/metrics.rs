//! `mirror run --metrics`: a real Prometheus scrapes the mirror in the
//! server's namespace while real connections cross the veth, and sees what
//! the mirror counted; promtool lints the text; the endpoint answers only
//! what it serves and survives a hostile request.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use mirror_tests::{
    bed::TestBed,
    mirror_process::{MirrorProcess, running_counters},
    needs_root,
    netns::{in_namespace, wait_listening},
    prometheus::{Prometheus, http_get, promtool_check_metrics},
    traffic::{random_files, send_all, start_server},
};

const PORT: u16 = 5201;
const CLIENT_PORT: u16 = 42000;
/// Connections sent, each ended by FIN.
const CONNECTIONS: usize = 5;
/// Where the mirror serves its metrics, on the server's address.
const METRICS_PORT: u16 = 9464;
/// Prometheus's own web API, inside the server's namespace.
const PROMETHEUS_WEB: &str = "127.0.0.1:9090";
/// Prometheus scrapes every second, but takes up to about 5 s to turn its
/// configuration into a first scrape.
const SCRAPE_WAIT: Duration = Duration::from_secs(30);

fn start_mirror(bed: &TestBed) -> (MirrorProcess, String) {
    let metrics = format!("{}:{METRICS_PORT}", bed.server_ip);
    let port = PORT.to_string();
    let mirror = MirrorProcess::start_quiet(
        &bed.server,
        &["--iface", bed.iface, "--port", &port, "--metrics", &metrics],
    );
    wait_listening(&bed.server, METRICS_PORT);
    (mirror, metrics)
}

/// Prometheus sees the connections the mirror saw end with FIN, the same
/// counts as `mirror stats` and the mirror's exit summary; promtool finds
/// nothing wrong with the text.
#[test]
fn prometheus_scrapes_what_the_mirror_counted() {
    needs_root!();
    let bed = TestBed::new();
    let (mirror, metrics) = start_mirror(&bed);
    let prometheus = Prometheus::start(
        &bed.server,
        &bed.path("prometheus"),
        &metrics,
        PROMETHEUS_WEB,
    );
    prometheus.wait_target_up(SCRAPE_WAIT);
    // Scraped before any traffic: the series exist and start at zero.
    prometheus.wait_for_value("mirror_connections_opened_total", 0.0, SCRAPE_WAIT);

    let files = random_files(&bed.path("send"), CLIENT_PORT, CONNECTIONS, 1000, 64 << 10);
    let received = bed.path("received");
    let server = start_server(&bed.server, PORT, &received);
    send_all(&bed.client, bed.server_ip, PORT, &files, &received);
    drop(server);

    let n = CONNECTIONS as f64;
    prometheus.wait_for_value(
        r#"mirror_connections_closed_total{reason="fin"}"#,
        n,
        SCRAPE_WAIT,
    );
    prometheus.wait_for_value("mirror_connections_opened_total", n, SCRAPE_WAIT);
    // The kernel's packet counts reach Prometheus as the mirror reports
    // them itself (nothing is mirrored any more: the count stays).
    let live = running_counters(&mirror.endpoint());
    let mirrored = *live
        .get("kernel.mirrored")
        .unwrap_or_else(|| panic!("mirror stats has no kernel.mirrored: {live:?}"));
    assert!(mirrored > 0, "{live:?}");
    prometheus.wait_for_value(
        r#"mirror_kernel_packets_total{outcome="mirrored"}"#,
        mirrored as f64,
        SCRAPE_WAIT,
    );

    let answer = http_get(&bed.server, &format!("http://{metrics}/metrics"));
    assert_eq!(answer.status, 200, "GET /metrics: {answer:?}");
    assert!(
        answer.body.contains(&format!(
            "mirror_connections_closed_total{{reason=\"fin\"}} {CONNECTIONS}"
        )),
        "{}",
        answer.body
    );
    // promtool reads the Prometheus text format (0.0.4) only: OpenMetrics
    // counters (family `x`, samples `x_total`) read there as untyped
    // `x_total` without HELP (prometheus/prometheus#8932).
    if let Err(complaint) = promtool_check_metrics(&answer.body) {
        panic!("{complaint}\nthe text of /metrics:\n{}", answer.body);
    }

    drop(prometheus);
    let output = mirror.stop();
    output.assert_counters(&[
        ("connections.opened", CONNECTIONS as u64),
        ("connections.closed.fin", CONNECTIONS as u64),
    ]);
}

/// `/healthz` is healthy, an unknown path is not found, a request head of
/// 100 KiB is refused (4xx or closed) and costs nothing: `/metrics` is
/// served afterwards.
#[test]
fn the_endpoint_serves_its_paths_and_refuses_the_rest() {
    needs_root!();
    let bed = TestBed::new();
    let (mirror, metrics) = start_mirror(&bed);
    let url = |path: &str| format!("http://{metrics}{path}");

    let health = http_get(&bed.server, &url("/healthz"));
    assert_eq!(health.status, 200, "GET /healthz: {health:?}");
    let unknown = http_get(&bed.server, &url("/admin"));
    assert_eq!(unknown.status, 404, "GET /admin: {unknown:?}");

    let addr: SocketAddr = metrics.parse().expect("address");
    let refused = in_namespace(&bed.server, move || oversized_request(addr, 100 << 10));
    match &refused {
        Refusal::Status(line) => {
            let status: u16 = line
                .split_whitespace()
                .nth(1)
                .and_then(|code| code.parse().ok())
                .unwrap_or(0);
            assert!(
                (400..500).contains(&status),
                "a 100 KiB request head must get a 4xx, got: {line}"
            );
        }
        Refusal::Closed(_) => {}
        Refusal::Hung => panic!("a 100 KiB request head got no answer and no close within 10 s"),
    }

    let after = http_get(&bed.server, &url("/metrics"));
    assert_eq!(
        after.status, 200,
        "GET /metrics after the oversized request ({refused:?}): {after:?}"
    );
    assert!(
        after.body.contains("mirror_connections_opened_total"),
        "{}",
        after.body
    );
    mirror.stop();
}

/// How the server met a request it must refuse.
#[derive(Debug)]
enum Refusal {
    /// It answered; the status line.
    Status(String),
    /// It closed or reset the connection without an answer (how).
    Closed(#[expect(dead_code, reason = "read through Debug, in assertion messages")] String),
    /// Neither within the timeout.
    Hung,
}

/// Sends `GET /metrics` with one header of `header_bytes` to `addr`, from
/// the calling thread's namespace, and says how the server reacted.
fn oversized_request(addr: SocketAddr, header_bytes: usize) -> Refusal {
    let timeout = Duration::from_secs(10);
    let mut stream = TcpStream::connect_timeout(&addr, timeout).expect("connect to --metrics");
    stream.set_read_timeout(Some(timeout)).expect("timeout");
    stream.set_write_timeout(Some(timeout)).expect("timeout");
    let head = format!(
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(header_bytes)
    );
    // The server may stop reading and close before all of it is sent.
    let written = stream.write_all(head.as_bytes());
    let mut answer = Vec::new();
    let read = stream.read_to_end(&mut answer);
    if let Some(line) = answer
        .split(|&b| b == b'\n')
        .next()
        .filter(|l| !l.is_empty())
    {
        return Refusal::Status(String::from_utf8_lossy(line).trim_end().to_owned());
    }
    match (written, read) {
        (_, Err(e)) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            Refusal::Hung
        }
        (Err(e), _) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            Refusal::Hung
        }
        (written, read) => Refusal::Closed(format!("write: {written:?}, read: {read:?}")),
    }
}

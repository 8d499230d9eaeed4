//! Test traffic: files of random bytes sent over TCP by socat from chosen
//! client ports, a server that keeps each connection, and the mirror's
//! dumps of them.

use std::{
    fs,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use mirror_user::sinks::dump::tcpflow_name;
use serde_json::Value;

use crate::netns::{KillOnDrop, in_ns, run_in, spawn, wait_listening};

pub const MIB: usize = 1 << 20;

/// A file to send, and the client port it is sent from.
#[derive(Debug, Clone)]
pub struct SentFile {
    pub client_port: u16,
    pub path: PathBuf,
    pub len: usize,
}

impl SentFile {
    pub fn bytes(&self) -> Vec<u8> {
        fs::read(&self.path).expect("sent file")
    }
}

/// `count` files of random bytes in `dir`, sizes spread from `min` to
/// `max`, sent from client ports `first_port`, `first_port + 1`, ...
pub fn random_files(
    dir: &Path,
    first_port: u16,
    count: usize,
    min: usize,
    max: usize,
) -> Vec<SentFile> {
    fs::create_dir_all(dir).expect("mkdir");
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
            let path = dir.join(format!("send-{first_port}-{i}"));
            fs::write(&path, &data).expect("write");
            SentFile {
                client_port: first_port + i as u16,
                path,
                len,
            }
        })
        .collect()
}

/// A socat server on `port` in `ns` that writes each connection to
/// `dir/<client port>`.
pub fn start_server(ns: &str, port: u16, dir: &Path) -> KillOnDrop {
    fs::create_dir_all(dir).expect("mkdir");
    let server = spawn(in_ns(ns, "socat").args([
        "-u".to_owned(),
        format!("TCP-LISTEN:{port},reuseaddr,fork"),
        format!("SYSTEM:cat > {}/$SOCAT_PEERPORT", dir.display()),
    ]));
    wait_listening(ns, port);
    server
}

/// Starts sending every file at once from `ns`, one connection each.
pub fn start_sending(ns: &str, server: &str, port: u16, files: &[SentFile]) -> Vec<KillOnDrop> {
    files
        .iter()
        .map(|file| {
            spawn(in_ns(ns, "socat").args([
                "-u".to_owned(),
                format!("OPEN:{}", file.path.display()),
                format!(
                    "TCP:{server}:{port},sourceport={},reuseaddr",
                    file.client_port
                ),
            ]))
        })
        .collect()
}

/// Waits for the senders, then until the server holds every file and
/// has closed each connection: its FIN has passed every hook on its way to
/// the client before the test stops the mirror, which otherwise races the
/// server's close and may miss it.
pub fn finish_sending(
    client_ns: &str,
    port: u16,
    senders: Vec<KillOnDrop>,
    files: &[SentFile],
    received: &Path,
) {
    for sender in senders {
        sender.wait_success("a socat client", Duration::from_secs(120));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for file in files {
        let path = received.join(file.client_port.to_string());
        while fs::metadata(&path).map(|m| m.len() as usize).unwrap_or(0) < file.len {
            assert!(
                Instant::now() < deadline,
                "the server did not receive {}",
                file.client_port
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
    loop {
        let waiting = awaiting_server_fin(client_ns, port, files);
        if waiting.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not close the connections from client ports {waiting:?}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// The client ports among `files` whose sockets in `client_ns` have not
/// yet received the server's FIN.
fn awaiting_server_fin(client_ns: &str, port: u16, files: &[SentFile]) -> Vec<u16> {
    let filter = format!("dport = :{port}");
    let out = run_in(
        client_ns,
        "ss",
        &[
            "-Htn",
            "state",
            "syn-sent",
            "state",
            "established",
            "state",
            "fin-wait-1",
            "state",
            "fin-wait-2",
            &filter,
        ],
    );
    let open: Vec<u16> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            // [State] Recv-Q Send-Q Local:Port Peer:Port
            let local = line.split_whitespace().rev().nth(1)?;
            local.rsplit(':').next()?.parse().ok()
        })
        .collect();
    files
        .iter()
        .map(|file| file.client_port)
        .filter(|client_port| open.contains(client_port))
        .collect()
}

/// Sends every file and waits until the server holds them all and has
/// closed each connection.
pub fn send_all(ns: &str, server: &str, port: u16, files: &[SentFile], received: &Path) {
    finish_sending(
        ns,
        port,
        start_sending(ns, server, port, files),
        files,
        received,
    );
}

/// Limits what `iface` in `ns` sends to `rate` (tc tbf; the bucket holds
/// whole 64 KiB GSO packets): a fixed offered load, so a busy 2-core test
/// machine keeps the CPU for the mirror and its consumers, and results do
/// not depend on how fast the machine is.
pub fn shape(ns: &str, iface: &str, rate: &str) {
    run_in(
        ns,
        "tc",
        &[
            "qdisc", "add", "dev", iface, "root", "tbf", "rate", rate, "burst", "512kb", "latency",
            "100ms",
        ],
    );
}

/// The parts a dump directory holds for one connection (`NAME`, then
/// `NAMEc1`... when it was picked up again after a loss), each with its
/// sidecar (`null` when there is none: its writer was killed before the
/// connection ended).
pub fn dumped(dump: &Path, client: &str, server: &str) -> Vec<(Vec<u8>, Value)> {
    let base = tcpflow_name(
        client.parse().expect("client"),
        server.parse().expect("server"),
    );
    let mut parts = Vec::new();
    for name in std::iter::once(base.clone()).chain((1..).map(|n| format!("{base}c{n}"))) {
        let Ok(bytes) = fs::read(dump.join(&name)) else {
            break;
        };
        let meta = fs::read(dump.join(format!("{name}.meta")))
            .map(|meta| serde_json::from_slice(&meta).expect("sidecar JSON"))
            .unwrap_or(Value::Null);
        parts.push((bytes, meta));
    }
    parts
}

//! Fleets over NATS JetStream: two mirrors (nodes `a` and `b`) publish
//! their streams to a three-server JetStream cluster, and `mirror tail
//! --nats` rebuilds every connection of both from another server of the
//! cluster, through a server killed under load and a cluster stopped for
//! a few seconds.
//!
//! Topology: each node is a test bed (client and server namespaces joined
//! by a veth pair) standing for a pod, and a "host" namespace standing for
//! the node, where its mirror runs and watches the pod from outside:
//! node `a` with `--netns POD --iface IF`, node `b` with `--pid PID` of a
//! process in the pod and no `--iface` (every interface of the pod but
//! `lo`). The mirror's own sockets, NATS connection included, stay in the
//! host namespace. The cluster runs in a namespace of its own, its routes
//! over that namespace's loopback, its client ports on every address; each
//! host namespace reaches it over a veth pair (198.18.10.0/24 for `a`,
//! 198.18.11.0/24 for `b`), so the mirror's NATS traffic never crosses
//! the interface it watches. Ports are fixed: nothing else listens in a
//! namespace the test just made.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use mirror_tests::{
    bed::{TestBed, scratch_dir},
    mirror_process::{ClientProcess, MirrorProcess},
    needs_root,
    netns::{KillOnDrop, TestNet, in_ns, sleeper_in, spawn},
    traffic::{MIB, SentFile},
};
use mirror_user::sinks::dump::tcpflow_name;
use serde_json::Value;
use tempfile::TempDir;

const PORT: u16 = 8080;
const SERVERS: usize = 3;

fn client_port(i: usize) -> u16 {
    4222 + i as u16
}

fn cluster_port(i: usize) -> u16 {
    6222 + i as u16
}

fn monitor_port(i: usize) -> u16 {
    8222 + i as u16
}

/// A JetStream cluster of [`SERVERS`] nats-servers in namespace `ns`, their
/// stores in a scratch directory removed with it. Servers are killed when
/// this is dropped (declared after the namespaces: dropped before them).
struct Cluster {
    ns: String,
    store: TempDir,
    servers: Vec<Option<KillOnDrop>>,
}

impl Cluster {
    fn start(ns: &str) -> Self {
        let mut cluster = Self {
            ns: ns.to_owned(),
            store: scratch_dir(),
            servers: (0..SERVERS).map(|_| None).collect(),
        };
        for i in 0..SERVERS {
            cluster.start_server(i);
        }
        cluster.wait_healthy();
        cluster
    }

    fn start_server(&mut self, i: usize) {
        let routes: Vec<String> = (0..SERVERS)
            .filter(|other| *other != i)
            .map(|other| format!("nats://127.0.0.1:{}", cluster_port(other)))
            .collect();
        let store = self.store.path().join(format!("n{i}"));
        let log = self.store.path().join(format!("n{i}.log"));
        let mut command = in_ns(&self.ns, "nats-server");
        command
            .args(["-a", "0.0.0.0", "-p", &client_port(i).to_string()])
            .args(["-m", &monitor_port(i).to_string()])
            .args(["-js", "-sd", &store.display().to_string()])
            .args(["--server_name", &format!("n{i}"), "--cluster_name", "mt"])
            .args([
                "--cluster",
                &format!("nats://127.0.0.1:{}", cluster_port(i)),
            ])
            .args(["--routes", &routes.join(",")])
            .args(["-l", &log.display().to_string()]);
        self.servers[i] = Some(spawn(&mut command));
    }

    /// Stops server `i` (SIGKILL: a crash, not a goodbye).
    fn kill(&mut self, i: usize) {
        drop(self.servers[i].take());
    }

    /// Waits until every running server says JetStream is up (at most 60 s).
    fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        for i in (0..SERVERS).filter(|i| self.servers[*i].is_some()) {
            let url = format!("http://127.0.0.1:{}/healthz", monitor_port(i));
            loop {
                let out = in_ns(&self.ns, "curl")
                    .args(["-s", "--max-time", "2", &url])
                    .output()
                    .expect("curl");
                if String::from_utf8_lossy(&out.stdout).contains("\"ok\"") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "NATS server n{i} is not healthy after 60 s:\n{}",
                    fs::read_to_string(self.store.path().join(format!("n{i}.log")))
                        .unwrap_or_default()
                );
                thread::sleep(Duration::from_millis(200));
            }
        }
    }

    /// The client URLs of every server, as `addr` reaches them.
    fn urls(addr: &str) -> String {
        (0..SERVERS)
            .map(|i| format!("nats://{addr}:{}", client_port(i)))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// One node: its test bed, the address of the cluster from it, its
/// mirror's dump directory.
struct Node {
    name: &'static str,
    bed: TestBed,
    /// The node's own namespace, where its mirror runs.
    host: String,
    /// A process in the pod (the bed's server namespace), for `--pid`.
    pod_process: Option<KillOnDrop>,
    nats: String,
    dump: PathBuf,
    first_port: u16,
}

impl Node {
    /// The files of `phase`, sent from client ports of their own (the two
    /// beds share addresses: their files must not share names in the
    /// tail's dump).
    fn files(&self, phase: u16, count: usize, min: usize, max: usize) -> Vec<SentFile> {
        self.bed
            .random_files(self.first_port + phase * 100, count, min, max)
    }
}

/// Starts the mirror of `node` in its host namespace, watching the pod
/// from there (`--pid` when the node has a pod process, else `--netns`
/// with the pod's interface) and publishing to NATS.
fn start_mirror(node: &Node) -> MirrorProcess {
    let dump = node.dump.display().to_string();
    let port = PORT.to_string();
    let pid = node.pod_process.as_ref().map(|p| p.0.id().to_string());
    let mut args = match &pid {
        Some(pid) => vec!["--pid", pid],
        None => vec!["--netns", &node.bed.server, "--iface", node.bed.iface],
    };
    args.extend([
        "--port",
        &port,
        "--dump-dir",
        &dump,
        "--nats",
        &node.nats,
        "--node-name",
        node.name,
        "--nats-replicas",
        "3",
    ]);
    MirrorProcess::start_quiet(&node.host, &args)
}

/// Waits (at most `timeout`) until `check` passes; returns its last failure.
fn eventually(
    timeout: Duration,
    mut check: impl FnMut() -> Result<(), String>,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(()) => return Ok(()),
            Err(failure) if Instant::now() > deadline => return Err(failure),
            Err(_) => thread::sleep(Duration::from_millis(250)),
        }
    }
}

/// The parts `dump` holds of the connection that sent `file`, each with
/// its sidecar; `None` while a sidecar is being written (the dumps are
/// read while they grow).
fn parts(node: &Node, dump: &Path, file: &SentFile) -> Option<Vec<(Vec<u8>, Value)>> {
    let base = tcpflow_name(
        format!("{}:{}", node.bed.client_ip, file.client_port)
            .parse()
            .expect("client"),
        format!("{}:{PORT}", node.bed.server_ip)
            .parse()
            .expect("server"),
    );
    let mut parts = Vec::new();
    for name in std::iter::once(base.clone()).chain((1..).map(|n| format!("{base}c{n}"))) {
        let Ok(bytes) = fs::read(dump.join(&name)) else {
            break;
        };
        let meta = fs::read(dump.join(format!("{name}.meta"))).ok()?;
        parts.push((bytes, serde_json::from_slice(&meta).ok()?));
    }
    Some(parts)
}

/// Whether `dump` holds each of `files` whole, ended by FIN.
fn whole(node: &Node, dump: &Path, files: &[SentFile]) -> Result<(), String> {
    for file in files {
        let parts = parts(node, dump, file).ok_or("a sidecar is being written")?;
        let sent = file.bytes();
        match &parts[..] {
            [(stream, meta)] if *stream == sent && meta["complete"] == true => {}
            other => {
                return Err(format!(
                    "node {} connection from port {}: {} parts, {:?} bytes of {}, {:?}",
                    node.name,
                    file.client_port,
                    other.len(),
                    other.iter().map(|(s, _)| s.len()).collect::<Vec<_>>(),
                    sent.len(),
                    other
                        .iter()
                        .map(|(_, m)| m["reason"].clone())
                        .collect::<Vec<_>>()
                ));
            }
        }
    }
    Ok(())
}

/// Whether every connection of `files` in `dump` ended explicitly: whole
/// with FIN, or a prefix closed with a reason that says it is not whole.
fn explicit(node: &Node, dump: &Path, files: &[SentFile]) -> Result<usize, String> {
    let mut cut = 0;
    for file in files {
        let sent = file.bytes();
        for (stream, meta) in parts(node, dump, file).ok_or("a sidecar is being written")? {
            let reason = meta["reason"].as_str().unwrap_or("open").to_owned();
            let ok = match reason.as_str() {
                // Shown from the middle (its start lost): marked as such.
                _ if meta["midstream"] == true => meta["complete"] == false,
                "fin" => stream == sent,
                "lagged" | "gap" => sent.starts_with(&stream),
                _ => false,
            };
            if !ok {
                return Err(format!(
                    "node {} connection from port {}: {} of {} bytes, ended {reason}",
                    node.name,
                    file.client_port,
                    stream.len(),
                    sent.len()
                ));
            }
            cut += usize::from(reason != "fin");
        }
    }
    Ok(cut)
}

#[test]
fn a_fleet_publishes_whole_streams_through_nats_failures() {
    needs_root!();
    assert!(
        Command::new("nats-server")
            .arg("--version")
            .output()
            .is_ok(),
        "nats-server is missing: run `cargo xtask setup`"
    );
    let mut net = TestNet::new();
    let nats_ns = net.namespace("nats");
    let mut nodes = Vec::new();
    for (i, name) in ["a", "b"].into_iter().enumerate() {
        let bed = TestBed::new();
        let host = net.namespace(&format!("host{name}"));
        let subnet = 10 + i;
        net.veth(
            (&host, "nq0", &format!("198.18.{subnet}.2/24")),
            (
                &nats_ns,
                &format!("nq{name}"),
                &format!("198.18.{subnet}.1/24"),
            ),
        );
        let dump = bed.new_path("mirror-dump");
        let pod_process = (name == "b").then(|| sleeper_in(&bed.server));
        nodes.push(Node {
            name,
            host,
            pod_process,
            nats: Cluster::urls(&format!("198.18.{subnet}.1")),
            dump,
            bed,
            first_port: 41000 + 1000 * i as u16,
        });
    }
    let mut cluster = Cluster::start(&nats_ns);
    let mirrors: Vec<MirrorProcess> = nodes.iter().map(start_mirror).collect();

    // 1. Load on both nodes; one server of the cluster dies in the middle.
    let phase1: Vec<Vec<SentFile>> = nodes
        .iter()
        .map(|n| n.files(1, 8, 256 << 10, 3 * MIB))
        .collect();
    let transfers: Vec<_> = nodes
        .iter()
        .zip(&phase1)
        .map(|(node, files)| node.bed.transfer(PORT, files.clone()))
        .collect();
    let senders: Vec<_> = transfers.iter().map(|t| t.start_sending()).collect();
    thread::sleep(Duration::from_millis(300));
    cluster.kill(0);
    for (transfer, senders) in transfers.iter().zip(senders) {
        transfer.finish_sending(senders);
    }
    cluster.start_server(0);
    cluster.wait_healthy();

    // 2. Every server stopped for a few seconds while the nodes serve.
    for i in 0..SERVERS {
        cluster.kill(i);
    }
    // More than the consumer's window and its channel hold (32 MiB each):
    // some connections must end as lagged.
    let phase2: Vec<Vec<SentFile>> = nodes
        .iter()
        .map(|n| n.files(2, 10, 4 * MIB, 12 * MIB))
        .collect();
    for (transfer, files) in transfers.iter().zip(&phase2) {
        transfer.send(files);
    }
    thread::sleep(Duration::from_secs(3));
    for i in 0..SERVERS {
        cluster.start_server(i);
    }
    cluster.wait_healthy();

    // 3. Publishing resumes.
    let phase3: Vec<Vec<SentFile>> = nodes.iter().map(|n| n.files(3, 6, 64 << 10, MIB)).collect();
    for (transfer, files) in transfers.iter().zip(&phase3) {
        transfer.send(files);
    }

    // Each mirror's other consumer never noticed NATS.
    for (node, files) in nodes.iter().zip(phase1.iter().zip(&phase2).zip(&phase3)) {
        let ((p1, p2), p3) = files;
        for phase in [p1, p2, p3] {
            eventually(Duration::from_secs(20), || whole(node, &node.dump, phase))
                .unwrap_or_else(|failure| panic!("the mirror's own dump: {failure}"));
        }
    }

    // The tail, from the cluster's last server, rebuilds both nodes.
    let tail_dump = nodes[0].bed.new_path("tail-dump");
    let tail_url = format!("nats://127.0.0.1:{}", client_port(SERVERS - 1));
    let tail_dir = tail_dump.display().to_string();
    let port = PORT.to_string();
    let tail = ClientProcess::tail_with(
        Some(&nats_ns),
        &[
            "--nats",
            &tail_url,
            "--port",
            &port,
            "--dump-dir",
            &tail_dir,
            "--user",
            "root",
        ],
    );
    let checked = eventually(Duration::from_secs(60), || {
        for (node, (p1, p3)) in nodes.iter().zip(phase1.iter().zip(&phase3)) {
            whole(node, &tail_dump, p1)?;
            whole(node, &tail_dump, p3)?;
        }
        Ok(())
    });
    let mut cut = 0;
    let explicit_ends = eventually(Duration::from_secs(40), || {
        cut = 0;
        for (node, p2) in nodes.iter().zip(&phase2) {
            cut += explicit(node, &tail_dump, p2)?;
        }
        Ok(())
    });
    tail.signal(libc::SIGINT);
    let (_, tail_stderr) = tail.wait(Duration::from_secs(10));
    // The mirrors stop before any verdict, so that a failure can show what
    // their NATS publishers went through.
    let outputs: Vec<_> = mirrors.into_iter().map(MirrorProcess::interrupt).collect();
    let publishers: String = nodes
        .iter()
        .zip(&outputs)
        .map(|(node, output)| {
            let lines: Vec<&str> = output
                .stderr
                .lines()
                .filter(|line| line.contains("NATS"))
                .collect();
            let counters: Vec<String> = output
                .counters
                .iter()
                .filter(|(name, _)| name.starts_with("nats.") || name.contains("lagged"))
                .map(|(name, value)| format!("{name}={value}"))
                .collect();
            format!(
                "node {}: {}\n{}\n",
                node.name,
                counters.join(" "),
                lines.join("\n")
            )
        })
        .collect();
    checked.unwrap_or_else(|failure| {
        panic!("the tail's dump: {failure}\n{tail_stderr}\n{publishers}")
    });
    explicit_ends.unwrap_or_else(|failure| {
        panic!("while NATS was down: {failure}\n{tail_stderr}\n{publishers}")
    });
    assert!(
        cut > 0,
        "no connection was cut while NATS was down: the test did not fill the window\n{tail_stderr}\n{publishers}"
    );

    let mut lagged_closes = 0;
    for (node, output) in nodes.iter().zip(&outputs) {
        let acked = output.counter("nats.acked");
        assert!(acked > 0, "node {}: nothing acknowledged", node.name);
        lagged_closes += output.counter("nats.lagged_closes");
        assert_eq!(
            output.counter("consumers.dump-dir.lagged_connections"),
            0,
            "node {}: the dump lost connections to NATS",
            node.name
        );
    }
    assert_eq!(
        lagged_closes, cut as u64,
        "every connection cut on NATS was counted, and only those"
    );
    drop(transfers);
    drop(cluster);
}

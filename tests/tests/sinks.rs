//! Shadow forwarding to a staging copy of a service, and capture files
//! read back by tcpdump and tshark.
//!
//! Forwarding tests: three hosts. The client (curl) reaches the primary
//! nginx over one veth pair; the primary reaches its shadow nginx over
//! another; the mirror runs beside the primary and forwards to the shadow.

use std::{collections::BTreeSet, fs, path::Path, process::Command, thread, time::Duration};

use mirror_tests::{
    bed::TestBed,
    mirror_process::{MirrorOutput, MirrorProcess, assert_refused, mirror_bin, run_mirror},
    needs_root,
    netns::{KillOnDrop, in_ns, run_ok, spawn, tcx_programs},
    traffic::MIB,
    web::Nginx,
};

const PRIMARY: &str = TestBed::SERVER_IP;
const SHADOW: &str = TestBed::SHADOW_IP;

/// The client, the primary (the bed's server) and the shadow behind it.
struct Hosts {
    bed: TestBed,
    shadow: String,
}

fn hosts() -> Hosts {
    let mut bed = TestBed::new();
    let shadow = bed.add_shadow();
    Hosts { bed, shadow }
}

impl Hosts {
    /// Starts nginx on the primary and on the shadow, then the mirror on
    /// the primary's port 80, forwarding to the shadow, with `extra`.
    fn start(&self, extra: &[&str]) -> (Nginx, Nginx, MirrorProcess) {
        let primary = Nginx::start(&self.bed.server, PRIMARY, &self.bed.path("primary"));
        let shadow = Nginx::start(&self.shadow, SHADOW, &self.bed.path("shadow"));
        let target = format!("{SHADOW}:80");
        let mut args = vec![
            "--iface",
            self.bed.iface,
            "--port",
            "80",
            "--forward",
            &target,
        ];
        args.extend(extra);
        (
            primary,
            shadow,
            MirrorProcess::start_quiet(&self.bed.server, &args),
        )
    }

    /// `connections` curl processes at once, each sending `requests`
    /// requests on one keep-alive connection to `/TAG/<connection>/<n>`;
    /// returns the request lines sent.
    fn load(&self, tag: &str, connections: usize, requests: usize) -> Vec<String> {
        let mut sent = Vec::new();
        let clients: Vec<KillOnDrop> = (0..connections)
            .map(|c| {
                let urls: Vec<String> = (0..requests)
                    .map(|n| {
                        sent.push(format!("GET /{tag}/{c}/{n} HTTP/1.1"));
                        format!("http://{PRIMARY}/{tag}/{c}/{n}")
                    })
                    .collect();
                let mut command = in_ns(&self.bed.client, "curl");
                command
                    .args(["-s", "-f", "--http1.1", "--max-time", "30"])
                    .args(urls.iter().flat_map(|u| [u.as_str(), "-o", "/dev/null"]));
                spawn(&mut command)
            })
            .collect();
        for client in clients {
            client.wait_success("curl", Duration::from_secs(60));
        }
        sent.sort();
        sent
    }
}

fn sorted(mut lines: Vec<String>) -> Vec<String> {
    lines.sort();
    lines
}

fn forward(output: &MirrorOutput, name: &str) -> u64 {
    output.counter(&format!("forward.{SHADOW}:80.{name}"))
}

/// Asserts that each of the forwarder's counters (`completed`, `failed`,
/// ...) has its value.
fn assert_forwarded(output: &MirrorOutput, expected: &[(&str, u64)]) {
    for &(name, value) in expected {
        assert_eq!(forward(output, name), value, "{name}\n{output}");
    }
}

/// Waits until the forwarder has ended `connections` shadow connections
/// (completed or failed): the shadow can hold a request before the
/// client's FIN has travelled through the mirror.
fn forwards_ended(mirror: &MirrorProcess, connections: u64) {
    let ended = |counters: &std::collections::BTreeMap<String, u64>| {
        let get = |name: &str| {
            counters
                .get(&format!("forward.{SHADOW}:80.{name}"))
                .copied()
        };
        get("completed").unwrap_or(0) + get("failed").unwrap_or(0) >= connections
    };
    // No assertion here: the test's own assertions say what was missing.
    mirror.wait_for_counters(Duration::from_secs(10), ended);
}

#[test]
fn the_shadow_gets_the_requests_of_the_primary() {
    needs_root!();
    let h = hosts();
    let (primary, shadow, mirror) = h.start(&[]);
    let sent = h.load("load", 20, 10);
    assert_eq!(
        sorted(primary.requests()),
        sent,
        "the primary served everything"
    );
    let copied = shadow.wait_for(sent.len());
    forwards_ended(&mirror, 20);
    let output = mirror.stop();
    assert_eq!(
        sorted(copied),
        sent,
        "the shadow got the same requests\n{output}"
    );
    assert_forwarded(
        &output,
        &[("completed", 20), ("failed", 0), ("aborted.target", 0)],
    );
}

#[test]
fn a_shadow_that_goes_down_costs_only_shadow_connections() {
    needs_root!();
    let h = hosts();
    let (primary, mut shadow, mirror) = h.start(&[]);

    let before = h.load("before", 5, 4);
    shadow.wait_for(before.len());
    shadow.stop();
    let during = h.load("during", 5, 4);
    // Longer than a shadow connection's retries (50 + 100 ms): these fail.
    thread::sleep(Duration::from_secs(1));
    shadow.restart();
    // Past the longest pause of a failing target, new connections try it.
    thread::sleep(mirror_user::sinks::forward::MAX_BACKOFF + Duration::from_millis(500));
    let after = h.load("after", 5, 4);
    let copied = shadow.wait_for(before.len() + after.len());
    forwards_ended(&mirror, 15);
    let output = mirror.stop();

    let mut everything = [before.clone(), during, after.clone()].concat();
    everything.sort();
    assert_eq!(
        sorted(primary.requests()),
        everything,
        "the primary lost nothing"
    );
    let mut expected = [before, after].concat();
    expected.sort();
    assert_eq!(sorted(copied), expected, "forwarding resumed\n{output}");
    assert_forwarded(&output, &[("failed", 5), ("completed", 10)]);
}

#[test]
fn sampling_forwards_about_half_the_connections_whole() {
    needs_root!();
    let h = hosts();
    let (primary, shadow, mirror) = h.start(&["--forward-sample", "50"]);
    let mut sent = Vec::new();
    for round in 0..4 {
        sent.extend(h.load(&format!("s{round}"), 10, 3));
    }
    assert_eq!(primary.requests().len(), 120);
    thread::sleep(Duration::from_secs(1));
    let output = mirror.stop();
    let copied = shadow.requests();
    let forwarded = forward(&output, "completed");
    let skipped = forward(&output, "skipped.sample");
    assert_eq!(forwarded + skipped, 40, "{output}");
    // Binomial(40, 1/2): outside 8..=32 once in 60000 runs.
    assert!((8..=32).contains(&forwarded), "{forwarded} of 40 forwarded");
    // Whole connections: each forwarded one brought its three requests.
    assert_eq!(copied.len() as u64, 3 * forwarded, "{copied:?}");
    let sent: BTreeSet<String> = sent.into_iter().collect();
    let mut by_connection: BTreeSet<String> = BTreeSet::new();
    for line in &copied {
        assert!(sent.contains(line), "{line} was sent");
        // "GET /s0/<connection>/<n> HTTP/1.1": the path without its last part.
        let path = line.split_whitespace().nth(1).unwrap_or_default();
        let connection = path.rsplit_once('/').map(|(conn, _)| conn.to_owned());
        by_connection.insert(connection.unwrap_or_default());
    }
    assert_eq!(
        by_connection.len() as u64,
        forwarded,
        "three requests per forwarded connection"
    );
}

/// Sends `len` random bytes on one connection with the mirror running
/// with `args`; returns what was sent and the mirror's output.
fn transfer(bed: &TestBed, len: usize, args: &[&str]) -> (Vec<u8>, MirrorOutput) {
    let transfer = bed.transfer(5201, bed.random_files(46000, 1, len, len));
    let mirror = bed.mirror(5201, args, MirrorProcess::start_quiet);
    transfer.send_all();
    let output = mirror.stop();
    (transfer.files[0].bytes(), output)
}

/// What tcpdump prints of a capture file, one line per packet.
fn tcpdump_read(file: &Path) -> String {
    let out = run_ok(Command::new("tcpdump").args(["-nn", "-r"]).arg(file));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn packets_read_by_tcpdump(file: &Path) -> u64 {
    tcpdump_read(file).lines().count() as u64
}

/// tshark's follow-stream of TCP stream 0 of a capture file, in hex.
fn tshark_follow(file: &Path) -> String {
    let out = run_ok(
        Command::new("tshark")
            .args(["-q", "-z", "follow,tcp,raw,0", "-r"])
            .arg(file),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The client's bytes of TCP stream 0, as tshark's follow-stream
/// reassembles them.
fn follow_stream(file: &Path) -> Vec<u8> {
    let text = tshark_follow(file);
    let mut bytes = Vec::new();
    for line in text.lines() {
        let is_hex = !line.is_empty() && line.bytes().all(|b| b.is_ascii_hexdigit());
        if is_hex {
            for pair in line.as_bytes().chunks(2) {
                let pair = std::str::from_utf8(pair).unwrap();
                bytes.push(u8::from_str_radix(pair, 16).unwrap());
            }
        }
    }
    bytes
}

/// Sends `len` bytes on one connection with the mirror capturing to the
/// file `name` (with `extra` arguments), and asserts that tcpdump reads
/// every mirrored packet from it and tshark reassembles the transfer.
/// Returns the mirror's output.
fn assert_capture_reads_back(name: &str, len: usize, extra: &[&str]) -> MirrorOutput {
    let c = TestBed::new();
    let file = c.path("out").join(name);
    let mut args = vec!["--pcap", file.to_str().unwrap()];
    args.extend(extra);
    let (sent, output) = transfer(&c, len, &args);
    assert_eq!(
        packets_read_by_tcpdump(&file),
        output.kernel("mirrored"),
        "every mirrored packet is in the file\n{output}"
    );
    let stream = follow_stream(&file);
    assert!(
        stream == sent,
        "tshark reassembles the transfer ({} of {} bytes)",
        stream.len(),
        sent.len()
    );
    output
}

#[test]
fn pcapng_captures_read_back_whole_in_tshark() {
    needs_root!();
    let output = assert_capture_reads_back("capture.pcapng", 4 * MIB, &[]);
    assert_eq!(output.counter("pcap.written"), output.kernel("mirrored"));
}

#[test]
fn classic_pcap_reads_back_too() {
    needs_root!();
    assert_capture_reads_back("capture.pcap", MIB, &["--pcap-format", "pcap"]);
}

#[test]
fn rotation_keeps_the_configured_number_of_files() {
    needs_root!();
    let c = TestBed::new();
    let dir = c.path("out");
    let file_arg = dir.join("rot").display().to_string();
    // Rotated files are created after the mirror gave up root: the
    // directory must be writable by the user it runs as.
    let args = [
        "run",
        "--iface",
        "srv0",
        "--port",
        "5201",
        "--pcap",
        &file_arg,
        "--pcap-rotate-size",
        "1M",
    ];
    assert_refused(
        &run_mirror(Some(&c.server), &args),
        "is not writable by the user the mirror runs as (nobody)",
    );
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 0, "nothing created");
    std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).expect("chown");
    let (_, output) = transfer(
        &c,
        8 * MIB,
        &[
            "--pcap",
            &file_arg,
            "--pcap-rotate-size",
            "1M",
            "--pcap-keep",
            "3",
        ],
    );
    let mut names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(output.counter("pcap.files") >= 8, "{output}");
    // The newest files, each a readable capture.
    for name in &names {
        assert!(packets_read_by_tcpdump(&dir.join(name)) > 0, "{name}");
    }
}

#[test]
fn a_full_disk_stops_the_capture_and_nothing_else() {
    needs_root!();
    let c = TestBed::new();
    // The mirror creates the directory, for the user it runs as.
    let dump = c.new_path("dump");
    let args = ["--pcap", "/dev/full", "--dump-dir", dump.to_str().unwrap()];
    let (sent, output) = transfer(&c, 4 * MIB, &args);
    assert!(output.counter("pcap.failed") > 0, "{output}");
    assert!(
        output.stderr.contains("the capture to /dev/full stopped"),
        "{}",
        output.stderr
    );
    let dumped: Vec<_> = fs::read_dir(&dump)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.to_string_lossy().ends_with(".meta"))
        .collect();
    assert_eq!(dumped.len(), 1, "{dumped:?}");
    assert!(
        fs::read(&dumped[0]).unwrap() == sent,
        "the other consumers went on"
    );
}

#[test]
fn pcap_to_stdout_pipes_into_tcpdump() {
    needs_root!();
    let c = TestBed::new();
    let transfer = c.transfer(5201, c.random_files(47000, 1, MIB, MIB));
    let capture_file = c.path("out").join("stdout.pcapng");
    // mirror run ... --pcap - > file: what a pipe into tshark -r - reads.
    let shell = format!(
        "exec {} run --iface srv0 --port 5201 --listen none --pcap - > {}",
        mirror_bin().display(),
        capture_file.display()
    );
    let mirror = spawn(in_ns(&c.server, "sh").args(["-c", &shell]));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !tcx_programs(&c.server, "srv0")
        .iter()
        .any(|p| p == "mirror_tc")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the mirror did not attach"
        );
        thread::sleep(Duration::from_millis(50));
    }
    transfer.send_all();
    thread::sleep(Duration::from_millis(500));
    let pid = mirror.0.id() as libc::pid_t;
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(pid, libc::SIGINT) };
    mirror.wait_success("mirror --pcap -", Duration::from_secs(30));
    assert!(packets_read_by_tcpdump(&capture_file) > 0);
    let stream = follow_stream(&capture_file);
    let sent = transfer.files[0].bytes();
    if stream != sent {
        panic!(
            "{} of {} bytes\ntshark:\n{}\ntcpdump:\n{}",
            stream.len(),
            sent.len(),
            tshark_follow(&capture_file)
                .chars()
                .take(1500)
                .collect::<String>(),
            tcpdump_read(&capture_file)
                .lines()
                .take(8)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

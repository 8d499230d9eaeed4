//! The subscriber server end to end, with the real binaries: `mirror tail`
//! clients in separate processes, live port changes with `mirror ports`,
//! refused clients, and clients that stop reading.

use std::{
    fs,
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use bytes::BytesMut;
use mirror_tests::{
    mirror_process::{ClientProcess, MirrorOutput, MirrorProcess, run_mirror, tail_totals},
    netns::ClientServer,
    traffic::{
        MIB, SentFile, dumped, finish_sending, random_files, send_all, shape, start_sending,
        start_server,
    },
};
use mirror_user::{
    protocol::{ClientFrame, ErrorCode, ServerFrame},
    stream::CloseReason,
};
use serde_json::Value;

const PORT: u16 = 5201;
const SERVER: &str = ClientServer::SERVER_IP;

struct Setup {
    net: ClientServer,
    dir: tempfile::TempDir,
}

fn setup() -> Setup {
    Setup {
        net: ClientServer::new(),
        dir: tempfile::tempdir().expect("temp dir"),
    }
}

impl Setup {
    fn path(&self, name: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        fs::create_dir_all(&path).expect("mkdir");
        path
    }

    /// A path for the mirror to create (a dump directory: created by the
    /// mirror for the user it runs as).
    fn arg(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

fn parts(dump: &Path, file: &SentFile, port: u16) -> Vec<(Vec<u8>, Value)> {
    dumped(
        dump,
        &format!("{}:{}", ClientServer::CLIENT_IP, file.client_port),
        &format!("{SERVER}:{port}"),
    )
}

/// Every file arrived whole in `dump`, and ended with FIN.
fn assert_complete(dump: &Path, files: &[SentFile], port: u16, what: &str) {
    for file in files {
        let parts = parts(dump, file, port);
        assert_eq!(
            parts.len(),
            1,
            "{what}: connection {}: one file",
            file.client_port
        );
        let (stream, meta) = &parts[0];
        assert!(
            stream == &file.bytes(),
            "{what}: connection {}: {} of {} bytes ({meta})",
            file.client_port,
            stream.len(),
            file.len
        );
        assert_eq!(meta["reason"], "fin", "{what}: {meta}");
    }
}

fn counters(output: &MirrorOutput) -> String {
    format!("{:#?}\nstderr:\n{}", output.counters, output.stderr)
}

#[test]
fn two_clients_get_whole_streams_and_a_killed_one_harms_nothing() {
    let s = setup();
    let (a_dump, b_dump) = (s.arg("a"), s.arg("b"));
    let received = s.path("received");
    let files = random_files(&s.path("send"), 42000, 4, 6 * MIB, 8 * MIB);
    shape(&s.net.client, "cli0", "400mbit");
    let _server = start_server(&s.net.server, PORT, &received);
    let mirror = MirrorProcess::start_quiet(&s.net.server, &["--iface", "srv0", "--port", "5201"]);
    let a = ClientProcess::tail(
        None,
        &mirror.endpoint(),
        &["--port", "5201", "--dump-dir", &a_dump],
    );
    let b = ClientProcess::tail(
        None,
        &mirror.endpoint(),
        &["--port", "5201", "--dump-dir", &b_dump],
    );

    let senders = start_sending(&s.net.client, SERVER, PORT, &files);
    // Mid-stream: 28 MiB at 400 Mbit/s take about 0.6 s.
    thread::sleep(Duration::from_millis(200));
    drop(b);
    finish_sending(senders, &files, &received);
    // The mirror keeps serving: another client gets an answer.
    let listed = run_mirror(None, &["ports", "list", "--connect", &mirror.endpoint()]);
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );

    let output = mirror.interrupt();
    let (status, stderr) = a.wait(Duration::from_secs(30));
    assert!(output.status.success(), "{}", output.stderr);
    assert!(status.success(), "tail a: {stderr}");
    assert_complete(Path::new(&a_dump), &files, PORT, "client a");
    // What it says it received, at exit, is what the server received.
    let totals = tail_totals(&stderr);
    let sent: usize = files.iter().map(|f| f.len).sum();
    assert_eq!(
        (totals.connections, totals.data_bytes),
        (4, sent as u64),
        "{stderr}"
    );
    assert_eq!(totals.closed(CloseReason::Fin), 4, "{stderr}");
    // b got whole connections up to its death and nothing wrong after.
    for file in &files {
        for (stream, meta) in parts(Path::new(&b_dump), file, PORT) {
            assert!(
                file.bytes().starts_with(&stream),
                "client b: a prefix ({meta})"
            );
        }
    }
    assert_eq!(output.kernel("ring_full"), 0, "{}", counters(&output));
    assert_eq!(
        output.counter("connections.closed.fin"),
        4,
        "{}",
        counters(&output)
    );
    assert_eq!(output.counter("server.active"), 0, "{}", counters(&output));
}

#[test]
fn ports_added_and_removed_live_change_what_is_mirrored() {
    let s = setup();
    let dump = s.dir.path().join("dump");
    let dump_arg = dump.display().to_string();
    let received = s.path("received");
    let other = s.path("received-5301");
    shape(&s.net.client, "cli0", "200mbit");
    let _server = start_server(&s.net.server, PORT, &received);
    let _other_server = start_server(&s.net.server, 5301, &other);
    let mirror = MirrorProcess::start_quiet(
        &s.net.server,
        &[
            "--iface",
            "srv0",
            "--port",
            "5201",
            "--allow-ports",
            "5300-5310",
            "--dump-dir",
            &dump_arg,
        ],
    );
    let endpoint = mirror.endpoint();
    let ports = |args: &[&str]| {
        let mut all = vec!["ports"];
        all.extend(args);
        all.extend(["--connect", &endpoint]);
        let out = run_mirror(None, &all);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    // A transfer on the command-line port runs through all the changes.
    let long = random_files(&s.path("send"), 43000, 1, 16 * MIB, 16 * MIB);
    let long_sender = start_sending(&s.net.client, SERVER, PORT, &long);

    let before = random_files(&s.path("send"), 43100, 1, 256 << 10, 256 << 10);
    send_all(&s.net.client, SERVER, 5301, &before, &other);
    let (ok, _, stderr) = ports(&["add", "5301"]);
    assert!(ok, "{stderr}");
    let (_, listed, _) = ports(&["list"]);
    assert!(listed.contains("5301  ports add"), "{listed}");
    let during = random_files(&s.path("send"), 43200, 2, 256 << 10, MIB);
    send_all(&s.net.client, SERVER, 5301, &during, &other);
    let (ok, _, stderr) = ports(&["remove", "5301"]);
    assert!(ok, "{stderr}");
    let after = random_files(&s.path("send"), 43300, 1, 256 << 10, 256 << 10);
    send_all(&s.net.client, SERVER, 5301, &after, &other);
    let (ok, _, stderr) = ports(&["remove", "5201"]);
    assert!(!ok && stderr.contains("command line"), "{stderr}");
    finish_sending(long_sender, &long, &received);

    let output = mirror.interrupt();
    assert!(output.status.success(), "{}", output.stderr);
    assert_complete(&dump, &during, 5301, "after ports add");
    for file in before.iter().chain(&after) {
        assert!(
            parts(&dump, file, 5301).is_empty(),
            "{} was not mirrored",
            file.client_port
        );
    }
    assert_complete(&dump, &long, PORT, "the command-line port, all along");
    assert_eq!(output.kernel("ring_full"), 0, "{}", counters(&output));
}

#[test]
fn bad_clients_are_refused_and_the_server_keeps_serving() {
    let s = setup();
    let token = s.path("secret").join("token");
    fs::write(&token, "right-token\n").unwrap();
    let wrong = s.path("secret").join("wrong");
    fs::write(&wrong, "wrong-token").unwrap();
    let (token_arg, wrong_arg) = (token.display().to_string(), wrong.display().to_string());
    let socket = s.path("sock").join("m.sock");
    let unix = format!("unix:{}", socket.display());
    let tcp = "127.0.0.1:7010";

    // TCP without a token is refused at start.
    let out = run_mirror(
        Some(&s.net.server),
        &["run", "-i", "srv0", "-p", "5201", "--listen", tcp],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs a token"),
        "{out:?}"
    );

    let mirror = MirrorProcess::start_with(
        &s.net.server,
        &[
            "--iface",
            "srv0",
            "--port",
            "5201",
            "--listen",
            &unix,
            "--listen",
            tcp,
            "--token-file",
            &token_arg,
            "--allow-ports",
            "9000",
        ],
        mirror_tests::mirror_process::Stdout::Read,
    );
    let tail = |args: &[&str]| {
        let mut all = vec!["tail", "--connect", tcp];
        all.extend(args);
        run_mirror(Some(&s.net.server), &all)
    };
    let refused = tail(&["--port", "5201", "--token-file", &wrong_arg]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("refused the token"),
        "{refused:?}"
    );
    let no_token = tail(&["--port", "5201"]);
    assert!(
        String::from_utf8_lossy(&no_token.stderr).contains("refused the token"),
        "{no_token:?}"
    );
    let not_allowed = tail(&["--port", "22", "--token-file", &token_arg]);
    assert!(!not_allowed.status.success());
    assert!(
        String::from_utf8_lossy(&not_allowed.stderr)
            .contains("not in the mirror's --allow-ports (9000)"),
        "{not_allowed:?}"
    );
    let good = ClientProcess::tail(
        Some(&s.net.server),
        tcp,
        &["--port", "5201", "--token-file", &token_arg],
    );

    // Below the CLI: a wrong version, then garbage, on raw sockets.
    let hello = ClientFrame::Hello {
        version: 99,
        token: String::new(),
        name: "raw".into(),
    };
    let answer = raw_exchange(&socket, &encode(|b| hello.encode(b)));
    assert!(
        matches!(
            answer,
            ServerFrame::Error {
                code: ErrorCode::UnsupportedVersion,
                fatal: true,
                ..
            }
        ),
        "{answer:?}"
    );
    let answer = raw_exchange(&socket, &[0, 0, 0, 3, 0x01, 0xff, 0xff]);
    assert!(
        matches!(
            answer,
            ServerFrame::Error {
                code: ErrorCode::BadFrame,
                fatal: true,
                ..
            }
        ),
        "{answer:?}"
    );
    let answer = raw_exchange(&socket, &[0x7f, 0xff, 0xff, 0xff, 0x01]);
    assert!(
        matches!(
            answer,
            ServerFrame::Error {
                code: ErrorCode::BadFrame,
                fatal: true,
                ..
            }
        ),
        "{answer:?}"
    );
    let listed = run_mirror(None, &["ports", "list", "--connect", &unix]);
    assert!(
        listed.status.success(),
        "the server still serves: {listed:?}"
    );

    drop(good);
    let output = mirror.interrupt();
    assert!(output.status.success(), "{}", output.stderr);
    assert!(
        output.counter("server.refused") >= 3,
        "{}",
        counters(&output)
    );
    assert!(
        output.counter("server.bad_frames") >= 2,
        "{}",
        counters(&output)
    );
}

fn encode(frame: impl FnOnce(&mut BytesMut)) -> Vec<u8> {
    let mut body = BytesMut::new();
    frame(&mut body);
    let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(&body);
    bytes
}

/// Sends `bytes` on a new connection and reads one frame back.
fn raw_exchange(socket: &Path, bytes: &[u8]) -> ServerFrame {
    let mut stream = UnixStream::connect(socket).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(bytes).expect("write");
    let mut length = [0u8; 4];
    stream.read_exact(&mut length).expect("an answer");
    let mut frame = vec![0u8; u32::from_be_bytes(length) as usize];
    stream.read_exact(&mut frame).expect("the whole frame");
    ServerFrame::decode(&frame).expect("a well-formed answer")
}

#[test]
fn a_client_that_stops_reading_gets_lagged_closes_when_it_resumes() {
    let s = setup();
    let (a_dump, b_dump) = (s.arg("a"), s.arg("b"));
    let received = s.path("received");
    let files = random_files(&s.path("send"), 44000, 6, 4 * MIB, 6 * MIB);
    shape(&s.net.client, "cli0", "1gbit");
    let _server = start_server(&s.net.server, PORT, &received);
    // 8 MiB of channel: less than the 30 MiB sent while b sleeps.
    let mirror = MirrorProcess::start_quiet(
        &s.net.server,
        &["--iface", "srv0", "--port", "5201", "--channel-bytes", "8M"],
    );
    let a = ClientProcess::tail(
        None,
        &mirror.endpoint(),
        &["--port", "5201", "--dump-dir", &a_dump],
    );
    let b = ClientProcess::tail(
        None,
        &mirror.endpoint(),
        &["--port", "5201", "--dump-dir", &b_dump],
    );
    b.signal(libc::SIGSTOP);
    send_all(&s.net.client, SERVER, PORT, &files, &received);
    b.signal(libc::SIGCONT);
    thread::sleep(Duration::from_secs(1));

    let output = mirror.interrupt();
    let (a_status, a_stderr) = a.wait(Duration::from_secs(30));
    let (b_status, b_stderr) = b.wait(Duration::from_secs(30));
    assert!(output.status.success(), "{}", output.stderr);
    assert!(a_status.success(), "{a_stderr}");
    assert!(b_status.success(), "{b_stderr}");
    assert_complete(Path::new(&a_dump), &files, PORT, "the reading client");
    let mut lagged = 0;
    for file in &files {
        for (stream, meta) in parts(Path::new(&b_dump), file, PORT) {
            assert!(
                file.bytes().starts_with(&stream),
                "the stopped client: a prefix ({meta})"
            );
            if meta["reason"] == "lagged" {
                lagged += 1;
            }
        }
    }
    assert!(
        lagged > 0,
        "the stopped client's connections ended as lagged\n{}",
        counters(&output)
    );
    assert_eq!(
        tail_totals(&b_stderr).closed(CloseReason::Lagged),
        lagged,
        "the stopped client counts its lagged closes: {b_stderr}"
    );
    assert_eq!(output.kernel("ring_full"), 0, "{}", counters(&output));
    assert_eq!(
        output.counter("shards.queue_drops"),
        0,
        "{}",
        counters(&output)
    );
    assert_eq!(
        output.counter("server.too_slow"),
        0,
        "resumed within its budget"
    );
}

#[test]
fn a_client_asleep_past_its_budget_is_disconnected() {
    let s = setup();
    let a_dump = s.arg("a");
    let received = s.path("received");
    let files = random_files(&s.path("send"), 45000, 4, 4 * MIB, 4 * MIB);
    shape(&s.net.client, "cli0", "1gbit");
    let _server = start_server(&s.net.server, PORT, &received);
    let mirror = MirrorProcess::start_quiet(
        &s.net.server,
        &[
            "--iface",
            "srv0",
            "--port",
            "5201",
            "--client-timeout",
            "1s",
        ],
    );
    let a = ClientProcess::tail(
        None,
        &mirror.endpoint(),
        &["--port", "5201", "--dump-dir", &a_dump],
    );
    let sleeper = ClientProcess::tail(
        None,
        &mirror.endpoint(),
        &["--port", "5201", "--format", "hex"],
    );
    sleeper.signal(libc::SIGSTOP);
    send_all(&s.net.client, SERVER, PORT, &files, &received);
    thread::sleep(Duration::from_secs(2));
    sleeper.signal(libc::SIGCONT);
    // Disconnected, it reads what its socket still held, then exits.
    let (status, stderr) = sleeper.wait(Duration::from_secs(30));
    assert!(status.code().is_some(), "it exited by itself: {stderr}");

    let output = mirror.interrupt();
    let (a_status, a_stderr) = a.wait(Duration::from_secs(30));
    assert!(a_status.success(), "{a_stderr}");
    assert_complete(Path::new(&a_dump), &files, PORT, "the reading client");
    assert_eq!(
        output.counter("server.too_slow"),
        1,
        "{}",
        counters(&output)
    );
}

//! The subscriber server end to end, with the real binaries: `mirror tail`
//! clients in separate processes, live port changes with `mirror ports`,
//! refused clients, clients that stop reading, silent connections, and
//! many short sessions.

use std::{
    fs,
    io::{Read, Write as _},
    net::TcpStream,
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    path::{Path, PathBuf},
    process::Output,
    thread,
    time::{Duration, Instant},
};

use bytes::BytesMut;
use mirror_tests::{
    bed::{TestBed, Transfer},
    mirror_process::{
        ClientProcess, MirrorProcess, assert_refused, assert_success, run_mirror, tail_totals,
    },
    needs_root,
    netns::in_namespace,
    traffic::{MIB, shape},
};
use mirror_user::{
    flow::model::CloseReason,
    server::protocol::{ClientFrame, ErrorCode, NONCE_LEN, ServerFrame, VERSION},
    server::session::HELLO_TIMEOUT,
};
use serde_json::Value;

const PORT: u16 = 5201;

/// Writes a token file readable by its owner alone.
fn write_token(path: &Path, content: &str) {
    fs::write(path, content).expect("write the token");
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).expect("chmod");
}

/// A mirror on port 5201 whose server listens on `unix` and, with the
/// token in `token`, on `tcp` in the server's namespace.
fn start_with_token(
    s: &TestBed,
    unix: &str,
    tcp: &str,
    token: &Path,
    extra: &[&str],
) -> MirrorProcess {
    let token = token.display().to_string();
    let mut args = vec!["--listen", unix, "--listen", tcp, "--token-file", &token];
    args.extend(extra);
    s.mirror(PORT, &args, MirrorProcess::start_quiet)
}

/// `mirror stats` over TCP at `tcp` in the server's namespace, with the
/// token file `token`.
fn stats_with_token(s: &TestBed, tcp: &str, token: &Path, extra: &[&str]) -> Output {
    let token = token.display().to_string();
    let mut args = vec!["stats", "--connect", tcp, "--token-file", &token];
    args.extend(extra);
    run_mirror(Some(&s.server), &args)
}

/// A mirror of port 5201 with `extra` arguments, and files to send to a
/// socat server on that port through the client's link shaped to `rate`:
/// `(first_port, count, min, max)` as [`TestBed::random_files`] takes them.
fn mirrored_load(
    s: &TestBed,
    (first_port, count, min, max): (u16, usize, usize, usize),
    rate: &str,
    extra: &[&str],
) -> (Transfer, MirrorProcess) {
    shape(&s.client, "cli0", rate);
    let transfer = s.transfer(PORT, s.random_files(first_port, count, min, max));
    (transfer, s.mirror(PORT, extra, MirrorProcess::start_quiet))
}

/// [`mirrored_load`] on a 1 Gbit/s link, and a `mirror tail` that reads
/// everything into the bed's dump directory `a`.
fn with_a_reader(
    s: &TestBed,
    files: (u16, usize, usize, usize),
    extra: &[&str],
) -> (Transfer, MirrorProcess, (ClientProcess, PathBuf)) {
    let (load, mirror) = mirrored_load(s, files, "1gbit", extra);
    let reader = tail_into(s, &mirror, "a");
    (load, mirror, reader)
}

/// `mirror tail` of port 5201 into a new dump directory `name` of the bed;
/// returns the process and the directory.
fn tail_into(s: &TestBed, mirror: &MirrorProcess, name: &str) -> (ClientProcess, PathBuf) {
    let dump = s.new_path(name);
    let arg = dump.display().to_string();
    let tail = ClientProcess::tail(
        None,
        &mirror.endpoint(),
        &["--port", "5201", "--dump-dir", &arg],
    );
    (tail, dump)
}

/// Waits for a tail that got every stream of `transfer` to exit, and
/// checks that it did so successfully with each stream in `dump` whole;
/// returns its stderr.
fn assert_tail_got_all(
    s: &TestBed,
    tail: ClientProcess,
    dump: &Path,
    transfer: &Transfer,
    what: &str,
) -> String {
    let (status, stderr) = tail.wait(Duration::from_secs(30));
    assert!(status.success(), "{what}: {stderr}");
    s.assert_dumped_whole(dump, &transfer.files, PORT, what);
    stderr
}

#[test]
fn two_clients_get_whole_streams_and_a_killed_one_harms_nothing() {
    needs_root!();
    let s = TestBed::new();
    let (load, mirror) = mirrored_load(&s, (42000, 4, 6 * MIB, 8 * MIB), "400mbit", &[]);
    let (a, a_dump) = tail_into(&s, &mirror, "a");
    let (b, b_dump) = tail_into(&s, &mirror, "b");

    let senders = load.start_sending();
    // Mid-stream: 28 MiB at 400 Mbit/s take about 0.6 s.
    thread::sleep(Duration::from_millis(200));
    drop(b);
    load.finish_sending(senders);
    // The mirror keeps serving: another client gets an answer.
    let listed = run_mirror(None, &["ports", "list", "--connect", &mirror.endpoint()]);
    assert_success(&listed);

    let output = mirror.stop();
    let stderr = assert_tail_got_all(&s, a, &a_dump, &load, "client a");
    // What it says it received, at exit, is what the server received.
    let totals = tail_totals(&stderr);
    assert_eq!(
        (totals.connections, totals.data_bytes),
        (4, load.bytes()),
        "{stderr}"
    );
    assert_eq!(totals.closed(CloseReason::Fin), 4, "{stderr}");
    // b got whole connections up to its death and nothing wrong after.
    s.assert_dumped_prefixes(&b_dump, &load.files, PORT, "client b");
    output.assert_counters(&[
        ("kernel.ring_full", 0),
        ("connections.closed.fin", 4),
        ("server.active", 0),
    ]);
}

#[test]
fn ports_added_and_removed_live_change_what_is_mirrored() {
    needs_root!();
    let s = TestBed::new();
    let dump = s.new_path("dump");
    let args = [
        "--allow-ports",
        "5300-5310",
        "--dump-dir",
        dump.to_str().unwrap(),
    ];
    // A transfer on the command-line port runs through all the changes.
    let (long, mirror) = mirrored_load(&s, (43000, 1, 16 * MIB, 16 * MIB), "200mbit", &args);
    let other = s.transfer(5301, Vec::new());
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

    let long_sender = long.start_sending();

    let before = s.random_files(43100, 1, 256 << 10, 256 << 10);
    other.send(&before);
    let (ok, _, stderr) = ports(&["add", "5301"]);
    assert!(ok, "{stderr}");
    let (_, listed, _) = ports(&["list"]);
    assert!(listed.contains("5301  ports add"), "{listed}");
    let during = s.random_files(43200, 2, 256 << 10, MIB);
    other.send(&during);
    // The server holding the bytes does not mean the mirror has passed
    // their FINs on yet: wait for both ends (the long transfer on 5201 is
    // still running), then for the hub's batch delay.
    assert!(
        mirror.wait_for_counters(Duration::from_secs(20), |c| {
            c.get("connections.closed.fin").copied().unwrap_or(0) >= during.len() as u64
        }),
        "the connections to 5301 end"
    );
    thread::sleep(Duration::from_millis(100));
    let (ok, _, stderr) = ports(&["remove", "5301"]);
    assert!(ok, "{stderr}");
    let after = s.random_files(43300, 1, 256 << 10, 256 << 10);
    other.send(&after);
    let (ok, _, stderr) = ports(&["remove", "5201"]);
    assert!(!ok && stderr.contains("command line"), "{stderr}");
    long.finish_sending(long_sender);

    let output = mirror.stop();
    s.assert_dumped_whole(&dump, &during, 5301, "after ports add");
    for file in before.iter().chain(&after) {
        assert!(
            s.dumped(&dump, file, 5301).is_empty(),
            "{} was not mirrored",
            file.client_port
        );
    }
    s.assert_dumped_whole(&dump, &long.files, PORT, "the command-line port, all along");
    assert_eq!(output.kernel("ring_full"), 0, "{output}");
}

#[test]
fn bad_clients_are_refused_and_the_server_keeps_serving() {
    needs_root!();
    let s = TestBed::new();
    let token = s.path("secret").join("token");
    write_token(&token, "right-token\n");
    let wrong = s.path("secret").join("wrong");
    write_token(&wrong, "wrong-token");
    let (token_arg, wrong_arg) = (token.display().to_string(), wrong.display().to_string());
    let (socket, unix) = s.socket();
    let tcp = "127.0.0.1:7010";

    // TCP without a token is refused at start.
    let out = run_mirror(
        Some(&s.server),
        &["run", "-i", "srv0", "-p", "5201", "--listen", tcp],
    );
    assert_refused(&out, "needs a token");

    let mirror = start_with_token(&s, &unix, tcp, &token, &["--allow-ports", "9000"]);
    let tail = |args: &[&str]| {
        let mut all = vec!["tail", "--connect", tcp];
        all.extend(args);
        run_mirror(Some(&s.server), &all)
    };
    // Another token: the client finds that the server's proof is not
    // made with it, and leaves without proving anything.
    assert_refused(
        &tail(&["--port", "5201", "--token-file", &wrong_arg]),
        &format!(
            "the server at {tcp} does not know the token: it is not the mirror you meant, or it was started with another token file"
        ),
    );
    assert_refused(&tail(&["--port", "5201"]), "needs its token");
    assert_refused(
        &tail(&["--port", "22", "--token-file", &token_arg]),
        "not in the mirror's --allow-ports (9000)",
    );
    let good = ClientProcess::tail(
        Some(&s.server),
        tcp,
        &["--port", "5201", "--token-file", &token_arg],
    );

    // Below the CLI: a wrong version, then garbage, on raw sockets.
    let answer = raw_exchange(&socket, &hello(99, "raw"));
    assert_fatal(&answer, ErrorCode::UnsupportedVersion);
    // A hello of this version that ends after its version.
    let answer = raw_exchange(&socket, &[0, 0, 0, 3, 0x01, 0x00, VERSION as u8]);
    assert_fatal(&answer, ErrorCode::BadFrame);
    let answer = raw_exchange(&socket, &[0x7f, 0xff, 0xff, 0xff, 0x01]);
    assert_fatal(&answer, ErrorCode::BadFrame);
    let listed = run_mirror(None, &["ports", "list", "--connect", &unix]);
    assert!(
        listed.status.success(),
        "the server still serves: {listed:?}"
    );

    drop(good);
    let output = mirror.stop();
    assert!(output.counter("server.refused") >= 1, "{output}");
    assert!(
        output.counter("server.unanswered_challenges") >= 1,
        "{output}"
    );
    assert!(output.counter("server.bad_frames") >= 2, "{output}");
}

/// A hello of protocol `version` from a client called `name`, framed.
fn hello(version: u16, name: &str) -> Vec<u8> {
    let mut body = BytesMut::new();
    ClientFrame::Hello {
        version,
        name: name.to_owned(),
        nonce: [0; NONCE_LEN],
    }
    .encode(&mut body);
    let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(&body);
    bytes
}

/// Asserts that the server answered with a fatal error `code`.
fn assert_fatal(answer: &ServerFrame, code: ErrorCode) {
    assert!(
        matches!(answer, ServerFrame::Error { code: got, fatal: true, .. } if *got == code),
        "{answer:?}"
    );
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
    needs_root!();
    let s = TestBed::new();
    // 8 MiB of channel: less than the 30 MiB sent while b sleeps.
    let files = (44000, 6, 4 * MIB, 6 * MIB);
    let (load, mirror, (a, a_dump)) = with_a_reader(&s, files, &["--channel-bytes", "8M"]);
    let (b, b_dump) = tail_into(&s, &mirror, "b");
    b.signal(libc::SIGSTOP);
    load.send_all();
    b.signal(libc::SIGCONT);
    thread::sleep(Duration::from_secs(1));

    let output = mirror.stop();
    assert_tail_got_all(&s, a, &a_dump, &load, "the reading client");
    let (b_status, b_stderr) = b.wait(Duration::from_secs(30));
    assert!(b_status.success(), "{b_stderr}");
    let lagged = s
        .assert_dumped_prefixes(&b_dump, &load.files, PORT, "the stopped client")
        .iter()
        .filter(|meta| meta["reason"] == "lagged")
        .count() as u64;
    assert!(
        lagged > 0,
        "the stopped client's connections ended as lagged\n{output}"
    );
    assert_eq!(
        tail_totals(&b_stderr).closed(CloseReason::Lagged),
        lagged,
        "the stopped client counts its lagged closes: {b_stderr}"
    );
    // server.too_slow: it resumed within its budget.
    output.assert_counters(&[
        ("kernel.ring_full", 0),
        ("shards.queue_drops", 0),
        ("server.too_slow", 0),
    ]);
}

#[test]
fn a_client_asleep_past_its_budget_is_disconnected() {
    needs_root!();
    let s = TestBed::new();
    let files = (45000, 4, 4 * MIB, 4 * MIB);
    // Without the arena: a local client that maps it is sent references,
    // which never fill its socket (its share of the arena stops it
    // instead, tests/tests/arena.rs).
    let (load, mirror, (a, a_dump)) =
        with_a_reader(&s, files, &["--client-timeout", "1s", "--arena-size", "0"]);
    let sleeper = ClientProcess::tail(
        None,
        &mirror.endpoint(),
        &["--port", "5201", "--format", "hex"],
    );
    sleeper.signal(libc::SIGSTOP);
    load.send_all();
    thread::sleep(Duration::from_secs(2));
    sleeper.signal(libc::SIGCONT);
    // Disconnected, it reads what its socket still held, then exits.
    let (status, stderr) = sleeper.wait(Duration::from_secs(30));
    assert!(status.code().is_some(), "it exited by itself: {stderr}");

    let output = mirror.interrupt();
    assert_tail_got_all(&s, a, &a_dump, &load, "the reading client");
    assert_eq!(output.counter("server.too_slow"), 1, "{output}");
}

#[test]
fn token_files_that_are_not_secret_are_refused_on_both_sides() {
    needs_root!();
    let s = TestBed::new();
    let dir = s.path("secret");
    let exposed = dir.join("exposed");
    fs::write(&exposed, "a-token").unwrap();
    fs::set_permissions(&exposed, fs::Permissions::from_mode(0o644)).unwrap();
    let empty = dir.join("empty");
    write_token(&empty, "\n");
    let long = dir.join("long");
    write_token(
        &long,
        &"t".repeat(mirror_user::server::protocol::MAX_TOKEN + 1),
    );
    let (socket, unix) = s.socket();
    let tcp = "127.0.0.1:7012";
    let run = |token: &Path| {
        run_mirror(
            Some(&s.server),
            &[
                "run",
                "-i",
                "srv0",
                "-p",
                "5201",
                "--listen",
                tcp,
                "--listen",
                &unix,
                "--token-file",
                &token.display().to_string(),
            ],
        )
    };
    let expected = format!("chmod 600 {}", exposed.display());
    let refusals = [
        (&exposed, expected.as_str()),
        (&empty, "holds no token"),
        (&long, "longer than 256 bytes"),
    ];
    for (token, says) in refusals {
        assert_refused(&run(token), says);
    }
    assert!(!socket.exists(), "the mirror stopped before listening");

    // The clients apply the same rules, before they connect.
    let good = dir.join("good");
    write_token(&good, "a-token");
    let mirror = start_with_token(&s, &unix, tcp, &good, &[]);
    for (token, says) in refusals {
        assert_refused(&stats_with_token(&s, tcp, token, &[]), says);
    }
    let out = stats_with_token(&s, tcp, &good, &[]);
    assert_success(&out);
    let output = mirror.stop();
    assert_eq!(output.counter("server.refused"), 0, "{output}");
    assert_eq!(output.counter("server.accepted"), 1, "{output}");
}

/// `count` TCP connections to `addr` made from inside `ns`.
fn tcp_connections_in(ns: &str, addr: &str, count: usize) -> Vec<TcpStream> {
    let addr = addr.to_owned();
    in_namespace(ns, move || {
        (0..count)
            .map(|_| TcpStream::connect(&addr).expect("connect"))
            .collect()
    })
}

/// True when the peer closed `stream` by `deadline` (reading what it sent
/// first).
fn closed_by<S: Read>(
    stream: &mut S,
    deadline: Instant,
    set_timeout: impl Fn(&S, Duration),
) -> bool {
    let mut sink = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        set_timeout(stream, left);
        match stream.read_to_end(&mut sink) {
            Ok(_) => return true,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
}

/// Asserts that the peer closed every one of `streams` by `deadline`.
fn assert_all_closed_by<S: Read>(
    streams: &mut [S],
    deadline: Instant,
    set_timeout: impl Fn(&S, Duration),
    what: &str,
) {
    for (i, stream) in streams.iter_mut().enumerate() {
        assert!(
            closed_by(stream, deadline, &set_timeout),
            "{what} connection {i} still open"
        );
    }
}

#[test]
fn silent_connections_do_not_lock_out_a_client_with_the_token() {
    needs_root!();
    const SILENT: usize = 64;
    let s = TestBed::new();
    let token = s.path("secret").join("token");
    write_token(&token, "the-token");
    let (socket, unix) = s.socket();
    let tcp = "127.0.0.1:7013";
    let mirror = start_with_token(&s, &unix, tcp, &token, &["--max-clients", "2"]);
    // 64 silent connections on each listener, four times the number that
    // may wait for their hello, and 32 times --max-clients.
    let opened = Instant::now();
    let mut tcp_silent = tcp_connections_in(&s.server, tcp, SILENT);
    let mut unix_silent: Vec<UnixStream> = (0..SILENT)
        .map(|_| UnixStream::connect(&socket).expect("connect"))
        .collect();

    // A client with the token is served at once, on either listener,
    // without waiting for the silent ones to time out.
    let started = Instant::now();
    let stats = stats_with_token(&s, tcp, &token, &["--json"]);
    assert_success(&stats);
    let tail = ClientProcess::tail(None, &unix, &["--port", "5201"]);
    let served_in = started.elapsed();
    assert!(
        served_in < HELLO_TIMEOUT / 2,
        "served after {served_in:?}, the silent connections held it up"
    );

    // Every silent connection is closed within the hello timeout (most at
    // once, to make room; the last 16 of each listener when their time is
    // up).
    let deadline = opened + HELLO_TIMEOUT + Duration::from_secs(3);
    let tcp_timeout = |s: &TcpStream, t| s.set_read_timeout(Some(t)).unwrap();
    assert_all_closed_by(&mut tcp_silent, deadline, tcp_timeout, "TCP");
    let unix_timeout = |s: &UnixStream, t| s.set_read_timeout(Some(t)).unwrap();
    assert_all_closed_by(&mut unix_silent, deadline, unix_timeout, "Unix");
    let running = mirror_tests::mirror_process::running_counters(&unix);
    assert_eq!(
        running["server.hello_evicted"] + running["server.hello_timeouts"],
        2 * SILENT as u64,
        "{running:#?}"
    );
    assert!(running["server.hello_timeouts"] > 0, "{running:#?}");
    assert_eq!(running["server.awaiting_hello"], 0, "{running:#?}");
    // The tail and the stats asking.
    assert_eq!(running["server.active"], 2, "{running:#?}");

    drop(tail);
    let output = mirror.stop();
    assert_eq!(output.counter("server.refused"), 0, "{output}");
}

/// Says hello on `socket` as `name` and reads the welcome.
fn short_session(socket: &Path, name: &str) {
    let answer = raw_exchange(socket, &hello(VERSION, name));
    assert!(matches!(answer, ServerFrame::Welcome { .. }), "{answer:?}");
}

#[test]
fn twenty_thousand_sessions_leave_small_counters() {
    needs_root!();
    const THREADS: usize = 16;
    const SESSIONS: usize = 20_000;
    let s = TestBed::new();
    // The server may notice a closed session a little after the next one
    // of the same thread says hello.
    let mirror = s.mirror(PORT, &["--max-clients", "1000"], MirrorProcess::start_quiet);
    let unix = mirror.endpoint();
    let socket = PathBuf::from(unix.strip_prefix("unix:").expect("a Unix socket"));
    let started = Instant::now();
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let socket = socket.clone();
            thread::spawn(move || {
                for n in 0..SESSIONS / THREADS {
                    short_session(&socket, &format!("short {t}-{n}"));
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().expect("sessions");
    }
    let made_in = started.elapsed();
    assert!(made_in < Duration::from_secs(60), "{made_in:?}");

    // A session whose name tries to forge log and counter lines stays
    // connected while the counters are read.
    let forged = "x\nkernel: seen=4242\n\u{1b}[2J";
    let mut lingering = UnixStream::connect(&socket).unwrap();
    lingering.write_all(&hello(VERSION, forged)).unwrap();
    lingering
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut welcome = [0u8; 5];
    lingering.read_exact(&mut welcome).expect("a welcome");
    assert_eq!(welcome[4], 0x81, "a welcome");

    // Each poll is a session too: wait until every session but the
    // lingering one and the one asking has ended and been counted.
    let all_ended = mirror.wait_for_counters(Duration::from_secs(30), |c| {
        let get = |name: &str| c.get(name).copied().unwrap_or_default();
        let past = get("consumers.past_sessions.sessions");
        past >= SESSIONS as u64 && past + get("server.active") == get("server.accepted")
    });
    let out = run_mirror(None, &["stats", "--connect", &unix, "--json"]);
    assert_success(&out);
    let json: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert!(all_ended, "{json}");
    assert!(
        out.stdout.len() < 16 << 10,
        "{} bytes of counters after {SESSIONS} sessions",
        out.stdout.len()
    );
    let consumers = json["consumers"].as_array().expect("consumers");
    // The lingering session, the one asking, and the past sessions.
    assert_eq!(consumers.len(), 3, "{json}");
    assert_eq!(json["truncated"]["consumers"], 0);
    let accepted = json["server"]["accepted"].as_u64().unwrap();
    let past = json["consumers"][2]["sessions"].as_u64().unwrap();
    assert_eq!(consumers[2]["name"], "past_sessions");
    assert!(past >= SESSIONS as u64, "{json}");
    assert_eq!(past + 2, accepted, "{json}");
    assert_eq!(json["server"]["refused"], 0);
    assert_eq!(json["server"]["hello_evicted"], 0);
    let lingering_name = consumers[0]["client"].as_str().expect("a client name");
    assert_eq!(lingering_name, "x\\nkernel: seen=4242\\n\\u{1b}[2J");

    // The text form: one `name value` per line, nothing that a name forged.
    let out = run_mirror(None, &["stats", "--connect", &unix]);
    assert_success(&out);
    let text = String::from_utf8(out.stdout).expect("text");
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert!(
            fields.len() == 2 && fields[1].parse::<u64>().is_ok(),
            "{line:?}"
        );
        assert!(line.chars().all(|c| !c.is_control()), "{line:?}");
    }
    assert!(text.contains("consumers.past_sessions.sessions"), "{text}");

    drop(lingering);
    let output = mirror.stop();
    // The forged line is in the log escaped, never as a line of its own.
    assert!(
        !output
            .stderr
            .lines()
            .any(|l| l.starts_with("kernel: seen=4242")),
        "a client name forged a log line"
    );
    assert!(
        output.stderr.contains("x\\nkernel: seen=4242"),
        "the name is logged, escaped"
    );
    assert_eq!(
        output.counter("consumers.past_sessions.sessions"),
        output.counter("server.accepted"),
        "every session ended and was counted: {output}"
    );
}

//! The payload arena end to end: `mirror tail` over the Unix socket reads
//! the mirror's shared memory, over TCP it gets bytes, both write the same
//! streams; a local client that stops returning what it read loses its
//! connections as lagged while the others lose nothing; a client that
//! returns what it never received is closed and harms no one.

use std::{
    fs,
    io::{Read, Write as _},
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use bytes::BytesMut;
use mirror_tests::{
    bed::TestBed,
    mirror_process::{ClientProcess, MirrorProcess, tail_totals},
    needs_root,
    traffic::{MIB, shape},
};
use mirror_user::{
    flow::model::CloseReason,
    server::protocol::{ClientFrame, ErrorCode, NONCE_LEN, ServerFrame, VERSION},
};

const PORT: u16 = 5201;

/// `mirror tail` of port 5201 at `endpoint` (run in `ns`, with `extra`
/// arguments) into a new dump directory `name` of the bed.
fn tail_into(
    s: &TestBed,
    ns: Option<&str>,
    endpoint: &str,
    name: &str,
    extra: &[&str],
) -> (ClientProcess, PathBuf) {
    let dump = s.new_path(name);
    let arg = dump.display().to_string();
    let mut args = vec!["--port", "5201", "--dump-dir", &arg];
    args.extend(extra);
    (ClientProcess::tail(ns, endpoint, &args), dump)
}

/// Waits for a tail to exit successfully; returns its stderr.
fn finished(tail: ClientProcess, what: &str) -> String {
    let (status, stderr) = tail.wait(Duration::from_secs(30));
    assert!(status.success(), "{what}: {stderr}");
    stderr
}

#[test]
fn local_and_remote_tails_write_the_same_streams_and_only_the_local_one_maps_the_arena() {
    needs_root!();
    let s = TestBed::new();
    let token = s.path("secret").join("token");
    fs::write(&token, "arena-test-token").expect("write the token");
    fs::set_permissions(&token, fs::Permissions::from_mode(0o600)).expect("chmod");
    let token_arg = token.display().to_string();
    let (_, unix) = s.socket();
    let tcp = "127.0.0.1:7020";
    shape(&s.client, "cli0", "1gbit");
    let load = s.transfer(PORT, s.random_files(46000, 4, 6 * MIB, 8 * MIB));
    let args = [
        "--listen",
        &unix,
        "--listen",
        tcp,
        "--token-file",
        &token_arg,
        "--arena-size",
        "64M",
    ];
    let mirror = s.mirror(PORT, &args, MirrorProcess::start_quiet);
    let (local, local_dump) = tail_into(&s, None, &unix, "local", &[]);
    let (remote, remote_dump) = tail_into(
        &s,
        Some(&s.server),
        tcp,
        "remote",
        &["--token-file", &token_arg],
    );
    load.send_all();
    thread::sleep(Duration::from_millis(500));

    let output = mirror.stop();
    for (tail, dump, what) in [
        (local, &local_dump, "the local tail (arena)"),
        (remote, &remote_dump, "the remote tail (bytes)"),
    ] {
        let stderr = finished(tail, what);
        s.assert_dumped_whole(dump, &load.files, PORT, what);
        let totals = tail_totals(&stderr);
        assert_eq!(
            (totals.connections, totals.data_bytes),
            (4, load.bytes()),
            "{what}: {stderr}"
        );
    }
    output.assert_counters(&[
        ("kernel.ring_full", 0),
        ("server.arena_clients", 1),
        ("server.bad_credits", 0),
        ("arena.size_bytes", 64 << 20),
        ("arena.fallback_payloads", 0),
    ]);
}

/// A framed client frame.
fn framed(frame: &ClientFrame) -> Vec<u8> {
    let mut body = BytesMut::new();
    frame.encode(&mut body);
    let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(&body);
    bytes
}

/// The next frame from the server; `None` at the end of the stream.
fn read_frame(stream: &mut UnixStream) -> Option<ServerFrame> {
    let mut length = [0u8; 4];
    stream.read_exact(&mut length).ok()?;
    let mut frame = vec![0u8; u32::from_be_bytes(length) as usize];
    stream.read_exact(&mut frame).ok()?;
    Some(ServerFrame::decode(&frame).expect("a well-formed frame"))
}

/// A raw local session that maps the arena (its descriptor is not even
/// taken: a plain read drops it) and subscribes to 5201.
fn raw_arena_session(socket: &Path) -> UnixStream {
    let mut stream = UnixStream::connect(socket).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let hello = ClientFrame::Hello {
        version: VERSION,
        name: "hostile".into(),
        nonce: [0; NONCE_LEN],
    };
    stream.write_all(&framed(&hello)).unwrap();
    assert!(matches!(
        read_frame(&mut stream),
        Some(ServerFrame::Welcome { .. })
    ));
    stream.write_all(&framed(&ClientFrame::MapArena)).unwrap();
    assert!(matches!(
        read_frame(&mut stream),
        Some(ServerFrame::Arena { .. })
    ));
    let subscribe = ClientFrame::Subscribe { ports: vec![PORT] };
    stream.write_all(&framed(&subscribe)).unwrap();
    assert_eq!(read_frame(&mut stream), Some(ServerFrame::Ok));
    stream
}

#[test]
fn a_local_client_that_returns_nothing_is_lagged_and_a_lying_one_is_closed_while_another_gets_everything()
 {
    needs_root!();
    let s = TestBed::new();
    let (socket, unix) = s.socket();
    shape(&s.client, "cli0", "1gbit");
    // 30 MiB or so, against a share of 16 MiB (a quarter of 64 MiB).
    let load = s.transfer(PORT, s.random_files(47000, 6, 4 * MIB, 6 * MIB));
    let args = ["--listen", &unix, "--arena-size", "64M"];
    let mirror = s.mirror(PORT, &args, MirrorProcess::start_quiet);
    let (reader, reader_dump) = tail_into(&s, None, &unix, "reader", &[]);
    let (stopped, stopped_dump) = tail_into(&s, None, &unix, "stopped", &[]);
    stopped.signal(libc::SIGSTOP);
    let mut hostile = raw_arena_session(&socket);

    let senders = load.start_sending();
    // The liar returns more references than it received, once it has one.
    loop {
        match read_frame(&mut hostile).expect("frames until the first reference") {
            ServerFrame::DataRef { .. } => break,
            ServerFrame::Event(_) => {}
            other => panic!("an event: {other:?}"),
        }
    }
    hostile
        .write_all(&framed(&ClientFrame::Credit { count: 1_000_000 }))
        .unwrap();
    let end = loop {
        match read_frame(&mut hostile) {
            Some(ServerFrame::Error { code, fatal, .. }) => break Some((code, fatal)),
            Some(_) => {}
            None => break None,
        }
    };
    assert_eq!(end, Some((ErrorCode::BadFrame, true)), "a fatal error");
    assert!(read_frame(&mut hostile).is_none(), "then the end");
    load.finish_sending(senders);
    // The stopped client resumes: what it was referred to is still there.
    stopped.signal(libc::SIGCONT);
    thread::sleep(Duration::from_secs(1));

    let output = mirror.stop();
    let stderr = finished(reader, "the reading client");
    s.assert_dumped_whole(&reader_dump, &load.files, PORT, "the reading client");
    assert_eq!(tail_totals(&stderr).data_bytes, load.bytes(), "{stderr}");
    let stopped_stderr = finished(stopped, "the stopped client");
    let metas = s.assert_dumped_prefixes(&stopped_dump, &load.files, PORT, "the stopped client");
    let lagged = metas.iter().filter(|m| m["reason"] == "lagged").count() as u64;
    assert!(lagged > 0, "the stopped client lagged: {output}");
    assert_eq!(
        tail_totals(&stopped_stderr).closed(CloseReason::Lagged),
        lagged,
        "{stopped_stderr}"
    );
    output.assert_counters(&[
        ("kernel.ring_full", 0),
        ("server.arena_clients", 3),
        ("server.bad_credits", 1),
        ("server.too_slow", 0),
    ]);
}

//! Giving up root: `mirror run` and `mirror tail` run as an ordinary user
//! with no capability once attached (connected), and everything that must
//! keep working does — the streams, runtime port changes through the open
//! port map, the clsact filter's removal, the socket file's — while only
//! the privileged helper keeps CAP_NET_ADMIN.

use std::{
    fs,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use mirror_tests::{
    bed::TestBed,
    mirror_process::{
        ClientProcess, MirrorProcess, assert_refused, assert_success, mirror_bin, run_mirror,
        tail_totals, thread_status,
    },
    needs_root,
    netns::{exits_within, in_ns, run_in},
    traffic::MIB,
};

const PORT: u16 = 5401;
const ADDED_PORT: u16 = 5402;
const NOBODY: u32 = 65534;
const CAP_NET_ADMIN: u64 = 1 << 12;

/// Every thread of `pid`: real, effective, saved and file-system uid are
/// `uid`, no capability is effective, permitted, ambient or in the bounding
/// set, and no_new_privs is set (the last two are per thread).
fn assert_runs_unprivileged(pid: u32, uid: u32, what: &str) {
    let uids = thread_status(pid, "Uid");
    assert!(!uids.is_empty(), "{what}: no threads");
    for (thread, ids) in &uids {
        assert!(
            ids.split_whitespace().all(|id| id == uid.to_string()),
            "{what} thread {thread} has Uid {ids}"
        );
    }
    for field in ["CapEff", "CapPrm", "CapAmb", "CapBnd"] {
        for (thread, value) in thread_status(pid, field) {
            assert_eq!(
                u64::from_str_radix(&value, 16).unwrap(),
                0,
                "{what} thread {thread}: {field} {value}"
            );
        }
    }
    for (thread, value) in thread_status(pid, "NoNewPrivs") {
        assert_eq!(value, "1", "{what} thread {thread}: NoNewPrivs");
    }
}

fn status_field(pid: u32, field: &str) -> u64 {
    let (_, value) = thread_status(pid, field).remove(0);
    u64::from_str_radix(&value, 16).unwrap()
}

fn wait_gone(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while fs::symlink_metadata(path).is_ok() {
        assert!(
            Instant::now() < deadline,
            "{} is still there",
            path.display()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn run_gives_up_root_and_everything_keeps_working() {
    needs_root!();
    let pair = TestBed::new();
    let dump = pair.new_path("flows");
    let added = ADDED_PORT.to_string();
    let mirror = pair.mirror(
        PORT,
        &[
            "--dump-dir",
            dump.to_str().unwrap(),
            "--allow-ports",
            &added,
        ],
        MirrorProcess::start_quiet,
    );
    let endpoint = mirror.endpoint();
    let socket = std::path::PathBuf::from(endpoint.strip_prefix("unix:").unwrap());

    // The mirror: nobody, no capability, on every thread; no way back.
    assert_runs_unprivileged(mirror.pid(), NOBODY, "mirror run");
    assert_eq!(status_field(mirror.pid(), "CapBnd"), 0, "bounding set");
    assert_eq!(status_field(mirror.pid(), "NoNewPrivs"), 1);
    // Its helper: CAP_NET_ADMIN and nothing else.
    let helper = mirror.helper_pid();
    assert_eq!(status_field(helper, "CapEff"), CAP_NET_ADMIN);
    assert_eq!(status_field(helper, "CapPrm"), CAP_NET_ADMIN);
    assert_eq!(status_field(helper, "CapBnd"), CAP_NET_ADMIN);
    // The directory it created belongs to the user it runs as; the socket
    // is root's, 0600.
    let meta = fs::metadata(&dump).unwrap();
    assert_eq!(
        (meta.uid(), meta.permissions().mode() & 0o777),
        (NOBODY, 0o700)
    );
    let meta = fs::symlink_metadata(&socket).unwrap();
    assert_eq!((meta.uid(), meta.permissions().mode() & 0o777), (0, 0o600));

    // A port added at run time goes through the open port map.
    let out = run_mirror(None, &["ports", "add", &added, "--connect", &endpoint]);
    assert_success(&out);
    let files = pair.random_files(42000, 2, MIB, 2 * MIB);
    for (file, port) in files.iter().zip([PORT, ADDED_PORT]) {
        pair.transfer(port, vec![file.clone()]).send_all();
    }
    mirror.wait_for_fin_closes(2);
    mirror.stop();
    for (file, port) in files.iter().zip([PORT, ADDED_PORT]) {
        let client = format!("{}:{}", TestBed::CLIENT_IP, file.client_port);
        let server = format!("{}:{port}", TestBed::SERVER_IP);
        let parts = pair.dumped(&dump, file, port);
        assert_eq!(parts.len(), 1, "{client} -> {server}");
        assert!(
            parts[0].0 == file.bytes(),
            "{client} -> {server}: byte-identical"
        );
        assert_eq!(parts[0].1["reason"], "fin");
        let name = mirror_user::sinks::dump::tcpflow_name(
            client.parse().unwrap(),
            server.parse().unwrap(),
        );
        let meta = fs::metadata(dump.join(name)).unwrap();
        assert_eq!(
            (meta.uid(), meta.permissions().mode() & 0o777),
            (NOBODY, 0o600)
        );
    }
    // The helper removed the socket file the mirror could no longer remove.
    wait_gone(&socket);
    pair.assert_nothing_attached("after SIGINT");
}

/// The clsact fallback: the filter needs CAP_NET_ADMIN to go; the helper
/// removes it at the mirror's end, and also when the mirror is killed.
#[test]
fn the_clsact_filter_goes_with_the_mirror_even_when_killed() {
    needs_root!();
    let pair = TestBed::new();
    let (socket, endpoint) = pair.socket();
    let args = ["--attach", "tc", "--tc-netlink", "--listen", &endpoint];
    let filters = || {
        let out = run_in(
            &pair.server,
            "tc",
            &["filter", "show", "dev", "srv0", "ingress"],
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mirror = pair.mirror(PORT, &args, MirrorProcess::start_quiet);
    assert_runs_unprivileged(mirror.pid(), NOBODY, "mirror run");
    assert!(filters().contains("mirror_tc"), "{}", filters());
    mirror.stop();
    assert!(
        !filters().contains("mirror_tc"),
        "after SIGINT:\n{}",
        filters()
    );
    wait_gone(&socket);

    pair.mirror(PORT, &args, MirrorProcess::start_quiet).kill();
    let deadline = Instant::now() + Duration::from_secs(10);
    while filters().contains("mirror_tc") {
        assert!(Instant::now() < deadline, "after SIGKILL:\n{}", filters());
        thread::sleep(Duration::from_millis(20));
    }
    wait_gone(&socket);
}

/// The dynamic loader that started this test (and starts the mirror).
fn dynamic_loader() -> PathBuf {
    let maps = fs::read_to_string("/proc/self/maps").expect("/proc/self/maps");
    maps.lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| {
            Path::new(path)
                .file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with("ld-linux"))
        })
        .map(PathBuf::from)
        .expect("no dynamic loader in /proc/self/maps")
}

/// The privileged helper cannot start once the clsact filter is attached
/// (started through the dynamic loader, the mirror's /proc/self/exe is the
/// loader, which cannot run the helper): the mirror says so and removes
/// the filter and the qdisc it added itself, while it still may, instead
/// of leaving them to the next run.
#[test]
fn a_helper_that_cannot_start_leaves_nothing_attached() {
    needs_root!();
    let pair = TestBed::new();
    let (socket, endpoint) = pair.socket();
    let port = PORT.to_string();
    let output = exits_within(
        in_ns(&pair.server, &dynamic_loader().display().to_string())
            .arg(mirror_bin())
            .args([
                "run",
                "--iface",
                "srv0",
                "--port",
                &port,
                "--tc-netlink",
                "--listen",
                &endpoint,
            ]),
        Duration::from_secs(30),
        "the mirror runs without its helper",
    );
    assert_refused(&output, "cannot start the mirror's privileged helper");
    pair.assert_nothing_attached("when the helper could not start");
    let qdiscs = run_in(&pair.server, "tc", &["qdisc", "show", "dev", "srv0"]);
    let qdiscs = String::from_utf8_lossy(&qdiscs.stdout);
    assert!(!qdiscs.contains("clsact"), "the qdisc is left: {qdiscs}");
    assert!(fs::symlink_metadata(&socket).is_err(), "the socket is left");
}

#[test]
fn tail_gives_up_root_after_connecting() {
    needs_root!();
    let pair = TestBed::new();
    let port = PORT.to_string();
    let mirror = pair.mirror(PORT, &[], MirrorProcess::start_quiet);
    let dump = pair.new_path("tail-flows");
    let tail = ClientProcess::tail(
        None,
        &mirror.endpoint(),
        &["--port", &port, "--dump-dir", dump.to_str().unwrap()],
    );
    assert_runs_unprivileged(tail.pid(), NOBODY, "mirror tail");
    let meta = fs::metadata(&dump).unwrap();
    assert_eq!(
        (meta.uid(), meta.permissions().mode() & 0o777),
        (NOBODY, 0o700)
    );

    let transfer = pair.transfer(PORT, pair.random_files(43000, 1, MIB, MIB));
    transfer.send_all();
    mirror.wait_for_fin_closes(1);
    mirror.stop();
    let (status, stderr) = tail.wait(Duration::from_secs(20));
    assert!(status.success(), "{stderr}");
    assert_eq!(tail_totals(&stderr).data_bytes, MIB as u64, "{stderr}");
    let file = &transfer.files[0];
    let parts = pair.dumped(&dump, file, PORT);
    assert_eq!(parts.len(), 1);
    assert!(parts[0].0 == file.bytes(), "byte-identical");
}

#[test]
fn user_root_keeps_root_and_says_so() {
    needs_root!();
    let pair = TestBed::new();
    let mirror = pair.mirror(PORT, &["--user", "root"], MirrorProcess::start_quiet);
    let (_, uids) = thread_status(mirror.pid(), "Uid").remove(0);
    assert!(uids.split_whitespace().all(|id| id == "0"), "{uids}");
    let output = mirror.stop();
    assert!(
        output.stderr.contains("keeps running as root"),
        "{}",
        output.stderr
    );
}

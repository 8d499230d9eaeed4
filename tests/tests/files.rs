//! Files on a node are hostile: whatever someone planted where the mirror
//! writes — a dangling symlink at the next connection's dump name, a
//! symlink at a sidecar's, a regular file where the socket goes — is never
//! followed, opened, truncated or removed, and the mirror still delivers
//! every stream whole.

use std::{
    fs,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _, symlink},
};

use mirror_tests::{
    bed::TestBed,
    mirror_process::{MirrorProcess, run_mirror},
    needs_root,
    traffic::{MIB, random_files, send_all, start_server},
};
use mirror_user::sinks::dump::tcpflow_name;

const PORT: u16 = 5501;
const NOBODY: u32 = 65534;

#[test]
fn links_planted_in_the_dump_directory_are_never_followed() {
    needs_root!();
    let pair = TestBed::new();
    let elsewhere = pair.new_path("elsewhere");
    fs::create_dir(&elsewhere).unwrap();
    let victim = elsewhere.join("victim");
    fs::write(&victim, b"the test's own file").unwrap();
    let dangling = elsewhere.join("created-through-a-link");

    // The dump directory exists already, given to the user the mirror
    // runs as; the names of the next connection are taken.
    let dump = pair.new_path("flows");
    fs::create_dir(&dump).unwrap();
    std::os::unix::fs::chown(&dump, Some(NOBODY), Some(NOBODY)).unwrap();
    let files = random_files(&pair.new_path("send"), 44000, 1, 2 * MIB, 2 * MIB);
    let client = format!("{}:{}", TestBed::CLIENT_IP, files[0].client_port);
    let server = format!("{}:{PORT}", TestBed::SERVER_IP);
    let name = tcpflow_name(client.parse().unwrap(), server.parse().unwrap());
    symlink(&dangling, dump.join(&name)).unwrap();
    symlink(&victim, dump.join(format!("{name}.meta"))).unwrap();
    symlink(&victim, dump.join(format!("{name}c1.meta"))).unwrap();

    let port = PORT.to_string();
    let mirror = MirrorProcess::start_quiet(
        &pair.server,
        &[
            "--iface",
            "srv0",
            "--port",
            &port,
            "--dump-dir",
            dump.to_str().unwrap(),
        ],
    );
    let received = pair.new_path("received");
    let _server = start_server(&pair.server, PORT, &received);
    send_all(&pair.client, TestBed::SERVER_IP, PORT, &files, &received);
    assert!(
        mirror.wait_for_counters(std::time::Duration::from_secs(20), |c| {
            c.get("connections.closed.fin").copied() == Some(1)
        }),
        "the connection ends"
    );
    mirror.stop();

    assert_eq!(fs::read(&victim).unwrap(), b"the test's own file");
    assert!(
        fs::symlink_metadata(&dangling).is_err(),
        "nothing created through a link"
    );
    for link in [
        name.clone(),
        format!("{name}.meta"),
        format!("{name}c1.meta"),
    ] {
        let meta = fs::symlink_metadata(dump.join(&link)).unwrap();
        assert!(meta.file_type().is_symlink(), "{link} is left as it was");
    }
    assert!(
        fs::symlink_metadata(dump.join(format!("{name}c1"))).is_err(),
        "a name whose sidecar is taken is not used"
    );
    let stream = dump.join(format!("{name}c2"));
    assert!(
        fs::read(&stream).unwrap() == files[0].bytes(),
        "byte-identical"
    );
    let meta = fs::metadata(&stream).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (NOBODY, 0o600));
    let sidecar: serde_json::Value =
        serde_json::from_slice(&fs::read(dump.join(format!("{name}c2.meta"))).unwrap()).unwrap();
    assert_eq!(sidecar["reason"], "fin");
}

fn assert_refused(out: &std::process::Output, expected: &str) {
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "must fail: {text}");
    assert!(text.contains(expected), "expected {expected:?} in: {text}");
}

#[test]
fn what_is_not_a_socket_is_never_replaced_by_one() {
    needs_root!();
    let pair = TestBed::new();
    let port = PORT.to_string();
    let file = pair.new_path("file");
    fs::write(&file, b"not a socket").unwrap();
    let link = pair.new_path("link");
    symlink(&file, &link).unwrap();
    for path in [&file, &link] {
        let listen = format!("unix:{}", path.display());
        let out = run_mirror(
            Some(&pair.server),
            &[
                "run", "--iface", "srv0", "--port", &port, "--listen", &listen,
            ],
        );
        assert_refused(&out, "exists and is not a socket");
    }
    assert_eq!(fs::read(&file).unwrap(), b"not a socket");
    assert!(
        fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );

    // A directory anyone may write (no sticky bit) is refused for the
    // socket, the dump and the capture alike (a directory the mirror
    // creates in it is its own, 0700, and fine).
    let shared = pair.new_path("shared");
    fs::create_dir(&shared).unwrap();
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o777)).unwrap();
    let in_shared = |name: &str| shared.join(name).display().to_string();
    for extra in [
        vec![
            "--listen".to_owned(),
            format!("unix:{}", in_shared("m.sock")),
        ],
        vec!["--dump-dir".to_owned(), shared.display().to_string()],
        vec!["--pcap".to_owned(), in_shared("capture.pcapng")],
    ] {
        let mut args = vec!["run", "--iface", "srv0", "--port", &port];
        args.extend(extra.iter().map(String::as_str));
        let out = run_mirror(Some(&pair.server), &args);
        assert_refused(&out, "may be written by other users");
    }
    assert_eq!(fs::read_dir(&shared).unwrap().count(), 0, "nothing created");

    // An existing capture file is never overwritten.
    let capture = pair.new_path("capture.pcapng");
    fs::write(&capture, b"an older capture").unwrap();
    let out = run_mirror(
        Some(&pair.server),
        &[
            "run",
            "--iface",
            "srv0",
            "--port",
            &port,
            "--pcap",
            capture.to_str().unwrap(),
        ],
    );
    assert_refused(&out, "never overwrites a file");
    assert_eq!(fs::read(&capture).unwrap(), b"an older capture");
}

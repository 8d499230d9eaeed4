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
    mirror_process::{MirrorProcess, assert_refused, run_mirror},
    needs_root,
    traffic::MIB,
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
    let transfer = pair.transfer(PORT, pair.random_files(44000, 1, 2 * MIB, 2 * MIB));
    let client = format!("{}:{}", TestBed::CLIENT_IP, transfer.files[0].client_port);
    let server = format!("{}:{PORT}", TestBed::SERVER_IP);
    let name = tcpflow_name(client.parse().unwrap(), server.parse().unwrap());
    symlink(&dangling, dump.join(&name)).unwrap();
    symlink(&victim, dump.join(format!("{name}.meta"))).unwrap();
    symlink(&victim, dump.join(format!("{name}c1.meta"))).unwrap();

    let mirror = pair.mirror(
        PORT,
        &["--dump-dir", dump.to_str().unwrap()],
        MirrorProcess::start_quiet,
    );
    transfer.send_all();
    mirror.wait_for_fin_closes(1);
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
        fs::read(&stream).unwrap() == transfer.files[0].bytes(),
        "byte-identical"
    );
    let meta = fs::metadata(&stream).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (NOBODY, 0o600));
    let sidecar: serde_json::Value =
        serde_json::from_slice(&fs::read(dump.join(format!("{name}c2.meta"))).unwrap()).unwrap();
    assert_eq!(sidecar["reason"], "fin");
}

#[test]
fn what_is_not_a_socket_is_never_replaced_by_one() {
    needs_root!();
    let pair = TestBed::new();
    let port = PORT.to_string();
    // `mirror run` on the server with `extra`, which must refuse to start.
    let refused = |extra: &[&str], expected: &str| {
        let args = [&["run", "--iface", "srv0", "--port", &port], extra].concat();
        assert_refused(&run_mirror(Some(&pair.server), &args), expected);
    };
    let file = pair.new_path("file");
    fs::write(&file, b"not a socket").unwrap();
    let link = pair.new_path("link");
    symlink(&file, &link).unwrap();
    for path in [&file, &link] {
        let listen = format!("unix:{}", path.display());
        refused(&["--listen", &listen], "exists and is not a socket");
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
    let socket = format!("unix:{}", shared.join("m.sock").display());
    let capture = shared.join("capture.pcapng").display().to_string();
    for extra in [
        ["--listen", &socket],
        ["--dump-dir", shared.to_str().unwrap()],
        ["--pcap", &capture],
    ] {
        refused(&extra, "may be written by other users");
    }
    assert_eq!(fs::read_dir(&shared).unwrap().count(), 0, "nothing created");

    // An existing capture file is never overwritten.
    let capture = pair.new_path("capture.pcapng");
    fs::write(&capture, b"an older capture").unwrap();
    refused(
        &["--pcap", capture.to_str().unwrap()],
        "never overwrites a file",
    );
    assert_eq!(fs::read(&capture).unwrap(), b"an older capture");
}

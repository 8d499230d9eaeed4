//! TCP streams end to end: many concurrent connections reassembled
//! byte-exact, a stalled consumer isolated by drop-on-lag, and losses that
//! always end a stream explicitly as `gap`, never as corrupt bytes.

use std::{collections::BTreeMap, fs, path::PathBuf};

use mirror_tests::{
    bed::{TestBed, Transfer},
    mirror_process::{MirrorOutput, MirrorProcess, Stdout},
    needs_root,
    traffic::{MIB, shape},
};
use serde_json::Value;

const PORT: u16 = 5201;

/// Sends `count` files of random bytes (sizes from `min` to `max`) to a
/// socat server on port 5201, through the mirror dumping to the bed's
/// `dump` with `extra` arguments and its standard output read as `stdout`
/// says; returns the transfer, the dump directory and the mirror's output.
fn mirrored(
    bed: &TestBed,
    (count, min, max): (usize, usize, usize),
    extra: &[&str],
    stdout: Stdout,
) -> (Transfer, PathBuf, MirrorOutput) {
    let transfer = bed.transfer(PORT, bed.random_files(41000, count, min, max));
    let dump = bed.new_path("dump");
    let mut args = vec!["--dump-dir", dump.to_str().unwrap()];
    args.extend(extra);
    let mirror = bed.mirror(PORT, &args, |ns, args| {
        MirrorProcess::start_with(ns, args, stdout)
    });
    transfer.send_all();
    (transfer, dump, mirror.stop())
}

#[test]
fn twenty_concurrent_connections_are_dumped_byte_identical() {
    needs_root!();
    let s = TestBed::new();
    shape(&s.client, "cli0", "2gbit");
    // This test is about twenty interleaved streams, not about lag: on a
    // busy 2-core machine the dump consumer fell behind the default channel
    // budget once (CI). A second of slack at 2 Gbit/s keeps it on topic.
    let (transfer, dump, output) = mirrored(
        &s,
        (20, MIB, 20 * MIB),
        &["--channel-bytes", "256M"],
        Stdout::Read,
    );
    let files = &transfer.files;

    for file in files {
        let port = file.client_port;
        let server_got = fs::read(transfer.received.join(port.to_string())).unwrap();
        assert!(
            server_got == file.bytes(),
            "the server received connection {port} intact"
        );
    }
    for meta in s.assert_dumped_whole(&dump, files, PORT, &output) {
        assert_eq!(meta["complete"], true, "{meta}");
    }
    output.assert_counters(&[
        ("kernel.ring_full", 0),
        ("shards.queue_drops", 0),
        ("connections.closed.gap", 0),
        ("connections.closed.fin", 20),
        ("ports.5201.bytes", transfer.bytes()),
        ("consumers.dump-dir.lags", 0),
    ]);
}

#[test]
fn a_stalled_consumer_is_closed_as_lagged_and_harms_nothing_else() {
    needs_root!();
    let s = TestBed::new();
    shape(&s.client, "cli0", "500mbit");
    // The print consumer writes to a pipe nobody reads during the transfer:
    // it stops consuming after 64 KiB. A 32 MiB channel is less than the
    // 48 MiB sent, so it lags; the dump consumer, reading, has half a
    // second of slack at 500 Mbit/s.
    let (transfer, dump, output) = mirrored(
        &s,
        (6, 8 * MIB, 8 * MIB),
        &["--print", "json", "--channel-bytes", "32M"],
        Stdout::Stalled,
    );

    // The reading consumer got every stream whole.
    s.assert_dumped_whole(&dump, &transfer.files, PORT, &output);
    assert_eq!(output.counter("consumers.dump-dir.lags"), 0, "{output}");
    // The stalled one lost connections to lag, each closed explicitly, and
    // got no byte of them after the close.
    assert!(output.counter("consumers.print.lags") >= 1, "{output}");
    let lagged: Vec<&Value> = output
        .events
        .iter()
        .filter(|e| e["event"] == "closed" && e["reason"] == "lagged")
        .collect();
    assert!(!lagged.is_empty(), "the stalled consumer saw lagged closes");
    let mut closed_at: BTreeMap<u64, usize> = BTreeMap::new();
    for (i, event) in output.events.iter().enumerate() {
        let conn = event["conn"].as_u64().unwrap();
        if event["event"] == "closed" {
            closed_at.insert(conn, i);
        } else if let Some(at) = closed_at.get(&conn) {
            panic!("event {i} of connection {conn} after its close at {at}: {event}");
        }
    }
    // Nothing was dropped on the producer's side.
    output.assert_counters(&[
        ("kernel.ring_full", 0),
        ("shards.queue_drops", 0),
        ("connections.closed.gap", 0),
    ]);
}

#[test]
fn a_tiny_ring_loses_packets_and_every_loss_ends_a_stream_as_gap() {
    needs_root!();
    let s = TestBed::new();
    // 256 KiB holds four 64 KiB packets: a burst overflows it at once.
    let (transfer, dump, output) = mirrored(
        &s,
        (6, 8 * MIB, 8 * MIB),
        &["--ring-size", "256K"],
        Stdout::Read,
    );

    assert!(
        output.kernel("ring_full") > 0,
        "the ring overflowed\n{output}"
    );
    assert!(output.counter("shards.ring_lost_flows") > 0, "{output}");
    let mut gaps = 0;
    for file in &transfer.files {
        let port = file.client_port;
        let sent = file.bytes();
        for (i, (stream, meta)) in s.dumped(&dump, file, PORT).iter().enumerate() {
            let midstream = meta["midstream"] == true;
            if !midstream {
                // From the connection's start: a prefix of what was sent.
                assert!(
                    sent.starts_with(stream),
                    "connection {port} part {i}: {} bytes that are not a prefix of the stream ({meta})",
                    stream.len()
                );
            } else {
                // Picked up after a loss: some contiguous piece of it.
                assert!(
                    stream.is_empty()
                        || sent
                            .windows(stream.len().min(4096))
                            .any(|w| w == &stream[..stream.len().min(4096)]),
                    "connection {port} part {i}: midstream bytes not from the stream ({meta})"
                );
            }
            match meta["reason"].as_str() {
                // The FIN ends the stream: a part that reached it holds the
                // stream up to its very end.
                Some("fin") if midstream => {
                    assert!(
                        sent.ends_with(stream),
                        "connection {port} part {i}: a whole tail ({meta})"
                    );
                }
                Some("fin") => {
                    assert_eq!(stream.len(), sent.len(), "complete means whole ({meta})");
                }
                Some("gap") => gaps += 1,
                // A part picked up after a loss whose own FIN was lost
                // too: its end was never seen.
                Some("shutdown") if midstream => {}
                other => panic!("connection {port} part {i} ended as {other:?} ({meta})"),
            }
        }
    }
    assert!(gaps > 0, "losses show up as gap closes\n{output}");
    assert_eq!(
        output.counter("connections.closed.gap"),
        gaps,
        "every gap close is counted\n{output}"
    );
}

/// An ext4 file system in a file of the scratch directory, on a loop
/// device, mounted; [`Self::freeze`] makes every write to it block (a hung
/// disk). Thawed, unmounted and detached when dropped, also on a panic.
struct FreezableDisk {
    mount: PathBuf,
    device: String,
    frozen: bool,
}

fn run(program: &str, args: &[&str]) -> String {
    let output = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

impl FreezableDisk {
    fn new(dir: &std::path::Path) -> Self {
        let image = dir.join("disk.img");
        fs::File::create(&image)
            .unwrap()
            .set_len(256 * MIB as u64)
            .unwrap();
        let image = image.to_str().unwrap();
        run("mkfs.ext4", &["-q", "-F", image]);
        let device = run("losetup", &["--find", "--show", image]);
        let mount = dir.join("mnt");
        fs::create_dir(&mount).unwrap();
        let disk = Self {
            mount,
            device,
            frozen: false,
        };
        run(
            "mount",
            &[disk.device.as_str(), disk.mount.to_str().unwrap()],
        );
        disk
    }

    fn freeze(&mut self) {
        run("fsfreeze", &["--freeze", self.mount.to_str().unwrap()]);
        self.frozen = true;
    }

    fn thaw(&mut self) {
        if self.frozen {
            run("fsfreeze", &["--unfreeze", self.mount.to_str().unwrap()]);
            self.frozen = false;
        }
    }
}

impl Drop for FreezableDisk {
    fn drop(&mut self) {
        if self.frozen {
            let _ = std::process::Command::new("fsfreeze")
                .args(["--unfreeze", self.mount.to_str().unwrap()])
                .status();
        }
        let _ = std::process::Command::new("umount")
            .arg(&self.mount)
            .status();
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.device])
            .status();
    }
}

#[test]
fn a_hung_disk_makes_only_the_dump_lag() {
    needs_root!();
    let s = TestBed::new();
    shape(&s.client, "cli0", "500mbit");
    let mut disk = FreezableDisk::new(&s.path("disk"));
    // 100 MiB: more than the dump writer's 64 MiB queue.
    let transfer = s.transfer(PORT, s.random_files(41000, 5, 20 * MIB, 20 * MIB));
    let dump = disk.mount.join("dump");
    let mirror = s.mirror(
        PORT,
        &["--dump-dir", dump.to_str().unwrap(), "--print", "json"],
        |ns, args| MirrorProcess::start_with(ns, args, Stdout::Read),
    );
    // Every write to the dump directory blocks now, even the files'
    // creation.
    disk.freeze();
    transfer.send_all();
    disk.thaw();
    let output = mirror.stop();

    // The other consumer got every byte, and nothing was dropped before
    // the consumers.
    output.assert_counters(&[
        ("kernel.ring_full", 0),
        ("shards.queue_drops", 0),
        ("connections.closed.gap", 0),
        ("connections.closed.fin", 5),
        ("ports.5201.bytes", transfer.bytes()),
        ("consumers.print.bytes", transfer.bytes()),
        ("consumers.print.lags", 0),
        // The dump's task took every event: it lagged on its own queue.
        ("consumers.dump-dir.bytes", transfer.bytes()),
    ]);
    assert!(output.counter("consumers.dump-dir.lags") >= 1, "{output}");
    let lagged = output.counter("consumers.dump-dir.lagged_connections");
    assert!(lagged >= 1, "{output}");
    // Each dumped stream is whole and says `fin`, or a prefix that says
    // `lagged`.
    let mut lagged_files = 0;
    for file in &transfer.files {
        let sent = file.bytes();
        for (bytes, meta) in s.dumped(&dump, file, PORT) {
            if meta["reason"] == "fin" {
                assert!(bytes == sent, "connection {} whole", file.client_port);
            } else {
                assert_eq!(meta["reason"], "lagged", "{meta}");
                assert!(bytes.len() < sent.len() && sent.starts_with(&bytes));
                lagged_files += 1;
            }
        }
    }
    assert!(lagged_files >= 1, "a lagged connection's file says so");
}

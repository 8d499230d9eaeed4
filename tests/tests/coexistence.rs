//! The mirror next to someone else's firewall on the interface it watches.
//!
//! The firewall is tests/bpf/drop.c (built here with clang): it drops ICMP,
//! or the TCP port the mirror watches, and ends the TC chain with OK for
//! everything else, so that whatever runs behind it sees nothing. It is
//! attached as a legacy clsact filter at priority 1 or as a TCX program,
//! before or after the mirror, and the mirror attaches through TCX or
//! through a clsact filter (`--tc-netlink`).
//!
//! In every case ping is dropped before, while and after the mirror runs,
//! exactly as without it, and the mirror still dumps the subscribed port
//! byte for byte: it runs first and leaves every verdict to the others.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    programs::{LinkOrder, SchedClassifier, TcAttachType, tc::TcAttachOptions},
};
use mirror_tests::{
    bed::TestBed,
    mirror_process::{MirrorProcess, assert_refused, mirror_bin},
    needs_root,
    netns::{exits_within, in_namespace, in_ns, run_in, run_ok, tcx_programs},
    root_tests,
    traffic::{MIB, random_files, send_all, start_server},
};

const PORT: u16 = 5301;
const CLIENT_PORT: u16 = 41000;
const IFACE: &str = "srv0";
const SERVER: &str = TestBed::SERVER_IP;
const DROP_SOURCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/bpf/drop.c");

/// What the firewall drops.
#[derive(Debug, Clone, Copy)]
enum Drops {
    Icmp,
    /// TCP to the mirrored port.
    MirroredPort,
}

/// How the firewall is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `tc filter add dev srv0 ingress prio 1 bpf da obj drop.o sec tc`.
    Clsact,
    /// A TCX link, at the end of the chain when it is attached.
    Tcx,
}

/// When the firewall is attached, relative to the mirror.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum When {
    Before,
    After,
}

/// How the mirror attaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Tcx,
    /// `--tc-netlink`: the clsact fallback of kernels without TCX.
    Clsact,
}

impl Mode {
    const fn args(self) -> &'static [&'static str] {
        match self {
            Self::Tcx => &[],
            Self::Clsact => &["--tc-netlink"],
        }
    }
}

/// The bed, and what the tests here do on its server.
struct Host {
    bed: TestBed,
    /// The mirror's dump directory (the mirror creates it).
    dump: String,
}

impl Host {
    fn new() -> Self {
        let bed = TestBed::new();
        let dump = bed.new_path("dump").display().to_string();
        Self { bed, dump }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.bed.new_path(name)
    }

    /// True when the server answers ping (two echo requests, 1 s each).
    fn ping_passes(&self) -> bool {
        in_ns(&self.bed.client, "ping")
            .args(["-c", "2", "-i", "0.2", "-W", "1", "-q", SERVER])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("cannot run ping")
            .success()
    }

    fn firewall(&self, kind: Kind, drops: Drops) -> Firewall {
        match kind {
            Kind::Clsact => Firewall {
                _clsact: Some(ClsactFilter::add(
                    &self.bed.server,
                    &drop_object(self.bed.dir(), drops, "tc"),
                    "all",
                )),
                _tcx: None,
            },
            Kind::Tcx => Firewall {
                _clsact: None,
                _tcx: Some(TcxProgram::attach(
                    &self.bed.server,
                    &drop_object(self.bed.dir(), drops, "classifier"),
                )),
            },
        }
    }

    /// `tc filter show` of the server's ingress, one line per filter.
    fn clsact_filters(&self) -> Vec<String> {
        self.filters_at("ingress")
    }

    /// `tc filter show` of the server's `hook`, one line per filter.
    fn filters_at(&self, hook: &str) -> Vec<String> {
        let out = run_in(
            &self.bed.server,
            "tc",
            &["filter", "show", "dev", IFACE, hook],
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|line| line.contains(" name "))
            .map(str::to_owned)
            .collect()
    }

    /// Asserts that the one clsact filter left is the firewall's (`drop`).
    fn assert_only_drop_filter(&self, what: &str) {
        let filters = self.clsact_filters();
        assert!(
            filters.len() == 1 && filters[0].contains(" name drop "),
            "{what}: {filters:#?}"
        );
    }

    /// `tc qdisc show` of the server's interface.
    fn qdiscs(&self) -> String {
        let out = run_in(&self.bed.server, "tc", &["qdisc", "show", "dev", IFACE]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn has_clsact(&self) -> bool {
        self.qdiscs().contains("qdisc clsact ")
    }

    /// Waits (at most 10 s) until the server's interface has no clsact
    /// qdisc: after a SIGKILL the privileged helper removes it.
    fn wait_no_clsact(&self, after: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.has_clsact() {
            assert!(
                Instant::now() < deadline,
                "the clsact qdisc is still there {after}:\n{}",
                self.qdiscs()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// A node owner adds a clsact qdisc as if the mirror had never run
    /// (which fails with "Exclusivity flag on" while one is left), then
    /// takes it away again.
    fn assert_clsact_can_be_added(&self, after: &str) {
        let out = in_ns(&self.bed.server, "tc")
            .args(["qdisc", "add", "dev", IFACE, "clsact"])
            .stdin(Stdio::null())
            .output()
            .expect("cannot run tc");
        assert!(
            out.status.success(),
            "tc qdisc add dev {IFACE} clsact {after}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        run_in(
            &self.bed.server,
            "tc",
            &["qdisc", "del", "dev", IFACE, "clsact"],
        );
    }

    /// `tc filter WHERE protocol all bpf ...` with the ICMP-dropping
    /// firewall program, on the server: `place` is the action and where
    /// (`add dev srv0 egress prio 1`).
    fn drop_icmp_filter(&self, place: &[&str]) {
        let object = drop_object(self.bed.dir(), Drops::Icmp, "tc")
            .display()
            .to_string();
        let mut args = vec!["filter"];
        args.extend(place);
        args.extend(["protocol", "all", "bpf", "da", "obj", &object, "sec", "tc"]);
        run_in(&self.bed.server, "tc", &args);
    }

    /// The mirror on port 5301, dumping, attached as `mode` says.
    fn start_mirror(&self, mode: Mode) -> MirrorProcess {
        let mut args = vec!["--iface", IFACE, "--port", "5301", "--dump-dir", &self.dump];
        args.extend(mode.args());
        MirrorProcess::start(&self.bed.server, &args)
    }

    /// Stops `mirror`, which says `says` as it goes: the firewall (`what`)
    /// drops ping before and after, and its clsact filter is the one left.
    fn stop_leaving_the_firewall(&self, mirror: MirrorProcess, says: &str, what: &str) {
        assert!(!self.ping_passes(), "{what}: it drops ping");
        let output = mirror.stop();
        assert!(output.stderr.contains(says), "{}", output.stderr);
        self.assert_only_drop_filter(what);
        assert!(!self.ping_passes(), "{what}: it still drops ping");
    }
}

/// Builds tests/bpf/drop.c into `dir` with the program in ELF section
/// `section`.
fn drop_object(dir: &Path, drops: Drops, section: &str) -> PathBuf {
    let out = dir.join(format!("drop-{drops:?}-{section}.o"));
    let mut clang = Command::new("clang");
    clang
        .args(["-O2", "-g", "-target", "bpf"])
        .arg("-I/usr/include/x86_64-linux-gnu")
        .arg(format!("-DSECTION=\"{section}\""));
    if let Drops::MirroredPort = drops {
        clang.arg(format!("-DDROP_TCP_PORT={PORT}"));
    }
    // clang comes with `cargo xtask setup`.
    run_ok(clang.arg("-c").arg(DROP_SOURCE).arg("-o").arg(&out));
    out
}

/// The firewall, removed when dropped.
struct Firewall {
    _clsact: Option<ClsactFilter>,
    _tcx: Option<TcxProgram>,
}

/// A legacy clsact filter at priority 1 of the server's ingress; dropping
/// it removes the clsact qdisc and every filter on it (inside the test's
/// namespace).
struct ClsactFilter {
    ns: String,
}

impl ClsactFilter {
    fn add(ns: &str, object: &Path, protocol: &str) -> Self {
        run_in(ns, "tc", &["qdisc", "add", "dev", IFACE, "clsact"]);
        let filter = Self { ns: ns.to_owned() };
        let object = object.display().to_string();
        run_in(
            ns,
            "tc",
            &[
                "filter", "add", "dev", IFACE, "ingress", "prio", "1", "protocol", protocol, "bpf",
                "da", "obj", &object, "sec", "tc",
            ],
        );
        filter
    }
}

impl Drop for ClsactFilter {
    fn drop(&mut self) {
        let _ = in_ns(&self.ns, "tc")
            .args(["qdisc", "del", "dev", IFACE, "clsact"])
            .status();
    }
}

/// A TCX program at the end of the server's ingress chain, attached
/// through aya; dropping it detaches it.
struct TcxProgram {
    _ebpf: Ebpf,
}

impl TcxProgram {
    fn attach(ns: &str, object: &Path) -> Self {
        let object = object.to_owned();
        let ebpf = in_namespace(ns, move || {
            let mut ebpf = Ebpf::load_file(&object)
                .unwrap_or_else(|e| panic!("load {}: {e}", object.display()));
            let program: &mut SchedClassifier = ebpf
                .program_mut("drop")
                .expect("program drop")
                .try_into()
                .expect("a TC program");
            program.load().expect("load drop");
            program
                .attach_with_options(
                    IFACE,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .expect("attach drop through TCX");
            ebpf
        });
        Self { _ebpf: ebpf }
    }
}

/// Asserts that the mirror runs before the firewall on the server's
/// ingress, as the kernel lists them.
fn assert_mirror_first(host: &Host, kind: Kind, mode: Mode) {
    // The mirror's egress program (both directions, the default with TC)
    // is at the other hook: the egress tests check it.
    let tcx: Vec<String> = tcx_programs(&host.bed.server, IFACE)
        .into_iter()
        .filter(|name| name != "mirror_egress")
        .collect();
    let filters = host.clsact_filters();
    match mode {
        Mode::Tcx => {
            let mut expected = vec!["mirror_tc".to_owned()];
            if kind == Kind::Tcx {
                expected.push("drop".to_owned());
            }
            assert_eq!(tcx, expected, "the mirror heads the TCX chain");
        }
        Mode::Clsact => {
            assert!(tcx.is_empty(), "{tcx:?}");
            // One instance at priority 1; the kernel lists its filters in
            // the order they run.
            let names: Vec<&str> = filters
                .iter()
                .map(|line| {
                    assert!(line.contains("pref 1 bpf chain 0"), "{line}");
                    line.split(" name ")
                        .nth(1)
                        .unwrap()
                        .split(' ')
                        .next()
                        .unwrap()
                })
                .collect();
            assert_eq!(names, ["mirror_tc", "drop"], "{filters:#?}");
        }
    }
}

/// Ping is dropped by the firewall with the mirror attached exactly as
/// without it, and the mirror dumps a transfer on its port byte for byte.
fn firewall_keeps_working(kind: Kind, when: When, mode: Mode) {
    let host = Host::new();
    assert!(host.ping_passes(), "ping works on the bare veth pair");
    let mut firewall = None;
    if when == When::Before {
        firewall = Some(host.firewall(kind, Drops::Icmp));
        assert!(!host.ping_passes(), "the firewall drops ping");
    }

    let mirror = host.start_mirror(mode);
    if when == When::After {
        assert!(host.ping_passes(), "nothing drops ping yet");
        firewall = Some(host.firewall(kind, Drops::Icmp));
    }
    assert_mirror_first(&host, kind, mode);
    assert!(
        !host.ping_passes(),
        "the firewall still drops ping with the mirror attached"
    );

    let files = random_files(&host.path("send"), CLIENT_PORT, 1, MIB, MIB);
    let received = host.path("received");
    let server = start_server(&host.bed.server, PORT, &received);
    send_all(&host.bed.client, SERVER, PORT, &files, &received);
    assert!(
        !host.ping_passes(),
        "the firewall drops ping while the mirror mirrors"
    );
    let output = mirror.stop();
    drop(server);

    host.bed
        .assert_dumped_whole(Path::new(&host.dump), &files, PORT, &output);
    assert_eq!(output.kernel("ring_full"), 0, "{:?}", output.counters);

    host.bed.assert_nothing_attached("after the mirror stopped");
    assert!(
        !host.ping_passes(),
        "the firewall drops ping after the mirror"
    );
    drop(firewall);
    assert!(
        host.ping_passes(),
        "without the firewall ping passes again: the mirror left nothing that drops it"
    );
}

root_tests! {
    clsact_firewall_and_tcx_mirror =>
        firewall_keeps_working(Kind::Clsact, When::Before, Mode::Tcx);
    clsact_firewall_added_behind_a_tcx_mirror =>
        firewall_keeps_working(Kind::Clsact, When::After, Mode::Tcx);
    clsact_firewall_and_clsact_mirror =>
        firewall_keeps_working(Kind::Clsact, When::Before, Mode::Clsact);
    tcx_firewall_attached_before_a_tcx_mirror =>
        firewall_keeps_working(Kind::Tcx, When::Before, Mode::Tcx);
    tcx_firewall_attached_after_a_tcx_mirror =>
        firewall_keeps_working(Kind::Tcx, When::After, Mode::Tcx);
}

/// A firewall that drops the mirrored port itself: the connection fails
/// as without the mirror, and the mirror still sees its SYNs, which it can
/// only because it runs before the firewall.
fn mirror_sees_what_the_firewall_drops(kind: Kind, mode: Mode) {
    let host = Host::new();
    let _firewall = host.firewall(kind, Drops::MirroredPort);
    let received = host.path("received");
    let _server = start_server(&host.bed.server, PORT, &received);
    let mirror = host.start_mirror(mode);
    assert_mirror_first(&host, kind, mode);

    let connect = in_ns(&host.bed.client, "socat")
        .args([
            "-u".to_owned(),
            "OPEN:/etc/hostname".to_owned(),
            format!("TCP:{SERVER}:{PORT},connect-timeout=2"),
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("cannot run socat");
    assert!(
        !connect.success(),
        "the firewall drops the connection with the mirror attached"
    );
    assert!(host.ping_passes(), "the firewall drops only the port");
    let output = mirror.stop();
    let syns = output
        .packets
        .iter()
        .filter(|packet| packet["dst"] == format!("{SERVER}:{PORT}"))
        .count();
    // The SYN and its retransmission after 1 s.
    assert!(
        syns >= 2,
        "the mirror saw {syns} packets of the dropped connection: {:?}",
        output.counters
    );
    assert_eq!(output.kernel("mirrored"), syns as u64);
}

root_tests! {
    tcx_mirror_sees_what_a_clsact_firewall_drops =>
        mirror_sees_what_the_firewall_drops(Kind::Clsact, Mode::Tcx);
    clsact_mirror_sees_what_a_clsact_firewall_drops =>
        mirror_sees_what_the_firewall_drops(Kind::Clsact, Mode::Clsact);
    tcx_mirror_sees_what_a_tcx_firewall_drops =>
        mirror_sees_what_the_firewall_drops(Kind::Tcx, Mode::Tcx);
}

/// Where the clsact mirror cannot run first it does not attach at all, and
/// says what to do; the firewall goes on dropping.
fn clsact_mirror_refuses(host: &Host, expected: &str) {
    let (_, socket) = host.bed.socket();
    // A mirror that attaches instead runs until stopped.
    let output = exits_within(
        in_ns(&host.bed.server, &mirror_bin().display().to_string()).args([
            "run",
            "--iface",
            IFACE,
            "--port",
            "5301",
            "--tc-netlink",
            "--listen",
            &socket,
        ]),
        Duration::from_secs(20),
        "the mirror attached instead of refusing",
    );
    assert_refused(&output, expected);
    host.bed.assert_nothing_attached("by a mirror that refused");
    assert!(!host.ping_passes(), "the firewall still drops ping");
}

#[test]
fn clsact_mirror_refuses_to_run_behind_tcx_programs() {
    needs_root!();
    let host = Host::new();
    let _firewall = host.firewall(Kind::Tcx, Drops::Icmp);
    clsact_mirror_refuses(
        &host,
        "srv0 has TCX programs at tc ingress (drop), which run before every clsact filter",
    );
}

#[test]
fn clsact_mirror_refuses_a_first_priority_it_cannot_join() {
    needs_root!();
    let host = Host::new();
    // A bpf filter for IPv4 only: a mirror filter for all protocols cannot
    // share its priority.
    let _firewall = ClsactFilter::add(
        &host.bed.server,
        &drop_object(host.bed.dir(), Drops::Icmp, "tc"),
        "ip",
    );
    assert!(!host.ping_passes(), "the firewall drops ping");
    clsact_mirror_refuses(
        &host,
        "srv0 has a bpf filter for protocol 0x0800 at tc ingress priority 1",
    );
    assert_eq!(
        host.clsact_filters().len(),
        1,
        "{:?}",
        host.clsact_filters()
    );
}

/// A clsact mirror killed with SIGKILL together with its privileged helper
/// (which otherwise removes the filter) leaves its filter at priority 1
/// next to the firewall's; the next mirror removes that one only.
#[test]
fn a_killed_clsact_mirror_is_cleaned_up_and_the_firewall_stays() {
    needs_root!();
    let host = Host::new();
    let _firewall = host.firewall(Kind::Clsact, Drops::Icmp);
    host.start_mirror(Mode::Clsact).kill_with_helper();
    let left = host.clsact_filters();
    assert_eq!(left.len(), 2, "the killed mirror's filter stays: {left:#?}");

    let mirror = host.start_mirror(Mode::Clsact);
    assert_mirror_first(&host, Kind::Clsact, Mode::Clsact);
    host.stop_leaving_the_firewall(mirror, "left behind", "only the firewall remains");
}

/// Two clsact mirrors on one interface (other ports, other dumps): the
/// second one's start takes the first one's filter for no leftover, both
/// filters stay while both run, and each goes with its mirror.
#[test]
fn a_second_clsact_mirror_leaves_the_first_ones_filter_alone() {
    needs_root!();
    let host = Host::new();
    let first = host.start_mirror(Mode::Clsact);
    assert_eq!(host.clsact_filters().len(), 1);
    let second_dump = host.path("second").display().to_string();
    let second = MirrorProcess::start(
        &host.bed.server,
        &[
            "--iface",
            IFACE,
            "--port",
            "5302",
            "--dump-dir",
            &second_dump,
            "--tc-netlink",
        ],
    );
    let filters = host.clsact_filters();
    assert_eq!(filters.len(), 2, "both mirrors' filters: {filters:#?}");
    let output = second.stop();
    assert!(!output.stderr.contains("left behind"), "{}", output.stderr);
    let filters = host.clsact_filters();
    assert_eq!(
        filters.len(),
        1,
        "the first mirror's filter stays: {filters:#?}"
    );
    first.stop();
    assert!(host.clsact_filters().is_empty());
}

/// Someone replaces the clsact mirror's filter (same priority and handle)
/// while it runs: at exit the mirror leaves the replacement alone.
#[test]
fn a_clsact_mirror_never_deletes_a_filter_that_replaced_its_own() {
    needs_root!();
    let host = Host::new();
    let mirror = host.start_mirror(Mode::Clsact);
    let ours = host.clsact_filters();
    assert_eq!(ours.len(), 1, "{ours:#?}");
    let handle = ours[0]
        .split(" handle ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .expect("a handle")
        .to_owned();
    host.drop_icmp_filter(&[
        "replace", "dev", IFACE, "ingress", "prio", "1", "handle", &handle,
    ]);
    host.stop_leaving_the_firewall(mirror, "was replaced", "the replacement stays");
}

/// The clsact qdisc a `--tc-netlink` mirror had to add goes with it, when
/// it stops and when it is killed (its privileged helper removes it): the
/// node owner finds the interface as it was, and can add a clsact qdisc of
/// their own.
#[test]
fn a_clsact_mirror_removes_the_qdisc_it_added() {
    needs_root!();
    let host = Host::new();
    assert!(!host.has_clsact(), "a bare veth: {}", host.qdiscs());
    let mirror = host.start_mirror(Mode::Clsact);
    assert!(host.has_clsact(), "the mirror added one: {}", host.qdiscs());
    mirror.stop();
    assert!(
        !host.has_clsact(),
        "the clsact qdisc is still there after SIGINT:\n{}",
        host.qdiscs()
    );
    host.assert_clsact_can_be_added("after SIGINT");

    host.start_mirror(Mode::Clsact).kill();
    host.wait_no_clsact("after SIGKILL");
    host.assert_clsact_can_be_added("after SIGKILL");
}

/// A clsact qdisc that was there before the mirror, with someone's filter
/// on it, is still there afterwards with that filter, however the mirror
/// ends.
#[test]
fn a_clsact_qdisc_that_was_there_stays_with_its_filter() {
    needs_root!();
    let host = Host::new();
    let _firewall = host.firewall(Kind::Clsact, Drops::Icmp);
    let only_the_firewall = |after: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        // After SIGKILL the helper needs a moment to remove the filter.
        while host.clsact_filters().len() > 1 {
            assert!(
                Instant::now() < deadline,
                "{after}: {:#?}",
                host.clsact_filters()
            );
            thread::sleep(Duration::from_millis(20));
        }
        host.assert_only_drop_filter(&format!("{after}: the firewall's filter stays"));
        assert!(host.has_clsact(), "{after}: {}", host.qdiscs());
        assert!(
            !host.ping_passes(),
            "{after}: the firewall still drops ping"
        );
    };

    host.start_mirror(Mode::Clsact).stop();
    only_the_firewall("after SIGINT");
    host.start_mirror(Mode::Clsact).kill();
    only_the_firewall("after SIGKILL");
}

/// The mirror added the clsact qdisc, and someone put a filter of theirs
/// on it (egress) while the mirror ran: the qdisc stays, with that filter.
#[test]
fn a_clsact_qdisc_the_mirror_added_stays_while_someone_uses_it() {
    needs_root!();
    let host = Host::new();
    let mirror = host.start_mirror(Mode::Clsact);
    assert!(host.ping_passes(), "nothing drops ping yet");
    // Drops the echo replies.
    host.drop_icmp_filter(&["add", "dev", IFACE, "egress", "prio", "1"]);
    let _qdisc = ClsactFilter {
        ns: host.bed.server.clone(),
    };
    assert!(!host.ping_passes(), "the egress filter drops the replies");
    mirror.stop();
    assert!(
        host.clsact_filters().is_empty(),
        "{:#?}",
        host.clsact_filters()
    );
    assert!(host.has_clsact(), "the qdisc stays: {}", host.qdiscs());
    assert!(
        !host.ping_passes(),
        "the egress filter still drops the replies"
    );
}

/// The names of the programs of `filters` (lines of `tc filter show`), in
/// the order they run.
fn filter_names(filters: &[String]) -> Vec<String> {
    filters
        .iter()
        .map(|line| {
            line.split(" name ")
                .nth(1)
                .and_then(|rest| rest.split(' ').next())
                .unwrap_or_else(|| panic!("a named filter: {line}"))
                .to_owned()
        })
        .collect()
}

/// With `--directions both` the mirror's egress program takes its place
/// at the egress hook under the ingress rules: a firewall there (a clsact
/// filter that drops the echo replies and ends the chain for the rest)
/// drops while the mirror runs, after it stops and after it is killed; the
/// mirror runs before it and sees the answers it lets through; only the
/// firewall's filter is left.
fn egress_firewall_keeps_working(mode: Mode) {
    let host = Host::new();
    run_in(
        &host.bed.server,
        "tc",
        &["qdisc", "add", "dev", IFACE, "clsact"],
    );
    let _qdisc = ClsactFilter {
        ns: host.bed.server.clone(),
    };
    host.drop_icmp_filter(&["add", "dev", IFACE, "egress", "prio", "1"]);
    assert!(!host.ping_passes(), "the egress firewall drops the replies");
    let only_the_firewall = |after: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        // After SIGKILL the helper needs a moment to remove the filter.
        while host.filters_at("egress").len() > 1 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            filter_names(&host.filters_at("egress")),
            ["drop"],
            "{after}: only the firewall's egress filter"
        );
        host.bed.assert_nothing_attached(after);
        assert!(!host.ping_passes(), "{after}: the firewall still drops");
    };
    let start = || {
        let mut args = vec![
            "--iface",
            IFACE,
            "--port",
            "5301",
            "--dump-dir",
            &host.dump,
            "--directions",
            "both",
        ];
        args.extend(mode.args());
        MirrorProcess::start(&host.bed.server, &args)
    };

    let mirror = start();
    match mode {
        Mode::Tcx => assert_eq!(
            tcx_programs(&host.bed.server, IFACE),
            ["mirror_tc", "mirror_egress"]
        ),
        Mode::Clsact => assert_eq!(
            filter_names(&host.filters_at("egress")),
            ["mirror_egress", "drop"],
            "the mirror runs first at egress"
        ),
    }
    assert!(
        !host.ping_passes(),
        "the firewall drops with the mirror attached"
    );
    let files = random_files(&host.path("send"), CLIENT_PORT, 1, MIB, MIB);
    let received = host.path("received");
    let server = start_server(&host.bed.server, PORT, &received);
    send_all(&host.bed.client, SERVER, PORT, &files, &received);
    let output = mirror.stop();
    drop(server);
    host.bed
        .assert_dumped_whole(Path::new(&host.dump), &files, PORT, &output);
    let answers = output
        .packets
        .iter()
        .filter(|packet| packet["src"] == format!("{SERVER}:{PORT}"))
        .count() as u64;
    assert!(answers > 0, "the server's answers are mirrored: {output}");
    assert_eq!(output.counter("drain.server_records"), answers);
    only_the_firewall("after SIGINT");

    start().kill();
    only_the_firewall("after SIGKILL");

    if mode == Mode::Clsact {
        // Killed with its helper, the mirror leaves its egress filter; the
        // next one removes that one only.
        start().kill_with_helper();
        assert_eq!(
            filter_names(&host.filters_at("egress")),
            ["mirror_egress", "drop"]
        );
        let output = start().stop();
        assert!(output.stderr.contains("left behind"), "{}", output.stderr);
        only_the_firewall("after a leftover was removed");
    }
}

root_tests! {
    egress_firewall_and_tcx_mirror => egress_firewall_keeps_working(Mode::Tcx);
    egress_firewall_and_clsact_mirror => egress_firewall_keeps_working(Mode::Clsact);
}

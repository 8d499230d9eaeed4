//! Test hosts: network namespaces joined by veth pairs, created by a test
//! and always deleted by it (on drop, also when the test panics).

use std::{
    fs,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use aya::programs::{SchedClassifier, TcAttachType};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Prefix of every namespace the tests create: `mt<pid>x<n>-<role>`.
const PREFIX: &str = "mt";

/// A set of namespaces owned by one test.
pub struct TestNet {
    prefix: String,
    namespaces: Vec<String>,
}

impl TestNet {
    pub fn new() -> Self {
        crate::require_root();
        remove_stale_namespaces();
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        Self {
            prefix: format!("{PREFIX}{}x{n}", std::process::id()),
            namespaces: Vec::new(),
        }
    }

    /// Creates a namespace with its loopback up; returns its name.
    pub fn namespace(&mut self, role: &str) -> String {
        let name = format!("{}-{role}", self.prefix);
        ip(&["netns", "add", &name]);
        self.namespaces.push(name.clone());
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        name
    }

    /// Joins two namespaces by a veth pair, addresses in CIDR notation
    /// (198.18.0.0/15 only). The interfaces are created inside the
    /// namespaces, so their names never clash with the machine's own.
    pub fn veth(&self, a: (&str, &str, &str), b: (&str, &str, &str)) {
        let ((ns_a, if_a, addr_a), (ns_b, if_b, addr_b)) = (a, b);
        for addr in [addr_a, addr_b] {
            assert!(
                addr.starts_with("198.18.") || addr.starts_with("198.19."),
                "{addr}"
            );
        }
        ip(&[
            "link", "add", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b, "netns", ns_b,
        ]);
        for (ns, iface, addr) in [(ns_a, if_a, addr_a), (ns_b, if_b, addr_b)] {
            ip(&["-n", ns, "addr", "add", addr, "dev", iface]);
            ip(&["-n", ns, "link", "set", iface, "up"]);
        }
    }
}

impl Default for TestNet {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            // Kills nothing by itself: callers stop their processes first;
            // deleting the namespace removes its veth ends too.
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Namespaces of earlier runs whose process is gone (a killed test run
/// cannot clean up after itself).
fn remove_stale_namespaces() {
    remove_namespaces_where(|pid| {
        pid != std::process::id() && !fs::exists(format!("/proc/{pid}")).unwrap_or(true)
    });
}

/// Kills every process in this process's namespaces and deletes them: for
/// a run interrupted before its owners could drop.
pub fn remove_own_namespaces() {
    remove_namespaces_where(|pid| pid == std::process::id());
}

/// Deletes the test namespaces whose creator's pid satisfies `owner`,
/// killing what still runs in them first (a namespace outlives its name
/// while a process holds it).
fn remove_namespaces_where(owner: impl Fn(u32) -> bool) {
    let Ok(entries) = fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('x').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !owner(pid) {
            continue;
        }
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &name]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    // SAFETY: kill(2) with a pid read from the kernel.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
    }
}

/// Runs `ip ARGS`, panicking with its stderr on failure.
pub fn ip(args: &[&str]) -> Output {
    run_ok(Command::new("ip").args(args))
}

/// Runs `command` to completion and returns its output; panics with what
/// it printed when it fails.
pub fn run_ok(command: &mut Command) -> Output {
    let out = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", describe(command)));
    assert!(
        out.status.success(),
        "{} failed: {}{}",
        describe(command),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `command`, which must end by itself within `timeout` (a mirror
/// that refuses to start); returns its output, standard output discarded.
/// Panics with `running` and its stderr when it is still running then.
pub fn exits_within(command: &mut Command, timeout: Duration, running: &str) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", describe(command)));
    let deadline = Instant::now() + timeout;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().expect("wait");
            panic!("{running}: {}", String::from_utf8_lossy(&output.stderr));
        }
        thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("wait")
}

/// `program arg...`, as a shell would show it.
fn describe(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|part| part.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A child process that is killed when dropped, so that a failing test
/// leaves no server running in a deleted namespace.
pub struct KillOnDrop(pub Child);

impl KillOnDrop {
    /// Waits for the process to exit by itself, at most `timeout`; panics
    /// if it fails or takes longer.
    pub fn wait_success(mut self, what: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.0.try_wait().expect("wait") {
                assert!(status.success(), "{what} failed: {status}");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what} did not finish within {timeout:?}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Spawns `command`, killed on drop.
pub fn spawn(command: &mut Command) -> KillOnDrop {
    KillOnDrop(
        command
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", command.get_program())),
    )
}

/// Waits until something in `ns` listens on TCP `port` (at most 10 s).
pub fn wait_listening(ns: &str, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let filter = format!("sport = :{port}");
    while Instant::now() < deadline {
        let out = run_in(ns, "ss", &["-Hltn", &filter]);
        if !out.stdout.is_empty() {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing listens on port {port} in {ns} after 10 s");
}

/// Waits (at most 10 s) until every TCP connection of the server on `port`
/// in `ns` has ended: each gone or in TIME-WAIT, so that both FINs and
/// their ACKs have passed the mirror's hooks. A test that counts how
/// connections ended stops the mirror only then; a client that stops
/// leaves its last connections closing for a few milliseconds.
pub fn wait_server_connections_ended(ns: &str, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let filter = format!("sport = :{port}");
    let mut args = vec!["-Htn"];
    for state in [
        "syn-recv",
        "established",
        "fin-wait-1",
        "fin-wait-2",
        "close-wait",
        "last-ack",
        "closing",
    ] {
        args.extend(["state", state]);
    }
    args.push(&filter);
    while Instant::now() < deadline {
        if run_in(ns, "ss", &args).stdout.is_empty() {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    panic!("connections to port {port} in {ns} still open after 10 s");
}

/// A command that runs inside namespace `ns`.
pub fn in_ns(ns: &str, program: &str) -> Command {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", ns, program]);
    command
}

/// Runs `program ARGS` in `ns` to completion and returns its output;
/// panics when it fails.
pub fn run_in(ns: &str, program: &str, args: &[&str]) -> Output {
    run_ok(in_ns(ns, program).args(args))
}

/// Everything attached to `iface` in `ns`, as the standard tools show it
/// (`ip link` for XDP, `tc filter` for clsact, `bpftool net`), plus the
/// TCX programs, which Debian 12's bpftool predates.
pub fn attached_programs(ns: &str, iface: &str) -> String {
    let mut report = format!("tcx: {}\n", tcx_programs(ns, iface).join(" "));
    for (program, args) in [
        ("ip", vec!["-d", "link", "show", "dev", iface]),
        ("tc", vec!["filter", "show", "dev", iface, "ingress"]),
        ("tc", vec!["filter", "show", "dev", iface, "egress"]),
        ("bpftool", vec!["net", "show", "dev", iface]),
    ] {
        let out = run_in(ns, program, &args);
        report.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    report
}

/// Names of the programs attached to `iface` in `ns` through TCX links,
/// ingress and egress.
pub fn tcx_programs(ns: &str, iface: &str) -> Vec<String> {
    let iface = iface.to_owned();
    in_namespace(ns, move || {
        let mut names = Vec::new();
        for attach_type in [TcAttachType::Ingress, TcAttachType::Egress] {
            let (_, programs) = SchedClassifier::query_tcx(&iface, attach_type)
                .unwrap_or_else(|e| panic!("query TCX of {iface}: {e}"));
            names.extend(
                programs
                    .iter()
                    .map(|p| p.name_as_str().unwrap_or("(unnamed)").to_owned()),
            );
        }
        names
    })
}

/// Runs `f` on a thread of its own inside network namespace `ns` (setns
/// moves only the calling thread). What `f` creates there (sockets, BPF
/// links) stays in that namespace wherever it is used afterwards.
pub fn in_namespace<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    thread::spawn(move || {
        let file = fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: a valid namespace fd, and this thread only.
        let entered = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(entered, 0, "setns {path}");
        f()
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// True when the report of [`attached_programs`] shows a program of ours
/// or any XDP program.
pub fn shows_attachment(report: &str) -> bool {
    report.contains("mirror_")
        || report.contains("prog/xdp")
        || report
            .lines()
            .any(|line| line.trim_start().starts_with("xdp") && line.contains("id "))
}

/// `sleep 300` in `ns` (killed when dropped), once it is there (`ip netns
/// exec` enters the namespace after it started: its pid is in ours until
/// then).
pub fn sleeper_in(ns: &str) -> KillOnDrop {
    let sleeper = spawn(in_ns(ns, "sleep").arg("300"));
    let target = fs::metadata(format!("/run/netns/{ns}"))
        .expect("the namespace")
        .ino();
    let path = format!("/proc/{}/ns/net", sleeper.0.id());
    let entered = (0..400).any(|_| {
        if fs::metadata(&path).is_ok_and(|meta| meta.ino() == target) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
        false
    });
    assert!(entered, "sleep entered {ns} within 10 s");
    sleeper
}

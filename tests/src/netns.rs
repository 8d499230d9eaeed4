//! Test hosts: network namespaces joined by veth pairs, created by a test
//! and always deleted by it (on drop, also when the test panics).

use std::{
    fs,
    os::fd::AsRawFd as _,
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
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

/// Two namespaces joined by a veth pair: a client (`cli0`, 198.18.0.1/24)
/// and a server (`srv0`, 198.18.0.2/24), default offloads on.
pub struct ClientServer {
    pub net: TestNet,
    pub client: String,
    pub server: String,
}

impl ClientServer {
    pub const CLIENT_IP: &'static str = "198.18.0.1";
    pub const SERVER_IP: &'static str = "198.18.0.2";

    pub fn new() -> Self {
        let mut net = TestNet::new();
        let client = net.namespace("cli");
        let server = net.namespace("srv");
        net.veth(
            (&client, "cli0", "198.18.0.1/24"),
            (&server, "srv0", "198.18.0.2/24"),
        );
        Self {
            net,
            client,
            server,
        }
    }
}

impl Default for ClientServer {
    fn default() -> Self {
        Self::new()
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
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("cannot run ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A child process that is killed when dropped, so that a failing test
/// leaves no server running in a deleted namespace.
pub struct KillOnDrop(pub Child);

impl KillOnDrop {
    /// Waits for the process to exit by itself, at most `timeout`; panics
    /// if it fails or takes longer.
    pub fn wait_success(mut self, what: &str, timeout: std::time::Duration) {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.0.try_wait().expect("wait") {
                assert!(status.success(), "{what} failed: {status}");
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what} did not finish within {timeout:?}"
            );
            thread::sleep(std::time::Duration::from_millis(20));
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
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let filter = format!("sport = :{port}");
    while std::time::Instant::now() < deadline {
        let out = run_in(ns, "ss", &["-Hltn", &filter]);
        if !out.stdout.is_empty() {
            return;
        }
        thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("nothing listens on port {port} in {ns} after 10 s");
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
    let out = in_ns(ns, program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {} in {ns} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Everything attached to `iface` in `ns`, as the standard tools show it
/// (`ip link` for XDP, `tc filter` for clsact, `bpftool net`), plus the
/// TCX programs, which Debian 12's bpftool predates.
pub fn attached_programs(ns: &str, iface: &str) -> String {
    let mut report = format!("tcx: {}\n", tcx_programs(ns, iface).join(" "));
    for (program, args) in [
        ("ip", vec!["-d", "link", "show", "dev", iface]),
        ("tc", vec!["filter", "show", "dev", iface, "ingress"]),
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
    let path = format!("/run/netns/{ns}");
    let iface = iface.to_owned();
    // setns moves only the calling thread: do it on a thread of its own.
    thread::spawn(move || {
        let file = fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: a valid namespace fd, and this thread only.
        let entered = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(entered, 0, "setns {path}");
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
    .join()
    .expect("TCX query thread")
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

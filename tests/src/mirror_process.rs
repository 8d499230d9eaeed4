//! The real `mirror` binary as a child process inside a test namespace.

use std::{
    collections::BTreeMap,
    fmt,
    io::{BufRead, BufReader, Read},
    path::PathBuf,
    process::{Child, ChildStdout, Command, ExitStatus, Output, Stdio},
    sync::mpsc,
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use mirror_user::sinks::print::EventTotals;
use serde_json::Value;

use crate::bed::scratch_dir;

/// The binary under test: `$MIRROR_BIN` (set by `cargo xtask test`), else
/// the release build in this workspace.
pub fn mirror_bin() -> PathBuf {
    let path = std::env::var_os("MIRROR_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/mirror"),
        PathBuf::from,
    );
    assert!(
        path.is_file(),
        "{} does not exist: run the tests with `cargo xtask test`",
        path.display()
    );
    path
}

/// Runs `mirror ARGS` in `ns` (or here) to completion.
///
/// Client commands (`ports`, `stats`, `tail`) reach a Unix socket from any
/// network namespace; TCP endpoints need the mirror's namespace.
pub fn run_mirror(ns: Option<&str>, args: &[&str]) -> Output {
    command(ns)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("cannot run mirror")
}

/// Asserts that a command failed and said `expected` on stderr.
#[track_caller]
pub fn assert_refused(out: &Output, expected: &str) {
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "must fail: {text}");
    assert!(text.contains(expected), "expected {expected:?} in: {text}");
}

/// Asserts that a command succeeded; its stderr goes into the message.
#[track_caller]
pub fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn command(ns: Option<&str>) -> Command {
    match ns {
        Some(ns) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", ns]).arg(mirror_bin());
            command
        }
        None => Command::new(mirror_bin()),
    }
}

/// The log line `mirror run` prints once it is attached.
const READY: &str = "mirroring TCP to port";
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `mirror run`.
pub struct MirrorProcess {
    child: Child,
    /// Where its subscriber server listens.
    socket: Option<PathBuf>,
    /// Holds that socket; removed with it when the test ends, also when
    /// the mirror was killed and could not remove its socket.
    _socket_dir: Option<tempfile::TempDir>,
    stdout: Option<JoinHandle<Vec<String>>>,
    stdout_pipe: Option<ChildStdout>,
    stderr: Option<JoinHandle<Vec<String>>>,
}

/// What a stopped mirror printed.
#[derive(Debug)]
pub struct MirrorOutput {
    pub status: ExitStatus,
    /// `"kind": "packet"` lines (with `--print-packets json`).
    pub packets: Vec<Value>,
    /// Stream event lines (with `--print json`).
    pub events: Vec<Value>,
    /// The exit counters, `"kernel.<name>"` and `"drain.<name>"`, from the
    /// JSON counters line or from the text summary on stderr.
    pub counters: BTreeMap<String, u64>,
    pub stderr: String,
}

/// The counters and stderr, for assertion messages.
impl fmt::Display for MirrorOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#?}\nstderr:\n{}", self.counters, self.stderr)
    }
}

impl MirrorOutput {
    /// A kernel counter by name.
    pub fn kernel(&self, name: &str) -> u64 {
        self.counter(&format!("kernel.{name}"))
    }

    /// Asserts that each counter (by its full name) has its value.
    #[track_caller]
    pub fn assert_counters(&self, expected: &[(&str, u64)]) {
        for &(name, value) in expected {
            assert_eq!(self.counter(name), value, "{name}\n{self}");
        }
    }

    /// A counter by its full name.
    pub fn counter(&self, name: &str) -> u64 {
        *self.counters.get(name).unwrap_or_else(|| {
            panic!(
                "no counter {name} in {:?}; stderr:\n{}",
                self.counters, self.stderr
            )
        })
    }
}

/// The `stage: name=value ...` lines of the text summary, with the same
/// names as [`json_counters`] (`port 80:` becomes `ports.80`).
fn text_counters(stderr: &[String]) -> BTreeMap<String, u64> {
    let mut counters = BTreeMap::new();
    for line in stderr {
        let Some((stage, rest)) = line.split_once(": ") else {
            continue;
        };
        let stage = match stage.split_once(' ') {
            Some(("port", port)) => format!("ports.{port}"),
            Some(("consumer", name)) => format!("consumers.{name}"),
            Some(("forward", target)) => format!("forward.{target}"),
            Some(_) => continue,
            None if [
                "kernel",
                "drain",
                "shards",
                "connections",
                "server",
                "arena",
                "pcap",
                "nats",
                "interfaces",
            ]
            .contains(&stage) =>
            {
                stage.to_owned()
            }
            None if stage == "closed" => "connections.closed".to_owned(),
            None => continue,
        };
        for pair in rest.split_whitespace() {
            if let Some((name, value)) = pair.split_once('=')
                && let Ok(value) = value.parse()
            {
                counters.insert(format!("{stage}.{name}"), value);
            }
        }
    }
    counters
}

/// The counters line, flattened as `mirror stats` shows it.
fn json_counters(line: &Value) -> BTreeMap<String, u64> {
    mirror_user::telemetry::registry::Document::from_json(line).flatten()
}

/// How the test reads what the mirror prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stdout {
    /// Read as it comes.
    Read,
    /// Left unread (a stalled reader) until [`MirrorProcess::interrupt`].
    Stalled,
}

impl MirrorProcess {
    /// Starts `mirror run ARGS --print-packets json` in `ns` and waits until
    /// it is attached; panics with its stderr if it exits or stalls first.
    pub fn start(ns: &str, args: &[&str]) -> Self {
        let mut all = args.to_vec();
        all.extend(["--print-packets", "json"]);
        Self::spawn(ns, &all, Stdout::Read)
    }

    /// Starts `mirror run ARGS` as given.
    pub fn start_with(ns: &str, args: &[&str], stdout: Stdout) -> Self {
        Self::spawn(ns, args, stdout)
    }

    /// Like [`Self::start`], printing nothing per packet.
    pub fn start_quiet(ns: &str, args: &[&str]) -> Self {
        Self::spawn(ns, args, Stdout::Read)
    }

    /// Starts `mirror run ARGS` as given in the test's own namespace (the
    /// mirror then watches others with --netns, --pid or --iface NETNS:IF).
    pub fn start_here(args: &[&str]) -> Self {
        Self::spawn_in(None, args, Stdout::Read)
    }

    /// The address its subscriber server listens on (when the test did not
    /// choose one).
    pub fn endpoint(&self) -> String {
        let socket = self.socket.as_ref().expect("the test gave --listen itself");
        format!("unix:{}", socket.display())
    }

    /// Process id (`ip netns exec` execs, so this is mirror itself).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (up to `timeout`) until the running mirror's counters, as
    /// `mirror stats --json` flattens them, satisfy `done`: events travel
    /// through the mirror a little after the packets that carry them.
    pub fn wait_for_counters(
        &self,
        timeout: Duration,
        done: impl Fn(&BTreeMap<String, u64>) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if done(&running_counters(&self.endpoint())) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits (20 s at most) until exactly `count` connections have closed
    /// with their FIN: a server holding the bytes does not mean that the
    /// mirror has passed the FINs on yet.
    #[track_caller]
    pub fn wait_for_fin_closes(&self, count: u64) {
        assert!(
            self.wait_for_counters(Duration::from_secs(20), |c| {
                c.get("connections.closed.fin").copied() == Some(count)
            }),
            "{count} connections end with FIN"
        );
    }

    fn spawn(ns: &str, args: &[&str], stdout_mode: Stdout) -> Self {
        Self::spawn_in(Some(ns), args, stdout_mode)
    }

    fn spawn_in(ns: Option<&str>, args: &[&str], stdout_mode: Stdout) -> Self {
        // Tests run side by side and /run is shared by every network
        // namespace: each mirror gets its own socket unless told otherwise.
        let socket_dir = (!args.contains(&"--listen")).then(scratch_dir);
        let socket = socket_dir
            .as_ref()
            .map(|dir| dir.path().join("mirror.sock"));
        let listen: Vec<String> = socket
            .iter()
            .flat_map(|path| ["--listen".to_owned(), format!("unix:{}", path.display())])
            .collect();
        let mut child = command(ns)
            .arg("run")
            .args(args)
            .args(&listen)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start mirror");
        let stdout = child.stdout.take().expect("piped");
        let (stderr, ready) = read_lines(child.stderr.take().expect("piped"), READY);
        let mut process = Self {
            child,
            socket,
            _socket_dir: socket_dir,
            stdout: None,
            stdout_pipe: Some(stdout),
            stderr: Some(stderr),
        };
        if stdout_mode == Stdout::Read {
            process.read_stdout();
        }
        if let Err(what) = wait_ready(&mut process.child, &ready) {
            let stderr = process.stderr.take().map(|h| h.join().unwrap_or_default());
            panic!(
                "mirror {what} before attaching; stderr:\n{}",
                stderr.unwrap_or_default().join("\n")
            );
        }
        process
    }

    /// Starts reading standard output (once).
    fn read_stdout(&mut self) {
        if let Some(pipe) = self.stdout_pipe.take() {
            self.stdout = Some(thread::spawn(move || {
                BufReader::new(pipe)
                    .lines()
                    .map_while(Result::ok)
                    .collect::<Vec<_>>()
            }));
        }
    }

    /// SIGINT, then the output once it exited (a stalled standard output is
    /// read from here on).
    pub fn interrupt(mut self) -> MirrorOutput {
        self.read_stdout();
        self.signal(libc::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("mirror did not exit within 30 s of SIGINT");
            }
            thread::sleep(Duration::from_millis(20));
        };
        let stdout = self
            .stdout
            .take()
            .expect("once")
            .join()
            .expect("stdout reader");
        let stderr = self
            .stderr
            .take()
            .expect("once")
            .join()
            .expect("stderr reader");
        let mut packets = Vec::new();
        let mut events = Vec::new();
        let mut counters = text_counters(&stderr);
        for line in &stdout {
            let value: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("mirror printed a line that is not JSON ({e}): {line}"));
            match (value["kind"].as_str(), value["event"].as_str()) {
                (Some("packet"), _) => packets.push(value),
                (Some("counters"), _) => counters = json_counters(&value),
                (None, Some(_)) => events.push(value),
                _ => panic!("unexpected line: {line}"),
            }
        }
        MirrorOutput {
            status,
            packets,
            events,
            counters,
            stderr: stderr.join("\n"),
        }
    }

    /// SIGINT, then the output of a mirror that must have exited
    /// successfully.
    pub fn stop(self) -> MirrorOutput {
        let output = self.interrupt();
        assert!(
            output.status.success(),
            "mirror failed ({}): {}",
            output.status,
            output.stderr
        );
        output
    }

    /// SIGKILL: the process gets no chance to detach (its privileged
    /// helper, which outlives it, cleans up after it).
    pub fn kill(mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }

    /// SIGKILL to the mirror and to its privileged helper at once (as an
    /// OOM kill of both would): nothing runs to clean up.
    pub fn kill_with_helper(mut self) {
        let helper = self.helper_pid();
        // SAFETY: plain kill(2) on the helper, a child of our child.
        unsafe { libc::kill(helper as libc::pid_t, libc::SIGKILL) };
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::path::Path::new(&format!("/proc/{helper}")).exists() {
            assert!(Instant::now() < deadline, "the helper did not die");
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The privileged helper the mirror started (its only child).
    pub fn helper_pid(&self) -> u32 {
        children(self.pid())
            .first()
            .copied()
            .unwrap_or_else(|| panic!("mirror {} has no privileged helper", self.pid()))
    }

    fn signal(&self, signal: libc::c_int) {
        // `ip netns exec` execs the command, so the child is mirror itself.
        // SAFETY: plain kill(2) on our own child.
        let result = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(result, 0, "cannot signal mirror");
    }
}

impl Drop for MirrorProcess {
    fn drop(&mut self) {
        // A test that panicked must not leave a mirror running.
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A running `mirror tail` (or any other client command), from the test's
/// own network namespace unless `ns` is given.
pub struct ClientProcess {
    child: Child,
    stderr: Option<JoinHandle<Vec<String>>>,
}

impl ClientProcess {
    /// Starts `mirror tail --connect ENDPOINT ARGS` and waits until it
    /// follows its ports; panics with its stderr if it fails first.
    pub fn tail(ns: Option<&str>, endpoint: &str, args: &[&str]) -> Self {
        let mut all = vec!["--connect", endpoint];
        all.extend(args);
        Self::tail_with(ns, &all)
    }

    /// Starts `mirror tail ARGS` (a source of its own, such as `--nats`)
    /// and waits until it follows its ports.
    pub fn tail_with(ns: Option<&str>, args: &[&str]) -> Self {
        let mut child = command(ns)
            .arg("tail")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start mirror tail");
        let (stderr, ready) = read_lines(child.stderr.take().expect("piped"), "following port");
        let mut process = Self {
            child,
            stderr: Some(stderr),
        };
        if let Err(what) = wait_ready(&mut process.child, &ready) {
            let (_, stderr) = process.wait(Duration::from_secs(5));
            panic!("mirror tail {what} before it followed its ports:\n{stderr}");
        }
        process
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: plain kill(2) on our own child.
        let result = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(result, 0, "cannot signal mirror tail");
    }

    /// Waits for the process to exit (kills it after `timeout`); returns
    /// its status and stderr.
    pub fn wait(mut self, timeout: Duration) -> (ExitStatus, String) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                break self.child.wait().expect("wait");
            }
            thread::sleep(Duration::from_millis(20));
        };
        let stderr = self
            .stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        (status, stderr.join("\n"))
    }
}

impl Drop for ClientProcess {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Reads `pipe` line by line on a thread of its own, which returns the
/// lines at its end; the receiver gets a message at the first line that
/// contains `ready`.
fn read_lines(
    pipe: impl Read + Send + 'static,
    ready: &'static str,
) -> (JoinHandle<Vec<String>>, mpsc::Receiver<()>) {
    let (ready_tx, ready_rx) = mpsc::channel();
    let reader = thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if line.contains(ready) {
                let _ = ready_tx.send(());
            }
            lines.push(line);
        }
        lines
    });
    (reader, ready_rx)
}

/// Waits until `ready` says the process is ready; kills it and says what
/// happened (`exited`, `stalled`) when it exits first or takes longer than
/// the start timeout.
fn wait_ready(child: &mut Child, ready: &mpsc::Receiver<()>) -> Result<(), &'static str> {
    let deadline = Instant::now() + START_TIMEOUT;
    while ready.recv_timeout(Duration::from_millis(50)).is_err() {
        let exited = child.try_wait().expect("wait").is_some();
        if exited || Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(if exited { "exited" } else { "stalled" });
        }
    }
    Ok(())
}

/// Child processes of `pid`.
pub fn children(pid: u32) -> Vec<u32> {
    let mut children = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            let list = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            children.extend(
                list.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    children
}

/// A field of `/proc/PID/status` (`Uid`, `CapEff`, ...), for every thread
/// of the process: `(thread id, value)`.
pub fn thread_status(pid: u32, field: &str) -> Vec<(String, String)> {
    let prefix = format!("{field}:");
    let mut values = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("the process runs") {
        let task = task.expect("task");
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        if let Some(value) = status.lines().find_map(|line| line.strip_prefix(&prefix)) {
            values.push((
                task.file_name().to_string_lossy().into_owned(),
                value.trim().to_owned(),
            ));
        }
    }
    values
}

/// A running mirror's counters, as `mirror stats --json` flattens them
/// (empty while it does not answer).
pub fn running_counters(endpoint: &str) -> BTreeMap<String, u64> {
    let out = run_mirror(None, &["stats", "--connect", endpoint, "--json"]);
    serde_json::from_slice::<Value>(&out.stdout)
        .map(|json| mirror_user::telemetry::registry::Document::from_json(&json).flatten())
        .unwrap_or_default()
}

/// What `mirror tail` said it received, from the line it prints at exit.
pub fn tail_totals(stderr: &str) -> EventTotals {
    stderr
        .lines()
        .find_map(|line| line.strip_prefix("mirror tail: ")?.parse().ok())
        .unwrap_or_else(|| panic!("mirror tail printed no totals:\n{stderr}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_parse_from_text_and_json() {
        let text = [
            "INFO mirroring".to_owned(),
            "kernel: seen=5 ring_full=2".to_owned(),
            "drain: records=3 bytes=10".to_owned(),
        ];
        let parsed = text_counters(&text);
        assert_eq!(parsed["kernel.seen"], 5);
        assert_eq!(parsed["kernel.ring_full"], 2);
        assert_eq!(parsed["drain.bytes"], 10);
        let json: Value =
            serde_json::json!({"kind": "counters", "kernel": {"seen": 7}, "drain": {"records": 1}});
        let parsed = json_counters(&json);
        assert_eq!(parsed["kernel.seen"], 7);
        assert_eq!(parsed["drain.records"], 1);
    }
}

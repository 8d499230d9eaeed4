//! The real `mirror` binary as a child process inside a test namespace.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::mpsc,
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use serde_json::Value;

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
pub fn run_mirror(ns: Option<&str>, args: &[&str]) -> Output {
    command(ns)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("cannot run mirror")
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

/// A running `mirror run ... --print json`.
pub struct MirrorProcess {
    child: Child,
    stdout: Option<JoinHandle<Vec<String>>>,
    stderr: Option<JoinHandle<Vec<String>>>,
}

/// What a stopped mirror printed.
#[derive(Debug)]
pub struct MirrorOutput {
    pub status: ExitStatus,
    /// `"kind": "packet"` lines (with `--print json`).
    pub packets: Vec<Value>,
    /// The exit counters, `"kernel.<name>"` and `"drain.<name>"`, from the
    /// JSON counters line or from the text summary on stderr.
    pub counters: BTreeMap<String, u64>,
    pub stderr: String,
}

impl MirrorOutput {
    /// A kernel counter by name.
    pub fn kernel(&self, name: &str) -> u64 {
        self.counter(&format!("kernel.{name}"))
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

/// `kernel: seen=1 ...` and `drain: records=1 ...` lines of the text summary.
fn text_counters(stderr: &[String]) -> BTreeMap<String, u64> {
    let mut counters = BTreeMap::new();
    for line in stderr {
        let Some((stage, rest)) = line.split_once(": ") else {
            continue;
        };
        if stage != "kernel" && stage != "drain" {
            continue;
        }
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

fn json_counters(line: &Value) -> BTreeMap<String, u64> {
    let mut counters = BTreeMap::new();
    for stage in ["kernel", "drain"] {
        if let Some(values) = line[stage].as_object() {
            for (name, value) in values {
                if let Some(value) = value.as_u64() {
                    counters.insert(format!("{stage}.{name}"), value);
                }
            }
        }
    }
    counters
}

impl MirrorProcess {
    /// Starts `mirror run ARGS --print json` in `ns` and waits until it is
    /// attached; panics with its stderr if it exits or stalls first.
    pub fn start(ns: &str, args: &[&str]) -> Self {
        Self::spawn(ns, args, true)
    }

    /// Like [`Self::start`], without printing packets.
    pub fn start_quiet(ns: &str, args: &[&str]) -> Self {
        Self::spawn(ns, args, false)
    }

    /// Process id (`ip netns exec` execs, so this is mirror itself).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn spawn(ns: &str, args: &[&str], print: bool) -> Self {
        let print_args: &[&str] = if print { &["--print", "json"] } else { &[] };
        let mut child = command(Some(ns))
            .arg("run")
            .args(args)
            .args(print_args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start mirror");
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let (ready_tx, ready_rx) = mpsc::channel();
        let stderr = thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains(READY) {
                    let _ = ready_tx.send(());
                }
                lines.push(line);
            }
            lines
        });
        let stdout = thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .collect::<Vec<_>>()
        });
        let mut process = Self {
            child,
            stdout: Some(stdout),
            stderr: Some(stderr),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if ready_rx.recv_timeout(Duration::from_millis(50)).is_ok() {
                return process;
            }
            let exited = process.child.try_wait().expect("wait").is_some();
            if exited || Instant::now() > deadline {
                let _ = process.child.kill();
                let _ = process.child.wait();
                let stderr = process.stderr.take().map(|h| h.join().unwrap_or_default());
                panic!(
                    "mirror {} before attaching; stderr:\n{}",
                    if exited { "exited" } else { "stalled" },
                    stderr.unwrap_or_default().join("\n")
                );
            }
        }
    }

    /// SIGINT, then the output once it exited.
    pub fn interrupt(mut self) -> MirrorOutput {
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
        let mut counters = text_counters(&stderr);
        for line in &stdout {
            let value: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("mirror printed a line that is not JSON ({e}): {line}"));
            match value["kind"].as_str() {
                Some("packet") => packets.push(value),
                Some("counters") => counters = json_counters(&value),
                _ => panic!("unexpected line: {line}"),
            }
        }
        MirrorOutput {
            status,
            packets,
            counters,
            stderr: stderr.join("\n"),
        }
    }

    /// SIGKILL: the process gets no chance to detach.
    pub fn kill(mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
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

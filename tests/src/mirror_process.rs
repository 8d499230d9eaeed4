//! The real `mirror` binary as a child process inside a test namespace.

use std::{
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
    /// `"kind": "packet"` lines.
    pub packets: Vec<Value>,
    /// The `"kind": "counters"` line.
    pub counters: Value,
    pub stderr: String,
}

impl MirrorOutput {
    /// A kernel counter by name.
    pub fn kernel(&self, name: &str) -> u64 {
        self.counters["kernel"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("no kernel counter {name} in {}", self.counters))
    }
}

impl MirrorProcess {
    /// Starts `mirror run ARGS --print json` in `ns` and waits until it is
    /// attached; panics with its stderr if it exits or stalls first.
    pub fn start(ns: &str, args: &[&str]) -> Self {
        let mut child = command(Some(ns))
            .arg("run")
            .args(args)
            .args(["--print", "json"])
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
        let mut counters = Value::Null;
        for line in &stdout {
            let value: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("mirror printed a line that is not JSON ({e}): {line}"));
            match value["kind"].as_str() {
                Some("packet") => packets.push(value),
                Some("counters") => counters = value,
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

//! The peers the mirror is measured against (tcpdump, netsniff-ng,
//! xdpdump), run as their users run them, and read back from what they
//! print.

use std::{
    io::{BufRead as _, BufReader, Read},
    process::{Child, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use mirror_tests::netns::in_ns;

/// A capture tool running in a namespace.
pub struct Tool {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    readers: Vec<JoinHandle<()>>,
}

impl Tool {
    /// Starts `program ARGS` in `ns` and waits until it prints a line that
    /// contains `ready` (20 s at most: netsniff-ng takes seconds to set up
    /// its ring). `Err` holds what it printed when it exited first: the
    /// tool refused to run.
    pub fn start(ns: &str, program: &str, args: &[&str], ready: &str) -> Result<Self, String> {
        // Line-buffered: tools that print their banner through stdio would
        // hold it in a pipe buffer until they exit.
        let mut child = in_ns(ns, "stdbuf")
            .args(["-oL", "-eL", program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let readers = [
            Box::new(stdout) as Box<dyn Read + Send>,
            Box::new(stderr) as Box<dyn Read + Send>,
        ]
        .into_iter()
        .map(|stream| {
            let lines = Arc::clone(&lines);
            let ready_tx = ready_tx.clone();
            let ready = ready.to_owned();
            thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if line.contains(&ready) {
                        let _ = ready_tx.send(());
                    }
                    lines.lock().expect("lines").push(line);
                }
            })
        })
        .collect();
        let mut tool = Self {
            child,
            lines,
            readers,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if ready_rx.recv_timeout(Duration::from_millis(50)).is_ok() {
                return Ok(tool);
            }
            let exited = tool.child.try_wait().expect("wait").is_some();
            if exited || Instant::now() > deadline {
                let text = tool.stop();
                return Err(if exited {
                    text
                } else {
                    format!("{program} did not start within 20 s: {text}")
                });
            }
        }
    }

    /// Process id (`ip netns exec` and `stdbuf` exec: the tool itself).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops it as a user would (SIGINT, so that it prints its counts) and
    /// returns everything it printed.
    pub fn stop(mut self) -> String {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().expect("wait").is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        self.lines.lock().expect("lines").join("\n")
    }
}

impl Drop for Tool {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The count a tool prints before `label`, as in `1234 packets captured`
/// or `   1234  packets passed filter`.
pub fn count_before(text: &str, label: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (count, rest) = line.trim_start().split_once(char::is_whitespace)?;
        rest.trim_start()
            .starts_with(label)
            .then(|| count.parse().ok())?
    })
}

/// The first line that says what went wrong (`ERROR: ...`), or the last
/// line printed.
pub fn error_line(text: &str) -> String {
    text.lines()
        .find(|line| line.starts_with("ERROR") || line.contains("rror:"))
        .or_else(|| text.lines().rev().find(|line| !line.trim().is_empty()))
        .unwrap_or("(nothing printed)")
        .trim()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_read_as_the_tools_print_them() {
        let tcpdump = "listening on srv0\n1234 packets captured\n1300 packets received by filter\n66 packets dropped by kernel";
        assert_eq!(count_before(tcpdump, "packets captured"), Some(1234));
        assert_eq!(count_before(tcpdump, "packets dropped by kernel"), Some(66));
        let netsniff = "Running!\n\n       55306  packets incoming (0 unread on exit)\n       55306  packets passed filter\n           7  packets failed filter (out of space)";
        assert_eq!(count_before(netsniff, "packets passed filter"), Some(55306));
        assert_eq!(count_before(netsniff, "packets failed filter"), Some(7));
        assert_eq!(count_before(netsniff, "packets captured"), None);
    }

    #[test]
    fn the_error_line_is_found() {
        let xdpdump = "Couldn't raise rlimit: Operation not permitted\nERROR: Can't load eBPF object: Operation not permitted(-1)";
        assert_eq!(
            error_line(xdpdump),
            "ERROR: Can't load eBPF object: Operation not permitted(-1)"
        );
    }
}

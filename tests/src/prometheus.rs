//! A real Prometheus server in a test namespace, scraping one target every
//! second, and the HTTP and promtool checks of a metrics endpoint. Plain
//! HTTP goes through curl, run inside the namespace.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::netns::{KillOnDrop, in_ns, spawn};

/// How long Prometheus may take to start, and each HTTP request.
const START_TIMEOUT: Duration = Duration::from_secs(30);
const REQUEST_TIMEOUT_SECONDS: &str = "10";

/// A running `prometheus`, killed and waited for on drop; its files live
/// in the directory the test gave it (the test bed's scratch directory).
pub struct Prometheus {
    ns: String,
    /// Its web and API address, inside `ns`.
    web: String,
    log: PathBuf,
    process: KillOnDrop,
}

impl Prometheus {
    /// Starts Prometheus in `ns` with its web API on `web` (an address in
    /// `ns`), scraping `http://TARGET/metrics` every second as job
    /// `mirror`; its configuration, database and log go into `dir`. Waits
    /// until it is ready.
    pub fn start(ns: &str, dir: &Path, target: &str, web: &str) -> Self {
        fs::create_dir_all(dir).expect("mkdir");
        let config = dir.join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: mirror
    static_configs:
      - targets: ['{target}']
"
            ),
        )
        .expect("prometheus.yml");
        let log = dir.join("prometheus.log");
        let log_file = fs::File::create(&log).expect("prometheus.log");
        let process = spawn(
            in_ns(ns, "prometheus")
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join("data").display()
                ))
                .arg(format!("--web.listen-address={web}"))
                .stdout(log_file.try_clone().expect("log file"))
                .stderr(log_file),
        );
        let mut prometheus = Self {
            ns: ns.to_owned(),
            web: web.to_owned(),
            log,
            process,
        };
        prometheus.wait_ready();
        prometheus
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.process.0.try_wait().expect("wait") {
                panic!(
                    "prometheus exited ({status}) before it was ready:\n{}",
                    self.log()
                );
            }
            if http_get(&self.ns, &format!("http://{}/-/ready", self.web)).status == 200 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus was not ready after {START_TIMEOUT:?}:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// An instant query's answer, as the API gives it.
    pub fn query(&self, promql: &str) -> Value {
        let out = curl(
            &self.ns,
            &[
                "--get",
                "--data-urlencode",
                &format!("query={promql}"),
                &format!("http://{}/api/v1/query", self.web),
            ],
        );
        serde_json::from_str(&out.body).unwrap_or_else(|e| {
            panic!(
                "Prometheus answered {promql} with something that is not JSON ({e}): {} {}",
                out.status, out.body
            )
        })
    }

    /// Waits until `promql` gives exactly one sample, of value `expected`;
    /// panics after `timeout` with what Prometheus said last, the scrape
    /// target's health and the end of its log.
    pub fn wait_for_value(&self, promql: &str, expected: f64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let answer = self.query(promql);
            if sample_values(&answer) == [expected] {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "Prometheus did not give {promql} = {expected} within {timeout:?}; it said:\n{answer}\n\
                 its target: {}\nits log:\n{}",
                self.targets(),
                self.log()
            );
            thread::sleep(Duration::from_millis(250));
        }
    }

    /// The scrape targets' state (URL, health, last error) from
    /// `/api/v1/targets`.
    pub fn targets(&self) -> String {
        let out = http_get(&self.ns, &format!("http://{}/api/v1/targets", self.web));
        let Ok(json) = serde_json::from_str::<Value>(&out.body) else {
            return format!("{} {}", out.status, out.body);
        };
        json["data"]["activeTargets"]
            .as_array()
            .map(|targets| {
                targets
                    .iter()
                    .map(|t| {
                        format!(
                            "{} health={} lastError={:?} lastScrape={}",
                            t["scrapeUrl"], t["health"], t["lastError"], t["lastScrape"]
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_else(|| json.to_string())
    }

    /// Waits until the scrape target is `up` (it was scraped successfully
    /// at least once); panics with its state after `timeout`.
    pub fn wait_target_up(&self, timeout: Duration) {
        self.wait_for_value("up", 1.0, timeout);
    }

    /// The last lines of Prometheus's log.
    fn log(&self) -> String {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

/// The values of an instant query's samples (none when the query failed).
pub fn sample_values(answer: &Value) -> Vec<f64> {
    answer["data"]["result"]
        .as_array()
        .map(|samples| {
            samples
                .iter()
                .filter_map(|sample| sample["value"][1].as_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// An HTTP answer: status (0 when there was none) and body.
#[derive(Debug)]
pub struct HttpAnswer {
    pub status: u16,
    pub body: String,
    /// curl's own complaint, if any.
    pub error: String,
}

/// `GET url` from inside `ns`.
pub fn http_get(ns: &str, url: &str) -> HttpAnswer {
    curl(ns, &[url])
}

fn curl(ns: &str, args: &[&str]) -> HttpAnswer {
    // The status goes after the body, on a line of its own.
    let out = in_ns(ns, "curl")
        .args([
            "--silent",
            "--show-error",
            "--max-time",
            REQUEST_TIMEOUT_SECONDS,
        ])
        .args(["--write-out", "\n%{http_code}"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("cannot run curl");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    HttpAnswer {
        status: status.trim().parse().unwrap_or(0),
        body: body.to_owned(),
        error: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `promtool check metrics` on `text`: `Ok` with what it printed when it
/// found nothing to complain about, else `Err` with its exit status and
/// complaints.
pub fn promtool_check_metrics(text: &str) -> Result<String, String> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run promtool (`cargo xtask setup` installs it)");
    let mut stdin = child.stdin.take().expect("piped");
    // Its own thread: promtool may answer before it read everything.
    let text = text.to_owned();
    let writer = thread::spawn(move || stdin.write_all(text.as_bytes()));
    let out = child.wait_with_output().expect("wait for promtool");
    let _ = writer.join();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(said)
    } else {
        Err(format!(
            "promtool check metrics failed ({}):\n{said}",
            out.status
        ))
    }
}

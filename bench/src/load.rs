//! The traffic every case is measured on: iperf3 bulk transfers and wrk
//! against nginx, from the client namespace to the server's address.

use std::process::Stdio;

use mirror_tests::netns::in_ns;
use serde_json::Value;

use crate::bed::Bed;

pub const SERVER_IP: &str = "198.18.0.2";
pub const BULK_PORT: u16 = 5201;
pub const HTTP_PORT: u16 = 80;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Traffic {
    /// iperf3 sending as fast as it can over `streams` connections.
    Bulk { streams: u32 },
    /// wrk, 2 threads, 16 connections, small requests and answers; with
    /// `close`, a new connection for every request.
    Requests { close: bool },
}

impl Traffic {
    pub const ALL: [Self; 4] = [
        Self::Bulk { streams: 1 },
        Self::Bulk { streams: 4 },
        Self::Requests { close: false },
        Self::Requests { close: true },
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Bulk { streams: 1 } => "bulk, 1 stream",
            Self::Bulk { .. } => "bulk, 4 streams",
            Self::Requests { close: false } => "small requests, keep-alive",
            Self::Requests { close: true } => "short connections",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Self::Bulk { streams: 1 } => "iperf3, one TCP stream, as fast as it goes",
            Self::Bulk { .. } => "iperf3 -P 4, four TCP streams",
            Self::Requests { close: false } => {
                "wrk -t2 -c16 against nginx answering `ok`, keep-alive connections"
            }
            Self::Requests { close: true } => {
                "wrk -t2 -c16 with `Connection: close`: one connection per request"
            }
        }
    }

    pub fn port(self) -> u16 {
        match self {
            Self::Bulk { .. } => BULK_PORT,
            Self::Requests { .. } => HTTP_PORT,
        }
    }

    pub fn is_bulk(self) -> bool {
        matches!(self, Self::Bulk { .. })
    }

    /// The unit of [`Load::throughput`].
    pub fn unit(self) -> &'static str {
        if self.is_bulk() {
            "Gbit/s"
        } else {
            "requests/s"
        }
    }
}

/// What one run of the traffic measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct Load {
    /// Gbit/s received (bulk) or requests/s answered.
    pub throughput: f64,
    /// wrk's 99th percentile latency.
    pub p99_ms: Option<f64>,
    /// Payload bytes the server received: what a complete mirror delivers.
    pub server_bytes: u64,
}

/// Runs `traffic` from the bed's client for `seconds`.
pub fn run(traffic: Traffic, bed: &Bed, seconds: u32) -> Load {
    match traffic {
        // The receiver's count: TCP payload read by the server, each byte
        // once. (The interface's byte counters count retransmissions again
        // and count headers differently under native XDP.) iperf3 stops
        // counting at its timer, so bytes still in flight then reach a
        // mirror but not this count: measured ≤ 0.02 % over 3 s.
        Traffic::Bulk { streams } => iperf3(&bed.client, streams, seconds),
        Traffic::Requests { close } => {
            bed.web.take_request_bytes();
            let mut load = wrk(&bed.client, close, seconds);
            load.server_bytes = bed.web.take_request_bytes();
            load
        }
    }
}

fn iperf3(client: &str, streams: u32, seconds: u32) -> Load {
    let out = in_ns(client, "iperf3")
        .args(["-c", SERVER_IP, "-p", &BULK_PORT.to_string(), "-J"])
        .args(["-t", &seconds.to_string(), "-P", &streams.to_string()])
        .stdin(Stdio::null())
        .output()
        .expect("run iperf3");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "iperf3 printed no JSON report ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    let received = &report["end"]["sum_received"];
    Load {
        throughput: received["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9,
        p99_ms: None,
        server_bytes: received["bytes"].as_u64().unwrap_or(0),
    }
}

fn wrk(client: &str, close: bool, seconds: u32) -> Load {
    let mut command = in_ns(client, "wrk");
    command.args(["-t2", "-c16", &format!("-d{seconds}s"), "--latency"]);
    if close {
        command.args(["-H", "Connection: close"]);
    }
    let out = command
        .arg(format!("http://{SERVER_IP}:{HTTP_PORT}/bench"))
        .stdin(Stdio::null())
        .output()
        .expect("run wrk");
    let text = String::from_utf8_lossy(&out.stdout);
    let (throughput, p99_ms) = parse_wrk(&text);
    Load {
        throughput,
        p99_ms,
        server_bytes: 0,
    }
}

/// Requests per second and the 99th percentile latency from wrk's report.
pub fn parse_wrk(text: &str) -> (f64, Option<f64>) {
    let rate = text
        .lines()
        .find_map(|line| line.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    let p99 = text
        .lines()
        .find_map(|line| line.trim().strip_prefix("99%"))
        .map(|v| duration_ms(v.trim()));
    (rate, p99)
}

/// wrk's durations: `812.00us`, `1.23ms`, `2.01s`.
fn duration_ms(text: &str) -> f64 {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().unwrap_or(0.0);
    match unit {
        "us" => value / 1000.0,
        "s" => value * 1000.0,
        "m" => value * 60_000.0,
        _ => value,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_reports_are_read() {
        let report = "Running 2s test @ http://198.18.0.2:80/bench
  Latency Distribution
     50%  312.00us
     75%  401.00us
     90%  612.00us
     99%    1.23ms
  40000 requests in 2.00s, 6.00MB read
Requests/sec:  19987.65
Transfer/sec:      3.00MB
";
        assert_eq!(parse_wrk(report), (19987.65, Some(1.23)));
        assert_eq!(duration_ms("812.00us"), 0.812);
        assert_eq!(duration_ms("2.00s"), 2000.0);
        assert_eq!(parse_wrk("connection refused"), (0.0, None));
    }
}

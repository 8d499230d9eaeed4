//! `--forward ... --compare`: the shadow's answers compared with the
//! production server's, on real servers (redis, nginx) and on shadows
//! that misbehave (slow, resetting, closing, silent, answering more than
//! the comparison may hold).
//!
//! Three hosts, as in the `sinks` tests: the client reaches the production
//! server over one veth pair; production reaches its shadow over another;
//! the mirror runs beside production with `--directions both` and forwards
//! to the shadow.

use std::{
    cell::Cell,
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    thread,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use mirror_tests::{
    bed::TestBed,
    mirror_process::{MirrorOutput, MirrorProcess, assert_refused, run_mirror, running_counters},
    netns::{KillOnDrop, exits_within, in_ns, run_ok, spawn, wait_listening},
    root_tests,
    web::Nginx,
};
use serde_json::Value;

const PRIMARY: &str = TestBed::SERVER_IP;
const SHADOW: &str = TestBed::SHADOW_IP;
const REDIS: u16 = 6379;
/// Where the test's misbehaving shadows listen, in the shadow's namespace.
const ODD_SHADOW: u16 = 7000;

/// The client, production (the bed's server) and the shadow behind it.
struct Hosts {
    bed: TestBed,
    shadow: String,
}

fn hosts() -> Hosts {
    let mut bed = TestBed::new();
    let shadow = bed.add_shadow();
    Hosts { bed, shadow }
}

/// A redis-server of the test's own, killed (and its directory removed
/// with the bed) when the test ends.
struct Redis {
    _process: KillOnDrop,
}

impl Redis {
    fn start(ns: &str, ip: &str, dir: &Path) -> Self {
        let port = REDIS.to_string();
        let log = dir.join("redis.log").display().to_string();
        let dir = dir.display().to_string();
        let process = spawn(in_ns(ns, "redis-server").args([
            "--save",
            "",
            "--appendonly",
            "no",
            "--port",
            &port,
            "--bind",
            ip,
            "--protected-mode",
            "no",
            "--dir",
            &dir,
            "--logfile",
            &log,
        ]));
        wait_listening(ns, REDIS);
        Self { _process: process }
    }
}

fn redis_cli(ns: &str, ip: &str, args: &[&str]) -> String {
    let port = REDIS.to_string();
    let out = run_ok(
        in_ns(ns, "redis-cli")
            .args(["-h", ip, "-p", &port])
            .args(args),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The same data in production and in the shadow, loaded directly (not
/// through the mirror). redis-benchmark's key holds what its SETs write
/// (3 bytes, `xxx`), so a GET answers the same whether the shadow replayed
/// a SET of another connection before it or not.
fn load_redis(h: &Hosts) {
    for (ns, ip) in [(&h.bed.server, PRIMARY), (&h.shadow, SHADOW)] {
        redis_cli(
            ns,
            ip,
            &[
                "MSET",
                "key",
                "alpha",
                "user:1",
                "ada",
                "user:2",
                "grace",
                "key:__rand_int__",
                "xxx",
            ],
        );
    }
}

/// The shadows that misbehave, in python: `delay` relays to a real shadow
/// and holds back the first chunk of its answers, `reset` reads the
/// request and resets, `close` reads it and closes without answering,
/// `silent` reads everything and never answers nor closes.
const ODD_SHADOWS: &str = r#"
import socket, struct, sys, threading, time

mode, ip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])

def relay(src, dst, delay):
    first = True
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            if first and delay:
                time.sleep(delay)
            first = False
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass

def serve(conn):
    if mode == "reset":
        conn.recv(65536)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
    elif mode == "close":
        conn.recv(65536)
        conn.close()
    elif mode == "silent":
        while conn.recv(65536):
            pass
        time.sleep(600)
    else:
        backend = socket.create_connection((sys.argv[4], int(sys.argv[5])))
        requests = threading.Thread(target=relay, args=(conn, backend, 0), daemon=True)
        requests.start()
        relay(backend, conn, float(sys.argv[6]))
        requests.join(30)
        conn.close()
        backend.close()

server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((ip, port))
server.listen(64)
while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"#;

impl Hosts {
    /// Starts an odd shadow (`mode` and its arguments, see
    /// [`ODD_SHADOWS`]) on [`ODD_SHADOW`]; returns its `--forward` target.
    fn odd_shadow(&self, args: &[&str]) -> (KillOnDrop, String) {
        let script = self.bed.path("odd").join("shadow.py");
        fs::write(&script, ODD_SHADOWS).expect("write the shadow script");
        let port = ODD_SHADOW.to_string();
        let mut all = vec![script.to_str().unwrap(), args[0], SHADOW, &port];
        all.extend(&args[1..]);
        let process = spawn(in_ns(&self.shadow, "python3").args(&all));
        wait_listening(&self.shadow, ODD_SHADOW);
        (process, format!("{SHADOW}:{ODD_SHADOW}"))
    }

    /// `mirror run` on production's `port`, forwarding to `target` with
    /// `--compare` and a report; returns the report's path too.
    fn mirror(&self, port: u16, target: &str, extra: &[&str]) -> (MirrorProcess, PathBuf) {
        let report = self.bed.new_path("report.jsonl");
        let report_arg = report.display().to_string();
        let mut args = vec![
            "--directions",
            "both",
            "--attach",
            "tc",
            "--forward",
            target,
            "--compare",
            "--compare-report",
            &report_arg,
        ];
        args.extend(extra);
        (
            self.bed.mirror(port, &args, MirrorProcess::start_quiet),
            report,
        )
    }

    /// `curl` in the client namespace, one connection, the `paths` of
    /// production's nginx in turn; killed on drop.
    fn curl(&self, paths: &[&str]) -> KillOnDrop {
        let mut command = in_ns(&self.bed.client, "curl");
        command.args(["-sS", "-f", "--http1.1", "--max-time", "20"]);
        for path in paths {
            command.args([
                format!("http://{PRIMARY}{path}").as_str(),
                "-o",
                "/dev/null",
            ]);
        }
        spawn(&mut command)
    }
}

/// A running mirror's results for `target`: same, differs, incomplete.
fn results(counters: &BTreeMap<String, u64>, target: &str) -> [u64; 3] {
    ["same", "differs", "incomplete"].map(|result| {
        counters
            .get(&format!("forward.{target}.compared.{result}"))
            .copied()
            .unwrap_or(0)
    })
}

/// Waits (30 s at most) until at least `at_least` connections were
/// announced and every one of them has its result, and no other was
/// announced for half a second (the last client's connection may reach
/// the mirror a little after the client exited).
#[track_caller]
fn wait_compared(mirror: &MirrorProcess, target: &str, at_least: u64) {
    let all_compared = |c: &BTreeMap<String, u64>| {
        let opened = c.get("connections.opened").copied().unwrap_or(0);
        opened >= at_least && results(c, target).iter().sum::<u64>() == opened
    };
    for _ in 0..20 {
        let seen = Cell::new(None);
        let done = mirror.wait_for_counters(Duration::from_secs(30), |c| {
            seen.set(Some(c.get("connections.opened").copied()));
            all_compared(c)
        });
        assert!(done, "{at_least} connections or more compared to the end");
        thread::sleep(Duration::from_millis(500));
        let again = running_counters(&mirror.endpoint());
        if all_compared(&again) && Some(again.get("connections.opened").copied()) == seen.get() {
            return;
        }
    }
    panic!("connections kept coming");
}

/// The report's lines by connection, checked against the exit counters.
fn report(path: &Path, output: &MirrorOutput, target: &str) -> BTreeMap<u64, Value> {
    let text = fs::read_to_string(path).expect("the comparison report");
    let lines: BTreeMap<u64, Value> = text
        .lines()
        .map(|line| {
            let value: Value = serde_json::from_str(line).expect("a JSON line");
            (value["conn"].as_u64().expect("conn"), value)
        })
        .collect();
    assert_eq!(lines.len(), text.lines().count(), "one line per connection");
    let counted = results(&output.counters, target);
    for (result, count) in ["same", "differs", "incomplete"].iter().zip(counted) {
        let lines = lines.values().filter(|l| l["result"] == *result).count();
        assert_eq!(lines as u64, count, "{result} lines and counter\n{output}");
    }
    assert_eq!(
        output.counter(&format!("forward.{target}.report_dropped")),
        0
    );
    for line in lines.values() {
        assert_eq!(line["target"], target, "{line}");
        assert_eq!(
            line["dst"].as_str().unwrap().split(':').next(),
            Some(PRIMARY)
        );
    }
    lines
}

/// Sleeps into the start of the next second: nginx's `Date` header counts
/// seconds, and the shadow answers a few milliseconds after production.
fn at_second_start() {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock");
    thread::sleep(Duration::from_millis(
        u64::from(1000 - now.subsec_millis()) + 20,
    ));
}

/// redis-benchmark and redis-cli against production: every connection is
/// `same`; then one key changed in the shadow alone, and the connection
/// that reads it `differs` where the value starts.
fn redis_answers_are_the_same_until_the_shadow_differs() {
    let h = hosts();
    let _primary = Redis::start(&h.bed.server, PRIMARY, &h.bed.path("redis-primary"));
    let _shadow = Redis::start(&h.shadow, SHADOW, &h.bed.path("redis-shadow"));
    load_redis(&h);
    let target = format!("{SHADOW}:{REDIS}");
    let (mirror, report_path) = h.mirror(REDIS, &target, &[]);
    let benchmark = |args: &[&str]| {
        let mut command = in_ns(&h.bed.client, "redis-benchmark");
        command.args(["-h", PRIMARY, "-p", "6379", "-q"]).args(args);
        let out = exits_within(&mut command, Duration::from_secs(60), "redis-benchmark");
        assert!(
            out.status.success(),
            "redis-benchmark: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // Concurrent connections whose answers do not depend on their order...
    benchmark(&["-n", "2000", "-c", "10", "-t", "set,get"]);
    // ...and counters and lists, one connection at a time. The shadow
    // replays each connection on its own, and may still run the end of
    // one while the next begins: runs that touch the same key wait until
    // the shadow is done with the one before.
    wait_compared(&mirror, &target, 20);
    benchmark(&["-n", "1000", "-c", "1", "-t", "incr,lpush"]);
    wait_compared(&mirror, &target, 22);
    benchmark(&["-n", "1000", "-c", "1", "-t", "lrange_100"]);
    for _ in 0..5 {
        let values = redis_cli(&h.bed.client, PRIMARY, &["MGET", "key", "user:1", "user:2"]);
        assert_eq!(values, "alpha\nada\ngrace\n");
    }
    // Benchmark runs of at least 20, 2 and 2 connections, 5 redis-cli.
    wait_compared(&mirror, &target, 29);
    let before = running_counters(&mirror.endpoint());
    let [same, differs, incomplete] = results(&before, &target);
    let unlike: Vec<String> = fs::read_to_string(&report_path)
        .unwrap_or_default()
        .lines()
        .filter(|line| !line.contains("\"result\":\"same\""))
        .map(str::to_owned)
        .collect();
    assert_eq!((differs, incomplete), (0, 0), "{unlike:#?}\n{before:#?}");

    redis_cli(&h.shadow, SHADOW, &["SET", "key", "omega"]);
    assert_eq!(
        redis_cli(&h.bed.client, PRIMARY, &["GET", "key"]),
        "alpha\n"
    );
    wait_compared(&mirror, &target, same + 1);
    let output = mirror.stop();
    let lines = report(&report_path, &output, &target);
    assert_eq!(results(&output.counters, &target), [same, 1, 0], "{output}");
    let (last, differing) = lines.iter().next_back().expect("lines");
    assert_eq!(
        differing["result"], "differs",
        "the last connection: {differing}"
    );
    for (conn, line) in &lines {
        if conn != last {
            assert_eq!(line["result"], "same", "{line}");
            assert_eq!(line["production_bytes"], line["shadow_bytes"], "{line}");
        }
    }
    // `$5\r\nalpha\r\n` against `$5\r\nomega\r\n`: the GET's answer ends
    // the stream, its value starts 4 bytes in.
    let production_bytes = differing["production_bytes"].as_u64().unwrap();
    assert_eq!(
        differing["offset"],
        production_bytes - "$5\r\nalpha\r\n".len() as u64 + 4,
        "{differing}"
    );
    assert_eq!(differing["production"], "alpha\\r\\n", "{differing}");
    assert_eq!(differing["shadow"], "omega\\r\\n", "{differing}");
    assert_eq!(differing["shadow_bytes"], production_bytes);
}

/// nginx production and shadow that serve different bodies for one path:
/// the connections that asked for it `differ` in the body, the others are
/// `same`.
fn nginx_bodies_that_differ_are_found() {
    let h = hosts();
    let version = |v: &str| format!("location = /version {{ return 200 \"{v}\\n\"; }}");
    let _primary = Nginx::start_with(
        &h.bed.server,
        PRIMARY,
        &h.bed.path("primary"),
        &version("v1"),
    );
    let _shadow = Nginx::start_with(&h.shadow, SHADOW, &h.bed.path("shadow"), &version("v2"));
    let target = format!("{SHADOW}:80");
    let (mirror, report_path) = h.mirror(80, &target, &[]);
    at_second_start();
    let mut clients: Vec<KillOnDrop> = (0..6).map(|_| h.curl(&["/a", "/b", "/c"])).collect();
    clients.extend((0..2).map(|_| h.curl(&["/a", "/version"])));
    for client in clients {
        client.wait_success("curl", Duration::from_secs(30));
    }
    wait_compared(&mirror, &target, 8);
    let output = mirror.stop();
    let lines = report(&report_path, &output, &target);
    assert_eq!(
        results(&output.counters, &target),
        [6, 2, 0],
        "{output}\n{lines:#?}"
    );
    for line in lines.values().filter(|l| l["result"] == "differs") {
        // The body comes last: `v1\n` against `v2\n`.
        let production_bytes = line["production_bytes"].as_u64().unwrap();
        assert_eq!(line["offset"], production_bytes - 2, "{line}");
        assert_eq!(line["production"], "1\\n", "{line}");
        assert_eq!(line["shadow"], "2\\n", "{line}");
    }
}

/// A shadow that answers later than production (by half a second) is
/// still `same`.
fn a_slower_shadow_is_still_the_same() {
    let h = hosts();
    let _primary = Redis::start(&h.bed.server, PRIMARY, &h.bed.path("redis-primary"));
    let _shadow = Redis::start(&h.shadow, SHADOW, &h.bed.path("redis-shadow"));
    load_redis(&h);
    let redis = REDIS.to_string();
    let (_relay, target) = h.odd_shadow(&["delay", SHADOW, &redis, "0.5"]);
    let (mirror, report_path) = h.mirror(REDIS, &target, &[]);
    for _ in 0..3 {
        redis_cli(&h.bed.client, PRIMARY, &["MGET", "key", "user:1"]);
    }
    wait_compared(&mirror, &target, 3);
    let output = mirror.stop();
    let lines = report(&report_path, &output, &target);
    assert_eq!(results(&output.counters, &target), [3, 0, 0], "{lines:#?}");
}

/// An answer larger than the comparison may hold for one connection
/// (1 MiB), from a shadow that starts answering a second late: production
/// runs ahead past the budget and the connection is `incomplete`
/// (`budget`); the small answers beside it are `same`.
fn an_answer_beyond_the_budget_is_incomplete() {
    let h = hosts();
    let mut big = vec![0u8; 4 << 20];
    for (i, byte) in big.iter_mut().enumerate() {
        *byte = (i * 7 % 251) as u8;
    }
    let mut servers = Vec::new();
    for (ns, ip, name) in [
        (&h.bed.server, PRIMARY, "primary"),
        (&h.shadow, SHADOW, "shadow"),
    ] {
        let dir = h.bed.path(name);
        let www = dir.join("www");
        fs::create_dir_all(&www).expect("www");
        fs::write(www.join("big"), &big).expect("the big file");
        let location = format!("location = /big {{ root {}; }}", www.display());
        servers.push(Nginx::start_with(ns, ip, &dir, &location));
    }
    let (_relay, target) = h.odd_shadow(&["delay", SHADOW, "80", "1"]);
    let (mirror, report_path) = h.mirror(80, &target, &[]);
    at_second_start();
    let clients = [h.curl(&["/big"]), h.curl(&["/small"])];
    for client in clients {
        client.wait_success("curl", Duration::from_secs(30));
    }
    wait_compared(&mirror, &target, 2);
    let output = mirror.stop();
    let lines = report(&report_path, &output, &target);
    assert_eq!(results(&output.counters, &target), [1, 0, 1], "{lines:#?}");
    let incomplete = lines
        .values()
        .find(|l| l["result"] == "incomplete")
        .expect("the big answer");
    assert_eq!(incomplete["reason"], "budget", "{incomplete}");
    assert!(
        incomplete["production_bytes"].as_u64().unwrap() > big.len() as u64,
        "production's whole answer went by: {incomplete}"
    );
}

/// Shadows that end badly: one resets after the request (`incomplete`,
/// `shadow_reset`), one closes without an answer (it finished: `differs`
/// at 0, production's answer against nothing), one never answers
/// (`incomplete`, `shadow_silent`, after `--compare-timeout`).
fn shadows_that_end_badly() {
    let h = hosts();
    let _primary = Redis::start(&h.bed.server, PRIMARY, &h.bed.path("redis-primary"));
    redis_cli(&h.bed.server, PRIMARY, &["SET", "key", "alpha"]);
    for (mode, result, reason) in [
        ("reset", "incomplete", Some("shadow_reset")),
        ("close", "differs", None),
        ("silent", "incomplete", Some("shadow_silent")),
    ] {
        let (shadow, target) = h.odd_shadow(&[mode]);
        let (mirror, report_path) = h.mirror(REDIS, &target, &["--compare-timeout", "1s"]);
        assert_eq!(
            redis_cli(&h.bed.client, PRIMARY, &["GET", "key"]),
            "alpha\n"
        );
        wait_compared(&mirror, &target, 1);
        let output = mirror.stop();
        drop(shadow);
        let lines = report(&report_path, &output, &target);
        fs::remove_file(&report_path).expect("remove the report");
        assert_eq!(lines.len(), 1, "{mode}: {lines:#?}");
        let line = lines.values().next().unwrap();
        assert_eq!(line["result"], result, "{mode}: {line}");
        assert_eq!(line["production_bytes"], 11, "{mode}: {line}");
        assert_eq!(line["shadow_bytes"], 0, "{mode}: {line}");
        match reason {
            Some(reason) => assert_eq!(line["reason"], reason, "{mode}: {line}"),
            None => {
                assert_eq!(line["offset"], 0, "{mode}: {line}");
                assert_eq!(line["production"], "$5\\r\\nalpha\\r\\n", "{mode}: {line}");
                assert_eq!(line["shadow"], "", "{mode}: {line}");
            }
        }
    }
}

root_tests! {
    redis_same_then_one_differs => redis_answers_are_the_same_until_the_shadow_differs();
    nginx_one_path_differs => nginx_bodies_that_differ_are_found();
    slow_shadow_same => a_slower_shadow_is_still_the_same();
    beyond_budget_incomplete => an_answer_beyond_the_budget_is_incomplete();
    bad_shadow_ends => shadows_that_end_badly();
}

#[test]
fn compare_needs_both_directions() {
    let out = run_mirror(
        None,
        &[
            "run",
            "--iface",
            "lo",
            "--port",
            "80",
            "--directions",
            "client",
            "--forward",
            "198.18.1.2:80",
            "--compare",
        ],
    );
    assert_refused(&out, "add --directions both");
}

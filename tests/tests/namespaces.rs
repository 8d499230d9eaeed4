//! Pods and namespaces: the mirror runs in the test's own network
//! namespace and watches others (`--netns`, `--pid`, `--iface NETNS:IF`);
//! each connection names the interface it came through.

use std::{fs, time::Duration};

use mirror_tests::{
    bed::scratch_dir,
    mirror_process::{MirrorOutput, MirrorProcess, assert_refused, run_mirror},
    needs_root,
    netns::{TestNet, ip, run_in, sleeper_in, tcx_programs},
    root_tests,
    traffic::start_server,
};
use serde_json::Value;

const PORT: u16 = 5301;

/// A server namespace (`eth0`) and its client, joined by a veth pair.
struct Pod {
    server: String,
    client: String,
    server_ip: String,
}

/// Pod `n` (198.18.n.0/24). `padding` veth pairs come first in the
/// server's namespace (this kernel has no dummy interfaces), so that its
/// eth0 gets another index than the eth0 of a pod without them.
fn pod(net: &mut TestNet, n: u8, padding: usize) -> Pod {
    let server = net.namespace(&format!("srv{n}"));
    let client = net.namespace(&format!("cli{n}"));
    for i in 0..padding {
        let (pad, peer) = (format!("pad{i}"), format!("peer{i}"));
        ip(&[
            "-n", &server, "link", "add", &pad, "type", "veth", "peer", "name", &peer,
        ]);
    }
    let server_ip = format!("198.18.{n}.1");
    net.veth(
        (&server, "eth0", &format!("{server_ip}/24")),
        (&client, "c0", &format!("198.18.{n}.2/24")),
    );
    Pod {
        server,
        client,
        server_ip,
    }
}

/// Sends `message` from the pod's client (source port `client_port`) and
/// waits until the server has it.
fn send(pod: &Pod, client_port: u16, message: &str, received: &std::path::Path) {
    run_in(
        &pod.client,
        "sh",
        &[
            "-c",
            &format!(
                "printf %s '{message}' | socat -u - TCP:{}:{PORT},sourceport={client_port}",
                pod.server_ip
            ),
        ],
    );
    let file = received.join(client_port.to_string());
    for _ in 0..200 {
        if fs::read(&file).is_ok_and(|bytes| bytes.len() == message.len()) {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("the server did not receive {message:?}");
}

/// The interface and the byte count of the connection from `client_port`.
fn connection(output: &MirrorOutput, client_port: u16) -> (String, u64) {
    let opened: Vec<&Value> = output
        .events
        .iter()
        .filter(|event| {
            event["event"] == "opened"
                && event["src"]
                    .as_str()
                    .is_some_and(|src| src.ends_with(&format!(":{client_port}")))
        })
        .collect();
    assert_eq!(
        opened.len(),
        1,
        "one connection from {client_port}\n{output}"
    );
    let conn = &opened[0]["conn"];
    let bytes = output
        .events
        .iter()
        .filter(|event| event["event"] == "data" && &event["conn"] == conn)
        .map(|event| event["len"].as_u64().expect("len"))
        .sum();
    let iface = opened[0]["iface"].as_str().unwrap_or_default().to_owned();
    (iface, bytes)
}

/// Runs `args` here, sends one message per `(pod, client port)`, stops the
/// mirror and returns what it printed; the watched eth0s have nothing
/// attached afterwards.
fn mirror_traffic(args: &[&str], sends: &[(&Pod, u16, &str)]) -> MirrorOutput {
    let dir = scratch_dir();
    let port = PORT.to_string();
    let mut all = vec!["--port", &port, "--print", "json"];
    all.extend(args);
    let mirror = MirrorProcess::start_here(&all);
    let mut servers = Vec::new();
    for (i, (pod, client_port, message)) in sends.iter().enumerate() {
        let received = dir.path().join(format!("received{i}"));
        servers.push(start_server(&pod.server, PORT, &received));
        send(pod, *client_port, message, &received);
        drop(servers.pop());
    }
    mirror.wait_for_fin_closes(sends.len() as u64);
    let output = mirror.stop();
    for (pod, _, _) in sends {
        assert!(
            tcx_programs(&pod.server, "eth0").is_empty(),
            "nothing stays attached to {}:eth0",
            pod.server
        );
    }
    output
}

#[test]
fn a_named_namespace_is_watched_on_every_interface_but_lo() {
    needs_root!();
    let mut net = TestNet::new();
    let pod = pod(&mut net, 40, 0);
    let message = "GET /pod HTTP/1.0\r\n\r\n";
    let scratch = scratch_dir();
    let dump = scratch.path().join("dump");
    let output = mirror_traffic(
        &[
            "--netns",
            &pod.server,
            "--dump-dir",
            dump.to_str().expect("utf-8"),
        ],
        &[(&pod, 41001, message)],
    );
    let (iface, bytes) = connection(&output, 41001);
    assert_eq!(iface, format!("{}:eth0", pod.server), "{output}");
    assert_eq!(bytes, message.len() as u64, "{output}");
    // The dump's sidecar names it too.
    let metas: Vec<Value> = fs::read_dir(&dump)
        .expect("the dump directory")
        .filter_map(|entry| {
            let path = entry.expect("entry").path();
            (path.extension()? == "meta")
                .then(|| serde_json::from_slice(&fs::read(path).expect("meta")).expect("json"))
        })
        .collect();
    assert_eq!(metas.len(), 1, "{metas:?}");
    assert_eq!(metas[0]["iface"], iface.as_str(), "{metas:?}");
}

#[test]
fn a_pid_finds_its_namespace() {
    needs_root!();
    let mut net = TestNet::new();
    let pod = pod(&mut net, 41, 0);
    // `ip netns exec` execs: the child is sleep itself, in the pod.
    let sleeper = sleeper_in(&pod.server);
    let pid = sleeper.0.id().to_string();
    let message = "hello from the pod client";
    let output = mirror_traffic(&["--pid", &pid], &[(&pod, 41002, message)]);
    let (iface, bytes) = connection(&output, 41002);
    // Named after the namespace's name under /var/run/netns.
    assert_eq!(iface, format!("{}:eth0", pod.server), "{output}");
    assert_eq!(bytes, message.len() as u64, "{output}");
    drop(sleeper);
}

/// A pod's last process gone, the mirror ends by itself, as on Ctrl-C
/// (nothing left attached, its counters reported).
#[test]
fn the_mirror_ends_with_the_process_it_watches() {
    needs_root!();
    let mut net = TestNet::new();
    let pod = pod(&mut net, 46, 0);
    let mut sleeper = sleeper_in(&pod.server);
    let pid = sleeper.0.id().to_string();
    let mirror = MirrorProcess::start_here(&["--pid", &pid, "--port", "80"]);
    let _ = sleeper.0.kill();
    let _ = sleeper.0.wait();
    let state = format!("/proc/{}/stat", mirror.pid());
    let ended = (0..400).any(|_| {
        std::thread::sleep(Duration::from_millis(25));
        // Exited, not yet reaped: a zombie.
        fs::read_to_string(&state).is_ok_and(|stat| stat.contains(") Z "))
    });
    assert!(ended, "the mirror ends within 10 s of its process");
    let output = mirror.stop();
    assert!(
        output.stderr.contains(&format!(
            "process {pid}, whose network namespace the mirror watches, has exited"
        )),
        "{output}"
    );
    assert!(tcx_programs(&pod.server, "eth0").is_empty());
}

#[test]
fn interfaces_of_two_namespaces_in_one_mirror() {
    needs_root!();
    let mut net = TestNet::new();
    let first = pod(&mut net, 42, 0);
    let second = pod(&mut net, 43, 2);
    let (a, b) = (
        format!("{}:eth0", first.server),
        format!("{}:eth0", second.server),
    );
    let output = mirror_traffic(
        &["--iface", &a, "--iface", &b],
        &[
            (&first, 41003, "to the first pod"),
            (&second, 41004, "to the second one"),
        ],
    );
    assert_eq!(connection(&output, 41003), (a, 16), "{output}");
    assert_eq!(connection(&output, 41004), (b, 17), "{output}");
}

/// An interface added to the watched namespace after the start is attached
/// (its traffic mirrored, named), and its removal is counted.
#[test]
fn interfaces_that_come_later_are_attached_and_counted() {
    needs_root!();
    let mut net = TestNet::new();
    let pod = pod(&mut net, 47, 0);
    let port = PORT.to_string();
    let mirror =
        MirrorProcess::start_here(&["--netns", &pod.server, "--port", &port, "--print", "json"]);
    // A second client, on an interface the pod gets now.
    let late = Pod {
        server: pod.server.clone(),
        client: net.namespace("late"),
        server_ip: "198.18.48.1".to_owned(),
    };
    net.veth(
        (&late.server, "eth1", "198.18.48.1/24"),
        (&late.client, "l0", "198.18.48.2/24"),
    );
    let counter = |name: &'static str| {
        move |c: &std::collections::BTreeMap<String, u64>| c.get(name).copied() == Some(1)
    };
    assert!(
        mirror.wait_for_counters(Duration::from_secs(10), counter("interfaces.attached")),
        "eth1 is attached"
    );
    let dir = scratch_dir();
    let received = dir.path().join("received");
    let server = start_server(&late.server, PORT, &received);
    let message = "through the late interface";
    send(&late, 41005, message, &received);
    drop(server);
    mirror.wait_for_fin_closes(1);
    ip(&["-n", &late.server, "link", "del", "eth1"]);
    assert!(
        mirror.wait_for_counters(Duration::from_secs(10), counter("interfaces.detached")),
        "eth1's removal is counted"
    );
    let output = mirror.stop();
    assert_eq!(
        connection(&output, 41005),
        (format!("{}:eth1", pod.server), message.len() as u64),
        "{output}"
    );
    assert_eq!(
        output.counters.get("interfaces.failed"),
        Some(&0),
        "{output}"
    );
    assert!(tcx_programs(&pod.server, "eth0").is_empty());
}

/// Interfaces that came and went while the mirror read nothing (stopped
/// with SIGSTOP, so that the link notifications overflow its socket's
/// buffer: ENOBUFS) are caught up with by listing the namespace's links
/// again: every one is attached, then every one let go of.
#[test]
fn interfaces_are_caught_up_with_after_lost_notifications() {
    needs_root!();
    // 120 veth pairs: well over the 208 KiB a socket buffers by default.
    const PAIRS: u64 = 120;
    let mut net = TestNet::new();
    let pod = pod(&mut net, 49, 0);
    let port = PORT.to_string();
    let mirror = MirrorProcess::start_here(&["--netns", &pod.server, "--port", &port]);
    let batch = |verb: &str| {
        let dir = scratch_dir();
        let path = dir.path().join("batch");
        let lines: String = (0..PAIRS)
            .map(|i| match verb {
                "add" => format!("link add bulk{i} type veth peer name bulkpeer{i}\n"),
                _ => format!("link del bulk{i}\n"),
            })
            .collect();
        fs::write(&path, lines).expect("batch file");
        let stop = |signal| {
            // SAFETY: plain kill(2) on the test's own child.
            let sent = unsafe { libc::kill(mirror.pid() as libc::pid_t, signal) };
            assert_eq!(sent, 0, "cannot signal the mirror");
        };
        stop(libc::SIGSTOP);
        ip(&["-n", &pod.server, "-batch", &path.display().to_string()]);
        stop(libc::SIGCONT);
    };
    let at_least = |name: &'static str, n: u64| {
        move |c: &std::collections::BTreeMap<String, u64>| c.get(name).copied() >= Some(n)
    };

    batch("add");
    assert!(
        mirror.wait_for_counters(
            Duration::from_secs(60),
            at_least("interfaces.attached", 2 * PAIRS)
        ),
        "every new interface is attached"
    );
    batch("del");
    assert!(
        mirror.wait_for_counters(
            Duration::from_secs(60),
            at_least("interfaces.detached", 2 * PAIRS)
        ),
        "every one that went is let go of"
    );
    let output = mirror.stop();
    let counter = |name: &str| output.counters.get(name).copied().unwrap_or(0);
    // At least the additions overflow (each pair is several notifications
    // of over a kilobyte); the removals may fit.
    assert!(
        counter("interfaces.relisted") >= 1,
        "the notifications overflowed the socket and the links were listed again\n{output}"
    );
    assert_eq!(counter("interfaces.attached"), 2 * PAIRS, "{output}");
    assert_eq!(counter("interfaces.detached"), 2 * PAIRS, "{output}");
    assert_eq!(counter("interfaces.failed"), 0, "{output}");
}

/// The index of `iface` in namespace `ns`.
fn ifindex(ns: &str, iface: &str) -> u32 {
    let out = run_in(ns, "cat", &[&format!("/sys/class/net/{iface}/ifindex")]);
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("an index")
}

/// Two pods whose eth0 have one index (as pods' often do): each record
/// carries its namespace, and each connection is named after its own pod,
/// at TC and at XDP.
fn interfaces_that_share_an_index_are_told_apart(attach: &str, n: u8) {
    let mut net = TestNet::new();
    let first = pod(&mut net, n, 0);
    let second = pod(&mut net, n + 1, 0);
    assert_eq!(
        ifindex(&first.server, "eth0"),
        ifindex(&second.server, "eth0"),
        "the test needs two eth0 with one index"
    );
    let (a, b) = (
        format!("{}:eth0", first.server),
        format!("{}:eth0", second.server),
    );
    let output = mirror_traffic(
        &["--attach", attach, "--iface", &a, "--iface", &b],
        &[
            (&first, 41006, "to the first pod"),
            (&second, 41007, "to the second one"),
            (&first, 41008, "the first again"),
        ],
    );
    assert_eq!(connection(&output, 41006), (a.clone(), 16), "{output}");
    assert_eq!(connection(&output, 41007), (b, 17), "{output}");
    assert_eq!(connection(&output, 41008), (a, 15), "{output}");
    assert_eq!(output.kernel("netns_unknown"), 0, "{output}");
    assert!(output.kernel("mirrored") > 0, "{output}");
}

root_tests! {
    interfaces_that_share_an_index_are_told_apart_at_tc =>
        interfaces_that_share_an_index_are_told_apart("tc", 44);
    interfaces_that_share_an_index_are_told_apart_at_xdp =>
        interfaces_that_share_an_index_are_told_apart("xdp-skb", 50);
}

#[test]
fn a_missing_namespace_or_process_is_one_sentence() {
    needs_root!();
    let out = run_mirror(None, &["run", "--netns", "mt-no-such-ns", "--port", "80"]);
    assert_refused(&out, "there is no network namespace 'mt-no-such-ns'");
    // Above the largest pid_max.
    let out = run_mirror(None, &["run", "--pid", "4194305", "--port", "80"]);
    assert_refused(&out, "there is no process 4194305");
    let out = run_mirror(
        None,
        &["run", "--iface", "mt-no-such-ns:eth0", "--port", "80"],
    );
    assert_refused(&out, "there is no network namespace 'mt-no-such-ns'");
}

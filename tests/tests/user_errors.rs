//! Errors a user can meet are one clear sentence on stderr, never a panic
//! or a backtrace, and the process exits with a failure status.

use std::{fs, os::unix::fs::PermissionsExt as _, process::Output};

use mirror_tests::{
    mirror_process::{MirrorProcess, assert_refused, mirror_bin, run_mirror},
    needs_root,
    netns::TestNet,
};

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_clear_failure(out: &Output, expected: &str) {
    assert_refused(out, expected);
    let text = stderr(out);
    for noise in ["panicked", "backtrace", "Backtrace", "RUST_BACKTRACE"] {
        assert!(!text.contains(noise), "no {noise} for a user error: {text}");
    }
}

#[test]
fn unknown_interface() {
    needs_root!();
    let mut net = TestNet::new();
    let ns = net.namespace("host");
    let out = run_mirror(Some(&ns), &["run", "--iface", "eth9", "--port", "80"]);
    assert_clear_failure(&out, "there is no network interface named 'eth9' here");
    assert!(
        stderr(&out).contains("(this namespace has: lo)"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn invalid_ports() {
    for port in ["0", "65536", "http"] {
        let out = run_mirror(None, &["run", "--iface", "lo", "--port", port]);
        assert_clear_failure(&out, "use a number from 1 to 65535");
    }
}

#[test]
fn not_privileged() {
    needs_root!();
    // A copy that the unprivileged user can execute wherever the build is.
    let dir = mirror_tests::bed::scratch_dir();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let copy = dir.path().join("mirror");
    fs::copy(mirror_bin(), &copy).unwrap();
    fs::set_permissions(&copy, fs::Permissions::from_mode(0o755)).unwrap();
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(&copy)
        .args(["run", "--iface", "lo", "--port", "80"])
        .output()
        .expect("setpriv (util-linux)");
    assert_clear_failure(
        &out,
        "mirror needs root, or the capabilities CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN",
    );
}

#[test]
fn busy_xdp_slot() {
    needs_root!();
    let mut net = TestNet::new();
    let a = net.namespace("a");
    let b = net.namespace("b");
    net.veth((&a, "a0", "198.18.1.1/24"), (&b, "b0", "198.18.1.2/24"));
    let first = MirrorProcess::start(
        &b,
        &["--iface", "b0", "--port", "80", "--attach", "xdp-drv"],
    );
    // No server: the default socket is the machine's, which another mirror
    // may hold; the refusal tested here is the XDP slot's.
    let out = run_mirror(
        Some(&b),
        &[
            "run", "--iface", "b0", "--port", "81", "--attach", "xdp-drv", "--listen", "none",
        ],
    );
    assert_clear_failure(&out, "b0 already has an XDP program attached");
    let out = run_mirror(
        Some(&b),
        &[
            "run", "--iface", "b0", "--port", "81", "--attach", "xdp-skb", "--listen", "none",
        ],
    );
    assert_clear_failure(&out, "b0 already has an XDP program attached");
    // TC still works beside it, and the first mirror is unharmed.
    let tc = MirrorProcess::start(&b, &["--iface", "b0", "--port", "81", "--attach", "tc"]);
    tc.stop();
    first.stop();
}

#[test]
fn no_native_xdp_on_loopback() {
    needs_root!();
    let mut net = TestNet::new();
    let ns = net.namespace("host");
    let out = run_mirror(
        Some(&ns),
        &[
            "run", "--iface", "lo", "--port", "80", "--attach", "xdp-drv", "--listen", "none",
        ],
    );
    assert_clear_failure(&out, "the driver of lo has no native XDP support");
}

/// XDP has no egress hook: `--directions both` with an XDP mode is refused
/// before anything is loaded, with what to use instead.
#[test]
fn xdp_refuses_both_directions() {
    needs_root!();
    let mut net = TestNet::new();
    let ns = net.namespace("host");
    for mode in ["xdp", "xdp-skb", "xdp-drv"] {
        let out = run_mirror(
            Some(&ns),
            &[
                "run",
                "--iface",
                "lo",
                "--port",
                "80",
                "--attach",
                mode,
                "--directions",
                "both",
                "--listen",
                "none",
            ],
        );
        assert_clear_failure(
            &out,
            &format!(
                "XDP has no egress hook, so --attach {mode} captures only what the client sends: use --directions client with it, or --attach tc (or auto) for both directions"
            ),
        );
    }
}

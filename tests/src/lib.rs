//! Helpers for the privileged tests: a test bed of network namespaces and a
//! scratch directory, the real `mirror` binary as a child process, and
//! checks on mirrored streams. The benchmark (`bench/`) runs on them too.
//!
//! Tests panic with a message instead of returning errors.

pub mod bed;
pub mod mirror_process;
pub mod netns;
pub mod prometheus;
pub mod streams;
pub mod traffic;
pub mod web;

use std::io::Write as _;

/// Set to `1` by `cargo xtask test`: a privileged test that finds itself
/// without root fails instead of skipping.
pub const REQUIRE_PRIVILEGED: &str = "MIRROR_REQUIRE_PRIVILEGED";

/// Ends the test early, with one line saying why, unless it runs as root;
/// with `MIRROR_REQUIRE_PRIVILEGED=1` it fails instead. The first line of
/// every test that creates network namespaces or loads BPF programs.
#[macro_export]
macro_rules! needs_root {
    () => {
        if !$crate::privileged() {
            return;
        }
    };
}

/// Tests that differ only in what they pass to one function: each starts
/// with [`needs_root!`] and runs its expression, and keeps a name of its
/// own (to run it alone, and to see which one failed).
///
/// ```ignore
/// root_tests! {
///     /// What this case shows.
///     veth_tc => mirror_transfer(&TestBed::new(), "tc");
///     loopback_tc => mirror_transfer(&TestBed::loopback(), "tc");
/// }
/// ```
#[macro_export]
macro_rules! root_tests {
    ($($(#[$meta:meta])* $name:ident => $body:expr;)+) => {
        $(
            $(#[$meta])*
            #[test]
            fn $name() {
                $crate::needs_root!();
                $body;
            }
        )+
    };
}

/// True as root. Otherwise prints why the calling test is skipped and
/// returns false, or panics when [`REQUIRE_PRIVILEGED`] is `1`. Use
/// [`needs_root!`].
pub fn privileged() -> bool {
    if is_root() {
        return true;
    }
    let current = std::thread::current();
    // libtest runs each test on a thread named after it.
    let test = current.name().unwrap_or("this test");
    assert!(
        std::env::var_os(REQUIRE_PRIVILEGED).is_none_or(|value| value != "1"),
        "{test} creates network namespaces and loads BPF programs: run it as root \
         (`sudo cargo xtask test`)"
    );
    // Straight to stderr: libtest keeps what a passing test prints with
    // eprintln! to itself.
    let _ = writeln!(
        std::io::stderr(),
        "skipped {test}: it needs root to create network namespaces and load BPF programs"
    );
    false
}

/// Panics unless the process runs as root: for what a test starts after
/// [`needs_root!`] said it may (the namespaces), and for the benchmark.
pub fn require_root() {
    assert!(
        is_root(),
        "this creates network namespaces and loads BPF programs: run it as root \
         (`sudo cargo xtask test`); a test that needs root starts with `needs_root!()`"
    );
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

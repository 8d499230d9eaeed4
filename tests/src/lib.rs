//! Helpers for the privileged tests: test hosts in network namespaces, the
//! real `mirror` binary as a child process, and checks on mirrored streams.
//!
//! Tests panic with a message instead of returning errors.

pub mod mirror_process;
pub mod netns;
pub mod streams;
pub mod traffic;
pub mod web;

/// Panics unless the tests run as root: they create network namespaces and
/// load BPF programs.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests create network namespaces and load BPF programs: run them as root (`sudo cargo xtask test`)"
    );
}

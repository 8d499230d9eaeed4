//! `bench/results.md`: the machine, then each scenario's section as last
//! measured (a scenario run alone replaces only its own section), each
//! stamped with its date and commit; plots beside it.

use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
};

/// One scenario's results.
pub struct Section {
    /// File stem, and its place in `results.md`.
    pub name: &'static str,
    pub markdown: String,
    /// `(file name, SVG)`.
    pub plots: Vec<(String, String)>,
    /// Figures the scenario should have produced and did not.
    pub missing: Vec<String>,
}

/// Sections in the order `results.md` shows them.
pub const ORDER: [&str; 7] = [
    "capture",
    "directions",
    "kernel",
    "isolation",
    "fanout",
    "forward",
    "nats",
];

/// Writes the section (stamped) under `dir/sections` and its plots in
/// `dir`.
pub fn write_section(dir: &Path, section: &Section, stamp: &str) {
    let sections = dir.join("sections");
    fs::create_dir_all(&sections).expect("create the sections directory");
    let text = match section.markdown.split_once('\n') {
        Some((heading, rest)) => format!("{heading}\n\n*{stamp}*\n{rest}"),
        None => section.markdown.clone(),
    };
    write(&sections.join(format!("{}.md", section.name)), &text);
    for (file, svg) in &section.plots {
        write(&dir.join(file), svg);
    }
}

/// Puts `dir/results.md` together from the machine description and the
/// sections present.
pub fn assemble(dir: &Path, machine: &str) {
    let mut out = format!(
        "# Benchmark results\n\n\
         Produced by `cargo xtask bench` (one command: it installs what it needs, builds \
         release binaries, creates and removes its own network namespaces, and writes this \
         file and the plots beside it). Every figure is measured side by side in one run, cases \
         alternating, and given as a median with its min-max range or as a ratio to the \
         baseline of the same run: this machine is shared and noisy, so absolute figures move \
         from run to run and ratios much less.\n\n## Machine\n\n{machine}\n"
    );
    for name in ORDER {
        if let Ok(text) = fs::read_to_string(dir.join("sections").join(format!("{name}.md"))) {
            out.push('\n');
            out.push_str(&text);
        }
    }
    write(&dir.join("results.md"), &out);
}

fn write(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// `Measured <date> at commit <hash>`.
pub fn stamp() -> String {
    let date = first_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let commit = first_line("git", &["-C", root, "rev-parse", "--short", "HEAD"]);
    let dirty = !first_line(
        "git",
        &["-C", root, "status", "--porcelain", "--untracked-files=no"],
    )
    .is_empty();
    format!(
        "Measured {date} at commit {commit}{}.",
        if dirty {
            " with uncommitted changes"
        } else {
            ""
        }
    )
}

/// CPU, cores, memory, kernel, distribution and the versions of the tools.
pub fn machine() -> String {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name")?.split_once(':'))
        .map_or("unknown", |(_, model)| model.trim());
    let cores = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let memory = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|kib| kib.split_whitespace().next()?.parse::<f64>().ok())
        .map_or_else(
            || "unknown".to_owned(),
            |kib| format!("{:.0} GiB", kib / 1048576.0),
        );
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let os = fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("PRETTY_NAME="))
        .map(|name| name.trim_matches('"').to_owned())
        .unwrap_or_default();
    let tools = [
        ("tcpdump", vec!["--version"]),
        ("netsniff-ng", vec!["--version"]),
        ("xdpdump", vec!["--version"]),
        ("iperf3", vec!["--version"]),
        ("wrk", vec!["-v"]),
        ("nginx", vec!["-v"]),
    ]
    .iter()
    .map(|(tool, args)| format!("{tool}: {}", first_line(tool, args)))
    .collect::<Vec<_>>()
    .join("; ");
    format!(
        "- CPU: {cpu}, {cores} cores\n- memory: {memory}\n- kernel: Linux {}\n- system: {os}\n- tools: {tools}\n",
        kernel.trim()
    )
}

/// The first non-empty line a command prints (on either stream).
fn first_line(program: &str, args: &[&str]) -> String {
    let Ok(out) = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
    else {
        return "not installed".to_owned();
    };
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .unwrap_or_default()
        .to_owned()
}

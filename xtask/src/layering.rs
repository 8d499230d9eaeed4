//! The layering of `mirror-user/src`: which top-level module may use
//! which. Every `crate::` (or, in the binary, `mirror_user::`) path is read
//! with `syn` (`use` trees, paths in code, paths in macro bodies, tests
//! included) and mapped to the top-level module it names; an arrow that
//! [`ALLOWED`] does not list, or a cycle between top-level modules, fails
//! `cargo xtask lint`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    path::Path,
};

use anyhow::{Context as _, Result, bail};
use proc_macro2::{TokenStream, TokenTree};
use syn::visit::Visit;

/// Each top-level module of `mirror-user/src` and the modules it may use,
/// in data-path order. Arrows point down the data path (a later stage uses
/// an earlier one's types) or into the shared bottom (`flow`, `telemetry`,
/// `files`, `text`); never back up.
pub const ALLOWED: &[(&str, &[&str])] = &[
    // Leaves: peer text made safe to print; files created through
    // directory descriptors.
    ("text", &[]),
    ("files", &[]),
    // The payload arena: a sealed memfd mapping cut into chunks, filled by
    // the flow stage's pool, shared read-only with local clients.
    ("arena", &[]),
    // Sans-IO: segments, reassembly, the connection table, stream events.
    ("flow", &["arena"]),
    // The counters of every stage (the stages own their counter structs).
    ("telemetry", &["flow", "text"]),
    // BPF programs, maps, rings, attach points, privileges.
    ("kernel", &["flow", "telemetry", "files", "text"]),
    // Broadcast of stream events to consumers.
    ("fanout", &["flow", "telemetry", "text"]),
    // Runtime port changes: the kernel's port map and the fan-out's channels.
    ("control", &["fanout", "kernel", "flow"]),
    // Consumers: print, dump, forward, packet print, pcap.
    (
        "sinks",
        &["fanout", "kernel", "flow", "telemetry", "files", "text"],
    ),
    // The subscriber server, its protocol and its client.
    (
        "server",
        &[
            "control",
            "fanout",
            "kernel",
            "flow",
            "arena",
            "telemetry",
            "files",
            "text",
        ],
    ),
    // Fleets: the streams published to NATS JetStream (frames of the
    // subscriber protocol) and read back by `mirror tail --nats`.
    ("nats", &["server", "fanout", "flow", "telemetry"]),
    // Starts and stops every stage in order.
    (
        "pipeline",
        &[
            "nats",
            "server",
            "sinks",
            "control",
            "fanout",
            "kernel",
            "flow",
            "arena",
            "telemetry",
            "files",
            "text",
        ],
    ),
    // The binary: arguments mapped onto the stages' configurations.
    (
        "cli",
        &[
            "pipeline",
            "nats",
            "server",
            "sinks",
            "control",
            "fanout",
            "kernel",
            "flow",
            "telemetry",
            "files",
            "text",
        ],
    ),
    ("main", &["cli", "kernel"]),
];

/// Top-level modules that are sans-IO (quinn-proto's rule): no runtime,
/// no clock; time comes in as an argument. Names they may not use.
pub const SANS_IO: &[(&str, &[&str])] = &[("flow", &["tokio", "Instant", "SystemTime"])];

/// One arrow between top-level modules, with where it was seen first.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Arrow {
    pub from: String,
    pub to: String,
    pub at: String,
}

impl fmt::Display for Arrow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {} ({})", self.from, self.to, self.at)
    }
}

/// Checks `mirror-user/src` under `root`.
pub fn check(root: &Path) -> Result<()> {
    let src = root.join("mirror-user/src");
    let mut files = Vec::new();
    collect(&src, &src, &mut files)?;
    check_sources(&files, ALLOWED)
}

fn collect(src: &Path, dir: &Path, files: &mut Vec<(String, String)>) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .collect::<Result<_, _>>()?;
    entries.sort_by_key(std::fs::DirEntry::path);
    for entry in entries {
        let path = entry.path();
        if path.is_dir() {
            collect(src, &path, files)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let relative = path.strip_prefix(src).expect("under src").to_string_lossy();
            files.push((relative.into_owned(), text));
        }
    }
    Ok(())
}

/// Checks files given as (path relative to `src`, source) against `allowed`.
pub fn check_sources(files: &[(String, String)], allowed: &[(&str, &[&str])]) -> Result<()> {
    let table: BTreeMap<&str, &[&str]> = allowed.iter().copied().collect();
    let arrows = arrows(files)?;
    let mut problems = sans_io_problems(files)?;
    for arrow in &arrows {
        match table.get(arrow.from.as_str()) {
            None => problems.push(format!(
                "{}: the top-level module `{}` is not in the layering table (xtask/src/layering.rs): add it with the modules it may use",
                arrow.at, arrow.from
            )),
            Some(may) if !may.contains(&arrow.to.as_str()) => problems.push(format!(
                "{arrow}: `{}` may not use `{}` (allowed: {})",
                arrow.from,
                arrow.to,
                if may.is_empty() { "nothing".to_owned() } else { may.join(", ") }
            )),
            Some(_) => {}
        }
    }
    if let Some(cycle) = find_cycle(&arrows) {
        problems.push(format!(
            "the top-level modules form a cycle: {}",
            cycle.join(" -> ")
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        bail!(
            "mirror-user/src breaks its layering:\n  {}",
            problems.join("\n  ")
        )
    }
}

/// The arrows between distinct top-level modules, each once (first seen).
pub fn arrows(files: &[(String, String)]) -> Result<BTreeSet<Arrow>> {
    // Names a crate root may use without `crate::`.
    let tops: BTreeSet<String> = files
        .iter()
        .map(|(path, _)| ModulePath::of(path).top)
        .chain(ALLOWED.iter().map(|(name, _)| (*name).to_owned()))
        .collect();
    let mut seen: BTreeMap<(String, String), String> = BTreeMap::new();
    for (path, text) in files {
        if path == "lib.rs" {
            continue;
        }
        let file = syn::parse_file(text).with_context(|| format!("cannot parse {path}"))?;
        let module = ModulePath::of(path);
        let mut visitor = Paths {
            module: &module,
            tops: &tops,
            inline: Vec::new(),
            targets: BTreeSet::new(),
        };
        visitor.visit_file(&file);
        for target in visitor.targets {
            if target != module.top {
                seen.entry((module.top.clone(), target))
                    .or_insert_with(|| path.clone());
            }
        }
    }
    Ok(seen
        .into_iter()
        .map(|((from, to), at)| Arrow { from, to, at })
        .collect())
}

/// Uses of a name [`SANS_IO`] forbids, as `file: name`.
fn sans_io_problems(files: &[(String, String)]) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    for (path, text) in files {
        let module = ModulePath::of(path);
        let Some((_, forbidden)) = SANS_IO.iter().find(|(name, _)| *name == module.top) else {
            continue;
        };
        let file = syn::parse_file(text).with_context(|| format!("cannot parse {path}"))?;
        let mut names = Names::default();
        names.visit_file(&file);
        for name in forbidden.iter().filter(|name| names.0.contains(**name)) {
            problems.push(format!(
                "{path}: `{}` is sans-IO and may not use `{name}` (time comes in as an argument)",
                module.top
            ));
        }
    }
    Ok(problems)
}

/// Every identifier a file names in paths, `use` trees and macro bodies.
#[derive(Default)]
struct Names(BTreeSet<String>);

impl Names {
    fn tokens(&mut self, tokens: TokenStream) {
        for token in tokens {
            match token {
                TokenTree::Group(group) => self.tokens(group.stream()),
                TokenTree::Ident(ident) => {
                    self.0.insert(ident.to_string());
                }
                _ => {}
            }
        }
    }
}

impl<'ast> Visit<'ast> for Names {
    fn visit_ident(&mut self, ident: &'ast proc_macro2::Ident) {
        self.0.insert(ident.to_string());
    }

    fn visit_macro(&mut self, mac: &'ast syn::Macro) {
        self.tokens(mac.tokens.clone());
        syn::visit::visit_macro(self, mac);
    }
}

/// Where a file sits: its module path in its crate, and which crate.
struct ModulePath {
    /// The top-level module: `main` for `main.rs`, `cli` for the
    /// binary's `cli/`, else the first segment.
    top: String,
    /// Segments from the crate root, e.g. `["server", "session"]`.
    segments: Vec<String>,
    /// In the binary (`main.rs`, `cli/`): the library is `mirror_user`.
    binary: bool,
}

impl ModulePath {
    fn of(path: &str) -> Self {
        let mut segments: Vec<String> = path
            .trim_end_matches(".rs")
            .split('/')
            .map(str::to_owned)
            .collect();
        if segments.last().is_some_and(|s| s == "mod") {
            segments.pop();
        }
        if segments == ["main"] {
            return Self {
                top: "main".to_owned(),
                segments: Vec::new(),
                binary: true,
            };
        }
        Self {
            top: segments[0].clone(),
            binary: segments[0] == "cli",
            segments,
        }
    }
}

struct Paths<'a> {
    module: &'a ModulePath,
    tops: &'a BTreeSet<String>,
    /// Inline modules (`mod tests { ... }`) around the current item.
    inline: Vec<String>,
    targets: BTreeSet<String>,
}

impl Paths<'_> {
    /// Records the top-level module `segments` names, if it names one of
    /// this project's.
    fn record(&mut self, segments: &[String]) {
        let Some((first, rest)) = segments.split_first() else {
            return;
        };
        let here: Vec<&str> = self
            .module
            .segments
            .iter()
            .chain(&self.inline)
            .map(String::as_str)
            .collect();
        let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
        let (binary, absolute): (bool, Vec<&str>) = match first.as_str() {
            "mirror_user" => (false, rest),
            "crate" => (self.module.binary, rest),
            "self" => (self.module.binary, [here.as_slice(), &rest].concat()),
            "super" => {
                let ups = 1 + rest.iter().take_while(|s| **s == "super").count();
                let base = &here[..here.len().saturating_sub(ups)];
                (self.module.binary, [base, &rest[ups - 1..]].concat())
            }
            // In a crate root, `name::...` is `crate::name::...`.
            name if here.is_empty() && self.tops.contains(name) => {
                (self.module.binary, [&[name], rest.as_slice()].concat())
            }
            _ => return,
        };
        let Some(top) = absolute.first() else {
            return;
        };
        let top = match (binary, *top) {
            (true, "cli") => "cli",
            // The binary's root holds `main` and its helpers.
            (true, _) => "main",
            (false, top) => top,
        };
        self.targets.insert(top.to_owned());
    }
    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(path) => {
                prefix.push(path.ident.to_string());
                self.use_tree(prefix, &path.tree);
                prefix.pop();
            }
            syn::UseTree::Name(name) => {
                prefix.push(name.ident.to_string());
                self.record(prefix);
                prefix.pop();
            }
            syn::UseTree::Rename(rename) => {
                prefix.push(rename.ident.to_string());
                self.record(prefix);
                prefix.pop();
            }
            syn::UseTree::Glob(_) => self.record(prefix),
            syn::UseTree::Group(group) => {
                for tree in &group.items {
                    self.use_tree(prefix, tree);
                }
            }
        }
    }

    /// `crate :: name` (and `super`, `mirror_user`) inside macro bodies,
    /// which syn leaves as tokens.
    fn tokens(&mut self, tokens: TokenStream) {
        let tokens: Vec<TokenTree> = tokens.into_iter().collect();
        for (i, token) in tokens.iter().enumerate() {
            match token {
                TokenTree::Group(group) => self.tokens(group.stream()),
                TokenTree::Ident(ident) => {
                    let mut segments = vec![ident.to_string()];
                    let mut j = i + 1;
                    while let (Some(TokenTree::Punct(a)), Some(TokenTree::Punct(b)), Some(next)) =
                        (tokens.get(j), tokens.get(j + 1), tokens.get(j + 2))
                    {
                        if a.as_char() != ':' || b.as_char() != ':' {
                            break;
                        }
                        let TokenTree::Ident(next) = next else { break };
                        segments.push(next.to_string());
                        j += 3;
                    }
                    if segments.len() > 1 {
                        self.record(&segments);
                    }
                }
                _ => {}
            }
        }
    }
}

impl<'ast> Visit<'ast> for Paths<'_> {
    fn visit_item_mod(&mut self, item: &'ast syn::ItemMod) {
        self.inline.push(item.ident.to_string());
        syn::visit::visit_item_mod(self, item);
        self.inline.pop();
    }

    fn visit_item_use(&mut self, item: &'ast syn::ItemUse) {
        self.use_tree(&mut Vec::new(), &item.tree);
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
        self.record(&segments);
        syn::visit::visit_path(self, path);
    }

    fn visit_macro(&mut self, mac: &'ast syn::Macro) {
        self.tokens(mac.tokens.clone());
        syn::visit::visit_macro(self, mac);
    }
}

/// A cycle among the arrows, if there is one.
fn find_cycle(arrows: &BTreeSet<Arrow>) -> Option<Vec<String>> {
    let mut graph: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for arrow in arrows {
        graph.entry(&arrow.from).or_default().push(&arrow.to);
    }
    // Depth-first search, colouring nodes: on the stack, or done.
    fn visit<'a>(
        node: &'a str,
        graph: &BTreeMap<&'a str, Vec<&'a str>>,
        stack: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|n| *n == node) {
            let mut cycle: Vec<String> = stack[at..].iter().map(|n| (*n).to_owned()).collect();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if !done.insert(node) {
            return None;
        }
        stack.push(node);
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, stack, done) {
                return Some(cycle);
            }
        }
        stack.pop();
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(cycle) = visit(node, &graph, &mut Vec::new(), &mut done) {
            return Some(cycle);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(path, text)| ((*path).to_owned(), (*text).to_owned()))
            .collect()
    }

    fn arrows_of(list: &[(&str, &str)]) -> Vec<String> {
        arrows(&files(list))
            .unwrap()
            .iter()
            .map(|a| format!("{} -> {}", a.from, a.to))
            .collect()
    }

    #[test]
    fn paths_are_read_from_uses_code_and_macros() {
        let found = arrows_of(&[(
            "server/session.rs",
            r#"
            use crate::{fanout::hub::Hub, flow::{model::StreamEvent, segment}};
            use super::protocol::ServerFrame;
            use std::io;
            fn f() -> crate::control::Request { todo!() }
            #[cfg(test)]
            mod tests {
                #[test]
                fn t() { assert_eq!(crate::telemetry::counters::flatten(&x), y); }
            }
            "#,
        )]);
        assert_eq!(
            found,
            [
                "server -> control",
                "server -> fanout",
                "server -> flow",
                "server -> telemetry"
            ],
            "super:: within server is no arrow; std is none"
        );
        // The binary reaches the library through `mirror_user`; its own
        // `crate::` paths stay in the binary.
        let found = arrows_of(&[(
            "cli/run.rs",
            "use mirror_user::pipeline::Pipeline; use crate::cli::StreamArgs;",
        )]);
        assert_eq!(found, ["cli -> pipeline"]);
        let found = arrows_of(&[(
            "main.rs",
            "mod cli; use cli::Cli; fn main() { crate::cli::run(); }",
        )]);
        assert_eq!(found, ["main -> cli"]);
        // `super::super` from a nested file leaves the top-level module.
        let found = arrows_of(&[(
            "kernel/attach/clsact.rs",
            "use super::super::super::flow::X;",
        )]);
        assert_eq!(found, ["kernel -> flow"]);
    }

    #[test]
    fn the_real_tree_passes() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        check(root).unwrap();
    }

    #[test]
    fn an_upward_import_fails() {
        let bad = files(&[
            ("flow/model.rs", "pub struct StreamEvent;"),
            (
                "kernel/loader.rs",
                "use crate::{flow::model::StreamEvent, pipeline::shards::Shards};",
            ),
        ]);
        let error = check_sources(&bad, ALLOWED).unwrap_err().to_string();
        assert!(
            error
                .contains("kernel -> pipeline (kernel/loader.rs): `kernel` may not use `pipeline`"),
            "{error}"
        );
        assert!(!error.contains("kernel -> flow"), "{error}");
        // Also when the path is written out in code or in a macro.
        for code in [
            "fn f(_: crate::cli::RunArgs) {}",
            "fn f() { println!(\"{:?}\", crate::pipeline::Pipeline::new()); }",
        ] {
            let bad = files(&[("telemetry/counters.rs", code)]);
            assert!(check_sources(&bad, ALLOWED).is_err(), "{code}");
        }
    }

    #[test]
    fn the_sans_io_modules_use_no_runtime_and_no_clock() {
        for code in [
            "fn f() { tokio::spawn(async {}); }",
            "use std::time::Instant;",
            "fn f() -> u64 { std::time::SystemTime::now().elapsed().unwrap().as_secs() }",
            "fn f() { assert!(std::time::Instant::now().elapsed().as_secs() < 1); }",
        ] {
            let bad = files(&[("flow/conntrack.rs", code)]);
            let error = check_sources(&bad, ALLOWED).unwrap_err().to_string();
            assert!(error.contains("`flow` is sans-IO"), "{code}: {error}");
        }
        let fine = files(&[("flow/conntrack.rs", "fn tick(now_ns: u64) {}")]);
        check_sources(&fine, ALLOWED).unwrap();
    }

    #[test]
    fn a_module_missing_from_the_table_fails() {
        let bad = files(&[("util.rs", "use crate::flow::model::StreamEvent;")]);
        let error = check_sources(&bad, ALLOWED).unwrap_err().to_string();
        assert!(
            error.contains("`util` is not in the layering table"),
            "{error}"
        );
    }

    #[test]
    fn a_cycle_fails_even_if_each_arrow_is_allowed() {
        let table: &[(&str, &[&str])] = &[("a", &["b"]), ("b", &["c"]), ("c", &["a"])];
        let cyclic = files(&[
            ("a.rs", "use crate::b::X;"),
            ("b/mod.rs", "use crate::c::Y;"),
            ("c/inner.rs", "fn f() { crate::a::z(); }"),
        ]);
        let error = check_sources(&cyclic, table).unwrap_err().to_string();
        assert!(error.contains("cycle: a -> b -> c -> a"), "{error}");
        let acyclic = files(&[
            ("a.rs", "use crate::b::X;"),
            ("b/mod.rs", "use crate::c::Y;"),
        ]);
        check_sources(&acyclic, table).unwrap();
    }
}

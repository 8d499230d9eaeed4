//! The one counter model: every stage owns one counters struct (atomics,
//! written without locks on the hot path) and exposes one `Serialize`
//! snapshot of it; the [`Registry`] walks the stages in data-path order
//! and puts their snapshots together into one [`Document`], which every
//! export reads: the report at exit, STATS frames and `mirror stats`, and
//! Prometheus.

use std::{fmt, sync::Arc};

use serde::Serialize;
use serde_json::{Map, Value};

use crate::text::printable;

/// A stage's counters.
pub trait Stage: Send + Sync + 'static {
    type Snapshot: Serialize;

    /// The counters now (each read on its own: a snapshot is not atomic
    /// across counters, as no scrape of live counters is).
    fn snapshot(&self) -> Self::Snapshot;
}

type Read = Box<dyn Fn() -> Value + Send + Sync>;

/// Where a stage's snapshot goes in the document.
enum Place {
    /// Under its own name: `kernel`, `drain`, `server`.
    Section(&'static str),
    /// Its fields at the top (the hub's `ports`, `consumers`, `truncated`).
    Top,
}

/// Every stage of a running mirror, in data-path order.
#[derive(Default)]
pub struct Registry {
    stages: Vec<(Place, Read)>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a stage whose snapshot is the section `name`.
    pub fn register<S: Stage>(&mut self, name: &'static str, stage: Arc<S>) {
        self.stages
            .push((Place::Section(name), Self::reader(stage)));
    }

    /// Adds a stage whose snapshot (an object) holds several sections.
    pub fn register_sections<S: Stage>(&mut self, stage: Arc<S>) {
        self.stages.push((Place::Top, Self::reader(stage)));
    }

    fn reader<S: Stage>(stage: Arc<S>) -> Read {
        Box::new(move || {
            // Snapshots are plain numbers, strings and lists: they always
            // serialize.
            serde_json::to_value(stage.snapshot()).unwrap_or(Value::Null)
        })
    }

    /// Every stage's counters now.
    pub fn document(&self) -> Document {
        let mut sections = Vec::new();
        for (place, read) in &self.stages {
            match (place, read()) {
                (Place::Section(name), value) => sections.push(((*name).to_owned(), value)),
                (Place::Top, Value::Object(fields)) => sections.extend(fields),
                (Place::Top, _) => {}
            }
        }
        Document { sections }
    }
}

/// The counters of every stage at one moment, sections in data-path
/// order.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    sections: Vec<(String, Value)>,
}

/// What the document's lists are keyed by, and what one entry is called
/// in text: `ports` by `port` (`port 80: ...`), `consumers` and `forward`
/// by `name`.
pub(super) const LISTS: &[(&str, &str, &str)] = &[
    ("rings", "cpu", "ring"),
    ("ports", "port", "port"),
    ("consumers", "name", "consumer"),
    ("forward", "name", "forward"),
];

/// The key of a list entry: its CPU, its port or its (escaped) name.
pub(super) fn entry_key(item: &Value) -> String {
    item["port"]
        .as_u64()
        .or_else(|| item["cpu"].as_u64())
        .map(|p| p.to_string())
        .or_else(|| item["name"].as_str().map(|n| printable(n).into_owned()))
        .unwrap_or_default()
}

impl Document {
    /// A document read back from its JSON (what `mirror stats` receives).
    pub fn from_json(json: &Value) -> Self {
        let sections = match json {
            Value::Object(map) => map
                .iter()
                .filter(|(name, _)| *name != "kind")
                .map(|(name, value)| (name.clone(), value.clone()))
                .collect(),
            _ => Vec::new(),
        };
        Self { sections }
    }

    pub fn sections(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.sections
            .iter()
            .map(|(name, value)| (name.as_str(), value))
    }

    /// The section `name`, or null.
    pub fn section(&self, name: &str) -> &Value {
        self.sections
            .iter()
            .find(|(n, _)| n == name)
            .map_or(&Value::Null, |(_, value)| value)
    }

    /// The JSON document (STATS frames, `mirror stats --json`, the last
    /// line of `--print json`).
    pub fn to_json(&self) -> Value {
        let mut map = Map::new();
        map.insert("kind".to_owned(), "counters".into());
        for (name, value) in &self.sections {
            map.insert(name.clone(), value.clone());
        }
        Value::Object(map)
    }

    /// Every counter under its stable name, `section.field`:
    /// `kernel.ring_full`, `connections.closed.gap`, `ports.5201.bytes`,
    /// `consumers.print.lags` (list entries are keyed by port or escaped
    /// name, so that no name holds a space, a line break or a terminal
    /// escape).
    pub fn flatten(&self) -> std::collections::BTreeMap<String, u64> {
        let mut out = std::collections::BTreeMap::new();
        for (name, value) in &self.sections {
            walk(name, value, &mut |key, n| {
                out.insert(key, n);
            });
        }
        out
    }
}

/// Calls `leaf` with the dotted name and value of every number under
/// `value`.
fn walk(prefix: &str, value: &Value, leaf: &mut impl FnMut(String, u64)) {
    let join = |key: &str| {
        if prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{prefix}.{key}")
        }
    };
    match value {
        Value::Number(n) => {
            if let Some(n) = n.as_u64() {
                leaf(prefix.to_owned(), n);
            }
        }
        Value::Object(map) => {
            for (key, value) in map {
                walk(&join(key), value, leaf);
            }
        }
        Value::Array(items) => {
            for item in items {
                walk_entry(&join(&entry_key(item)), item, leaf);
            }
        }
        _ => {}
    }
}

/// A list entry's numbers, but its key (a port or a CPU is not a counter).
fn walk_entry(prefix: &str, item: &Value, leaf: &mut impl FnMut(String, u64)) {
    if let Value::Object(map) = item {
        for (key, value) in map
            .iter()
            .filter(|(key, _)| *key != "port" && *key != "cpu")
        {
            walk(&format!("{prefix}.{key}"), value, leaf);
        }
    }
}

/// The report at exit: one line per section, `section: name=value ...`
/// (nested names joined by dots), and one line per list entry
/// (`port 80: ...`, `consumer print: ...`, `forward 198.18.1.2:80: ...`).
impl fmt::Display for Document {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut line = |f: &mut fmt::Formatter<'_>, head: &str, value: &Value| {
            let mut fields = Vec::new();
            walk_entry("", value, &mut |name, n| {
                fields.push(format!("{}={n}", name.trim_start_matches('.')));
            });
            let separator = if std::mem::take(&mut first) { "" } else { "\n" };
            write!(f, "{separator}{head}: {}", fields.join(" "))
        };
        for (name, value) in &self.sections {
            match (value, LISTS.iter().find(|(list, ..)| list == name)) {
                (Value::Array(items), Some((_, _, singular))) => {
                    for item in items {
                        line(f, &format!("{singular} {}", entry_key(item)), item)?;
                    }
                }
                (Value::Object(_), _) => line(f, name, value)?,
                _ => {}
            }
        }
        Ok(())
    }
}

/// A stage whose snapshot is given, for the exports' tests.
#[cfg(test)]
pub(crate) struct Fixed(pub Value);

#[cfg(test)]
impl Stage for Fixed {
    type Snapshot = Value;
    fn snapshot(&self) -> Value {
        self.0.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> Registry {
        let mut registry = Registry::new();
        registry.register(
            "kernel",
            Arc::new(Fixed(serde_json::json!({"seen": 7, "ring_full": 1}))),
        );
        registry.register(
            "connections",
            Arc::new(Fixed(
                serde_json::json!({"opened": 3, "closed": {"fin": 2, "gap": 1}}),
            )),
        );
        registry.register_sections(Arc::new(Fixed(serde_json::json!({
            "ports": [{"port": 80, "bytes": 5}],
            "consumers": [{"name": "print", "lags": 3}, {"name": "evil\nkernel.seen", "events": 1}],
        }))));
        registry
    }

    #[test]
    fn every_export_reads_the_same_document() {
        let document = registry().document();
        let json = document.to_json();
        assert_eq!(json["kind"], "counters");
        assert_eq!(json["connections"]["closed"]["gap"], 1);
        assert_eq!(Document::from_json(&json), document);
        let flat = document.flatten();
        assert_eq!(flat["kernel.seen"], 7);
        assert_eq!(flat["connections.closed.gap"], 1);
        assert_eq!(flat["ports.80.bytes"], 5);
        assert_eq!(flat["consumers.print.lags"], 3);
        assert_eq!(flat["consumers.evil\\nkernel.seen.events"], 1);
        assert!(!flat.contains_key("kind"));
        assert!(flat.keys().all(|k| !k.contains(' ')), "{flat:?}");
    }

    #[test]
    fn text_has_a_line_per_section_and_entry() {
        let text = registry().document().to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "kernel: seen=7 ring_full=1",
                "connections: opened=3 closed.fin=2 closed.gap=1",
                "port 80: bytes=5",
                "consumer print: lags=3",
                "consumer evil\\nkernel.seen: events=1",
            ]
        );
    }
}

//! The counters document in the Prometheus exposition format (OpenMetrics
//! text, which Prometheus asks for first), written by `prometheus-client`.
//!
//! Names follow the document: `section.field` becomes
//! `mirror_section_field_total` for a counter; a list entry's field
//! becomes `mirror_<entry>_<field>` labelled by the entry
//! (`mirror_consumer_bytes_total{consumer="print"}`,
//! `mirror_port_bytes_total{port="80"}`); and maps of outcomes or reasons
//! become one family labelled by them
//! (`mirror_kernel_packets_total{outcome="mirrored"}`,
//! `mirror_connections_closed_total{reason="gap"}`). Labels stay bounded:
//! ports and consumers are capped by the document, a session's series go
//! when it ends (its counts move into `consumer="past_sessions"`). List
//! keys come escaped ([`entry_key`]): no control character reaches a
//! dashboard; prometheus-client quotes the rest.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};
use serde_json::Value;

use super::registry::{Document, LISTS, entry_key};

/// The content type of [`encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of [`encode_classic`]'s text.
pub const CLASSIC_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Objects of the document that are one family labelled by their keys:
/// (path, family, label).
const LABELLED: &[(&str, &str, &str)] = &[
    ("kernel", "kernel_packets", "outcome"),
    ("connections.closed", "connections_closed", "reason"),
    ("forward.aborted", "forward_aborted", "reason"),
    ("forward.skipped", "forward_skipped", "reason"),
    ("forward.compared", "forward_compared", "result"),
];

/// The label a list's entries carry: (list, label).
const LIST_LABELS: &[(&str, &str)] = &[
    ("rings", "cpu"),
    ("ports", "port"),
    ("consumers", "consumer"),
    ("forward", "target"),
];

/// Paths that are levels now rather than counts since the start.
const GAUGES: &[&str] = &[
    "rings.fill_bytes",
    "rings.size_bytes",
    "connections.open",
    "connections.held_bytes",
    "shards.queued_bytes",
    "server.active",
    "server.awaiting_hello",
    "arena.size_bytes",
    "arena.in_use_bytes",
    "truncated.ports",
    "truncated.consumers",
    "nats.in_flight",
    "nats.in_flight_bytes",
];

/// What a family counts, for its HELP line; the others say where in the
/// counters document (README's counter table) they come from.
const HELP: &[(&str, &str)] = &[
    (
        "kernel_packets",
        "Packets the kernel program saw, by what it did with them",
    ),
    ("connections_opened", "Connections announced to consumers"),
    ("connections_closed", "Connections ended, by close reason"),
    ("connections_open", "Connections open now"),
    (
        "ring_fill_bytes",
        "Bytes written to a CPU's ring and not yet read",
    ),
    (
        "connections_held_bytes",
        "Memory held in reorder buffers and SYN waits now",
    ),
    ("consumer_bytes", "Stream bytes a consumer received"),
    (
        "consumer_lagged_connections",
        "Connections closed for a consumer as lagged",
    ),
    ("port_bytes", "Stream bytes published for a port"),
    ("server_active", "Subscriber sessions served now"),
];

#[derive(Debug)]
struct Family {
    name: String,
    path: String,
    gauge: bool,
    samples: Vec<(Vec<(String, String)>, u64)>,
}

/// Every family of the document, in the document's order.
#[derive(Debug)]
struct Families(Vec<Family>);

impl Families {
    fn add(&mut self, name: &str, path: &str, labels: Vec<(String, String)>, value: u64) {
        let name = metric_name(name);
        let index = match self.0.iter().position(|f| f.name == name) {
            Some(index) => index,
            None => {
                self.0.push(Family {
                    name,
                    path: path.to_owned(),
                    gauge: GAUGES.contains(&path),
                    samples: Vec::new(),
                });
                self.0.len() - 1
            }
        };
        self.0[index].samples.push((labels, value));
    }

    /// The numbers under `value`, the family named by `name` (or by
    /// [`LABELLED`] for a map of reasons).
    fn walk(&mut self, name: &str, path: &str, value: &Value, labels: &[(String, String)]) {
        match value {
            Value::Number(n) => {
                if let Some(n) = n.as_u64() {
                    self.add(name, path, labels.to_vec(), n);
                }
            }
            Value::Object(map) => {
                if let Some((_, family, label)) = LABELLED.iter().find(|(p, ..)| *p == path) {
                    for (key, value) in map {
                        if let Some(n) = value.as_u64() {
                            let mut labels = labels.to_vec();
                            labels.push(((*label).to_owned(), key.clone()));
                            self.add(&format!("mirror_{family}"), path, labels, n);
                        }
                    }
                    return;
                }
                for (key, value) in map {
                    self.walk(
                        &format!("{name}_{key}"),
                        &format!("{path}.{key}"),
                        value,
                        labels,
                    );
                }
            }
            _ => {}
        }
    }
}

impl Collector for Families {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for family in &self.0 {
            let short = family.name.trim_start_matches("mirror_");
            let generic;
            let help = match HELP.iter().find(|(name, _)| *name == short) {
                Some((_, help)) => *help,
                None => {
                    generic = format!("{} in the counters document", family.path);
                    &generic
                }
            };
            let kind = if family.gauge {
                MetricType::Gauge
            } else {
                MetricType::Counter
            };
            let mut metric = encoder.encode_descriptor(&family.name, help, None, kind)?;
            for (labels, value) in &family.samples {
                let sample = metric.encode_family(labels)?;
                // Counts stay far below 2^63; a gauge is an i64.
                if family.gauge {
                    ConstGauge::new(i64::try_from(*value).unwrap_or(i64::MAX)).encode(sample)?;
                } else {
                    ConstCounter::new(*value).encode(sample)?;
                }
            }
        }
        Ok(())
    }
}

/// The document as a scrape's body.
pub fn encode(document: &Document) -> String {
    let mut families = Families(Vec::new());
    for (section, value) in document.sections() {
        let list = LISTS.iter().find(|(list, ..)| *list == section);
        match (value, list) {
            (Value::Array(items), Some((_, key, singular))) => {
                let label = LIST_LABELS
                    .iter()
                    .find(|(list, _)| *list == section)
                    .map_or("name", |(_, label)| label);
                for item in items {
                    let labels = [((*label).to_owned(), entry_key(item))];
                    let Value::Object(fields) = item else {
                        continue;
                    };
                    for (field, value) in fields.iter().filter(|(f, _)| f != key) {
                        families.walk(
                            &format!("mirror_{singular}_{field}"),
                            &format!("{section}.{field}"),
                            value,
                            &labels,
                        );
                    }
                }
            }
            _ => families.walk(&format!("mirror_{section}"), section, value, &[]),
        }
    }
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(families));
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
    text
}

/// The document in the classic Prometheus text format (0.0.4), for
/// scrapers that do not ask for OpenMetrics (`curl`, `promtool check
/// metrics`): the same samples, a counter family named with its `_total`
/// suffix, no `# EOF`. prometheus-client writes OpenMetrics only; the two
/// differ in just these lines.
pub fn encode_classic(document: &Document) -> String {
    let open = encode(document);
    let counters: Vec<&str> = open
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut text = String::with_capacity(open.len() + 16 * counters.len());
    for line in open.lines() {
        let comment = ["# HELP ", "# TYPE "]
            .iter()
            .find_map(|prefix| Some((*prefix, line.strip_prefix(prefix)?)));
        match comment {
            Some((prefix, rest)) => {
                let name = rest.split(' ').next().unwrap_or_default();
                text.push_str(prefix);
                text.push_str(name);
                if counters.contains(&name) {
                    text.push_str("_total");
                }
                text.push_str(&rest[name.len()..]);
            }
            None if line == "# EOF" => continue,
            None => text.push_str(line),
        }
        text.push('\n');
    }
    text
}

/// A name made of the characters a metric name may hold.
fn metric_name(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::telemetry::registry::{Fixed, Registry};

    #[test]
    fn families_have_conventional_names_and_labels() {
        let mut registry = Registry::new();
        registry.register(
            "kernel",
            Arc::new(Fixed(
                serde_json::json!({"seen": 7, "mirrored": 5, "error": "x"}),
            )),
        );
        registry.register(
            "connections",
            Arc::new(Fixed(serde_json::json!({
                "opened": 3, "open": 1, "closed": {"fin": 2, "gap": 0}}))),
        );
        registry.register_sections(Arc::new(Fixed(serde_json::json!({
            "ports": [{"port": 80, "bytes": 5}],
            "consumers": [{"name": "print", "bytes": 9, "client": "c"},
                          {"name": "a\"b\\\n", "bytes": 1}],
        }))));
        registry.register(
            "forward",
            Arc::new(Fixed(serde_json::json!([{"name": "198.18.1.2:80",
                "opened": 1, "aborted": {"gap": 1, "target": 0},
                "compared": {"same": 2, "differs": 1, "incomplete": 0}}]))),
        );
        let text = encode(&registry.document());
        for expected in [
            "# TYPE mirror_kernel_packets counter",
            "mirror_kernel_packets_total{outcome=\"seen\"} 7",
            "mirror_kernel_packets_total{outcome=\"mirrored\"} 5",
            "mirror_connections_opened_total 3",
            "# TYPE mirror_connections_open gauge",
            "mirror_connections_open 1",
            "mirror_connections_closed_total{reason=\"fin\"} 2",
            "mirror_connections_closed_total{reason=\"gap\"} 0",
            "mirror_port_bytes_total{port=\"80\"} 5",
            "mirror_consumer_bytes_total{consumer=\"print\"} 9",
            "mirror_consumer_bytes_total{consumer=\"a\\\"b\\\\\\\\\\\\n\"} 1",
            "mirror_forward_opened_total{target=\"198.18.1.2:80\"} 1",
            "mirror_forward_aborted_total{target=\"198.18.1.2:80\",reason=\"gap\"} 1",
            "mirror_forward_compared_total{target=\"198.18.1.2:80\",result=\"same\"} 2",
            "mirror_forward_compared_total{target=\"198.18.1.2:80\",result=\"differs\"} 1",
            "# EOF",
        ] {
            assert!(text.contains(expected), "{expected} in\n{text}");
        }
        // One TYPE line per family, every family's samples together.
        let types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE")).collect();
        let mut unique = types.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(types.len(), unique.len(), "{text}");
        assert!(!text.contains("client"), "{text}");
        assert!(!text.contains("error"), "{text}");

        let classic = encode_classic(&registry.document());
        for expected in [
            "# HELP mirror_kernel_packets_total Packets the kernel program saw",
            "# TYPE mirror_kernel_packets_total counter\nmirror_kernel_packets_total{outcome=\"seen\"} 7\n",
            "# TYPE mirror_connections_open gauge\nmirror_connections_open 1\n",
        ] {
            assert!(classic.contains(expected), "{expected} in\n{classic}");
        }
        assert!(!classic.contains("# EOF"), "{classic}");
        let samples = |text: &str| -> Vec<String> {
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(samples(&classic), samples(&text));
    }
}

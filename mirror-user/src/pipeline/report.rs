//! The counters of every stage, as `mirror stats` reads them while the
//! mirror runs and as the mirror prints them when it stops.

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use crate::{
    fanout::hub::Hub,
    flow::conntrack::TableStats,
    pipeline::shards::ShardCounters,
    server::ServerStats,
    sinks::{
        forward::{ForwardStats, ForwardTarget},
        pcap::PcapCounters,
    },
    telemetry::counters::{self, DrainCounters, KernelCounters, StreamSummary, Summary},
};

/// Handles on every stage's counters, to build the summary at any time.
pub(super) struct Stages {
    pub(super) drain: Arc<DrainCounters>,
    pub(super) shards: Arc<ShardCounters>,
    pub(super) ring_lost_flows: Arc<AtomicU64>,
    pub(super) hub: Arc<Hub>,
    pub(super) server: Arc<ServerStats>,
    pub(super) forwards: Vec<(ForwardTarget, Arc<ForwardStats>)>,
    pub(super) pcap: Option<Arc<PcapCounters>>,
}

impl Stages {
    fn summary(&self, kernel: KernelCounters, table: TableStats) -> Summary {
        let (segments, queue_drops, undecodable) = self.shards.snapshot();
        let (consumers, past_sessions) = self.hub.consumer_totals();
        Summary {
            kernel,
            drain: self.drain.snapshot(),
            streams: StreamSummary {
                segments,
                queue_drops,
                undecodable,
                ring_lost_flows: self.ring_lost_flows.load(Ordering::Relaxed),
                table,
                ports: self.hub.port_totals(),
                consumers,
                past_sessions,
            },
        }
    }

    /// The counters document, with the server's, forwarders' and
    /// capture's counters.
    pub(super) fn json(&self, kernel: KernelCounters, table: TableStats) -> serde_json::Value {
        let mut json = self.summary(kernel, table).to_json();
        json["server"] = self.server.to_json();
        json["forward"] = self
            .forwards
            .iter()
            .map(|(target, stats)| stats.to_json(target))
            .collect();
        if let Some(pcap) = &self.pcap {
            json["pcap"] = pcap
                .fields()
                .iter()
                .map(|(name, value)| ((*name).to_owned(), serde_json::Value::from(*value)))
                .collect::<serde_json::Map<_, _>>()
                .into();
        }
        json
    }
}

/// What the mirror did, once every stage has stopped.
pub struct Report {
    pub(super) stages: Stages,
    pub(super) kernel: KernelCounters,
    pub(super) table: TableStats,
    /// The first stage that failed or died, if one did: the counters are
    /// still complete, and the mirror reports it after them.
    pub failure: Option<super::PipelineError>,
}

impl Report {
    /// The counters document (`--print json` ends with it).
    pub fn to_json(&self) -> serde_json::Value {
        self.stages.json(self.kernel, self.table)
    }
}

/// The counters as lines of `name=value` pairs, one line per stage.
impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let stages = &self.stages;
        write!(f, "{}", stages.summary(self.kernel, self.table))?;
        write!(f, "\nserver: {}", stages.server)?;
        for (target, stats) in &stages.forwards {
            write!(
                f,
                "\nforward {target}: {}",
                flat_fields(&stats.to_json(target))
            )?;
        }
        if let Some(pcap) = &stages.pcap {
            let fields: Vec<String> = pcap
                .fields()
                .iter()
                .map(|(n, v)| format!("{n}={v}"))
                .collect();
            write!(f, "\npcap: {}", fields.join(" "))?;
        }
        Ok(())
    }
}

/// `name=value` pairs of a counters object, nested names joined by dots.
fn flat_fields(json: &serde_json::Value) -> String {
    let fields: Vec<String> = counters::flatten(json)
        .iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect();
    fields.join(" ")
}

//! What the mirror did, once every stage has stopped.

use std::fmt;

use crate::telemetry::registry::Document;

/// The final counters, and the first stage that failed.
pub struct Report {
    pub counters: Document,
    /// The first stage that failed or died, if one did: the counters are
    /// still complete, and the mirror reports it after them.
    pub failure: Option<super::PipelineError>,
}

impl Report {
    /// The counters document (`--print json` ends with it).
    pub fn to_json(&self) -> serde_json::Value {
        self.counters.to_json()
    }
}

/// The counters as lines of `name=value` pairs, one line per stage.
impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.counters.fmt(f)
    }
}

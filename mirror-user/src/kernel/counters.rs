//! The kernel programs' outcome counters (a per-CPU array), read on
//! demand and summed over CPUs.

use aya::maps::{MapData, MapError, PerCpuArray};
use mirror_common::{COUNTER_COUNT, Counter};
use serde::{Serialize, ser::SerializeMap};

use crate::telemetry::registry::Stage;

/// The counters map of the loaded programs.
pub struct KernelCounters {
    map: PerCpuArray<MapData, u64>,
}

impl KernelCounters {
    pub(super) fn new(map: PerCpuArray<MapData, u64>) -> Self {
        Self { map }
    }

    /// Sum over CPUs of every counter.
    pub fn read(&self) -> Result<KernelSnapshot, MapError> {
        let mut sums = [0u64; COUNTER_COUNT as usize];
        for counter in Counter::ALL {
            let per_cpu = self.map.get(&(counter as u32), 0)?;
            sums[counter as usize] = per_cpu.iter().sum();
        }
        Ok(KernelSnapshot::from_sums(sums))
    }
}

impl Stage for KernelCounters {
    type Snapshot = KernelSnapshot;

    fn snapshot(&self) -> KernelSnapshot {
        self.read().unwrap_or_else(|error| KernelSnapshot {
            error: Some(format!("cannot read the kernel counters: {error}")),
            ..KernelSnapshot::default()
        })
    }
}

/// The kernel counters at one moment: `{"seen": 7, "mirrored": 5, ...}`,
/// or `{"error": "..."}` alone when they could not be read (zeros would
/// look like a counter reset to Prometheus).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelSnapshot {
    sums: [u64; COUNTER_COUNT as usize],
    error: Option<String>,
}

impl KernelSnapshot {
    /// The counters from their sums over CPUs, in index order.
    pub const fn from_sums(sums: [u64; COUNTER_COUNT as usize]) -> Self {
        Self { sums, error: None }
    }

    pub const fn get(&self, counter: Counter) -> u64 {
        self.sums[counter as usize]
    }

    /// `(name, value)` in index order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Counter::ALL.iter().map(|c| (c.name(), self.get(*c)))
    }

    /// Counts since `earlier` (counters only grow).
    pub fn since(&self, earlier: &Self) -> Self {
        let mut delta = self.clone();
        for (value, before) in delta.sums.iter_mut().zip(earlier.sums) {
            *value = value.saturating_sub(before);
        }
        delta
    }
}

impl Serialize for KernelSnapshot {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        match &self.error {
            Some(error) => map.serialize_entry("error", error)?,
            None => {
                for (name, value) in self.iter() {
                    map.serialize_entry(name, &value)?;
                }
            }
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_subtracts_per_counter() {
        let mut before = KernelSnapshot::default();
        before.sums[Counter::Seen as usize] = 10;
        let mut after = before.clone();
        after.sums[Counter::Seen as usize] = 15;
        after.sums[Counter::Mirrored as usize] = 3;
        let delta = after.since(&before);
        assert_eq!(delta.get(Counter::Seen), 5);
        assert_eq!(delta.get(Counter::Mirrored), 3);
        assert_eq!(delta.get(Counter::RingFull), 0);
    }

    #[test]
    fn snapshot_names_every_counter() {
        let mut snapshot = KernelSnapshot::default();
        snapshot.sums[Counter::RingFull as usize] = 4;
        let json = serde_json::to_value(&snapshot).unwrap();
        for counter in Counter::ALL {
            assert!(json[counter.name()].is_u64(), "{}", counter.name());
        }
        assert_eq!(json["ring_full"], 4);
        assert!(json.get("error").is_none());
    }

    #[test]
    fn unreadable_counters_carry_no_numbers() {
        let snapshot = KernelSnapshot {
            error: Some("cannot read the kernel counters: gone".to_owned()),
            ..KernelSnapshot::default()
        };
        let json = serde_json::to_value(&snapshot).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"error": "cannot read the kernel counters: gone"})
        );
    }
}

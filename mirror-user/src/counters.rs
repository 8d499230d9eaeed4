//! Counters of every stage, summed over CPUs.

use std::{
    fmt,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::maps::{MapData, MapError, PerCpuArray};
use mirror_common::{COUNTER_COUNT, Counter};

/// The kernel programs' outcome counters, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelCounters([u64; COUNTER_COUNT as usize]);

impl KernelCounters {
    pub(crate) fn read(map: &PerCpuArray<MapData, u64>) -> Result<Self, MapError> {
        let mut sums = [0u64; COUNTER_COUNT as usize];
        for counter in Counter::ALL {
            let per_cpu = map.get(&(counter as u32), 0)?;
            sums[counter as usize] = per_cpu.iter().sum();
        }
        Ok(Self(sums))
    }

    pub const fn get(&self, counter: Counter) -> u64 {
        self.0[counter as usize]
    }

    /// `(name, value)` in index order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Counter::ALL.iter().map(|c| (c.name(), self.get(*c)))
    }

    /// Counts since `earlier` (counters only grow).
    pub fn since(&self, earlier: &Self) -> Self {
        let mut delta = *self;
        for (value, before) in delta.0.iter_mut().zip(earlier.0) {
            *value = value.saturating_sub(before);
        }
        delta
    }
}

/// Userspace side of the ring stage, shared by the drain tasks.
#[derive(Debug, Default)]
pub struct DrainCounters {
    /// Records read out of the rings.
    pub records: AtomicU64,
    /// Packet bytes in those records.
    pub bytes: AtomicU64,
    /// Records that could not be decoded (a bug, never bad traffic).
    pub undecodable: AtomicU64,
}

impl DrainCounters {
    pub fn snapshot(&self) -> DrainSnapshot {
        DrainSnapshot {
            records: self.records.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            undecodable: self.undecodable.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainSnapshot {
    pub records: u64,
    pub bytes: u64,
    pub undecodable: u64,
}

/// Everything printed at exit.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub kernel: KernelCounters,
    pub drain: DrainSnapshot,
}

impl Summary {
    pub fn to_json(&self) -> serde_json::Value {
        let mut kernel = serde_json::Map::new();
        for (name, value) in self.kernel.iter() {
            kernel.insert(name.to_owned(), value.into());
        }
        serde_json::json!({
            "kind": "counters",
            "kernel": kernel,
            "drain": {
                "records": self.drain.records,
                "bytes": self.drain.bytes,
                "undecodable": self.drain.undecodable,
            },
        })
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "kernel:")?;
        for (name, value) in self.kernel.iter() {
            write!(f, " {name}={value}")?;
        }
        write!(
            f,
            "\ndrain: records={} bytes={} undecodable={}",
            self.drain.records, self.drain.bytes, self.drain.undecodable
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_subtracts_per_counter() {
        let mut before = KernelCounters::default();
        before.0[Counter::Seen as usize] = 10;
        let mut after = before;
        after.0[Counter::Seen as usize] = 15;
        after.0[Counter::Mirrored as usize] = 3;
        let delta = after.since(&before);
        assert_eq!(delta.get(Counter::Seen), 5);
        assert_eq!(delta.get(Counter::Mirrored), 3);
        assert_eq!(delta.get(Counter::RingFull), 0);
    }

    #[test]
    fn summary_json_names_every_counter() {
        let mut kernel = KernelCounters::default();
        kernel.0[Counter::RingFull as usize] = 4;
        let summary = Summary {
            kernel,
            drain: DrainSnapshot {
                records: 1,
                bytes: 2,
                undecodable: 0,
            },
        };
        let json = summary.to_json();
        assert_eq!(json["kind"], "counters");
        for counter in Counter::ALL {
            assert!(
                json["kernel"][counter.name()].is_u64(),
                "{}",
                counter.name()
            );
        }
        assert_eq!(json["kernel"]["ring_full"], 4);
        assert_eq!(json["drain"]["bytes"], 2);
        assert!(summary.to_string().contains("ring_full=4"));
    }
}

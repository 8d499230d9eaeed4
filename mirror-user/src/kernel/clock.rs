//! Turning the kernel's `CLOCK_BOOTTIME` timestamps into wall-clock time.

use nix::time::{ClockId, clock_gettime};

/// Offset between `CLOCK_REALTIME` and `CLOCK_BOOTTIME`, read once: records
/// then cost an addition, like xdpdump does. A wall-clock step while the
/// mirror runs is not followed.
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    offset_ns: i128,
}

impl WallClock {
    pub fn new() -> Self {
        let boot = clock_ns(ClockId::CLOCK_BOOTTIME);
        let real = clock_ns(ClockId::CLOCK_REALTIME);
        Self {
            offset_ns: real - boot,
        }
    }

    /// Nanoseconds since the Unix epoch of a `CLOCK_BOOTTIME` timestamp.
    pub fn unix_ns(&self, boot_ns: u64) -> u64 {
        (i128::from(boot_ns) + self.offset_ns).max(0) as u64
    }
}

impl Default for WallClock {
    fn default() -> Self {
        Self::new()
    }
}

/// `CLOCK_BOOTTIME` now, in nanoseconds: the clock of the records'
/// timestamps (`bpf_ktime_get_boot_ns`).
pub fn boot_ns() -> u64 {
    clock_ns(ClockId::CLOCK_BOOTTIME).max(0) as u64
}

fn clock_ns(clock: ClockId) -> i128 {
    // Both clocks exist on every Linux the mirror runs on.
    let ts = clock_gettime(clock).expect("CLOCK_BOOTTIME and CLOCK_REALTIME exist");
    i128::from(ts.tv_sec()) * 1_000_000_000 + i128::from(ts.tv_nsec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_time_now_maps_to_wall_time_now() {
        let clock = WallClock::new();
        let boot_now = clock_ns(ClockId::CLOCK_BOOTTIME) as u64;
        let wall_now = clock_ns(ClockId::CLOCK_REALTIME) as u64;
        let mapped = clock.unix_ns(boot_now);
        assert!(
            mapped.abs_diff(wall_now) < 1_000_000_000,
            "{mapped} vs {wall_now}"
        );
    }
}

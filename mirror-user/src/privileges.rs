//! Checking, before any BPF call, that the process may load and attach
//! programs, so that the user gets one clear sentence instead of EPERM.

use std::{fs, io};

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error(
        "mirror needs root, or the capabilities CAP_BPF and CAP_NET_ADMIN (this process lacks {missing}): run it with sudo, or grant them with `setcap cap_bpf,cap_net_admin+ep <path to mirror>`"
    )]
    Missing { missing: String },
    #[error("cannot read this process's capabilities from /proc/self/status: {0}")]
    Unreadable(#[source] io::Error),
}

/// Succeeds when the effective capabilities allow loading and attaching
/// networking BPF programs: CAP_BPF with CAP_NET_ADMIN, or CAP_SYS_ADMIN
/// (which kernels before 5.8 require and later ones still accept).
pub fn check() -> Result<(), PrivilegeError> {
    let status = fs::read_to_string("/proc/self/status").map_err(PrivilegeError::Unreadable)?;
    let effective = parse_cap_eff(&status).ok_or_else(|| {
        PrivilegeError::Unreadable(io::Error::new(io::ErrorKind::InvalidData, "no CapEff line"))
    })?;
    missing_capabilities(effective)
        .map_or(Ok(()), |missing| Err(PrivilegeError::Missing { missing }))
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    let line = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))?;
    u64::from_str_radix(line.trim(), 16).ok()
}

/// Names of the capabilities that are missing, or `None` when enough are held.
fn missing_capabilities(effective: u64) -> Option<String> {
    let has = |cap: u32| effective & (1u64 << cap) != 0;
    if has(CAP_SYS_ADMIN) && has(CAP_NET_ADMIN) {
        return None;
    }
    let missing: Vec<&str> = [(CAP_BPF, "CAP_BPF"), (CAP_NET_ADMIN, "CAP_NET_ADMIN")]
        .into_iter()
        .filter(|(cap, _)| !has(*cap))
        .map(|(_, name)| name)
        .collect();
    (!missing.is_empty()).then(|| missing.join(" and "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_effective_set() {
        let status = "Name:\tmirror\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(status), Some(0x1ff_ffff_ffff));
        assert_eq!(parse_cap_eff("Name:\tx\n"), None);
    }

    #[test]
    fn decides_from_the_capability_bits() {
        let bit = |cap: u32| 1u64 << cap;
        assert_eq!(missing_capabilities(u64::MAX), None);
        assert_eq!(
            missing_capabilities(bit(CAP_BPF) | bit(CAP_NET_ADMIN)),
            None
        );
        assert_eq!(
            missing_capabilities(bit(CAP_SYS_ADMIN) | bit(CAP_NET_ADMIN)),
            None
        );
        assert_eq!(
            missing_capabilities(0).as_deref(),
            Some("CAP_BPF and CAP_NET_ADMIN")
        );
        assert_eq!(
            missing_capabilities(bit(CAP_BPF)).as_deref(),
            Some("CAP_NET_ADMIN")
        );
    }
}

//! Privileges: checking, before any BPF call, that the process may load
//! and attach programs (one clear sentence instead of EPERM), and giving
//! them up once the programs are attached, the sockets bound and the files
//! opened, as tcpdump's `-Z` does.
//!
//! The open map, ring and link descriptors keep working after the drop
//! (the kernel checks privileges when a BPF object is created or a
//! descriptor obtained, not when an open one is used), so runtime port
//! changes go through the open port map. What still needs a privilege
//! later is done by the privileged helper ([`crate::kernel::privileged_helper`]).

use std::{ffi::CString, fs, io};

use nix::unistd::{Gid, Uid, User};

use crate::files::{OutputDir, OutputDirError, Owner};

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error(
        "mirror needs root, or the capabilities CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (this process lacks {missing}): run it with sudo"
    )]
    Missing { missing: String },
    #[error("cannot read this process's capabilities from /proc/self/status: {0}")]
    Unreadable(#[source] io::Error),
    #[error(
        "there is no user named '{0}' on this machine: pass --user with an existing user (the mirror runs as that user once attached), or --user root to keep root"
    )]
    NoSuchUser(String),
    #[error(
        "--user {0} needs mirror to start as root; without root it keeps the user that started it"
    )]
    NotRoot(String),
    #[error("cannot give up root to become {user}: {source}")]
    Drop {
        user: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "giving up privileges did not take (thread {thread}: {what}); mirror stops rather than run privileged"
    )]
    StillPrivileged { thread: String, what: String },
}

/// Succeeds when the effective capabilities allow loading and attaching
/// networking BPF programs: CAP_BPF and CAP_PERFMON with CAP_NET_ADMIN, or
/// CAP_SYS_ADMIN (which kernels before 5.8 require and later ones still
/// accept). Without CAP_PERFMON the verifier refuses the programs' packet
/// pointer arithmetic ("prohibited for !root"), which would read as a bug
/// in the build rather than a missing capability.
pub fn check() -> Result<(), PrivilegeError> {
    let status = fs::read_to_string("/proc/self/status").map_err(PrivilegeError::Unreadable)?;
    let effective = parse_cap_eff(&status).ok_or_else(|| {
        PrivilegeError::Unreadable(io::Error::new(io::ErrorKind::InvalidData, "no CapEff line"))
    })?;
    missing_capabilities(effective)
        .map_or(Ok(()), |missing| Err(PrivilegeError::Missing { missing }))
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    parse_hex_field(status, "CapEff:")
}

/// Names of the capabilities that are missing, or `None` when enough are held.
fn missing_capabilities(effective: u64) -> Option<String> {
    let has = |cap: u32| effective & (1u64 << cap) != 0;
    if has(CAP_SYS_ADMIN) && has(CAP_NET_ADMIN) {
        return None;
    }
    let missing: Vec<&str> = [
        (CAP_BPF, "CAP_BPF"),
        (CAP_PERFMON, "CAP_PERFMON"),
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
    ]
    .into_iter()
    .filter(|(cap, _)| !has(*cap))
    .map(|(_, name)| name)
    .collect();
    (!missing.is_empty()).then(|| missing.join(" and "))
}

/// Who the mirror is once its privileged start is done.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The user's name, for messages.
    pub name: String,
    plan: Plan,
}

#[derive(Debug, Clone)]
enum Plan {
    /// Started as root: become this user, with no capability left.
    Become {
        uid: Uid,
        gid: Gid,
        groups: Vec<Gid>,
    },
    /// `--user root`: stay root (with a warning).
    KeepRoot,
    /// Started as another user with capabilities: keep the user, clear
    /// every capability.
    ClearCapabilities,
}

/// The user name the mirror becomes by default when started as root, as
/// tcpdump becomes `tcpdump`.
pub const DEFAULT_USER: &str = "nobody";

impl Identity {
    /// Whom to become: `user`, or [`DEFAULT_USER`] when started as root.
    pub fn resolve(user: Option<&str>) -> Result<Self, PrivilegeError> {
        let started_as_root = Uid::effective().is_root();
        if !started_as_root {
            let current = User::from_uid(Uid::current())
                .ok()
                .flatten()
                .map_or_else(|| Uid::current().to_string(), |u| u.name);
            if let Some(user) = user
                && user != current
            {
                return Err(PrivilegeError::NotRoot(user.to_owned()));
            }
            return Ok(Self {
                name: current,
                plan: Plan::ClearCapabilities,
            });
        }
        let name = user.unwrap_or(DEFAULT_USER);
        let found = User::from_name(name)
            .ok()
            .flatten()
            .ok_or_else(|| PrivilegeError::NoSuchUser(name.to_owned()))?;
        let plan = if found.uid.is_root() {
            Plan::KeepRoot
        } else {
            let name = CString::new(found.name.as_str())
                .map_err(|_| PrivilegeError::NoSuchUser(found.name.clone()))?;
            Plan::Become {
                uid: found.uid,
                gid: found.gid,
                groups: nix::unistd::getgrouplist(&name, found.gid).unwrap_or_default(),
            }
        };
        Ok(Self {
            name: found.name,
            plan,
        })
    }

    /// Who should own files and directories created before the drop.
    pub fn owner(&self) -> Option<Owner> {
        match self.plan {
            Plan::Become { uid, gid, .. } => Some(Owner { uid, gid }),
            Plan::KeepRoot | Plan::ClearCapabilities => None,
        }
    }

    /// Fails unless the user the mirror becomes may create files in `dir`
    /// (checked before anything is created there).
    pub fn check_may_write(&self, dir: &OutputDir) -> Result<(), OutputDirError> {
        match &self.plan {
            Plan::Become { uid, gid, groups } => dir.check_writable_by(
                Owner {
                    uid: *uid,
                    gid: *gid,
                },
                groups,
                &self.name,
            ),
            Plan::KeepRoot | Plan::ClearCapabilities => Ok(()),
        }
    }

    /// Gives up root (or every capability) for good, then checks every
    /// thread of the process.
    ///
    /// Capability sets, the bounding set and no_new_privs are per thread,
    /// and only the uid change reaches every thread (glibc applies it to
    /// all): call this while the process has one thread (checked).
    pub fn assume(&self) -> Result<(), PrivilegeError> {
        let failed = |source: io::Error| PrivilegeError::Drop {
            user: self.name.clone(),
            source,
        };
        let caps_failed =
            |error: caps::errors::CapsError| failed(io::Error::other(error.to_string()));
        match self.plan {
            Plan::KeepRoot => {
                tracing::warn!(
                    "--user root: the mirror keeps running as root after attaching; any flaw in it then has the whole machine"
                );
                return Ok(());
            }
            Plan::Become { uid, gid, .. } => {
                // While still root: nothing may come back through the
                // bounding, ambient or inheritable sets.
                caps::clear(None, caps::CapSet::Bounding).map_err(caps_failed)?;
                caps::clear(None, caps::CapSet::Ambient).map_err(caps_failed)?;
                caps::clear(None, caps::CapSet::Inheritable).map_err(caps_failed)?;
                let name = CString::new(self.name.as_str())
                    .map_err(|_| failed(io::Error::other("the user name has a NUL byte")))?;
                nix::unistd::initgroups(&name, gid).map_err(|e| failed(e.into()))?;
                nix::unistd::setresgid(gid, gid, gid).map_err(|e| failed(e.into()))?;
                // Leaving uid 0 clears the permitted, effective and ambient
                // sets of every thread (glibc changes the uid of all of them).
                nix::unistd::setresuid(uid, uid, uid).map_err(|e| failed(e.into()))?;
            }
            Plan::ClearCapabilities => {
                for set in [
                    caps::CapSet::Ambient,
                    caps::CapSet::Inheritable,
                    caps::CapSet::Effective,
                    caps::CapSet::Permitted,
                ] {
                    caps::clear(None, set).map_err(caps_failed)?;
                }
            }
        }
        nix::sys::prctl::set_no_new_privs().map_err(|e| failed(e.into()))?;
        self.check_every_thread()
    }

    fn check_every_thread(&self) -> Result<(), PrivilegeError> {
        let tasks = fs::read_dir("/proc/self/task").map_err(PrivilegeError::Unreadable)?;
        for task in tasks {
            let task = task.map_err(PrivilegeError::Unreadable)?;
            let thread = task.file_name().to_string_lossy().into_owned();
            let Ok(status) = fs::read_to_string(task.path().join("status")) else {
                // The thread ended meanwhile.
                continue;
            };
            let still = |what: String| PrivilegeError::StillPrivileged {
                thread: thread.clone(),
                what,
            };
            // The bounding set can only be emptied by root, and it and
            // no_new_privs are per thread: a thread started before the drop
            // keeps them.
            let emptied: &[&str] = match self.plan {
                Plan::Become { .. } => &["CapEff:", "CapPrm:", "CapAmb:", "CapBnd:"],
                _ => &["CapEff:", "CapPrm:", "CapAmb:"],
            };
            for field in emptied {
                match parse_hex_field(&status, field) {
                    Some(0) => {}
                    other => return Err(still(format!("{field} {other:x?}"))),
                }
            }
            match parse_hex_field(&status, "NoNewPrivs:") {
                Some(1) => {}
                other => return Err(still(format!("NoNewPrivs: {other:x?}"))),
            }
            if let Plan::Become { uid, .. } = &self.plan {
                let uids = status
                    .lines()
                    .find_map(|line| line.strip_prefix("Uid:"))
                    .unwrap_or_default();
                if !uids
                    .split_whitespace()
                    .all(|id| id == uid.as_raw().to_string())
                {
                    return Err(still(format!("Uid: {uids}")));
                }
            }
        }
        Ok(())
    }
}

fn parse_hex_field(status: &str, field: &str) -> Option<u64> {
    let value = status.lines().find_map(|line| line.strip_prefix(field))?;
    u64::from_str_radix(value.trim(), 16).ok()
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
            missing_capabilities(bit(CAP_BPF) | bit(CAP_PERFMON) | bit(CAP_NET_ADMIN)),
            None
        );
        assert_eq!(
            missing_capabilities(bit(CAP_BPF) | bit(CAP_NET_ADMIN)).as_deref(),
            Some("CAP_PERFMON")
        );
        assert_eq!(
            missing_capabilities(bit(CAP_SYS_ADMIN) | bit(CAP_NET_ADMIN)),
            None
        );
        assert_eq!(
            missing_capabilities(0).as_deref(),
            Some("CAP_BPF and CAP_PERFMON and CAP_NET_ADMIN")
        );
        assert_eq!(
            missing_capabilities(bit(CAP_BPF) | bit(CAP_PERFMON)).as_deref(),
            Some("CAP_NET_ADMIN")
        );
    }
}

//! Which ports are mirrored, and why: the command line (always), `ports
//! add` (until `ports remove`), and subscribed sessions (while subscribed).
//! A port is in the kernel's port map while any of them holds it.
//!
//! Policy: ports already mirrored may be subscribed by any client; any
//! other port must be inside `--allow-ports` (default: none).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    ops::RangeInclusive,
};

/// Ranges of ports clients may add (`--allow-ports 8000-8100,9000`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList(Vec<RangeInclusive<u16>>);

impl AllowList {
    pub fn contains(&self, port: u16) -> bool {
        self.0.iter().any(|range| range.contains(&port))
    }

    pub fn extend(&mut self, other: Self) {
        self.0.extend(other.0);
    }

    /// Parses `8000-8100,9000` (ranges and single ports, comma-separated).
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad =
            || format!("'{text}' is not a port list: use ports and ranges such as 8000-8100,9000");
        let mut ranges = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (low, high) = part.split_once('-').unwrap_or((part, part));
            let low: u16 = low.trim().parse().map_err(|_| bad())?;
            let high: u16 = high.trim().parse().map_err(|_| bad())?;
            if low == 0 || low > high {
                return Err(bad());
            }
            ranges.push(low..=high);
        }
        if ranges.is_empty() {
            return Err(bad());
        }
        Ok(Self(ranges))
    }
}

impl fmt::Display for AllowList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|r| {
                if r.start() == r.end() {
                    r.start().to_string()
                } else {
                    format!("{}-{}", r.start(), r.end())
                }
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

/// One mirrored port and why it is mirrored (`mirror ports list`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortInfo {
    pub port: u16,
    /// Given on the mirror's command line: always mirrored.
    pub command_line: bool,
    /// Added with `AddPort`.
    pub added: bool,
    /// Sessions subscribed to it.
    pub subscribers: u32,
}

/// A client session of the subscriber server.
pub type SessionId = u64;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PolicyError {
    #[error("port {port} is not mirrored and not in the mirror's --allow-ports ({allowed})")]
    NotAllowed { port: u16, allowed: String },
    #[error("a client may subscribe to at most {max} ports")]
    TooManyPorts { max: usize },
    #[error("port {0} is given on the mirror's command line and is always mirrored")]
    CommandLine(u16),
    #[error("port {0} was not added with `mirror ports add`")]
    NotAdded(u16),
}

#[derive(Debug, Default, Clone)]
struct Holders {
    command_line: bool,
    added: bool,
    sessions: BTreeSet<SessionId>,
}

impl Holders {
    fn held(&self) -> bool {
        self.command_line || self.added || !self.sessions.is_empty()
    }
}

/// The mirror's ports and who holds each.
#[derive(Debug)]
pub struct PortRegistry {
    ports: BTreeMap<u16, Holders>,
    sessions: HashMap<SessionId, BTreeSet<u16>>,
    allow: AllowList,
    max_ports_per_session: usize,
}

impl PortRegistry {
    pub fn new(command_line: &[u16], allow: AllowList, max_ports_per_session: usize) -> Self {
        let ports = command_line
            .iter()
            .map(|port| {
                (
                    *port,
                    Holders {
                        command_line: true,
                        ..Holders::default()
                    },
                )
            })
            .collect();
        Self {
            ports,
            sessions: HashMap::new(),
            allow,
            max_ports_per_session,
        }
    }

    pub fn is_active(&self, port: u16) -> bool {
        self.ports.get(&port).is_some_and(Holders::held)
    }

    fn check_allowed(&self, port: u16) -> Result<(), PolicyError> {
        if self.is_active(port) || self.allow.contains(port) {
            Ok(())
        } else {
            Err(PolicyError::NotAllowed {
                port,
                allowed: self.allow.to_string(),
            })
        }
    }

    /// Subscribes `session` to `ports`, all or none; returns the ports that
    /// became mirrored (to add to the kernel map).
    pub fn subscribe(
        &mut self,
        session: SessionId,
        ports: &[u16],
    ) -> Result<Vec<u16>, PolicyError> {
        for port in ports {
            self.check_allowed(*port)?;
        }
        let held = self.sessions.get(&session).cloned().unwrap_or_default();
        let total = held.union(&ports.iter().copied().collect()).count();
        if total > self.max_ports_per_session {
            return Err(PolicyError::TooManyPorts {
                max: self.max_ports_per_session,
            });
        }
        let mut activated = Vec::new();
        for port in ports {
            let holders = self.ports.entry(*port).or_default();
            if !holders.held() {
                activated.push(*port);
            }
            holders.sessions.insert(session);
            self.sessions.entry(session).or_default().insert(*port);
        }
        Ok(activated)
    }

    /// Returns the ports no longer mirrored (to remove from the kernel map).
    pub fn unsubscribe(&mut self, session: SessionId, ports: &[u16]) -> Vec<u16> {
        let mut deactivated = Vec::new();
        for port in ports {
            if let Some(held) = self.sessions.get_mut(&session) {
                held.remove(port);
            }
            if let Some(holders) = self.ports.get_mut(port) {
                holders.sessions.remove(&session);
                if !holders.held() {
                    self.ports.remove(port);
                    deactivated.push(*port);
                }
            }
        }
        deactivated
    }

    /// The session ended: releases everything it held.
    pub fn end_session(&mut self, session: SessionId) -> Vec<u16> {
        let ports: Vec<u16> = self
            .sessions
            .remove(&session)
            .map(|ports| ports.into_iter().collect())
            .unwrap_or_default();
        self.unsubscribe(session, &ports)
    }

    /// `ports add`: true when the port became mirrored.
    pub fn add(&mut self, port: u16) -> Result<bool, PolicyError> {
        self.check_allowed(port)?;
        let holders = self.ports.entry(port).or_default();
        let activated = !holders.held();
        holders.added = true;
        Ok(activated)
    }

    /// `ports remove`: true when the port stopped being mirrored.
    pub fn remove(&mut self, port: u16) -> Result<bool, PolicyError> {
        let holders = self
            .ports
            .get_mut(&port)
            .ok_or(PolicyError::NotAdded(port))?;
        if holders.command_line {
            return Err(PolicyError::CommandLine(port));
        }
        if !holders.added {
            return Err(PolicyError::NotAdded(port));
        }
        holders.added = false;
        if holders.held() {
            Ok(false)
        } else {
            self.ports.remove(&port);
            Ok(true)
        }
    }

    /// The mirror's own ports (command line and added), which its
    /// in-process consumers (`--print`, `--dump-dir`) follow.
    pub fn own_ports(&self) -> Vec<u16> {
        self.ports
            .iter()
            .filter(|(_, h)| h.command_line || h.added)
            .map(|(port, _)| *port)
            .collect()
    }

    pub fn list(&self) -> Vec<PortInfo> {
        self.ports
            .iter()
            .map(|(port, h)| PortInfo {
                port: *port,
                command_line: h.command_line,
                added: h.added,
                subscribers: h.sessions.len() as u32,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> PortRegistry {
        PortRegistry::new(&[80], AllowList::parse("8000-8002,9000").unwrap(), 3)
    }

    #[test]
    fn allow_lists_parse_and_print() {
        let allow = AllowList::parse(" 8000-8002, 9000 ").unwrap();
        assert!(allow.contains(8001) && allow.contains(9000) && !allow.contains(8003));
        assert_eq!(allow.to_string(), "8000-8002,9000");
        for bad in ["", "0", "9-1", "x", "1-2-3", "70000"] {
            assert!(AllowList::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(AllowList::default().to_string(), "none");
    }

    #[test]
    fn command_line_ports_are_always_mirrored() {
        let mut r = registry();
        assert!(r.is_active(80));
        assert_eq!(
            r.subscribe(1, &[80]).unwrap(),
            Vec::<u16>::new(),
            "already mirrored"
        );
        assert_eq!(
            r.end_session(1),
            Vec::<u16>::new(),
            "still on the command line"
        );
        assert!(r.is_active(80));
        assert_eq!(r.remove(80), Err(PolicyError::CommandLine(80)));
    }

    #[test]
    fn subscriptions_are_counted_per_session() {
        let mut r = registry();
        assert_eq!(r.subscribe(1, &[8000]).unwrap(), [8000]);
        assert_eq!(r.subscribe(2, &[8000]).unwrap(), Vec::<u16>::new());
        assert_eq!(
            r.unsubscribe(1, &[8000]),
            Vec::<u16>::new(),
            "session 2 holds it"
        );
        assert_eq!(r.end_session(2), [8000], "the last holder left");
        assert!(!r.is_active(8000));
        assert_eq!(r.list().len(), 1);
    }

    #[test]
    fn ports_outside_the_allow_list_are_refused_whole() {
        let mut r = registry();
        let err = r.subscribe(1, &[8001, 22]).unwrap_err();
        assert_eq!(
            err,
            PolicyError::NotAllowed {
                port: 22,
                allowed: "8000-8002,9000".into()
            }
        );
        assert!(
            !r.is_active(8001),
            "nothing of a refused request is applied"
        );
        assert!(err.to_string().contains("--allow-ports"));
        assert!(r.add(22).is_err());
    }

    #[test]
    fn a_session_has_a_port_limit() {
        let mut r = registry();
        r.subscribe(1, &[80, 8000]).unwrap();
        r.subscribe(1, &[8000, 8001]).unwrap();
        assert_eq!(
            r.subscribe(1, &[8002]),
            Err(PolicyError::TooManyPorts { max: 3 })
        );
        assert!(r.subscribe(2, &[8002]).is_ok(), "the limit is per session");
    }

    #[test]
    fn added_ports_stay_until_removed() {
        let mut r = registry();
        assert_eq!(r.add(9000), Ok(true));
        assert_eq!(r.add(9000), Ok(false));
        r.subscribe(1, &[9000]).unwrap();
        assert_eq!(r.own_ports(), [80, 9000]);
        assert_eq!(r.remove(9000), Ok(false), "a session still holds it");
        assert_eq!(r.own_ports(), [80]);
        assert_eq!(r.end_session(1), [9000]);
        assert_eq!(r.remove(9000), Err(PolicyError::NotAdded(9000)));
        let info = r.list();
        assert_eq!(
            info,
            [PortInfo {
                port: 80,
                command_line: true,
                added: false,
                subscribers: 0
            }]
        );
    }

    #[test]
    fn only_added_ports_can_be_removed() {
        let mut r = registry();
        assert_eq!(r.remove(80), Err(PolicyError::CommandLine(80)));
        // Added on top of the command line: still the command line's.
        assert_eq!(r.add(80), Ok(false));
        assert_eq!(r.remove(80), Err(PolicyError::CommandLine(80)));
        assert!(r.is_active(80));
        // Held only by a subscription: not added, not removable.
        r.subscribe(1, &[8000]).unwrap();
        assert_eq!(r.remove(8000), Err(PolicyError::NotAdded(8000)));
        assert!(r.is_active(8000));
        assert_eq!(r.remove(8001), Err(PolicyError::NotAdded(8001)));
    }

    #[test]
    fn a_session_releases_only_its_own_holds() {
        let mut r = registry();
        r.subscribe(1, &[8000]).unwrap();
        // Session 2 never held 8000: unsubscribing it, or ending, leaves
        // session 1's hold alone, however often it tries.
        for _ in 0..3 {
            assert_eq!(r.unsubscribe(2, &[8000, 80, 8001]), Vec::<u16>::new());
        }
        assert_eq!(r.end_session(2), Vec::<u16>::new());
        assert!(r.is_active(8000));
        assert_eq!(r.list()[1].subscribers, 1);
        // Session 1 unsubscribing twice releases once.
        assert_eq!(r.unsubscribe(1, &[8000, 8000]), [8000]);
        assert_eq!(r.unsubscribe(1, &[8000]), Vec::<u16>::new());
    }

    #[test]
    fn removing_an_added_port_keeps_it_while_a_session_holds_it() {
        let mut r = registry();
        r.subscribe(1, &[9000]).unwrap();
        assert_eq!(r.add(9000), Ok(false), "already mirrored");
        // Another client removes it: allowed (it was added), but the
        // subscription keeps it mirrored.
        assert_eq!(r.remove(9000), Ok(false));
        assert!(r.is_active(9000));
        assert_eq!(r.remove(9000), Err(PolicyError::NotAdded(9000)));
        assert_eq!(r.end_session(1), [9000]);
    }
}

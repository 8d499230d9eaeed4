//! The clsact fallback (kernels without TCX): where the mirror's filter goes
//! among the filters already on the interface, and whether a filter is still
//! the mirror's before it is deleted.
//!
//! The clsact ingress hook runs its chain-0 filters by priority, lowest
//! number first, and stops at the first verdict. Filters of one priority
//! share one classifier instance, which has one kind and one protocol: the
//! kernel refuses another kind ("Specified filter kind does not match
//! existing one") or protocol ("Protocol mismatch for filter with specified
//! priority") there. Within a `bpf` instance the filter added last runs
//! first (cls_bpf links a new filter at the head of its list; measured on
//! Linux 6.18: of two `prio 1` bpf filters, the later one sees each packet
//! first, and an OK verdict from it hides the packet from the older one).
//! Priority 0 means "let the kernel choose", and the kernel then chooses
//! 49152 or one below the lowest priority above 32767, so behind a filter at
//! priority 1.
//!
//! Hence the mirror takes priority 1, the first there is: alone when it is
//! free, or as the newest filter of a `bpf` / all-protocols instance there,
//! which puts it at the head of that instance. Anything else at priority 1
//! would run before it, so the mirror refuses to attach rather than
//! silently watch only what that filter lets through.
//!
//! The clsact qdisc itself goes with the mirror when the mirror added it:
//! a node owner's `tc qdisc add dev IF clsact` must not fail afterwards
//! ("Exclusivity flag on"). See [`remove_qdisc_if_unused`] for when.
//!
//! aya attaches and detaches clsact filters but cannot list them, so the
//! dumps (RTM_GETTFILTER, RTM_GETCHAIN) and the qdisc's removal
//! (RTM_DELQDISC) go through the rust-netlink crates.

use std::{collections::HashSet, fmt, io, time::Duration};

use aya::programs::{Link as _, TcAttachType, tc::SchedClassifierLink};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkBuffer, NetlinkHeader, NetlinkMessage,
    NetlinkPayload, Parseable as _,
};
use netlink_packet_route::{
    RouteNetlinkMessage,
    tc::{TcAttribute, TcFilterBpfOption, TcHandle, TcHeader, TcMessage, TcOption},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use serde::{Deserialize, Serialize};

/// The clsact filter the mirror attached (priority and handle identify it
/// among the interface's filters at its hook; the program id tells whether
/// it is still the mirror's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClsactFilter {
    pub ifindex: u32,
    /// Ingress or egress.
    #[serde(default)]
    pub hook: Hook,
    pub priority: u16,
    pub handle: u32,
    pub program_id: u32,
    /// The mirror added the interface's clsact qdisc (there was none): it
    /// goes too, once nothing else uses it.
    pub added_qdisc: bool,
}

/// The two hooks of a clsact qdisc (and of TCX). The clsact egress hook
/// runs its filters exactly as ingress does (by priority, one kind and
/// protocol per priority, the newest `bpf` filter of a priority first), so
/// the mirror takes the same place at both.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Hook {
    #[default]
    Ingress,
    Egress,
}

impl Hook {
    pub const fn attach_type(self) -> TcAttachType {
        match self {
            Self::Ingress => TcAttachType::Ingress,
            Self::Egress => TcAttachType::Egress,
        }
    }

    /// As `tc` spells it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        }
    }

    const fn parent(self) -> TcHandle {
        TcHandle {
            major: TcHandle::CLSACT.major,
            minor: match self {
                Self::Ingress => TcHandle::MIN_INGRESS,
                Self::Egress => TcHandle::MIN_EGRESS,
            },
        }
    }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The priority of the mirror's filter: the first one.
pub const PRIORITY: u16 = 1;

/// ETH_P_ALL: aya attaches every filter for all protocols.
const ALL_PROTOCOLS: u16 = 0x0003;

/// The mirror's filter takes the first free handle from here: far from the
/// small numbers the kernel and tools hand out (1, 2, ...), so that a tool
/// that replaces "its" `prio 1 handle 1` never replaces the mirror's filter.
const HANDLE_BASE: u32 = 0x6d69_7200;
const HANDLE_CHOICES: u32 = 16;

/// A dump that takes longer than this has gone wrong.
const DUMP_TIMEOUT: Duration = Duration::from_secs(5);

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWTFILTER: u16 = 44;
const RTM_NEWCHAIN: u16 = 100;

/// The clsact qdisc's own handle, `ffff:`.
const QDISC_HANDLE: TcHandle = TcHandle {
    major: 0xffff,
    minor: 0,
};
const QDISC_KIND: &str = "clsact";

/// A filter in chain 0 of a clsact hook, as the kernel lists it (every
/// priority also shows once with handle 0: the classifier instance).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub priority: u16,
    /// EtherType it applies to, host order (3: all).
    pub protocol: u16,
    pub handle: u32,
    /// `bpf`, `flower`, `u32`, ...; empty when the kernel's message could
    /// not be read.
    pub kind: String,
    /// The BPF program of a `bpf` filter.
    pub program_id: Option<u32>,
    /// The name of that program, as the filter shows it.
    pub program_name: Option<String>,
}

/// What keeps the mirror's filter from running first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Occupied {
    /// Priority 1 holds filters the mirror cannot join.
    Classifier { kind: String, protocol: u16 },
    /// Every handle the mirror could take at priority 1 is taken.
    Handles,
}

impl fmt::Display for Occupied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Classifier { kind, protocol } => {
                let kind = if kind.is_empty() { "unreadable" } else { kind };
                if *protocol == ALL_PROTOCOLS {
                    write!(f, "a {kind} filter")
                } else {
                    write!(f, "a {kind} filter for protocol {protocol:#06x}")
                }
            }
            Self::Handles => write!(
                f,
                "{HANDLE_CHOICES} filters with handles {HANDLE_BASE:#x} and up"
            ),
        }
    }
}

/// The handle of the mirror's filter at [`PRIORITY`], given the filters
/// there are (without leftovers of an earlier mirror).
pub fn placement(filters: &[Filter]) -> Result<u32, Occupied> {
    let first: Vec<&Filter> = filters.iter().filter(|f| f.priority == PRIORITY).collect();
    if let Some(filter) = first.first()
        && (filter.kind != "bpf" || filter.protocol != ALL_PROTOCOLS)
    {
        return Err(Occupied::Classifier {
            kind: filter.kind.clone(),
            protocol: filter.protocol,
        });
    }
    (HANDLE_BASE..HANDLE_BASE + HANDLE_CHOICES)
        .find(|handle| first.iter().all(|f| f.handle != *handle))
        .ok_or(Occupied::Handles)
}

/// What became of the mirror's filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    /// Still there, running the mirror's program.
    Ours,
    /// Its priority and handle run another program: someone replaced it,
    /// and the filter is theirs.
    Replaced,
    /// Nothing has its priority and handle any more.
    Gone,
}

fn find(filter: &ClsactFilter) -> io::Result<Found> {
    let filters = filters(filter.ifindex, filter.hook)?;
    let same = filters
        .iter()
        .find(|f| f.priority == filter.priority && f.handle == filter.handle);
    Ok(match same {
        Some(f) if f.program_id == Some(filter.program_id) => Found::Ours,
        Some(_) => Found::Replaced,
        None => Found::Gone,
    })
}

/// Deletes the mirror's filter `filter`, if it still runs the mirror's
/// program (a filter is deleted by priority and handle: if someone replaced
/// the mirror's, deleting by those would remove theirs); then the clsact
/// qdisc, if the mirror added it and nothing else uses it. Needs
/// CAP_NET_ADMIN: the privileged helper calls it once the mirror has given
/// up root.
///
/// The qdisc goes only after the mirror's own filter was found on it and
/// deleted: that filter proves the qdisc is still the one the mirror
/// added. A qdisc without it may have been deleted and added again by
/// someone else since, and is left alone.
pub fn remove(filter: ClsactFilter) -> io::Result<()> {
    let iface = nix::net::if_::if_indextoname(filter.ifindex)?;
    let iface = iface.to_string_lossy();
    match find(&filter)? {
        Found::Ours => {}
        Found::Replaced => {
            tracing::warn!(
                "the mirror's TC {} filter on {iface} (priority {}, handle {:#x}) was replaced by another one; leaving that one in place",
                filter.hook,
                filter.priority,
                filter.handle
            );
            return Ok(());
        }
        Found::Gone => {
            tracing::debug!(
                "the mirror's TC {} filter on {iface} is gone already",
                filter.hook
            );
            return Ok(());
        }
    }
    SchedClassifierLink::attached(
        &iface,
        filter.hook.attach_type(),
        filter.priority,
        aya::programs::tc::TcHandle::from(filter.handle),
        None,
    )?
    .detach()
    .map_err(io::Error::other)?;
    if filter.added_qdisc {
        remove_added_qdisc(filter.ifindex, &iface);
    }
    Ok(())
}

/// [`remove_qdisc_if_unused`] for the qdisc the mirror added, saying what
/// became of it (a qdisc left behind is no reason to fail a clean stop).
pub fn remove_added_qdisc(ifindex: u32, iface: &str) {
    match remove_qdisc_if_unused(ifindex) {
        Ok(QdiscRemoval::Removed) => {
            tracing::debug!("removed the clsact qdisc the mirror added to {iface}");
        }
        Ok(QdiscRemoval::InUse) => tracing::info!(
            "the clsact qdisc the mirror added to {iface} stays: other filters use it now"
        ),
        Ok(QdiscRemoval::NotThere) => {
            tracing::debug!("the clsact qdisc the mirror added to {iface} is gone already");
        }
        Err(error) => tracing::warn!(
            "cannot remove the clsact qdisc the mirror added to {iface} ({error}): once nothing uses it, remove it with `tc qdisc del dev {iface} clsact`"
        ),
    }
}

/// What [`remove_qdisc_if_unused`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QdiscRemoval {
    Removed,
    /// A filter or a chain is on it: it stays.
    InUse,
    /// No clsact qdisc there any more.
    NotThere,
}

/// Deletes the clsact qdisc of `ifindex` (one the mirror added) if nothing
/// is configured on it: no filter and no chain (a chain may carry a filter
/// template), at ingress or at egress.
///
/// The dumps are made right before the delete, on the same socket. A
/// filter that someone adds between its dump and the delete, a few netlink
/// round trips at the end of a mirror that added the qdisc, would go with
/// it: the kernel has no "delete if empty", and rtnetlink cannot
/// hold its lock across two requests. Every tool that removes the clsact
/// qdisc it added (`tc qdisc del`, libbpf's `bpf_tc_hook_destroy`) does so
/// without looking at all; whoever adds a filter to a qdisc they did not
/// add must reckon with its owner deleting it, before or after their add.
pub fn remove_qdisc_if_unused(ifindex: u32) -> io::Result<QdiscRemoval> {
    let socket = route_socket()?;
    for hook in [Hook::Ingress, Hook::Egress] {
        let parent = hook.parent();
        let filters = dump(
            &socket,
            RouteNetlinkMessage::GetTrafficFilter(tc_message(ifindex, parent)?),
            RTM_NEWTFILTER,
        )?;
        let chains = dump(
            &socket,
            RouteNetlinkMessage::GetTrafficChain(tc_message(ifindex, parent)?),
            RTM_NEWCHAIN,
        )?;
        if !filters.is_empty() || !chains.is_empty() {
            return Ok(QdiscRemoval::InUse);
        }
    }
    let mut message = tc_message(ifindex, TcHandle::CLSACT)?;
    message.header.handle = QDISC_HANDLE;
    // The kernel deletes it only if it is a clsact qdisc (an `ingress`
    // qdisc has the same parent).
    message
        .attributes
        .push(TcAttribute::Kind(QDISC_KIND.to_owned()));
    match acknowledged(&socket, RouteNetlinkMessage::DelQueueDiscipline(message)) {
        Ok(()) => Ok(QdiscRemoval::Removed),
        // No qdisc there, or not a clsact one.
        Err(error) if matches!(error.raw_os_error(), Some(libc::ENOENT | libc::EINVAL)) => {
            Ok(QdiscRemoval::NotThere)
        }
        Err(error) => Err(error),
    }
}

/// Filters that mirrors killed together with their helper left behind at
/// `hook`: `bpf` filters running a program named `name` that no process
/// holds. A running mirror holds its program, so its filter is never taken
/// for a leftover, whoever else watches the same interface.
pub fn leftovers(
    ifindex: u32,
    hook: Hook,
    filters: &[Filter],
    name: &str,
    held: &HashSet<u32>,
) -> Vec<ClsactFilter> {
    filters
        .iter()
        .filter(|f| f.kind == "bpf" && f.handle != 0 && f.program_name.as_deref() == Some(name))
        .filter_map(|f| {
            let program_id = f.program_id.filter(|id| !held.contains(id))?;
            Some(ClsactFilter {
                ifindex,
                hook,
                priority: f.priority,
                handle: f.handle,
                program_id,
                // Who added the qdisc is not known.
                added_qdisc: false,
            })
        })
        .collect()
}

/// Ids of the BPF programs that some process holds, through a program or
/// a link descriptor (their `/proc/PID/fdinfo` shows `prog_id`). Needs
/// root, as the mirror is when it attaches.
pub fn held_programs() -> HashSet<u32> {
    let mut held = HashSet::new();
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return held;
    };
    for process in processes.flatten() {
        let pid = process.file_name();
        if !pid.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(process.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            // Only BPF descriptors: one readlink instead of reading every
            // descriptor's fdinfo.
            let is_bpf = std::fs::read_link(fd.path()).is_ok_and(|target| {
                let target = target.to_string_lossy();
                target.starts_with("anon_inode:bpf-prog")
                    || target.starts_with("anon_inode:bpf_link")
            });
            if !is_bpf {
                continue;
            }
            let info = process.path().join("fdinfo").join(fd.file_name());
            if let Ok(info) = std::fs::read_to_string(info) {
                held.extend(
                    info.lines()
                        .filter_map(|line| line.strip_prefix("prog_id:"))
                        .filter_map(|id| id.trim().parse::<u32>().ok()),
                );
            }
        }
    }
    held
}

/// The filters in chain 0 of clsact `hook` on `ifindex` (the chain where
/// classification starts; other chains run only when a filter there sends
/// a packet to them).
pub fn filters(ifindex: u32, hook: Hook) -> io::Result<Vec<Filter>> {
    let request = RouteNetlinkMessage::GetTrafficFilter(tc_message(ifindex, hook.parent())?);
    Ok(dump(&route_socket()?, request, RTM_NEWTFILTER)?
        .iter()
        .filter_map(|payload| filter(payload))
        .collect())
}

fn route_socket() -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_ROUTE)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    socket2::SockRef::from(&socket).set_read_timeout(Some(DUMP_TIMEOUT))?;
    Ok(socket)
}

/// A tc message about `ifindex` under `parent`.
fn tc_message(ifindex: u32, parent: TcHandle) -> io::Result<TcMessage> {
    let mut message = TcMessage::default();
    message.header.index = i32::try_from(ifindex).map_err(io::Error::other)?;
    message.header.parent = parent;
    Ok(message)
}

fn send(socket: &Socket, message: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = 1;
    let mut message = NetlinkMessage::new(header, NetlinkPayload::from(message));
    message.finalize();
    let mut bytes = vec![0; message.buffer_len()];
    message.serialize(&mut bytes);
    socket.send(&bytes, 0)?;
    Ok(())
}

/// The payloads of the `wanted` messages a dump request answers with.
fn dump(socket: &Socket, request: RouteNetlinkMessage, wanted: u16) -> io::Result<Vec<Vec<u8>>> {
    send(socket, request, NLM_F_REQUEST | NLM_F_DUMP)?;
    let mut payloads = Vec::new();
    loop {
        let (datagram, _) = socket.recv_from_full()?;
        let mut rest = datagram.as_slice();
        while !rest.is_empty() {
            let buffer = NetlinkBuffer::new_checked(rest).map_err(io::Error::other)?;
            let len = buffer.length() as usize;
            match buffer.message_type() {
                NLMSG_DONE => return Ok(payloads),
                NLMSG_ERROR => error(&rest[..len])?,
                kind if kind == wanted => payloads.push(buffer.payload().to_vec()),
                _ => {}
            }
            // Messages are 4-byte aligned within a datagram.
            rest = rest.get(len.next_multiple_of(4)..).unwrap_or_default();
        }
    }
}

/// Sends a request that changes something and waits for its answer.
fn acknowledged(socket: &Socket, request: RouteNetlinkMessage) -> io::Result<()> {
    send(socket, request, NLM_F_REQUEST | NLM_F_ACK)?;
    loop {
        let (datagram, _) = socket.recv_from_full()?;
        let buffer = NetlinkBuffer::new_checked(datagram.as_slice()).map_err(io::Error::other)?;
        if buffer.message_type() == NLMSG_ERROR {
            let len = buffer.length() as usize;
            return error(&datagram[..len]);
        }
    }
}

/// An NLMSG_ERROR message: an error, or (code 0) the acknowledgement.
fn error(message: &[u8]) -> io::Result<()> {
    let message =
        NetlinkMessage::<RouteNetlinkMessage>::deserialize(message).map_err(io::Error::other)?;
    match message.payload {
        NetlinkPayload::Error(error) if error.code.is_some() => Err(error.to_io()),
        _ => Ok(()),
    }
}

/// The filter a RTM_NEWTFILTER message describes, unless it is outside
/// chain 0. A message whose attributes do not parse still counts, with an
/// empty kind: the mirror must not take it for a free priority.
fn filter(payload: &[u8]) -> Option<Filter> {
    let header = TcHeader::parse(payload).ok()?;
    let mut filter = Filter {
        priority: (header.info >> 16) as u16,
        protocol: u16::from_be(header.info as u16),
        handle: header.handle.into(),
        kind: String::new(),
        program_id: None,
        program_name: None,
    };
    let mut chain = 0;
    if let Ok(message) = TcMessage::parse(payload) {
        for attribute in message.attributes {
            match attribute {
                TcAttribute::Kind(kind) => filter.kind = kind,
                TcAttribute::Chain(index) => chain = index,
                TcAttribute::Options(options) => {
                    for option in options {
                        match option {
                            TcOption::Bpf(TcFilterBpfOption::ProgId(id)) => {
                                filter.program_id = Some(id);
                            }
                            TcOption::Bpf(TcFilterBpfOption::ProgName(name)) => {
                                filter.program_name = Some(name);
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
    }
    (chain == 0).then_some(filter)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(priority: u16, protocol: u16, handle: u32, kind: &str) -> Filter {
        Filter {
            priority,
            protocol,
            handle,
            kind: kind.to_owned(),
            program_id: None,
            program_name: None,
        }
    }

    #[test]
    fn a_free_first_priority_is_taken() {
        assert_eq!(placement(&[]), Ok(HANDLE_BASE));
        let later = [
            filter(2, 0x0800, 0, "flower"),
            filter(2, 0x0800, 1, "flower"),
            filter(49152, ALL_PROTOCOLS, 1, "bpf"),
        ];
        assert_eq!(placement(&later), Ok(HANDLE_BASE));
    }

    #[test]
    fn a_bpf_filter_for_all_protocols_at_priority_1_is_joined() {
        let filters = [
            filter(1, ALL_PROTOCOLS, 0, "bpf"),
            filter(1, ALL_PROTOCOLS, 1, "bpf"),
            filter(1, ALL_PROTOCOLS, HANDLE_BASE, "bpf"),
        ];
        assert_eq!(placement(&filters), Ok(HANDLE_BASE + 1));
    }

    #[test]
    fn anything_else_at_priority_1_is_refused() {
        for (protocol, kind) in [
            (ALL_PROTOCOLS, "flower"),
            (ALL_PROTOCOLS, "matchall"),
            (0x0800, "bpf"),
            (ALL_PROTOCOLS, ""),
        ] {
            let filters = [filter(1, protocol, 0, kind), filter(1, protocol, 1, kind)];
            assert_eq!(
                placement(&filters),
                Err(Occupied::Classifier {
                    kind: kind.to_owned(),
                    protocol
                }),
                "{kind} {protocol:#x}"
            );
        }
        let full: Vec<Filter> = (HANDLE_BASE..HANDLE_BASE + HANDLE_CHOICES)
            .map(|handle| filter(1, ALL_PROTOCOLS, handle, "bpf"))
            .collect();
        assert_eq!(placement(&full), Err(Occupied::Handles));
    }

    /// A dump message as the kernel sends it for `prio 1 protocol all bpf`
    /// in chain `chain`.
    fn message(chain: u32) -> Vec<u8> {
        use netlink_packet_core::Emitable as _;
        let mut message = TcMessage::default();
        message.header.handle = TcHandle::from(HANDLE_BASE);
        message.header.info = (1 << 16) | u32::from(ALL_PROTOCOLS.to_be());
        message.attributes = vec![
            TcAttribute::Kind("bpf".to_owned()),
            TcAttribute::Chain(chain),
            TcAttribute::Options(vec![
                TcOption::Bpf(TcFilterBpfOption::ProgId(42)),
                TcOption::Bpf(TcFilterBpfOption::ProgName("mirror_tc".to_owned())),
            ]),
        ];
        let mut bytes = vec![0; message.buffer_len()];
        message.emit(&mut bytes);
        bytes
    }

    #[test]
    fn dump_messages_are_read_and_other_chains_left_out() {
        assert_eq!(
            super::filter(&message(0)),
            Some(Filter {
                priority: 1,
                protocol: ALL_PROTOCOLS,
                handle: HANDLE_BASE,
                kind: "bpf".to_owned(),
                program_id: Some(42),
                program_name: Some("mirror_tc".to_owned()),
            })
        );
        assert_eq!(super::filter(&message(2)), None);
        // Unreadable attributes: the filter still counts, of no known kind.
        let mut cut = message(0);
        cut.truncate(cut.len() - 2);
        let unreadable = super::filter(&cut).expect("the header is there");
        assert_eq!((unreadable.priority, unreadable.kind.as_str()), (1, ""));
        assert_eq!(super::filter(&[0; 8]), None, "shorter than a header");
    }

    #[test]
    fn only_filters_of_programs_nobody_holds_are_leftovers() {
        let named = |handle: u32, id: u32, name: &str| Filter {
            program_id: Some(id),
            program_name: Some(name.to_owned()),
            ..filter(1, ALL_PROTOCOLS, handle, "bpf")
        };
        let filters = [
            filter(1, ALL_PROTOCOLS, 0, "bpf"),
            named(HANDLE_BASE, 10, "mirror_tc"),
            named(HANDLE_BASE + 1, 11, "mirror_tc"),
            named(1, 12, "drop"),
        ];
        let held = HashSet::from([11]);
        assert_eq!(
            leftovers(7, Hook::Egress, &filters, "mirror_tc", &held),
            [ClsactFilter {
                ifindex: 7,
                hook: Hook::Egress,
                priority: 1,
                handle: HANDLE_BASE,
                program_id: 10,
                added_qdisc: false,
            }]
        );
    }

    #[test]
    fn a_filter_of_an_older_plan_is_an_ingress_one() {
        let old = r#"{"ifindex":3,"priority":1,"handle":1,"program_id":9,"added_qdisc":true}"#;
        let filter: ClsactFilter = serde_json::from_str(old).unwrap();
        assert_eq!(filter.hook, Hook::Ingress);
        let egress = ClsactFilter {
            hook: Hook::Egress,
            ..filter
        };
        let text = serde_json::to_string(&egress).unwrap();
        assert_eq!(serde_json::from_str::<ClsactFilter>(&text).unwrap(), egress);
    }

    #[test]
    fn what_occupies_priority_1_is_named() {
        let ip_only = Occupied::Classifier {
            kind: "bpf".to_owned(),
            protocol: 0x0800,
        };
        assert_eq!(ip_only.to_string(), "a bpf filter for protocol 0x0800");
        let flower = Occupied::Classifier {
            kind: "flower".to_owned(),
            protocol: ALL_PROTOCOLS,
        };
        assert_eq!(flower.to_string(), "a flower filter");
    }
}

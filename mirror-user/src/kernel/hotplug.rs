//! Hot-plug: with `--netns`/`--pid` and no `--iface`, interfaces that
//! appear in the watched namespace later are attached, and those that go
//! are let go of, without a restart.
//!
//! The mirror hears of them through a route netlink socket bound to the
//! link group, opened inside the namespace during the privileged start (a
//! netlink socket stays in the namespace it was made in, and reading its
//! notifications needs no privilege). Attaching needs privileges the
//! mirror has given up: the privileged helper, which already outlives the
//! drop, does it (see `privileged_helper`). An interface that goes takes
//! its TCX links with it; the helper only closes their descriptors.
//!
//! When notifications are lost (ENOBUFS: the socket's buffer overflowed
//! while interfaces came and went in bulk), what is queued is read and
//! dropped (which ends the overflow), and a second socket, also opened in
//! the namespace at start, asks the kernel for the namespace's whole list
//! of links; the mirror reconciles with it. A netlink socket answers for
//! the namespace it was made in, and asking needs no privilege. The list
//! comes on its own socket so that it never fills the notifications'.

use std::{
    collections::{HashMap, HashSet},
    io,
    sync::{Arc, atomic::Ordering},
};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, NetlinkBuffer, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    link::{LinkAttribute, LinkMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use tokio::sync::watch;

use crate::{
    flow::ifaces::{IfaceId, IfaceNames},
    kernel::drain::register_readable,
    kernel::privileged_helper::Helper,
    telemetry::counters,
    text::printable,
};

/// RTMGRP_LINK: link notifications.
const LINK_GROUP: u32 = 1;

counters! {
    /// Interfaces of the watched namespace, after the start (`interfaces`).
    pub struct InterfaceCounters => InterfaceSnapshot {
        /// Interfaces that appeared and were attached.
        attached,
        /// Watched interfaces that went away.
        detached,
        /// Interfaces that appeared but could not be attached.
        failed,
        /// Times notifications were lost and the interfaces listed again.
        relisted,
    }
}

/// The link notifications of the calling thread's namespace, and a socket
/// to list its links with.
pub struct LinkWatch {
    notifications: Socket,
    lister: Socket,
}

/// How long one read of a listing may wait before it is given up.
const LIST_TIMEOUT: libc::timeval = libc::timeval {
    tv_sec: 2,
    tv_usec: 0,
};

impl LinkWatch {
    /// Call in the watched namespace ([`crate::kernel::netns::Netns::run`]).
    pub fn open() -> io::Result<Self> {
        let mut notifications = Socket::new(NETLINK_ROUTE)?;
        notifications.bind(&SocketAddr::new(0, LINK_GROUP))?;
        notifications.set_non_blocking(true)?;
        let mut lister = Socket::new(NETLINK_ROUTE)?;
        lister.bind_auto()?;
        let timeout = LIST_TIMEOUT;
        // SAFETY: setsockopt on an open socket with a timeval of its size.
        let set = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&lister),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if set != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            notifications,
            lister,
        })
    }
}

/// What hot-plug keeps track of.
pub struct Hotplug {
    pub watch: LinkWatch,
    /// `NETNS` of `NETNS:IF` (empty for the mirror's own namespace).
    pub netns_label: String,
    /// Interfaces attached at start, by index (names as the kernel says).
    pub watched: HashMap<u32, String>,
    pub names: IfaceNames,
    pub helper: Arc<Helper>,
    pub counters: Arc<InterfaceCounters>,
}

/// A link appeared (or changed) or went.
#[derive(Debug, PartialEq, Eq)]
enum Change {
    New { ifindex: u32, name: String },
    Gone { ifindex: u32 },
}

/// The link changes in one datagram of notifications.
fn changes(mut datagram: &[u8]) -> Vec<Change> {
    let mut out = Vec::new();
    while let Ok(buffer) = NetlinkBuffer::new_checked(datagram) {
        let len = buffer.length() as usize;
        let Some(message) = datagram.get(..len) else {
            break;
        };
        if let Ok(message) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(message) {
            match message.payload {
                // A bridge's notices of its ports (AF_BRIDGE) say nothing of
                // the link itself coming or going.
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link))
                    if link.header.interface_family == AddressFamily::Unspec =>
                {
                    if let Some(name) = link_name(&link) {
                        out.push(Change::New {
                            ifindex: link.header.index,
                            name,
                        });
                    }
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link))
                    if link.header.interface_family == AddressFamily::Unspec =>
                {
                    out.push(Change::Gone {
                        ifindex: link.header.index,
                    });
                }
                _ => {}
            }
        }
        // Messages are 4-byte aligned within a datagram.
        datagram = datagram.get(len.next_multiple_of(4)..).unwrap_or_default();
        if len == 0 {
            break;
        }
    }
    out
}

/// The request for every link of the socket's namespace.
fn list_request(seq: u32) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = seq;
    let mut message = NetlinkMessage::new(
        header,
        RouteNetlinkMessage::GetLink(LinkMessage::default()).into(),
    );
    message.finalize();
    let mut bytes = vec![0; message.buffer_len()];
    message.serialize(&mut bytes);
    bytes
}

/// A listing of every link of the namespace.
#[derive(Debug, Default, PartialEq, Eq)]
struct Listing {
    links: HashMap<u32, String>,
    /// A link's message could not be read: which watched links went cannot
    /// be told.
    partial: bool,
}

/// Asks for every link on `lister` and reads the answer (blocking, each
/// read at most [`LIST_TIMEOUT`]); `seq` tells this answer from a late one.
fn list_links(lister: &Socket, seq: u32) -> Result<Listing, String> {
    lister
        .send(&list_request(seq), 0)
        .map_err(|error| error.to_string())?;
    let mut listing = Listing::default();
    let mut buffer = vec![0u8; 64 << 10];
    loop {
        let len = lister
            .recv(&mut buffer.as_mut_slice(), 0)
            .map_err(|error| error.to_string())?;
        if listing_part(&buffer[..len], seq, &mut listing)? {
            return Ok(listing);
        }
    }
}

/// Adds the links of one datagram of a listing to `listing`; true at its
/// end. A listing the kernel ended in error, or interrupted (links changed
/// while it was made), is an error: it may lack links.
fn listing_part(mut datagram: &[u8], seq: u32, listing: &mut Listing) -> Result<bool, String> {
    while let Ok(buffer) = NetlinkBuffer::new_checked(datagram) {
        let len = buffer.length() as usize;
        let Some(message) = datagram.get(..len) else {
            break;
        };
        if buffer.sequence_number() == seq {
            if buffer.flags() & NLM_F_DUMP_INTR != 0 {
                return Err("the links changed while they were listed".to_owned());
            }
            match NetlinkMessage::<RouteNetlinkMessage>::deserialize(message)
                .map(|message| message.payload)
            {
                Ok(NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link))) => {
                    match link_name(&link) {
                        Some(name) => {
                            listing.links.insert(link.header.index, name);
                        }
                        None => listing.partial = true,
                    }
                }
                Ok(NetlinkPayload::Done(done)) if done.code == 0 => return Ok(true),
                Ok(NetlinkPayload::Done(done)) => {
                    return Err(format!("the listing ended with error {}", done.code));
                }
                Ok(NetlinkPayload::Error(error)) => {
                    return Err(format!("the listing failed: {error}"));
                }
                Ok(_) => {}
                Err(_) => listing.partial = true,
            }
        }
        datagram = datagram.get(len.next_multiple_of(4)..).unwrap_or_default();
        if len == 0 {
            break;
        }
    }
    Ok(false)
}

/// What a listing means against what is followed: links that are there
/// (new ones get attached), and watched ones that are not (they went),
/// unless the listing is partial.
fn reconcile(watched: &HashMap<u32, String>, listing: Listing) -> Vec<Change> {
    let mut gone: Vec<u32> = watched
        .keys()
        .filter(|ifindex| !listing.partial && !listing.links.contains_key(ifindex))
        .copied()
        .collect();
    gone.sort_unstable();
    let mut present: Vec<(u32, String)> = listing.links.into_iter().collect();
    present.sort_unstable();
    gone.into_iter()
        .map(|ifindex| Change::Gone { ifindex })
        .chain(
            present
                .into_iter()
                .map(|(ifindex, name)| Change::New { ifindex, name }),
        )
        .collect()
}

fn link_name(link: &LinkMessage) -> Option<String> {
    link.attributes
        .iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::IfName(name) => Some(name.clone()),
            _ => None,
        })
}

impl Hotplug {
    /// Follows the namespace's links until `stop`.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let Self {
            watch,
            netns_label,
            watched,
            names,
            helper,
            counters,
        } = self;
        let mut following = Following {
            netns_label,
            watched,
            names,
            helper,
            counters,
            failed: HashSet::new(),
            last_seq: 0,
        };
        let lister = Arc::new(watch.lister);
        let socket = match register_readable(watch.notifications) {
            Ok(socket) => socket,
            Err(error) => {
                tracing::warn!("interfaces added later will not be watched: {error}");
                return;
            }
        };
        let mut buffer = vec![0u8; 64 << 10];
        loop {
            let ready = tokio::select! {
                ready = socket.readable() => ready,
                _ = stop.changed() => return,
            };
            let mut guard = match ready {
                Ok(guard) => guard,
                Err(error) => {
                    tracing::warn!("interfaces added later will not be watched: {error}");
                    return;
                }
            };
            let received = guard.try_io(|socket| {
                let mut slice = buffer.as_mut_slice();
                socket.get_ref().recv_from(&mut slice, 0)
            });
            let len = match received {
                // Only the kernel's notifications: a process of the watched
                // namespace may send to this socket too (a forged
                // RTM_DELLINK would make the mirror let an interface go).
                Ok(Ok((len, sender))) if sender.port_number() == 0 => len,
                Ok(Ok(_)) => continue,
                Ok(Err(error)) if error.raw_os_error() == Some(libc::ENOBUFS) => {
                    drop(guard);
                    following.catch_up(&socket, &lister).await;
                    continue;
                }
                Ok(Err(error)) => {
                    tracing::warn!("interfaces added later will not be watched: {error}");
                    return;
                }
                Err(_would_block) => continue,
            };
            for change in changes(&buffer[..len]) {
                following.apply(change).await;
            }
        }
    }
}

/// The state of [`Hotplug::run`].
struct Following {
    netns_label: String,
    watched: HashMap<u32, String>,
    names: IfaceNames,
    helper: Arc<Helper>,
    counters: Arc<InterfaceCounters>,
    /// Interfaces that could not be attached: not tried again until they
    /// go (every change of theirs is a notification).
    failed: HashSet<u32>,
    /// The sequence number of the last listing asked for.
    last_seq: u32,
}

/// Listings tried before giving up when links keep changing meanwhile.
const LIST_ATTEMPTS: usize = 3;
/// Queued notifications read and dropped after an overflow, at most.
const DRAIN_AT_MOST: usize = 1 << 16;

impl Following {
    /// `NETNS:IF`, or `IF` when the namespace is the mirror's own.
    fn label(&self, name: &str) -> String {
        if self.netns_label.is_empty() {
            name.to_owned()
        } else {
            format!("{}:{name}", self.netns_label)
        }
    }

    async fn apply(&mut self, change: Change) {
        match change {
            Change::New { ifindex, name } => self.appeared(ifindex, name).await,
            Change::Gone { ifindex } => self.went(ifindex).await,
        }
    }

    /// After lost notifications: drops what is queued (older than the
    /// listing; reading it ends the overflow), lists the links and follows
    /// what the listing says. Notifications that come meanwhile are read
    /// afterwards; applying one the listing already covered is harmless.
    async fn catch_up(&mut self, socket: &tokio::io::unix::AsyncFd<Socket>, lister: &Arc<Socket>) {
        self.counters.relisted.fetch_add(1, Ordering::Relaxed);
        let mut scratch = vec![0u8; 64 << 10];
        for _ in 0..DRAIN_AT_MOST {
            let mut slice = scratch.as_mut_slice();
            match socket.get_ref().recv_from(&mut slice, 0) {
                Ok(_) => {}
                // Another overflow while draining: keep reading.
                Err(error) if error.raw_os_error() == Some(libc::ENOBUFS) => {}
                // WouldBlock: nothing queued any more.
                Err(_) => break,
            }
        }
        let mut outcome = Err(String::new());
        for _ in 0..LIST_ATTEMPTS {
            self.last_seq = self.last_seq.wrapping_add(1).max(1);
            let (lister, seq) = (Arc::clone(lister), self.last_seq);
            outcome = tokio::task::spawn_blocking(move || list_links(&lister, seq))
                .await
                .unwrap_or_else(|error| Err(error.to_string()));
            if outcome.is_ok() {
                break;
            }
        }
        let listing = match outcome {
            Ok(listing) => listing,
            Err(error) => {
                tracing::warn!(
                    "missed interface notifications (ENOBUFS) and cannot list the interfaces again ({error}): interfaces that came or went meanwhile are not followed; restart the mirror to watch them"
                );
                return;
            }
        };
        tracing::info!(
            "missed interface notifications (ENOBUFS): listed {} interfaces again",
            listing.links.len()
        );
        if !listing.partial {
            // A link that is gone is not failed any more either.
            self.failed
                .retain(|ifindex| listing.links.contains_key(ifindex));
        }
        for change in reconcile(&self.watched, listing) {
            self.apply(change).await;
        }
    }

    async fn appeared(&mut self, ifindex: u32, name: String) {
        if name == "lo" || self.watched.contains_key(&ifindex) || self.failed.contains(&ifindex) {
            return;
        }
        let label = self.label(&name);
        let helper = Arc::clone(&self.helper);
        let attached = tokio::task::spawn_blocking(move || helper.attach_interface(ifindex)).await;
        match attached {
            Ok(Ok(())) => {
                tracing::info!("{} appeared: attached", printable(&label));
                self.names.insert(IfaceId::index(ifindex), &label);
                self.watched.insert(ifindex, name);
                self.counters.attached.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(error)) => {
                tracing::warn!(
                    "{} appeared but cannot be attached: {error}",
                    printable(&label)
                );
                self.failed.insert(ifindex);
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => tracing::warn!("{}: {error}", printable(&label)),
        }
    }

    async fn went(&mut self, ifindex: u32) {
        self.failed.remove(&ifindex);
        let Some(name) = self.watched.remove(&ifindex) else {
            return;
        };
        tracing::info!("{} went away", printable(&self.label(&name)));
        self.names.remove(IfaceId::index(ifindex));
        self.counters.detached.fetch_add(1, Ordering::Relaxed);
        let helper = Arc::clone(&self.helper);
        // Not one the helper attached (one of the start): nothing to let
        // go of there, which it answers with OK too.
        let _ = tokio::task::spawn_blocking(move || helper.forget_interface(ifindex)).await;
    }
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::{NLM_F_MULTIPART, NetlinkHeader};

    use super::*;

    fn notification(message: RouteNetlinkMessage) -> Vec<u8> {
        let mut message = NetlinkMessage::new(NetlinkHeader::default(), message.into());
        message.finalize();
        let mut bytes = vec![0; message.buffer_len()];
        message.serialize(&mut bytes);
        bytes
    }

    #[test]
    fn link_notifications_become_changes() {
        let mut new = LinkMessage::default();
        new.header.index = 7;
        new.attributes.push(LinkAttribute::IfName("eth1".into()));
        let mut gone = LinkMessage::default();
        gone.header.index = 5;
        let mut datagram = notification(RouteNetlinkMessage::NewLink(new));
        datagram.extend(notification(RouteNetlinkMessage::DelLink(gone)));
        assert_eq!(
            changes(&datagram),
            [
                Change::New {
                    ifindex: 7,
                    name: "eth1".into()
                },
                Change::Gone { ifindex: 5 }
            ]
        );
        // Garbage ends the datagram, it does not loop or panic.
        assert!(changes(&[0xff; 7]).is_empty());
        assert!(changes(&[0; 64]).is_empty());
    }

    fn message(seq: u32, flags: u16, payload: NetlinkPayload<RouteNetlinkMessage>) -> Vec<u8> {
        let mut header = NetlinkHeader::default();
        header.sequence_number = seq;
        header.flags = flags;
        let mut message = NetlinkMessage::new(header, payload);
        message.finalize();
        let mut bytes = vec![0; message.buffer_len()];
        message.serialize(&mut bytes);
        bytes
    }

    fn link(index: u32, name: &str, family: AddressFamily) -> LinkMessage {
        let mut link = LinkMessage::default();
        link.header.index = index;
        link.header.interface_family = family;
        link.attributes.push(LinkAttribute::IfName(name.into()));
        link
    }

    fn new_link(seq: u32, flags: u16, index: u32, name: &str) -> Vec<u8> {
        message(
            seq,
            flags,
            RouteNetlinkMessage::NewLink(link(index, name, AddressFamily::Unspec)).into(),
        )
    }

    fn done(seq: u32, code: i32) -> Vec<u8> {
        let mut done = netlink_packet_core::DoneMessage::default();
        done.code = code;
        message(seq, NLM_F_MULTIPART, NetlinkPayload::Done(done))
    }

    #[test]
    fn a_listing_is_read_to_its_end_and_only_its_own() {
        let mut listing = Listing::default();
        let mut first = new_link(9, NLM_F_MULTIPART, 3, "eth0");
        // A late part of an earlier listing.
        first.extend(new_link(8, NLM_F_MULTIPART, 4, "stale"));
        assert_eq!(listing_part(&first, 9, &mut listing), Ok(false));
        let mut last = new_link(9, NLM_F_MULTIPART, 5, "eth1");
        last.extend(done(9, 0));
        assert_eq!(listing_part(&last, 9, &mut listing), Ok(true));
        assert_eq!(
            listing,
            Listing {
                links: [(3, "eth0".to_owned()), (5, "eth1".to_owned())].into(),
                partial: false
            }
        );
        // Ended in error, or interrupted: not a listing to follow.
        assert!(listing_part(&done(9, -16), 9, &mut Listing::default()).is_err());
        let interrupted = new_link(9, NLM_F_MULTIPART | NLM_F_DUMP_INTR, 3, "eth0");
        assert!(listing_part(&interrupted, 9, &mut Listing::default()).is_err());
        // The request is one well-formed dump request.
        let request = list_request(9);
        let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&request).unwrap();
        assert_eq!(message.header.sequence_number, 9);
        assert_eq!(message.header.flags, NLM_F_REQUEST | NLM_F_DUMP);
        assert!(matches!(
            message.payload,
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::GetLink(_))
        ));
    }

    #[test]
    fn a_bridge_port_notice_is_not_a_link_coming_or_going() {
        let port = message(
            0,
            0,
            RouteNetlinkMessage::DelLink(link(7, "eth1", AddressFamily::Bridge)).into(),
        );
        assert!(changes(&port).is_empty());
    }

    #[test]
    fn a_listing_attaches_what_came_and_lets_go_of_what_went() {
        let watched: HashMap<u32, String> = [(2, "eth0".to_owned()), (5, "eth1".to_owned())].into();
        let listing = Listing {
            links: [
                (1, "lo".to_owned()),
                (2, "eth0".to_owned()),
                (7, "eth2".to_owned()),
            ]
            .into(),
            partial: false,
        };
        assert_eq!(
            reconcile(&watched, listing),
            [
                Change::Gone { ifindex: 5 },
                Change::New {
                    ifindex: 1,
                    name: "lo".into()
                },
                Change::New {
                    ifindex: 2,
                    name: "eth0".into()
                },
                Change::New {
                    ifindex: 7,
                    name: "eth2".into()
                },
            ]
        );
        // A partial listing lets nothing go.
        let partial = Listing {
            links: [(7, "eth2".to_owned())].into(),
            partial: true,
        };
        assert_eq!(
            reconcile(&watched, partial),
            [Change::New {
                ifindex: 7,
                name: "eth2".into()
            }]
        );
    }
}

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
//! while interfaces came and went in bulk), the same socket asks the
//! kernel for the namespace's whole list of links and reconciles with it:
//! a netlink socket answers for the namespace it was made in, and asking
//! needs no privilege either.

use std::{
    collections::{HashMap, HashSet},
    io,
    sync::{Arc, atomic::Ordering},
};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_MULTIPART, NLM_F_REQUEST, NetlinkBuffer, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::{
    RouteNetlinkMessage,
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

/// The link notifications of the calling thread's namespace.
pub struct LinkWatch(Socket);

impl LinkWatch {
    /// Call in the watched namespace ([`crate::kernel::netns::Netns::run`]).
    pub fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind(&SocketAddr::new(0, LINK_GROUP))?;
        socket.set_non_blocking(true)?;
        Ok(Self(socket))
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

/// A link appeared (or changed) or went; or a part of a listing.
#[derive(Debug, PartialEq, Eq)]
enum Change {
    New {
        ifindex: u32,
        name: String,
    },
    Gone {
        ifindex: u32,
    },
    /// A link of the listing asked for with sequence number `seq`.
    Listed {
        seq: u32,
        ifindex: u32,
        name: String,
    },
    /// The end of that listing.
    ListEnd {
        seq: u32,
    },
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
            // Notifications have sequence number 0; a listing's parts carry
            // the number of its request.
            let seq = message.header.sequence_number;
            let listed = seq != 0 && message.header.flags & NLM_F_MULTIPART != 0;
            match message.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                    if let Some(name) = link_name(&link) {
                        let ifindex = link.header.index;
                        out.push(if listed {
                            Change::Listed { seq, ifindex, name }
                        } else {
                            Change::New { ifindex, name }
                        });
                    }
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link)) => {
                    out.push(Change::Gone {
                        ifindex: link.header.index,
                    });
                }
                NetlinkPayload::Done(_) if seq != 0 => out.push(Change::ListEnd { seq }),
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

/// What a complete listing means against what is followed: links that
/// are there (new ones get attached), and watched ones that are not (they
/// went). Links that went while the listing was made are left out: their
/// notification came.
fn reconcile(
    watched: &HashMap<u32, String>,
    listed: HashMap<u32, String>,
    gone_meanwhile: &HashSet<u32>,
) -> Vec<Change> {
    let mut gone: Vec<u32> = watched
        .keys()
        .filter(|ifindex| !listed.contains_key(ifindex))
        .copied()
        .collect();
    gone.sort_unstable();
    let mut present: Vec<(u32, String)> = listed
        .into_iter()
        .filter(|(ifindex, _)| !gone_meanwhile.contains(ifindex))
        .collect();
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
            listing: None,
            last_seq: 0,
        };
        let socket = match register_readable(watch.0) {
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
                    following.counters.relisted.fetch_add(1, Ordering::Relaxed);
                    following.last_seq = following.last_seq.wrapping_add(1).max(1);
                    let seq = following.last_seq;
                    match socket.get_ref().send(&list_request(seq), 0) {
                        Ok(_) => {
                            tracing::info!(
                                "missed interface notifications (ENOBUFS): listing the interfaces again"
                            );
                            following.listing = Some(Listing {
                                seq,
                                links: HashMap::new(),
                                gone: HashSet::new(),
                            });
                        }
                        Err(error) => tracing::warn!(
                            "missed interface notifications (ENOBUFS) and cannot list the interfaces again ({error}): interfaces that came or went meanwhile are not followed; restart the mirror to watch them"
                        ),
                    }
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
    /// The listing asked for after lost notifications, while it comes.
    listing: Option<Listing>,
    last_seq: u32,
}

/// A listing of every link, as it comes.
struct Listing {
    seq: u32,
    links: HashMap<u32, String>,
    /// Links whose removal was heard while the listing came.
    gone: HashSet<u32>,
}

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
            Change::Listed { seq, ifindex, name } => {
                if let Some(listing) = self.listing.as_mut().filter(|l| l.seq == seq) {
                    listing.links.insert(ifindex, name);
                }
            }
            Change::ListEnd { seq } => {
                let Some(listing) = self.listing.take_if(|l| l.seq == seq) else {
                    return;
                };
                // A link that is gone is not failed any more either.
                self.failed
                    .retain(|ifindex| listing.links.contains_key(ifindex));
                for change in reconcile(&self.watched, listing.links, &listing.gone) {
                    match change {
                        Change::New { ifindex, name } => self.appeared(ifindex, name).await,
                        Change::Gone { ifindex } => self.went(ifindex).await,
                        Change::Listed { .. } | Change::ListEnd { .. } => {}
                    }
                }
            }
            Change::New { ifindex, name } => self.appeared(ifindex, name).await,
            Change::Gone { ifindex } => {
                if let Some(listing) = &mut self.listing {
                    listing.gone.insert(ifindex);
                }
                self.went(ifindex).await;
            }
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
    use netlink_packet_core::NetlinkHeader;

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

    #[test]
    fn a_listing_is_told_from_notifications() {
        let mut listed = LinkMessage::default();
        listed.header.index = 3;
        listed.attributes.push(LinkAttribute::IfName("eth0".into()));
        let mut header = NetlinkHeader::default();
        header.sequence_number = 9;
        header.flags = NLM_F_MULTIPART;
        let mut part = NetlinkMessage::new(header, RouteNetlinkMessage::NewLink(listed).into());
        part.finalize();
        let mut done = NetlinkMessage::<RouteNetlinkMessage>::new(
            header,
            NetlinkPayload::Done(Default::default()),
        );
        done.finalize();
        let mut datagram = vec![0; part.buffer_len()];
        part.serialize(&mut datagram);
        let mut end = vec![0; done.buffer_len()];
        done.serialize(&mut end);
        datagram.extend(end);
        assert_eq!(
            changes(&datagram),
            [
                Change::Listed {
                    seq: 9,
                    ifindex: 3,
                    name: "eth0".into()
                },
                Change::ListEnd { seq: 9 }
            ]
        );
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
    fn a_listing_attaches_what_came_and_lets_go_of_what_went() {
        let watched: HashMap<u32, String> = [(2, "eth0".to_owned()), (5, "eth1".to_owned())].into();
        let listed: HashMap<u32, String> = [
            (1, "lo".to_owned()),
            (2, "eth0".to_owned()),
            (7, "eth2".to_owned()),
            (8, "eth3".to_owned()),
        ]
        .into();
        // eth3's removal was heard while the listing came.
        let gone_meanwhile: HashSet<u32> = [8].into();
        assert_eq!(
            reconcile(&watched, listed, &gone_meanwhile),
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
    }
}

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

use std::{
    collections::{HashMap, HashSet},
    io,
    sync::{Arc, atomic::Ordering},
};

use netlink_packet_core::{NetlinkBuffer, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use tokio::sync::watch;

use crate::{
    flow::ifaces::IfaceNames, kernel::drain::register_readable, kernel::privileged_helper::Helper,
    telemetry::counters, text::printable,
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
        if let Ok(message) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(message)
            && let NetlinkPayload::InnerMessage(inner) = message.payload
        {
            match inner {
                RouteNetlinkMessage::NewLink(link) => {
                    if let Some(name) = link_name(&link) {
                        out.push(Change::New {
                            ifindex: link.header.index,
                            name,
                        });
                    }
                }
                RouteNetlinkMessage::DelLink(link) => out.push(Change::Gone {
                    ifindex: link.header.index,
                }),
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
                    // Not reconciled yet: interfaces added or removed in
                    // the lost notifications stay as they were.
                    tracing::warn!(
                        "missed interface notifications (ENOBUFS): interfaces that came or went meanwhile are not followed; restart the mirror to watch them"
                    );
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
            Change::New { ifindex, name } => {
                if name == "lo"
                    || self.watched.contains_key(&ifindex)
                    || self.failed.contains(&ifindex)
                {
                    return;
                }
                let label = self.label(&name);
                let helper = Arc::clone(&self.helper);
                let attached =
                    tokio::task::spawn_blocking(move || helper.attach_interface(ifindex)).await;
                match attached {
                    Ok(Ok(())) => {
                        tracing::info!("{} appeared: attached", printable(&label));
                        self.names.insert(ifindex, &label);
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
            Change::Gone { ifindex } => {
                self.failed.remove(&ifindex);
                let Some(name) = self.watched.remove(&ifindex) else {
                    return;
                };
                tracing::info!("{} went away", printable(&self.label(&name)));
                self.names.remove(ifindex);
                self.counters.detached.fetch_add(1, Ordering::Relaxed);
                let helper = Arc::clone(&self.helper);
                // Not one the helper attached (one of the start): nothing
                // to let go of there, which it answers with OK too.
                let _ = tokio::task::spawn_blocking(move || helper.forget_interface(ifindex)).await;
            }
        }
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
}

//! Runtime port changes, applied by the main task alone: it owns the
//! kernel's port map, the port registry and the hub's channels, and applies
//! each request whole before the next. Sessions send requests and wait for
//! the answer; the data path never waits for any of it.

pub mod ports;

use std::sync::Arc;

use tokio::sync::{broadcast, oneshot};

use crate::{
    control::ports::{PolicyError, PortInfo, PortRegistry, SessionId},
    fanout::{
        hub::Hub,
        subscription::{EventBatch, PortFeed},
    },
};

/// The kernel's port map, as the control logic sees it.
pub trait PortMap {
    fn set_port(&mut self, port: u16, mirrored: bool) -> Result<(), String>;
}

impl PortMap for crate::kernel::loader::Mirror {
    fn set_port(&mut self, port: u16, mirrored: bool) -> Result<(), String> {
        crate::kernel::loader::Mirror::set_port(self, port, mirrored).map_err(|e| e.to_string())
    }
}

/// The receivers a subscribing session gets, one per port.
pub type PortReceivers = Vec<(u16, broadcast::Receiver<EventBatch>)>;

/// A request to the main task.
pub enum Request {
    /// A port change or question, which [`Control::handle`] applies.
    Ports(PortRequest),
    /// Every counter, as the JSON document `--print json` ends with: the
    /// main task answers it (it holds every stage's counters).
    Stats { reply: oneshot::Sender<String> },
}

/// A request about the mirrored ports.
pub enum PortRequest {
    Subscribe {
        session: SessionId,
        ports: Vec<u16>,
        reply: oneshot::Sender<Result<PortReceivers, PolicyError>>,
    },
    Unsubscribe {
        session: SessionId,
        ports: Vec<u16>,
        reply: oneshot::Sender<()>,
    },
    EndSession {
        session: SessionId,
    },
    AddPort {
        port: u16,
        reply: oneshot::Sender<Result<(), PolicyError>>,
    },
    RemovePort {
        port: u16,
        reply: oneshot::Sender<Result<(), PolicyError>>,
    },
    ListPorts {
        reply: oneshot::Sender<Vec<PortInfo>>,
    },
}

/// The main task's state for port changes.
pub struct Control {
    registry: PortRegistry,
    hub: Arc<Hub>,
    /// In-process consumers, which follow the mirror's own ports.
    own_feeds: Vec<PortFeed>,
}

impl Control {
    pub fn new(registry: PortRegistry, hub: Arc<Hub>) -> Self {
        Self {
            registry,
            hub,
            own_feeds: Vec::new(),
        }
    }

    /// An in-process consumer: it gains and loses ports with `ports add`
    /// and `ports remove`.
    pub fn follow_own_ports(&mut self, feed: PortFeed) {
        self.own_feeds.push(feed);
    }

    pub fn registry(&self) -> &PortRegistry {
        &self.registry
    }

    /// Applies one port request.
    pub fn handle(&mut self, request: PortRequest, map: &mut impl PortMap) {
        match request {
            PortRequest::Subscribe {
                session,
                ports,
                reply,
            } => {
                let result = self.registry.subscribe(session, &ports).map(|activated| {
                    for port in activated {
                        self.activate(port, map);
                    }
                    ports
                        .iter()
                        .filter_map(|port| Some((*port, self.hub.receiver(*port)?)))
                        .collect()
                });
                let _ = reply.send(result);
            }
            PortRequest::Unsubscribe {
                session,
                ports,
                reply,
            } => {
                for port in self.registry.unsubscribe(session, &ports) {
                    self.deactivate(port, map);
                }
                let _ = reply.send(());
            }
            PortRequest::EndSession { session } => {
                for port in self.registry.end_session(session) {
                    self.deactivate(port, map);
                }
            }
            PortRequest::AddPort { port, reply } => {
                let was_own = self.registry.own_ports().contains(&port);
                let result = self.registry.add(port).map(|activated| {
                    if activated {
                        self.activate(port, map);
                    }
                    if !was_own {
                        for feed in &self.own_feeds {
                            if let Some(receiver) = self.hub.receiver(port) {
                                feed.add(port, receiver);
                            }
                        }
                    }
                });
                let _ = reply.send(result);
            }
            PortRequest::RemovePort { port, reply } => {
                let result = self.registry.remove(port).map(|deactivated| {
                    for feed in &self.own_feeds {
                        feed.remove(port);
                    }
                    if deactivated {
                        self.deactivate(port, map);
                    }
                });
                let _ = reply.send(result);
            }
            PortRequest::ListPorts { reply } => {
                let _ = reply.send(self.registry.list());
            }
        }
    }

    /// The channel opens before the kernel mirrors the port, so the first
    /// events have somewhere to go.
    fn activate(&self, port: u16, map: &mut impl PortMap) {
        self.hub.open_port(port);
        if let Err(error) = map.set_port(port, true) {
            tracing::error!("cannot add port {port} to the kernel's port map: {error}");
        }
        tracing::info!("now mirroring port {port}");
    }

    fn deactivate(&self, port: u16, map: &mut impl PortMap) {
        if let Err(error) = map.set_port(port, false) {
            tracing::error!("cannot remove port {port} from the kernel's port map: {error}");
        }
        self.hub.close_port(port);
        tracing::info!("no longer mirroring port {port}");
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::{control::ports::AllowList, fanout::hub::HubConfig};

    #[derive(Default)]
    struct FakeMap(BTreeSet<u16>);

    impl PortMap for FakeMap {
        fn set_port(&mut self, port: u16, mirrored: bool) -> Result<(), String> {
            if mirrored {
                self.0.insert(port);
            } else {
                self.0.remove(&port);
            }
            Ok(())
        }
    }

    const CONFIG: HubConfig = HubConfig {
        capacity: 16,
        max_bytes: 1 << 30,
        batch_bytes: 1 << 16,
    };

    fn control() -> (Control, FakeMap) {
        let hub = Arc::new(Hub::new(&[80], CONFIG));
        let registry = PortRegistry::new(&[80], AllowList::parse("9000-9009").unwrap(), 4);
        let mut map = FakeMap::default();
        map.0.insert(80);
        (Control::new(registry, hub), map)
    }

    fn subscribe(
        c: &mut Control,
        map: &mut FakeMap,
        session: u64,
        ports: &[u16],
    ) -> Result<Vec<u16>, PolicyError> {
        let (reply, answer) = oneshot::channel();
        c.handle(
            PortRequest::Subscribe {
                session,
                ports: ports.to_vec(),
                reply,
            },
            map,
        );
        answer
            .blocking_recv()
            .unwrap()
            .map(|receivers| receivers.into_iter().map(|(port, _)| port).collect())
    }

    #[test]
    fn subscriptions_drive_the_kernel_map_and_the_channels() {
        let (mut c, mut map) = control();
        assert_eq!(
            subscribe(&mut c, &mut map, 1, &[80, 9000]),
            Ok(vec![80, 9000])
        );
        assert!(map.0.contains(&9000));
        assert!(c.hub.receiver(9000).is_some());
        assert_eq!(subscribe(&mut c, &mut map, 2, &[9000]), Ok(vec![9000]));
        c.handle(PortRequest::EndSession { session: 1 }, &mut map);
        assert!(map.0.contains(&9000), "session 2 still holds it");
        c.handle(PortRequest::EndSession { session: 2 }, &mut map);
        assert_eq!(map.0, BTreeSet::from([80]));
        assert!(c.hub.receiver(9000).is_none(), "its channel closed");
        assert!(c.hub.receiver(80).is_some());
    }

    #[test]
    fn refused_subscriptions_change_nothing() {
        let (mut c, mut map) = control();
        let refused = subscribe(&mut c, &mut map, 1, &[9000, 22]);
        assert!(matches!(
            refused,
            Err(PolicyError::NotAllowed { port: 22, .. })
        ));
        assert_eq!(map.0, BTreeSet::from([80]));
    }

    #[test]
    fn added_ports_reach_in_process_consumers() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (mut c, mut map) = control();
        let (feed, mut own) = c.hub.subscribe(&[80], "own");
        c.follow_own_ports(feed);
        let (reply, answer) = oneshot::channel();
        c.handle(PortRequest::AddPort { port: 9001, reply }, &mut map);
        assert_eq!(answer.blocking_recv().unwrap(), Ok(()));
        assert!(map.0.contains(&9001));
        let opened = crate::flow::model::StreamEvent::Opened {
            iface: Default::default(),
            conn: 1,
            src: "198.18.0.1:1".parse().unwrap(),
            dst: "198.18.0.2:9001".parse().unwrap(),
            midstream: false,
        };
        c.hub.publish(9001, vec![opened.clone()]);
        let got = runtime.block_on(own.next());
        assert_eq!(got, Some(opened), "the consumer follows the added port");

        let (reply, answer) = oneshot::channel();
        c.handle(PortRequest::ListPorts { reply }, &mut map);
        let listed: Vec<u16> = answer
            .blocking_recv()
            .unwrap()
            .iter()
            .map(|p| p.port)
            .collect();
        assert_eq!(listed, [80, 9001]);

        let (reply, answer) = oneshot::channel();
        c.handle(PortRequest::RemovePort { port: 9001, reply }, &mut map);
        assert_eq!(answer.blocking_recv().unwrap(), Ok(()));
        assert!(!map.0.contains(&9001));
        // Its open connection on the removed port ends as shutdown.
        let got = runtime.block_on(own.next());
        assert_eq!(
            got,
            Some(crate::flow::model::StreamEvent::Closed {
                conn: 1,
                reason: crate::flow::model::CloseReason::Shutdown
            })
        );
        let (reply, answer) = oneshot::channel();
        c.handle(PortRequest::RemovePort { port: 80, reply }, &mut map);
        assert_eq!(
            answer.blocking_recv().unwrap(),
            Err(PolicyError::CommandLine(80))
        );
    }

    fn request<T>(
        c: &mut Control,
        map: &mut FakeMap,
        make: impl FnOnce(oneshot::Sender<T>) -> PortRequest,
    ) -> T {
        let (reply, answer) = oneshot::channel();
        c.handle(make(reply), map);
        answer.blocking_recv().unwrap()
    }

    #[test]
    fn a_remove_never_takes_a_subscribed_port_from_the_kernel() {
        let (mut c, mut map) = control();
        let (feed, _own) = c.hub.subscribe(&[80], "own");
        c.follow_own_ports(feed);
        assert_eq!(subscribe(&mut c, &mut map, 1, &[9000]), Ok(vec![9000]));
        // Another client adds the same port, then removes it.
        assert_eq!(
            request(&mut c, &mut map, |reply| PortRequest::AddPort {
                port: 9000,
                reply
            }),
            Ok(())
        );
        assert_eq!(
            request(&mut c, &mut map, |reply| PortRequest::RemovePort {
                port: 9000,
                reply
            }),
            Ok(())
        );
        assert!(map.0.contains(&9000), "session 1 still holds it");
        assert!(c.hub.receiver(9000).is_some(), "its channel stays open");
        // A command-line port and a port only subscribed cannot be removed.
        assert_eq!(
            request(&mut c, &mut map, |reply| PortRequest::RemovePort {
                port: 80,
                reply
            }),
            Err(PolicyError::CommandLine(80))
        );
        assert_eq!(
            request(&mut c, &mut map, |reply| PortRequest::RemovePort {
                port: 9000,
                reply
            }),
            Err(PolicyError::NotAdded(9000))
        );
        assert!(map.0.contains(&80) && map.0.contains(&9000));
        c.handle(PortRequest::EndSession { session: 1 }, &mut map);
        assert_eq!(map.0, BTreeSet::from([80]));
    }

    #[test]
    fn an_unsubscribe_releases_only_the_sessions_own_hold() {
        let (mut c, mut map) = control();
        assert_eq!(subscribe(&mut c, &mut map, 1, &[9000]), Ok(vec![9000]));
        // Session 2 unsubscribes a port it never subscribed, and ends.
        request(&mut c, &mut map, |reply| PortRequest::Unsubscribe {
            session: 2,
            ports: vec![9000, 80],
            reply,
        });
        c.handle(PortRequest::EndSession { session: 2 }, &mut map);
        assert!(map.0.contains(&9000) && map.0.contains(&80));
        assert!(c.hub.receiver(9000).is_some());
        request(&mut c, &mut map, |reply| PortRequest::Unsubscribe {
            session: 1,
            ports: vec![9000],
            reply,
        });
        assert_eq!(map.0, BTreeSet::from([80]));
        assert!(c.hub.receiver(9000).is_none());
    }
}

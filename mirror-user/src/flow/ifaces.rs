//! Which interface a record came through: the kernel names it by index,
//! consumers by name (`eth0`, or `NETNS:eth0` for another namespace).

use std::{collections::HashMap, sync::Arc};

use parking_lot::RwLock;

use crate::flow::model::Iface;

/// The watched interfaces by index, filled as they are attached and
/// emptied as they go. Read once per new connection (not per packet), and
/// written only when an interface is attached or detached, so the lock is
/// never contended on the data path.
///
/// The mirror refuses to watch two interfaces with one index at once (see
/// `pipeline::setup`): a record carries the index only.
#[derive(Debug, Clone, Default)]
pub struct IfaceNames(Arc<RwLock<HashMap<u32, Iface>>>);

impl IfaceNames {
    pub fn insert(&self, ifindex: u32, name: &str) {
        self.0.write().insert(ifindex, Iface::from(name));
    }

    pub fn remove(&self, ifindex: u32) {
        self.0.write().remove(&ifindex);
    }

    /// The interface `ifindex` names; empty for one the mirror does not
    /// watch (any more).
    pub fn name(&self, ifindex: u32) -> Iface {
        self.0.read().get(&ifindex).cloned().unwrap_or_default()
    }

    /// The one who has `ifindex`, if the mirror watches it.
    pub fn get(&self, ifindex: u32) -> Option<Iface> {
        self.0.read().get(&ifindex).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_attach_and_detach() {
        let names = IfaceNames::default();
        names.insert(2, "pod1:eth0");
        let shared = names.clone();
        assert_eq!(&*shared.name(2), "pod1:eth0");
        assert_eq!(&*shared.name(3), "");
        names.remove(2);
        assert_eq!(shared.get(2), None);
    }
}

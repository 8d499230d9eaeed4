//! Which interface a record came through: the kernel names it by index
//! (and, when the mirror watches several namespaces, by the namespace's
//! cookie), consumers by name (`eth0`, or `NETNS:eth0` for another
//! namespace).

use std::{collections::HashMap, sync::Arc};

use parking_lot::RwLock;

use crate::flow::model::Iface;

/// An interface as records name it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct IfaceId {
    /// The cookie of its network namespace, or 0 when records do not carry
    /// it (one namespace watched, where indexes are unique).
    pub netns: u64,
    pub index: u32,
}

impl IfaceId {
    /// An interface of the only namespace watched.
    pub const fn index(index: u32) -> Self {
        Self { netns: 0, index }
    }
}

/// The watched interfaces, filled as they are attached and emptied as they
/// go. Read once per new connection (not per packet), and written only
/// when an interface is attached or detached, so the lock is never
/// contended on the data path.
#[derive(Debug, Clone, Default)]
pub struct IfaceNames(Arc<RwLock<HashMap<IfaceId, Iface>>>);

impl IfaceNames {
    pub fn insert(&self, id: IfaceId, name: &str) {
        self.0.write().insert(id, Iface::from(name));
    }

    pub fn remove(&self, id: IfaceId) {
        self.0.write().remove(&id);
    }

    /// The interface `id` names; empty for one the mirror does not watch
    /// (any more).
    pub fn name(&self, id: IfaceId) -> Iface {
        self.0.read().get(&id).cloned().unwrap_or_default()
    }

    /// The one who has `id`, if the mirror watches it.
    pub fn get(&self, id: IfaceId) -> Option<Iface> {
        self.0.read().get(&id).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_attach_and_detach() {
        let names = IfaceNames::default();
        names.insert(IfaceId::index(2), "pod1:eth0");
        let shared = names.clone();
        assert_eq!(&*shared.name(IfaceId::index(2)), "pod1:eth0");
        assert_eq!(&*shared.name(IfaceId::index(3)), "");
        names.remove(IfaceId::index(2));
        assert_eq!(shared.get(IfaceId::index(2)), None);
    }

    #[test]
    fn one_index_in_two_namespaces_names_two_interfaces() {
        let names = IfaceNames::default();
        let pod = |netns| IfaceId { netns, index: 2 };
        names.insert(pod(0x1001), "pod1:eth0");
        names.insert(pod(0x1002), "pod2:eth0");
        assert_eq!(&*names.name(pod(0x1001)), "pod1:eth0");
        assert_eq!(&*names.name(pod(0x1002)), "pod2:eth0");
        assert_eq!(&*names.name(IfaceId::index(2)), "");
    }
}

//! Consumers of the mirror's output.

pub mod dump;
pub mod events;
pub mod forward;
pub mod packets;
pub mod pcap;

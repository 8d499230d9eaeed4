//! Consumers of the mirror's output.

pub mod dump;
pub mod forward;
pub mod pcap;
pub mod print;
pub mod print_packets;
#[cfg(test)]
mod test_events;

//! Consumers of the mirror's output.

pub mod dump;
pub mod events;
pub mod packets;

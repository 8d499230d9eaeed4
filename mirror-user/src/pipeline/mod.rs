//! The stages of `mirror run` between the rings and the consumers.

pub mod shards;

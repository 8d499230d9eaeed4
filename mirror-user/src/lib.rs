//! Library of the `mirror` binary: loading and attaching the kernel
//! programs, draining their rings, tracking and reassembling TCP
//! connections, and fanning the streams out to consumers.

pub mod attach;
pub mod cli;
pub mod client;
pub mod clock;
pub mod conntrack;
pub mod control;
pub mod counters;
pub mod drain;
pub mod hub;
pub mod loader;
pub mod output_dir;
pub mod ports;
pub mod privileged_helper;
pub mod privileges;
pub mod protocol;
pub mod reassembly;
pub mod record;
pub mod segment;
pub mod server;
pub mod session_wire;
pub mod shards;
pub mod sinks;
pub mod stream;

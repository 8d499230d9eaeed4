//! Library of the `mirror` binary: loading and attaching the kernel
//! programs, draining their rings, tracking and reassembling TCP
//! connections, and fanning the streams out to consumers.

pub mod arena;
pub mod control;
pub mod fanout;
pub mod files;
pub mod flow;
pub mod kernel;
pub mod nats;
pub mod pipeline;
pub mod server;
pub mod sinks;
pub mod telemetry;
pub mod text;

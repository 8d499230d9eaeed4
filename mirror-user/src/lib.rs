//! Library of the `mirror` binary: loading and attaching the kernel
//! programs, draining their rings, decoding and printing records.

pub mod attach;
pub mod cli;
pub mod clock;
pub mod counters;
pub mod drain;
pub mod loader;
pub mod print;
pub mod privileges;
pub mod record;

//! Everything that touches BPF or the kernel's privileges.

pub mod attach;
pub mod btf;
pub mod clock;
pub mod counters;
pub mod drain;
pub mod hotplug;
pub mod loader;
pub mod netns;
pub mod privileged_helper;
pub mod privileges;
pub mod record;
pub mod ring_fill;
pub mod ring_reader;

//! Flows, sans-IO: TCP segments and the time go in, stream events come out.

pub mod conntrack;
pub mod ifaces;
pub mod model;
pub mod reassembly;
pub mod segment;

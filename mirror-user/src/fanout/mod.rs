//! Fan-out of stream events to consumers.

pub mod hub;

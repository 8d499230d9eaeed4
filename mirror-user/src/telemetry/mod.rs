//! Counters of every stage.

pub mod counters;

//! Fan-out of stream events to consumers: one bounded broadcast channel
//! per mirrored port.
//!
//! Shards publish events in batches (one channel slot per batch), so the
//! memory a channel can hold is bounded by its capacity times the batch
//! size: that is the byte budget. A consumer that falls behind loses only
//! its own connections of that port, each closed as `lagged`; the producer
//! never waits and other consumers see nothing of it.
//!
//! Ports come and go while the mirror runs: the main task opens and closes
//! channels; a consumer's subscription gains and loses ports, and the
//! connections it had open on a port it leaves end as `shutdown`.

pub mod batcher;
pub mod counters;
pub mod hub;
pub mod subscription;
#[cfg(test)]
mod tests;

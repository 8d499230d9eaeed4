//! Reassembly of one direction of a TCP connection into an in-order byte
//! stream, as a sans-IO state machine: segments and the current time go
//! in, in-order payload comes out; no sockets, no clock, no tasks.
//!
//! Retransmitted and overlapping bytes are delivered once. Segments that
//! arrive early wait in a reorder buffer bounded in bytes and time (the
//! rings of different CPUs can interleave one flow). A hole that the
//! budget cannot wait for ends the stream with a [`Hole`]: nothing after a
//! hole is ever delivered as if it followed it.

use std::collections::BTreeMap;

use bytes::Bytes;

/// Budgets of one direction's reorder buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReorderLimits {
    /// Payload bytes held behind a hole before giving up on it.
    pub max_bytes: usize,
    /// Nanoseconds a hole may stay open before giving up on it.
    pub max_wait_ns: u64,
}

/// Segments further than this from the next expected byte, either way, are
/// not of this stream (an old incarnation of the 4-tuple, or garbage): a
/// TCP window is at most 1 GiB (scale 14).
const MAX_WINDOW: i64 = 1 << 30;

/// Why a hole ended the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoleCause {
    /// It stayed open longer than [`ReorderLimits::max_wait_ns`].
    Timeout,
    /// The bytes held behind it exceeded [`ReorderLimits::max_bytes`].
    Budget,
}

/// A range of the stream that never arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hole {
    /// Sequence number of the first missing byte.
    pub seq: u32,
    /// Missing bytes before the next byte that did arrive.
    pub len: u64,
    pub cause: HoleCause,
}

/// One direction of a connection.
#[derive(Debug)]
pub struct Reassembler {
    /// Sequence number of the next byte to deliver.
    next_seq: u32,
    /// Stream offset of `next_seq`: bytes delivered so far.
    delivered: u64,
    /// Early segments by stream offset.
    held: BTreeMap<u64, Bytes>,
    held_bytes: usize,
    /// When the current first hole opened.
    hole_since: Option<u64>,
    /// Stream offset of the FIN, once seen.
    fin: Option<u64>,
    finished: bool,
    limits: ReorderLimits,
}

impl Reassembler {
    /// A stream whose next byte has sequence number `next_seq` (ISN + 1
    /// after a SYN, or the first data segment's for a midstream pickup).
    pub fn new(next_seq: u32, limits: ReorderLimits) -> Self {
        Self {
            next_seq,
            delivered: 0,
            held: BTreeMap::new(),
            held_bytes: 0,
            hole_since: None,
            fin: None,
            finished: false,
            limits,
        }
    }

    /// Takes one segment at time `now_ns`; payload that is now in order is
    /// appended to `out`. `Err` when a hole ends the stream: `out` then
    /// holds everything before the hole and nothing after it.
    pub fn push(
        &mut self,
        seq: u32,
        payload: Bytes,
        fin: bool,
        now_ns: u64,
        out: &mut Vec<Bytes>,
    ) -> Result<(), Hole> {
        if self.finished {
            return Ok(());
        }
        let rel = i64::from(seq.wrapping_sub(self.next_seq) as i32);
        if !(-MAX_WINDOW..=MAX_WINDOW).contains(&rel) {
            return Ok(());
        }
        let start = self.delivered as i64 + rel;
        let end = start + payload.len() as i64;
        if fin && end >= self.delivered as i64 && self.fin.is_none() {
            self.fin = Some(end as u64);
        }
        // Nothing past the FIN belongs to the stream.
        let end = match self.fin {
            Some(fin) => end.min(fin as i64),
            None => end,
        };

        // Only bytes after what was delivered and before the FIN count (a
        // segment can lie wholly beyond a FIN that overtook it).
        if end > self.delivered as i64 && end > start {
            let payload = payload.slice(..(end - start) as usize);
            if start <= self.delivered as i64 {
                let skip = (self.delivered as i64 - start) as usize;
                self.deliver(payload.slice(skip..), out);
                self.release_held(out);
                // Progress: whatever hole remains is a new one.
                self.hole_since = None;
            } else {
                self.hold(start as u64, payload);
            }
        }

        if self.fin.is_some_and(|fin| self.delivered >= fin) {
            self.finished = true;
            self.held.clear();
            self.held_bytes = 0;
            self.hole_since = None;
            return Ok(());
        }
        if self.has_hole() && self.hole_since.is_none() {
            self.hole_since = Some(now_ns);
        }
        if self.held_bytes > self.limits.max_bytes {
            return Err(self.hole(HoleCause::Budget));
        }
        self.poll(now_ns)
    }

    /// Checks the open hole against the time budget.
    pub fn poll(&self, now_ns: u64) -> Result<(), Hole> {
        match self.hole_since {
            Some(since) if now_ns.saturating_sub(since) > self.limits.max_wait_ns => {
                Err(self.hole(HoleCause::Timeout))
            }
            _ => Ok(()),
        }
    }

    /// Payload bytes waiting behind a hole.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// Bytes delivered so far.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// The FIN was reached in order: the stream is complete.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Sequence number of the next byte the stream waits for.
    pub fn next_seq(&self) -> u32 {
        self.next_seq
    }

    /// Something waits on a hole (held bytes, or a FIN beyond the stream):
    /// [`Self::poll`] has a deadline to check.
    pub fn is_waiting(&self) -> bool {
        self.has_hole()
    }

    fn has_hole(&self) -> bool {
        !self.held.is_empty() || self.fin.is_some_and(|fin| fin > self.delivered)
    }

    fn hole(&self, cause: HoleCause) -> Hole {
        let resumes = self
            .held
            .keys()
            .next()
            .copied()
            .or(self.fin)
            .unwrap_or(self.delivered);
        Hole {
            seq: self.next_seq,
            len: resumes.saturating_sub(self.delivered),
            cause,
        }
    }

    fn deliver(&mut self, payload: Bytes, out: &mut Vec<Bytes>) {
        if payload.is_empty() {
            return;
        }
        self.delivered += payload.len() as u64;
        self.next_seq = self.next_seq.wrapping_add(payload.len() as u32);
        out.push(payload);
    }

    fn hold(&mut self, offset: u64, payload: Bytes) {
        match self.held.get(&offset) {
            Some(existing) if existing.len() >= payload.len() => {}
            Some(existing) => {
                self.held_bytes += payload.len() - existing.len();
                self.held.insert(offset, payload);
            }
            None => {
                self.held_bytes += payload.len();
                self.held.insert(offset, payload);
            }
        }
    }

    /// Delivers held segments that the stream has now reached.
    fn release_held(&mut self, out: &mut Vec<Bytes>) {
        while let Some(entry) = self.held.first_entry() {
            let offset = *entry.key();
            if offset > self.delivered {
                break;
            }
            let payload = entry.remove();
            self.held_bytes -= payload.len();
            let end = offset + payload.len() as u64;
            if end > self.delivered {
                let skip = (self.delivered - offset) as usize;
                self.deliver(payload.slice(skip..), out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const LIMITS: ReorderLimits = ReorderLimits {
        max_bytes: 1 << 20,
        max_wait_ns: 1_000_000_000,
    };

    fn collect(out: &[Bytes]) -> Vec<u8> {
        out.iter().flat_map(|b| b.iter().copied()).collect()
    }

    fn push(
        r: &mut Reassembler,
        seq: u32,
        data: &[u8],
        now: u64,
        out: &mut Vec<Bytes>,
    ) -> Result<(), Hole> {
        r.push(seq, Bytes::copy_from_slice(data), false, now, out)
    }

    #[test]
    fn in_order_segments_pass_through() {
        let mut r = Reassembler::new(100, LIMITS);
        let mut out = Vec::new();
        push(&mut r, 100, b"hello ", 0, &mut out).unwrap();
        push(&mut r, 106, b"world", 0, &mut out).unwrap();
        assert_eq!(collect(&out), b"hello world");
        assert_eq!(r.next_seq(), 111);
        assert_eq!(r.delivered(), 11);
        assert_eq!(r.held_bytes(), 0);
    }

    #[test]
    fn duplicates_and_overlaps_are_delivered_once() {
        let mut r = Reassembler::new(0, LIMITS);
        let mut out = Vec::new();
        push(&mut r, 0, b"abcd", 0, &mut out).unwrap();
        push(&mut r, 0, b"abcd", 0, &mut out).unwrap(); // retransmission
        push(&mut r, 2, b"cdef", 0, &mut out).unwrap(); // overlap
        push(&mut r, 1, b"b", 0, &mut out).unwrap(); // old
        assert_eq!(collect(&out), b"abcdef");
    }

    #[test]
    fn out_of_order_segments_wait_for_the_hole() {
        let mut r = Reassembler::new(0, LIMITS);
        let mut out = Vec::new();
        push(&mut r, 6, b"world", 10, &mut out).unwrap();
        push(&mut r, 3, b"lo ", 20, &mut out).unwrap();
        assert!(out.is_empty(), "nothing after a hole is delivered");
        assert_eq!(r.held_bytes(), 8);
        push(&mut r, 0, b"hel", 30, &mut out).unwrap();
        assert_eq!(collect(&out), b"hello world");
        assert_eq!(r.held_bytes(), 0);
        assert_eq!(r.poll(u64::MAX), Ok(()), "no hole left");
    }

    #[test]
    fn overlapping_held_segments_are_trimmed() {
        let mut r = Reassembler::new(0, LIMITS);
        let mut out = Vec::new();
        push(&mut r, 4, b"efgh", 0, &mut out).unwrap();
        push(&mut r, 2, b"cdef", 0, &mut out).unwrap();
        push(&mut r, 4, b"ef", 0, &mut out).unwrap(); // shorter duplicate of a held one
        push(&mut r, 0, b"ab", 0, &mut out).unwrap();
        assert_eq!(collect(&out), b"abcdefgh");
    }

    #[test]
    fn sequence_numbers_wrap_around() {
        let start = u32::MAX - 3;
        let mut r = Reassembler::new(start, LIMITS);
        let mut out = Vec::new();
        push(&mut r, start.wrapping_add(6), b"ghij", 0, &mut out).unwrap();
        push(&mut r, start, b"abcdef", 0, &mut out).unwrap();
        assert_eq!(collect(&out), b"abcdefghij");
        assert_eq!(r.next_seq(), 6);
    }

    #[test]
    fn a_hole_times_out() {
        let mut r = Reassembler::new(0, LIMITS);
        let mut out = Vec::new();
        push(&mut r, 0, b"ab", 0, &mut out).unwrap();
        push(&mut r, 5, b"fg", 1_000, &mut out).unwrap();
        assert_eq!(r.poll(1_000 + LIMITS.max_wait_ns), Ok(()));
        let hole = r.poll(1_001 + LIMITS.max_wait_ns).unwrap_err();
        assert_eq!(
            hole,
            Hole {
                seq: 2,
                len: 3,
                cause: HoleCause::Timeout
            }
        );
        assert_eq!(collect(&out), b"ab", "only the bytes before the hole");
        // A later segment past the deadline reports the hole too.
        let err = push(&mut r, 9, b"x", 2 * LIMITS.max_wait_ns, &mut out).unwrap_err();
        assert_eq!(err.cause, HoleCause::Timeout);
    }

    #[test]
    fn filling_the_hole_restarts_the_clock_for_the_next_one() {
        let mut r = Reassembler::new(0, LIMITS);
        let mut out = Vec::new();
        push(&mut r, 2, b"c", 0, &mut out).unwrap();
        push(&mut r, 5, b"f", 0, &mut out).unwrap();
        let later = LIMITS.max_wait_ns - 1;
        push(&mut r, 0, b"ab", later, &mut out).unwrap();
        assert_eq!(collect(&out), b"abc");
        assert_eq!(
            r.poll(later + LIMITS.max_wait_ns),
            Ok(()),
            "a new hole, a new clock"
        );
        assert!(r.poll(later + LIMITS.max_wait_ns + 1).is_err());
    }

    #[test]
    fn a_hole_over_the_byte_budget_ends_the_stream() {
        let limits = ReorderLimits {
            max_bytes: 10,
            max_wait_ns: u64::MAX,
        };
        let mut r = Reassembler::new(0, limits);
        let mut out = Vec::new();
        push(&mut r, 1, &[1; 10], 0, &mut out).unwrap();
        let hole = push(&mut r, 11, &[1; 1], 0, &mut out).unwrap_err();
        assert_eq!(
            hole,
            Hole {
                seq: 0,
                len: 1,
                cause: HoleCause::Budget
            }
        );
        assert!(out.is_empty());
    }

    #[test]
    fn fin_completes_the_stream_in_order() {
        let mut r = Reassembler::new(0, LIMITS);
        let mut out = Vec::new();
        r.push(3, Bytes::from_static(b"def"), true, 0, &mut out)
            .unwrap();
        assert!(!r.is_finished(), "FIN behind a hole");
        r.push(0, Bytes::from_static(b"abc"), false, 0, &mut out)
            .unwrap();
        assert!(r.is_finished());
        assert_eq!(collect(&out), b"abcdef");
        // Anything after the FIN is not part of the stream.
        r.push(6, Bytes::from_static(b"zzz"), false, 0, &mut out)
            .unwrap();
        assert_eq!(collect(&out), b"abcdef");
    }

    #[test]
    fn a_fin_behind_a_hole_times_out() {
        let mut r = Reassembler::new(0, LIMITS);
        let mut out = Vec::new();
        r.push(4, Bytes::new(), true, 0, &mut out).unwrap();
        let hole = r.poll(LIMITS.max_wait_ns + 1).unwrap_err();
        assert_eq!(
            hole,
            Hole {
                seq: 0,
                len: 4,
                cause: HoleCause::Timeout
            }
        );
    }

    #[test]
    fn segments_far_outside_the_window_are_ignored() {
        let mut r = Reassembler::new(0, LIMITS);
        let mut out = Vec::new();
        push(&mut r, 1 << 31, b"junk", 0, &mut out).unwrap();
        assert_eq!(r.held_bytes(), 0);
        push(&mut r, 0, b"ok", 0, &mut out).unwrap();
        assert_eq!(collect(&out), b"ok");
    }

    /// ISN, the stream, segments as (start, length), which are lost, and
    /// the order they arrive in.
    type Scenario = (u32, Vec<u8>, Vec<(usize, usize)>, Vec<bool>, Vec<usize>);

    /// A known byte stream, cut into segments (some duplicated, some
    /// lost), delivered in a shuffled order.
    fn scenario() -> impl Strategy<Value = Scenario> {
        (any::<u32>(), prop::collection::vec(any::<u8>(), 0..3000)).prop_flat_map(|(isn, data)| {
            let len = data.len();
            let cuts = prop::collection::vec((0..=len, 1usize..400), 0..40);
            (Just(isn), Just(data), cuts).prop_flat_map(|(isn, data, cuts)| {
                let mut segments: Vec<(usize, usize)> = Vec::new();
                // Cover the stream in order, then add random extra pieces
                // (duplicates and overlaps).
                let mut at = 0;
                let mut sizes = cuts.iter().map(|(_, s)| *s).cycle();
                while at < data.len() {
                    let size = sizes.next().unwrap_or(100).min(data.len() - at);
                    segments.push((at, size));
                    at += size;
                }
                for (start, size) in &cuts {
                    let start = (*start).min(data.len());
                    segments.push((start, (*size).min(data.len() - start)));
                }
                let n = segments.len();
                (
                    Just(isn),
                    Just(data),
                    Just(segments),
                    prop::collection::vec(prop::bool::weighted(0.1), n),
                    Just((0..n).collect::<Vec<_>>()).prop_shuffle(),
                )
            })
        })
    }

    proptest! {
        /// The output is always the exact stream, or an exact prefix of it
        /// that ends with a reported hole.
        #[test]
        fn output_is_the_stream_or_a_prefix_then_a_hole(
            (isn, data, segments, lost, order) in scenario()
        ) {
            let mut r = Reassembler::new(isn, LIMITS);
            let mut out = Vec::new();
            let mut hole = None;
            let mut covered = vec![false; data.len()];
            for (step, index) in order.iter().enumerate() {
                let (start, size) = segments[*index];
                if lost[*index] {
                    continue;
                }
                covered[start..start + size].iter_mut().for_each(|c| *c = true);
                let seq = isn.wrapping_add(start as u32);
                let payload = Bytes::copy_from_slice(&data[start..start + size]);
                // The segment that ends the stream carries the FIN, and its
                // retransmissions too; junk beyond the FIN must be ignored.
                let fin = start + size == data.len();
                if let Err(h) = r.push(seq, payload, fin, step as u64, &mut out) {
                    hole = Some(h);
                    break;
                }
                let beyond = isn.wrapping_add(data.len() as u32 + 1 + step as u32);
                if let Err(h) = r.push(beyond, Bytes::from_static(b"junk"), false, step as u64, &mut out) {
                    hole = Some(h);
                    break;
                }
            }
            if hole.is_none() {
                hole = r.poll(u64::MAX).err();
            }
            let delivered = collect(&out);
            prop_assert_eq!(&delivered[..], &data[..delivered.len()], "a prefix of the stream");
            let complete = covered.iter().all(|c| *c);
            if complete {
                prop_assert_eq!(delivered.len(), data.len());
                prop_assert!(hole.is_none(), "no hole in a complete stream: {:?}", hole);
                prop_assert!(r.is_finished() || data.is_empty(), "the FIN completes it");
            } else {
                let first_missing = covered.iter().position(|c| !c).unwrap();
                prop_assert_eq!(delivered.len(), first_missing, "stops at the first missing byte");
                // A missing tail is not a hole until something (a later
                // segment or the FIN) follows it.
                let tail_only = covered[first_missing..].iter().all(|c| !c);
                let fin_seen = segments.iter().zip(&lost).any(|((start, size), lost)| {
                    !lost && start + size == data.len()
                });
                if !tail_only || fin_seen {
                    let hole = hole.expect("a hole is reported");
                    prop_assert_eq!(hole.seq, isn.wrapping_add(first_missing as u32));
                }
            }
        }
    }
}

//! Reassembly of one direction of a TCP connection into an in-order byte
//! stream, as a sans-IO state machine: segments and the current time go
//! in, in-order payload comes out; no sockets, no clock, no tasks.
//!
//! Retransmitted and overlapping bytes are delivered once: the copy that
//! arrives first wins (a byte already delivered or held is never replaced
//! by a later copy, except that a longer segment replaces a shorter one
//! held at the same offset). Segments that arrive early wait in a reorder
//! buffer bounded in memory and time (the rings of different CPUs can
//! interleave one flow). A hole that the budget cannot wait for ends the
//! stream with a [`Hole`]: nothing after a hole is ever delivered as if it
//! followed it, and nothing after the FIN is delivered at all.
//!
//! Under `--deliver acked` ([`Reassembler::with_acks`]) the bytes released
//! in order wait once more, for the receiver's ACK ([`Reassembler::acknowledge`]):
//! what comes out is what the receiver's TCP took. A later copy of bytes
//! that still wait for their ACK and differs from them ends the stream (the
//! mirror cannot tell which copy the receiver kept).

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;

use crate::flow::segment::OWN_ALLOCATION;

/// Budgets of one direction's reorder buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReorderLimits {
    /// Memory held behind a hole before giving up on it, as
    /// [`held_cost`] counts it.
    pub max_bytes: usize,
    /// Nanoseconds a hole may stay open before giving up on it.
    pub max_wait_ns: u64,
}

/// Memory a held segment costs besides its payload's allocation: its
/// entry in the reorder map (a B-tree leaf holds up to 11 entries of 40
/// bytes in 464 bytes of heap, and as few as 5 after removals, plus a
/// share of the inner nodes: up to about 110 bytes per entry) or in the
/// list of segments waiting for a SYN (40 bytes an entry, up to twice
/// that while the list grows).
pub const SEGMENT_OVERHEAD: usize = 128;

/// Memory holding a segment of `len` payload bytes costs: the payload's
/// own allocation (malloc adds an 8-byte header, rounds to 16 bytes and
/// allocates at least 32) plus [`SEGMENT_OVERHEAD`]. Every budget of held
/// bytes counts this, so that a million one-byte segments cost what they
/// really cost and not a million bytes.
pub const fn held_cost(len: usize) -> usize {
    let chunk = (len + 8).next_multiple_of(16);
    (if chunk < 32 { 32 } else { chunk }) + SEGMENT_OVERHEAD
}

/// `payload` in an allocation of its own, to be held. Small payloads
/// arrive as slices of 1 MiB pool buffers (see `segment.rs`), and a slice
/// keeps its whole buffer alive: one held byte would pin a megabyte, so
/// they are copied (a small copy, on the out-of-order path). A whole
/// payload of [`OWN_ALLOCATION`] bytes or more already has an allocation
/// of its own and is held as it is; a part of one (`whole` false) is
/// copied, so that what is held is always exactly what [`held_cost`]
/// counts.
pub fn detach(payload: &Bytes, whole: bool) -> Bytes {
    if whole && payload.len() >= OWN_ALLOCATION {
        payload.clone()
    } else {
        Bytes::copy_from_slice(payload)
    }
}

/// Segments further than this from the next expected byte, either way, are
/// not of this stream (an old incarnation of the 4-tuple, or garbage): a
/// TCP window is at most 1 GiB (scale 14).
const MAX_WINDOW: i64 = 1 << 30;
/// How far from what the mirror saw a segment may lie and still be taken
/// under `--deliver acked` ([`Reassembler::is_plausible`]): larger than
/// Linux's largest receive window by default (6 MiB) and than what the
/// mirror may not have seen yet of a sender (records still in another
/// CPU's ring), and a 256th of the sequence space, which a blind spoof
/// must hit.
const PLAUSIBLE_WINDOW: i64 = 16 << 20;

/// Why a hole ended the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoleCause {
    /// It stayed open longer than [`ReorderLimits::max_wait_ns`].
    Timeout,
    /// The bytes held behind it exceeded [`ReorderLimits::max_bytes`].
    Budget,
    /// A new connection took the 4-tuple while the stream still waited
    /// for bytes before its FIN.
    Superseded,
    /// `--deliver acked`: a later copy of bytes waiting for their ACK
    /// differs from the one the mirror holds (the range is the overlap).
    ConflictingCopy,
    /// `--deliver acked`: the bytes waiting for their ACK (with those held
    /// behind a hole) exceeded [`ReorderLimits::max_bytes`].
    Unacknowledged,
}

impl HoleCause {
    /// Whether the range is bytes that never arrived (rather than bytes
    /// that arrived and cannot be vouched for).
    pub const fn is_missing(self) -> bool {
        matches!(self, Self::Timeout | Self::Budget | Self::Superseded)
    }
}

/// An ACK number that acknowledges bytes the sender never sent: the
/// receiver of such a segment drops it (Linux `tcp_ack`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidAck;

/// Bytes released in order that wait for the receiver's ACK: slices of
/// what came in (not copies), counted as payload plus [`SEGMENT_OVERHEAD`]
/// each.
#[derive(Debug, Default)]
struct Unacked {
    slices: VecDeque<Bytes>,
    /// Bytes in `slices`: they end at the stream's `delivered` offset.
    bytes: u64,
    /// Memory of `slices`.
    cost: usize,
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
    /// Early segments by stream offset, each in an allocation of its own
    /// ([`detach`]), none past the FIN once it is known.
    held: BTreeMap<u64, Bytes>,
    /// Memory of `held`, as [`held_cost`] counts it.
    held_bytes: usize,
    /// When the current first hole opened.
    hole_since: Option<u64>,
    /// Stream offset of the FIN, once seen.
    fin: Option<u64>,
    /// Stream offset just past the furthest sequence number the sender
    /// has used (its last byte, or its FIN): the right edge of the window
    /// in which an RST is believed.
    shown: u64,
    finished: bool,
    limits: ReorderLimits,
    /// `--deliver acked`: released bytes waiting for the receiver's ACK
    /// (None: `seen`, released bytes are delivered at once). Boxed: a
    /// connection's entry stays small under `seen`.
    unacked: Option<Box<Unacked>>,
    /// Stream offset the receiver acknowledged (the FIN counts one), once
    /// it acknowledged something; negative for bytes before a midstream
    /// start.
    acked: Option<i64>,
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
            shown: 0,
            finished: false,
            limits,
            unacked: None,
            acked: None,
        }
    }

    /// A stream whose released bytes are delivered only once the
    /// receiver's ACK covers them (`--deliver acked`), and whose FIN counts
    /// only once acknowledged.
    pub fn with_acks(next_seq: u32, limits: ReorderLimits) -> Self {
        Self {
            unacked: Some(Box::default()),
            ..Self::new(next_seq, limits)
        }
    }

    /// Takes the receiver's ACK number `ack` for this stream: bytes waiting
    /// for it that it covers are appended to `out`. `Err` (and nothing
    /// changes) when it acknowledges beyond anything the sender used.
    pub fn acknowledge(&mut self, ack: u32, out: &mut Vec<Bytes>) -> Result<(), InvalidAck> {
        let rel = i64::from(ack.wrapping_sub(self.next_seq) as i32);
        let offset = self.delivered as i64 + rel;
        if offset > self.shown.max(self.delivered) as i64 {
            return Err(InvalidAck);
        }
        if self.acked.is_none_or(|acked| offset > acked) {
            self.acked = Some(offset);
        }
        self.release_acked(out);
        Ok(())
    }

    /// Bytes of the stream the receiver acknowledged (its FIN not
    /// counted); 0 before any ACK.
    pub fn acked_bytes(&self) -> u64 {
        let acked = self.acked.unwrap_or(0).max(0) as u64;
        self.fin.map_or(acked, |fin| acked.min(fin))
    }

    /// The receiver's latest ACK number (its RCV.NXT as it last said), if
    /// it sent one.
    pub fn acked_seq(&self) -> Option<u32> {
        let ahead = self.acked? - self.delivered as i64;
        Some(self.next_seq.wrapping_add(ahead as u32))
    }

    /// Memory of the bytes waiting for their ACK.
    pub fn unacked_cost(&self) -> usize {
        self.unacked.as_ref().map_or(0, |u| u.cost)
    }

    /// Bytes released in order and still waiting for their ACK.
    pub fn unacked_bytes(&self) -> u64 {
        self.unacked.as_ref().map_or(0, |u| u.bytes)
    }

    /// Memory this stream holds: behind a hole and waiting for its ACK.
    pub fn memory(&self) -> usize {
        self.held_bytes + self.unacked_cost()
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
        let Some(start) = self.offset(seq) else {
            return Ok(());
        };
        self.check_copy(start, &payload)?;
        if self.finished {
            return Ok(());
        }
        let end = start + payload.len() as i64;
        if fin && end >= self.delivered as i64 && self.fin.is_none() {
            self.learn_fin(end as u64);
        }
        // Nothing past the FIN belongs to the stream.
        let end = match self.fin {
            Some(fin) => end.min(fin as i64),
            None => end,
        };
        // A segment without payload or FIN uses no sequence number: a
        // spoofed pure ACK far ahead must not stretch what the sender is
        // taken to have sent (the edge that ACKs and RSTs are checked
        // against).
        self.shown = match self.fin {
            Some(fin) => fin + 1,
            None if payload.is_empty() => self.shown,
            None => self.shown.max(end.max(0) as u64),
        };

        // Only bytes after what was delivered and before the FIN count (a
        // segment can lie wholly beyond a FIN that overtook it).
        if end > self.delivered as i64 && end > start {
            let whole = end - start == payload.len() as i64;
            let payload = payload.slice(..(end - start) as usize);
            if start <= self.delivered as i64 {
                let skip = (self.delivered as i64 - start) as usize;
                self.deliver(payload.slice(skip..), out);
                self.release_held(out);
                // Progress: whatever hole remains is a new one.
                self.hole_since = None;
            } else {
                self.hold(start as u64, &payload, whole);
            }
        }

        if let Some(unacked) = &self.unacked
            && self.held_bytes + unacked.cost > self.limits.max_bytes
        {
            return Err(Hole {
                seq: self.next_seq.wrapping_sub(unacked.bytes as u32),
                len: unacked.bytes,
                cause: HoleCause::Unacknowledged,
            });
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

    /// Whether an RST with sequence number `seq` ends this stream, as far
    /// as this one direction shows (RFC 5961 section 3.2 asks for the
    /// receiver's window, which the mirror does not see: the server's
    /// window and its RCV.NXT are in the other direction). Believed: the
    /// next byte the stream expects, and anything up to just past the
    /// furthest byte or FIN the sender has used. A sender's RST carries
    /// its SND.NXT, which is at most that edge, and the receiver's RCV.NXT
    /// lies between our next byte (we may miss bytes it got) and that
    /// edge; every byte the sender used was inside the receiver's window
    /// when sent, so this range is a part of the window the receiver
    /// would check. A blind attacker must hit it to end the stream.
    pub fn accepts_rst(&self, seq: u32) -> bool {
        let rel = i64::from(seq.wrapping_sub(self.next_seq) as i32);
        rel >= 0 && self.delivered + rel as u64 <= self.shown.max(self.delivered)
    }

    /// Whether a segment of this stream at `seq` is one its receiver could
    /// take: no further behind what was delivered, or ahead of the
    /// furthest byte the sender used, than [`PLAUSIBLE_WINDOW`] (or the
    /// reorder budget, if larger). The receiver drops a segment outside
    /// its window without looking at its ACK, and so does the mirror under
    /// `--deliver acked`: otherwise a blind spoof anywhere in the 2^31
    /// half of the sequence space could acknowledge bytes for the
    /// receiver.
    pub fn is_plausible(&self, seq: u32) -> bool {
        let rel = i64::from(seq.wrapping_sub(self.next_seq) as i32);
        let budget = (self.limits.max_bytes as i64).max(PLAUSIBLE_WINDOW);
        let edge = self.shown.max(self.delivered) as i64;
        rel >= -budget && self.delivered as i64 + rel <= edge + budget
    }

    /// Whether `seq` lies beyond the furthest sequence number the sender
    /// has used, yet plausibly in this stream: an RST there may have
    /// overtaken the sender's last segments (they can sit in another CPU's
    /// ring).
    pub fn is_ahead(&self, seq: u32) -> bool {
        let rel = i64::from(seq.wrapping_sub(self.next_seq) as i32);
        self.delivered as i64 + rel > self.shown.max(self.delivered) as i64 && rel <= MAX_WINDOW
    }

    /// Sequence number just past the furthest byte (or FIN) the sender
    /// has used: what the sender's RST would carry now.
    pub fn shown_seq(&self) -> u32 {
        let ahead = self.shown.max(self.delivered) - self.delivered;
        self.next_seq.wrapping_add(ahead as u32)
    }

    /// Memory held behind a hole, as [`held_cost`] counts it.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// Bytes delivered so far.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// The FIN was reached in order (and, waiting for ACKs, acknowledged):
    /// the stream is complete.
    pub fn is_finished(&self) -> bool {
        self.finished
            && (self.unacked.is_none()
                || self
                    .acked
                    .zip(self.fin)
                    .is_some_and(|(acked, fin)| acked > fin as i64))
    }

    /// The sender's FIN was seen, in order or not: the sender is done.
    pub fn fin_seen(&self) -> bool {
        self.fin.is_some()
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

    /// The hole the stream waits on now, if any, as ended by `cause`.
    pub fn open_hole(&self, cause: HoleCause) -> Option<Hole> {
        self.has_hole().then(|| self.hole(cause))
    }

    /// Panics if the internal bookkeeping is off: what is held is not what
    /// is counted, or something is held where it can never be delivered.
    /// For tests and the fuzz targets.
    pub fn assert_consistent(&self) {
        let counted: usize = self.held.values().map(|p| held_cost(p.len())).sum();
        assert_eq!(self.held_bytes, counted, "held memory is counted exactly");
        for (offset, payload) in &self.held {
            assert!(
                *offset > self.delivered,
                "held at {offset}, delivered {}",
                self.delivered
            );
            assert!(!payload.is_empty(), "an empty segment held at {offset}");
            if let Some(fin) = self.fin {
                assert!(
                    offset + payload.len() as u64 <= fin,
                    "bytes held beyond the FIN at {fin}"
                );
            }
        }
        if let Some(fin) = self.fin {
            assert!(self.delivered <= fin, "delivered past the FIN at {fin}");
            assert_eq!(self.shown, fin + 1);
        }
        assert!(!self.finished || self.held.is_empty());
        assert_eq!(self.finished, self.fin == Some(self.delivered));
        if let Some(unacked) = &self.unacked {
            let bytes: u64 = unacked.slices.iter().map(|s| s.len() as u64).sum();
            let cost: usize = unacked
                .slices
                .iter()
                .map(|s| s.len() + SEGMENT_OVERHEAD)
                .sum();
            assert_eq!(unacked.bytes, bytes, "bytes waiting for an ACK");
            assert_eq!(unacked.cost, cost, "their memory");
            assert!(unacked.bytes <= self.delivered);
            assert!(unacked.slices.iter().all(|s| !s.is_empty()));
            if unacked.bytes > 0 {
                let from = (self.delivered - unacked.bytes) as i64;
                assert!(
                    self.acked.is_none_or(|acked| acked <= from),
                    "acknowledged bytes still wait"
                );
            }
        }
    }

    /// Stream offset of `seq`, if it is plausibly of this stream.
    fn offset(&self, seq: u32) -> Option<i64> {
        let rel = i64::from(seq.wrapping_sub(self.next_seq) as i32);
        (-MAX_WINDOW..=MAX_WINDOW)
            .contains(&rel)
            .then_some(self.delivered as i64 + rel)
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
        debug_assert!(
            self.fin
                .is_none_or(|fin| self.delivered + payload.len() as u64 <= fin),
            "a byte past the FIN"
        );
        self.delivered += payload.len() as u64;
        self.next_seq = self.next_seq.wrapping_add(payload.len() as u32);
        match &mut self.unacked {
            Some(unacked) => {
                // A small slice would pin its whole 1 MiB pool buffer (or
                // arena chunk) while it waits, and a flood of segments
                // that are never acknowledged would pin gigabytes behind
                // a few bytes counted: waiting slices own their memory
                // (see `detach`). Large payloads already have an
                // allocation of their own and are not copied; the arena's
                // chunks are its own bounded memory.
                let payload = detach(&payload, true);
                unacked.bytes += payload.len() as u64;
                unacked.cost += payload.len() + SEGMENT_OVERHEAD;
                unacked.slices.push_back(payload);
                // The receiver may have acknowledged them already (the
                // mirror missed them for a while).
                self.release_acked(out);
            }
            None => out.push(payload),
        }
    }

    /// Delivers the bytes waiting for an ACK that the receiver's ACK
    /// covers, splitting a slice at the acknowledged boundary.
    fn release_acked(&mut self, out: &mut Vec<Bytes>) {
        let (Some(unacked), Some(acked)) = (&mut self.unacked, self.acked) else {
            return;
        };
        let mut from = (self.delivered - unacked.bytes) as i64;
        while from < acked
            && let Some(front) = unacked.slices.front_mut()
        {
            let covered = (acked - from).min(front.len() as i64) as usize;
            let bytes = if covered == front.len() {
                unacked.cost -= covered + SEGMENT_OVERHEAD;
                unacked.slices.pop_front().expect("the front slice")
            } else {
                unacked.cost -= covered;
                front.split_to(covered)
            };
            unacked.bytes -= covered as u64;
            from += covered as i64;
            out.push(bytes);
        }
    }

    /// `--deliver acked`: a segment at stream offset `start` must carry the
    /// bytes that wait for their ACK wherever it overlaps them.
    fn check_copy(&self, start: i64, payload: &[u8]) -> Result<(), Hole> {
        let Some(unacked) = self.unacked.as_ref().filter(|u| u.bytes > 0) else {
            return Ok(());
        };
        let waiting_from = (self.delivered - unacked.bytes) as i64;
        let end = start + payload.len() as i64;
        if end <= waiting_from || start >= self.delivered as i64 {
            return Ok(());
        }
        let mut at = waiting_from;
        for slice in &unacked.slices {
            let slice_end = at + slice.len() as i64;
            let (from, to) = (start.max(at), end.min(slice_end));
            if from < to
                && slice[(from - at) as usize..(to - at) as usize]
                    != payload[(from - start) as usize..(to - start) as usize]
            {
                let overlap_from = start.max(waiting_from);
                let overlap_to = end.min(self.delivered as i64);
                let behind = self.delivered as i64 - overlap_from;
                return Err(Hole {
                    seq: self.next_seq.wrapping_sub(behind as u32),
                    len: (overlap_to - overlap_from) as u64,
                    cause: HoleCause::ConflictingCopy,
                });
            }
            if slice_end >= end {
                break;
            }
            at = slice_end;
        }
        Ok(())
    }

    /// Records the FIN at stream offset `fin`, and drops what is held
    /// beyond it: segments held before the FIN was known may reach past
    /// it, and must never be delivered.
    fn learn_fin(&mut self, fin: u64) {
        self.fin = Some(fin);
        for (_, payload) in self.held.split_off(&fin) {
            self.held_bytes -= held_cost(payload.len());
        }
        for (offset, payload) in &mut self.held {
            let keep = (fin - offset) as usize;
            if payload.len() > keep {
                self.held_bytes -= held_cost(payload.len()) - held_cost(keep);
                // A fresh copy: truncating would share the old allocation.
                *payload = detach(&payload.slice(..keep), false);
            }
        }
    }

    fn hold(&mut self, offset: u64, payload: &Bytes, whole: bool) {
        match self.held.get_mut(&offset) {
            Some(existing) if existing.len() >= payload.len() => {}
            Some(existing) => {
                self.held_bytes += held_cost(payload.len()) - held_cost(existing.len());
                *existing = detach(payload, whole);
            }
            None => {
                self.held_bytes += held_cost(payload.len());
                self.held.insert(offset, detach(payload, whole));
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
            self.held_bytes -= held_cost(payload.len());
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
        assert_eq!(r.held_bytes(), held_cost(5) + held_cost(3));
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
            max_bytes: held_cost(10),
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
    fn data_held_beyond_a_later_fin_is_never_delivered() {
        // 10..20 waits behind a hole; then the FIN turns up at 15.
        let mut r = Reassembler::new(0, LIMITS);
        let mut out = Vec::new();
        push(&mut r, 10, b"klmnoXXXXX", 0, &mut out).unwrap();
        r.push(5, Bytes::from_static(b"fghijklmno"), true, 1, &mut out)
            .unwrap();
        assert_eq!(
            r.held_bytes(),
            held_cost(10) + held_cost(5),
            "the bytes beyond the FIN are no longer held"
        );
        push(&mut r, 0, b"abcde", 2, &mut out).unwrap();
        assert_eq!(collect(&out), b"abcdefghijklmno", "exactly 15 bytes");
        assert!(r.is_finished());
        assert_eq!(r.held_bytes(), 0);
    }

    #[test]
    fn held_segments_do_not_pin_the_buffer_they_came_from() {
        let pool_buffer = Bytes::from(vec![7u8; 1 << 20]);
        let mut r = Reassembler::new(0, LIMITS);
        let mut out = Vec::new();
        r.push(5, pool_buffer.slice(..3), false, 0, &mut out)
            .unwrap();
        assert_eq!(r.held_bytes(), held_cost(3));
        assert!(
            pool_buffer.is_unique(),
            "the held segment is a copy, not a slice of the 1 MiB buffer"
        );
        push(&mut r, 0, b"abcde", 0, &mut out).unwrap();
        assert_eq!(collect(&out), b"abcde\x07\x07\x07");
    }

    #[test]
    fn held_memory_counts_allocations_and_entries() {
        assert_eq!(
            held_cost(1),
            32 + SEGMENT_OVERHEAD,
            "malloc's smallest chunk"
        );
        assert_eq!(held_cost(24), 32 + SEGMENT_OVERHEAD);
        assert_eq!(held_cost(25), 48 + SEGMENT_OVERHEAD);
        assert_eq!(held_cost(1448), 1456 + SEGMENT_OVERHEAD);
        // A longer copy at the same offset replaces a shorter one.
        let mut r = Reassembler::new(0, LIMITS);
        let mut out = Vec::new();
        push(&mut r, 4, b"e", 0, &mut out).unwrap();
        push(&mut r, 4, b"efgh", 0, &mut out).unwrap();
        push(&mut r, 4, b"ef", 0, &mut out).unwrap();
        assert_eq!(r.held_bytes(), held_cost(4));
    }

    #[test]
    fn an_rst_is_believed_only_from_the_next_byte_to_the_furthest_one_sent() {
        let mut r = Reassembler::new(1000, LIMITS);
        let mut out = Vec::new();
        assert!(r.accepts_rst(1000), "exactly the next byte");
        assert!(!r.accepts_rst(1001), "nothing was sent beyond it yet");
        assert!(!r.accepts_rst(999));
        push(&mut r, 1000, b"abcd", 0, &mut out).unwrap();
        push(&mut r, 1010, b"klmn", 0, &mut out).unwrap(); // behind a hole
        assert!(!r.accepts_rst(1003), "before the next expected byte");
        for seq in [1004, 1010, 1014] {
            assert!(r.accepts_rst(seq), "{seq} is within what the client sent");
        }
        assert!(!r.accepts_rst(1015));
        assert!(!r.accepts_rst(1004u32.wrapping_add(1 << 31)));
        // After a FIN, the client's next sequence number is the FIN's + 1.
        r.push(1014, Bytes::new(), true, 0, &mut out).unwrap();
        assert!(r.fin_seen());
        assert!(r.accepts_rst(1015));
        assert!(!r.accepts_rst(1016));
        assert_eq!(r.shown_seq(), 1015);
        assert!(r.is_ahead(1016));
        assert!(!r.is_ahead(1015));
        assert!(!r.is_ahead(1000 + (1 << 31)), "not of this stream");
        // Sequence numbers wrap.
        let r = Reassembler::new(u32::MAX, LIMITS);
        assert!(r.accepts_rst(u32::MAX));
        assert!(!r.accepts_rst(0));
        assert!(r.is_ahead(0));
        assert_eq!(r.shown_seq(), u32::MAX);
    }

    #[test]
    fn with_acks_bytes_wait_for_the_receivers_ack() {
        let mut r = Reassembler::with_acks(1000, LIMITS);
        let mut out = Vec::new();
        push(&mut r, 1000, b"abcdef", 0, &mut out).unwrap();
        assert!(out.is_empty());
        assert_eq!(r.unacked_bytes(), 6);
        assert_eq!(r.memory(), 6 + SEGMENT_OVERHEAD);
        // Beyond anything sent: refused, nothing changes.
        assert_eq!(r.acknowledge(1007, &mut out), Err(InvalidAck));
        assert_eq!(r.acked_seq(), None);
        // A partial ACK splits the slice, without a copy.
        r.acknowledge(1002, &mut out).unwrap();
        assert_eq!(collect(&out), b"ab");
        assert_eq!(r.memory(), 4 + SEGMENT_OVERHEAD);
        // Bytes behind a hole that the receiver already acknowledged come
        // out as soon as the hole fills.
        push(&mut r, 1008, b"ij", 0, &mut out).unwrap();
        r.acknowledge(1010, &mut out).unwrap();
        assert_eq!(collect(&out), b"abcdef");
        push(&mut r, 1006, b"gh", 0, &mut out).unwrap();
        assert_eq!(collect(&out), b"abcdefghij");
        assert_eq!(r.acked_seq(), Some(1010));
        assert_eq!(r.acked_bytes(), 10);
        r.assert_consistent();
        // The FIN counts once acknowledged.
        r.push(1010, Bytes::new(), true, 0, &mut out).unwrap();
        assert!(!r.is_finished());
        r.acknowledge(1011, &mut out).unwrap();
        assert!(r.is_finished());
        assert_eq!(r.acked_bytes(), 10, "the FIN is not a byte");
    }

    #[test]
    fn with_acks_a_different_copy_of_waiting_bytes_is_a_conflict() {
        let mut r = Reassembler::with_acks(0, LIMITS);
        let mut out = Vec::new();
        push(&mut r, 0, b"abc", 0, &mut out).unwrap();
        push(&mut r, 3, b"def", 0, &mut out).unwrap();
        r.acknowledge(1, &mut out).unwrap();
        push(&mut r, 0, b"Xbcd", 0, &mut out).unwrap(); // X was acknowledged
        push(&mut r, 2, b"cdefg", 0, &mut out).unwrap();
        let conflict = push(&mut r, 4, b"eF", 0, &mut out).unwrap_err();
        assert_eq!(
            conflict,
            Hole {
                seq: 4,
                len: 2,
                cause: HoleCause::ConflictingCopy
            }
        );
        assert_eq!(collect(&out), b"a");
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

    /// ISN, the stream, where its FIN is, segments as (start, length),
    /// which are lost, and the order they arrive in.
    type Scenario = (
        u32,
        Vec<u8>,
        usize,
        Vec<(usize, usize)>,
        Vec<bool>,
        Vec<usize>,
    );

    /// A known byte stream with its FIN at `fin`, followed by bytes a
    /// client should never send (beyond its FIN), cut into segments (some
    /// duplicated, some overlapping the FIN, some wholly beyond it, some
    /// lost), delivered in a shuffled order. Segments that end exactly at
    /// the FIN carry it, and so does a bare FIN.
    fn scenario() -> impl Strategy<Value = Scenario> {
        (
            any::<u32>(),
            prop::collection::vec(any::<u8>(), 0..3000),
            prop::collection::vec(any::<u8>(), 1..400),
        )
            .prop_flat_map(|(isn, data, beyond)| {
                let fin = data.len();
                let stream: Vec<u8> = data.into_iter().chain(beyond).collect();
                let len = stream.len();
                // Extra pieces start anywhere, and often just before the
                // FIN so that they straddle it.
                let start = prop_oneof![0..=len, fin.saturating_sub(400)..=fin];
                let cuts = prop::collection::vec((start, 1usize..400), 0..40);
                (Just(isn), Just(stream), Just(fin), cuts)
            })
            .prop_flat_map(|(isn, stream, fin, cuts)| {
                let mut segments: Vec<(usize, usize)> = Vec::new();
                // Cover the stream up to its FIN in order, then add the
                // extra pieces and a bare FIN.
                let mut at = 0;
                let mut sizes = cuts.iter().map(|(_, s)| *s).cycle();
                while at < fin {
                    let size = sizes.next().unwrap_or(100).min(fin - at);
                    segments.push((at, size));
                    at += size;
                }
                for (start, size) in &cuts {
                    let start = (*start).min(stream.len());
                    segments.push((start, (*size).min(stream.len() - start)));
                }
                segments.push((fin, 0));
                let n = segments.len();
                (
                    Just(isn),
                    Just(stream),
                    Just(fin),
                    Just(segments),
                    prop::collection::vec(prop::bool::weighted(0.1), n),
                    Just((0..n).collect::<Vec<_>>()).prop_shuffle(),
                )
            })
    }

    /// The reassembler's contract byte by byte, written for clarity rather
    /// than speed: a byte is delivered once every byte before it arrived;
    /// the first FIN at or after the delivered bytes bounds the stream.
    struct Model {
        arrived: Vec<bool>,
        delivered: usize,
        fin: Option<usize>,
    }

    impl Model {
        fn push(&mut self, start: usize, size: usize, fin: bool) {
            if self.fin == Some(self.delivered) {
                return;
            }
            let end = start + size;
            if fin && end >= self.delivered && self.fin.is_none() {
                self.fin = Some(end);
            }
            let limit = self.fin.unwrap_or(self.arrived.len());
            for byte in start..end.min(limit) {
                self.arrived[byte] = true;
            }
            while self.delivered < limit && self.arrived[self.delivered] {
                self.delivered += 1;
            }
        }

        fn finished(&self) -> bool {
            self.fin == Some(self.delivered)
        }

        /// Where the stream resumes after its first hole, if it has one.
        fn resumes(&self) -> Option<usize> {
            if self.finished() {
                return None;
            }
            let limit = self.fin.unwrap_or(self.arrived.len());
            (self.delivered..limit)
                .find(|byte| self.arrived[*byte])
                .or(self.fin)
        }
    }

    proptest! {
        /// The output is exactly what the byte-level model delivers: a
        /// prefix of the stream that never passes a hole or the FIN (even
        /// when bytes beyond the FIN were held before it arrived), and a
        /// hole is reported wherever something waits behind one.
        #[test]
        fn output_is_the_stream_or_a_prefix_then_a_hole(
            (isn, stream, fin, segments, lost, order) in scenario()
        ) {
            let mut r = Reassembler::new(isn, LIMITS);
            let mut model = Model { arrived: vec![false; stream.len()], delivered: 0, fin: None };
            let mut out = Vec::new();
            for (step, index) in order.iter().enumerate() {
                let (start, size) = segments[*index];
                if lost[*index] {
                    continue;
                }
                let seq = isn.wrapping_add(start as u32);
                let payload = Bytes::copy_from_slice(&stream[start..start + size]);
                let carries_fin = start + size == fin;
                model.push(start, size, carries_fin);
                let result = r.push(seq, payload, carries_fin, step as u64, &mut out);
                r.assert_consistent();
                prop_assert_eq!(result, Ok(()), "no budget is reached");
            }
            let delivered = collect(&out);
            prop_assert_eq!(delivered.len(), model.delivered, "model: {:?}", model.fin);
            prop_assert_eq!(&delivered[..], &stream[..delivered.len()], "a prefix of the stream");
            prop_assert_eq!(r.is_finished(), model.finished());
            match (r.poll(u64::MAX), model.resumes()) {
                (Ok(()), None) => {}
                (Err(hole), Some(resumes)) => {
                    prop_assert_eq!(hole.seq, isn.wrapping_add(model.delivered as u32));
                    prop_assert_eq!(hole.len, (resumes - model.delivered) as u64);
                }
                (got, expected) => prop_assert!(false, "hole {:?}, model resumes at {:?}", got, expected),
            }
        }
    }
}

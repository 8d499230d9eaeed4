//! `--compare`: the shadow's answers checked byte for byte, as one stream,
//! against the production server's answers on the same connection (any
//! TCP protocol).
//!
//! Sans-IO: the forwarder feeds a [`Comparator`] with each side's bytes as
//! they arrive and tells it how each side ended; the comparator keeps only
//! the bytes of the side that is ahead (copied out, so a hub payload or an
//! arena chunk is never pinned), within a per-connection and a per-target
//! [`Budget`], and settles on a [`Verdict`] as soon as one is certain.

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use crate::flow::model::CloseReason;

/// Bytes one connection may hold for the side that is ahead. The shadow
/// usually answers a little after production (it gets the request later),
/// so this is the lead one side may take: an answer of 1 MiB in flight is
/// far beyond request/response protocols' usual answer, and a connection
/// that needs more ends `incomplete` (`budget`) rather than hold memory.
pub const CONNECTION_BUDGET: usize = 1 << 20;
/// Bytes all connections of one target may hold together: bounds the
/// comparison's memory below `--forward-max-conns` times
/// [`CONNECTION_BUDGET`] (as the shadow queue's own target total does).
pub const TARGET_BUDGET: usize = 64 << 20;
/// Bytes of each side shown where they first differ.
pub const SNIPPET: usize = 32;

/// Bytes held by the comparators of one target.
#[derive(Debug)]
pub struct Budget {
    used: AtomicUsize,
    limit: usize,
}

impl Budget {
    pub fn new(limit: usize) -> Self {
        Self {
            used: AtomicUsize::new(0),
            limit,
        }
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn reserve(&self, len: usize) -> bool {
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(len).filter(|total| *total <= self.limit)
            })
            .is_ok()
    }

    fn release(&self, len: usize) {
        self.used.fetch_sub(len, Ordering::Relaxed);
    }
}

/// Whose bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Production,
    Shadow,
}

/// How the shadow's answer stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShadowEnd {
    /// It closed its side (EOF): its answers are complete.
    Eof,
    /// Production had ended and the shadow sent nothing more for the
    /// quiet period (`--compare-timeout`): taken as its end.
    Quiet,
    /// It reset the connection, or reading failed.
    Reset,
}

/// Why a connection could not be compared to the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incomplete {
    /// The mirrored connection did not end with both FINs (`rst`, `gap`,
    /// `lagged`, `idle`, `evicted`, `shutdown`): production's answers are
    /// a prefix only.
    Production(CloseReason),
    /// The shadow could not be reached.
    ShadowUnreachable,
    /// The shadow reset the connection, or writing to it failed.
    ShadowReset,
    /// The shadow sent nothing at all within the quiet period after
    /// production ended.
    ShadowSilent,
    /// The shadow answered less than production, then went quiet without
    /// closing.
    ShadowTimeout,
    /// The shadow did not take the client's bytes fast enough: its
    /// connection was aborted.
    ShadowTooSlow,
    /// One side was ahead by more than the budget.
    Budget,
    /// The mirror stopped.
    Shutdown,
}

impl Incomplete {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Production(reason) => match reason {
                // Fin is never a reason; listed for completeness.
                CloseReason::Fin => "production_fin",
                CloseReason::Rst => "production_rst",
                CloseReason::Idle => "production_idle",
                CloseReason::Gap => "production_gap",
                CloseReason::Lagged => "production_lagged",
                CloseReason::Evicted => "production_evicted",
                CloseReason::Shutdown => "production_shutdown",
            },
            Self::ShadowUnreachable => "shadow_unreachable",
            Self::ShadowReset => "shadow_reset",
            Self::ShadowSilent => "shadow_silent",
            Self::ShadowTimeout => "shadow_timeout",
            Self::ShadowTooSlow => "shadow_too_slow",
            Self::Budget => "budget",
            Self::Shutdown => "shutdown",
        }
    }
}

/// The result of one connection's comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Both answer streams ended and are identical.
    Same,
    /// They differ first at `offset` (bytes from the start of the answer
    /// stream); `production` and `shadow` are up to [`SNIPPET`] bytes of
    /// each from there (empty for the side that ended there).
    Differs {
        offset: u64,
        production: Vec<u8>,
        shadow: Vec<u8>,
    },
    Incomplete(Incomplete),
}

impl Verdict {
    /// `same`, `differs`, `incomplete`.
    pub const fn result(&self) -> &'static str {
        match self {
            Self::Same => "same",
            Self::Differs { .. } => "differs",
            Self::Incomplete(_) => "incomplete",
        }
    }
}

/// A settled comparison, with each side's byte count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub verdict: Verdict,
    pub production_bytes: u64,
    pub shadow_bytes: u64,
}

/// One connection's comparison.
#[derive(Debug)]
pub struct Comparator {
    budget: Arc<Budget>,
    /// Bytes both sides sent, identical.
    matched: u64,
    /// The side whose bytes past `matched` are held (when any are).
    ahead: Side,
    held: VecDeque<u8>,
    production_bytes: u64,
    shadow_bytes: u64,
    production_end: Option<CloseReason>,
    shadow_end: Option<ShadowEnd>,
    verdict: Option<Verdict>,
}

impl Comparator {
    /// A comparison whose held bytes count in `budget` (its target's).
    pub fn new(budget: &Arc<Budget>) -> Self {
        Self {
            budget: Arc::clone(budget),
            matched: 0,
            ahead: Side::Production,
            held: VecDeque::new(),
            production_bytes: 0,
            shadow_bytes: 0,
            production_end: None,
            shadow_end: None,
            verdict: None,
        }
    }

    /// The next bytes production's server answered.
    pub fn production(&mut self, bytes: &[u8]) {
        self.production_bytes += bytes.len() as u64;
        self.feed(Side::Production, bytes);
    }

    /// The next bytes the shadow answered.
    pub fn shadow(&mut self, bytes: &[u8]) {
        self.shadow_bytes += bytes.len() as u64;
        self.feed(Side::Shadow, bytes);
    }

    /// The mirrored connection ended with `reason`; with `fin`,
    /// production's answers are complete.
    pub fn production_ended(&mut self, reason: CloseReason) {
        self.production_end.get_or_insert(reason);
        self.settle();
    }

    /// The shadow's answers ended.
    pub fn shadow_ended(&mut self, end: ShadowEnd) {
        self.shadow_end.get_or_insert(end);
        self.settle();
    }

    /// The comparison cannot go on (unless it is settled already).
    pub fn fail(&mut self, why: Incomplete) {
        self.decide(Verdict::Incomplete(why));
    }

    /// Whether the verdict is known.
    pub fn is_settled(&self) -> bool {
        self.verdict.is_some()
    }

    /// Shadow bytes received so far.
    pub fn shadow_bytes(&self) -> u64 {
        self.shadow_bytes
    }

    /// Whether the shadow has answered at least as many bytes as
    /// production (or the verdict is known).
    pub fn caught_up(&self) -> bool {
        self.verdict.is_some() || self.shadow_bytes >= self.production_bytes
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// The verdict; `otherwise` if it is not settled yet.
    pub fn outcome(&mut self, otherwise: Incomplete) -> Outcome {
        self.settle();
        self.fail(otherwise);
        Outcome {
            verdict: self.verdict.clone().unwrap_or(Verdict::Same),
            production_bytes: self.production_bytes,
            shadow_bytes: self.shadow_bytes,
        }
    }

    fn feed(&mut self, side: Side, bytes: &[u8]) {
        if self.verdict.is_some() || bytes.is_empty() {
            return;
        }
        let rest = if self.held.is_empty() || self.ahead == side {
            bytes
        } else {
            let overlap = self.held.len().min(bytes.len());
            if let Some(at) = self
                .held
                .iter()
                .zip(&bytes[..overlap])
                .position(|(a, b)| a != b)
            {
                let held: Vec<u8> = self.held.range(at..).take(SNIPPET).copied().collect();
                let new = bytes[at..bytes.len().min(at + SNIPPET)].to_vec();
                let (production, shadow) = match side {
                    Side::Production => (new, held),
                    Side::Shadow => (held, new),
                };
                self.decide(Verdict::Differs {
                    offset: self.matched + at as u64,
                    production,
                    shadow,
                });
                return;
            }
            self.held.drain(..overlap);
            self.budget.release(overlap);
            self.matched += overlap as u64;
            &bytes[overlap..]
        };
        if !rest.is_empty() {
            if self.held.len() + rest.len() > CONNECTION_BUDGET || !self.budget.reserve(rest.len())
            {
                self.decide(Verdict::Incomplete(Incomplete::Budget));
                return;
            }
            self.ahead = side;
            self.held.extend(rest);
        }
        self.settle();
    }

    /// Decides what the ends known so far make certain.
    fn settle(&mut self) {
        if self.verdict.is_some() {
            return;
        }
        let production_done = self.production_end == Some(CloseReason::Fin);
        let shadow_done = self.shadow_end == Some(ShadowEnd::Eof)
            || (self.shadow_end == Some(ShadowEnd::Quiet) && self.held.is_empty());
        let ahead = (!self.held.is_empty()).then_some(self.ahead);
        // A side that goes on past where the other ended for good differs
        // there, whatever happens next.
        match ahead {
            Some(Side::Shadow) if production_done => return self.differs_at_end(Side::Shadow),
            Some(Side::Production) if shadow_done => {
                return self.differs_at_end(Side::Production);
            }
            _ => {}
        }
        if let Some(reason) = self.production_end.filter(|r| *r != CloseReason::Fin) {
            return self.decide(Verdict::Incomplete(Incomplete::Production(reason)));
        }
        match self.shadow_end {
            Some(ShadowEnd::Reset) => self.decide(Verdict::Incomplete(Incomplete::ShadowReset)),
            Some(ShadowEnd::Quiet) if ahead == Some(Side::Production) => {
                self.decide(Verdict::Incomplete(if self.shadow_bytes == 0 {
                    Incomplete::ShadowSilent
                } else {
                    Incomplete::ShadowTimeout
                }));
            }
            Some(ShadowEnd::Eof | ShadowEnd::Quiet) if production_done && ahead.is_none() => {
                self.decide(Verdict::Same);
            }
            _ => {}
        }
    }

    /// `side` is ahead of the other, which ended there.
    fn differs_at_end(&mut self, side: Side) {
        let held: Vec<u8> = self.held.iter().take(SNIPPET).copied().collect();
        let (production, shadow) = match side {
            Side::Production => (held, Vec::new()),
            Side::Shadow => (Vec::new(), held),
        };
        self.decide(Verdict::Differs {
            offset: self.matched,
            production,
            shadow,
        });
    }

    /// Settles on `verdict` (the first one stays) and frees the buffer.
    fn decide(&mut self, verdict: Verdict) {
        if self.verdict.is_none() {
            self.verdict = Some(verdict);
        }
        self.budget.release(self.held.len());
        self.held = VecDeque::new();
    }
}

impl Drop for Comparator {
    fn drop(&mut self) {
        self.budget.release(self.held.len());
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn budget() -> Arc<Budget> {
        Arc::new(Budget::new(TARGET_BUDGET))
    }

    fn differs(offset: u64, production: &[u8], shadow: &[u8]) -> Verdict {
        Verdict::Differs {
            offset,
            production: production.to_vec(),
            shadow: shadow.to_vec(),
        }
    }

    #[test]
    fn identical_streams_in_any_chunking_are_same() {
        let budget = budget();
        let mut c = Comparator::new(&budget);
        c.production(b"+OK\r\n$5\r\nal");
        c.shadow(b"+O");
        c.shadow(b"K\r\n$5\r\nalpha\r");
        c.production(b"pha\r\n");
        c.shadow(b"\n");
        assert_eq!(c.held(), 0);
        c.production_ended(CloseReason::Fin);
        assert!(!c.is_settled(), "the shadow may still answer");
        c.shadow_ended(ShadowEnd::Eof);
        let outcome = c.outcome(Incomplete::Shutdown);
        assert_eq!(outcome.verdict, Verdict::Same);
        assert_eq!((outcome.production_bytes, outcome.shadow_bytes), (16, 16));
        drop(c);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_quiet_shadow_that_answered_everything_is_same() {
        let budget = budget();
        let mut c = Comparator::new(&budget);
        c.shadow(b"hello");
        c.production(b"hello");
        c.production_ended(CloseReason::Fin);
        c.shadow_ended(ShadowEnd::Quiet);
        assert_eq!(c.outcome(Incomplete::Shutdown).verdict, Verdict::Same);
    }

    #[test]
    fn the_first_differing_byte_is_found_across_chunks() {
        let budget = budget();
        let mut c = Comparator::new(&budget);
        c.production(b"$5\r\nal");
        c.production(b"pha\r\n");
        c.shadow(b"$5\r");
        assert!(!c.is_settled());
        c.shadow(b"\nomega\r\n");
        assert!(c.is_settled(), "settled at the first difference");
        assert_eq!(budget.used(), 0, "and its buffer freed");
        // Later bytes are counted, not compared.
        c.shadow(b"more");
        c.production_ended(CloseReason::Rst);
        let outcome = c.outcome(Incomplete::Shutdown);
        assert_eq!(outcome.verdict, differs(4, b"alpha\r\n", b"omega\r\n"));
        assert_eq!((outcome.production_bytes, outcome.shadow_bytes), (11, 15));
    }

    #[test]
    fn snippets_are_bounded() {
        let budget = budget();
        let mut c = Comparator::new(&budget);
        c.production(&[b'a'; 100]);
        let mut shadow = vec![b'a'; 10];
        shadow.extend([b'b'; 90]);
        c.shadow(&shadow);
        match c.outcome(Incomplete::Shutdown).verdict {
            Verdict::Differs {
                offset,
                production,
                shadow,
            } => {
                assert_eq!(offset, 10);
                assert_eq!(production, [b'a'; SNIPPET]);
                assert_eq!(shadow, [b'b'; SNIPPET]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_longer_shadow_differs_where_production_ended() {
        let budget = budget();
        let mut c = Comparator::new(&budget);
        c.production(b"ok\n");
        c.shadow(b"ok\nand more");
        c.production_ended(CloseReason::Fin);
        assert_eq!(
            c.outcome(Incomplete::Shutdown).verdict,
            differs(3, b"", b"and more")
        );
        // Also when the extra bytes come after production ended.
        let mut c = Comparator::new(&budget);
        c.production(b"ok\n");
        c.production_ended(CloseReason::Fin);
        c.shadow(b"ok\n");
        assert!(!c.is_settled());
        c.shadow(b"!");
        assert_eq!(
            c.outcome(Incomplete::Shutdown).verdict,
            differs(3, b"", b"!")
        );
    }

    #[test]
    fn a_shorter_shadow_differs_if_it_closed_and_is_incomplete_if_it_went_quiet() {
        let budget = budget();
        let mut c = Comparator::new(&budget);
        c.production(b"HTTP/1.1 200 OK\r\n");
        c.shadow(b"HTTP/1.1 ");
        c.shadow_ended(ShadowEnd::Eof);
        assert_eq!(
            c.outcome(Incomplete::Shutdown).verdict,
            differs(9, b"200 OK\r\n", b""),
            "a closed shadow is final even before production ends"
        );
        let mut c = Comparator::new(&budget);
        c.production(b"HTTP/1.1 200 OK\r\n");
        c.shadow(b"HTTP/1.1 ");
        c.production_ended(CloseReason::Fin);
        c.shadow_ended(ShadowEnd::Quiet);
        assert_eq!(
            c.outcome(Incomplete::Shutdown).verdict,
            Verdict::Incomplete(Incomplete::ShadowTimeout)
        );
        let mut c = Comparator::new(&budget);
        c.production(b"HTTP/1.1 200 OK\r\n");
        c.production_ended(CloseReason::Fin);
        c.shadow_ended(ShadowEnd::Quiet);
        assert_eq!(
            c.outcome(Incomplete::Shutdown).verdict,
            Verdict::Incomplete(Incomplete::ShadowSilent)
        );
    }

    #[test]
    fn a_closed_shadow_differs_once_production_goes_past_it() {
        let budget = budget();
        let mut c = Comparator::new(&budget);
        c.shadow(b"abc");
        c.shadow_ended(ShadowEnd::Eof);
        c.production(b"ab");
        assert!(!c.is_settled());
        c.production(b"cd");
        assert_eq!(
            c.outcome(Incomplete::Shutdown).verdict,
            differs(3, b"d", b"")
        );
    }

    #[test]
    fn unfinished_ends_are_incomplete_with_their_reason() {
        let budget = budget();
        for reason in [CloseReason::Rst, CloseReason::Gap, CloseReason::Lagged] {
            let mut c = Comparator::new(&budget);
            c.production(b"same");
            c.shadow(b"same");
            c.production_ended(reason);
            assert_eq!(
                c.outcome(Incomplete::Shutdown).verdict,
                Verdict::Incomplete(Incomplete::Production(reason))
            );
        }
        let mut c = Comparator::new(&budget);
        c.production(b"same");
        c.shadow_ended(ShadowEnd::Reset);
        assert_eq!(
            c.outcome(Incomplete::Shutdown).verdict,
            Verdict::Incomplete(Incomplete::ShadowReset)
        );
        let mut c = Comparator::new(&budget);
        c.fail(Incomplete::ShadowUnreachable);
        c.production_ended(CloseReason::Fin);
        assert_eq!(
            c.outcome(Incomplete::Shutdown).verdict,
            Verdict::Incomplete(Incomplete::ShadowUnreachable),
            "the first verdict stays"
        );
        let mut c = Comparator::new(&budget);
        c.production(b"x");
        assert_eq!(
            c.outcome(Incomplete::Shutdown).verdict,
            Verdict::Incomplete(Incomplete::Shutdown),
            "nothing ended: the caller's reason"
        );
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_difference_found_stays_whatever_ends_later() {
        let budget = budget();
        let mut c = Comparator::new(&budget);
        c.production(b"a");
        c.shadow(b"b");
        c.production_ended(CloseReason::Gap);
        c.shadow_ended(ShadowEnd::Reset);
        assert_eq!(
            c.outcome(Incomplete::Shutdown).verdict,
            differs(0, b"a", b"b")
        );
    }

    #[test]
    fn a_side_ahead_by_more_than_the_connection_budget_is_incomplete() {
        let budget = budget();
        let mut c = Comparator::new(&budget);
        let chunk = vec![7u8; 64 << 10];
        for _ in 0..CONNECTION_BUDGET / chunk.len() {
            c.production(&chunk);
        }
        assert_eq!(c.held(), CONNECTION_BUDGET);
        assert_eq!(budget.used(), CONNECTION_BUDGET);
        assert!(!c.is_settled());
        c.production(b"!");
        assert_eq!(c.held(), 0, "the buffer is freed at once");
        assert_eq!(budget.used(), 0);
        c.shadow(&chunk);
        c.production_ended(CloseReason::Fin);
        c.shadow_ended(ShadowEnd::Eof);
        let outcome = c.outcome(Incomplete::Shutdown);
        assert_eq!(outcome.verdict, Verdict::Incomplete(Incomplete::Budget));
        assert_eq!(outcome.production_bytes, CONNECTION_BUDGET as u64 + 1);
    }

    #[test]
    fn the_target_budget_is_shared_and_given_back() {
        let budget = Arc::new(Budget::new(100));
        let mut a = Comparator::new(&budget);
        let mut b = Comparator::new(&budget);
        a.production(&[1; 60]);
        b.shadow(&[1; 40]);
        assert_eq!(budget.used(), 100);
        let mut c = Comparator::new(&budget);
        c.production(&[1]);
        assert_eq!(
            c.outcome(Incomplete::Shutdown).verdict,
            Verdict::Incomplete(Incomplete::Budget)
        );
        // Catching up releases what was held.
        a.shadow(&[1; 50]);
        assert_eq!(budget.used(), 50);
        drop(b);
        assert_eq!(budget.used(), 10);
        drop(a);
        assert_eq!(budget.used(), 0);
    }

    /// Splits `bytes` at the (sorted, deduplicated) `cuts`.
    fn chunks(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        cuts.sort_unstable();
        cuts.dedup();
        let mut start = 0;
        let mut out = Vec::new();
        for cut in cuts.into_iter().chain([bytes.len()]) {
            out.push(bytes[start..cut].to_vec());
            start = cut;
        }
        out
    }

    proptest! {
        /// Whatever the chunking and the interleaving of the two sides,
        /// the verdict is the byte-level one: same for equal streams, else
        /// differs at the first differing byte (or where the shorter one
        /// ends), with that byte first in the snippets; nothing is held
        /// afterwards.
        #[test]
        fn the_verdict_is_the_first_difference_whatever_the_chunking(
            production in proptest::collection::vec(0u8..4, 0..600),
            edit in proptest::option::of((0usize..600, 0u8..4)),
            resize in -3i32..4,
            production_cuts in proptest::collection::vec(0usize..600, 0..8),
            shadow_cuts in proptest::collection::vec(0usize..600, 0..8),
            order in proptest::collection::vec(any::<bool>(), 0..20),
        ) {
            let mut shadow = production.clone();
            if let Some((at, byte)) = edit && at < shadow.len() {
                shadow[at] = byte;
            }
            let len = (shadow.len() as i32 + resize).max(0) as usize;
            shadow.resize(len, 9);
            let budget = budget();
            let mut c = Comparator::new(&budget);
            let mut p = chunks(&production, &production_cuts).into_iter();
            let mut s = chunks(&shadow, &shadow_cuts).into_iter();
            let mut order = order.into_iter();
            loop {
                let production_first = order.next().unwrap_or(true);
                match (production_first, p.next(), s.next()) {
                    (_, None, None) => break,
                    (true, a, b) => {
                        if let Some(a) = a { c.production(&a) }
                        if let Some(b) = b { c.shadow(&b) }
                    }
                    (false, a, b) => {
                        if let Some(b) = b { c.shadow(&b) }
                        if let Some(a) = a { c.production(&a) }
                    }
                }
            }
            c.production_ended(CloseReason::Fin);
            c.shadow_ended(ShadowEnd::Eof);
            let outcome = c.outcome(Incomplete::Shutdown);
            let first = production.iter().zip(&shadow).position(|(a, b)| a != b);
            let expected = match first {
                Some(at) => Some(at),
                None if production.len() == shadow.len() => None,
                None => Some(production.len().min(shadow.len())),
            };
            match (expected, outcome.verdict) {
                (None, Verdict::Same) => {}
                (Some(at), Verdict::Differs { offset, production: p, shadow: s }) => {
                    prop_assert_eq!(offset, at as u64);
                    prop_assert_eq!(p.first(), production.get(at));
                    prop_assert_eq!(s.first(), shadow.get(at));
                }
                (expected, verdict) => prop_assert!(false, "{expected:?}: {verdict:?}"),
            }
            prop_assert_eq!(outcome.production_bytes, production.len() as u64);
            prop_assert_eq!(outcome.shadow_bytes, shadow.len() as u64);
            drop(c);
            prop_assert_eq!(budget.used(), 0);
        }
    }
}

//! When a group commit flushes (issues 32 and 43), for both group commits: PostgreSQL's
//! batching task (`postgres::batch`) and sled's flusher thread (`store::flusher`).
//!
//! The writes a commit made durable set their callers going again: a claim's caller forwards
//! the call and comes back with its completion, a completion's caller answers and, in a busy
//! service, its client sends the next call. Those writes come back together a little later.
//! If the next commit has already left with what was queued, they wait for it to end and
//! then for one of their own: the callers split into groups that take turns, a call spans
//! four commits instead of two, and each commit carries half the writes it could.
//!
//! So when a commit has answered, the group commit expects what was queued by then and as
//! many writes again as the commit applied, and waits for them at most as long as the commit
//! took (`GATHER_WAIT_MAX` at most): a write that comes in that time would otherwise have
//! waited for the whole next commit. Nothing waits with one caller, whenever what is
//! expected is queued, or after a commit that applied nothing (duplicates answered with what
//! is recorded: no commit to share). A wait that runs out (the writes were not coming: a slow
//! service, callers gone) is not tried again for a while (`Pace`), so a wrong guess costs one
//! wait in many commits.
//!
//! Measured in BENCHMARKS.md. This module never touches a write; it only says when to send.

use std::time::Duration;

/// The longest wait for expected writes. tokio's timer counts whole milliseconds, so a
/// wait that runs out ends up to a millisecond after its deadline.
pub const GATHER_WAIT_MAX: Duration = Duration::from_millis(2);

/// After waits that ran out one after the other, the commits sent without waiting
/// before the next try: 1, 2, 4, … up to this.
pub const GATHER_BACKOFF_MAX: u32 = 64;

/// What the last commit says of the next one.
#[derive(Debug, Default)]
pub struct Pace {
    /// Writes expected: those queued when the last commit answered, and as many again as
    /// it applied.
    expected: usize,
    /// How long it took, from sending to answering every swap.
    took: Duration,
    /// Commits still to send without waiting.
    skip: u32,
    /// Commits to send without waiting after the next wait that runs out.
    backoff: u32,
}

impl Pace {
    /// The writes to wait for and how long, when `queued` are queued; `None`: send now.
    pub fn wait_for(&mut self, queued: usize) -> Option<(usize, Duration)> {
        if queued >= self.expected {
            return None;
        }
        if self.skip > 0 {
            self.skip -= 1;
            return None;
        }
        Some((self.expected, self.took.min(GATHER_WAIT_MAX)))
    }

    /// A wait ended: `full` when the writes expected came in time.
    pub fn waited(&mut self, full: bool) {
        if full {
            self.backoff = 0;
        } else {
            self.backoff = (self.backoff * 2).clamp(1, GATHER_BACKOFF_MAX);
            self.skip = self.backoff;
        }
    }

    /// A commit that applied `applied` writes took `took`, and `queued` were queued when it
    /// answered.
    pub fn sent(&mut self, applied: usize, took: Duration, queued: usize) {
        self.expected = queued.saturating_add(applied);
        self.took = took;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn applied_swaps_are_expected_back_beside_those_queued_at_most_as_long_as_it_took() {
        let mut pace = Pace::default();
        assert_eq!(pace.wait_for(3), None, "nothing sent yet");
        // Two groups of callers taking turns: 8 swaps applied while 8 others were queued.
        pace.sent(8, Duration::from_micros(900), 8);
        assert_eq!(pace.wait_for(16), None);
        assert_eq!(pace.wait_for(8), Some((16, Duration::from_micros(900))));
        pace.sent(16, Duration::from_secs(1), 0);
        assert_eq!(pace.wait_for(3), Some((16, GATHER_WAIT_MAX)));
        // One caller: its next swap is all there is.
        pace.sent(1, Duration::from_micros(900), 0);
        assert_eq!(pace.wait_for(1), None);
        // Duplicates answered: nothing applied, nothing to wait for.
        pace.sent(0, Duration::from_micros(900), 3);
        assert_eq!(pace.wait_for(3), None);
    }

    #[test]
    fn a_wait_that_ran_out_is_not_tried_again_for_a_while() {
        let mut pace = Pace::default();
        pace.sent(8, MS, 0);
        let mut skipped = Vec::new();
        for _ in 0..9 {
            let mut skips = 0;
            while pace.wait_for(1).is_none() {
                skips += 1;
            }
            pace.waited(false);
            skipped.push(skips);
        }
        assert_eq!(skipped, [0, 1, 2, 4, 8, 16, 32, 64, 64]);
        pace.waited(true);
        pace.wait_for(1);
        pace.waited(false);
        assert_eq!(pace.skip, 1, "a full wait starts the back-off again");
    }
}

//! When the group commit sends a batch (issue 32 item 10).
//!
//! The swaps a statement applied set their callers going again: a claim's caller forwards
//! the call and comes back with its completion, a completion's caller answers and, in a busy
//! service, its client sends the next call. Those swaps come back together a little later.
//! If the next statement has already left with what was queued, they wait for it to end and
//! then for one of their own: the callers split into groups that take turns, a call spans
//! four statements instead of two, and each statement carries half the swaps it could.
//!
//! So when a statement has answered, the batching task expects what was queued by then and
//! as many swaps again as the statement applied, and waits for them at most as long as the
//! statement took (`GATHER_WAIT_MAX` at most): a swap that comes in that time would
//! otherwise have waited for the whole next statement. Nothing waits with one caller,
//! whenever what is expected is queued, or after a statement that applied nothing
//! (duplicates answered with what is recorded: no commit to share). A wait that runs out
//! (the swaps were not coming: a slow service, callers gone) is not tried again for a while
//! (`Pace`), so a wrong guess costs one wait in many statements.
//!
//! Measured in BENCHMARKS.md. This module never touches a swap; it only says when to send.

use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The longest wait for expected swaps. tokio's timer counts whole milliseconds, so a
/// wait that runs out ends up to a millisecond after its deadline.
pub const GATHER_WAIT_MAX: Duration = Duration::from_millis(2);

/// After waits that ran out one after the other, the statements sent without waiting
/// before the next try: 1, 2, 4, … up to this.
pub const GATHER_BACKOFF_MAX: u32 = 64;

/// What the last statement says of the next one.
#[derive(Debug, Default)]
pub struct Pace {
    /// Swaps expected: those queued when the last statement answered, and as many again as
    /// it applied.
    expected: usize,
    /// How long it took, from sending to answering every swap.
    took: Duration,
    /// Statements still to send without waiting.
    skip: u32,
    /// Statements to send without waiting after the next wait that runs out.
    backoff: u32,
}

impl Pace {
    /// The swaps to wait for and how long, when `queued` are queued; `None`: send now.
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

    /// A wait ended: `full` when the swaps expected came in time.
    pub fn waited(&mut self, full: bool) {
        if full {
            self.backoff = 0;
        } else {
            self.backoff = (self.backoff * 2).clamp(1, GATHER_BACKOFF_MAX);
            self.skip = self.backoff;
        }
    }

    /// A statement that applied `applied` swaps took `took`, and `queued` were queued when it
    /// answered.
    pub fn sent(&mut self, applied: usize, took: Duration, queued: usize) {
        self.expected = queued.saturating_add(applied);
        self.took = took;
    }
}

/// Takes what `queue` sends into `waiting` (at most `limit` in all) until it holds `expected`
/// or `wait` has passed. Whether the expected swaps all came (false too when every sender is
/// gone).
pub async fn gather<T>(
    queue: &mut mpsc::Receiver<T>,
    waiting: &mut Vec<T>,
    (expected, wait): (usize, Duration),
    limit: usize,
) -> bool {
    let deadline = Instant::now() + wait;
    let expected = expected.min(limit);
    while waiting.len() < expected {
        let room = limit - waiting.len();
        match tokio::time::timeout_at(deadline, queue.recv_many(waiting, room)).await {
            Ok(0) | Err(_) => return false,
            Ok(_) => {}
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[tokio::test(start_paused = true)]
    async fn a_wait_ends_as_soon_as_the_expected_swaps_are_queued() {
        let (send, mut queue) = mpsc::channel(16);
        let mut waiting = vec![0];
        tokio::spawn(async move {
            for n in 1..4 {
                tokio::time::sleep(MS).await;
                send.send(n).await.expect("the queue is open");
            }
        });
        let started = Instant::now();
        assert!(gather(&mut queue, &mut waiting, (4, 10 * MS), 16).await);
        assert_eq!(waiting, [0, 1, 2, 3]);
        let waited = started.elapsed();
        assert!(waited >= 3 * MS && waited < 10 * MS, "waited {waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_ends_at_its_deadline_when_the_swaps_do_not_come() {
        let (send, mut queue) = mpsc::channel(16);
        send.send(1).await.expect("the queue is open");
        let mut waiting = Vec::new();
        let started = Instant::now();
        assert!(!gather(&mut queue, &mut waiting, (4, MS), 16).await);
        assert_eq!(waiting, [1]);
        assert!(started.elapsed() >= MS);
        drop(send);
    }

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

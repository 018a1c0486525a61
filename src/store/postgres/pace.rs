//! The PostgreSQL group commit's wait for the swaps its last statement set going: the
//! `store::pace::Pace` that both group commits share says when and for how many; this
//! module gathers them from the batching task's queue.

pub use crate::store::pace::Pace;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

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
}

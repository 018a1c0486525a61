//! Group commit: one flush serves every writer waiting at that moment (design §6).
//!
//! A dedicated thread owns the flushing. Writers queue a reply slot and await it; the thread
//! takes every slot queued when it wakes, flushes once, and answers them all. After a flush
//! it waits, briefly and bounded, for the writers that flush set going (`store::pace`), so
//! callers do not split into groups taking turns. We do not use
//! sled's `flush_async`, which hangs when eight or more tasks await it at once (sled #1308).
//! A failed flush is reported to every waiter of that round and makes the store suspect: no
//! later acknowledgement rests on it until a flush succeeds again. A flush that does not
//! return (sled 0.34 can block forever in `flush` once the disk is full) is abandoned by its
//! waiters at their deadline; while it stays stuck, `is_stuck` lets writers fail fast.

use crate::store::pace::Pace;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Flushes the disk once; the error is the reason the flush failed.
pub type FlushFn = Box<dyn FnMut() -> Result<(), String> + Send>;

/// Handle to the flusher thread; cheap to share.
pub struct Flusher {
    /// `None` only while dropping: closing the queue ends the thread.
    queue: Option<mpsc::Sender<Waiter>>,
    thread: Option<std::thread::JoinHandle<()>>,
    healthy: Arc<AtomicBool>,
    /// True while a flush runs.
    flushing: Arc<AtomicBool>,
    counts: Arc<GroupCommitCounts>,
}

/// What group commit has done: their ratio is the mean batch size.
#[derive(Debug, Default)]
pub struct GroupCommitCounts {
    /// Flushes made.
    pub flushes: AtomicU64,
    /// Writes those flushes made durable.
    pub writes: AtomicU64,
}

/// A writer waiting for the flush that makes its write durable.
type Waiter = oneshot::Sender<Result<(), String>>;

/// The flusher thread's batches: every writer queued when it wakes, and, paced like
/// PostgreSQL's group commit (`store::pace`), the writers the last flush set going, which
/// are expected back for the next one.
struct Batches {
    waiting: mpsc::Receiver<Waiter>,
    pace: Pace,
    /// Writers that queued while the last flush ran: they go with the next.
    carried: Vec<Waiter>,
}

impl Batches {
    fn new(waiting: mpsc::Receiver<Waiter>) -> Batches {
        Batches {
            waiting,
            pace: Pace::default(),
            carried: Vec::new(),
        }
    }

    /// The writers the next flush serves; `None` once every sender is gone.
    fn next(&mut self) -> Option<Vec<Waiter>> {
        let mut batch = std::mem::take(&mut self.carried);
        if batch.is_empty() {
            batch.push(self.waiting.recv().ok()?);
        }
        // The first request's send woke this thread, often on the core of the runtime
        // thread that sent it, which still has calls ready to ask for the same flush.
        // Yielding once lets them queue first: a core that has nothing else to run returns
        // at once, a busy one makes bigger batches (fresh keys at 32 in flight on one core:
        // 4.2 -> 25.5 writes a flush, -24 % CPU a call, +34 % calls/s; at 1 in flight no
        // change).
        std::thread::yield_now();
        batch.extend(self.waiting.try_iter());
        if let Some(expected) = self.pace.wait_for(batch.len()) {
            let full = self.gather(&mut batch, expected);
            self.pace.waited(full);
        }
        Some(batch)
    }

    /// Takes queued writers into `batch` until it holds `expected` or `wait` has passed;
    /// whether they all came.
    fn gather(&self, batch: &mut Vec<Waiter>, (expected, wait): (usize, Duration)) -> bool {
        let deadline = Instant::now() + wait;
        while batch.len() < expected {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.waiting.recv_timeout(left) {
                Ok(waiter) => {
                    batch.push(waiter);
                    batch.extend(self.waiting.try_iter());
                }
                Err(_) => return false,
            }
        }
        true
    }

    /// A flush of `writes` writes took `took`: those that queued meanwhile go with the next,
    /// and the writers it answered are expected back beside them.
    fn flushed(&mut self, writes: usize, took: Duration) {
        self.carried.extend(self.waiting.try_iter());
        self.pace.sent(writes, took, self.carried.len());
    }
}

/// Why a flush got no answer.
const STOPPED: &str = "the flusher thread has stopped";

impl Flusher {
    /// Starts the flusher thread. (With group commit off, the store lets one writer wait at a
    /// time, so each flush serves one write.)
    pub fn start(mut flush: FlushFn) -> std::io::Result<Flusher> {
        let (queue, waiting) = mpsc::channel::<Waiter>();
        let healthy = Arc::new(AtomicBool::new(true));
        let flushing = Arc::new(AtomicBool::new(false));
        let thread_healthy = healthy.clone();
        let thread_flushing = flushing.clone();
        let counts = Arc::new(GroupCommitCounts::default());
        let thread_counts = counts.clone();
        let thread = std::thread::Builder::new()
            .name("idemproxy-flusher".into())
            .spawn(move || {
                let mut batches = Batches::new(waiting);
                // Ends when every `Flusher` handle is gone and the queue is drained.
                while let Some(batch) = batches.next() {
                    thread_flushing.store(true, Ordering::Release);
                    let started = Instant::now();
                    let result = flush();
                    let took = started.elapsed();
                    thread_flushing.store(false, Ordering::Release);
                    if result.is_err() {
                        // Sticky: writes after a failed one may sit behind a hole in sled's
                        // log that recovery stops at, so no later flush vouches for them.
                        thread_healthy.store(false, Ordering::Release);
                    }
                    thread_counts.flushes.fetch_add(1, Ordering::Relaxed);
                    let writes = batch.len();
                    thread_counts
                        .writes
                        .fetch_add(writes as u64, Ordering::Relaxed);
                    for waiter in batch {
                        // A waiter that gave up (its call was dropped) needs no answer.
                        let _ = waiter.send(result.clone());
                    }
                    batches.flushed(writes, took);
                }
            })?;
        Ok(Flusher {
            queue: Some(queue),
            thread: Some(thread),
            healthy,
            flushing,
            counts,
        })
    }

    /// Flushes made and writes they made durable, since start.
    pub fn counts(&self) -> Arc<GroupCommitCounts> {
        self.counts.clone()
    }

    /// Waits until everything written before this call is on disk, or `timeout` passes
    /// (then the write is not durable, and the store is marked unhealthy).
    pub async fn flush(&self, timeout: std::time::Duration) -> Result<(), String> {
        let answer = self.request()?;
        match tokio::time::timeout(timeout, answer).await {
            Ok(answer) => answer.map_err(|_| STOPPED.to_string())?,
            Err(_) => Err(self.timed_out(timeout)),
        }
    }

    /// `flush` for a thread off the async runtime (the sweeper's).
    pub fn flush_blocking(&self, timeout: std::time::Duration) -> Result<(), String> {
        let mut answer = self.request()?;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match answer.try_recv() {
                Ok(result) => return result,
                Err(oneshot::error::TryRecvError::Closed) => return Err(STOPPED.into()),
                Err(oneshot::error::TryRecvError::Empty)
                    if std::time::Instant::now() >= deadline =>
                {
                    return Err(self.timed_out(timeout))
                }
                Err(oneshot::error::TryRecvError::Empty) => {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
        }
    }

    /// Asks the thread for a flush of everything written so far.
    fn request(&self) -> Result<oneshot::Receiver<Result<(), String>>, String> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .as_ref()
            .expect("the queue is open until drop")
            .send(reply)
            .map_err(|_| STOPPED.to_string())?;
        Ok(answer)
    }

    /// A flush the disk did not confirm in time: nothing after it is acknowledged.
    fn timed_out(&self, timeout: std::time::Duration) -> String {
        self.healthy.store(false, Ordering::Release);
        format!("the disk did not confirm a flush within {timeout:?} (full or failing?)")
    }

    /// True when the last flush failed or timed out and has not returned yet: a write now
    /// would only wait behind it.
    pub fn is_stuck(&self) -> bool {
        !self.is_healthy() && self.flushing.load(Ordering::Acquire)
    }

    /// False once a flush failed or timed out, until the process restarts: nothing written
    /// after a failed write is acknowledged (a later flush cannot vouch for it).
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }
}

impl Drop for Flusher {
    /// Closes the queue and waits for the thread, so whatever it flushes (and the database
    /// handle it holds) is released before the store counts as closed.
    fn drop(&mut self) {
        let stuck = self.is_stuck();
        drop(self.queue.take());
        if let Some(thread) = self.thread.take() {
            // A thread stuck in the disk's flush would never join: leave it to the process.
            if !stuck {
                let _ = thread.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiter() -> Waiter {
        oneshot::channel().0
    }

    #[test]
    fn the_writers_a_flush_set_going_are_gathered_for_the_next() {
        let (queue, waiting) = mpsc::channel();
        let mut batches = Batches::new(waiting);
        for _ in 0..4 {
            queue.send(waiter()).expect("the queue is open");
        }
        assert_eq!(
            batches.next().expect("a batch").len(),
            4,
            "nothing to expect yet"
        );
        // Two writers queued during the flush; the four it answered come back soon after.
        queue.send(waiter()).expect("the queue is open");
        queue.send(waiter()).expect("the queue is open");
        batches.flushed(4, Duration::from_millis(2));
        let returning = queue.clone();
        let back = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_micros(300));
            for _ in 0..4 {
                returning.send(waiter()).expect("the queue is open");
            }
        });
        assert_eq!(
            batches.next().expect("a batch").len(),
            6,
            "one flush for all"
        );
        back.join().expect("the writers came back");
    }

    #[test]
    fn a_wait_for_writers_that_do_not_come_is_bounded_and_backs_off() {
        let (queue, waiting) = mpsc::channel();
        let mut batches = Batches::new(waiting);
        queue.send(waiter()).expect("the queue is open");
        assert_eq!(batches.next().expect("a batch").len(), 1);
        batches.flushed(8, Duration::from_millis(1));
        queue.send(waiter()).expect("the queue is open");
        let started = Instant::now();
        assert_eq!(
            batches.next().expect("a batch").len(),
            1,
            "the others never came"
        );
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(1), "waited {waited:?}");
        // The next flush that expects more does not wait again at once.
        batches.flushed(8, Duration::from_millis(1));
        queue.send(waiter()).expect("the queue is open");
        let started = Instant::now();
        assert_eq!(batches.next().expect("a batch").len(), 1);
        assert!(started.elapsed() < Duration::from_millis(1), "backed off");
        drop(queue);
        assert!(batches.next().is_none(), "ends with its senders");
    }
}

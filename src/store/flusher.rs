//! Group commit: one flush serves every writer waiting at that moment (design §6).
//!
//! A dedicated thread owns the flushing. Writers queue a reply slot and await it; the thread
//! takes every slot queued when it wakes, flushes once, and answers them all. We do not use
//! sled's `flush_async`, which hangs when eight or more tasks await it at once (sled #1308).
//! A failed flush is reported to every waiter of that round and makes the store suspect: no
//! later acknowledgement rests on it until a flush succeeds again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use tokio::sync::oneshot;

/// Flushes the disk once; the error is the reason the flush failed.
pub type FlushFn = Box<dyn FnMut() -> Result<(), String> + Send>;

/// Handle to the flusher thread; cheap to share.
pub struct Flusher {
    /// `None` only while dropping: closing the queue ends the thread.
    queue: Option<mpsc::Sender<oneshot::Sender<Result<(), String>>>>,
    thread: Option<std::thread::JoinHandle<()>>,
    healthy: Arc<AtomicBool>,
    per_write: bool,
}

impl Flusher {
    /// Starts the flusher thread. With `per_write`, every waiter gets a flush of its own (the
    /// benchmark's baseline, never a production setting).
    pub fn start(mut flush: FlushFn, per_write: bool) -> std::io::Result<Flusher> {
        let (queue, waiting) = mpsc::channel::<oneshot::Sender<Result<(), String>>>();
        let healthy = Arc::new(AtomicBool::new(true));
        let thread_healthy = healthy.clone();
        let thread = std::thread::Builder::new()
            .name("idemproxy-flusher".into())
            .spawn(move || {
                // Ends when every `Flusher` handle is gone and the queue is drained.
                while let Ok(first) = waiting.recv() {
                    let mut batch = vec![first];
                    if !per_write {
                        batch.extend(waiting.try_iter());
                    }
                    let result = flush();
                    thread_healthy.store(result.is_ok(), Ordering::Release);
                    for waiter in batch {
                        // A waiter that gave up (its call was dropped) needs no answer.
                        let _ = waiter.send(result.clone());
                    }
                }
            })?;
        Ok(Flusher {
            queue: Some(queue),
            thread: Some(thread),
            healthy,
            per_write,
        })
    }

    /// Waits until everything written before this call is on disk.
    pub async fn flush(&self) -> Result<(), String> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .as_ref()
            .expect("the queue is open until drop")
            .send(reply)
            .map_err(|_| "the flusher thread has stopped".to_string())?;
        answer
            .await
            .map_err(|_| "the flusher thread has stopped".to_string())?
    }

    /// False after a failed flush, until a flush succeeds again.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// True when each write is flushed on its own.
    pub fn is_per_write(&self) -> bool {
        self.per_write
    }
}

impl Drop for Flusher {
    /// Closes the queue and waits for the thread, so whatever it flushes (and the database
    /// handle it holds) is released before the store counts as closed.
    fn drop(&mut self) {
        drop(self.queue.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

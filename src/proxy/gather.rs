//! Writes gathered: a connection's future polled after the tasks the runtime has ready.
//!
//! h2 queues what a call's task sends and writes it when the connection's future is polled.
//! A task woken by a running task runs next in tokio's scheduler, so each answer the calls'
//! tasks complete would be written on its own. `Gathered` defers each poll of the
//! connection until the runtime has run what is ready (tokio's `yield_now` list, woken when
//! the worker runs out of tasks), so the answers of a batch of calls leave in one write.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

/// `inner`, each poll deferred until the runtime has run its other ready tasks.
pub struct Gathered<F> {
    inner: Pin<Box<F>>,
    deferred: Option<Arc<Deferral>>,
}

/// One deferred poll: set once the runtime gets to it, then the task is woken.
struct Deferral {
    due: AtomicBool,
    task: Waker,
}

impl Wake for Deferral {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.due.store(true, Ordering::Release);
        self.task.wake_by_ref();
    }
}

impl<F: Future> Gathered<F> {
    pub fn new(inner: F) -> Self {
        Gathered {
            inner: Box::pin(inner),
            deferred: None,
        }
    }

    /// The connection itself (for a graceful shutdown).
    pub fn inner(&mut self) -> Pin<&mut F> {
        self.inner.as_mut()
    }
}

impl<F: Future> Future for Gathered<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        match &self.deferred {
            // Woken by a call's task before the runtime got to the deferred poll.
            Some(deferral) if !deferral.due.load(Ordering::Acquire) => return Poll::Pending,
            Some(_) => self.deferred = None,
            None => {
                let deferral = Arc::new(Deferral {
                    due: AtomicBool::new(false),
                    task: cx.waker().clone(),
                });
                let waker = Waker::from(deferral.clone());
                let mut yielded = std::pin::pin!(tokio::task::yield_now());
                // Outside a runtime worker the waker is woken at once: no deferral.
                let _ = yielded.as_mut().poll(&mut Context::from_waker(&waker));
                if !deferral.due.load(Ordering::Acquire) {
                    self.deferred = Some(deferral);
                    return Poll::Pending;
                }
            }
        }
        self.inner.as_mut().poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;

    /// A connection stand-in: counts its polls and keeps the waker, as h2 does.
    struct Counted {
        polls: Arc<AtomicUsize>,
        waker: Arc<Mutex<Option<Waker>>>,
        done: Arc<AtomicBool>,
    }

    impl Future for Counted {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            if self.done.load(Ordering::SeqCst) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_connection_woken_by_many_tasks_at_once_is_polled_once_after_them() {
        let polls = Arc::new(AtomicUsize::new(0));
        let waker = Arc::new(Mutex::new(None::<Waker>));
        let done = Arc::new(AtomicBool::new(false));
        let connection = tokio::spawn(Gathered::new(Counted {
            polls: polls.clone(),
            waker: waker.clone(),
            done: done.clone(),
        }));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!(polls.load(Ordering::SeqCst), 1);

        // Ten calls' tasks, ready together on the runtime's worker, each queue an answer and
        // wake the connection.
        let wake = || waker.lock().unwrap().clone().expect("polled once");
        let wakers: Vec<Waker> = (0..10).map(|_| wake()).collect();
        tokio::spawn(async move {
            for connection in wakers {
                tokio::spawn(async move { connection.wake() });
            }
        })
        .await
        .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!(
            polls.load(Ordering::SeqCst),
            2,
            "one poll for the ten answers"
        );

        done.store(true, Ordering::SeqCst);
        wake().wake();
        connection.await.unwrap();
        assert_eq!(polls.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn outside_a_runtime_the_poll_is_not_deferred() {
        let polls = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicBool::new(true));
        let gathered = Gathered::new(Counted {
            polls: polls.clone(),
            waker: Arc::new(Mutex::new(None)),
            done,
        });
        let mut gathered = std::pin::pin!(gathered);
        let waker = Waker::noop();
        assert!(gathered
            .as_mut()
            .poll(&mut Context::from_waker(waker))
            .is_ready());
        assert_eq!(polls.load(Ordering::SeqCst), 1);
    }
}

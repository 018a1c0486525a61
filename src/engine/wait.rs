//! A duplicate's wait on an in-flight first attempt: how long it may wait (the method's
//! maximum, cut short of the caller's own deadline so it hears ABORTED with a pushback rather
//! than timing out with nothing), and the wait itself, which is armed before the record is
//! read again so no change between the read and the wait is missed. It never reads or writes
//! a record itself: the attempt does, between two waits.

use super::{CallPolicy, Clock, Engine, Upstream};
use crate::key::Key;
use crate::status::Refusal;
use crate::store::Store;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use tokio::time::Instant;

/// The longest a duplicate keeps back of its caller's deadline to answer in.
const ANSWER_TIME_MAX: Duration = Duration::from_millis(100);

/// The store's "record changed" watch, armed.
type Armed = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One duplicate's wait.
pub(super) struct InFlightWait {
    /// When the duplicate stops waiting and answers IN_PROGRESS.
    until: Instant,
    /// The watch armed before the last read; `None`: not armed since the last wake.
    armed: Option<Armed>,
    /// Whether the duplicate has seen a running first attempt and waited on it.
    waited: bool,
}

impl InFlightWait {
    /// The wait of a call under `policy` that sent `timeout` (its `grpc-timeout`).
    pub(super) fn new(policy: &CallPolicy, timeout: Option<Duration>) -> InFlightWait {
        let wait_max = if policy.reject_in_flight || policy.rejects_duplicates() {
            Duration::ZERO
        } else {
            policy.in_flight_wait_max
        };
        let wait = timeout.map_or(wait_max, |timeout| {
            let answer_time = (timeout / 10).min(ANSWER_TIME_MAX);
            timeout.saturating_sub(answer_time).min(wait_max)
        });
        InFlightWait {
            until: Instant::now() + wait,
            armed: None,
            waited: false,
        }
    }

    /// What is left of the wait (zero once it is over).
    pub(super) fn left(&self) -> Duration {
        self.until.saturating_duration_since(Instant::now())
    }

    /// Whether the duplicate waited on a running first attempt.
    pub(super) fn waited(&self) -> bool {
        self.waited
    }

    /// After a read found a first attempt running (its lease `lease_left` from now): arms the
    /// watch and returns at once so the record is read again; when already armed, waits for
    /// a change, the lease's end or the wait's end. `Err`: stop waiting and answer with the
    /// refusal.
    pub(super) async fn until_changed<S: Store, U: Upstream, C: Clock>(
        &mut self,
        engine: &Engine<S, U, C>,
        key: &Key,
        lease_left: Duration,
        answered: &mut tokio::sync::oneshot::Sender<super::Handled<U::Stream>>,
    ) -> Result<(), Refusal> {
        let Some(changed) = self.armed.take() else {
            // Arm the watch, then read again: a change between the two is never missed.
            self.armed = Some(Box::pin(engine.store.changed(key)));
            if !self.waited {
                self.waited = true;
                engine.metrics.in_flight_wait();
            }
            return Ok(());
        };
        let now = Instant::now();
        if now >= self.until {
            let retry_after = lease_left
                .min(engine.limits.in_flight_wait_max)
                .max(Duration::from_millis(1));
            return Err(Refusal::in_progress(
                *key,
                "an earlier attempt with this key is still running",
                Some(retry_after),
            ));
        }
        let wake = self.until.min(now + lease_left);
        tokio::select! {
            () = changed => Ok(()),
            () = tokio::time::sleep_until(wake) => Ok(()),
            // Nobody to answer: stop between two reads, never inside one.
            () = answered.closed() => Err(Refusal::in_progress(
                *key,
                "the caller went away while an earlier attempt was running",
                None,
            )),
        }
    }
}

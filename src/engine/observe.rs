//! Observe mode (design §4), the way to turn idemproxy on safely: every call is forwarded and
//! answered by the service as without the sidecar, while the first attempt of each key is
//! claimed and recorded as in REPLAY mode, and what enforcing would have done to each later
//! attempt is counted (`idemproxy.observe.decisions`). It never refuses, replays or waits,
//! and a failing store never changes an answer (logged and counted). Because the first
//! attempts are recorded as usual, a switch to REPLAY keeps them: a retry after the switch
//! gets the recorded outcome.

use super::attempt::Attempt;
use super::{Answer, Clock, Engine, Upstream};
use crate::record::Claimed;
use crate::store::Store;
use crate::telemetry::metrics::{Decision, Observed};
use bytes::Bytes;

impl<S: Store, U: Upstream, C: Clock> Engine<S, U, C> {
    /// Serves an attempt of an observed method: claims its key once, with no wait and no
    /// caller quota; forwards it whatever the claim found, recording only a first attempt.
    pub(super) async fn observe(
        &self,
        attempt: &Attempt<'_, S, U, C>,
        request: U::Request,
        body: Bytes,
    ) -> (Answer<U::Stream>, Decision) {
        let now_ms = self.clock.now_ms();
        match attempt.claim_once(now_ms, false).await {
            Ok((Claimed::Owned, lease_until_ms)) => {
                self.metrics.observed(&attempt.method, Observed::Fresh);
                let answer = attempt.forward(request, body, lease_until_ms).await;
                (answer, Decision::Miss)
            }
            Ok((claimed, _)) => {
                self.metrics
                    .observed(&attempt.method, would_have_been(&claimed));
                let answer = self
                    .forward_unprotected(attempt.key, attempt.lease, request, body)
                    .await;
                (answer, Decision::Observed)
            }
            Err(refusal) => {
                tracing::warn!(key = %attempt.key, method = %attempt.method, reason = refusal.reason.as_str(), "observe mode: the store failed; forwarding unrecorded");
                let answer = self
                    .forward_unprotected(attempt.key, attempt.lease, request, body)
                    .await;
                (answer, Decision::StoreError)
            }
        }
    }
}

/// What enforcing would have done with a later attempt that found `claimed`.
fn would_have_been(claimed: &Claimed) -> Observed {
    match claimed {
        Claimed::Replay(_) | Claimed::ResponseNotKept => Observed::Replay,
        Claimed::KeyReused { .. } => Observed::KeyReused,
        Claimed::InProgress { .. } => Observed::InFlight,
        Claimed::InDoubt { .. } | Claimed::Unreadable => Observed::InDoubt,
        // No quota is applied in observe mode, so a claim is never over it; and `Owned` is
        // the first attempt, handled before.
        Claimed::Owned | Claimed::QuotaExceeded => Observed::Fresh,
    }
}

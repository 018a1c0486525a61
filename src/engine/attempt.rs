//! One keyed call's attempt, read as its three steps: claim the key, forward the call, record
//! its outcome. The facts the steps share (key, token, lease, policy, method, origin) are
//! fixed when the attempt starts; each step is a method. It never forwards without a landed
//! claim, and never answers a forwarded call before its outcome is settled in the store.

use super::wait::InFlightWait;
use super::{Answer, Call, CallPolicy, Clock, Engine, Mode, Reply, Upstream};
use crate::key::{self, Key};
use crate::record::{self, ClaimRequest, Claimed, Disposition, Fenced, Response, Token};
use crate::status::{KeyState, Reason, Refusal};
use crate::store::{Operation, Store, StoreError};
use bytes::Bytes;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// Why a call is not ours to forward.
pub(super) enum Unclaimed<S> {
    /// A duplicate, answered from (or refused by) the record; `waited`: it first waited on an
    /// in-flight first attempt.
    Answered {
        /// The answer.
        answer: Answer<S>,
        /// Whether it waited.
        waited: bool,
    },
    /// The store failed: refused, unless the method is fail-open.
    StoreFailed(Refusal),
}

/// What one claim round found.
enum Round<S> {
    /// The key is ours until `lease_until_ms`.
    Owned { lease_until_ms: u64 },
    /// A first attempt holds the key until `lease_until_ms`: wait for it, or give up.
    Running { lease_until_ms: u64 },
    /// The record's outcome is unknown and the method declares a probe: ask the service once
    /// the call that made it can no longer be running (`lease_until_ms`).
    InDoubt { lease_until_ms: u64 },
    /// Answered without forwarding.
    Answered(Answer<S>),
    /// The store failed.
    StoreFailed(Refusal),
}

/// One keyed call's attempt on `engine`.
pub(super) struct Attempt<'e, S, U, C> {
    engine: &'e Engine<S, U, C>,
    /// The call's key.
    pub(super) key: Key,
    /// This attempt's claim token: only it may complete, release or doubt the record.
    token: Token,
    /// How long the call may run: its deadline (or the default) plus the margin.
    pub(super) lease: Duration,
    /// The method's policy.
    pub(super) policy: CallPolicy,
    /// `/package.Service/Method`.
    pub(super) method: String,
    caller: String,
    /// The serial number, kept in the record when the method's outcome is probed.
    serial: Bytes,
    fingerprint: [u8; 32],
    /// The call's own deadline, if it sent one.
    timeout: Option<Duration>,
    /// The call's span, kept with its outcome so a replay can link to it.
    origin: Option<[u8; 24]>,
    /// When the key's record expires (Unix ms) as this attempt last saw or wrote it; 0: no
    /// record holds the key.
    expires_ms: AtomicU64,
}

impl<'e, S: Store, U: Upstream, C: Clock> Attempt<'e, S, U, C> {
    /// The attempt of `call` under `key`, and what is forwarded if it is ours.
    pub(super) fn of(
        engine: &'e Engine<S, U, C>,
        key: Key,
        call: Call<U::Request>,
    ) -> (Self, U::Request, Bytes) {
        let fingerprint = call
            .fingerprint
            .unwrap_or_else(|| key::fingerprint(&call.body));
        let limits = &engine.limits;
        let attempt = Attempt {
            engine,
            key,
            token: engine.tokens.next_token(),
            lease: call.timeout.unwrap_or(limits.lease_default) + limits.lease_margin,
            policy: call
                .policy
                .unwrap_or_else(|| CallPolicy::from_limits(limits)),
            method: call.method,
            caller: call.caller,
            serial: call.serial,
            fingerprint,
            timeout: call.timeout,
            origin: call.origin,
            expires_ms: AtomicU64::new(0),
        };
        (attempt, call.request, call.body)
    }

    /// Claims the key, waiting on an in-flight first attempt within the call's budget.
    /// `Ok`: ours to forward until the lease it names (Unix ms).
    pub(super) async fn claim(
        &self,
        answered: &mut tokio::sync::oneshot::Sender<super::Handled<U::Stream>>,
    ) -> Result<u64, Unclaimed<U::Stream>> {
        let at_quota = self.at_quota().await.map_err(Unclaimed::StoreFailed)?;
        let mut wait = InFlightWait::new(&self.policy, self.timeout);
        let answered_after = |answer, wait: &InFlightWait| Unclaimed::Answered {
            answer,
            waited: wait.waited(),
        };
        let mut probed = false;
        loop {
            let now_ms = self.engine.clock.now_ms();
            let lease_until_ms = match self.claim_round(now_ms, at_quota, probed).await {
                Round::Owned { lease_until_ms } => return Ok(lease_until_ms),
                Round::Answered(answer) => return Err(answered_after(answer, &wait)),
                Round::StoreFailed(refusal) => return Err(Unclaimed::StoreFailed(refusal)),
                Round::InDoubt { lease_until_ms } => {
                    let lease_left = Duration::from_millis(lease_until_ms.saturating_sub(now_ms));
                    if lease_left.is_zero() {
                        // Once: the probe settles the record (found, released, or still
                        // unknown) and the next round answers from what it left.
                        probed = true;
                        self.probe_within(wait.left()).await;
                    } else if lease_left < wait.left() {
                        // The call may still act until its lease ends: wait for that (or for
                        // its late outcome), then read again and ask.
                        let changed = self.engine.store.changed(&self.key);
                        let _ = tokio::time::timeout(lease_left, changed).await;
                    } else {
                        let refusal = Refusal::earlier_outcome_unknown(self.key);
                        return Err(answered_after(Answer::Refused(refusal), &wait));
                    }
                    continue;
                }
                Round::Running { lease_until_ms } => lease_until_ms,
            };
            let lease_left = Duration::from_millis(lease_until_ms.saturating_sub(now_ms));
            if let Err(refusal) = wait
                .until_changed(self.engine, &self.key, lease_left, answered)
                .await
            {
                return Err(answered_after(Answer::Refused(refusal), &wait));
            }
        }
    }

    /// Whether the caller is at its cap of live records (always false without a cap).
    async fn at_quota(&self) -> Result<bool, Refusal> {
        let Some(max) = self.engine.limits.records_per_caller_max else {
            return Ok(false);
        };
        let now_ms = self.engine.clock.now_ms();
        match self.engine.store.caller_records(&self.caller, now_ms).await {
            Ok(live) => Ok(live >= max),
            Err(error) => Err(store_refusal(self.key, &error)),
        }
    }

    /// Asks the service about the key's unknown outcome, within what is left of this
    /// duplicate's wait. The probe runs as a task of its own: a duplicate that stops waiting
    /// (its wait over, its caller gone) never leaves a probe holding the record unsettled.
    async fn probe_within(&self, left: Duration) {
        let Some(prober) = self.engine.prober.clone() else {
            return;
        };
        let (key, method) = (self.key, self.method.clone());
        let probe = tokio::spawn(async move { prober.probe_now(key, &method).await });
        let _ = tokio::time::timeout(left, probe).await;
    }

    /// One claim transition at `now_ms`: what the store holds for the key now, and the lease
    /// the claim asked for (Unix ms). `Err`: the store failed (the claim taken back if it may
    /// have landed).
    pub(super) async fn claim_once(
        &self,
        now_ms: u64,
        at_quota: bool,
    ) -> Result<(Claimed, u64), Refusal> {
        let engine = self.engine;
        let request = ClaimRequest {
            fingerprint: &self.fingerprint,
            method: &self.method,
            caller: &self.caller,
            token: self.token,
            now_ms,
            lease_until_ms: now_ms + self.lease.as_millis() as u64,
            expires_ms: now_ms + self.policy.retention.as_millis() as u64,
            sole_owner: engine
                .store
                .is_sole_owner()
                .then(|| engine.tokens.incarnation()),
            retry_in_doubt: self.policy.retry_in_doubt,
            origin: self.origin.as_ref(),
            at_quota,
            serial: self.policy.probe.then_some(&self.serial[..]),
        };
        // The record the landed run of the transition saw (the last run is the one that
        // landed), so that the answer can say when it expires.
        let mut seen_expires_ms = 0;
        let claimed = engine
            .store
            .update(Operation::Claim, &self.key, |current| {
                seen_expires_ms = current.map_or(0, |record| record.expires_ms);
                record::claim(current, &request)
            })
            .await;
        match claimed {
            Ok(claimed) => {
                let expires_ms = match claimed {
                    Claimed::Owned => request.expires_ms,
                    _ => seen_expires_ms,
                };
                self.expires_ms.store(expires_ms, Ordering::Relaxed);
                Ok((claimed, request.lease_until_ms))
            }
            Err(error) => {
                // The claim may have landed in memory without reaching the disk: take it back
                // if we can, so the key is not left blocked by a call never forwarded.
                self.settle(Operation::Release, |current| {
                    record::release(current, &self.token)
                })
                .await;
                Err(store_refusal(self.key, &error))
            }
        }
    }

    /// One claim transition, and what it means for this attempt (`probed`: a probe was
    /// asked already).
    async fn claim_round(&self, now_ms: u64, at_quota: bool, probed: bool) -> Round<U::Stream> {
        let engine = self.engine;
        let (claimed, lease_until_ms) = match self.claim_once(now_ms, at_quota).await {
            Ok(claimed) => claimed,
            Err(refusal) => return Round::StoreFailed(refusal),
        };
        let key = self.key;
        let refused = |refusal| Round::Answered(Answer::Refused(refusal));
        match claimed {
            Claimed::Owned => Round::Owned { lease_until_ms },
            Claimed::InProgress { .. } if self.policy.rejects_duplicates() => {
                refused(Refusal::duplicate(key, KeyState::InFlight))
            }
            Claimed::Replay(_) | Claimed::ResponseNotKept if self.policy.rejects_duplicates() => {
                refused(Refusal::duplicate(key, KeyState::Completed))
            }
            Claimed::InProgress { lease_until_ms } => Round::Running { lease_until_ms },
            Claimed::Replay(response) => Round::Answered(Answer::Replay(response)),
            Claimed::KeyReused { state } => refused(Refusal::key_reused(key, state)),
            Claimed::InDoubt { lease_until_ms }
                if self.policy.probe && !probed && engine.prober.is_some() =>
            {
                Round::InDoubt { lease_until_ms }
            }
            Claimed::InDoubt { .. } => refused(Refusal::earlier_outcome_unknown(key)),
            Claimed::QuotaExceeded => refused(Refusal::caller_quota(key)),
            Claimed::Unreadable => refused(Refusal::unreadable(key)),
            Claimed::ResponseNotKept => refused(Refusal::response_not_kept(key)),
        }
    }

    /// Forwards the claimed call within what is left of its lease (which ends at
    /// `lease_until_ms`, as the record says) and records what happened. Past the lease a
    /// probe may ask the service about the call and release the key, so the call is never
    /// sent once it is over, nor left running past it.
    pub(super) async fn forward(
        &self,
        request: U::Request,
        body: Bytes,
        lease_until_ms: u64,
    ) -> Answer<U::Stream> {
        let engine = self.engine;
        let started = Instant::now();
        let left = lease_until_ms.saturating_sub(engine.clock.now_ms());
        let reply = if left == 0 {
            Reply::NotProcessed("the claim landed after the call's lease ran out".into())
        } else {
            let left = Duration::from_millis(left).min(self.lease);
            engine.call_within(left, request, body).await
        };
        let outcome = match &reply {
            Reply::Complete(_) | Reply::Oversized(_) => "complete",
            Reply::NotProcessed(_) => "not_processed",
            Reply::Unknown(_) => "unknown",
        };
        engine
            .metrics
            .upstream(&self.method, outcome, started.elapsed());
        match reply {
            Reply::Complete(mut response) => {
                if let Some(origin) = self.origin {
                    response.origin_trace = origin.to_vec();
                }
                self.record(response).await
            }
            Reply::Oversized(stream) => {
                self.record_not_kept().await;
                Answer::Stream(stream)
            }
            Reply::NotProcessed(why) => {
                self.release().await;
                // Released: no record holds the key, so a retry runs.
                Answer::Refused(Refusal::upstream_unavailable(
                    self.key,
                    why,
                    KeyState::Absent,
                ))
            }
            Reply::Unknown(why) => {
                tracing::warn!(key = %self.key, method = %self.method, "the call's outcome is unknown ({why}); its key stays IN_DOUBT until an operator resolves it or it expires");
                self.mark_in_doubt(&why).await;
                Answer::Refused(Refusal::outcome_unknown(self.key, why))
            }
        }
    }

    /// Records the service's complete answer as the policy says: kept, released or doubted.
    async fn record(&self, response: Response) -> Answer<U::Stream> {
        let policy = &self.policy;
        match record::classify_with(&response, policy.record_codes, policy.release_codes) {
            Disposition::Record => self.complete(response).await,
            Disposition::Release => {
                self.release().await;
                Answer::Fresh(response)
            }
            Disposition::InDoubt => {
                let why = format!("the service answered grpc-status {}", response.grpc_status);
                self.mark_in_doubt(&why).await;
                Answer::Fresh(response)
            }
        }
    }

    /// Completes the record with `response`: the caller hears it once it is durable.
    async fn complete(&self, response: Response) -> Answer<U::Stream> {
        let (now_ms, expires_ms) = self.now_and_expiry();
        let token = &self.token;
        // One copy per attempt: the record keeps it, the caller gets `response`.
        let result = self
            .engine
            .store
            .update(Operation::Complete, &self.key, |current| {
                let kept = Some(self.kept(&response));
                record::complete(current, token, kept, now_ms, expires_ms)
            })
            .await;
        match result {
            Ok(Fenced::Applied) => {
                self.engine.metrics.record_stored();
                self.expires_ms.store(expires_ms, Ordering::Relaxed);
                Answer::Fresh(response)
            }
            Ok(Fenced::NotOwner) => {
                tracing::warn!(key = %self.key, "the record changed hands before the outcome; answering unrecorded");
                Answer::Fresh(response)
            }
            // Observe mode answers as the service did, whatever the store says.
            Err(error) if self.policy.mode == Mode::Observe => {
                tracing::warn!(key = %self.key, %error, "observe mode: the outcome could not be stored; answering as the service did");
                Answer::Fresh(response)
            }
            // The service acted, but no retry could learn it: say the outcome is unknown,
            // never UNAVAILABLE (which means "not forwarded").
            Err(error) => {
                tracing::warn!(key = %self.key, %error, "the service acted but its outcome could not be stored");
                Answer::Refused(Refusal::outcome_not_recorded(self.key, error))
            }
        }
    }

    /// The copy of `response` the record keeps: all of it, less the metadata the method keeps
    /// out of replays (`replay_drop_metadata`).
    fn kept(&self, response: &Response) -> Response {
        let mut kept = response.clone();
        if let Some(dropped) = &self.policy.replay_drop_metadata {
            let keep = |header: &crate::record::Header| {
                !dropped
                    .iter()
                    .any(|name| header.name.eq_ignore_ascii_case(name))
            };
            kept.headers.retain(keep);
            kept.trailers.retain(keep);
        }
        kept
    }

    /// Completes the record without the response, too large to keep: duplicates learn that
    /// the call ran.
    async fn record_not_kept(&self) {
        let (now_ms, expires_ms) = self.now_and_expiry();
        let token = &self.token;
        let kept = self
            .engine
            .store
            .update(Operation::Complete, &self.key, |current| {
                record::complete(current, token, None, now_ms, expires_ms)
            })
            .await;
        if let Err(error) = kept {
            tracing::warn!(key = %self.key, %error, "could not record an oversized outcome");
        }
    }

    /// Gives the key back: the service did not act.
    async fn release(&self) {
        self.settle(Operation::Release, |current| {
            record::release(current, &self.token)
        })
        .await;
        self.expires_ms.store(0, Ordering::Relaxed);
    }

    /// When the key's record expires (Unix ms), as this attempt last saw or wrote it; `None`
    /// when no record holds the key.
    pub(super) fn expires_ms(&self) -> Option<u64> {
        Some(self.expires_ms.load(Ordering::Relaxed)).filter(|&expires_ms| expires_ms != 0)
    }

    /// Marks the key IN_DOUBT: the service may have acted, `why` its outcome is unknown.
    async fn mark_in_doubt(&self, why: &str) {
        self.settle(Operation::MarkInDoubt, |current| {
            record::mark_in_doubt(current, &self.token, why)
        })
        .await;
    }

    /// Applies a release or in-doubt mark; on failure the record stays IN_FLIGHT and becomes
    /// IN_DOUBT when its lease runs out, which is safe, so the caller still gets its answer.
    async fn settle(
        &self,
        operation: Operation,
        transition: impl FnMut(Option<&record::Record>) -> (record::Change, Fenced) + Send,
    ) {
        let settled = self
            .engine
            .store
            .update(operation, &self.key, transition)
            .await;
        if let Err(error) = settled {
            tracing::warn!(key = %self.key, %error, "could not settle a record; it becomes IN_DOUBT at its lease");
        }
    }

    /// Now, and when a record written now expires under the method's retention.
    fn now_and_expiry(&self) -> (u64, u64) {
        let now_ms = self.engine.clock.now_ms();
        (now_ms, now_ms + self.policy.retention.as_millis() as u64)
    }
}

/// The refusal of a call whose store failed before it was forwarded (fail closed).
fn store_refusal(key: Key, error: &StoreError) -> Refusal {
    if let StoreError::Full { .. } = error {
        tracing::warn!(key = %key, %error, "store full; refusing a new key (fail closed)");
        return Refusal::new(
            Reason::StoreFull,
            format!(
                "the idempotency store is full and keeps every outcome for its retention, so it \
                 takes no new key until records expire; nothing was forwarded: {error}"
            ),
        )
        .about(key, KeyState::Absent);
    }
    tracing::warn!(key = %key, %error, "store failed; refusing the call (fail closed)");
    Refusal::new(
        Reason::StoreUnavailable,
        format!("the idempotency store is unavailable: {error}"),
    )
    .about(key, KeyState::Unknown)
}

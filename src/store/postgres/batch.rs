//! Group commit on PostgreSQL (issue 32 item 4): the swaps waiting at one moment reach
//! PostgreSQL as one statement, so one commit (one WAL flush, one standby round trip)
//! serves them all.
//!
//! One task takes every swap queued (up to `BATCH_SWAPS_MAX`; when fewer are queued than it
//! expects back from the last statement, it waits a little for them: `pace`), sends the
//! first swap of each key in one `unnest` statement, and answers each. A second swap of a
//! key already in the batch is not sent: it could only lose to the first (both were decided
//! on a record the first one replaces or finds changed), so it is answered as refused with
//! what the first one learned. This module never decides a state and never retries a statement whose
//! outcome it does not know: it says so (`Outcome::Unknown`) and the store settles it.

use super::pace::{gather, Pace};
use super::{Backend, Shared};
use crate::store::StoreError;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

/// Swaps one statement carries at most.
pub const BATCH_SWAPS_MAX: usize = 256;

/// Swaps waiting for the batching task at most; a writer past it waits for room.
pub const QUEUE_SWAPS_MAX: usize = 4 * BATCH_SWAPS_MAX;

/// One compare-and-swap of one record.
#[derive(Debug, Clone)]
pub struct Swap {
    /// The record's key.
    pub key: [u8; 32],
    /// The record the change was decided on, as `expected` gives it; `None`: it was absent.
    pub expected: Option<Vec<u8>>,
    /// The new record, its expiry (Unix ms) and caller; `None`: delete it.
    pub put: Option<(Vec<u8>, i64, String)>,
}

/// What became of one swap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It is committed.
    Applied,
    /// The record was not the one expected: what it is now (`Some(None)`: absent), or
    /// `None` when that is not known (it changed after the statement's snapshot): read it.
    Refused(Option<Option<Vec<u8>>>),
    /// The connection broke before PostgreSQL said: it may or may not be committed, by the
    /// session named.
    Unknown(Backend),
}

/// A swap waiting for its batch, with where its outcome goes.
pub struct Pending {
    /// The swap.
    pub swap: Swap,
    /// Its outcome.
    pub reply: oneshot::Sender<Result<Outcome, StoreError>>,
}

/// Takes batches off `queue` and commits each, until every sender is gone. A batch waits a
/// little for the swaps the last statement's answers set going (`pace`).
pub async fn run(shared: Arc<Shared>, mut queue: mpsc::Receiver<Pending>) {
    let mut waiting = Vec::with_capacity(BATCH_SWAPS_MAX);
    let mut pace = Pace::default();
    while queue.recv_many(&mut waiting, BATCH_SWAPS_MAX).await > 0 {
        if let Some(wait) = pace.wait_for(waiting.len()) {
            let full = gather(&mut queue, &mut waiting, wait, BATCH_SWAPS_MAX).await;
            pace.waited(full);
        }
        let batch = std::mem::take(&mut waiting);
        let started = Instant::now();
        let applied = commit(&shared, batch).await;
        pace.sent(applied, started.elapsed(), queue.len());
    }
}

/// Commits one batch and answers every swap in it. Returns how many were applied.
async fn commit(shared: &Shared, batch: Vec<Pending>) -> usize {
    // The first swap of each key is sent; the others follow it.
    let mut first_of: HashMap<[u8; 32], usize> = HashMap::with_capacity(batch.len());
    let mut sent: Vec<&Swap> = Vec::with_capacity(batch.len());
    // Per swap: the position of its key's first swap in `sent`, and whether it is that one.
    let mut positions: Vec<(usize, bool)> = Vec::with_capacity(batch.len());
    for pending in &batch {
        match first_of.get(&pending.swap.key) {
            Some(&position) => positions.push((position, false)),
            None => {
                first_of.insert(pending.swap.key, sent.len());
                positions.push((sent.len(), true));
                sent.push(&pending.swap);
            }
        }
    }
    let outcomes = shared.swap_all(&sent).await;
    shared.commits.fetch_add(1, Ordering::Relaxed);
    shared
        .swaps
        .fetch_add(batch.len() as u64, Ordering::Relaxed);
    let applied = match &outcomes {
        Ok(outcomes) => outcomes
            .iter()
            .filter(|outcome| **outcome == Outcome::Applied)
            .count(),
        Err(_) => 0,
    };
    let answers: Vec<Result<Outcome, StoreError>> = positions
        .iter()
        .map(|&(position, first)| match &outcomes {
            Err(error) => Err(error.clone()),
            Ok(outcomes) if first => Ok(outcomes[position].clone()),
            Ok(outcomes) => Ok(follower(sent[position], &outcomes[position])),
        })
        .collect();
    for (pending, answer) in batch.into_iter().zip(answers) {
        // The writer may have given up waiting; the outcome is then settled by a read.
        let _ = pending.reply.send(answer);
    }
    applied
}

/// The outcome of a swap of a key whose first swap in the batch had `outcome`: it was never
/// sent, so it is refused, with the record as the first one left it when that is known.
fn follower(first: &Swap, outcome: &Outcome) -> Outcome {
    match outcome {
        Outcome::Applied => Outcome::Refused(Some(first.put.as_ref().map(|put| put.0.clone()))),
        Outcome::Refused(now) => Outcome::Refused(now.clone()),
        Outcome::Unknown(_) => Outcome::Refused(None),
    }
}

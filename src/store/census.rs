//! The census: how many records each state holds, how many IN_DOUBT records wait for an
//! operator, and how old the oldest is (the `idemproxy.records` gauges), for every backend
//! alike. It walks the store page by page through `Store::scan`, a pass at a time, and
//! publishes a pass's counts only once the pass is whole, so a gauge never shows half a walk.
//!
//! Its cost is bounded: each page is read on a blocking thread, never on the threads that
//! serve calls (sled's reads are synchronous: a page of 1,000 records decoded on the one
//! runtime thread held every call behind it); after each page it pauses 19 times as long as
//! the page took, so it holds at most a twentieth of a core (or of the shared store's time);
//! and passes start `pass_interval` apart (ten sweep intervals, 10 s by default). It reads
//! only.

use crate::engine::Clock;
use crate::record::{self, probe::Waiting, State};
use crate::store::{Store, PAGE_RECORDS_MAX};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The pause after a page, as a multiple of the time the page took.
const PAUSE_PER_PAGE_FACTOR: u32 = 19;

/// The shortest and the longest wait between two passes.
pub const PASS_INTERVAL_MIN: Duration = Duration::from_millis(500);
/// See [`PASS_INTERVAL_MIN`].
pub const PASS_INTERVAL_MAX: Duration = Duration::from_secs(60);

/// The wait between two passes for a sweeper running every `sweep_interval`: ten of its
/// rounds, within the bounds.
pub fn pass_interval(sweep_interval: Duration) -> Duration {
    (sweep_interval * 10).clamp(PASS_INTERVAL_MIN, PASS_INTERVAL_MAX)
}

/// What the last whole pass counted; zero until the first pass ends.
#[derive(Debug, Default)]
pub struct Census {
    in_flight: AtomicU64,
    completed: AtomicU64,
    in_doubt: AtomicU64,
    waiting_for_operator: AtomicU64,
    /// `created_ms` of the oldest IN_DOUBT record; 0 when there is none.
    oldest_in_doubt_ms: AtomicU64,
    /// Whole passes made.
    passes: AtomicU64,
}

/// One pass's counts.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// IN_FLIGHT records (a first attempt still running, within its lease).
    pub in_flight: u64,
    /// COMPLETED records.
    pub completed: u64,
    /// IN_DOUBT records (an IN_FLIGHT record past its lease counts here, as claims see it).
    pub in_doubt: u64,
    /// IN_DOUBT records that no probe will settle: an operator must.
    pub waiting_for_operator: u64,
    /// `created_ms` of the oldest IN_DOUBT record, when there is one.
    pub oldest_in_doubt_ms: Option<u64>,
}

impl Counts {
    /// Counts one live record at `now_ms`.
    fn add(&mut self, record: &record::Record, now_ms: u64) {
        match record::effective_state(record, now_ms) {
            State::InFlight => self.in_flight += 1,
            State::Completed => self.completed += 1,
            State::InDoubt | State::Unspecified => {
                self.in_doubt += 1;
                if record::probe::waiting_for(record, now_ms) != Some(Waiting::Probe) {
                    self.waiting_for_operator += 1;
                }
                let oldest = self.oldest_in_doubt_ms.get_or_insert(record.created_ms);
                *oldest = (*oldest).min(record.created_ms);
            }
        }
    }
}

impl Census {
    /// The counts of the last whole pass.
    pub fn counts(&self) -> Counts {
        let oldest = self.oldest_in_doubt_ms.load(Ordering::Relaxed);
        Counts {
            in_flight: self.in_flight.load(Ordering::Relaxed),
            completed: self.completed.load(Ordering::Relaxed),
            in_doubt: self.in_doubt.load(Ordering::Relaxed),
            waiting_for_operator: self.waiting_for_operator.load(Ordering::Relaxed),
            oldest_in_doubt_ms: (oldest != 0).then_some(oldest),
        }
    }

    /// Whole passes made so far.
    pub fn passes(&self) -> u64 {
        self.passes.load(Ordering::Relaxed)
    }

    fn publish(&self, counts: Counts) {
        self.in_flight.store(counts.in_flight, Ordering::Relaxed);
        self.completed.store(counts.completed, Ordering::Relaxed);
        self.in_doubt.store(counts.in_doubt, Ordering::Relaxed);
        self.waiting_for_operator
            .store(counts.waiting_for_operator, Ordering::Relaxed);
        self.oldest_in_doubt_ms
            .store(counts.oldest_in_doubt_ms.unwrap_or(0), Ordering::Relaxed);
        self.passes.fetch_add(1, Ordering::Relaxed);
    }

    /// Walks `store` once, paced, and publishes what it counted. A page that fails ends the
    /// pass unpublished: the gauges keep the last whole count.
    pub async fn pass<S: Store>(&self, store: &Arc<S>, clock: &impl Clock) -> Result<(), String> {
        let mut counts = Counts::default();
        let mut cursor = None;
        let (pass_started, mut read, mut records) = (Instant::now(), Duration::ZERO, 0);
        loop {
            let started = Instant::now();
            let page = read_page(store, cursor.take()).await?;
            read += started.elapsed();
            records += page.records.len();
            let now_ms = clock.now_ms();
            for (_, record) in &page.records {
                if !record::is_expired(record, now_ms) {
                    counts.add(record, now_ms);
                }
            }
            cursor = page.next;
            if cursor.is_none() {
                self.publish(counts);
                tracing::debug!(
                    records,
                    read_ms = read.as_millis() as u64,
                    pass_ms = pass_started.elapsed().as_millis() as u64,
                    "census pass"
                );
                return Ok(());
            }
            tokio::time::sleep(started.elapsed() * PAUSE_PER_PAGE_FACTOR).await;
        }
    }

    /// Makes a pass every `interval` (`pass_interval`) until `stopped`.
    pub async fn run<S: Store>(
        self: Arc<Self>,
        store: Arc<S>,
        interval: Duration,
        clock: impl Clock,
        stopped: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(stopped);
        loop {
            tokio::select! {
                () = &mut stopped => return,
                passed = self.pass(&store, &clock) => {
                    if let Err(error) = passed {
                        tracing::warn!(%error, "the census of records by state could not read the store; the gauges keep the last whole count");
                    }
                }
            }
            tokio::select! {
                () = &mut stopped => return,
                () = tokio::time::sleep(interval) => {}
            }
        }
    }
}

/// One page of `store` from `cursor`, read on a blocking thread.
async fn read_page<S: Store>(
    store: &Arc<S>,
    cursor: Option<Vec<u8>>,
) -> Result<crate::store::Page, String> {
    let store = store.clone();
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || runtime.block_on(store.scan(cursor, PAGE_RECORDS_MAX)))
        .await
        .map_err(|error| format!("the census's read failed: {error}"))?
        .map_err(|error| error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Record;

    fn record(state: State, created_ms: u64, serial: &[u8]) -> Record {
        Record {
            state: state as i32,
            created_ms,
            lease_until_ms: 10_000,
            expires_ms: 100_000,
            serial: serial.to_vec(),
            ..Record::default()
        }
    }

    #[test]
    fn counts_by_state_and_finds_the_oldest_in_doubt() {
        let mut counts = Counts::default();
        counts.add(&record(State::InFlight, 5, b""), 1_000);
        counts.add(&record(State::Completed, 1, b""), 1_000);
        counts.add(&record(State::InDoubt, 300, b""), 1_000);
        counts.add(&record(State::InDoubt, 200, b"serial"), 1_000);
        // Past its lease, a record still IN_FLIGHT is IN_DOUBT, as a claim would see it.
        counts.add(&record(State::InFlight, 700, b""), 20_000);
        assert_eq!(
            counts,
            Counts {
                in_flight: 1,
                completed: 1,
                in_doubt: 3,
                waiting_for_operator: 2,
                oldest_in_doubt_ms: Some(200),
            }
        );
    }
}

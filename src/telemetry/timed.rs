//! The store layer that times, counts and traces every transition (`idemproxy.store.*`):
//! one span and one duration per store operation, whatever the store and whoever calls it
//! (the engine or the admin API). It changes no record and decides nothing; what it records
//! carries the operation and the backend, never a key's serial or caller.

use super::metrics::Metrics;
use super::trace;
use crate::key::Key;
use crate::record::{Change, Record};
use crate::store::{Operation, Page, Store, StoreError};
use std::future::Future;
use std::time::Instant;
use tracing::Instrument as _;

/// `S`, with each transition timed and traced under its operation.
pub struct Timed<S> {
    inner: S,
    metrics: Metrics,
}

impl<S: Store> Timed<S> {
    /// `inner`, recording into `metrics`.
    pub fn new(inner: S, metrics: Metrics) -> Timed<S> {
        Timed { inner, metrics }
    }
}

impl<S: Store> Timed<S> {
    /// The store this layer wraps.
    fn inner_store(&self) -> &S {
        &self.inner
    }
}

impl<S: Store> Store for Timed<S> {
    async fn update<T, F>(
        &self,
        operation: Operation,
        key: &Key,
        transition: F,
    ) -> Result<T, StoreError>
    where
        T: Send,
        F: FnMut(Option<&Record>) -> (Change, T) + Send,
    {
        let span = trace::store_span(operation.as_str(), self.metrics.backend());
        let started = Instant::now();
        let result = self
            .inner
            .update(operation, key, transition)
            .instrument(span)
            .await;
        self.metrics
            .store(operation, started.elapsed(), result.is_err());
        result
    }

    fn scan(
        &self,
        cursor: Option<Vec<u8>>,
        limit: usize,
    ) -> impl Future<Output = Result<Page, StoreError>> + Send {
        self.inner.scan(cursor, limit)
    }

    crate::delegate_store!(inner_store);
}

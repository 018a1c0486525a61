//! A write whose outcome is unknown, settled (issue 32 item 5): the connection broke (or
//! PostgreSQL ended the session, or it did not answer in time) after the statement was sent,
//! so it may or may not have committed. Nothing is decided until the record is read again
//! from a state that can no longer change under the read and that a failover cannot take back:
//!
//! 1. The old session is waited out: ended with `pg_terminate_backend` while it is still
//!    running its statement (which then rolls back), but never while it waits for the
//!    synchronous standby (`wait_event` `SyncRep`): ending it there would make a commit that
//!    no standby has visible (PostgreSQL's "committed locally" warning), and a failover
//!    would then take back what was read. It is waited for instead, within the timeout.
//! 2. The record is read.
//! 3. A barrier: one transaction that commits with an id (`pg_current_xact_id()`), so it
//!    waits for the synchronous standby as every commit does, and its commit comes after any
//!    commit of the old session: once it returns, what was read is on the standby too.
//!
//! All within `--store-timeout`, reconnecting (to the next host of the URL after a failover)
//! as needed; past it the write fails closed (`StoreError::Io`). This module never writes a
//! record.

use super::{describe, unavailable, Backend, PostgresStore, Shared};
use crate::key::Key;
use crate::store::StoreError;
use std::time::Duration;

/// Pause between two attempts while settling an unknown outcome.
const SETTLE_RETRY: Duration = Duration::from_millis(50);

/// Ends the old session unless it waits for the standby, and says whether it is still there.
const END_SESSION: &str = "SELECT CASE WHEN wait_event IS DISTINCT FROM 'SyncRep' \
     THEN pg_terminate_backend(pid) END \
     FROM pg_stat_activity WHERE pid = $1 AND backend_start::text = $2";

/// Waits for the standby (through the commit of a transaction with an id).
const BARRIER: &str = "SELECT pg_current_xact_id()::text";

impl PostgresStore {
    /// The record of `key` once the session that may have committed a swap to it is over
    /// and what it left is on the synchronous standby: the truth to decide on.
    pub(super) async fn settle(
        &self,
        key: &Key,
        broken: &Backend,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let deadline = tokio::time::Instant::now() + self.shared.timeout;
        loop {
            let settled = async {
                self.shared.end_session(broken).await?;
                let now = self.shared.read(key).await?;
                let _: String = self.shared.query_one(BARRIER, &[]).await?;
                Ok::<_, StoreError>(now)
            };
            match tokio::time::timeout_at(deadline, settled).await {
                Ok(Ok(now)) => return Ok(now),
                Ok(Err(error)) if tokio::time::Instant::now() + SETTLE_RETRY >= deadline => {
                    return Err(error);
                }
                Ok(Err(_)) => tokio::time::sleep(SETTLE_RETRY).await,
                Err(_) => {
                    return Err(unavailable(
                        "did not come back",
                        format!(
                            "a write's outcome is unknown and could not be settled within {:?}",
                            self.shared.timeout
                        ),
                    ));
                }
            }
        }
    }
}

impl Shared {
    /// Waits until `backend`'s session is gone from the server connected to now, ending it
    /// unless it waits for the standby; its transaction is then over for good. On another
    /// server (after a failover) it is not there, and nothing is done.
    async fn end_session(&self, backend: &Backend) -> Result<(), StoreError> {
        let connected = self.connection().await?;
        let ending = async {
            loop {
                let rows = connected
                    .client
                    .query(END_SESSION, &[&backend.pid, &backend.started])
                    .await?;
                if rows.is_empty() {
                    return Ok::<(), tokio_postgres::Error>(());
                }
                tokio::time::sleep(SETTLE_RETRY).await;
            }
        };
        match tokio::time::timeout(self.timeout, ending).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(unavailable(
                "could not end a broken session",
                describe(&error),
            )),
            Err(_) => Err(unavailable(
                "did not end a broken session",
                format!("still there after {:?}", self.timeout),
            )),
        }
    }
}

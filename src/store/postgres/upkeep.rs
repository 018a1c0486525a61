//! The PostgreSQL store's upkeep (issue 32 items 7 and 8): expiry in short batches, the
//! cached record count, and readiness with what a failover can lose.
//!
//! Expired records leave by `DELETE … WHERE ctid = ANY(… LIMIT n)`, each batch its own short
//! transaction, never one long one that holds back vacuum. Readiness reads whether the
//! server is a primary, its `synchronous_commit` and its synchronous standbys, logs every
//! change of them, and with `--postgres-require-sync-replica` is not ready without one.
//! Nothing here writes a record that is alive.

use super::{
    describe, unavailable, PostgresStore, Shared, EXPIRE_BATCHES_MAX, EXPIRE_BATCH_RECORDS,
};
use crate::store::{Maintenance, StoreError};
use std::sync::atomic::Ordering;
use tokio_postgres::types::{FromSqlOwned, ToSql};
use tokio_postgres::Row;

/// Whether the primary answers with a synchronous standby behind it.
const REPLICATION: &str = "SELECT pg_is_in_recovery(), current_setting('synchronous_commit'), \
     (SELECT count(*) FROM pg_stat_replication WHERE sync_state IN ('sync', 'quorum'))";

impl Shared {
    /// Runs one statement within the timeout; a broken session is forgotten.
    pub(super) async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let connected = self.connection().await?;
        match tokio::time::timeout(self.timeout, connected.client.query(sql, params)).await {
            Ok(Ok(rows)) => Ok(rows),
            Ok(Err(error)) => {
                if super::outcome_unknown(&error) {
                    self.discard(&connected);
                }
                Err(unavailable("statement failed", describe(&error)))
            }
            Err(_) => {
                self.discard(&connected);
                Err(unavailable(
                    "statement failed",
                    format!("no answer within {:?}", self.timeout),
                ))
            }
        }
    }

    /// The first column of the one row `sql` answers.
    pub(super) async fn query_one<T: FromSqlOwned>(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<T, StoreError> {
        let rows = self.query(sql, params).await?;
        let row = rows
            .first()
            .ok_or_else(|| unavailable("answered no row", sql))?;
        row.try_get(0)
            .map_err(|error| unavailable("answered an unexpected value", describe(&error)))
    }
}

impl PostgresStore {
    /// Deletes expired records in batches, then counts what is left.
    pub(super) async fn maintain_async(&self, now_ms: u64) -> Result<Maintenance, StoreError> {
        let now_ms = i64::try_from(now_ms).unwrap_or(i64::MAX);
        let expire = self.shared.table.expire();
        let mut expired = 0;
        for _ in 0..EXPIRE_BATCHES_MAX {
            let gone: i64 = self
                .shared
                .query_one(&expire, &[&now_ms, &EXPIRE_BATCH_RECORDS])
                .await?;
            expired += u64::try_from(gone).unwrap_or(0);
            if gone < EXPIRE_BATCH_RECORDS {
                break;
            }
        }
        let records: i64 = self
            .shared
            .query_one(&self.shared.table.count(), &[])
            .await?;
        self.records
            .store(u64::try_from(records).unwrap_or(0), Ordering::Relaxed);
        Ok(Maintenance {
            expired,
            evicted: 0,
        })
    }

    /// Readiness: a primary that answers; with `require_sync_replica`, one with a
    /// synchronous standby and `synchronous_commit` waiting for it.
    pub(super) async fn check_replication(&self) -> Result<(), StoreError> {
        let rows = self.shared.query(REPLICATION, &[]).await?;
        let row = rows
            .first()
            .ok_or_else(|| unavailable("answered no row", "replication state"))?;
        let field = |error| unavailable("replication state", describe(&error));
        let in_recovery: bool = row.try_get(0).map_err(field)?;
        let synchronous_commit: String = row.try_get(1).map_err(field)?;
        let standbys: i64 = row.try_get(2).map_err(field)?;
        if in_recovery {
            return Err(StoreError::Io(
                "PostgreSQL answered as a standby (in recovery), which takes no writes: list \
                 every host in --postgres-url with target_session_attrs=read-write"
                    .into(),
            ));
        }
        // `local` and `off` acknowledge a commit before any standby has it.
        let waits_for_standby = !matches!(synchronous_commit.as_str(), "local" | "off");
        let sync = if waits_for_standby { standbys } else { 0 };
        let before = self.sync_standbys.swap(sync, Ordering::Relaxed);
        if before != sync {
            let message = if sync > 0 {
                "PostgreSQL commits wait for a synchronous standby: a failover loses no acknowledged record"
            } else {
                "PostgreSQL has no synchronous standby (or synchronous_commit does not wait for one; the role needs pg_monitor to see standbys): a failover can lose acknowledged records"
            };
            tracing::info!(sync_standbys = sync, %synchronous_commit, "{message}");
        }
        if self.require_sync_replica && sync == 0 {
            return Err(StoreError::Io(format!(
                "PostgreSQL has no synchronous standby (synchronous_commit {synchronous_commit}, \
                 {standbys} sync standbys seen) and --postgres-require-sync-replica is set: \
                 start a standby named in synchronous_standby_names"
            )));
        }
        Ok(())
    }
}

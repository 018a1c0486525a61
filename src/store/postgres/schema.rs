//! The PostgreSQL store's schema and its SQL (issue 32 item 2): the records table, the
//! version table beside it, and every statement the store runs, written once here.
//!
//! The schema is the sidecar's: created at the first start, recorded with its version,
//! migrated in place by a newer release, all inside one transaction holding an advisory lock
//! named for the table, so N replicas starting at once wait for each other instead of racing.
//! A table at a version newer than this release knows is refused, never downgraded. This
//! module never touches a record.

use super::EXPECTED_BYTES_MAX;
use tokio_postgres::Client;

/// The schema version this release writes and reads.
pub const SCHEMA_VERSION: i32 = 2;

/// The records table's fillfactor (version 2): each page takes new rows up to this share and
/// keeps the rest for their completions, which PostgreSQL then writes on the same page with
/// no index entry (a heap-only tuple: a completion leaves every indexed column as its claim
/// wrote it, `expiry_column`). Measured in BENCHMARKS.md against 70 and the default 100.
pub const FILLFACTOR: u32 = 40;

/// How long a migration waits for the table's lock before it gives up (and the next
/// connection tries again): a migration never queues the service's statements behind a long
/// one of someone else's.
const MIGRATION_LOCK_WAIT: &str = "5s";

/// The names of one records table and of what belongs to it, quoted for SQL.
#[derive(Debug, Clone)]
pub struct Table {
    /// `"schema"."table"` or `"table"`.
    pub quoted: String,
    /// The version table in the same schema.
    versions: String,
    /// The table's name as given (`--postgres-table`): the version row's key and the change
    /// channel.
    pub name: String,
    /// The bare table name, for naming its indexes.
    bare: String,
}

impl Table {
    /// The names for `name` (`table` or `schema.table`, checked by the settings).
    pub fn new(name: &str) -> Table {
        let (schema, bare) = match name.split_once('.') {
            Some((schema, bare)) => (Some(schema), bare),
            None => (None, name),
        };
        let within = |object: &str| match schema {
            Some(schema) => format!("\"{schema}\".\"{object}\""),
            None => format!("\"{object}\""),
        };
        Table {
            quoted: within(bare),
            versions: within("idemproxy_schema"),
            name: name.to_owned(),
            bare: bare.to_owned(),
        }
    }

    /// The records table of version 1, with its expiry and caller indexes.
    fn create_v1(&self) -> String {
        let (table, bare) = (&self.quoted, &self.bare);
        format!(
            "CREATE TABLE {table} (\
               key bytea PRIMARY KEY, \
               value bytea NOT NULL, \
               expires_ms bigint NOT NULL, \
               caller text NOT NULL); \
             CREATE INDEX \"{bare}_expires\" ON {table} (expires_ms); \
             CREATE INDEX \"{bare}_caller\" ON {table} (caller, expires_ms)"
        )
    }

    /// Version 2: room on every page for the completions of its claims (`FILLFACTOR`; pages
    /// written before keep theirs), and a record's `watched` flag: set by a duplicate that
    /// waits on it, so that only a change somebody waits for is announced. Adding a column
    /// with a constant default rewrites nothing.
    fn v2(&self) -> String {
        format!(
            "ALTER TABLE {} SET (fillfactor = {FILLFACTOR}), \
               ADD COLUMN watched boolean NOT NULL DEFAULT false",
            self.quoted
        )
    }

    /// Reads one record.
    pub fn read(&self) -> String {
        format!("SELECT value FROM {} WHERE key = $1", self.quoted)
    }

    /// One group commit: every swap of the batch in one statement (one transaction).
    ///
    /// $1 positions, $2 keys, $3 the record each swap was decided on (NULL: it was absent),
    /// whole or its SHA-256 by its size (`EXPECTED_BYTES_MAX`), $4 the new record (NULL:
    /// delete), $5 its expiry column, $6 its caller, $7 the change channel. Returns per
    /// position whether it was applied and, when not, the record as the statement's snapshot
    /// saw it (looked up only for those). A replaced or deleted record that a duplicate waits
    /// on (`watched`) is announced on the channel, delivered when the statement commits.
    pub fn swap(&self) -> String {
        let table = &self.quoted;
        // The record as `expected` in mod.rs gives it: whole up to its size limit, else
        // its SHA-256.
        let same = format!(
            "CASE WHEN octet_length(r.value) <= {EXPECTED_BYTES_MAX} \
               THEN r.value = i.expected ELSE sha256(r.value) = i.expected END"
        );
        format!(
            "WITH input AS (\
               SELECT * FROM unnest($1::int4[], $2::bytea[], $3::bytea[], $4::bytea[], \
                                    $5::int8[], $6::text[]) \
                 AS i(n, key, expected, value, expires_ms, caller)), \
             inserted AS (\
               INSERT INTO {table} (key, value, expires_ms, caller) \
               SELECT key, value, expires_ms, caller FROM input \
               WHERE expected IS NULL AND value IS NOT NULL ORDER BY key \
               ON CONFLICT (key) DO NOTHING RETURNING key), \
             updated AS (\
               UPDATE {table} AS r \
               SET value = i.value, expires_ms = i.expires_ms, caller = i.caller \
               FROM input AS i \
               WHERE i.expected IS NOT NULL AND i.value IS NOT NULL \
                 AND r.key = i.key AND {same} \
               RETURNING r.key, r.watched), \
             deleted AS (\
               DELETE FROM {table} AS r USING input AS i \
               WHERE i.expected IS NOT NULL AND i.value IS NULL \
                 AND r.key = i.key AND {same} \
               RETURNING r.key, r.watched), \
             changed AS (SELECT * FROM updated UNION ALL SELECT * FROM deleted), \
             notified AS (SELECT count(pg_notify($7, encode(key, 'hex'))) AS n \
                          FROM changed WHERE watched), \
             applied AS (SELECT key FROM inserted UNION ALL SELECT key FROM changed) \
             SELECT i.n, a.key IS NOT NULL, \
                    CASE WHEN a.key IS NULL \
                      THEN (SELECT r.value FROM {table} AS r WHERE r.key = i.key) END, \
                    (SELECT n FROM notified) \
             FROM input AS i LEFT JOIN applied AS a ON a.key = i.key"
        )
    }

    /// Marks record $1 as waited on, so that its next change is announced. Returns true
    /// when a change before it may have gone unannounced: the record was not marked yet, or
    /// is gone.
    pub fn watch(&self) -> String {
        let table = &self.quoted;
        format!(
            "WITH marked AS (\
               UPDATE {table} SET watched = true WHERE key = $1 AND NOT watched RETURNING 1) \
             SELECT EXISTS (SELECT 1 FROM marked) \
                 OR NOT EXISTS (SELECT 1 FROM {table} WHERE key = $1)"
        )
    }

    /// Deletes up to $2 records that expired by $1 (Unix ms); returns how many. Records
    /// another replica's sweeper or a swap holds are skipped, not waited for.
    pub fn expire(&self) -> String {
        let table = &self.quoted;
        format!(
            "WITH gone AS (\
               DELETE FROM {table} WHERE ctid = ANY(ARRAY(\
                 SELECT ctid FROM {table} WHERE expires_ms <= $1 LIMIT $2 \
                 FOR UPDATE SKIP LOCKED)) \
               AND expires_ms <= $1 RETURNING 1) \
             SELECT count(*) FROM gone"
        )
    }

    /// The records held: counted while the table is small, PostgreSQL's estimate past that
    /// (a count walks the whole table).
    pub fn count(&self) -> String {
        let table = &self.quoted;
        format!(
            "SELECT CASE WHEN c.reltuples < 100000 THEN (SELECT count(*) FROM {table}) \
                    ELSE c.reltuples::bigint END \
             FROM pg_class AS c WHERE c.oid = '{}'::regclass",
            table.replace('\'', "''")
        )
    }

    /// A caller's live records at $2 (Unix ms).
    pub fn caller_records(&self) -> String {
        format!(
            "SELECT count(*) FROM {} WHERE caller = $1 AND expires_ms > $2",
            self.quoted
        )
    }

    /// Up to $2 records after key $1, in key order.
    pub fn scan(&self) -> String {
        format!(
            "SELECT key, value FROM {} WHERE key > $1 ORDER BY key LIMIT $2",
            self.quoted
        )
    }
}

/// Why the schema could not be made ready.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// PostgreSQL refused a statement.
    #[error("{}", super::describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// The table was written by a newer release.
    #[error(
        "table {table} is at schema version {found}, newer than this release's {SCHEMA_VERSION}: \
         run the newer release, or give this one its own --postgres-table"
    )]
    Newer {
        /// The table.
        table: String,
        /// The version found.
        found: i32,
    },
}

/// Creates or migrates the table to `SCHEMA_VERSION`, holding the schema's advisory lock for
/// the transaction. Returns the version found before (0: none).
pub async fn ensure(client: &mut Client, table: &Table) -> Result<i32, SchemaError> {
    let transaction = client.transaction().await?;
    transaction
        .batch_execute(&format!("SET LOCAL lock_timeout = '{MIGRATION_LOCK_WAIT}'"))
        .await?;
    // One lock per schema, not per table: the version table is shared by every records
    // table of the schema, and two services starting together would both create it.
    let lock = format!("idemproxy:{}", table.versions);
    transaction
        .execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&lock])
        .await?;
    let exists: bool = transaction
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table.versions])
        .await?
        .get(0);
    if !exists {
        transaction
            .batch_execute(&format!(
                "CREATE TABLE {} (table_name text PRIMARY KEY, version integer NOT NULL)",
                table.versions
            ))
            .await?;
    }
    let select = format!(
        "SELECT version FROM {} WHERE table_name = $1",
        table.versions
    );
    let found: i32 = transaction
        .query_opt(&select, &[&table.name])
        .await?
        .map_or(0, |row| row.get(0));
    if found > SCHEMA_VERSION {
        return Err(SchemaError::Newer {
            table: table.name.clone(),
            found,
        });
    }
    // Each step takes the table from one version to the next.
    if found < 1 {
        transaction.batch_execute(&table.create_v1()).await?;
    }
    if found < 2 {
        transaction.batch_execute(&table.v2()).await?;
    }
    if found < SCHEMA_VERSION {
        let upsert = format!(
            "INSERT INTO {} (table_name, version) VALUES ($1, $2) \
             ON CONFLICT (table_name) DO UPDATE SET version = EXCLUDED.version",
            table.versions
        );
        transaction
            .execute(&upsert, &[&table.name, &SCHEMA_VERSION])
            .await?;
    }
    transaction.commit().await?;
    Ok(found)
}

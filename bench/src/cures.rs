//! The cures a team writes into its own service instead of running idemproxy, as a careful
//! team would write them, for the benchmark to compare against (issue "Performance against
//! what users would run instead"). Each wraps the echo handler of the benchmark's upstream:
//!
//! - **the Redis flag**: claim the key with `SET key pending NX PX retention`; the winner runs
//!   the handler and stores its answer with `SET key done+answer PX retention`; a duplicate
//!   reads the key and replays the answer (or is refused while the first is running).
//! - **the dedup table**: claim with `INSERT … ON CONFLICT DO NOTHING` into a PostgreSQL table
//!   keyed by the idempotency key (`synchronous_commit = on`), store the answer with `UPDATE`
//!   in the same row, replay it to a duplicate with `SELECT`.
//!
//! Neither does what idemproxy adds: fingerprints, waiting duplicates, fencing, trailers.

use anyhow::Context;
use std::sync::atomic::{AtomicUsize, Ordering};
use tonic::Status;

/// How long a claim is kept: the sidecar's default retention.
const RETENTION_MS: u64 = 24 * 60 * 60 * 1000;

/// PostgreSQL connections of the dedup table: enough for the benchmark's 32 calls in flight
/// to reach PostgreSQL's group commit, as a service's connection pool would.
const POSTGRES_CONNECTIONS: usize = 8;

/// The first byte of a Redis flag's value.
const PENDING: u8 = b'p';
const DONE: u8 = b'd';

/// Which cure, and its connections.
pub enum Cure {
    RedisFlag(redis::aio::ConnectionManager),
    DedupTable {
        connections: Vec<Postgres>,
        next: AtomicUsize,
    },
}

/// One PostgreSQL connection with the cure's statements prepared on it.
pub struct Postgres {
    client: tokio_postgres::Client,
    claim: tokio_postgres::Statement,
    complete: tokio_postgres::Statement,
    replay: tokio_postgres::Statement,
}

impl Postgres {
    async fn connect(config: &str) -> anyhow::Result<Postgres> {
        let (client, connection) = tokio_postgres::connect(config, tokio_postgres::NoTls)
            .await
            .context("cannot connect to PostgreSQL")?;
        tokio::spawn(connection);
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS dedup (
                     key text PRIMARY KEY,
                     answer bytea,
                     created timestamptz NOT NULL DEFAULT now())",
            )
            .await
            .context("cannot create the dedup table")?;
        let claim = client
            .prepare("INSERT INTO dedup (key) VALUES ($1) ON CONFLICT DO NOTHING")
            .await?;
        let complete = client
            .prepare("UPDATE dedup SET answer = $2 WHERE key = $1")
            .await?;
        let replay = client
            .prepare("SELECT answer FROM dedup WHERE key = $1")
            .await?;
        Ok(Postgres {
            client,
            claim,
            complete,
            replay,
        })
    }
}

impl Cure {
    /// `redis-flag=redis://…` or `dedup-table=host=… port=… user=… dbname=…`.
    pub async fn connect(spec: &str) -> anyhow::Result<Cure> {
        match spec.split_once('=') {
            Some(("redis-flag", url)) => {
                // Nagle's algorithm off, as a careful team sets it (the library leaves it on).
                let info = redis::IntoConnectionInfo::into_connection_info(url)
                    .context("the Redis URL")?
                    .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
                let client = redis::Client::open(info).context("the Redis URL")?;
                let connection = client
                    .get_connection_manager()
                    .await
                    .context("cannot connect to Redis")?;
                Ok(Cure::RedisFlag(connection))
            }
            Some(("dedup-table", config)) => {
                let mut connections = Vec::with_capacity(POSTGRES_CONNECTIONS);
                for _ in 0..POSTGRES_CONNECTIONS {
                    connections.push(Postgres::connect(config).await?);
                }
                Ok(Cure::DedupTable {
                    connections,
                    next: AtomicUsize::new(0),
                })
            }
            _ => {
                anyhow::bail!("--cure {spec:?}: expected redis-flag=URL or dedup-table=CONNECTION")
            }
        }
    }

    /// Runs `handler` once per `key`: its answer, or the first call's answer replayed.
    pub async fn once(
        &self,
        key: &str,
        handler: impl std::future::Future<Output = Vec<u8>>,
    ) -> Result<Vec<u8>, Status> {
        match self {
            Cure::RedisFlag(connection) => redis_flag(connection.clone(), key, handler).await,
            Cure::DedupTable { connections, next } => {
                let at = next.fetch_add(1, Ordering::Relaxed) % connections.len();
                dedup_table(&connections[at], key, handler).await
            }
        }
    }
}

fn unavailable(error: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("the dedup store failed: {error}"))
}

async fn redis_flag(
    mut connection: redis::aio::ConnectionManager,
    key: &str,
    handler: impl std::future::Future<Output = Vec<u8>>,
) -> Result<Vec<u8>, Status> {
    let key = format!("dedup:{key}");
    let claimed: Option<String> = redis::cmd("SET")
        .arg(&key)
        .arg(&[PENDING][..])
        .arg("NX")
        .arg("PX")
        .arg(RETENTION_MS)
        .query_async(&mut connection)
        .await
        .map_err(unavailable)?;
    if claimed.is_some() {
        let answer = handler.await;
        let mut stored = Vec::with_capacity(answer.len() + 1);
        stored.push(DONE);
        stored.extend_from_slice(&answer);
        let () = redis::cmd("SET")
            .arg(&key)
            .arg(stored)
            .arg("PX")
            .arg(RETENTION_MS)
            .query_async(&mut connection)
            .await
            .map_err(unavailable)?;
        return Ok(answer);
    }
    let stored: Option<Vec<u8>> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut connection)
        .await
        .map_err(unavailable)?;
    match stored.as_deref() {
        Some([DONE, answer @ ..]) => Ok(answer.to_vec()),
        _ => Err(Status::aborted(
            "the first call with this key is still running",
        )),
    }
}

async fn dedup_table(
    postgres: &Postgres,
    key: &str,
    handler: impl std::future::Future<Output = Vec<u8>>,
) -> Result<Vec<u8>, Status> {
    let client = &postgres.client;
    let claimed = client
        .execute(&postgres.claim, &[&key])
        .await
        .map_err(unavailable)?;
    if claimed == 1 {
        let answer = handler.await;
        client
            .execute(&postgres.complete, &[&key, &answer])
            .await
            .map_err(unavailable)?;
        return Ok(answer);
    }
    let row = client
        .query_opt(&postgres.replay, &[&key])
        .await
        .map_err(unavailable)?;
    match row.and_then(|row| row.get::<_, Option<Vec<u8>>>(0)) {
        Some(answer) => Ok(answer),
        None => Err(Status::aborted(
            "the first call with this key is still running",
        )),
    }
}

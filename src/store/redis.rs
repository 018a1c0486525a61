//! The shared store on Redis (design §5): one dedup state for every replica of a service.
//!
//! Each record is one string value, `<prefix>:{<key hash hex>}`, holding the protobuf
//! `Record`; the braces are a Redis Cluster hash tag, so everything about one record lives in
//! one slot. A transition reads the record (`GET`), lets `record.rs` decide, then applies the
//! change with one script that compares the record against what was read (its SHA-1) and
//! only then writes: a compare-and-swap, never a blind read-then-write. A refused swap
//! returns the record as it is now, for the next round. A key is first tried as fresh: a
//! transition that would create a record where none is swaps from "absent" without a `GET`,
//! so a fresh key's claim is one round trip. The claim token is part of the compared bytes,
//! so a late completion from an owner whose record was replaced fails the compare and is
//! refused by `record::complete` on what the refusal handed back (fencing).
//!
//! Expiry is Redis' own TTL (`PXAT` of the record's expiry). A change to a record that was
//! there publishes on the record's own channel; waiting duplicates subscribe to it through one subscriber
//! connection per process, and poll as the fallback when a message is missed. Redis being
//! unreachable or slow is an error bounded by the command timeout, never a hang: the engine
//! then fails closed. This module never decides a state and never retries a write whose
//! result it does not know; the engine's release settles that.

use super::sentinel::{MasterConnection, Sentinel, SentinelSettings};
use super::waiters::{Subscription, Waiters};
use super::{Maintenance, Operation, Store, StoreError, Usage, CAS_ROUNDS_MAX};
use crate::key::Key;
use crate::record::{Change, Record};
use futures_util::StreamExt;
use prost::Message;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, OnceCell};

/// Longest pause between two attempts to reconnect the subscriber.
const RESUBSCRIBE_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// How long the replication fence key (`PREFIX:replication-fence`, written before a `WAIT`
/// that confirms a read) outlives its last write.
const FENCE_TTL_MS: u64 = 3_600_000;

/// Applies one change if the record is still the one that was read.
///
/// KEYS[1] the record; ARGV[1] SHA-1 hex of the record read, "" when there was none;
/// ARGV[2] "put" or "delete"; ARGV[3] the new record; ARGV[4] its expiry, Unix ms.
/// Returns {1} when applied, {0, the record now} when it changed since it was read (so the
/// next attempt needs no GET). A change publishes on the record's channel only when it
/// replaces or deletes a record: nobody waits on a key that has none.
const COMPARE_AND_SWAP: &str = r"
local current = redis.call('GET', KEYS[1])
if current then
  if ARGV[1] == '' or redis.sha1hex(current) ~= ARGV[1] then return {0, current} end
elseif ARGV[1] ~= '' then
  return {0, false}
end
if ARGV[2] == 'put' then
  redis.call('SET', KEYS[1], ARGV[3], 'PXAT', ARGV[4])
else
  redis.call('DEL', KEYS[1])
end
if current then redis.call('PUBLISH', KEYS[1], '') end
return {1, false}
";

/// What a compare-and-swap did.
enum Swap {
    Applied,
    /// The record changed since it was read: what it holds now.
    Refused(Option<Vec<u8>>),
}

/// Files a record under its caller's sorted set (score: when it expires), or takes it out;
/// the set expires with its last record.
const COUNT_CALLER: &str = r"
if ARGV[1] == 'add' then
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
  local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  redis.call('PEXPIREAT', KEYS[1], last[2])
else
  redis.call('ZREM', KEYS[1], ARGV[2])
end
return 1
";

/// A caller's live records: its set, less what has expired.
const CALLER_RECORDS: &str = r"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
return redis.call('ZCARD', KEYS[1])
";

/// How to reach Redis.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// `redis://host:port[/db]` (or `rediss://`); several seed nodes for a cluster.
    pub urls: Vec<String>,
    /// Talk Redis Cluster (slots, MOVED/ASK) instead of one server.
    pub cluster: bool,
    /// Password, when it is not in the URL.
    pub password: Option<String>,
    /// PEM certificates that `rediss://` servers are verified against, instead of the
    /// system's roots (a private CA).
    pub ca_pem: Option<Vec<u8>>,
    /// Prefix of every key this sidecar writes.
    pub key_prefix: String,
    /// Longest wait for one command, connecting included; past it the call fails closed.
    pub command_timeout: Duration,
    /// How often a waiting duplicate re-reads the record when no change message came.
    pub poll_interval: Duration,
    /// Keep each caller's records in a sorted set, for the per-caller cap (one more command
    /// per new and per deleted record).
    pub track_callers: bool,
    /// The master's name under Redis Sentinel: `urls` are then the sentinels, asked which
    /// node is the master (`store::sentinel`).
    pub master_name: Option<String>,
    /// Replicas that must have each write (`WAIT`) before it counts, and before a record read
    /// decides anything; 0: none asked (Redis' replication alone, asynchronous).
    pub wait_replicas: u32,
}

/// Why the Redis settings cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("invalid Redis URL {url:?}: {reason}")]
pub struct RedisUrlError {
    /// The URL.
    pub url: String,
    /// What the client library said.
    pub reason: String,
}

#[derive(Clone)]
enum RedisConnection {
    Single(redis::aio::ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
    /// The master the sentinels named, forgotten on an error that says it may not be one.
    Sentinel(MasterConnection),
}

impl RedisConnection {
    async fn query<T: redis::FromRedisValue>(
        &mut self,
        command: &redis::Cmd,
    ) -> redis::RedisResult<T> {
        match self {
            RedisConnection::Single(connection) => command.query_async(connection).await,
            RedisConnection::Cluster(connection) => command.query_async(connection).await,
            RedisConnection::Sentinel(master) => {
                let watch = master.watch();
                let result = command.query_async(&mut master.connection).await;
                watch.settle(&result);
                result
            }
        }
    }

    async fn invoke<T: redis::FromRedisValue>(
        &mut self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> redis::RedisResult<T> {
        match self {
            RedisConnection::Single(connection) => invocation.invoke_async(connection).await,
            RedisConnection::Cluster(connection) => invocation.invoke_async(connection).await,
            RedisConnection::Sentinel(master) => {
                let watch = master.watch();
                let result = invocation.invoke_async(&mut master.connection).await;
                watch.settle(&result);
                result
            }
        }
    }
}

// One per store, made once at start: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
enum Target {
    Single(redis::Client),
    Cluster(redis::cluster::ClusterClient),
    Sentinel(Arc<Sentinel>),
}

/// The Redis-backed store.
pub struct RedisStore {
    target: Target,
    connection: OnceCell<RedisConnection>,
    script: redis::Script,
    count_caller: Option<redis::Script>,
    caller_records: redis::Script,
    key_prefix: String,
    command_timeout: Duration,
    wait_replicas: u32,
    notifier: Arc<Waiters>,
    records: AtomicU64,
}

fn client_for(url: &str, options: &RedisOptions) -> Result<redis::Client, RedisUrlError> {
    let invalid = |error: redis::RedisError| RedisUrlError {
        url: url.to_owned(),
        reason: error.to_string(),
    };
    let mut info = redis::IntoConnectionInfo::into_connection_info(url)
        .map_err(invalid)?
        .set_tcp_settings(tcp_settings());
    if let Some(password) = &options.password {
        let settings = info.redis_settings().clone().set_password(password);
        info = info.set_redis_settings(settings);
    }
    match (&options.ca_pem, url.starts_with("rediss:")) {
        (Some(ca_pem), true) => {
            redis::Client::build_with_tls(info, certificates(ca_pem)).map_err(invalid)
        }
        _ => redis::Client::open(info).map_err(invalid),
    }
}

/// Nagle's algorithm off, as redis-server sets it on its side: with it on, a command written
/// while the last one is unacknowledged waits for Redis's delayed ACK (the client library
/// leaves it on by default).
fn tcp_settings() -> redis::io::tcp::TcpSettings {
    redis::io::tcp::TcpSettings::default().set_nodelay(true)
}

fn certificates(ca_pem: &[u8]) -> redis::TlsCertificates {
    redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(ca_pem.to_vec()),
    }
}

fn unavailable(what: &str, error: impl std::fmt::Display) -> StoreError {
    StoreError::Io(format!("Redis {what}: {error}"))
}

impl RedisStore {
    /// A store over `options`, connecting lazily: an unreachable Redis fails calls (closed),
    /// not the start, and is retried on every call. Must run inside a tokio runtime (it starts
    /// the subscriber task). Errors only on settings that can never work.
    pub fn new(options: &RedisOptions) -> Result<RedisStore, RedisUrlError> {
        let first = options.urls.first().ok_or_else(|| RedisUrlError {
            url: String::new(),
            reason: "no URL given".into(),
        })?;
        if options.urls.iter().any(|url| url.starts_with("rediss:")) {
            // rustls needs one process-wide crypto provider; an error means one is set.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let target = if let Some(name) = &options.master_name {
            let settings = SentinelSettings {
                urls: &options.urls,
                name,
                password: options.password.as_deref(),
                certificates: options.ca_pem.as_deref().map(certificates),
                tcp: tcp_settings(),
                timeout: options.command_timeout,
            };
            Target::Sentinel(Sentinel::new(settings).map_err(|error| RedisUrlError {
                url: options.urls.join(","),
                reason: error.to_string(),
            })?)
        } else if options.cluster {
            let mut builder = redis::cluster::ClusterClient::builder(options.urls.clone())
                .connection_timeout(options.command_timeout)
                .response_timeout(options.command_timeout)
                .retries(2)
                .tcp_settings(tcp_settings());
            if let Some(password) = &options.password {
                builder = builder.password(password);
            }
            if let Some(ca_pem) = &options.ca_pem {
                builder = builder.certs(certificates(ca_pem));
            }
            Target::Cluster(builder.build().map_err(|error| RedisUrlError {
                url: options.urls.join(","),
                reason: error.to_string(),
            })?)
        } else {
            if options.urls.len() > 1 {
                return Err(RedisUrlError {
                    url: options.urls.join(","),
                    reason: "several URLs are for a cluster; use the redis-cluster store".into(),
                });
            }
            Target::Single(client_for(first, options)?)
        };
        let subscribers = match &target {
            Target::Sentinel(sentinel) => Subscribers::Sentinel(Arc::downgrade(sentinel)),
            _ => Subscribers::Seeds(
                options
                    .urls
                    .iter()
                    .map(|url| client_for(url, options))
                    .collect::<Result<Vec<_>, _>>()?,
                0,
            ),
        };
        let notifier = start_notifier(subscribers, options.poll_interval);
        Ok(RedisStore {
            target,
            connection: OnceCell::new(),
            script: redis::Script::new(COMPARE_AND_SWAP),
            count_caller: options
                .track_callers
                .then(|| redis::Script::new(COUNT_CALLER)),
            caller_records: redis::Script::new(CALLER_RECORDS),
            key_prefix: options.key_prefix.clone(),
            command_timeout: options.command_timeout,
            wait_replicas: options.wait_replicas,
            notifier,
            records: AtomicU64::new(0),
        })
    }

    /// The Redis key of a caller's sorted set of records (its own slot in a cluster).
    fn caller_key(&self, caller: &str) -> String {
        let digest = crate::key::fingerprint(caller.as_bytes());
        format!(
            "{}:caller:{{{}}}",
            self.key_prefix,
            crate::key::hex(&digest[..16])
        )
    }

    /// Files a written record under its caller, when callers are tracked.
    async fn count_caller(
        &self,
        connection: &mut RedisConnection,
        key: &Key,
        current: Option<&Record>,
        change: &Change,
    ) -> Result<(), StoreError> {
        let Some(script) = &self.count_caller else {
            return Ok(());
        };
        let (caller, operation, expires_ms) = match (current, change) {
            // Scored by when the record stops counting (`record::is_expired`), which for a
            // finished record may be before Redis drops it.
            (_, Change::Put(record)) => {
                let in_flight = record.state() == crate::record::State::InFlight;
                let until = if in_flight {
                    record.expires_ms.max(record.lease_until_ms)
                } else {
                    record.expires_ms
                };
                (&record.caller, "add", until.max(1))
            }
            (Some(record), Change::Delete) => (&record.caller, "rem", 0),
            _ => return Ok(()),
        };
        let mut invocation = script.key(self.caller_key(caller));
        invocation.arg(operation).arg(key.hex()).arg(expires_ms);
        let _: i64 = self
            .bounded(
                "counting a caller's records failed",
                connection.invoke(&invocation),
            )
            .await?;
        Ok(())
    }

    /// The Redis key (and change channel) of a record.
    pub fn record_key(&self, key: &Key) -> String {
        format!("{}:{{{}}}", self.key_prefix, key.hex())
    }

    /// One SCAN of the records' names from `at`, and where the next starts (`None`: done).
    /// On a cluster each master is scanned in turn, through the cluster connection.
    async fn scan_names(
        &self,
        connection: &mut RedisConnection,
        at: ScanAt,
        limit: usize,
    ) -> Result<(Vec<String>, Option<ScanAt>), StoreError> {
        let pattern = format!("{}:{{*}}", self.key_prefix);
        let command = redis::cmd("SCAN")
            .arg(at.position)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(limit)
            .to_owned();
        let cluster = match connection {
            RedisConnection::Single(_) | RedisConnection::Sentinel(_) => {
                let (next, names): (u64, Vec<String>) = self
                    .bounded("SCAN failed", connection.query(&command))
                    .await?;
                let next = (next != 0).then_some(ScanAt {
                    master: 0,
                    position: next,
                });
                return Ok((names, next));
            }
            RedisConnection::Cluster(cluster) => cluster,
        };
        use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
        let slots = redis::cmd("CLUSTER").arg("SLOTS").to_owned();
        let any = RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random);
        let slots = self
            .bounded("CLUSTER SLOTS failed", cluster.route_command(slots, any))
            .await?;
        let masters = masters_of(&slots);
        let Some((host, port)) = masters.get(at.master) else {
            return Ok((Vec::new(), None));
        };
        let node = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
            host: host.clone(),
            port: *port,
        });
        let reply = self
            .bounded("SCAN failed", cluster.route_command(command, node))
            .await?;
        let (next, names): (u64, Vec<String>) = redis::from_redis_value(reply)
            .map_err(|error| StoreError::Io(format!("SCAN answered {error}")))?;
        let next = match next {
            0 if at.master + 1 < masters.len() => Some(ScanAt {
                master: at.master + 1,
                position: 0,
            }),
            0 => None,
            position => Some(ScanAt {
                master: at.master,
                position,
            }),
        };
        Ok((names, next))
    }

    async fn connection(&self) -> Result<RedisConnection, StoreError> {
        if let Target::Sentinel(sentinel) = &self.target {
            // Bounded by the lookup itself, and here the wait for another call's lookup.
            let found = tokio::time::timeout(self.command_timeout * 2, sentinel.connection());
            return match found.await {
                Ok(found) => found.map(RedisConnection::Sentinel),
                Err(_) => Err(unavailable(
                    "Sentinel did not answer",
                    format!("no master within {:?}", self.command_timeout * 2),
                )),
            };
        }
        let connecting = self.connection.get_or_try_init(|| async {
            match &self.target {
                Target::Single(client) => {
                    let config = redis::aio::ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(self.command_timeout))
                        .set_response_timeout(Some(self.command_timeout))
                        .set_number_of_retries(1);
                    client
                        .get_connection_manager_with_config(config)
                        .await
                        .map(RedisConnection::Single)
                }
                Target::Cluster(client) => client
                    .get_async_connection()
                    .await
                    .map(RedisConnection::Cluster),
                Target::Sentinel(_) => unreachable!("a master is looked up above"),
            }
        });
        match tokio::time::timeout(self.command_timeout, connecting).await {
            Ok(Ok(connection)) => Ok(connection.clone()),
            Ok(Err(error)) => Err(unavailable("is unreachable", error)),
            Err(_) => Err(unavailable(
                "did not answer",
                format!("no connection within {:?}", self.command_timeout),
            )),
        }
    }

    async fn bounded<T>(
        &self,
        what: &str,
        operation: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.command_timeout, operation).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(unavailable(what, error)),
            Err(_) => Err(unavailable(
                what,
                format!("no answer within {:?}", self.command_timeout),
            )),
        }
    }

    async fn read(
        &self,
        connection: &mut RedisConnection,
        name: &str,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let command = redis::cmd("GET").arg(name).to_owned();
        self.bounded("GET failed", connection.query(&command)).await
    }

    async fn compare_and_swap(
        &self,
        connection: &mut RedisConnection,
        name: &str,
        read: Option<&[u8]>,
        change: &Change,
    ) -> Result<Swap, StoreError> {
        let expected = read
            .map(|bytes| sha1_smol::Sha1::from(bytes).digest().to_string())
            .unwrap_or_default();
        let mut invocation = self.script.key(name);
        invocation.arg(expected);
        match change {
            Change::Put(record) => {
                // An IN_FLIGHT record outlives its lease at least; the others their retention.
                let expires_ms = record.expires_ms.max(record.lease_until_ms).max(1);
                invocation
                    .arg("put")
                    .arg(record.encode_to_vec())
                    .arg(expires_ms);
            }
            Change::Delete => {
                invocation.arg("delete").arg("").arg(0);
            }
            Change::Keep => unreachable!("a kept record is not written"),
        }
        let (applied, now): (i64, Option<Vec<u8>>) = self
            .bounded("compare-and-swap failed", connection.invoke(&invocation))
            .await?;
        Ok(if applied == 1 {
            Swap::Applied
        } else {
            Swap::Refused(now)
        })
    }

    /// Counts a written record under its caller; a failure only lets the cap lag.
    async fn count_after_swap(
        &self,
        connection: &mut RedisConnection,
        key: &Key,
        current: Option<&Record>,
        change: &Change,
    ) {
        if let Err(error) = self.count_caller(connection, key, current, change).await {
            tracing::warn!(key = %key, %error, "could not count a record under its caller");
        }
    }

    /// With `--redis-wait-replicas`: waits until that many replicas have every write this
    /// connection sent so far (`WAIT`, for half the store timeout), so a write they do not
    /// confirm is not taken as done and the call fails closed (the engine then releases a
    /// claim; a completion's caller hears that its outcome was not recorded). It never
    /// undoes the write: the master may keep it, and a retry is decided on it.
    async fn replicated(&self, connection: &mut RedisConnection) -> Result<(), StoreError> {
        if self.wait_replicas == 0 {
            return Ok(());
        }
        let wait_ms = (self.command_timeout / 2).as_millis().max(1) as u64;
        let command = redis::cmd("WAIT")
            .arg(self.wait_replicas)
            .arg(wait_ms)
            .to_owned();
        let confirmed: u32 = self
            .bounded("WAIT failed", connection.query(&command))
            .await?;
        if confirmed < self.wait_replicas {
            return Err(StoreError::Io(format!(
                "Redis: {confirmed} of the {} replicas --redis-wait-replicas asks for confirmed \
                 the write within {wait_ms} ms",
                self.wait_replicas
            )));
        }
        Ok(())
    }

    /// With `--redis-wait-replicas`: makes sure a record that decided something without a
    /// write (a replay, a duplicate told to wait) is on the replicas too, since another
    /// sidecar may have written it without its `WAIT` confirmed. One write after the read
    /// (the fence key), then `WAIT`: replication keeps the master's order, so replicas past
    /// the fence have everything the read saw.
    async fn read_replicated(&self, connection: &mut RedisConnection) -> Result<(), StoreError> {
        if self.wait_replicas == 0 {
            return Ok(());
        }
        let fence = redis::cmd("SET")
            .arg(format!("{}:replication-fence", self.key_prefix))
            .arg("")
            .arg("PX")
            .arg(FENCE_TTL_MS)
            .to_owned();
        let _: () = self
            .bounded("the replication fence failed", connection.query(&fence))
            .await?;
        self.replicated(connection).await
    }

    /// Under Sentinel, or with `--redis-wait-replicas`: the node must say it is a master
    /// (`ROLE`; a replica is forgotten, and the sentinels asked again), with at least the
    /// replicas writes wait for connected. What readiness says of it.
    async fn check_role(
        &self,
        connection: &mut RedisConnection,
    ) -> Result<Option<String>, StoreError> {
        let master = match connection {
            RedisConnection::Sentinel(master) => Some(master.clone()),
            _ if self.wait_replicas > 0 => None,
            _ => return Ok(None),
        };
        let role: redis::Role = self
            .bounded("ROLE failed", connection.query(&redis::cmd("ROLE")))
            .await?;
        let describe = || master.as_ref().map(MasterConnection::describe);
        let node = describe().unwrap_or_else(|| "Redis".to_owned());
        let replicas = match role {
            redis::Role::Primary { replicas, .. } => replicas.len(),
            redis::Role::Replica {
                primary_ip,
                primary_port,
                ..
            } => {
                let why = format!(
                    "{node} says it is a replica of {primary_ip}:{primary_port}: no write goes to it"
                );
                if let Some(master) = &master {
                    master.forget(&why);
                }
                return Err(StoreError::Io(why));
            }
            _ => {
                return Err(StoreError::Io(format!(
                    "{node} is not a master: ROLE answered {role:?}"
                )))
            }
        };
        let wanted = self.wait_replicas as usize;
        if replicas < wanted {
            return Err(StoreError::Io(format!(
                "{node} has {replicas} replicas connected; --redis-wait-replicas {wanted} needs \
                 them to confirm every write"
            )));
        }
        Ok(describe().map(|text| match wanted {
            0 => text,
            _ => format!("{text}, {replicas} replicas connected"),
        }))
    }

    async fn count_records(&self) -> Result<u64, StoreError> {
        let mut connection = self.connection().await?;
        let command = redis::cmd("DBSIZE");
        self.bounded("DBSIZE failed", connection.query(&command))
            .await
    }
}

impl Store for RedisStore {
    async fn update<T, F>(
        &self,
        operation: Operation,
        key: &Key,
        mut transition: F,
    ) -> Result<T, StoreError>
    where
        T: Send,
        F: FnMut(Option<&Record>) -> (Change, T) + Send,
    {
        let name = self.record_key(key);
        let mut connection = self.connection().await?;
        // The record as last seen; `None`: not looked at yet. A claim's key is first tried as
        // fresh, with no GET: when the transition would create a record, the swap from
        // "absent" goes at once, and a refused swap hands back what is there for the next
        // round.
        let mut seen: Option<Option<Vec<u8>>> = None;
        for _ in 0..CAS_ROUNDS_MAX {
            // A fresh try that would create a record is swapped at once; anything else is
            // decided on the record as read (or as a refused swap handed it back).
            let fresh = if seen.is_none() && operation.tries_absent_first() {
                Some(transition(None)).filter(|(change, _)| matches!(change, Change::Put(_)))
            } else {
                None
            };
            let (read, current, change, value) = match fresh {
                Some((change, value)) => (None, None, change, value),
                None => {
                    let read = match seen.take() {
                        Some(read) => read,
                        None => self.read(&mut connection, &name).await?,
                    };
                    let current = match &read {
                        Some(bytes) => Some(Record::decode(&bytes[..]).map_err(|error| {
                            StoreError::Undecodable {
                                key: *key,
                                reason: error.to_string(),
                            }
                        })?),
                        None => None,
                    };
                    let (change, value) = transition(current.as_ref());
                    if change == Change::Keep {
                        if operation != Operation::Read {
                            self.read_replicated(&mut connection).await?;
                        }
                        return Ok(value);
                    }
                    (read, current, change, value)
                }
            };
            match self
                .compare_and_swap(&mut connection, &name, read.as_deref(), &change)
                .await?
            {
                Swap::Applied => {
                    self.replicated(&mut connection).await?;
                    self.count_after_swap(&mut connection, key, current.as_ref(), &change)
                        .await;
                    return Ok(value);
                }
                Swap::Refused(now) => seen = Some(now),
            }
        }
        Err(StoreError::Io(format!(
            "record {key} changed under {CAS_ROUNDS_MAX} compare-and-swap rounds in a row"
        )))
    }

    fn changed(&self, key: &Key) -> impl Future<Output = ()> + Send + 'static {
        self.notifier.watch(self.record_key(key))
    }

    fn maintain(&self, _now_ms: u64) -> Result<Maintenance, StoreError> {
        // Redis expires records by their TTL; what is left is to sample the count.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let records = runtime.block_on(self.count_records())?;
            self.records.store(records, Ordering::Relaxed);
        }
        Ok(Maintenance::default())
    }

    fn usage(&self) -> Usage {
        // Bytes are Redis' to bound (`maxmemory` with `noeviction`), so they are not counted.
        Usage {
            records: self.records.load(Ordering::Relaxed),
            bytes: 0,
        }
    }

    fn is_sole_owner(&self) -> bool {
        false
    }

    async fn caller_records(&self, caller: &str, now_ms: u64) -> Result<u64, StoreError> {
        let mut connection = self.connection().await?;
        let mut invocation = self.caller_records.key(self.caller_key(caller));
        invocation.arg(now_ms);
        self.bounded(
            "counting a caller's records failed",
            connection.invoke(&invocation),
        )
        .await
    }

    async fn check(&self) -> Result<Option<String>, StoreError> {
        // INFO answers as PING would, and says how Redis treats a full memory: any policy but
        // `noeviction` lets Redis delete records inside their retention (an `allkeys-lru`
        // eviction let a recorded charge run twice), so the sidecar stays not ready.
        let mut connection = self.connection().await?;
        let note = self.check_role(&mut connection).await?;
        let mut command = redis::cmd("INFO");
        command.arg("memory");
        let info: redis::Value = self
            .bounded("INFO memory failed", connection.query(&command))
            .await?;
        check_eviction_policy(&info)?;
        Ok(note)
    }

    async fn scan(&self, cursor: Option<Vec<u8>>, limit: usize) -> Result<super::Page, StoreError> {
        let limit = limit.clamp(1, super::PAGE_RECORDS_MAX);
        let mut connection = self.connection().await?;
        let at = ScanAt::parse(cursor)?;
        let (names, next) = self.scan_names(&mut connection, at, limit).await?;
        let mut records = Vec::with_capacity(names.len());
        for name in names {
            let hex = name
                .rsplit_once('{')
                .and_then(|(_, rest)| rest.strip_suffix('}'))
                .unwrap_or_default();
            let Some(key) = crate::key::Key::from_hex(hex) else {
                continue; // Not one of ours, though it matched the pattern.
            };
            if let Some(bytes) = self.read(&mut connection, &name).await? {
                let record =
                    Record::decode(&bytes[..]).map_err(|error| StoreError::Undecodable {
                        key,
                        reason: error.to_string(),
                    })?;
                records.push((key, record));
            }
        }
        Ok(super::Page {
            records,
            next: next.map(ScanAt::encode),
        })
    }
}

/// Where a walk of the records is: a SCAN position, on a cluster on one master at a time
/// (its index among the masters sorted by address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ScanAt {
    master: usize,
    position: u64,
}

impl ScanAt {
    /// `"P"` on one server, `"M:P"` on a cluster; the start when there is no cursor.
    fn parse(cursor: Option<Vec<u8>>) -> Result<ScanAt, StoreError> {
        let Some(bytes) = cursor else {
            return Ok(ScanAt {
                master: 0,
                position: 0,
            });
        };
        let text = String::from_utf8(bytes).unwrap_or_default();
        let (master, position) = text.split_once(':').unwrap_or(("0", &text));
        match (master.parse(), position.parse()) {
            (Ok(master), Ok(position)) => Ok(ScanAt { master, position }),
            _ => Err(StoreError::Io("not a Redis scan position".into())),
        }
    }

    fn encode(self) -> Vec<u8> {
        format!("{}:{}", self.master, self.position).into_bytes()
    }
}

/// The masters of a cluster, from `CLUSTER SLOTS` (each slot range's first node), sorted by
/// address so that every page of a walk counts them alike.
fn masters_of(slots: &redis::Value) -> Vec<(String, u16)> {
    let mut masters = std::collections::BTreeSet::new();
    let redis::Value::Array(ranges) = slots else {
        return Vec::new();
    };
    for range in ranges {
        let redis::Value::Array(parts) = range else {
            continue;
        };
        let Some(redis::Value::Array(master)) = parts.get(2) else {
            continue;
        };
        let host = master
            .first()
            .and_then(|v| redis::from_redis_value_ref(v).ok());
        let port = master
            .get(1)
            .and_then(|v| redis::from_redis_value_ref(v).ok());
        if let (Some(host), Some(port)) = (host, port) {
            masters.insert((host, port));
        }
    }
    masters.into_iter().collect()
}

/// Where the change subscriber connects: the seed nodes in turn, or the master the sentinels
/// name (a change published there reaches its replicas' subscribers too).
enum Subscribers {
    /// The nodes of `--redis-url`, and the next one to try.
    Seeds(Vec<redis::Client>, usize),
    /// The master; ended with the store.
    Sentinel(std::sync::Weak<Sentinel>),
}

impl Subscribers {
    /// The node to subscribe on next; `None` when there is none now.
    async fn next(&mut self) -> Option<redis::Client> {
        match self {
            Subscribers::Seeds(clients, at) => {
                let client = clients.get(*at % clients.len().max(1)).cloned();
                *at = at.wrapping_add(1);
                client
            }
            Subscribers::Sentinel(sentinel) => sentinel.upgrade()?.client().await.ok(),
        }
    }
}

/// Wakes waiting duplicates when their record changes: one subscriber connection per
/// process, subscribed to the channels of the records someone here waits on.
fn start_notifier(clients: Subscribers, poll_interval: Duration) -> Arc<Waiters> {
    let (commands, requests) = mpsc::unbounded_channel();
    let notifier = Waiters::new(Some(commands), poll_interval);
    tokio::spawn(subscribe(clients, Arc::downgrade(&notifier), requests));
    notifier
}

/// The subscriber task: keeps one pub/sub connection up (rotating through the seed nodes, or
/// on the master in use) and follows the waiters' subscriptions. Ends when the store is
/// dropped.
async fn subscribe(
    mut clients: Subscribers,
    notifier: std::sync::Weak<Waiters>,
    mut requests: mpsc::UnboundedReceiver<Subscription>,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let connecting = async {
            let client = clients.next().await.ok_or(())?;
            client.get_async_pubsub().await.map_err(|_| ())
        };
        let connected = tokio::time::timeout(RESUBSCRIBE_BACKOFF_MAX, connecting).await;
        let Ok(Ok(pubsub)) = connected else {
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                request = requests.recv() => if request.is_none() { return },
            }
            backoff = (backoff * 2).min(RESUBSCRIBE_BACKOFF_MAX);
            continue;
        };
        backoff = Duration::from_millis(50);
        let (mut sink, mut messages) = pubsub.split();
        let Some(current) = notifier.upgrade() else {
            return;
        };
        let mut healthy = true;
        for channel in current.names() {
            healthy &= sink.subscribe(&channel).await.is_ok();
        }
        // Changes may have been published while no connection listened.
        current.wake_all();
        drop(current);
        while healthy {
            tokio::select! {
                message = messages.next() => match (message, notifier.upgrade()) {
                    (Some(message), Some(current)) => current.wake(message.get_channel_name()),
                    (None, _) => healthy = false,
                    (_, None) => return,
                },
                request = requests.recv() => match request {
                    Some(Subscription::Subscribe(channel)) => {
                        healthy = sink.subscribe(&channel).await.is_ok();
                    }
                    Some(Subscription::Unsubscribe(channel)) => {
                        healthy = sink.unsubscribe(&channel).await.is_ok();
                    }
                    None => return,
                },
            }
        }
        tracing::warn!("Redis change subscription lost; waiting duplicates poll until it is back");
    }
}

/// Every `maxmemory_policy` that `INFO memory` reports (one per node on a cluster) must be
/// `noeviction`.
fn check_eviction_policy(info: &redis::Value) -> Result<(), StoreError> {
    let mut texts = Vec::new();
    collect_texts(info, &mut texts);
    let policies: Vec<&str> = texts
        .iter()
        .flat_map(|text| text.lines())
        .filter_map(|line| line.trim().strip_prefix("maxmemory_policy:"))
        .collect();
    match policies.iter().find(|policy| **policy != "noeviction") {
        None if !policies.is_empty() => Ok(()),
        None => Err(StoreError::Io(
            "Redis did not say its maxmemory-policy (INFO memory): it must be noeviction".into(),
        )),
        Some(policy) => Err(StoreError::Io(format!(
            "Redis runs with maxmemory-policy {policy}, which evicts records inside their \
             retention (their retries would run again): set maxmemory-policy noeviction"
        ))),
    }
}

/// The text of every string in `value`, however nested (a cluster answers per node).
fn collect_texts(value: &redis::Value, texts: &mut Vec<String>) {
    match value {
        redis::Value::BulkString(bytes) => texts.push(String::from_utf8_lossy(bytes).into_owned()),
        redis::Value::SimpleString(text) | redis::Value::VerbatimString { text, .. } => {
            texts.push(text.clone());
        }
        redis::Value::Array(items) | redis::Value::Set(items) => {
            items.iter().for_each(|item| collect_texts(item, texts));
        }
        redis::Value::Map(pairs) => pairs.iter().for_each(|(key, item)| {
            collect_texts(key, texts);
            collect_texts(item, texts);
        }),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_to_redis_turn_nagle_off() {
        let options = RedisOptions {
            urls: vec!["redis://127.0.0.1:6379".into()],
            cluster: false,
            password: None,
            ca_pem: None,
            key_prefix: "idem".into(),
            command_timeout: Duration::from_secs(1),
            poll_interval: Duration::from_secs(1),
            track_callers: false,
            master_name: None,
            wait_replicas: 0,
        };
        let client = client_for(&options.urls[0], &options).unwrap();
        assert!(client.get_connection_info().tcp_settings().nodelay());
    }
}

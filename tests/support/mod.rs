//! Shared helpers of the integration tests, written once: a real tonic upstream that counts
//! executions, the sidecar in process or as the real binary, and HTTP/2 clients.
#![allow(dead_code)]
// Helpers of tests: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

pub mod binary;
pub mod crash;
pub mod failover;
pub mod http;
pub mod ledger;
pub mod netns;
pub mod patroni;
pub mod payments;
pub mod postgres;
pub mod prometheus;
pub mod raw;
pub mod redis;
pub mod tls;
pub mod tmpfs;

use idemproxy::config::{self, RunSettings, StoreKind};
use idemproxy::pb::google::rpc::{ErrorInfo, Status as RpcStatus};
use idemproxy::pb::idemproxy::testing::v1::ledger_client::LedgerClient;
use idemproxy::pb::idemproxy::testing::v1::{ApplyReply, ApplyRequest};
use idemproxy::server;
use prost::Message;
use std::ffi::OsStr;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;
use tonic::transport::Channel;

/// A sidecar running in this process on a fresh store: a sled directory, a table of its own
/// on the test binary's PostgreSQL when `IDEMPROXY_TEST_STORE` is `postgres`, or — when it
/// is `redis`, `redis-cluster` or `redis-sentinel` — a Redis started for it alone, so
/// one suite runs on every backend (`scripts/test` runs it on each).
pub struct Sidecar {
    pub addr: SocketAddr,
    pub running: server::Sidecar,
    pub dir: tempfile::TempDir,
    pub redis: Option<redis::TestRedis>,
}

/// The backend the suite runs on, from `IDEMPROXY_TEST_STORE` (default `sled`).
pub fn test_store() -> String {
    std::env::var("IDEMPROXY_TEST_STORE").unwrap_or_else(|_| "sled".to_owned())
}

/// Starts the Redis (or PostgreSQL) the current backend needs, and points `args` at it.
pub fn use_test_store(args: &mut RunSettings) -> Option<redis::TestRedis> {
    let store = test_store();
    let redis = match store.as_str() {
        "sled" => return None,
        "redis" => {
            args.store = StoreKind::Redis;
            let server = redis::RedisServer::start();
            args.redis_url = Some(server.url());
            redis::TestRedis::Single(server)
        }
        "redis-cluster" => {
            args.store = StoreKind::RedisCluster;
            let cluster = redis::RedisCluster::start();
            args.redis_url = Some(cluster.urls());
            redis::TestRedis::Cluster(cluster)
        }
        "redis-sentinel" => {
            args.store = StoreKind::RedisSentinel;
            let sentinels = redis::RedisSentinels::start(&[], redis::SentinelTiming::default());
            args.redis_sentinels = Some(sentinels.addresses());
            args.redis_master_name = Some(redis::MASTER_NAME.to_owned());
            redis::TestRedis::Sentinel(sentinels)
        }
        "postgres" => {
            // One PostgreSQL per test binary; a table of its own per sidecar.
            args.store = StoreKind::Postgres;
            args.postgres_url = Some(postgres::shared().url());
            args.postgres_table = postgres::fresh_table();
            return None;
        }
        other => {
            panic!("IDEMPROXY_TEST_STORE={other}: use sled, postgres, redis, redis-cluster or redis-sentinel")
        }
    };
    Some(redis)
}

/// Settings every test sidecar starts from: loopback, a fresh dir, fast sweeps; `extra` are
/// more flags of `run` (a `--config` file, say), parsed as the binary parses them.
pub fn test_args_with(
    upstream: SocketAddr,
    dir: &std::path::Path,
    extra: &[&OsStr],
) -> RunSettings {
    let upstream = format!("http://{upstream}");
    let flags = [
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &upstream,
        "--sweep-interval",
        "50ms",
        "--admin-listen",
        "127.0.0.1:0",
        "--ops-listen",
        "127.0.0.1:0",
        "--data-dir",
    ];
    let mut argv: Vec<&OsStr> = flags.iter().map(OsStr::new).collect();
    argv.push(dir.as_os_str());
    argv.extend_from_slice(extra);
    config::parse_args(argv).expect("test settings parse")
}

/// `test_args_with` and no more flags.
pub fn test_args(upstream: SocketAddr, dir: &std::path::Path) -> RunSettings {
    test_args_with(upstream, dir, &[])
}

/// Starts a sidecar in front of `upstream`; `tweak` adjusts the settings.
pub async fn start_sidecar(upstream: SocketAddr, tweak: impl FnOnce(&mut RunSettings)) -> Sidecar {
    start_sidecar_with(upstream, &[], tweak).await
}

/// Starts a sidecar in front of `upstream` with more flags of `run` (`extra`); `tweak`
/// adjusts the settings after them.
pub async fn start_sidecar_with(
    upstream: SocketAddr,
    extra: &[&OsStr],
    tweak: impl FnOnce(&mut RunSettings),
) -> Sidecar {
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut args = test_args_with(upstream, dir.path(), extra);
    let redis = use_test_store(&mut args);
    tweak(&mut args);
    let config = config::resolve(args).expect("test settings are valid");
    let running = idemproxy::server::start(&config)
        .await
        .expect("the sidecar starts");
    Sidecar {
        addr: running.proxy_addr,
        running,
        dir,
        redis,
    }
}

/// Starts a sidecar in front of `upstream` whose config file holds the rule `settings` (TOML
/// lines) for the test upstream's Apply.
pub async fn start_sidecar_with_apply_rule(upstream: SocketAddr, settings: &str) -> Sidecar {
    let files = tempfile::tempdir().expect("a temp dir");
    let rules = files.path().join("config.toml");
    let text = format!("[methods.\"/idemproxy.testing.v1.Ledger/Apply\"]\n{settings}\n");
    std::fs::write(&rules, text).expect("the config file is written");
    // Read at start only: the file may go with `files` once the sidecar runs.
    start_sidecar_with(upstream, &["--config".as_ref(), rules.as_ref()], |_| {}).await
}

/// A tonic client of the ledger at `addr` (the sidecar or the upstream itself).
pub async fn client(addr: SocketAddr) -> LedgerClient<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("a valid URI")
        .connect()
        .await
        .expect("connects");
    LedgerClient::new(channel)
}

/// One Apply call with an optional key and caller.
pub async fn apply(
    client: &mut LedgerClient<Channel>,
    request: ApplyRequest,
    key: Option<&str>,
    caller: Option<&str>,
) -> Result<tonic::Response<ApplyReply>, tonic::Status> {
    let mut request = tonic::Request::new(request);
    if let Some(key) = key {
        request
            .metadata_mut()
            .insert("idempotency-key", key.parse().expect("ASCII key"));
    }
    if let Some(caller) = caller {
        request
            .metadata_mut()
            .insert("x-caller-id", caller.parse().expect("ASCII caller"));
    }
    client.apply(request).await
}

/// A request adding `amount` to `account`.
pub fn add(account: &str, amount: i64) -> ApplyRequest {
    ApplyRequest {
        account: account.into(),
        amount,
        ..ApplyRequest::default()
    }
}

/// The `ErrorInfo` of an idemproxy refusal: (reason, domain, metadata).
pub fn error_info(status: &tonic::Status) -> Option<ErrorInfo> {
    error_info_of(status.details())
}

/// The `ErrorInfo` in an encoded `google.rpc.Status` (`grpc-status-details-bin`).
pub fn error_info_of(status_details: &[u8]) -> Option<ErrorInfo> {
    let details = RpcStatus::decode(status_details).ok()?;
    let any = details
        .details
        .iter()
        .find(|any| any.type_url == "type.googleapis.com/google.rpc.ErrorInfo")?;
    ErrorInfo::decode(&any.value[..]).ok()
}

/// The reason of an idemproxy refusal, or "" when the status carries none.
pub fn reason(status: &tonic::Status) -> String {
    error_info(status)
        .map(|info| info.reason)
        .unwrap_or_default()
}

/// Whether the response was answered from a record.
pub fn was_replayed<T>(response: &tonic::Response<T>) -> bool {
    response
        .metadata()
        .get("idempotency-replayed")
        .is_some_and(|value| value == "true")
}

/// Fails with a message naming scripts/test when `program` is not on the PATH.
pub fn require(program: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()));
    assert!(
        found,
        "{program} is not installed: run scripts/test, which installs Debian's {package}"
    );
}

/// Polls `condition` every 10 ms until it holds or `limit` passes.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl Sidecar {
    /// Waits until the store holds `records` records (a claim landed, say).
    pub async fn wait_for_records(&self, records: u64) {
        use idemproxy::store::Store;
        let store = self.running.store.clone();
        eventually(Duration::from_secs(5), "the store's record count", || {
            let store = store.clone();
            async move { store.usage().records == records }
        })
        .await;
    }
}

/// Runs `open` (of a sled directory) again while it fails on sled's lock of the directory, for
/// up to 2 s: sled's background work may hold it for a moment after the last handle is dropped
/// (a new process never meets this). Returns the first other outcome.
pub fn retry_sled_lock<T, E: std::fmt::Display>(
    what: &std::path::Path,
    mut open: impl FnMut() -> Result<T, E>,
) -> Result<T, E> {
    for _ in 0..100 {
        match open() {
            Err(error) if error.to_string().contains("could not acquire lock") => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
    panic!(
        "sled's lock on {} was not released within 2 s",
        what.display()
    )
}

/// One call with the key `serial` and extra metadata.
pub async fn call_with(
    client: &mut LedgerClient<tonic::transport::Channel>,
    account: &str,
    serial: &str,
    metadata: &[(&'static str, &str)],
) -> Result<tonic::Response<ApplyReply>, tonic::Status> {
    let mut request = tonic::Request::new(add(account, 1));
    request
        .metadata_mut()
        .insert("idempotency-key", serial.parse().unwrap());
    for (name, value) in metadata {
        request.metadata_mut().insert(*name, value.parse().unwrap());
    }
    client.apply(request).await
}

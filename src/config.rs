//! RunSettings: flags, `IDEMPROXY_*` environment variables and an optional TOML file, resolved
//! into one validated `Config` (design §7: flag > env > file > default).
//!
//! Each setting is declared once, as a field of `RunSettings`: its flag (the field's name in
//! kebab case), its variable, its type, default, allowed range (the value parser) and its
//! help. clap resolves the layers: a config file's values become the settings' defaults, so
//! the environment and the flags win over them by clap's own rules (`parse_args`). `resolve`
//! then checks what several settings say together (TLS, caller source, Redis) and builds the
//! `Config`. Nothing here starts anything; a bad setting is an error that names it, never a
//! panic.

use crate::caller::{CallerSource, Callers};
use crate::engine::Limits;
pub use crate::policy::rules::MethodSettings;
use crate::policy::rules::RETENTION_MAX;
pub use crate::proxy::Http2Limits;
use clap::builder::RangedU64ValueParser;
use clap::{ArgAction, Args, CommandFactory, FromArgMatches};
use http::HeaderName;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The command line of `idemproxy run` and `idemproxy check`.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "run")]
pub struct RunArgs {
    /// TOML file with any of these settings (keys as the flags, without the dashes in front);
    /// the environment and the flags win over it.
    #[arg(long, env = "IDEMPROXY_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub settings: RunSettings,
}

/// Every setting of `run`, each declared once: flag, `IDEMPROXY_*` variable, file key, type,
/// default, range and help. A default written in the help text (`[default: …]`) is one that
/// `resolve` works out when the setting is not given.
#[derive(Debug, Clone, Args)]
pub struct RunSettings {
    /// Address the gRPC proxy listens on.
    #[arg(long, env = "IDEMPROXY_LISTEN", default_value = "0.0.0.0:16000")]
    pub listen: SocketAddr,
    /// The service behind the sidecar, as http://host:port (required).
    #[arg(long, env = "IDEMPROXY_UPSTREAM", value_parser = upstream_url)]
    pub upstream: Option<String>,
    /// Directory of the embedded store.
    #[arg(long, env = "IDEMPROXY_DATA_DIR", default_value = "/var/lib/idemproxy")]
    pub data_dir: PathBuf,
    /// Header carrying the request serial number.
    #[arg(long, env = "IDEMPROXY_KEY_HEADER", default_value = "idempotency-key", value_parser = header_name)]
    pub key_header: HeaderName,
    /// Header naming the caller, set by a trusted mesh or gateway [default: x-caller-id];
    /// short for `--caller-source header:<name>`.
    #[arg(long, env = "IDEMPROXY_CALLER_HEADER", value_parser = header_name)]
    pub caller_header: Option<HeaderName>,
    /// Where the caller identity comes from: `header:<name>`, `xfcc` (Envoy/Istio's
    /// x-forwarded-client-cert, from a loopback peer), `mtls` (the client certificate of
    /// this listener's TLS) or `none` (one tenant) [default: header:x-caller-id].
    #[arg(long, env = "IDEMPROXY_CALLER_SOURCE", value_parser = caller_source)]
    pub caller_source: Option<CallerSource>,
    /// Refuse a deduplicated call that names no caller (UNAUTHENTICATED) instead of filing it
    /// under the anonymous caller.
    #[arg(long, env = "IDEMPROXY_REQUIRE_CALLER")]
    pub require_caller: bool,
    /// PEM certificate chain of the proxy listener: it then speaks TLS (gRPC over h2).
    #[arg(long, env = "IDEMPROXY_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "IDEMPROXY_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle client certificates must chain to; a client certificate is then
    /// required (needed by --caller-source mtls).
    #[arg(long, env = "IDEMPROXY_CLIENT_CA")]
    pub client_ca: Option<PathBuf>,
    /// With `mtls`: a client certificate without a URI SAN names its caller by its subject
    /// CN instead of being refused.
    #[arg(long, env = "IDEMPROXY_CALLER_SUBJECT_FALLBACK")]
    pub caller_subject_fallback: bool,
    /// File of record encryption keys, one `<id> <base64 of 32 bytes>` per line: the first
    /// seals new records, every one opens old ones (without it, records are kept in the clear).
    #[arg(long, env = "IDEMPROXY_ENCRYPTION_KEY_FILE")]
    pub encryption_key_file: Option<PathBuf>,
    /// Live records one caller may hold; past it, its new keys are refused with
    /// RESOURCE_EXHAUSTED and other callers are unaffected (without it, no cap).
    #[arg(long, env = "IDEMPROXY_MAX_RECORDS_PER_CALLER", value_parser = count(1, u64::MAX))]
    pub max_records_per_caller: Option<u64>,
    /// Most concurrent HTTP/2 streams per client connection.
    #[arg(long, env = "IDEMPROXY_HTTP2_MAX_CONCURRENT_STREAMS", default_value = "1024", value_parser = count(1, 1 << 20))]
    pub http2_max_concurrent_streams: u64,
    /// Largest header list a client may send, in bytes.
    #[arg(long, env = "IDEMPROXY_HTTP2_MAX_HEADER_LIST_SIZE", default_value = "16KiB", value_parser = size(1 << 10, 16 << 20))]
    pub http2_max_header_list_size: u64,
    /// How often an idle client connection is pinged (0s: never).
    #[arg(long, env = "IDEMPROXY_HTTP2_KEEPALIVE_INTERVAL", default_value = "60s", value_parser = span(ZERO, DAY))]
    pub http2_keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection is closed.
    #[arg(long, env = "IDEMPROXY_HTTP2_KEEPALIVE_TIMEOUT", default_value = "20s", value_parser = span(ms(100), HOUR))]
    pub http2_keepalive_timeout: Duration,
    /// Client connections the proxy port holds at once; past it, new ones wait to be accepted.
    /// 0: as many as the open-files limit leaves after the 256 kept for the store and the
    /// other listeners; a number must fit under that limit with them.
    #[arg(long, env = "IDEMPROXY_MAX_CONNECTIONS", default_value = "0", value_parser = count(0, 1 << 20))]
    pub max_connections: u64,
    /// A client connection that starts no call for this long is closed gracefully (GOAWAY).
    #[arg(long, env = "IDEMPROXY_HTTP2_IDLE_TIMEOUT", default_value = "15m", value_parser = span(ms(100), 7 * DAY))]
    pub http2_idle_timeout: Duration,
    /// What a duplicate gets where no annotation or config-file rule says: `replay` (the
    /// recorded answer), `reject` (ALREADY_EXISTS), or `observe` (every call forwarded and
    /// answered by the service; what enforcing would have done is only counted).
    #[arg(
        long,
        env = "IDEMPROXY_MODE",
        default_value = "replay",
        value_enum,
        hide_possible_values = true
    )]
    pub mode: ModeSetting,
    /// How long an outcome is kept and replayed.
    #[arg(long, env = "IDEMPROXY_RETENTION", default_value = "24h", value_parser = span(ms(1), RETENTION_MAX))]
    pub retention: Duration,
    /// How far a caller's clock may be from this sidecar's: a retry whose
    /// `idempotency-first-sent` is older than the retention less this is refused
    /// (IDEMPOTENCY_KEY_EXPIRED), one further than this in the future is malformed.
    #[arg(long, env = "IDEMPROXY_MAX_CLOCK_SKEW", default_value = "60s", value_parser = span(ZERO, HOUR))]
    pub max_clock_skew: Duration,
    /// Longest wait of a duplicate for an in-flight first attempt.
    #[arg(long, env = "IDEMPROXY_MAX_IN_FLIGHT_WAIT", default_value = "10s", value_parser = span(ZERO, HOUR))]
    pub max_in_flight_wait: Duration,
    /// Lease of a call that sends no grpc-timeout.
    #[arg(long, env = "IDEMPROXY_DEFAULT_LEASE", default_value = "30s", value_parser = span(ms(1), DAY))]
    pub default_lease: Duration,
    /// Added to every call's deadline to form its lease.
    #[arg(long, env = "IDEMPROXY_LEASE_MARGIN", default_value = "5s", value_parser = span(ZERO, HOUR))]
    pub lease_margin: Duration,
    /// Largest request body that is deduplicated.
    #[arg(long, env = "IDEMPROXY_MAX_REQUEST_BYTES", default_value = "4MiB", value_parser = size(5, MESSAGE_BYTES_LIMIT))]
    pub max_request_bytes: u64,
    /// Largest response that is recorded.
    #[arg(long, env = "IDEMPROXY_MAX_RESPONSE_BYTES", default_value = "4MiB", value_parser = size(0, MESSAGE_BYTES_LIMIT))]
    pub max_response_bytes: u64,
    /// Bytes all keyed calls together may buffer (requests read whole, answers collected
    /// whole); past it new keyed calls are refused at once (RESOURCE_EXHAUSTED /
    /// IDEMPOTENCY_BUFFERS_EXHAUSTED) and answers that do not fit are streamed on, not kept.
    #[arg(long, env = "IDEMPROXY_MAX_BUFFERED_BYTES", default_value = "64MiB", value_parser = size(1 << 20, 64 << 30))]
    pub max_buffered_bytes: u64,
    /// Size bound of the store; past it new keys are refused (RESOURCE_EXHAUSTED /
    /// IDEMPOTENCY_STORE_FULL) until records expire, unless --evict-when-full.
    #[arg(long, env = "IDEMPROXY_MAX_STORE_BYTES", default_value = "1GiB", value_parser = size(1 << 10, u64::MAX))]
    pub max_store_bytes: u64,
    /// Let a full store delete COMPLETED records inside their retention, the closest to expiry
    /// first, instead of refusing new keys. Costs the guarantee: a retry of an evicted key
    /// runs again, and any caller can push out other callers' records.
    #[arg(long, env = "IDEMPROXY_EVICT_WHEN_FULL")]
    pub evict_when_full: bool,
    /// sled's page cache (its memory use is a multiple of this).
    #[arg(long, env = "IDEMPROXY_SLED_CACHE_BYTES", default_value = "8MiB", value_parser = size(1 << 20, 64 << 30))]
    pub sled_cache_bytes: u64,
    /// Records sled keeps one key each; past this the sweeper packs the COMPLETED ones many to
    /// a slice file.
    #[arg(long, env = "IDEMPROXY_SLED_PACK_RECORDS", default_value = "8192", value_parser = count(1, 1 << 40))]
    pub sled_pack_records: u64,
    /// Longest wait for the store to confirm a write; past it the call fails closed.
    #[arg(long, env = "IDEMPROXY_STORE_TIMEOUT", default_value = "5s", value_parser = span(ms(10), 600 * SECOND))]
    pub store_timeout: Duration,
    /// How often expired records are swept.
    #[arg(long, env = "IDEMPROXY_SWEEP_INTERVAL", default_value = "1s", value_parser = span(ms(10), HOUR))]
    pub sweep_interval: Duration,
    /// Threads serving calls. One suits a sidecar sharing its pod's cores with the service
    /// (flushing has a thread of its own).
    #[arg(long, env = "IDEMPROXY_WORKER_THREADS", default_value = "1", value_parser = count(1, 256))]
    pub worker_threads: u64,
    /// `group` (one flush serves every waiting write) or `per-write` (benchmark baseline).
    #[arg(
        long,
        env = "IDEMPROXY_FLUSH",
        default_value = "group",
        value_enum,
        hide_possible_values = true
    )]
    pub flush: FlushMode,
    /// Address of health (`grpc.health.v1`, `/livez`, `/readyz`).
    #[arg(long, env = "IDEMPROXY_OPS_LISTEN", default_value = "0.0.0.0:16090")]
    pub ops_listen: SocketAddr,
    /// On SIGTERM, how long running calls get to finish and record their outcome.
    #[arg(long, env = "IDEMPROXY_DRAIN_TIMEOUT", default_value = "25s", value_parser = span(ZERO, HOUR))]
    pub drain_timeout: Duration,
    /// Address of the admin API (`idemproxy keys`); a non-loopback address needs a token and
    /// TLS (--admin-tls-cert, --admin-tls-key).
    #[arg(
        long,
        env = "IDEMPROXY_ADMIN_LISTEN",
        default_value = "127.0.0.1:16091"
    )]
    pub admin_listen: SocketAddr,
    /// File holding the admin API's bearer token (or set IDEMPROXY_ADMIN_TOKEN).
    #[arg(long, env = "IDEMPROXY_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// The admin token, from the environment only.
    #[arg(skip)]
    pub admin_token: Option<String>,
    /// PEM certificate chain of the admin API's TLS (re-read when it changes).
    #[arg(long, env = "IDEMPROXY_ADMIN_TLS_CERT")]
    pub admin_tls_cert: Option<PathBuf>,
    /// PEM private key of the admin API's TLS.
    #[arg(long, env = "IDEMPROXY_ADMIN_TLS_KEY")]
    pub admin_tls_key: Option<PathBuf>,
    /// FileDescriptorSet of the service, with its idemproxy annotations (repeatable; from
    /// `protoc --include_imports --descriptor_set_out` or `buf build`).
    #[arg(long, env = "IDEMPROXY_DESCRIPTOR_SET", value_delimiter = ',')]
    pub descriptor_set: Vec<PathBuf>,
    /// A .proto file of the service, compiled at start (repeatable).
    #[arg(long, env = "IDEMPROXY_PROTO", value_delimiter = ',')]
    pub proto: Vec<PathBuf>,
    /// An include directory for --proto (repeatable); idemproxy/v1/annotations.proto is
    /// built in.
    #[arg(long, env = "IDEMPROXY_PROTO_PATH", value_delimiter = ',')]
    pub proto_path: Vec<PathBuf>,
    /// Also learn the service's descriptors from its gRPC server reflection (v1, then
    /// v1alpha), waiting for it at start.
    #[arg(long, env = "IDEMPROXY_REFLECTION")]
    pub reflection: bool,
    /// How long to wait for the service's reflection at start.
    #[arg(long, env = "IDEMPROXY_REFLECTION_TIMEOUT", default_value = "60s", value_parser = span(ms(100), HOUR))]
    pub reflection_timeout: Duration,
    /// Where records live: `sled` (embedded, one pod), `postgres` (the store of record shared
    /// by every replica), `redis` (one Redis server shared by every replica), `redis-cluster`
    /// or `redis-sentinel` (the master that Redis Sentinel names, followed across failovers).
    #[arg(
        long,
        env = "IDEMPROXY_STORE",
        default_value = "sled",
        value_enum,
        hide_possible_values = true
    )]
    pub store: StoreKind,
    /// `redis://[user@]host:port[/db]`; for `redis-cluster`, seed nodes separated by commas.
    #[arg(long, env = "IDEMPROXY_REDIS_URL")]
    pub redis_url: Option<String>,
    /// File holding the Redis password (kept out of the URL and the process list).
    #[arg(long, env = "IDEMPROXY_REDIS_PASSWORD_FILE")]
    pub redis_password_file: Option<PathBuf>,
    /// PEM file of the CA that `rediss://` servers are verified against (without it, the
    /// system's roots).
    #[arg(long, env = "IDEMPROXY_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,
    /// The Redis password, from the environment only.
    #[arg(skip)]
    pub redis_password: Option<String>,
    /// Prefix of every Redis key this sidecar writes.
    #[arg(long, env = "IDEMPROXY_REDIS_KEY_PREFIX", default_value = "idemproxy", value_parser = key_prefix)]
    pub redis_key_prefix: String,
    /// How often a waiting duplicate re-reads a Redis record when no change message came.
    #[arg(long, env = "IDEMPROXY_REDIS_POLL_INTERVAL", default_value = "100ms", value_parser = span(ms(1), 10 * SECOND))]
    pub redis_poll_interval: Duration,
    /// For `redis-sentinel`: the sentinels, `host:port` (or `redis://`, `rediss://` URLs)
    /// separated by commas.
    #[arg(long, env = "IDEMPROXY_REDIS_SENTINELS")]
    pub redis_sentinels: Option<String>,
    /// For `redis-sentinel`: the name the sentinels monitor the master under.
    #[arg(long, env = "IDEMPROXY_REDIS_MASTER_NAME")]
    pub redis_master_name: Option<String>,
    /// Replicas that must have each write (Redis `WAIT`) before it counts; a write they do not
    /// confirm within half of --store-timeout fails closed (`redis` and `redis-sentinel`).
    #[arg(long, env = "IDEMPROXY_REDIS_WAIT_REPLICAS", default_value = "0", value_parser = count(0, 64))]
    pub redis_wait_replicas: u64,
    /// `postgres://user@host[,host2]/db?sslmode=verify-full&target_session_attrs=read-write`
    /// or `host=… dbname=…` (libpq's forms, several hosts included).
    #[arg(long, env = "IDEMPROXY_POSTGRES_URL")]
    pub postgres_url: Option<String>,
    /// File holding the PostgreSQL password (kept out of the URL and the process list).
    #[arg(long, env = "IDEMPROXY_POSTGRES_PASSWORD_FILE")]
    pub postgres_password_file: Option<PathBuf>,
    /// The PostgreSQL password, from the environment only.
    #[arg(skip)]
    pub postgres_password: Option<String>,
    /// PEM file of the CA that PostgreSQL servers are verified against with `sslmode`
    /// `verify-ca` or `verify-full` (without it, the system's roots).
    #[arg(long, env = "IDEMPROXY_POSTGRES_CA_FILE")]
    pub postgres_ca_file: Option<PathBuf>,
    /// The records' table, `table` or `schema.table`; the sidecar creates it (and its schema
    /// version table beside it) at its first start.
    #[arg(long, env = "IDEMPROXY_POSTGRES_TABLE", default_value = "idemproxy_records", value_parser = postgres_table)]
    pub postgres_table: String,
    /// Not ready (new keys refused) while the PostgreSQL primary has no synchronous standby,
    /// so that no acknowledged record can be lost in a failover.
    #[arg(long, env = "IDEMPROXY_POSTGRES_REQUIRE_SYNC_REPLICA")]
    pub postgres_require_sync_replica: bool,
    /// Per-method rules, from the config file only: `[methods."/pkg.Svc/Method"]`.
    #[arg(skip)]
    pub methods: BTreeMap<String, MethodSettings>,
}

impl Default for RunSettings {
    /// Every setting at its declared default: no flag, no variable, no file.
    fn default() -> Self {
        let command = RunSettings::augment_args(clap::Command::new("run"))
            .no_binary_name(true)
            .mut_args(|arg| arg.env(None));
        let matches = command
            .try_get_matches_from(std::iter::empty::<OsString>())
            .expect("the declared defaults parse");
        RunSettings::from_arg_matches(&matches).expect("the declared defaults fit their fields")
    }
}

/// Which store records live in, as the setting names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    /// The embedded sled store.
    Sled,
    /// One Redis server.
    Redis,
    /// A Redis Cluster.
    RedisCluster,
    /// The master that Redis Sentinel names.
    RedisSentinel,
    /// PostgreSQL.
    Postgres,
}

/// A setting that cannot be used, by name.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value that does not parse or is out of range.
    #[error("invalid --{setting} {value:?}: {reason}")]
    Invalid {
        /// The flag's name.
        setting: &'static str,
        /// What was given.
        value: String,
        /// Why it is refused.
        reason: String,
    },
    /// A required setting that was not given.
    #[error("--{0} is required (or IDEMPROXY_{1}, or `{0}` in the config file)")]
    Missing(&'static str, &'static str),
    /// A flag or variable that does not parse or is out of range, as clap words it (it names
    /// the flag).
    #[error("{0}")]
    Flag(String),
    /// A per-method rule of the config file that cannot be used.
    #[error(transparent)]
    MethodRule(#[from] crate::policy::rules::MethodRuleError),
    /// The config file cannot be read or parsed.
    #[error("config file {path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// `--mode`: what a duplicate gets by default (`engine::Mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeSetting {
    /// The recorded answer, byte for byte.
    Replay,
    /// ALREADY_EXISTS / IDEMPOTENCY_DUPLICATE.
    Reject,
    /// Forward every call; count what enforcing would have done.
    Observe,
}

impl From<ModeSetting> for crate::engine::Mode {
    fn from(setting: ModeSetting) -> Self {
        match setting {
            ModeSetting::Replay => crate::engine::Mode::Replay,
            ModeSetting::Reject => crate::engine::Mode::Reject,
            ModeSetting::Observe => crate::engine::Mode::Observe,
        }
    }
}

/// How writes reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FlushMode {
    /// One flush serves every write waiting at that moment.
    Group,
    /// A flush per write: only to measure what group commit saves.
    PerWrite,
}

/// Which store records live in.
#[derive(Debug, Clone)]
pub enum StoreChoice {
    /// The embedded sled store in `data_dir`.
    Sled,
    /// Redis, one server or a cluster.
    Redis(crate::store::redis::RedisOptions),
    /// PostgreSQL (boxed: its connection settings are large).
    Postgres(Box<crate::store::postgres::PostgresOptions>),
}

/// Every setting of `run`, validated.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the proxy listens.
    pub listen: SocketAddr,
    /// `http://host:port` of the service.
    pub upstream: String,
    /// The sled directory.
    pub data_dir: PathBuf,
    /// The serial's header.
    pub key_header: HeaderName,
    /// Who calls.
    pub callers: Callers,
    /// The proxy listener's TLS, when it terminates TLS itself.
    pub tls: Option<crate::tls::Files>,
    /// A client certificate without a URI SAN names its caller by its subject CN.
    pub caller_subject_fallback: bool,
    /// The record encryption keys' file, when records are sealed.
    pub encryption_key_file: Option<PathBuf>,
    /// The proxy listener's HTTP/2 limits.
    pub http2: Http2Limits,
    /// Retention, leases and waits.
    pub limits: Limits,
    /// Largest request body deduplicated.
    pub request_bytes_max: usize,
    /// Largest response recorded.
    pub response_bytes_max: usize,
    /// Bytes all keyed calls together may buffer.
    pub buffered_bytes_max: usize,
    /// The store's size bound.
    pub store_bytes_max: u64,
    /// Whether a full store evicts records inside their retention.
    pub evict_when_full: bool,
    /// sled's cache.
    pub sled_cache_bytes: u64,
    /// Records in sled's `records` tree before the sweeper packs them.
    pub sled_pack_records: u64,
    /// Longest wait for the store to confirm a write.
    pub store_timeout: Duration,
    /// Sweeper period.
    pub sweep_interval: Duration,
    /// Threads of the async runtime.
    pub worker_threads: usize,
    /// Group commit or not.
    pub flush: FlushMode,
    /// What a duplicate gets where no annotation or rule says (`--mode`).
    pub mode: crate::engine::Mode,
    /// How far a caller's clock may be from ours (`idempotency-first-sent`).
    pub clock_skew_max: Duration,
    /// Where records live.
    pub store: StoreChoice,
    /// Where the service's descriptors (and so the per-method policy) come from.
    pub descriptors: crate::policy::descriptors::Sources,
    /// The config file's per-method rules.
    pub method_rules: crate::policy::Overrides,
    /// Where health is served.
    pub ops_listen: SocketAddr,
    /// How long a drain may take.
    pub drain_timeout: Duration,
    /// Where the admin API listens.
    pub admin_listen: SocketAddr,
    /// The admin API's bearer token, when one is required.
    pub admin_token: Option<String>,
    /// The admin API's TLS files, when it serves TLS.
    pub admin_tls: Option<crate::tls::Files>,
}

// Here, not in the engine: the engine knows no settings, and imports nothing of config.
impl Default for Limits {
    /// The declared defaults of the settings (`RunSettings`): the engine's own
    /// defaults are the ones declared once, here.
    fn default() -> Self {
        let settings = RunSettings::default();
        Limits {
            retention: settings.retention,
            lease_default: settings.default_lease,
            lease_margin: settings.lease_margin,
            in_flight_wait_max: settings.max_in_flight_wait,
            records_per_caller_max: settings.max_records_per_caller,
        }
    }
}

/// The longest retention accepted: a year.
/// Request and response limits stay below what one record can hold comfortably.
const MESSAGE_BYTES_LIMIT: u64 = 64 << 20;
const ZERO: Duration = Duration::ZERO;
const SECOND: Duration = Duration::from_secs(1);
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);

const fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

fn invalid(setting: &'static str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        setting,
        value: value.to_owned(),
        reason: reason.into(),
    }
}

/// A duration from `min` to `max`, written `500ms`, `10s`, `24h`.
fn span(
    min: Duration,
    max: Duration,
) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync + 'static {
    move |value| {
        let parsed = humantime::parse_duration(value)
            .map_err(|error| format!("{error} (write e.g. 500ms, 10s, 24h)"))?;
        if parsed < min || parsed > max {
            return Err(format!(
                "must be between {} and {}",
                humantime::format_duration(min),
                humantime::format_duration(max)
            ));
        }
        Ok(parsed)
    }
}

/// A whole number from `min` to `max`.
fn count(min: u64, max: u64) -> RangedU64ValueParser<u64> {
    RangedU64ValueParser::new().range(min..=max)
}

/// A size from `min` to `max` bytes, written `4194304`, `512KiB`, `4MiB`, `1GiB`.
fn size(min: u64, max: u64) -> impl Fn(&str) -> Result<u64, String> + Clone + Send + Sync {
    move |value| {
        let parsed = parse_bytes(value)
            .ok_or("not a size (write e.g. 4194304, 512KiB, 4MiB, 1GiB)".to_owned())?;
        if parsed < min || parsed > max {
            return Err(format!("must be between {min} and {max} bytes"));
        }
        Ok(parsed)
    }
}

/// Parses `4194304`, `4MiB`, `512KiB`, `1GiB`, `10MB`.
pub fn parse_bytes(value: &str) -> Option<u64> {
    let value = value.trim();
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (digits, unit) = value.split_at(split);
    let number: u64 = digits.parse().ok()?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return None,
    };
    number.checked_mul(scale)
}

/// Headers that HTTP/2, gRPC or its client libraries set on every call, or that idemproxy
/// writes itself: as a key header, every call of a caller to a method would share one key
/// (`--key-header content-type` answered a second, new payment with the first one's outcome).
const RESERVED_HEADERS: [&str; 13] = [
    "content-type",
    "te",
    "user-agent",
    "host",
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "accept-encoding",
    "content-encoding",
    crate::proxy::REPLAYED_HEADER,
];

/// A header name that a caller may set: lowercase, not reserved by HTTP/2 or gRPC.
fn header_name(value: &str) -> Result<HeaderName, String> {
    let name = HeaderName::from_bytes(value.as_bytes())
        .map_err(|_| "not a valid HTTP header name".to_owned())?;
    if name.as_str() != value
        || value.starts_with(':')
        || value.starts_with("grpc-")
        || RESERVED_HEADERS.contains(&value)
    {
        return Err(format!(
            "must be a lowercase header name that is not reserved by HTTP/2 or gRPC \
             (not grpc-*, {})",
            RESERVED_HEADERS.join(", ")
        ));
    }
    Ok(name)
}

fn caller_source(value: &str) -> Result<CallerSource, String> {
    let source = CallerSource::parse(value)?;
    if let CallerSource::Header(name) = &source {
        header_name(name.as_str())?;
    }
    Ok(source)
}

/// `http://host:port`, as the proxy's upstream client takes it.
fn upstream_url(value: &str) -> Result<String, String> {
    crate::proxy::upstream::HttpUpstream::new(value, 0).map_err(|error| error.to_string())?;
    Ok(value.to_owned())
}

fn key_prefix(value: &str) -> Result<String, String> {
    let visible = value
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b'{' && b != b'}');
    if value.is_empty() || value.len() > 64 || !visible {
        return Err("must be 1-64 visible ASCII characters without braces".into());
    }
    Ok(value.to_owned())
}

/// A PostgreSQL table name, `table` or `schema.table`: lowercase identifiers PostgreSQL
/// would not fold or need quoted, short enough to leave room for the index names made from it.
fn postgres_table(value: &str) -> Result<String, String> {
    let identifier = |part: &str| {
        let mut bytes = part.bytes();
        let first = bytes.next();
        first.is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
            && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            && part.len() <= 48
    };
    let parts: Vec<&str> = value.split('.').collect();
    // The whole name is the change channel, which PostgreSQL bounds at 63 bytes.
    if parts.len() > 2 || !parts.iter().all(|part| identifier(part)) || value.len() > 63 {
        return Err(
            "write `table` or `schema.table`, each 1-48 of a-z, 0-9 and _, not starting with a digit, 63 in all"
                .into(),
        );
    }
    Ok(value.to_owned())
}

/// Parses the arguments after `run` (or `check`) with the environment, and the config file
/// they name: its values become the settings' defaults, so a variable or a flag wins over
/// them and the file wins over the declared default. A bad file value is refused as a bad
/// flag is, by the same parser, with the file named.
pub fn parse_args<I, T>(argv: I) -> Result<RunSettings, ConfigError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
    let command = RunArgs::command().no_binary_name(true);
    let given = command
        .clone()
        .try_get_matches_from(&argv)
        .map_err(|error| ConfigError::Flag(clap_message(&error)))?;
    let mut settings = match given.get_one::<PathBuf>("config") {
        None => {
            RunArgs::from_arg_matches(&given)
                .map_err(|error| ConfigError::Flag(clap_message(&error)))?
                .settings
        }
        Some(path) => {
            let file_error = |reason: String| ConfigError::File {
                path: path.clone(),
                reason,
            };
            let (values, methods) = read_file(path)?;
            let command = file_defaults(command, values).map_err(file_error)?;
            let mut settings = command
                .try_get_matches_from(&argv)
                .and_then(|matches| RunArgs::from_arg_matches(&matches))
                .map_err(|error| file_error(clap_message(&error)))?
                .settings;
            settings.methods = methods;
            settings
        }
    };
    // Only from the environment: a password flag would show in the process list.
    settings.redis_password = std::env::var("IDEMPROXY_REDIS_PASSWORD").ok();
    settings.postgres_password = std::env::var("IDEMPROXY_POSTGRES_PASSWORD").ok();
    settings.admin_token = std::env::var("IDEMPROXY_ADMIN_TOKEN").ok();
    Ok(settings)
}

/// A config file's settings as the text a flag would carry, and its per-method rules.
type FileValues = BTreeMap<String, Vec<String>>;

/// Reads a config file: every key a setting's flag without its dashes, `methods` the
/// per-method rules.
pub fn read_file(
    path: &Path,
) -> Result<(FileValues, BTreeMap<String, MethodSettings>), ConfigError> {
    let text = crate::files::read_text(path, crate::files::TEXT_BYTES_MAX).map_err(|error| {
        ConfigError::File {
            path: path.to_owned(),
            reason: error.to_string(),
        }
    })?;
    parse_file(&text).map_err(|reason| ConfigError::File {
        path: path.to_owned(),
        reason,
    })
}

/// Parses a config file's text; the error says what is wrong and where. Whether each value
/// suits its setting is checked when it is laid under the flags.
pub fn parse_file(text: &str) -> Result<(FileValues, BTreeMap<String, MethodSettings>), String> {
    let mut table: toml::Table = text
        .parse()
        .map_err(|error: toml::de::Error| error.to_string())?;
    let methods = match table.remove("methods") {
        None => BTreeMap::new(),
        Some(methods) => methods
            .try_into()
            .map_err(|error: toml::de::Error| format!("methods: {error}"))?,
    };
    let mut values = BTreeMap::new();
    for (key, value) in table {
        let scalar = |value: toml::Value| match value {
            toml::Value::String(text) => Ok(text),
            toml::Value::Integer(number) => Ok(number.to_string()),
            toml::Value::Boolean(flag) => Ok(flag.to_string()),
            other => Err(format!(
                "{key}: a {} here; write a string, a whole number or true/false",
                other.type_str()
            )),
        };
        let texts = match value {
            toml::Value::Array(items) => items.into_iter().map(scalar).collect::<Result<_, _>>()?,
            value => vec![scalar(value)?],
        };
        values.insert(key, texts);
    }
    Ok((values, methods))
}

/// `command` with the file's values as the defaults of their settings.
fn file_defaults(command: clap::Command, mut values: FileValues) -> Result<clap::Command, String> {
    for key in values.keys() {
        let known = command.get_arguments().find(|arg| {
            arg.get_long() == Some(key.as_str())
                && arg.get_id() != "config"
                && matches!(
                    arg.get_action(),
                    ArgAction::Set | ArgAction::Append | ArgAction::SetTrue
                )
        });
        let Some(arg) = known else {
            return Err(format!("unknown setting `{key}`"));
        };
        let repeatable = matches!(arg.get_action(), ArgAction::Append);
        if values[key].len() != 1 && !repeatable {
            return Err(format!("{key}: give one value, not a list"));
        }
    }
    Ok(command.mut_args(
        |arg| match arg.get_long().and_then(|long| values.remove(long)) {
            Some(texts) => arg.default_values(texts),
            None => arg,
        },
    ))
}

/// What clap says of a bad value, on one line, without its usage hint.
fn clap_message(error: &clap::Error) -> String {
    let text = error.render().to_string();
    let line = text.lines().next().unwrap_or_default();
    line.strip_prefix("error: ").unwrap_or(line).to_owned()
}

/// Checks what several settings say together and builds the `Config`.
pub fn resolve(settings: RunSettings) -> Result<Config, ConfigError> {
    let mut store = store_choice(&settings)?;
    if let StoreChoice::Redis(options) = &mut store {
        options.track_callers = settings.max_records_per_caller.is_some();
    }
    let upstream = settings
        .upstream
        .clone()
        .ok_or(ConfigError::Missing("upstream", "UPSTREAM"))?;
    let callers = callers(&settings)?;
    let tls = tls_files(&settings)?;
    if callers.source == CallerSource::Mtls
        && tls.as_ref().is_none_or(|tls| tls.client_ca.is_none())
    {
        return Err(invalid(
            "caller-source",
            "mtls",
            "needs --tls-cert, --tls-key and --client-ca: the caller comes from a client certificate this listener verifies",
        ));
    }
    if settings.max_buffered_bytes < settings.max_request_bytes {
        return Err(invalid(
            "max-buffered-bytes",
            &settings.max_buffered_bytes.to_string(),
            "it must hold at least one request of --max-request-bytes, or no such request is ever served",
        ));
    }
    let (admin_token, admin_tls) = admin_access(&settings)?;
    let descriptors = crate::policy::descriptors::Sources {
        descriptor_sets: settings.descriptor_set.clone(),
        protos: settings.proto.clone(),
        proto_paths: settings.proto_path.clone(),
        reflection: settings.reflection,
        reflection_timeout: settings.reflection_timeout,
    };
    Ok(Config {
        listen: settings.listen,
        upstream,
        http2: http2_limits(&settings),
        limits: Limits {
            retention: settings.retention,
            in_flight_wait_max: settings.max_in_flight_wait,
            lease_default: settings.default_lease,
            lease_margin: settings.lease_margin,
            records_per_caller_max: settings.max_records_per_caller,
        },
        // Both at most 64 MiB by their declared ranges.
        request_bytes_max: settings.max_request_bytes as usize,
        response_bytes_max: settings.max_response_bytes as usize,
        buffered_bytes_max: usize::try_from(settings.max_buffered_bytes).unwrap_or(usize::MAX),
        store_bytes_max: settings.max_store_bytes,
        evict_when_full: settings.evict_when_full,
        sled_cache_bytes: settings.sled_cache_bytes,
        sled_pack_records: settings.sled_pack_records,
        store_timeout: settings.store_timeout,
        sweep_interval: settings.sweep_interval,
        // At most 256 by its declared range.
        worker_threads: settings.worker_threads as usize,
        flush: settings.flush,
        mode: settings.mode.into(),
        clock_skew_max: settings.max_clock_skew,
        store,
        descriptors,
        method_rules: crate::policy::rules::method_rules(settings.methods)?,
        ops_listen: settings.ops_listen,
        drain_timeout: settings.drain_timeout,
        admin_listen: settings.admin_listen,
        admin_token,
        admin_tls,
        data_dir: settings.data_dir,
        key_header: settings.key_header,
        callers,
        tls,
        caller_subject_fallback: settings.caller_subject_fallback,
        encryption_key_file: settings.encryption_key_file,
    })
}

/// Where callers come from: a header (`--caller-header`, by default `x-caller-id`) or
/// another `--caller-source`, never both, never the key's header.
fn callers(settings: &RunSettings) -> Result<Callers, ConfigError> {
    let source = match (&settings.caller_source, &settings.caller_header) {
        (Some(source), None) => source.clone(),
        (None, header) => CallerSource::Header(
            header
                .clone()
                .unwrap_or_else(|| HeaderName::from_static("x-caller-id")),
        ),
        (Some(source), Some(_)) => {
            return Err(invalid(
                "caller-source",
                &source.describe(),
                "give either --caller-source or --caller-header, not both",
            ))
        }
    };
    if source == CallerSource::Header(settings.key_header.clone()) {
        return Err(invalid(
            "caller-header",
            settings.key_header.as_str(),
            "must differ from --key-header",
        ));
    }
    Ok(Callers {
        source,
        require: settings.require_caller,
    })
}

/// The proxy listener's HTTP/2 limits.
fn http2_limits(settings: &RunSettings) -> Http2Limits {
    Http2Limits {
        // Both within u32 by their declared ranges.
        max_concurrent_streams: settings.http2_max_concurrent_streams as u32,
        max_header_list_size: settings.http2_max_header_list_size as u32,
        keepalive_interval: Some(settings.http2_keepalive_interval)
            .filter(|interval| !interval.is_zero()),
        keepalive_timeout: settings.http2_keepalive_timeout,
        idle_timeout: settings.http2_idle_timeout,
        connections_max: usize::try_from(settings.max_connections).unwrap_or(usize::MAX),
    }
}

/// The admin API's token and TLS: off loopback it needs both, as it can forget and purge
/// records and its token must not cross a network in the clear.
fn admin_access(
    settings: &RunSettings,
) -> Result<(Option<String>, Option<crate::tls::Files>), ConfigError> {
    let admin_token = match (&settings.admin_token, &settings.admin_token_file) {
        (Some(token), _) => Some(token.clone()),
        (None, Some(path)) => Some(
            crate::files::read_text(path, crate::files::SECRET_BYTES_MAX)
                .map_err(|error| {
                    invalid(
                        "admin-token-file",
                        &path.display().to_string(),
                        error.to_string(),
                    )
                })?
                .trim()
                .to_owned(),
        ),
        (None, None) => None,
    };
    if admin_token.as_deref() == Some("") {
        return Err(invalid("admin-token-file", "", "the admin token is empty"));
    }
    let listen = settings.admin_listen;
    if !listen.ip().is_loopback() && admin_token.is_none() {
        return Err(invalid(
            "admin-listen",
            &listen.to_string(),
            "a non-loopback admin address needs a token (--admin-token-file or IDEMPROXY_ADMIN_TOKEN): the admin API can forget and purge records",
        ));
    }
    let admin_tls = match (&settings.admin_tls_cert, &settings.admin_tls_key) {
        (Some(cert), Some(key)) => Some(crate::tls::Files {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: None,
            alpn: vec![b"h2".to_vec()],
            settings: crate::tls::FileSettings::ADMIN,
        }),
        (None, None) => None,
        (Some(cert), None) => {
            return Err(invalid(
                "admin-tls-key",
                "",
                format!("--admin-tls-cert {} needs --admin-tls-key", cert.display()),
            ))
        }
        (None, Some(key)) => {
            return Err(invalid(
                "admin-tls-cert",
                "",
                format!("--admin-tls-key {} needs --admin-tls-cert", key.display()),
            ))
        }
    };
    if !listen.ip().is_loopback() && admin_tls.is_none() {
        return Err(invalid(
            "admin-listen",
            &listen.to_string(),
            "a non-loopback admin address needs TLS (--admin-tls-cert, --admin-tls-key): its token would cross the network in the clear",
        ));
    }
    Ok((admin_token, admin_tls))
}

/// The proxy listener's TLS files: a certificate and key go together; a client CA needs them.
fn tls_files(settings: &RunSettings) -> Result<Option<crate::tls::Files>, ConfigError> {
    let (cert, key, client_ca) = (
        settings.tls_cert.clone(),
        settings.tls_key.clone(),
        settings.client_ca.clone(),
    );
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(crate::tls::Files {
            cert,
            key,
            client_ca,
            alpn: vec![b"h2".to_vec()],
            settings: crate::tls::FileSettings::PROXY,
        })),
        (None, None) => match client_ca {
            None => Ok(None),
            Some(ca) => Err(invalid(
                "client-ca",
                &ca.display().to_string(),
                "needs --tls-cert and --tls-key: client certificates are asked for by this listener's TLS",
            )),
        },
        (Some(cert), None) => Err(invalid(
            "tls-key",
            "",
            format!("--tls-cert {} needs --tls-key", cert.display()),
        )),
        (None, Some(key)) => Err(invalid(
            "tls-cert",
            "",
            format!("--tls-key {} needs --tls-cert", key.display()),
        )),
    }
}

fn store_choice(settings: &RunSettings) -> Result<StoreChoice, ConfigError> {
    let cluster = match settings.store {
        StoreKind::Sled => return Ok(StoreChoice::Sled),
        StoreKind::Postgres => return postgres_choice(settings),
        StoreKind::Redis | StoreKind::RedisSentinel => false,
        StoreKind::RedisCluster => true,
    };
    let (urls, master_name) = match settings.store {
        StoreKind::RedisSentinel => sentinels(settings)?,
        _ => (redis_urls(settings, cluster)?, None),
    };
    if cluster && settings.redis_wait_replicas > 0 {
        return Err(invalid(
            "redis-wait-replicas",
            &settings.redis_wait_replicas.to_string(),
            "WAIT counts the replicas of one node: use it with `redis` or `redis-sentinel`",
        ));
    }
    let password = match (&settings.redis_password, &settings.redis_password_file) {
        (Some(password), _) => Some(password.clone()),
        (None, Some(path)) => Some(secret_file("redis-password-file", path)?),
        (None, None) => None,
    };
    let ca_pem = match &settings.redis_ca_file {
        Some(path) => Some(
            crate::files::read(path, crate::files::TEXT_BYTES_MAX).map_err(|error| {
                invalid(
                    "redis-ca-file",
                    &path.display().to_string(),
                    error.to_string(),
                )
            })?,
        ),
        None => None,
    };
    let options = crate::store::redis::RedisOptions {
        urls,
        cluster,
        password,
        ca_pem,
        key_prefix: settings.redis_key_prefix.clone(),
        command_timeout: settings.store_timeout,
        poll_interval: settings.redis_poll_interval,
        track_callers: false,
        master_name,
        wait_replicas: settings.redis_wait_replicas as u32,
    };
    Ok(StoreChoice::Redis(options))
}

/// `--redis-url`: one URL, or for a cluster one or more seed nodes, each parsed now so that a
/// typo stops the start with the setting's name.
fn redis_urls(settings: &RunSettings, cluster: bool) -> Result<Vec<String>, ConfigError> {
    let url_text = settings
        .redis_url
        .as_deref()
        .ok_or(ConfigError::Missing("redis-url", "REDIS_URL"))?;
    let urls: Vec<String> = url_text
        .split(',')
        .map(|url| url.trim().to_owned())
        .filter(|url| !url.is_empty())
        .collect();
    if urls.is_empty() || (!cluster && urls.len() > 1) {
        return Err(invalid(
            "redis-url",
            url_text,
            "give one URL for `redis`, one or more seed nodes separated by commas for `redis-cluster`",
        ));
    }
    for url in &urls {
        redis::IntoConnectionInfo::into_connection_info(url.as_str())
            .map_err(|error| invalid("redis-url", url, error.to_string()))?;
    }
    Ok(urls)
}

/// `--redis-sentinels` as URLs (`host:port` is `redis://host:port`) and
/// `--redis-master-name`, both required for `redis-sentinel`.
fn sentinels(settings: &RunSettings) -> Result<(Vec<String>, Option<String>), ConfigError> {
    let text = settings
        .redis_sentinels
        .as_deref()
        .ok_or(ConfigError::Missing("redis-sentinels", "REDIS_SENTINELS"))?;
    let urls = crate::store::sentinel::parse_sentinels(text)
        .map_err(|reason| invalid("redis-sentinels", text, reason))?;
    let name = settings
        .redis_master_name
        .as_deref()
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .ok_or(ConfigError::Missing(
            "redis-master-name",
            "REDIS_MASTER_NAME",
        ))?;
    if !name.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            "redis-master-name",
            name,
            "a Sentinel master name is visible ASCII without spaces",
        ));
    }
    Ok((urls, Some(name.to_owned())))
}

/// The PostgreSQL settings, checked: the URL parses, the files read.
fn postgres_choice(settings: &RunSettings) -> Result<StoreChoice, ConfigError> {
    let url = settings
        .postgres_url
        .as_deref()
        .ok_or(ConfigError::Missing("postgres-url", "POSTGRES_URL"))?;
    let password = match (
        &settings.postgres_password,
        &settings.postgres_password_file,
    ) {
        (Some(password), _) => Some(password.clone()),
        (None, Some(path)) => Some(secret_file("postgres-password-file", path)?),
        (None, None) => None,
    };
    let ca_pem = match &settings.postgres_ca_file {
        Some(path) => Some(
            crate::files::read(path, crate::files::TEXT_BYTES_MAX).map_err(|error| {
                invalid(
                    "postgres-ca-file",
                    &path.display().to_string(),
                    error.to_string(),
                )
            })?,
        ),
        None => None,
    };
    let options = crate::store::postgres::PostgresOptions::new(
        url,
        password,
        ca_pem,
        &settings.postgres_table,
        settings.store_timeout,
        settings.postgres_require_sync_replica,
    )
    .map_err(|error| invalid("postgres-url", "(not shown: it may hold a password)", error))?;
    Ok(StoreChoice::Postgres(Box::new(options)))
}

/// A secret file's text without its line end.
fn secret_file(setting: &'static str, path: &Path) -> Result<String, ConfigError> {
    let text = crate::files::read_text(path, crate::files::SECRET_BYTES_MAX)
        .map_err(|error| invalid(setting, &path.display().to_string(), error.to_string()))?;
    Ok(text.trim_end_matches(['\r', '\n']).to_owned())
}

/// Parses the arguments after `run` with the environment and the config file, and resolves.
pub fn load<I, T>(argv: I) -> Result<Config, ConfigError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    resolve(parse_args(argv)?)
}

/// The upstream `check` resolves with when none is given: `check` never calls the service
/// unless `--reflection` asks it to, and then an upstream is required.
const CHECK_WITHOUT_UPSTREAM: &str = "http://127.0.0.1:16000";

/// `idemproxy check`'s settings: as `resolve`, but only `--reflection` needs `--upstream`, so
/// a CI job that lints annotated protos needs no service address.
pub fn resolve_for_check(mut settings: RunSettings) -> Result<Config, ConfigError> {
    let no_upstream = settings.upstream.is_none();
    if no_upstream {
        settings.upstream = Some(CHECK_WITHOUT_UPSTREAM.to_owned());
    }
    let config = resolve(settings)?;
    if no_upstream && config.descriptors.reflection {
        return Err(ConfigError::Invalid {
            setting: "reflection",
            value: "true".into(),
            reason: "server reflection is asked from the service: give --upstream too".into(),
        });
    }
    Ok(config)
}

/// One setting as it is declared: what README's table, the example file and `run --help`
/// must show of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declared {
    /// `--flag`.
    pub flag: String,
    /// `IDEMPROXY_*`.
    pub env: String,
    /// The declared default, or one the help text names (`[default: …]`); `None`: no default.
    /// A switch's is `false`.
    pub default: Option<String>,
    /// A switch: given without a value, `false` unless given.
    pub switch: bool,
    /// A config file may set it (all but `--config`).
    pub in_file: bool,
}

/// Every setting of `run`, as declared.
pub fn declared() -> Vec<Declared> {
    let mut command = RunArgs::command();
    // Built, so that a switch shows its implicit `false`.
    command.build();
    command
        .get_arguments()
        .filter_map(|arg| {
            let long = arg.get_long()?;
            let env = arg.get_env()?.to_string_lossy().into_owned();
            let shown: Vec<String> = arg
                .get_default_values()
                .iter()
                .map(|value| value.to_string_lossy().into_owned())
                .collect();
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            let in_help = help
                .split_once("[default: ")
                .and_then(|(_, rest)| rest.split_once(']'))
                .map(|(value, _)| value.to_owned());
            let switch = matches!(arg.get_action(), ArgAction::SetTrue);
            let default = if shown.is_empty() {
                in_help
            } else {
                Some(shown.join(","))
            };
            Some(Declared {
                flag: format!("--{long}"),
                env,
                default,
                switch,
                in_file: long != "config",
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The settings of `run` with these flags (and this process's environment, which sets no
    /// `IDEMPROXY_*` setting in the unit tests).
    fn flags(extra: &[&str]) -> Result<RunSettings, ConfigError> {
        let mut argv = vec!["--upstream", "http://127.0.0.1:50051"];
        argv.extend_from_slice(extra);
        parse_args(argv)
    }

    fn resolved(extra: &[&str]) -> Result<Config, ConfigError> {
        resolve(flags(extra)?)
    }

    fn error_text(result: Result<Config, ConfigError>) -> String {
        result.expect_err("the setting must be refused").to_string()
    }

    /// A config file with `text`, and the flags that name it.
    fn with_file(text: &str, extra: &[&str]) -> (tempfile::TempDir, Result<Config, ConfigError>) {
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).expect("written");
        let path = path.to_str().expect("UTF-8").to_owned();
        let mut argv = vec!["--config", path.as_str()];
        argv.extend_from_slice(extra);
        let config = parse_args(argv).and_then(resolve);
        (dir, config)
    }

    #[test]
    fn defaults_follow_the_design() {
        let config = resolved(&[]).expect("defaults are valid");
        assert_eq!(config.listen.to_string(), "0.0.0.0:16000");
        assert_eq!(config.key_header.as_str(), "idempotency-key");
        assert_eq!(
            config.callers.source,
            CallerSource::Header(HeaderName::from_static("x-caller-id"))
        );
        assert!(!config.callers.require);
        assert_eq!(
            config.http2,
            Http2Limits {
                max_concurrent_streams: 1024,
                max_header_list_size: 16 << 10,
                keepalive_interval: Some(Duration::from_secs(60)),
                keepalive_timeout: Duration::from_secs(20),
                idle_timeout: Duration::from_secs(15 * 60),
                connections_max: 0,
            }
        );
        assert_eq!(config.limits.retention, Duration::from_secs(86_400));
        assert_eq!(config.request_bytes_max, 4 << 20);
        assert_eq!(config.flush, FlushMode::Group);
        assert_eq!(config.sled_pack_records, 8192);
        assert!(matches!(config.store, StoreChoice::Sled));
    }

    #[test]
    fn the_declared_defaults_are_the_parsed_ones() {
        let parsed = flags(&[]).expect("valid");
        let declared = RunSettings {
            upstream: parsed.upstream.clone(),
            ..RunSettings::default()
        };
        assert_eq!(format!("{parsed:?}"), format!("{declared:?}"));
    }

    #[test]
    fn security_settings_are_checked_together() {
        let refused = |extra: &[&str]| error_text(resolved(extra));
        assert!(
            refused(&["--caller-source", "xfcc", "--caller-header", "x-caller"])
                .contains("not both")
        );
        assert!(refused(&["--caller-source", "mtls"]).contains("--client-ca"));
        assert!(refused(&["--caller-source", "header:idempotency-key"]).contains("--key-header"));
        assert!(refused(&["--tls-cert", "/tls.crt"]).contains("--tls-key"));
        assert!(refused(&["--client-ca", "/ca.crt"]).contains("--client-ca"));
        for (setting, value) in [
            ("--http2-max-concurrent-streams", "0"),
            ("--http2-max-header-list-size", "10"),
            ("--http2-idle-timeout", "1ms"),
            ("--max-records-per-caller", "-1"),
            ("--caller-source", "header:Bad Name"),
        ] {
            let text = refused(&[&format!("{setting}={value}")]);
            assert!(text.contains(setting), "{setting}: {text}");
        }
        let (_dir, config) = with_file(
            "upstream = \"http://127.0.0.1:1\"\ncaller-source = \"xfcc\"\nrequire-caller = true\nmax-records-per-caller = 10\nhttp2-keepalive-interval = \"0s\"",
            &[],
        );
        let config = config.expect("valid");
        assert_eq!(config.callers.source, CallerSource::Xfcc);
        assert!(config.callers.require);
        assert_eq!(config.limits.records_per_caller_max, Some(10));
        assert_eq!(config.http2.keepalive_interval, None);
    }

    #[test]
    fn flags_win_over_file() {
        let (_dir, config) = with_file(
            "upstream = \"http://127.0.0.1:1\"\nretention = \"1h\"\nmax-request-bytes = 1024\nkey-header = \"x-request-id\"\nproto-path = [\"/a\", \"/b\"]",
            &["--retention", "2h", "--proto-path", "/c"],
        );
        let config = config.expect("valid");
        assert_eq!(config.limits.retention, Duration::from_secs(7_200));
        assert_eq!(config.request_bytes_max, 1024);
        assert_eq!(config.key_header.as_str(), "x-request-id");
        assert_eq!(config.descriptors.proto_paths, [PathBuf::from("/c")]);
    }

    #[test]
    /// Issue 31, item 7: each of these started before, and each could make calls share a key,
    /// go to the wrong port or read a file forever.
    fn settings_that_would_share_keys_or_read_forever_are_refused() {
        let refused = |extra: &[&str]| error_text(resolved(extra));
        for upstream in [
            "http://127.0.0.1:70000",
            "http://127.0.0.1:0",
            "http://[::1]:65536",
        ] {
            let error = error_text(parse_args(["--upstream", upstream]).and_then(resolve));
            assert!(
                error.contains("--upstream") && error.contains("65535"),
                "{error}"
            );
        }
        for upstream in ["http://[::1]:50051", "http://svc", "http://svc:65535"] {
            parse_args(["--upstream", upstream])
                .and_then(resolve)
                .expect(upstream);
        }
        for header in ["content-type", "te", "user-agent", "grpc-timeout", "host"] {
            let error = refused(&["--key-header", header]);
            assert!(error.contains("--key-header"), "{header}: {error}");
            let error = refused(&["--caller-source", &format!("header:{header}")]);
            assert!(error.contains("--caller-source"), "{header}: {error}");
        }
        let error = refused(&["--admin-token-file", "/dev/zero"]);
        assert!(
            error.contains("--admin-token-file") && error.contains("more than"),
            "{error}"
        );
        let error = error_text(parse_args(["--config", "/dev/zero"]).and_then(resolve));
        assert!(
            error.contains("/dev/zero") && error.contains("more than"),
            "{error}"
        );
    }

    #[test]
    fn bad_settings_are_named() {
        let refused = |extra: &[&str]| error_text(resolved(extra));
        assert!(refused(&["--retention", "soon"]).contains("--retention"));
        assert!(refused(&["--key-header", "Bad Header"]).contains("--key-header"));
        assert!(refused(&["--upstream", "https://svc:443"]).contains("--upstream"));
        assert!(refused(&["--max-request-bytes", "4 parsecs"]).contains("--max-request-bytes"));
        assert!(refused(&["--flush", "sometimes"]).contains("--flush"));
        assert!(
            error_text(parse_args(Vec::<String>::new()).and_then(resolve))
                .contains("--upstream is required")
        );
        for (text, named) in [
            ("retension = \"1h\"", "retension"),
            ("retention = \"soon\"", "--retention"),
            ("retention = 1.5", "retention"),
            ("key-header = [\"a\", \"b\"]", "key-header"),
            ("config = \"/other.toml\"", "config"),
            ("help = true", "help"),
            ("[methods.\"/a.B/C\"]\nmode = \"twice\"", "mode"),
        ] {
            let (dir, config) = with_file(text, &["--upstream", "http://127.0.0.1:1"]);
            let error = error_text(config);
            assert!(error.contains(named), "{text}: {error}");
            let path = dir.path().join("config.toml");
            assert!(
                error.contains(&path.display().to_string()) || named == "mode",
                "{text}: {error}"
            );
        }
    }

    #[test]
    fn redis_settings_are_checked_before_start() {
        let refused = |extra: &[&str]| error_text(resolved(extra));
        assert!(refused(&["--store", "redis"]).contains("--redis-url is required"));
        assert!(refused(&["--store", "memcached"]).contains("--store"));
        let redis = ["--store", "redis", "--redis-url"];
        let with = |more: &[&'static str]| [&redis[..], more].concat();
        assert!(refused(&with(&["redis://a:1,redis://b:2"])).contains("--redis-url"));
        assert!(refused(&with(&["http://a:1"])).contains("--redis-url"));
        assert!(refused(&with(&[
            "redis://127.0.0.1:6379",
            "--redis-key-prefix",
            "{tag}"
        ]))
        .contains("--redis-key-prefix"));
        assert!(refused(&with(&[
            "redis://127.0.0.1:6379",
            "--redis-password-file",
            "/nonexistent/password"
        ]))
        .contains("--redis-password-file"));

        let (_dir, config) = with_file(
            "store = \"redis-cluster\"\nredis-url = \"redis://a:7000, redis://b:7001\"",
            &["--upstream", "http://127.0.0.1:1"],
        );
        match config.expect("valid").store {
            StoreChoice::Redis(options) => {
                assert!(options.cluster);
                assert_eq!(options.urls, ["redis://a:7000", "redis://b:7001"]);
                assert_eq!(options.key_prefix, "idemproxy");
            }
            _ => panic!("the file chose redis-cluster"),
        }
    }

    #[test]
    fn postgres_settings_are_checked_before_start() {
        let refused = |extra: &[&str]| error_text(resolved(extra));
        assert!(refused(&["--store", "postgres"]).contains("--postgres-url is required"));
        let postgres = ["--store", "postgres", "--postgres-url"];
        let with = |more: &[&'static str]| [&postgres[..], more].concat();
        assert!(refused(&with(&["host=a sslmode=sometimes"])).contains("--postgres-url"));
        assert!(refused(&with(&["dbname=x"])).contains("names no host"));
        for table in ["Records", "a.b.c", "1st", "x-y", ""] {
            let error = refused(&with(&["host=a", "--postgres-table", table]));
            assert!(error.contains("--postgres-table"), "{table}: {error}");
        }
        assert!(refused(&with(&[
            "host=a",
            "--postgres-password-file",
            "/nonexistent/password"
        ]))
        .contains("--postgres-password-file"));

        let url = "postgres://u@pg-1:5432,pg-2:5433/payments?target_session_attrs=read-write&sslmode=verify-full";
        let config = resolved(&with(&[url, "--postgres-table", "billing.idem"]));
        match config.expect("valid").store {
            StoreChoice::Postgres(options) => {
                assert_eq!(options.config.get_hosts().len(), 2);
                assert_eq!(options.config.get_ports(), [5432, 5433]);
                assert_eq!(
                    options.config.get_target_session_attrs(),
                    tokio_postgres::config::TargetSessionAttrs::ReadWrite
                );
                assert_eq!(
                    options.config.get_ssl_mode(),
                    tokio_postgres::config::SslMode::Require
                );
                assert_eq!(options.verify, crate::store::postgres::Verify::Full);
                assert_eq!(options.table, "billing.idem");
            }
            _ => panic!("the settings chose postgres"),
        }
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("4MiB"), Some(4 << 20));
        assert_eq!(parse_bytes("10 MB"), Some(10_000_000));
        assert_eq!(parse_bytes("12"), Some(12));
        assert_eq!(parse_bytes("MiB"), None);
        assert_eq!(parse_bytes("99999999999999999999GiB"), None);
    }
}

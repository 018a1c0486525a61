//! Settings: flags, `IDEMPROXY_*` environment variables and an optional TOML file, resolved
//! into one validated `Config` (design §7: flag > env > file > default).
//!
//! clap reads flags and the environment into `RunArgs` (every field optional, so "not given"
//! is visible); `resolve` lays them over the file and the defaults. Nothing here starts
//! anything; a bad setting is an error that names it, never a panic.

use crate::caller::{CallerSource, Callers};
use crate::engine::Limits;
use clap::Args;
use http::HeaderName;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Flags of `idemproxy run` (each also an `IDEMPROXY_<FLAG>` variable).
#[derive(Debug, Default, Clone, Args)]
pub struct RunArgs {
    /// TOML file with any of these settings (keys as the flags, without the dashes in front).
    #[arg(long, env = "IDEMPROXY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address the gRPC proxy listens on [default: 0.0.0.0:16000].
    #[arg(long, env = "IDEMPROXY_LISTEN")]
    pub listen: Option<String>,
    /// The service behind the sidecar, as http://host:port (required).
    #[arg(long, env = "IDEMPROXY_UPSTREAM")]
    pub upstream: Option<String>,
    /// Directory of the embedded store [default: /var/lib/idemproxy].
    #[arg(long, env = "IDEMPROXY_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Header carrying the request serial number [default: idempotency-key].
    #[arg(long, env = "IDEMPROXY_KEY_HEADER")]
    pub key_header: Option<String>,
    /// Header naming the caller, set by a trusted mesh or gateway [default: x-caller-id];
    /// short for `--caller-source header:<name>`.
    #[arg(long, env = "IDEMPROXY_CALLER_HEADER")]
    pub caller_header: Option<String>,
    /// Where the caller identity comes from: `header:<name>`, `xfcc` (Envoy/Istio's
    /// x-forwarded-client-cert, from a loopback peer), `mtls` (the client certificate of
    /// this listener's TLS) or `none` (one tenant) [default: header:x-caller-id].
    #[arg(long, env = "IDEMPROXY_CALLER_SOURCE")]
    pub caller_source: Option<String>,
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
    /// seals new records, every one opens old ones [default: records in the clear].
    #[arg(long, env = "IDEMPROXY_ENCRYPTION_KEY_FILE")]
    pub encryption_key_file: Option<PathBuf>,
    /// Live records one caller may hold; past it, its new keys are refused with
    /// RESOURCE_EXHAUSTED and other callers are unaffected [default: no cap].
    #[arg(long, env = "IDEMPROXY_MAX_RECORDS_PER_CALLER")]
    pub max_records_per_caller: Option<String>,
    /// Most concurrent HTTP/2 streams per client connection [default: 1024].
    #[arg(long, env = "IDEMPROXY_HTTP2_MAX_CONCURRENT_STREAMS")]
    pub http2_max_concurrent_streams: Option<String>,
    /// Largest header list a client may send, in bytes [default: 16KiB].
    #[arg(long, env = "IDEMPROXY_HTTP2_MAX_HEADER_LIST_SIZE")]
    pub http2_max_header_list_size: Option<String>,
    /// How often an idle client connection is pinged (0s: never) [default: 60s].
    #[arg(long, env = "IDEMPROXY_HTTP2_KEEPALIVE_INTERVAL")]
    pub http2_keepalive_interval: Option<String>,
    /// How long a ping may go unanswered before the connection is closed [default: 20s].
    #[arg(long, env = "IDEMPROXY_HTTP2_KEEPALIVE_TIMEOUT")]
    pub http2_keepalive_timeout: Option<String>,
    /// A client connection that starts no call for this long is closed gracefully (GOAWAY)
    /// [default: 15m].
    #[arg(long, env = "IDEMPROXY_HTTP2_IDLE_TIMEOUT")]
    pub http2_idle_timeout: Option<String>,
    /// How long an outcome is kept and replayed [default: 24h].
    #[arg(long, env = "IDEMPROXY_RETENTION")]
    pub retention: Option<String>,
    /// Longest wait of a duplicate for an in-flight first attempt [default: 10s].
    #[arg(long, env = "IDEMPROXY_MAX_IN_FLIGHT_WAIT")]
    pub max_in_flight_wait: Option<String>,
    /// Lease of a call that sends no grpc-timeout [default: 30s].
    #[arg(long, env = "IDEMPROXY_DEFAULT_LEASE")]
    pub default_lease: Option<String>,
    /// Added to every call's deadline to form its lease [default: 5s].
    #[arg(long, env = "IDEMPROXY_LEASE_MARGIN")]
    pub lease_margin: Option<String>,
    /// Largest request body that is deduplicated [default: 4MiB].
    #[arg(long, env = "IDEMPROXY_MAX_REQUEST_BYTES")]
    pub max_request_bytes: Option<String>,
    /// Largest response that is recorded [default: 4MiB].
    #[arg(long, env = "IDEMPROXY_MAX_RESPONSE_BYTES")]
    pub max_response_bytes: Option<String>,
    /// Size bound of the store; the COMPLETED records closest to expiry go first [default: 1GiB].
    #[arg(long, env = "IDEMPROXY_MAX_STORE_BYTES")]
    pub max_store_bytes: Option<String>,
    /// sled's page cache (its memory use is a multiple of this) [default: 8MiB].
    #[arg(long, env = "IDEMPROXY_SLED_CACHE_BYTES")]
    pub sled_cache_bytes: Option<String>,
    /// Records sled keeps one key each; past this the sweeper packs the COMPLETED ones many to
    /// a slice file [default: 8192].
    #[arg(long, env = "IDEMPROXY_SLED_PACK_RECORDS")]
    pub sled_pack_records: Option<String>,
    /// Longest wait for the store to confirm a write; past it the call fails closed
    /// [default: 5s].
    #[arg(long, env = "IDEMPROXY_STORE_TIMEOUT")]
    pub store_timeout: Option<String>,
    /// How often expired records are swept [default: 1s].
    #[arg(long, env = "IDEMPROXY_SWEEP_INTERVAL")]
    pub sweep_interval: Option<String>,
    /// Threads serving calls. One suits a sidecar sharing its pod's cores with the service
    /// (flushing has a thread of its own) [default: 1].
    #[arg(long, env = "IDEMPROXY_WORKER_THREADS")]
    pub worker_threads: Option<String>,
    /// `group` (one flush serves every waiting write) or `per-write` (benchmark baseline)
    /// [default: group].
    #[arg(long, env = "IDEMPROXY_FLUSH")]
    pub flush: Option<String>,
    /// Address of health (`grpc.health.v1`, `/livez`, `/readyz`) [default: 0.0.0.0:16090].
    #[arg(long, env = "IDEMPROXY_OPS_LISTEN")]
    pub ops_listen: Option<String>,
    /// On SIGTERM, how long running calls get to finish and record their outcome
    /// [default: 25s].
    #[arg(long, env = "IDEMPROXY_DRAIN_TIMEOUT")]
    pub drain_timeout: Option<String>,
    /// Address of the admin API (`idemproxy keys`); a non-loopback address needs a token
    /// [default: 127.0.0.1:16091].
    #[arg(long, env = "IDEMPROXY_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// File holding the admin API's bearer token (or set IDEMPROXY_ADMIN_TOKEN).
    #[arg(long, env = "IDEMPROXY_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// The admin token, from the environment only.
    #[arg(skip)]
    pub admin_token: Option<String>,
    /// FileDescriptorSet of the service, with its idemproxy annotations (repeatable; from
    /// `protoc --include_imports --descriptor_set_out` or `buf build`).
    #[arg(
        long = "descriptor-set",
        env = "IDEMPROXY_DESCRIPTOR_SET",
        value_delimiter = ','
    )]
    pub descriptor_set: Vec<PathBuf>,
    /// A .proto file of the service, compiled at start (repeatable).
    #[arg(long = "proto", env = "IDEMPROXY_PROTO", value_delimiter = ',')]
    pub proto: Vec<PathBuf>,
    /// An include directory for --proto (repeatable); idemproxy/v1/annotations.proto is
    /// built in.
    #[arg(
        long = "proto-path",
        env = "IDEMPROXY_PROTO_PATH",
        value_delimiter = ','
    )]
    pub proto_path: Vec<PathBuf>,
    /// Also learn the service's descriptors from its gRPC server reflection (v1, then
    /// v1alpha), waiting for it at start.
    #[arg(long, env = "IDEMPROXY_REFLECTION")]
    pub reflection: bool,
    /// How long to wait for the service's reflection at start [default: 60s].
    #[arg(long, env = "IDEMPROXY_REFLECTION_TIMEOUT")]
    pub reflection_timeout: Option<String>,
    /// Where records live: `sled` (embedded, one pod), `redis` (one Redis server shared by
    /// every replica) or `redis-cluster` [default: sled].
    #[arg(long, env = "IDEMPROXY_STORE")]
    pub store: Option<String>,
    /// `redis://[user@]host:port[/db]`; for `redis-cluster`, seed nodes separated by commas.
    #[arg(long, env = "IDEMPROXY_REDIS_URL")]
    pub redis_url: Option<String>,
    /// File holding the Redis password (kept out of the URL and the process list).
    #[arg(long, env = "IDEMPROXY_REDIS_PASSWORD_FILE")]
    pub redis_password_file: Option<PathBuf>,
    /// PEM file of the CA that `rediss://` servers are verified against [default: the
    /// system's roots].
    #[arg(long, env = "IDEMPROXY_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,
    /// The Redis password, from the environment only.
    #[arg(skip)]
    pub redis_password: Option<String>,
    /// Prefix of every Redis key this sidecar writes [default: idemproxy].
    #[arg(long, env = "IDEMPROXY_REDIS_KEY_PREFIX")]
    pub redis_key_prefix: Option<String>,
    /// How often a waiting duplicate re-reads a Redis record when no change message came
    /// [default: 100ms].
    #[arg(long, env = "IDEMPROXY_REDIS_POLL_INTERVAL")]
    pub redis_poll_interval: Option<String>,
}

/// The same settings in a TOML file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct FileSettings {
    listen: Option<String>,
    upstream: Option<String>,
    data_dir: Option<PathBuf>,
    key_header: Option<String>,
    caller_header: Option<String>,
    caller_source: Option<String>,
    require_caller: Option<bool>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    caller_subject_fallback: Option<bool>,
    encryption_key_file: Option<PathBuf>,
    max_records_per_caller: Option<Scalar>,
    http2_max_concurrent_streams: Option<Scalar>,
    http2_max_header_list_size: Option<Scalar>,
    http2_keepalive_interval: Option<String>,
    http2_keepalive_timeout: Option<String>,
    http2_idle_timeout: Option<String>,
    retention: Option<String>,
    max_in_flight_wait: Option<String>,
    default_lease: Option<String>,
    lease_margin: Option<String>,
    max_request_bytes: Option<Scalar>,
    max_response_bytes: Option<Scalar>,
    max_store_bytes: Option<Scalar>,
    sled_cache_bytes: Option<Scalar>,
    sled_pack_records: Option<Scalar>,
    store_timeout: Option<String>,
    sweep_interval: Option<String>,
    worker_threads: Option<Scalar>,
    flush: Option<String>,
    store: Option<String>,
    redis_url: Option<String>,
    redis_password_file: Option<PathBuf>,
    redis_ca_file: Option<PathBuf>,
    redis_key_prefix: Option<String>,
    redis_poll_interval: Option<String>,
    descriptor_set: Option<Vec<PathBuf>>,
    proto: Option<Vec<PathBuf>>,
    proto_path: Option<Vec<PathBuf>>,
    reflection: Option<bool>,
    reflection_timeout: Option<String>,
    admin_listen: Option<String>,
    admin_token_file: Option<PathBuf>,
    ops_listen: Option<String>,
    drain_timeout: Option<String>,
    /// Per-method rules, for protos that cannot be annotated: `[methods."/pkg.Svc/Method"]`.
    methods: Option<std::collections::BTreeMap<String, MethodSettings>>,
}

/// One method's rule in the config file; it wins over the method's annotations.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct MethodSettings {
    enabled: Option<bool>,
    mode: Option<String>,
    retention: Option<String>,
    in_flight: Option<String>,
    max_wait: Option<String>,
    in_doubt: Option<String>,
    require_key: Option<bool>,
    record_codes: Option<Vec<String>>,
    release_codes: Option<Vec<String>>,
    fail_open: Option<bool>,
}

/// A TOML value that may be written as a number or a string (`4194304` or `"4MiB"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Scalar {
    Number(u64),
    Text(String),
}

impl Scalar {
    fn into_text(self) -> String {
        match self {
            Scalar::Number(n) => n.to_string(),
            Scalar::Text(text) => text,
        }
    }
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
    /// A per-method rule of the config file that cannot be used.
    #[error("config file: {rule} = {value:?}: {reason}")]
    MethodRule {
        /// `methods."/pkg.Svc/Method".setting`.
        rule: String,
        /// What was given.
        value: String,
        /// Why it is refused.
        reason: String,
    },
    /// The config file cannot be read or parsed.
    #[error("config file {path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// How writes reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    pub tls: Option<TlsFiles>,
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
    /// The store's size bound.
    pub store_bytes_max: u64,
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
}

/// The files of the proxy listener's TLS.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA bundle of client certificates; `None`: none asked for.
    pub client_ca: Option<PathBuf>,
    /// A client certificate without a URI SAN is named by its subject CN.
    pub subject_fallback: bool,
}

/// What one client connection to the proxy may do (design: safe defaults, each a setting).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Http2Limits {
    /// Concurrent streams per connection.
    pub max_concurrent_streams: u32,
    /// Bytes of one header list.
    pub max_header_list_size: u32,
    /// Ping period of a connection; `None`: no pings.
    pub keepalive_interval: Option<Duration>,
    /// How long a ping may go unanswered.
    pub keepalive_timeout: Duration,
    /// A connection starting no call for this long is closed gracefully.
    pub idle_timeout: Duration,
}

impl Default for Http2Limits {
    fn default() -> Self {
        Http2Limits {
            max_concurrent_streams: 1024,
            max_header_list_size: 16 << 10,
            keepalive_interval: Some(Duration::from_secs(60)),
            keepalive_timeout: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(15 * 60),
        }
    }
}

/// The longest retention accepted: a year.
const RETENTION_MAX: Duration = Duration::from_secs(366 * 24 * 3600);
/// Request and response limits stay below what one record can hold comfortably.
const MESSAGE_BYTES_LIMIT: u64 = 64 << 20;

fn invalid(setting: &'static str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        setting,
        value: value.to_owned(),
        reason: reason.into(),
    }
}

fn duration(
    setting: &'static str,
    value: &str,
    min: Duration,
    max: Duration,
) -> Result<Duration, ConfigError> {
    let parsed = humantime::parse_duration(value).map_err(|error| {
        invalid(
            setting,
            value,
            format!("{error} (write e.g. 500ms, 10s, 24h)"),
        )
    })?;
    if parsed < min || parsed > max {
        return Err(invalid(
            setting,
            value,
            format!(
                "must be between {} and {}",
                humantime::format_duration(min),
                humantime::format_duration(max)
            ),
        ));
    }
    Ok(parsed)
}

/// A whole number from `min` to `max`.
fn count(setting: &'static str, value: &str, min: u64, max: u64) -> Result<u64, ConfigError> {
    match value.parse::<u64>() {
        Ok(number) if (min..=max).contains(&number) => Ok(number),
        _ => Err(invalid(
            setting,
            value,
            format!("must be a whole number from {min} to {max}"),
        )),
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

fn bytes(setting: &'static str, value: &str, min: u64, max: u64) -> Result<u64, ConfigError> {
    let parsed = parse_bytes(value).ok_or_else(|| {
        invalid(
            setting,
            value,
            "not a size (write e.g. 4194304, 512KiB, 4MiB, 1GiB)",
        )
    })?;
    if parsed < min || parsed > max {
        return Err(invalid(
            setting,
            value,
            format!("must be between {min} and {max} bytes"),
        ));
    }
    Ok(parsed)
}

fn header(setting: &'static str, value: &str) -> Result<HeaderName, ConfigError> {
    let name = HeaderName::from_bytes(value.as_bytes())
        .map_err(|_| invalid(setting, value, "not a valid HTTP header name"))?;
    if name.as_str() != value || value.starts_with(':') || value.starts_with("grpc-") {
        return Err(invalid(
            setting,
            value,
            "must be a lowercase header name that is not reserved by HTTP/2 or gRPC",
        ));
    }
    Ok(name)
}

/// Reads a config file.
pub fn read_file(path: &Path) -> Result<FileSettings, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::File {
        path: path.to_owned(),
        reason: error.to_string(),
    })?;
    parse_file(&text).map_err(|reason| ConfigError::File {
        path: path.to_owned(),
        reason,
    })
}

/// Parses a config file's text; the error says what is wrong and where.
pub fn parse_file(text: &str) -> Result<FileSettings, String> {
    toml::from_str(text).map_err(|error| error.to_string())
}

/// Lays flags and environment (`args`) over the file over the defaults, and validates.
pub fn resolve(args: RunArgs, file: FileSettings) -> Result<Config, ConfigError> {
    let pick = |flag: Option<String>, file: Option<String>, default: &str| {
        flag.or(file).unwrap_or_else(|| default.to_owned())
    };
    let pick_bytes = |flag: Option<String>, file: Option<Scalar>, default: &str| {
        flag.or(file.map(Scalar::into_text))
            .unwrap_or_else(|| default.to_owned())
    };
    let listen_text = pick(args.listen, file.listen, "0.0.0.0:16000");
    let listen = listen_text.parse().map_err(|_| {
        invalid(
            "listen",
            &listen_text,
            "not an address (write e.g. 0.0.0.0:16000)",
        )
    })?;
    let upstream = args
        .upstream
        .or(file.upstream)
        .ok_or(ConfigError::Missing("upstream", "UPSTREAM"))?;
    crate::proxy::upstream::HttpUpstream::new(&upstream, 0)
        .map_err(|error| invalid("upstream", &upstream, error.to_string()))?;
    let data_dir = args
        .data_dir
        .or(file.data_dir)
        .unwrap_or_else(|| PathBuf::from("/var/lib/idemproxy"));
    let key_header = header(
        "key-header",
        &pick(args.key_header, file.key_header, "idempotency-key"),
    )?;
    let caller_header = args.caller_header.or(file.caller_header);
    let source = match (args.caller_source.or(file.caller_source), caller_header) {
        (Some(source), None) => {
            let parsed = CallerSource::parse(&source)
                .map_err(|reason| invalid("caller-source", &source, reason))?;
            if let CallerSource::Header(name) = &parsed {
                header("caller-source", name.as_str())?;
            }
            parsed
        }
        (None, header_name) => CallerSource::Header(header(
            "caller-header",
            header_name.as_deref().unwrap_or("x-caller-id"),
        )?),
        (Some(source), Some(_)) => {
            return Err(invalid(
                "caller-source",
                &source,
                "give either --caller-source or --caller-header, not both",
            ))
        }
    };
    if source == CallerSource::Header(key_header.clone()) {
        return Err(invalid(
            "caller-header",
            key_header.as_str(),
            "must differ from --key-header",
        ));
    }
    let callers = Callers {
        source,
        require: args.require_caller || file.require_caller == Some(true),
    };
    let tls = tls_files(
        args.tls_cert.or(file.tls_cert),
        args.tls_key.or(file.tls_key),
        args.client_ca.or(file.client_ca),
        args.caller_subject_fallback || file.caller_subject_fallback == Some(true),
    )?;
    if callers.source == CallerSource::Mtls
        && tls.as_ref().is_none_or(|tls| tls.client_ca.is_none())
    {
        return Err(invalid(
            "caller-source",
            "mtls",
            "needs --tls-cert, --tls-key and --client-ca: the caller comes from a client certificate this listener verifies",
        ));
    }
    let encryption_key_file = args.encryption_key_file.or(file.encryption_key_file);
    let http2 = {
        let defaults = Http2Limits::default();
        let streams = args
            .http2_max_concurrent_streams
            .or(file.http2_max_concurrent_streams.map(Scalar::into_text));
        let header_list = args
            .http2_max_header_list_size
            .or(file.http2_max_header_list_size.map(Scalar::into_text));
        let interval = pick(
            args.http2_keepalive_interval,
            file.http2_keepalive_interval,
            "60s",
        );
        Http2Limits {
            max_concurrent_streams: match streams {
                None => defaults.max_concurrent_streams,
                Some(text) => count("http2-max-concurrent-streams", &text, 1, 1 << 20)? as u32,
            },
            max_header_list_size: match header_list {
                None => defaults.max_header_list_size,
                Some(text) => {
                    let bytes = parse_bytes(&text).ok_or_else(|| {
                        invalid(
                            "http2-max-header-list-size",
                            &text,
                            "not a size (write e.g. 16KiB)",
                        )
                    })?;
                    if !(1024..=16 << 20).contains(&bytes) {
                        return Err(invalid(
                            "http2-max-header-list-size",
                            &text,
                            "must be between 1KiB and 16MiB",
                        ));
                    }
                    bytes as u32
                }
            },
            keepalive_interval: Some(duration(
                "http2-keepalive-interval",
                &interval,
                Duration::ZERO,
                Duration::from_secs(24 * 3600),
            )?)
            .filter(|interval| !interval.is_zero()),
            keepalive_timeout: duration(
                "http2-keepalive-timeout",
                &pick(
                    args.http2_keepalive_timeout,
                    file.http2_keepalive_timeout,
                    "20s",
                ),
                Duration::from_millis(100),
                Duration::from_secs(3600),
            )?,
            idle_timeout: duration(
                "http2-idle-timeout",
                &pick(args.http2_idle_timeout, file.http2_idle_timeout, "15m"),
                Duration::from_millis(100),
                Duration::from_secs(7 * 24 * 3600),
            )?,
        }
    };
    let records_per_caller_max = match args
        .max_records_per_caller
        .or(file.max_records_per_caller.map(Scalar::into_text))
    {
        None => None,
        Some(text) => Some(count("max-records-per-caller", &text, 1, u64::MAX)?),
    };
    let ms = Duration::from_millis;
    let limits = Limits {
        retention: duration(
            "retention",
            &pick(args.retention, file.retention, "24h"),
            ms(1),
            RETENTION_MAX,
        )?,
        in_flight_wait_max: duration(
            "max-in-flight-wait",
            &pick(args.max_in_flight_wait, file.max_in_flight_wait, "10s"),
            ms(0),
            Duration::from_secs(3600),
        )?,
        lease_default: duration(
            "default-lease",
            &pick(args.default_lease, file.default_lease, "30s"),
            ms(1),
            Duration::from_secs(24 * 3600),
        )?,
        lease_margin: duration(
            "lease-margin",
            &pick(args.lease_margin, file.lease_margin, "5s"),
            ms(0),
            Duration::from_secs(3600),
        )?,
        records_per_caller_max,
    };
    let request_bytes_max = bytes(
        "max-request-bytes",
        &pick_bytes(args.max_request_bytes, file.max_request_bytes, "4MiB"),
        5,
        MESSAGE_BYTES_LIMIT,
    )? as usize;
    let response_bytes_max = bytes(
        "max-response-bytes",
        &pick_bytes(args.max_response_bytes, file.max_response_bytes, "4MiB"),
        0,
        MESSAGE_BYTES_LIMIT,
    )? as usize;
    let store_bytes_max = bytes(
        "max-store-bytes",
        &pick_bytes(args.max_store_bytes, file.max_store_bytes, "1GiB"),
        1 << 10,
        u64::MAX,
    )?;
    let sled_cache_bytes = bytes(
        "sled-cache-bytes",
        &pick_bytes(args.sled_cache_bytes, file.sled_cache_bytes, "8MiB"),
        1 << 20,
        64 << 30,
    )?;
    let pack_text = pick_bytes(args.sled_pack_records, file.sled_pack_records, "8192");
    let sled_pack_records = count("sled-pack-records", &pack_text, 1, 1 << 40)?;
    let store_timeout = duration(
        "store-timeout",
        &pick(args.store_timeout, file.store_timeout, "5s"),
        ms(10),
        Duration::from_secs(600),
    )?;
    let sweep_interval = duration(
        "sweep-interval",
        &pick(args.sweep_interval, file.sweep_interval, "1s"),
        ms(10),
        Duration::from_secs(3600),
    )?;
    let threads_text = pick_bytes(args.worker_threads, file.worker_threads, "1");
    let worker_threads = count("worker-threads", &threads_text, 1, 256)? as usize;
    let flush_text = pick(args.flush, file.flush, "group");
    let flush = match flush_text.as_str() {
        "group" => FlushMode::Group,
        "per-write" => FlushMode::PerWrite,
        _ => {
            return Err(invalid(
                "flush",
                &flush_text,
                "must be `group` or `per-write`",
            ))
        }
    };
    let store_settings = StoreSettings {
        store: args.store.or(file.store),
        redis_url: args.redis_url.or(file.redis_url),
        redis_password_file: args.redis_password_file.or(file.redis_password_file),
        redis_password: args.redis_password,
        redis_ca_file: args.redis_ca_file.or(file.redis_ca_file),
        redis_key_prefix: args.redis_key_prefix.or(file.redis_key_prefix),
        redis_poll_interval: args.redis_poll_interval.or(file.redis_poll_interval),
    };
    let mut store = store_choice(store_settings, store_timeout)?;
    if let StoreChoice::Redis(options) = &mut store {
        options.track_callers = limits.records_per_caller_max.is_some();
    }
    let ops_text = pick(args.ops_listen, file.ops_listen, "0.0.0.0:16090");
    let ops_listen: SocketAddr = ops_text.parse().map_err(|_| {
        invalid(
            "ops-listen",
            &ops_text,
            "not an address (write e.g. 0.0.0.0:16090)",
        )
    })?;
    let drain_timeout = duration(
        "drain-timeout",
        &pick(args.drain_timeout, file.drain_timeout, "25s"),
        ms(0),
        Duration::from_secs(3600),
    )?;
    let admin_text = pick(args.admin_listen, file.admin_listen, "127.0.0.1:16091");
    let admin_listen: SocketAddr = admin_text.parse().map_err(|_| {
        invalid(
            "admin-listen",
            &admin_text,
            "not an address (write e.g. 127.0.0.1:16091)",
        )
    })?;
    let admin_token = match (
        args.admin_token,
        args.admin_token_file.or(file.admin_token_file),
    ) {
        (Some(token), _) => Some(token),
        (None, Some(path)) => Some(
            std::fs::read_to_string(&path)
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
    if !admin_listen.ip().is_loopback() && admin_token.is_none() {
        return Err(invalid(
            "admin-listen",
            &admin_text,
            "a non-loopback admin address needs a token (--admin-token-file or IDEMPROXY_ADMIN_TOKEN): the admin API can forget and purge records",
        ));
    }
    let listed = |flag: Vec<PathBuf>, file: Option<Vec<PathBuf>>| {
        if flag.is_empty() {
            file.unwrap_or_default()
        } else {
            flag
        }
    };
    let descriptors = crate::policy::descriptors::Sources {
        descriptor_sets: listed(args.descriptor_set, file.descriptor_set),
        protos: listed(args.proto, file.proto),
        proto_paths: listed(args.proto_path, file.proto_path),
        reflection: args.reflection || file.reflection == Some(true),
        reflection_timeout: duration(
            "reflection-timeout",
            &pick(args.reflection_timeout, file.reflection_timeout, "60s"),
            ms(100),
            Duration::from_secs(3600),
        )?,
    };
    Ok(Config {
        listen,
        upstream,
        data_dir,
        key_header,
        callers,
        tls,
        encryption_key_file,
        http2,
        limits,
        request_bytes_max,
        response_bytes_max,
        store_bytes_max,
        sled_cache_bytes,
        sled_pack_records,
        store_timeout,
        sweep_interval,
        worker_threads,
        flush,
        store,
        descriptors,
        method_rules: method_rules(file.methods.unwrap_or_default())?,
        ops_listen,
        drain_timeout,
        admin_listen,
        admin_token,
    })
}

/// The proxy listener's TLS files: a certificate and key go together; a client CA needs them.
fn tls_files(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    subject_fallback: bool,
) -> Result<Option<TlsFiles>, ConfigError> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(TlsFiles {
            cert,
            key,
            client_ca,
            subject_fallback,
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

fn method_rules(
    methods: std::collections::BTreeMap<String, MethodSettings>,
) -> Result<crate::policy::Overrides, ConfigError> {
    use crate::pb::idemproxy::v1::method_policy::{InDoubt, InFlight, Mode};
    let mut rules = crate::policy::Overrides::new();
    for (path, settings) in methods {
        let bad = |what: &str, value: &str, reason: &str| ConfigError::MethodRule {
            rule: format!(
                "methods.\"{path}\"{}{what}",
                if what.is_empty() { "" } else { "." }
            ),
            value: value.to_owned(),
            reason: reason.to_owned(),
        };
        if !path.starts_with('/') || path[1..].split('/').count() != 2 {
            return Err(bad(
                "",
                &path,
                "a method is written /package.Service/Method",
            ));
        }
        let choice = |what: &str, value: &Option<String>, options: &[(&str, i32)]| match value {
            None => Ok(0),
            Some(text) => options
                .iter()
                .find(|(name, _)| name == text)
                .map(|(_, number)| *number)
                .ok_or_else(|| {
                    let names: Vec<&str> = options.iter().map(|(name, _)| *name).collect();
                    bad(what, text, &format!("must be one of {}", names.join(", ")))
                }),
        };
        let span = |what: &str,
                    value: &Option<String>|
         -> Result<Option<prost_types::Duration>, ConfigError> {
            let Some(text) = value else { return Ok(None) };
            let parsed = humantime::parse_duration(text)
                .map_err(|error| bad(what, text, &error.to_string()))?;
            if parsed.is_zero() || parsed > RETENTION_MAX {
                return Err(bad(what, text, "must be more than zero and at most a year"));
            }
            Ok(Some(prost_types::Duration {
                seconds: parsed.as_secs() as i64,
                nanos: parsed.subsec_nanos() as i32,
            }))
        };
        for (what, names) in [
            ("record-codes", &settings.record_codes),
            ("release-codes", &settings.release_codes),
        ] {
            for name in names.iter().flatten() {
                if crate::status::code_by_name(name).is_none() {
                    return Err(bad(
                        what,
                        name,
                        "not a gRPC status code name (write e.g. NOT_FOUND)",
                    ));
                }
            }
        }
        let policy = crate::pb::idemproxy::v1::MethodPolicy {
            enabled: settings.enabled,
            mode: choice(
                "mode",
                &settings.mode,
                &[
                    ("replay", Mode::Replay as i32),
                    ("reject", Mode::Reject as i32),
                ],
            )?,
            retention: span("retention", &settings.retention)?,
            in_flight: choice(
                "in-flight",
                &settings.in_flight,
                &[
                    ("wait", InFlight::Wait as i32),
                    ("reject", InFlight::Reject as i32),
                ],
            )?,
            max_wait: span("max-wait", &settings.max_wait)?,
            in_doubt: choice(
                "in-doubt",
                &settings.in_doubt,
                &[
                    ("reject", InDoubt::Reject as i32),
                    ("retry", InDoubt::Retry as i32),
                ],
            )?,
            require_key: settings.require_key,
            record_codes: settings.record_codes.unwrap_or_default(),
            release_codes: settings.release_codes.unwrap_or_default(),
            fail_open: settings.fail_open,
        };
        rules.insert(path, policy);
    }
    Ok(rules)
}

/// The store settings of the flags (over the file), before validation.
struct StoreSettings {
    store: Option<String>,
    redis_url: Option<String>,
    redis_password_file: Option<PathBuf>,
    redis_password: Option<String>,
    redis_ca_file: Option<PathBuf>,
    redis_key_prefix: Option<String>,
    redis_poll_interval: Option<String>,
}

fn store_choice(
    settings: StoreSettings,
    store_timeout: Duration,
) -> Result<StoreChoice, ConfigError> {
    let kind = settings.store.unwrap_or_else(|| "sled".to_owned());
    let cluster = match kind.as_str() {
        "sled" => return Ok(StoreChoice::Sled),
        "redis" => false,
        "redis-cluster" => true,
        _ => {
            return Err(invalid(
                "store",
                &kind,
                "must be `sled`, `redis` or `redis-cluster`",
            ))
        }
    };
    let url_text = settings
        .redis_url
        .ok_or(ConfigError::Missing("redis-url", "REDIS_URL"))?;
    let urls: Vec<String> = url_text
        .split(',')
        .map(|url| url.trim().to_owned())
        .filter(|url| !url.is_empty())
        .collect();
    if urls.is_empty() || (!cluster && urls.len() > 1) {
        return Err(invalid(
            "redis-url",
            &url_text,
            "give one URL for `redis`, one or more seed nodes separated by commas for `redis-cluster`",
        ));
    }
    let password = match (settings.redis_password, settings.redis_password_file) {
        (Some(password), _) => Some(password),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(&path).map_err(|error| {
                invalid(
                    "redis-password-file",
                    &path.display().to_string(),
                    error.to_string(),
                )
            })?;
            Some(text.trim_end_matches(['\r', '\n']).to_owned())
        }
        (None, None) => None,
    };
    let ca_pem = match settings.redis_ca_file {
        Some(path) => Some(std::fs::read(&path).map_err(|error| {
            invalid(
                "redis-ca-file",
                &path.display().to_string(),
                error.to_string(),
            )
        })?),
        None => None,
    };
    let key_prefix = settings
        .redis_key_prefix
        .unwrap_or_else(|| "idemproxy".to_owned());
    if key_prefix.is_empty()
        || key_prefix.len() > 64
        || !key_prefix
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'{' && b != b'}')
    {
        return Err(invalid(
            "redis-key-prefix",
            &key_prefix,
            "must be 1-64 visible ASCII characters without braces",
        ));
    }
    let poll_interval = duration(
        "redis-poll-interval",
        settings.redis_poll_interval.as_deref().unwrap_or("100ms"),
        Duration::from_millis(1),
        Duration::from_secs(10),
    )?;
    let options = crate::store::redis::RedisOptions {
        urls,
        cluster,
        password,
        ca_pem,
        key_prefix,
        command_timeout: store_timeout,
        poll_interval,
        track_callers: false,
    };
    // Parse the URLs now, so a typo stops the start with the setting's name.
    for url in &options.urls {
        redis::IntoConnectionInfo::into_connection_info(url.as_str())
            .map_err(|error| invalid("redis-url", url, error.to_string()))?;
    }
    Ok(StoreChoice::Redis(options))
}

/// Reads the file named by `args.config` (if any) and resolves.
pub fn load(args: RunArgs) -> Result<Config, ConfigError> {
    let (args, file) = gather(args)?;
    resolve(args, file)
}

/// The flags with the secrets that come only from the environment, and the config file.
fn gather(mut args: RunArgs) -> Result<(RunArgs, FileSettings), ConfigError> {
    // Only from the environment: a password flag would show in the process list.
    if args.redis_password.is_none() {
        args.redis_password = std::env::var("IDEMPROXY_REDIS_PASSWORD").ok();
    }
    if args.admin_token.is_none() {
        args.admin_token = std::env::var("IDEMPROXY_ADMIN_TOKEN").ok();
    }
    let file = match &args.config {
        Some(path) => read_file(path)?,
        None => FileSettings::default(),
    };
    Ok((args, file))
}

/// The upstream `check` resolves with when none is given: `check` never calls the service
/// unless `--reflection` asks it to, and then an upstream is required.
const CHECK_WITHOUT_UPSTREAM: &str = "http://127.0.0.1:16000";

/// `idemproxy check`'s settings: as `load`, but only `--reflection` needs `--upstream`, so a CI
/// job that lints annotated protos needs no service address.
pub fn load_for_check(args: RunArgs) -> Result<Config, ConfigError> {
    let (mut args, file) = gather(args)?;
    let no_upstream = args.upstream.is_none() && file.upstream.is_none();
    if no_upstream {
        args.upstream = Some(CHECK_WITHOUT_UPSTREAM.to_owned());
    }
    let config = resolve(args, file)?;
    if no_upstream && config.descriptors.reflection {
        return Err(ConfigError::Invalid {
            setting: "reflection",
            value: "true".into(),
            reason: "server reflection is asked from the service: give --upstream too".into(),
        });
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> RunArgs {
        RunArgs {
            upstream: Some("http://127.0.0.1:50051".into()),
            ..RunArgs::default()
        }
    }

    fn error_text(result: Result<Config, ConfigError>) -> String {
        result.expect_err("the setting must be refused").to_string()
    }

    #[test]
    fn defaults_follow_the_design() {
        let config = resolve(args(), FileSettings::default()).expect("defaults are valid");
        assert_eq!(config.listen.to_string(), "0.0.0.0:16000");
        assert_eq!(config.key_header.as_str(), "idempotency-key");
        assert_eq!(
            config.callers.source,
            CallerSource::Header(HeaderName::from_static("x-caller-id"))
        );
        assert!(!config.callers.require);
        assert_eq!(config.http2, Http2Limits::default());
        assert_eq!(config.limits.retention, Duration::from_secs(86_400));
        assert_eq!(config.request_bytes_max, 4 << 20);
        assert_eq!(config.flush, FlushMode::Group);
    }

    #[test]
    fn security_settings_are_checked_together() {
        let mut both = args();
        both.caller_source = Some("xfcc".into());
        both.caller_header = Some("x-caller".into());
        assert!(error_text(resolve(both, FileSettings::default())).contains("not both"));
        let mut mtls = args();
        mtls.caller_source = Some("mtls".into());
        assert!(error_text(resolve(mtls, FileSettings::default())).contains("--client-ca"));
        let mut clash = args();
        clash.caller_source = Some("header:idempotency-key".into());
        assert!(error_text(resolve(clash, FileSettings::default())).contains("--key-header"));
        let mut half = args();
        half.tls_cert = Some("/tls.crt".into());
        assert!(error_text(resolve(half, FileSettings::default())).contains("--tls-key"));
        let mut ca_only = args();
        ca_only.client_ca = Some("/ca.crt".into());
        assert!(error_text(resolve(ca_only, FileSettings::default())).contains("--client-ca"));
        for (setting, value) in [
            ("--http2-max-concurrent-streams", "0"),
            ("--http2-max-header-list-size", "10"),
            ("--http2-idle-timeout", "1ms"),
            ("--max-records-per-caller", "-1"),
        ] {
            let mut bad = args();
            match setting {
                "--http2-max-concurrent-streams" => {
                    bad.http2_max_concurrent_streams = Some(value.into())
                }
                "--http2-max-header-list-size" => {
                    bad.http2_max_header_list_size = Some(value.into())
                }
                "--http2-idle-timeout" => bad.http2_idle_timeout = Some(value.into()),
                _ => bad.max_records_per_caller = Some(value.into()),
            }
            let text = error_text(resolve(bad, FileSettings::default()));
            assert!(text.contains(setting), "{setting}: {text}");
        }
        let file = parse_file(
            "caller-source = \"xfcc\"\nrequire-caller = true\nmax-records-per-caller = 10\nhttp2-keepalive-interval = \"0s\"",
        )
        .expect("valid TOML");
        let config = resolve(args(), file).expect("valid");
        assert_eq!(config.callers.source, CallerSource::Xfcc);
        assert!(config.callers.require);
        assert_eq!(config.limits.records_per_caller_max, Some(10));
        assert_eq!(config.http2.keepalive_interval, None);
    }

    #[test]
    fn flags_win_over_file() {
        let file: FileSettings = toml::from_str(
            "retention = \"1h\"\nmax-request-bytes = 1024\nkey-header = \"x-request-id\"",
        )
        .expect("valid TOML");
        let mut flags = args();
        flags.retention = Some("2h".into());
        let config = resolve(flags, file).expect("valid");
        assert_eq!(config.limits.retention, Duration::from_secs(7_200));
        assert_eq!(config.request_bytes_max, 1024);
        assert_eq!(config.key_header.as_str(), "x-request-id");
    }

    #[test]
    fn bad_settings_are_named() {
        let mut bad = args();
        bad.retention = Some("soon".into());
        assert!(error_text(resolve(bad, FileSettings::default())).contains("--retention"));
        let mut bad = args();
        bad.key_header = Some("Bad Header".into());
        assert!(error_text(resolve(bad, FileSettings::default())).contains("--key-header"));
        let mut bad = args();
        bad.upstream = Some("https://svc:443".into());
        assert!(error_text(resolve(bad, FileSettings::default())).contains("--upstream"));
        let mut bad = args();
        bad.max_request_bytes = Some("4 parsecs".into());
        assert!(error_text(resolve(bad, FileSettings::default())).contains("--max-request-bytes"));
        assert!(
            error_text(resolve(RunArgs::default(), FileSettings::default()))
                .contains("--upstream is required")
        );
        let unknown = toml::from_str::<FileSettings>("retension = \"1h\"");
        assert!(unknown
            .expect_err("unknown keys are refused")
            .to_string()
            .contains("retension"));
    }

    #[test]
    fn redis_settings_are_checked_before_start() {
        let redis = |store: &str, url: Option<&str>| {
            let mut flags = args();
            flags.store = Some(store.into());
            flags.redis_url = url.map(str::to_owned);
            flags
        };
        let refused = |flags: RunArgs| error_text(resolve(flags, FileSettings::default()));
        assert!(refused(redis("redis", None)).contains("--redis-url is required"));
        assert!(refused(redis("memcached", None)).contains("--store"));
        assert!(refused(redis("redis", Some("redis://a:1,redis://b:2"))).contains("--redis-url"));
        assert!(refused(redis("redis", Some("http://a:1"))).contains("--redis-url"));
        let mut flags = redis("redis", Some("redis://127.0.0.1:6379"));
        flags.redis_key_prefix = Some("{tag}".into());
        assert!(refused(flags).contains("--redis-key-prefix"));
        let mut flags = redis("redis", Some("redis://127.0.0.1:6379"));
        flags.redis_password_file = Some("/nonexistent/password".into());
        assert!(refused(flags).contains("--redis-password-file"));

        let file: FileSettings = toml::from_str(
            "store = \"redis-cluster\"\nredis-url = \"redis://a:7000, redis://b:7001\"",
        )
        .expect("valid TOML");
        match resolve(args(), file).expect("valid").store {
            StoreChoice::Redis(options) => {
                assert!(options.cluster);
                assert_eq!(options.urls, ["redis://a:7000", "redis://b:7001"]);
                assert_eq!(options.key_prefix, "idemproxy");
            }
            StoreChoice::Sled => panic!("the file chose redis-cluster"),
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

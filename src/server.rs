//! Assembles a running sidecar from a `Config`: opens the store, starts the sweeper, binds
//! the proxy listener. Used by `idemproxy run` and by the demo, so both run the same parts.

use crate::caller::CallerSource;
use crate::config::{Config, FlushMode, StoreChoice};
use crate::engine::{CallPolicy, Engine, SystemClock, Tokens};
use crate::ops::{Health, Readiness};
use crate::policy::PolicyTable;
use crate::proxy::upstream::HttpUpstream;
use crate::proxy::{self, Proxy, ProxySettings};
use crate::seal::{Sealed, Sealer};
use crate::store::postgres::PostgresStore;
use crate::store::redis::{RedisStore, RedisUrlError};
use crate::store::sled::{SledOptions, SledStore};
use crate::store::{AnyStore, Store};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::timed::Timed;
use crate::telemetry::{Telemetry, TelemetryError};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The store cannot be opened; it is never wiped to make it open.
    #[error("cannot open the store in {dir}: {source}")]
    Store {
        /// The data dir.
        dir: String,
        /// What sled said.
        source: crate::store::StoreError,
    },
    /// The Redis settings cannot work.
    #[error(transparent)]
    Redis(#[from] RedisUrlError),
    /// The listener cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The service's descriptors or annotations cannot be used (`idemproxy check` lists all).
    #[error("the policy cannot be used:\n{}", list(.0))]
    Policy(Vec<crate::policy::PolicyError>),
    /// The drain ran out of time.
    #[error(transparent)]
    Drain(#[from] DrainTimedOut),
    /// The record encryption keys cannot be used.
    #[error(transparent)]
    KeyFile(#[from] crate::seal::KeyFileError),
    /// The proxy listener's TLS files cannot be used.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The upstream URL is unusable.
    #[error(transparent)]
    Upstream(#[from] proxy::upstream::UpstreamUrlError),
    /// The OpenTelemetry settings cannot work.
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
    /// The open-files limit cannot hold the connections allowed and the store's files.
    #[error("{0}")]
    OpenFiles(String),
}

fn list(errors: &[crate::policy::PolicyError]) -> String {
    let lines: Vec<String> = errors.iter().map(|error| format!("  {error}")).collect();
    lines.join("\n")
}

/// Fetches the service's reflection when the settings ask for it, then loads and resolves
/// the policy: what `run` and `check` both do.
pub async fn resolve_policy(config: &Config) -> Result<PolicyTable, StartError> {
    let reflected = if config.descriptors.reflection {
        let timeout = config.descriptors.reflection_timeout;
        let fetched = crate::policy::reflection::fetch(&config.upstream, timeout).await;
        Some(fetched.map_err(|error| StartError::Policy(vec![error]))?)
    } else {
        None
    };
    let loading = config.clone();
    tokio::task::spawn_blocking(move || load_policy(&loading, reflected.as_deref()))
        .await
        .expect("loading the policy does not panic")
}

/// Loads the descriptors the settings name (plus `reflected`, the service's reflection
/// answer) and resolves the per-method policy. Blocking (reads and compiles files).
pub fn load_policy(config: &Config, reflected: Option<&[u8]>) -> Result<PolicyTable, StartError> {
    let defaults = CallPolicy {
        mode: config.mode,
        ..CallPolicy::from_limits(&config.limits)
    };
    if config.descriptors.is_empty() {
        return PolicyTable::header_only(defaults, &config.method_rules)
            .map_err(StartError::Policy);
    }
    let pool = crate::policy::descriptors::load(&config.descriptors, reflected)
        .map_err(|error| StartError::Policy(vec![error]))?;
    PolicyTable::resolve(&pool, defaults, &config.method_rules).map_err(StartError::Policy)
}

/// `idemproxy check`: prints the resolved policy table, or every error; the exit code says
/// whether `run` would start.
pub async fn check(config: &Config) -> std::process::ExitCode {
    match resolve_policy(config).await {
        Ok(table) => {
            if config.descriptors.is_empty() {
                println!("no descriptors configured: calls carrying the key header are deduplicated as unary calls");
            }
            print!("{}", table.render());
            std::process::ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("idemproxy check: {error}");
            std::process::ExitCode::from(1)
        }
    }
}

/// The store as the engine and the admin API use it, its layers put together once by
/// `store_stack`, outermost first.
pub type Records = Sealed<Timed<Arc<AnyStore>>>;

/// The store stack over `store`:
/// - `Sealed` is outermost, so every transition (the engine's and an operator's alike) sees
///   records opened and its writes leave sealed, and nothing below it sees a response in the
///   clear;
/// - `Timed` times and traces what the store itself costs (`idemproxy.store.*`), not the
///   sealing's CPU, so a slow store shows as a slow store;
/// - the backend, shared with what only the server does with it (reconciling, gauges,
///   sweeps, health), which need neither layer.
fn store_stack(store: Arc<AnyStore>, sealer: Option<Arc<Sealer>>, metrics: Metrics) -> Records {
    Sealed::new(Timed::new(store, metrics), sealer)
}

/// The store the settings chose, opened.
async fn open_store(config: &Config) -> Result<AnyStore, StartError> {
    Ok(match &config.store {
        StoreChoice::Sled => AnyStore::Sled(open_sled(config).await?),
        StoreChoice::Redis(options) => {
            tracing::info!(
                nodes = options.urls.len(),
                cluster = options.cluster,
                "store on Redis"
            );
            AnyStore::Redis(RedisStore::new(options)?)
        }
        StoreChoice::Postgres(options) => {
            tracing::info!(
                hosts = options.config.get_hosts().len(),
                table = %options.table,
                "store on PostgreSQL"
            );
            let store = PostgresStore::new(options).map_err(|source| StartError::Store {
                dir: "PostgreSQL".into(),
                source,
            })?;
            AnyStore::Postgres(store)
        }
    })
}

/// The sealer of `--encryption-key-file`; `None`: records in the clear, said at start.
fn sealer(config: &Config) -> Result<Option<Arc<Sealer>>, StartError> {
    let Some(path) = &config.encryption_key_file else {
        tracing::warn!(
            "recorded responses are stored in the clear: set --encryption-key-file to seal them"
        );
        return Ok(None);
    };
    let sealer = Sealer::from_file(path)?;
    tracing::info!(
        key_id = sealer.sealing_key_id(),
        "recorded responses are sealed with AES-256-GCM"
    );
    Ok(Some(Arc::new(sealer)))
}

/// The in-doubt prober over the store stack, when some method declares a probe; a probe
/// carries the original caller in the caller header when that is the caller source.
fn prober(
    config: &Config,
    records: &Arc<Records>,
    upstream: &HttpUpstream,
    policy: &Arc<PolicyTable>,
    metrics: &Metrics,
) -> Option<Arc<crate::probe::Prober<Records>>> {
    let caller_header = match &config.callers.source {
        CallerSource::Header(name) => Some(name.clone()),
        _ => None,
    };
    let lookup = crate::probe::ServiceLookup::new(upstream.clone(), caller_header);
    crate::probe::Prober::new(
        records.clone(),
        lookup,
        policy.clone(),
        SystemClock::new(),
        metrics.clone(),
    )
    .map(Arc::new)
}

/// A started sidecar.
pub struct Sidecar {
    /// The address the proxy listens on (the real port when 0 was asked for).
    pub proxy_addr: SocketAddr,
    /// The store, for the demo and tests to inspect.
    pub store: Arc<AnyStore>,
    /// The address the admin API listens on.
    pub admin_addr: SocketAddr,
    /// The address health is served on.
    pub ops_addr: SocketAddr,
    /// What health reports.
    pub health: Health,
    engine: Arc<Engine<Records, HttpUpstream, SystemClock>>,
    stop: watch::Sender<bool>,
    ops_stop: watch::Sender<bool>,
    ops: JoinHandle<()>,
    tasks: Vec<JoinHandle<()>>,
}

/// How long `Sidecar::stop` lets calls finish.
const STOP_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// A drain that ran out of time.
#[derive(Debug, thiserror::Error)]
#[error("the drain deadline passed with {calls} forwarded call(s) still running; their records stay IN_FLIGHT and become IN_DOUBT, never re-run")]
pub struct DrainTimedOut {
    /// Forwarded calls still running at the deadline.
    pub calls: usize,
}

impl Sidecar {
    /// Stops: a drain of at most `STOP_DEADLINE` (tests and the demo).
    pub async fn stop(self) {
        if let Err(error) = self.drain(STOP_DEADLINE).await {
            tracing::warn!(%error, "stopped before every call finished");
        }
    }

    /// Graceful drain (SIGTERM): readiness turns NOT_SERVING, no new connection is taken,
    /// open connections get GOAWAY and finish their calls, every forwarded call records its
    /// outcome; all within `deadline`. Health keeps answering until the end.
    pub async fn drain(self, deadline: std::time::Duration) -> Result<(), DrainTimedOut> {
        self.health.set(Readiness::Draining).await;
        let _ = self.stop.send(true);
        let engine = self.engine.clone();
        let tasks = self.tasks;
        let finished = async move {
            for task in tasks {
                let _ = task.await;
            }
            engine.idle().await;
        };
        let outcome = tokio::time::timeout(deadline, finished).await;
        let _ = self.ops_stop.send(true);
        let _ = self.ops.await;
        match outcome {
            Ok(()) => Ok(()),
            Err(_) => Err(DrainTimedOut {
                calls: self.engine.running(),
            }),
        }
    }
}

/// The store backend's name, as telemetry labels it.
pub fn backend_name(config: &Config) -> &'static str {
    match &config.store {
        StoreChoice::Sled => "sled",
        StoreChoice::Redis(_) => "redis",
        StoreChoice::Postgres(_) => "postgres",
    }
}

/// The proxy listener's TLS and limits, and what the start log says of who may call.
fn listening(config: &Config) -> Result<proxy::Listening, StartError> {
    let source = config.callers.source.describe();
    match &config.callers.source {
        CallerSource::None => tracing::warn!(
            "caller source none: every call is filed under one caller, so any client can be answered with any other's recorded response; run this only for a single-tenant service"
        ),
        CallerSource::Header(name) => tracing::info!(
            caller_source = %source,
            require_caller = config.callers.require,
            "callers named by the {name} header: trusted only if a mesh or gateway in front sets it and strips it from outside requests"
        ),
        _ => tracing::info!(
            caller_source = %source,
            require_caller = config.callers.require,
            "caller source"
        ),
    }
    let tls = match &config.tls {
        None => None,
        Some(files) => Some(crate::tls::Reloading::start(
            files.clone(),
            crate::tls::RELOAD_POLL,
        )?),
    };
    // Client sockets must never take the descriptors the store needs (a failed store write
    // is sticky until a restart).
    let open_files = crate::fds::raise_limit();
    let connections_max =
        crate::fds::connections_max(config.http2.connections_max as u64, open_files)
            .map_err(StartError::OpenFiles)?;
    tracing::info!(open_files, connections_max, "file descriptors");
    let http2 = proxy::Http2Limits {
        connections_max: usize::try_from(connections_max).unwrap_or(usize::MAX),
        ..config.http2
    };
    Ok(proxy::Listening {
        http2,
        tls,
        subject_fallback: config.caller_subject_fallback,
    })
}

/// Opens the store and starts serving, with metrics for `/metrics` and no exporter.
pub async fn start(config: &Config) -> Result<Sidecar, StartError> {
    let telemetry = Telemetry::local(backend_name(config))?;
    start_with(config, Arc::new(telemetry)).await
}

/// Opens the store and starts serving, recording into `telemetry`.
pub async fn start_with(config: &Config, telemetry: Arc<Telemetry>) -> Result<Sidecar, StartError> {
    let policy = Arc::new(resolve_policy(config).await?);
    let metrics = telemetry.metrics.clone();
    metrics.know_methods(policy.methods().iter().map(|rule| rule.path.as_str()));
    let tokens = Tokens::for_this_process();
    let store = Arc::new(open_store(config).await?);
    telemetry.observe_store(store.clone());
    let dir = config.data_dir.display().to_string();
    reconcile_in_background(store.clone(), dir, tokens.incarnation());
    let upstream = HttpUpstream::new(&config.upstream, config.response_bytes_max)?;
    let records = Arc::new(store_stack(store.clone(), sealer(config)?, metrics.clone()));
    let engine = Engine::new(
        records.clone(),
        Arc::new(upstream.clone()),
        SystemClock::new(),
        tokens,
        config.limits.clone(),
    );
    let prober = prober(config, &records, &upstream, &policy, &metrics);
    let engine = engine.with_metrics(metrics.clone()).with_prober(
        prober
            .clone()
            .map(|p| p as Arc<dyn crate::engine::InDoubtProber>),
    );
    let engine = Arc::new(engine);
    let settings = ProxySettings {
        key_header: config.key_header.clone(),
        callers: config.callers.clone(),
        request_bytes_max: config.request_bytes_max,
        budget: proxy::budget::Budget::new(config.buffered_bytes_max),
        clock_skew_max: config.clock_skew_max,
    };
    let listening = listening(config)?;
    let admin_tls = match &config.admin_tls {
        None => None,
        Some(files) => Some(crate::tls::Reloading::start(
            files.clone(),
            crate::tls::RELOAD_POLL,
        )?),
    };
    let [(ops_listener, ops_addr), (admin_listener, admin_addr), (listener, proxy_addr)] =
        bind_all(config).await?;
    let (stop, stopped) = watch::channel(false);
    let (ops_stop, ops_stopped) = watch::channel(false);
    let health = Health::new();
    let ops = tokio::spawn(crate::ops::serve(
        ops_listener,
        health.clone(),
        telemetry.clone(),
        wait_for(ops_stopped),
    ));
    let proxy = Proxy::new(settings, engine.clone(), upstream, policy);
    let proxy = Arc::new(proxy.with_metrics(metrics.clone()));
    let serving = tokio::spawn(proxy::serve(
        listener,
        proxy,
        listening,
        wait_for(stopped.clone()),
    ));
    let admin = crate::admin::AdminService::new(records, store.backend(), config.limits.retention);
    let administering = tokio::spawn(crate::admin::serve(
        admin_listener,
        admin,
        (config.admin_token.clone(), admin_tls),
        wait_for(stopped.clone()),
    ));
    let watching = tokio::spawn(
        health
            .clone()
            .watch_store(store.clone(), wait_for(stopped.clone())),
    );
    let sweeping = tokio::spawn(sweep(
        store.clone(),
        config.sweep_interval,
        metrics,
        wait_for(stopped.clone()),
    ));
    let census = Arc::new(crate::store::census::Census::default());
    telemetry.observe_census(census.clone());
    let gauged = health.clone();
    telemetry.observe_health(move || {
        let ready = gauged.readiness() == crate::ops::Readiness::Ready;
        (ready, gauged.failed_for_good().is_some())
    });
    let counting = tokio::spawn(census.run(
        store.clone(),
        crate::store::census::pass_interval(config.sweep_interval),
        SystemClock::new(),
        wait_for(stopped.clone()),
    ));
    let mut tasks = vec![serving, sweeping, administering, watching, counting];
    if let Some(prober) = prober {
        // The walk that finds unknown outcomes to look up, a crash's included.
        tasks.push(tokio::spawn(
            prober.run(config.sweep_interval, wait_for(stopped)),
        ));
    }
    Ok(Sidecar {
        proxy_addr,
        store,
        admin_addr,
        ops_addr,
        health,
        engine,
        stop,
        ops_stop,
        ops,
        tasks,
    })
}

/// The ops, admin and proxy listeners, bound before anything serves, so a taken port stops
/// the start with its name; each address logged.
async fn bind_all(config: &Config) -> Result<[(TcpListener, SocketAddr); 3], StartError> {
    let (ops_listener, ops_addr) = bind(config.ops_listen).await?;
    let (admin_listener, admin_addr) = bind(config.admin_listen).await?;
    let (listener, proxy_addr) = bind(config.listen).await?;
    // The address is in the message, where the ready-line readers (tests, bench) find it in
    // either log format.
    tracing::info!("ops listening on {ops_addr}");
    tracing::info!(
        token = config.admin_token.is_some(),
        "admin listening on {admin_addr}"
    );
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    tracing::info!(upstream = %config.upstream, workers, "proxy listening on {proxy_addr}");
    Ok([
        (ops_listener, ops_addr),
        (admin_listener, admin_addr),
        (listener, proxy_addr),
    ])
}

async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), StartError> {
    let failed = |source| StartError::Listen { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(failed)?;
    let bound = listener.local_addr().map_err(failed)?;
    Ok((listener, bound))
}

/// Opens the sled store.
async fn open_sled(config: &Config) -> Result<SledStore, StartError> {
    let options = SledOptions {
        dir: config.data_dir.clone(),
        cache_bytes: config.sled_cache_bytes,
        bytes_max: config.store_bytes_max,
        evict_when_full: config.evict_when_full,
        flush_per_write: config.flush == FlushMode::PerWrite,
        flush_timeout: config.store_timeout,
        pack_records: config.sled_pack_records,
    };
    let opened = tokio::task::spawn_blocking(move || SledStore::open(&options))
        .await
        .expect("opening the store does not panic");
    opened.map_err(|source| StartError::Store {
        dir: config.data_dir.display().to_string(),
        source,
    })
}

/// Walks a sled store in the background: counts it and marks an earlier process's claims
/// IN_DOUBT for operators. Off the serving path: claims already treat those records as
/// IN_DOUBT, so serving need not wait for this walk.
fn reconcile_in_background(store: Arc<AnyStore>, dir: String, incarnation: [u8; 8]) {
    tokio::task::spawn_blocking(move || {
        let AnyStore::Sled(sled) = &*store else {
            return;
        };
        match sled.reconcile(&incarnation) {
            Ok(found) => tracing::info!(
                dir,
                records = found.records,
                in_doubt_from_previous_run = found.in_doubt,
                "store reconciled"
            ),
            Err(error) => tracing::error!(dir, %error, "store reconciliation failed"),
        }
    });
}

async fn wait_for(mut stopped: watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
}

/// Expires and evicts records every `interval`, off the runtime's threads.
async fn sweep<S: Store>(
    store: Arc<S>,
    interval: Duration,
    metrics: Metrics,
    stopped: impl std::future::Future<Output = ()>,
) {
    let clock = SystemClock::new();
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            () = &mut stopped => return,
            () = tokio::time::sleep(interval) => {}
        }
        let now_ms = crate::engine::Clock::now_ms(&clock);
        let round_store = store.clone();
        match tokio::task::spawn_blocking(move || round_store.maintain(now_ms)).await {
            Ok(Ok(done)) if done.expired > 0 || done.evicted > 0 => {
                metrics.swept(done.expired, done.evicted);
                tracing::info!(
                    expired = done.expired,
                    evicted = done.evicted,
                    "store maintenance"
                );
            }
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::warn!(%error, "store maintenance failed"),
            Err(error) => tracing::error!(%error, "store maintenance panicked"),
        }
    }
}

/// The longest the exit waits for the last spans and metrics to reach the collector.
const TELEMETRY_FLUSH_MAX: Duration = Duration::from_secs(3);

/// `idemproxy run`: serves until SIGTERM or SIGINT, then flushes what telemetry holds.
pub async fn run(config: Config, telemetry: Arc<Telemetry>) -> Result<(), StartError> {
    // Before the start logs that it listens: see `shutdown_signal`.
    let signalled = shutdown_signal();
    let running = start_with(&config, telemetry.clone()).await;
    let drained = match running {
        Ok(running) => serve_until_signal(&config, running, signalled).await,
        Err(error) => Err(error),
    };
    // The exporters' shutdown blocks until their last batch is sent: off the runtime
    // threads, and no longer than TELEMETRY_FLUSH_MAX, so a dead collector cannot hold the
    // exit past the pod's grace period (the records are already durable by now).
    let flushed = tokio::task::spawn_blocking(move || telemetry.shutdown());
    if tokio::time::timeout(TELEMETRY_FLUSH_MAX, flushed)
        .await
        .is_err()
    {
        tracing::warn!(limit = ?TELEMETRY_FLUSH_MAX, "telemetry not all exported at exit");
    }
    drained
}

async fn serve_until_signal(
    config: &Config,
    running: Sidecar,
    signalled: impl std::future::Future<Output = ()>,
) -> Result<(), StartError> {
    signalled.await;
    tracing::info!(deadline = ?config.drain_timeout, "draining");
    running.drain(config.drain_timeout).await?;
    tracing::info!("drained: every call finished and its outcome is stored");
    Ok(())
}

/// SIGTERM or SIGINT. The handlers are installed by this call, not when the future is first
/// polled: a caller takes it before it logs that it listens, so a signal sent as soon as the
/// process is seen serving drains it instead of killing it.
pub(crate) fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let streams = signal(SignalKind::terminate())
            .and_then(|terminate| Ok((terminate, signal(SignalKind::interrupt())?)));
        async move {
            match streams {
                Ok((mut terminate, mut interrupt)) => {
                    tokio::select! {
                        _ = terminate.recv() => {}
                        _ = interrupt.recv() => {}
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot listen for SIGTERM; stopping on SIGINT only");
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

//! `idemproxy-bench`: what the sidecar costs, as ratios measured in one run (issue "Performance").
//!
//! It starts the echo upstream, nginx (when installed) and the real sidecar binary as separate
//! processes, drives each variant with the same load generator, interleaved over several
//! rounds so drift on a noisy machine hits every variant alike, and writes the figures and the
//! targets to BENCHMARKS.md. It never asserts: a missed target is reported, not hidden.

use crate::cures::Cure;
use crate::h2load;
use crate::load::{self, KeyMode, LoadResult};
use crate::pb::echo_server::{Echo, EchoServer};
use crate::pb::EchoMessage;
use crate::postgres_server::{self, Replication};
use crate::procs::{self, Process};
use crate::redis_server::{Fsync, Redis};
use crate::sled_alone;
use anyhow::Context;
use clap::Args;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::time::Instant;

/// Flags of `idemproxy-bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Measured time per variant and round.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Unmeasured time before each measurement.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Rounds; each runs every variant once, in turn.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Request payload size.
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
    /// Calls in flight, comma-separated.
    #[arg(long, default_value = "1,32", value_delimiter = ',')]
    pub in_flight: Vec<usize>,
    /// Stored outcomes for the memory/disk run; 0 skips it.
    #[arg(long, default_value_t = 1_000_000)]
    pub records: u64,
    /// Where to write the report ("-": standard output only).
    #[arg(long, default_value = "BENCHMARKS.md")]
    pub output: String,
    /// The nginx binary; the nginx variant is skipped when it cannot be found.
    #[arg(long, default_value = "nginx")]
    pub nginx: String,
    /// The redis-server binary (redis-cli beside it, for the cluster); the Redis variants are
    /// skipped when it cannot be found.
    #[arg(long, default_value = "redis-server")]
    pub redis_server: String,
    /// The directory of PostgreSQL's `initdb` and `postgres` [default: the newest of
    /// /usr/lib/postgresql/*/bin]; the dedup-table variants are skipped when none is found.
    #[arg(long)]
    pub postgres: Option<PathBuf>,
    /// nghttp2's h2load, for P1 with a client that is not ours; skipped when not found.
    #[arg(long, default_value = "h2load")]
    pub h2load: String,
    /// Leaves every process on every core (by default the proxy measured gets a core of its
    /// own: see `procs::pin`).
    #[arg(long)]
    pub no_pin: bool,
    /// Runs only the variants whose name holds one of these, in any case (comma-separated:
    /// `--only postgres`, `--only "standby,nginx"`; "direct" is always run, as every ratio's
    /// reference; "h2load" runs the h2load paths). The default runs every variant.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
}

/// Flags of `idemproxy-bench load`.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// The address to load (a sidecar, nginx or the upstream).
    #[arg(long)]
    pub target: SocketAddr,
    /// `none`, `fresh` or `duplicate`.
    #[arg(long, default_value = "fresh")]
    pub mode: String,
    /// Calls in flight.
    #[arg(long, default_value_t = 32)]
    pub in_flight: usize,
    /// Measured time.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
}

/// `idemproxy-bench load`: one measured run, printed.
pub async fn run_load(args: LoadArgs) -> anyhow::Result<()> {
    let mode = match args.mode.as_str() {
        "none" => KeyMode::None,
        "fresh" => KeyMode::Fresh,
        "duplicate" => KeyMode::Duplicate,
        other => anyhow::bail!("--mode {other:?}: must be none, fresh or duplicate"),
    };
    let run_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let mut result = load::run(
        args.target,
        mode,
        args.in_flight,
        Duration::from_millis(500),
        args.duration,
        64,
        run_id,
    )
    .await?;
    result.finish();
    println!(
        "{:.0} calls/s, p50 {} µs, p90 {} µs, p99 {} µs, {} errors",
        result.throughput(),
        result.percentile_us(0.5),
        result.percentile_us(0.9),
        result.percentile_us(0.99),
        result.errors
    );
    Ok(())
}

/// The paths compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Variant {
    Direct,
    Nginx,
    Passthrough,
    Fresh,
    Duplicate,
    FreshPerWrite,
    /// The sidecar on one redis-server.
    RedisFresh(Fsync),
    RedisDuplicate(Fsync),
    /// The sidecar on three Redis Cluster masters.
    RedisClusterFresh,
    /// The sidecar on PostgreSQL (`--store postgres`).
    PostgresFresh(Replication),
    PostgresDuplicate(Replication),
    /// No sidecar: the service's own Redis flag (`cures.rs`).
    RedisFlagFresh(Fsync),
    RedisFlagDuplicate(Fsync),
    /// No sidecar: the service's own PostgreSQL dedup table (`cures.rs`).
    DedupTableFresh(Replication),
    DedupTableDuplicate(Replication),
}

/// What a variant's calls go through, besides the echo service.
enum Setup {
    Direct,
    Nginx,
    /// The sidecar with this `--flush`, on the sled store or on the store server the variant
    /// starts.
    Sidecar(&'static str),
    /// The service's own cure, on the store the variant starts.
    Cure,
}

/// The store server a variant starts for itself.
#[derive(Clone, Copy)]
enum Backing {
    None,
    Redis(Fsync),
    RedisCluster,
    Postgres(Replication),
}

impl Variant {
    const ALL: [Variant; 23] = [
        Variant::Direct,
        Variant::Nginx,
        Variant::Passthrough,
        Variant::Fresh,
        Variant::Duplicate,
        Variant::FreshPerWrite,
        Variant::RedisFresh(Fsync::Always),
        Variant::RedisDuplicate(Fsync::Always),
        Variant::RedisFresh(Fsync::Everysec),
        Variant::RedisDuplicate(Fsync::Everysec),
        Variant::RedisClusterFresh,
        Variant::PostgresFresh(Replication::Alone),
        Variant::PostgresDuplicate(Replication::Alone),
        Variant::RedisFlagFresh(Fsync::Always),
        Variant::RedisFlagDuplicate(Fsync::Always),
        Variant::RedisFlagFresh(Fsync::Everysec),
        Variant::RedisFlagDuplicate(Fsync::Everysec),
        Variant::DedupTableFresh(Replication::Alone),
        Variant::DedupTableDuplicate(Replication::Alone),
        Variant::PostgresFresh(Replication::SyncStandby),
        Variant::PostgresDuplicate(Replication::SyncStandby),
        Variant::DedupTableFresh(Replication::SyncStandby),
        Variant::DedupTableDuplicate(Replication::SyncStandby),
    ];

    fn name(self) -> &'static str {
        match self {
            Variant::Direct => "direct",
            Variant::Nginx => "nginx grpc_pass",
            Variant::Passthrough => "idemproxy passthrough",
            Variant::Fresh => "idemproxy fresh keys",
            Variant::Duplicate => "idemproxy duplicate hits",
            Variant::FreshPerWrite => "idemproxy fresh keys, flush per write",
            Variant::RedisFresh(Fsync::Always) => "idemproxy on Redis, fresh keys",
            Variant::RedisDuplicate(Fsync::Always) => "idemproxy on Redis, duplicate hits",
            Variant::RedisFresh(Fsync::Everysec) => {
                "idemproxy on Redis (fsync once a second), fresh keys"
            }
            Variant::RedisDuplicate(Fsync::Everysec) => {
                "idemproxy on Redis (fsync once a second), duplicate hits"
            }
            Variant::RedisClusterFresh => "idemproxy on Redis Cluster (3 masters), fresh keys",
            Variant::PostgresFresh(Replication::Alone) => "idemproxy on PostgreSQL, fresh keys",
            Variant::PostgresDuplicate(Replication::Alone) => {
                "idemproxy on PostgreSQL, duplicate hits"
            }
            Variant::PostgresFresh(Replication::SyncStandby) => {
                "idemproxy on PostgreSQL (synchronous standby), fresh keys"
            }
            Variant::PostgresDuplicate(Replication::SyncStandby) => {
                "idemproxy on PostgreSQL (synchronous standby), duplicate hits"
            }
            Variant::RedisFlagFresh(Fsync::Always) => "cure: Redis flag, fresh keys",
            Variant::RedisFlagDuplicate(Fsync::Always) => "cure: Redis flag, duplicate hits",
            Variant::RedisFlagFresh(Fsync::Everysec) => {
                "cure: Redis flag (fsync once a second), fresh keys"
            }
            Variant::RedisFlagDuplicate(Fsync::Everysec) => {
                "cure: Redis flag (fsync once a second), duplicate hits"
            }
            Variant::DedupTableFresh(Replication::Alone) => {
                "cure: PostgreSQL dedup table, fresh keys"
            }
            Variant::DedupTableDuplicate(Replication::Alone) => {
                "cure: PostgreSQL dedup table, duplicate hits"
            }
            Variant::DedupTableFresh(Replication::SyncStandby) => {
                "cure: PostgreSQL dedup table (synchronous standby), fresh keys"
            }
            Variant::DedupTableDuplicate(Replication::SyncStandby) => {
                "cure: PostgreSQL dedup table (synchronous standby), duplicate hits"
            }
        }
    }

    fn key_mode(self) -> KeyMode {
        match self {
            Variant::Fresh
            | Variant::FreshPerWrite
            | Variant::RedisFresh(_)
            | Variant::RedisClusterFresh
            | Variant::PostgresFresh(_)
            | Variant::RedisFlagFresh(_)
            | Variant::DedupTableFresh(_) => KeyMode::Fresh,
            Variant::Duplicate
            | Variant::RedisDuplicate(_)
            | Variant::PostgresDuplicate(_)
            | Variant::RedisFlagDuplicate(_)
            | Variant::DedupTableDuplicate(_) => KeyMode::Duplicate,
            Variant::Direct | Variant::Nginx | Variant::Passthrough => KeyMode::None,
        }
    }

    fn setup(self) -> Setup {
        match self {
            Variant::Direct => Setup::Direct,
            Variant::Nginx => Setup::Nginx,
            Variant::FreshPerWrite => Setup::Sidecar("per-write"),
            Variant::Passthrough
            | Variant::Fresh
            | Variant::Duplicate
            | Variant::RedisFresh(_)
            | Variant::RedisDuplicate(_)
            | Variant::RedisClusterFresh
            | Variant::PostgresFresh(_)
            | Variant::PostgresDuplicate(_) => Setup::Sidecar("group"),
            Variant::RedisFlagFresh(_)
            | Variant::RedisFlagDuplicate(_)
            | Variant::DedupTableFresh(_)
            | Variant::DedupTableDuplicate(_) => Setup::Cure,
        }
    }

    fn backing(self) -> Backing {
        match self {
            Variant::RedisFresh(fsync)
            | Variant::RedisDuplicate(fsync)
            | Variant::RedisFlagFresh(fsync)
            | Variant::RedisFlagDuplicate(fsync) => Backing::Redis(fsync),
            Variant::RedisClusterFresh => Backing::RedisCluster,
            Variant::PostgresFresh(replication)
            | Variant::PostgresDuplicate(replication)
            | Variant::DedupTableFresh(replication)
            | Variant::DedupTableDuplicate(replication) => Backing::Postgres(replication),
            _ => Backing::None,
        }
    }
}

/// The programs found for the variants that need them; a variant whose program is missing is
/// skipped.
struct Tools<'a> {
    /// The echo service every variant calls (the cures start their own).
    upstream: &'a Process,
    nginx: Option<&'a Process>,
    redis_server: Option<PathBuf>,
    postgres: Option<PathBuf>,
    h2load: Option<PathBuf>,
}

impl Tools<'_> {
    fn can_run(&self, variant: Variant) -> bool {
        match (variant.setup(), variant.backing()) {
            (Setup::Nginx, _) => self.nginx.is_some(),
            (_, Backing::Redis(_) | Backing::RedisCluster) => self.redis_server.is_some(),
            (_, Backing::Postgres(_)) => self.postgres.is_some(),
            _ => true,
        }
    }
}

/// A store server a variant started: its CPU is counted, and it is stopped after.
enum StoreServer {
    Redis(Redis),
    /// Boxed: a primary and a standby are large beside the other variants.
    Postgres(Box<postgres_server::Postgres>),
}

impl StoreServer {
    async fn start(backing: Backing, tools: &Tools<'_>) -> anyhow::Result<Option<StoreServer>> {
        let redis_server = || {
            tools
                .redis_server
                .as_deref()
                .context("redis-server is not installed")
        };
        Ok(match backing {
            Backing::None => None,
            Backing::Redis(fsync) => Some(StoreServer::Redis(
                Redis::single(redis_server()?, fsync).await?,
            )),
            Backing::RedisCluster => Some(StoreServer::Redis(
                Redis::cluster(redis_server()?, Fsync::Always).await?,
            )),
            Backing::Postgres(replication) => {
                let bin_dir = tools
                    .postgres
                    .as_deref()
                    .context("PostgreSQL is not installed")?;
                Some(StoreServer::Postgres(Box::new(
                    postgres_server::Postgres::start(bin_dir, replication).await?,
                )))
            }
        })
    }

    /// CPU seconds of the server's processes: every redis-server; every postmaster
    /// (primary and standby) with its children (backends, WAL writer and sender, the
    /// standby's startup process and WAL receiver).
    fn cpu_seconds(&self) -> f64 {
        let (pids, with_children) = match self {
            StoreServer::Redis(redis) => (redis.pids(), false),
            StoreServer::Postgres(postgres) => (postgres.pids(), true),
        };
        pids.iter()
            .map(|&pid| procs::cpu_seconds(pid, with_children))
            .sum()
    }

    /// The sidecar's flags for this store.
    fn sidecar_flags(&self, backing: Backing) -> Vec<String> {
        match (self, backing) {
            (StoreServer::Redis(redis), Backing::RedisCluster) => {
                vec![
                    "--store".into(),
                    "redis-cluster".into(),
                    "--redis-url".into(),
                    redis.url(),
                ]
            }
            (StoreServer::Redis(redis), _) => {
                vec![
                    "--store".into(),
                    "redis".into(),
                    "--redis-url".into(),
                    redis.url(),
                ]
            }
            // Loopback: no TLS to measure, as the cure's connections have none.
            (StoreServer::Postgres(postgres), _) => vec![
                "--store".into(),
                "postgres".into(),
                "--postgres-url".into(),
                format!("{} sslmode=disable", postgres.config()),
            ],
        }
    }

    /// The upstream's `--cure` for this store.
    fn cure(&self) -> String {
        match self {
            StoreServer::Redis(redis) => format!("redis-flag={}", redis.url()),
            StoreServer::Postgres(postgres) => format!("dedup-table={}", postgres.config()),
        }
    }

    async fn stop(self) {
        match self {
            StoreServer::Redis(redis) => drop(redis),
            StoreServer::Postgres(postgres) => postgres.stop().await,
        }
    }
}

/// One variant's figures at one concurrency, over all rounds.
#[derive(Default)]
struct Figures {
    load: LoadResult,
    /// The proxy's CPU (the sidecar, or nginx with its workers).
    cpu_seconds: f64,
    /// The echo service's CPU (with its cure, for the cures).
    service_cpu_seconds: f64,
    /// The store server's CPU: redis-servers, or PostgreSQL with its backends.
    store_cpu_seconds: f64,
    peak_rss_bytes: u64,
}

impl Figures {
    fn cpu_us_per_call(&self) -> Option<f64> {
        per_call(self.cpu_seconds, self.load.ok)
    }

    fn service_cpu_us_per_call(&self) -> Option<f64> {
        per_call(self.service_cpu_seconds, self.load.ok)
    }

    fn store_cpu_us_per_call(&self) -> Option<f64> {
        per_call(self.store_cpu_seconds, self.load.ok)
    }

    /// Every process's CPU per call: proxy, service and store server.
    fn total_cpu_us_per_call(&self) -> Option<f64> {
        per_call(
            self.cpu_seconds + self.service_cpu_seconds + self.store_cpu_seconds,
            self.load.ok,
        )
    }

    fn add(&mut self, measured: Figures) {
        self.load.merge(measured.load);
        self.cpu_seconds += measured.cpu_seconds;
        self.service_cpu_seconds += measured.service_cpu_seconds;
        self.store_cpu_seconds += measured.store_cpu_seconds;
        self.peak_rss_bytes = self.peak_rss_bytes.max(measured.peak_rss_bytes);
    }
}

fn per_call(cpu_seconds: f64, calls: u64) -> Option<f64> {
    (cpu_seconds > 0.0 && calls > 0).then(|| cpu_seconds * 1e6 / calls as f64)
}

/// The echo service, with the service's own cure around it when it has one.
struct EchoService {
    cure: Option<Cure>,
}

#[tonic::async_trait]
impl Echo for EchoService {
    async fn echo(
        &self,
        request: tonic::Request<EchoMessage>,
    ) -> Result<tonic::Response<EchoMessage>, tonic::Status> {
        let key = request
            .metadata()
            .get("idempotency-key")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let message = request.into_inner();
        let (Some(cure), Some(key)) = (&self.cure, key) else {
            return Ok(tonic::Response::new(message));
        };
        // The handler: the echo itself.
        let payload = cure.once(&key, async { message.payload }).await?;
        Ok(tonic::Response::new(EchoMessage { payload }))
    }
}

/// `idemproxy-bench upstream`: serves the echo service (with `cure`, see `cures.rs`) and
/// logs its address.
pub async fn serve_upstream(listen: SocketAddr, cure: Option<String>) -> anyhow::Result<()> {
    let cure = match cure {
        Some(spec) => Some(Cure::connect(&spec).await?),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(listen).await?;
    eprintln!("bench upstream listening addr={}", listener.local_addr()?);
    tonic::transport::Server::builder()
        .add_service(EchoServer::new(EchoService { cure }))
        .serve_with_incoming(incoming(listener))
        .await?;
    Ok(())
}

/// The echo service's connections, with Nagle's algorithm off as tonic's own `serve` sets it
/// (`serve_with_incoming` leaves the socket as it is given): with it on, an answer written
/// while the last one is unacknowledged waits for the client's delayed ACK, 40 ms.
fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// This binary, for the processes it starts of itself (upstream, sled alone).
fn exe() -> anyhow::Result<PathBuf> {
    std::env::current_exe().context("cannot find the idemproxy-bench binary")
}

/// The sidecar measured: the `idemproxy` binary of the same build, beside this one.
fn sidecar() -> anyhow::Result<PathBuf> {
    let path = exe()?.with_file_name("idemproxy");
    anyhow::ensure!(
        path.is_file(),
        "no idemproxy binary at {}: build both binaries of the workspace first (cargo build --release --workspace)",
        path.display()
    );
    Ok(path)
}

/// Starts the sidecar on the sled store in `dir`, with `extra` flags (another store).
async fn start_sidecar(
    upstream: SocketAddr,
    dir: &Path,
    flush: &str,
    extra: &[String],
) -> anyhow::Result<Process> {
    let mut args: Vec<String> = [
        "run",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &format!("http://{upstream}"),
        "--admin-listen",
        "127.0.0.1:0",
        "--ops-listen",
        "127.0.0.1:0",
        "--data-dir",
        &dir.display().to_string(),
        "--flush",
        flush,
        "--max-store-bytes",
        "8GiB",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend_from_slice(extra);
    procs::spawn_proxy_until(&sidecar()?, &args, "proxy listening on ").await
}

/// nginx as the benchmark runs it, with what it takes to stop it.
struct Nginx {
    process: Process,
    program: PathBuf,
    dir: PathBuf,
    config: PathBuf,
}

/// nginx run on the benchmark's prefix, logs and config, output discarded.
fn nginx_command(
    mut command: tokio::process::Command,
    dir: &Path,
    config: &Path,
) -> tokio::process::Command {
    command
        .arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    command
}

impl Nginx {
    /// `nginx -s stop`: the master ends its workers, then itself. A SIGKILL of the master
    /// alone leaves the workers running, holding the port and taking CPU from later runs.
    async fn stop(self) {
        let asked = nginx_command(
            tokio::process::Command::new(&self.program),
            &self.dir,
            &self.config,
        )
        .args(["-s", "stop"])
        .status()
        .await;
        let mut child = self.process.child;
        let stopped = match asked {
            Ok(status) if status.success() => {
                tokio::time::timeout(Duration::from_secs(5), child.wait())
                    .await
                    .is_ok()
            }
            _ => false,
        };
        if !stopped {
            eprintln!("nginx did not stop when asked: killing its master");
            let _ = child.kill().await;
        }
    }
}

async fn start_nginx(
    nginx: &str,
    upstream: SocketAddr,
    dir: &Path,
) -> anyhow::Result<Option<Nginx>> {
    let Some(program) = find_program(nginx) else {
        return Ok(None);
    };
    let listen = procs::free_port()?;
    let config = procs::nginx_config(dir, listen, upstream)?;
    let child = nginx_command(procs::proxy_command(&program), dir, &config)
        .args(["-g", "daemon off;"])
        .kill_on_drop(true)
        .spawn()?;
    let process = Process {
        child,
        addr: listen,
    };
    let nginx = Nginx {
        process,
        program,
        dir: dir.to_owned(),
        config,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(listen).await.is_err() {
        if Instant::now() >= deadline {
            nginx.stop().await;
            anyhow::bail!("nginx did not listen on {listen}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(Some(nginx))
}

fn find_program(name: &str) -> Option<PathBuf> {
    let candidate = Path::new(name);
    if candidate.components().count() > 1 {
        return candidate.exists().then(|| candidate.to_owned());
    }
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(name))
        .find(|path| path.exists())
}

/// Runs one variant at one concurrency once.
async fn measure(
    variant: Variant,
    in_flight: usize,
    args: &BenchArgs,
    tools: &Tools<'_>,
    run_id: u64,
) -> anyhow::Result<Figures> {
    let dir = tempfile::tempdir()?;
    let backing = variant.backing();
    let store = StoreServer::start(backing, tools).await?;
    let upstream_addr = tools.upstream.addr;
    let (sidecar, cure_service) = match variant.setup() {
        Setup::Direct | Setup::Nginx => (None, None),
        Setup::Sidecar(flush) => {
            let flags = store
                .as_ref()
                .map_or_else(Vec::new, |store| store.sidecar_flags(backing));
            let sidecar = start_sidecar(upstream_addr, dir.path(), flush, &flags).await?;
            (Some(sidecar), None)
        }
        Setup::Cure => {
            let store = store.as_ref().context("a cure needs its store")?;
            let service = procs::spawn_until(
                &exe()?,
                &["upstream".into(), "--cure".into(), store.cure()],
                "bench upstream listening addr=",
            )
            .await?;
            (None, Some(service))
        }
    };
    let service = cure_service.as_ref().unwrap_or(tools.upstream);
    let (target, proxy, with_children) = match (variant.setup(), &sidecar, tools.nginx) {
        (Setup::Direct, _, _) => (upstream_addr, None, false),
        (Setup::Cure, _, _) => (service.addr, None, false),
        (Setup::Nginx, _, Some(nginx)) => (nginx.addr, Some(nginx.pid()), true),
        (Setup::Nginx, _, None) => anyhow::bail!("nginx is not running"),
        (Setup::Sidecar(_), Some(sidecar), _) => (sidecar.addr, Some(sidecar.pid()), false),
        (Setup::Sidecar(_), None, _) => unreachable!("the sidecar was started above"),
    };
    let cpu = || {
        (
            proxy.map_or(0.0, |pid| procs::cpu_seconds(pid, with_children)),
            procs::cpu_seconds(service.pid(), false),
            store.as_ref().map_or(0.0, StoreServer::cpu_seconds),
        )
    };
    let warm_cpu = async {
        tokio::time::sleep(args.warmup).await;
        cpu()
    };
    let (load, before) = tokio::join!(
        load::run(
            target,
            variant.key_mode(),
            in_flight,
            args.warmup,
            args.duration,
            args.payload_bytes,
            run_id
        ),
        warm_cpu
    );
    let load = load?;
    let after = cpu();
    let peak_rss_bytes = proxy.map_or(0, |pid| procs::memory_bytes(pid, "VmHWM"));
    if let Some(sidecar) = sidecar {
        sidecar.stop().await;
    }
    if let Some(service) = cure_service {
        service.stop().await;
    }
    if let Some(store) = store {
        store.stop().await;
    }
    Ok(Figures {
        load,
        cpu_seconds: after.0 - before.0,
        service_cpu_seconds: after.1 - before.1,
        store_cpu_seconds: after.2 - before.2,
        peak_rss_bytes,
    })
}

/// What the million-record run found.
struct StoreFigures {
    records: u64,
    fill_seconds: f64,
    rss_bytes: u64,
    peak_rss_bytes: u64,
    disk_bytes: u64,
    logical_bytes: u64,
    restart_to_ready: Duration,
    records_after_restart: u64,
    /// sled alone with as many records (`sled_alone.rs`), in its own directory.
    baseline: sled_alone::SledAloneFigures,
    baseline_disk_bytes: u64,
    /// A new process's open of that directory, to its first read.
    baseline_reopen_seconds: f64,
}

/// Runs `idemproxy-bench sled-alone` on `dir`; what it printed.
async fn sled_alone(dir: &Path, records: u64) -> anyhow::Result<sled_alone::SledAloneFigures> {
    let output = tokio::process::Command::new(exe()?)
        .args(["sled-alone", "--records", &records.to_string(), "--dir"])
        .arg(dir)
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    sled_alone::SledAloneFigures::parse(&stdout).with_context(|| {
        format!(
            "sled-alone printed no figures: {stdout} {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

async fn fill(addr: SocketAddr, total: u64, payload_bytes: usize) -> anyhow::Result<()> {
    let channel = load::connect(addr).await?;
    let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let workers: Vec<_> = (0..64)
        .map(|_| {
            let mut client = crate::pb::echo_client::EchoClient::new(channel.clone());
            let next = next.clone();
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if n >= total {
                        return Ok::<_, anyhow::Error>(());
                    }
                    let mut request = tonic::Request::new(EchoMessage {
                        payload: vec![b'x'; payload_bytes],
                    });
                    request
                        .metadata_mut()
                        .insert("idempotency-key", format!("fill-{n}").parse()?);
                    client.echo(request).await?;
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await??;
    }
    Ok(())
}

/// How long the memory/disk run lets the sweeper run after the fill before it reads RSS again.
const SWEEPING_AFTER_FILL: Duration = Duration::from_secs(30);

async fn measure_store(
    records: u64,
    args: &BenchArgs,
    upstream: SocketAddr,
) -> anyhow::Result<StoreFigures> {
    let dir = tempfile::tempdir()?;
    let sidecar = start_sidecar(upstream, dir.path(), "group", &[]).await?;
    let started = Instant::now();
    fill(sidecar.addr, records, args.payload_bytes).await?;
    let fill_seconds = started.elapsed().as_secs_f64();
    let filled_rss_bytes = procs::memory_bytes(sidecar.pid(), "VmRSS");
    // The sweeper goes on walking (and packing) after the load: what it pulls into memory is
    // what a sidecar holds in its steady state, so RSS counts as the larger of the two.
    tokio::time::sleep(SWEEPING_AFTER_FILL).await;
    let rss_bytes = procs::memory_bytes(sidecar.pid(), "VmRSS").max(filled_rss_bytes);
    let peak_rss_bytes = procs::memory_bytes(sidecar.pid(), "VmHWM");
    sidecar.stop().await;
    let disk_bytes = procs::disk_bytes(dir.path());
    let restarted_at = Instant::now();
    let restarted = start_sidecar(upstream, dir.path(), "group", &[]).await?;
    let restart_to_ready = restarted_at.elapsed();
    restarted.stop().await;
    // What is stored, by the store's own count (a walk of every record).
    let options = idemproxy::store::sled::SledOptions {
        dir: dir.path().to_owned(),
        cache_bytes: 32 << 20,
        bytes_max: u64::MAX,
        evict_when_full: false,
        flush_per_write: false,
        flush_timeout: Duration::from_secs(30),
        // As the sidecar packed them.
        pack_records: idemproxy::config::RunSettings::default().sled_pack_records,
    };
    let counted = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let store = idemproxy::store::sled::SledStore::open(&options)?;
        let found = store.reconcile(&[0; 8])?;
        Ok((found.records, idemproxy::store::Store::usage(&store).bytes))
    })
    .await??;
    let baseline_dir = tempfile::tempdir()?;
    let baseline = sled_alone(baseline_dir.path(), records).await?;
    let baseline_disk_bytes = procs::disk_bytes(baseline_dir.path());
    let baseline_reopen_seconds = sled_alone(baseline_dir.path(), 0).await?.open_seconds;
    Ok(StoreFigures {
        baseline,
        baseline_disk_bytes,
        baseline_reopen_seconds,
        records,
        fill_seconds,
        rss_bytes,
        peak_rss_bytes,
        disk_bytes,
        logical_bytes: counted.1,
        restart_to_ready,
        records_after_restart: counted.0,
    })
}

/// The paths h2load measures, one stream at a time.
const H2LOAD_PATHS: [&str; 3] = ["direct", "nginx grpc_pass", "idemproxy passthrough"];

/// h2load's figures per path, one per round.
type H2loadRuns = BTreeMap<&'static str, Vec<h2load::H2loadFigures>>;

/// One h2load run of each path.
async fn measure_h2load(
    args: &BenchArgs,
    tools: &Tools<'_>,
    runs: &mut H2loadRuns,
) -> anyhow::Result<()> {
    let Some(program) = tools.h2load.as_deref() else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let request = h2load::write_request(dir.path(), args.payload_bytes)?;
    for path in H2LOAD_PATHS {
        let sidecar = match path {
            "idemproxy passthrough" => {
                Some(start_sidecar(tools.upstream.addr, dir.path(), "group", &[]).await?)
            }
            _ => None,
        };
        let target = match (path, &sidecar, tools.nginx) {
            (_, Some(sidecar), _) => sidecar.addr,
            ("nginx grpc_pass", _, Some(nginx)) => nginx.addr,
            ("nginx grpc_pass", _, None) => continue,
            _ => tools.upstream.addr,
        };
        let figures = h2load::run(program, target, &request, args.warmup, args.duration).await?;
        eprintln!(
            "h2load · {path:<40} mean {:>7.0} µs, {:>7.0} calls/s",
            figures.mean_us, figures.requests_per_second
        );
        runs.entry(path).or_default().push(figures);
        if let Some(sidecar) = sidecar {
            sidecar.stop().await;
        }
    }
    Ok(())
}

/// Every round of every variant at every concurrency, interleaved.
async fn measure_rounds(
    args: &BenchArgs,
    tools: &Tools<'_>,
    h2load_runs: &mut H2loadRuns,
) -> anyhow::Result<BTreeMap<(usize, Variant), Figures>> {
    let mut figures: BTreeMap<(usize, Variant), Figures> = BTreeMap::new();
    let mut run_id = 0;
    for round in 1..=args.rounds {
        if is_chosen(&args.only, "h2load") {
            measure_h2load(args, tools, h2load_runs).await?;
        }
        for &in_flight in &args.in_flight {
            for variant in Variant::ALL {
                let chosen = variant == Variant::Direct || is_chosen(&args.only, variant.name());
                if !chosen || !tools.can_run(variant) {
                    continue;
                }
                run_id += 1;
                let measured = measure(variant, in_flight, args, tools, run_id).await?;
                eprintln!(
                    "round {round}/{} · {in_flight} in flight · {:<56} {:>9.0} calls/s",
                    args.rounds,
                    variant.name(),
                    measured.load.throughput()
                );
                figures
                    .entry((in_flight, variant))
                    .or_default()
                    .add(measured);
            }
        }
    }
    for figure in figures.values_mut() {
        figure.load.finish();
    }
    Ok(figures)
}

/// Whether `--only` (`only`) chooses what is named `name`: every name when it is empty, else
/// the names holding one of its parts, in any case.
fn is_chosen(only: &[String], name: &str) -> bool {
    let name = name.to_lowercase();
    only.is_empty()
        || only
            .iter()
            .any(|part| name.contains(part.to_lowercase().as_str()))
}

/// `idemproxy-bench`: every variant, then the report.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    // `main` pinned this process before it built the runtime.
    let proxy_core = procs::proxy_core();
    let load_runtime = LoadRuntime {
        workers: tokio::runtime::Handle::current().metrics().num_workers(),
        cores: std::thread::available_parallelism().map_or(1, usize::from),
    };
    let upstream = procs::spawn_until(
        &exe()?,
        &["upstream".to_string()],
        "bench upstream listening addr=",
    )
    .await?;
    let nginx_dir = tempfile::tempdir()?;
    let nginx = start_nginx(&args.nginx, upstream.addr, nginx_dir.path()).await?;
    if nginx.is_none() {
        eprintln!("nginx not found ({}): its variant is skipped", args.nginx);
    }
    let redis_server = find_program(&args.redis_server);
    if redis_server.is_none() {
        eprintln!(
            "redis-server not found ({}): the Redis variants are skipped",
            args.redis_server
        );
    }
    let postgres = postgres_server::find_bin_dir(args.postgres.as_deref());
    if postgres.is_none() {
        eprintln!("PostgreSQL not found: the dedup-table variants are skipped");
    }
    let h2load = find_program(&args.h2load);
    if h2load.is_none() {
        eprintln!("h2load not found ({}): its runs are skipped", args.h2load);
    }
    let tools = Tools {
        upstream: &upstream,
        nginx: nginx.as_ref().map(|n| &n.process),
        redis_server,
        postgres,
        h2load,
    };
    let mut h2load_runs = H2loadRuns::new();
    let figures = measure_rounds(&args, &tools, &mut h2load_runs).await;
    if let Some(nginx) = nginx {
        nginx.stop().await;
    }
    let figures = figures?;
    let store = if args.records > 0 {
        eprintln!("storing {} outcomes for the memory/disk run", args.records);
        Some(measure_store(args.records, &args, upstream.addr).await?)
    } else {
        None
    };
    upstream.stop().await;
    let report = report(
        &args,
        &figures,
        &h2load_runs,
        store.as_ref(),
        proxy_core,
        load_runtime,
    );
    print!("{report}");
    if args.output != "-" {
        write_report(Path::new(&args.output), &report)?;
    }
    Ok(())
}

/// The benchmark's own runtime, which runs the load generator: more workers than cores would
/// measure their contention for the core as much as the target.
#[derive(Debug, Clone, Copy)]
struct LoadRuntime {
    workers: usize,
    cores: usize,
}

/// Marks the end of the generated part of BENCHMARKS.md; what follows is kept.
const NOTES_MARKER: &str =
    "<!-- Notes below this line are kept when the benchmark rewrites the file. -->";

fn write_report(path: &Path, report: &str) -> anyhow::Result<()> {
    let kept = std::fs::read_to_string(path)
        .ok()
        .and_then(|old| old.find(NOTES_MARKER).map(|at| old[at..].to_owned()))
        .unwrap_or_else(|| format!("{NOTES_MARKER}\n"));
    std::fs::write(path, format!("{report}\n{kept}"))
        .with_context(|| format!("cannot write {}", path.display()))
}

fn machine() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = info
        .lines()
        .find(|l| l.starts_with("model name"))
        .map_or_else(
            || "unknown CPU".into(),
            |l| l.split(':').nth(1).unwrap_or("").trim().to_owned(),
        );
    // The machine's, not this process's: the benchmark pins itself to fewer.
    let cores = info.lines().filter(|l| l.starts_with("processor")).count();
    let memory = procs::memory_total_bytes() as f64 / (1u64 << 30) as f64;
    format!("{cores} cores ({cpu}), {memory:.0} GiB")
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**missed**"
    }
}

fn report(
    args: &BenchArgs,
    figures: &BTreeMap<(usize, Variant), Figures>,
    h2load_runs: &H2loadRuns,
    store: Option<&StoreFigures>,
    proxy_core: Option<usize>,
    load_runtime: LoadRuntime,
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Benchmarks\n");
    let _ = writeln!(
        out,
        "Written by `scripts/bench` (flags: {} per variant and round after {} warm-up, {} rounds interleaved, {}-byte payloads). \
         Machine: {}; {}; the load generator runs on {} runtime worker(s) on {} core(s). Every figure below comes from that one run: compare ratios, not absolute numbers.\n",
        humantime::format_duration(args.duration),
        humantime::format_duration(args.warmup),
        args.rounds,
        args.payload_bytes,
        machine(),
        proxy_core.map_or_else(
            || "nothing pinned".to_string(),
            |core| format!("the proxy measured (sidecar, nginx) pinned to core {core}, the load generator, echo service and store servers to the others")
        ),
        load_runtime.workers,
        load_runtime.cores,
    );
    for &in_flight in &args.in_flight {
        let _ = writeln!(out, "## {in_flight} in flight\n");
        let _ = writeln!(out, "| variant | calls/s | p50 µs | p90 µs | p99 µs | p99.9 µs | errors | proxy CPU µs/call | proxy peak RSS MiB | service CPU µs/call | store server CPU µs/call | total CPU µs/call |");
        let _ = writeln!(
            out,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for variant in Variant::ALL {
            let Some(f) = figures.get(&(in_flight, variant)) else {
                continue;
            };
            let cpu = f
                .cpu_us_per_call()
                .map_or("—".into(), |c| format!("{c:.1}"));
            let shown = |cpu: Option<f64>| cpu.map_or("—".into(), |c| format!("{c:.1}"));
            let (service_cpu, store_cpu, total_cpu) = (
                shown(f.service_cpu_us_per_call()),
                shown(f.store_cpu_us_per_call()),
                shown(f.total_cpu_us_per_call()),
            );
            let rss = if f.peak_rss_bytes > 0 {
                format!("{:.1}", mib(f.peak_rss_bytes))
            } else {
                "—".into()
            };
            let _ = writeln!(
                out,
                "| {} | {:.0} | {} | {} | {} | {} | {} | {cpu} | {rss} | {service_cpu} | {store_cpu} | {total_cpu} |",
                variant.name(),
                f.load.throughput(),
                f.load.percentile_us(0.5),
                f.load.percentile_us(0.9),
                f.load.percentile_us(0.99),
                f.load.percentile_us(0.999),
                f.load.errors
            );
        }
        out.push('\n');
    }
    let h2load_means = h2load_section(&mut out, h2load_runs);
    out.push_str(&targets(args, figures, &h2load_means, store));
    out
}

/// The h2load table; returns each path's median (over rounds) of its mean time per call.
fn h2load_section(out: &mut String, runs: &H2loadRuns) -> BTreeMap<&'static str, f64> {
    let mut medians = BTreeMap::new();
    if runs.is_empty() {
        return medians;
    }
    let _ = writeln!(
        out,
        "## 1 in flight, h2load (`h2load -c 1 -m 1`, one run per round)\n"
    );
    let _ = writeln!(out, "| path | calls/s (median) | mean µs per round | median of the means µs | min µs | max µs | failed |");
    let _ = writeln!(out, "|---|---:|---|---:|---:|---:|---:|");
    for path in H2LOAD_PATHS {
        let Some(rounds) = runs.get(path) else {
            continue;
        };
        let median = |mut values: Vec<f64>| {
            values.sort_by(f64::total_cmp);
            values[values.len() / 2]
        };
        let mean = median(rounds.iter().map(|r| r.mean_us).collect());
        let rate = median(rounds.iter().map(|r| r.requests_per_second).collect());
        let means: Vec<String> = rounds.iter().map(|r| format!("{:.0}", r.mean_us)).collect();
        let min = rounds
            .iter()
            .map(|r| r.min_us)
            .fold(f64::INFINITY, f64::min);
        let max = rounds.iter().map(|r| r.max_us).fold(0.0, f64::max);
        let failed: u64 = rounds.iter().map(|r| r.failed).sum();
        let _ = writeln!(
            out,
            "| {path} | {rate:.0} | {} | {mean:.0} | {min:.0} | {max:.0} | {failed} |",
            means.join(", ")
        );
        medians.insert(path, mean);
    }
    out.push('\n');
    medians
}

fn targets(
    args: &BenchArgs,
    figures: &BTreeMap<(usize, Variant), Figures>,
    h2load_means: &BTreeMap<&'static str, f64>,
    store: Option<&StoreFigures>,
) -> String {
    let mut out = String::from(
        "## Targets\n\n| # | measure | target | measured | verdict |\n|---|---|---|---|---|\n",
    );
    let low = args.in_flight.iter().copied().min().unwrap_or(1);
    let high = args.in_flight.iter().copied().max().unwrap_or(32);
    let get = |n: usize, v: Variant| figures.get(&(n, v));
    let p50 = |n, v| get(n, v).map(|f| f.load.percentile_us(0.5) as f64);
    let tput = |n, v| get(n, v).map(|f| f.load.throughput());
    let cpu = |n, v| get(n, v).and_then(Figures::cpu_us_per_call);
    let mut row = |id: &str, what: String, target: &str, measured: Option<(String, bool)>| {
        let (value, ok) =
            measured.map_or(("not measured".into(), "—"), |(v, ok)| (v, verdict(ok)));
        let _ = writeln!(out, "| {id} | {what} | {target} | {value} | {ok} |");
    };
    let added = |v| Some(p50(low, v)? - p50(low, Variant::Direct)?);
    row(
        "P1",
        format!("passthrough added p50 at {low} in flight, vs direct"),
        "≤ nginx's added p50",
        added(Variant::Passthrough)
            .zip(added(Variant::Nginx))
            .map(|(ours, theirs)| {
                (
                    format!("{ours:.0} µs vs nginx {theirs:.0} µs"),
                    ours <= theirs,
                )
            }),
    );
    let h2load_added = |path| Some(h2load_means.get(path)? - h2load_means.get("direct")?);
    row(
        "P1",
        "passthrough added mean time per call with h2load, 1 in flight, vs direct".into(),
        "≤ nginx's added mean",
        h2load_added("idemproxy passthrough")
            .zip(h2load_added("nginx grpc_pass"))
            .map(|(ours, theirs)| {
                (
                    format!("{ours:.0} µs vs nginx {theirs:.0} µs"),
                    ours <= theirs,
                )
            }),
    );
    let ratio = |a: Option<f64>, b: Option<f64>| Some(a? / b?);
    let show = |r: Option<f64>, target: f64| r.map(|r| (format!("{r:.2}×"), r >= target));
    row(
        "P2",
        format!("passthrough: the proxy's CPU per call at {high} in flight, vs nginx's"),
        "≤ 0.5×",
        ratio(cpu(high, Variant::Passthrough), cpu(high, Variant::Nginx)).map(|r| {
            let throughput = ratio(tput(high, Variant::Passthrough), tput(high, Variant::Nginx))
                .map_or(String::new(), |t| format!(" (throughput {t:.2}× nginx's)"));
            (format!("{r:.2}×{throughput}"), r <= 0.5)
        }),
    );
    row(
        "P3",
        format!("duplicate-hit throughput at {high} in flight, vs direct"),
        "≥ 1.0×",
        show(
            ratio(tput(high, Variant::Duplicate), tput(high, Variant::Direct)),
            1.0,
        ),
    );
    row(
        "P4",
        format!("fresh-key throughput at {high} in flight, vs passthrough"),
        "≥ 0.5×",
        show(
            ratio(tput(high, Variant::Fresh), tput(high, Variant::Passthrough)),
            0.5,
        ),
    );
    row(
        "P5",
        format!("group commit vs flush per write, fresh keys at {high} in flight"),
        "≥ 5×",
        show(
            ratio(
                tput(high, Variant::Fresh),
                tput(high, Variant::FreshPerWrite),
            ),
            5.0,
        ),
    );
    let p6 = store.map(|s| {
        let disk_ratio = s.disk_bytes as f64 / s.logical_bytes.max(1) as f64;
        let rss_ratio = s.rss_bytes as f64 / s.baseline.rss_bytes.max(1) as f64;
        let ok = rss_ratio <= 1.15
            && disk_ratio <= 2.0
            && s.restart_to_ready <= Duration::from_secs(2);
        (
            format!(
                "RSS {:.1} MiB (the larger of the end of the fill and 30 s of sweeping after it; peak {:.1}) = {rss_ratio:.2}× sled alone's {:.1} MiB; disk {:.0} MiB for {:.0} MiB logical = {disk_ratio:.2}×; restart-to-ready {:.2} s ({} records found), sled alone reopens in {:.2} s",
                mib(s.rss_bytes),
                mib(s.peak_rss_bytes),
                mib(s.baseline.rss_bytes),
                mib(s.disk_bytes),
                mib(s.logical_bytes),
                s.restart_to_ready.as_secs_f64(),
                s.records_after_restart,
                s.baseline_reopen_seconds,
            ),
            ok,
        )
    });
    // The cures at equal durability (appendfsync always, synchronous_commit on).
    let total = |v| get(high, v).and_then(Figures::total_cpu_us_per_call);
    for (id, keys, ours, flag, table) in [
        (
            "C1",
            "fresh keys",
            Variant::Fresh,
            Variant::RedisFlagFresh(Fsync::Always),
            Variant::DedupTableFresh(Replication::Alone),
        ),
        (
            "C2",
            "duplicate hits",
            Variant::Duplicate,
            Variant::RedisFlagDuplicate(Fsync::Always),
            Variant::DedupTableDuplicate(Replication::Alone),
        ),
    ] {
        let measured = (|| {
            let (t, c) = (tput(high, ours)?, total(ours)?);
            let (flag_t, flag_c) = (tput(high, flag)?, total(flag)?);
            let (table_t, table_c) = (tput(high, table)?, total(table)?);
            Some((
                format!(
                    "{:.2}× / {:.2}× the throughput; {:.2}× / {:.2}× the total CPU per call ({c:.0} against {flag_c:.0} / {table_c:.0} µs)",
                    t / flag_t,
                    t / table_t,
                    c / flag_c,
                    c / table_c
                ),
                t > flag_t && t > table_t && c < flag_c && c < table_c,
            ))
        })();
        row(
            id,
            format!("idemproxy on sled against the Redis flag / the PostgreSQL dedup table in the service, {keys} at {high} in flight"),
            "ahead of both in throughput and total CPU per call",
            measured,
        );
    }
    row(
        "C3",
        format!("idemproxy on Redis against the Redis flag: total CPU per call, fresh keys at {high} in flight"),
        "≤ 1.2×",
        ratio(
            total(Variant::RedisFresh(Fsync::Always)),
            total(Variant::RedisFlagFresh(Fsync::Always)),
        )
        .map(|r| (format!("{r:.2}×"), r <= 1.2)),
    );
    for (id, what, target, measured) in postgres_targets(figures, high) {
        row(id, what, target, measured);
    }
    let stored = store.map_or(args.records, |s| s.records);
    row(
        "P6",
        format!(
            "with {stored} stored outcomes: sidecar RSS vs sled alone with as many records; disk vs logical bytes; restart-to-ready"
        ),
        "≤ 1.15× (goal: ≤ 64 MiB at 1 M); ≤ 2.0×; ≤ 2 s",
        p6,
    );
    if let Some(s) = store {
        let _ = writeln!(out, "\nStoring the {} outcomes through the sidecar took {:.1} s ({:.0} calls/s at 64 in flight).", s.records, s.fill_seconds, s.records as f64 / s.fill_seconds);
        let logical = s.records * sled_alone::LOGICAL_BYTES_PER_RECORD;
        let _ = writeln!(
            out,
            "sled alone, the same records (get, CAS claim, durable flush, CAS outcome, durable flush; 32 writers, group commit, 8 MiB cache): {:.1} s, {:.0} µs CPU per record, RSS {:.1} MiB (peak {:.1}), disk {:.0} MiB for {:.0} MiB logical = {:.2}×, reopen {:.2} s.",
            s.baseline.fill_seconds,
            s.baseline.cpu_seconds * 1e6 / s.records.max(1) as f64,
            mib(s.baseline.rss_bytes),
            mib(s.baseline.peak_rss_bytes),
            mib(s.baseline_disk_bytes),
            mib(logical),
            s.baseline_disk_bytes as f64 / logical.max(1) as f64,
            s.baseline_reopen_seconds,
        );
    }
    out
}

/// One row of the Targets table: id, measure, target, and the measured value with its
/// verdict (`None`: not measured).
type TargetRow = (&'static str, String, &'static str, Option<(String, bool)>);

/// Q1–Q4: idemproxy on PostgreSQL against the PostgreSQL dedup table on the same server, at
/// `high` in flight, without and with a synchronous standby (issue 32, item 10).
fn postgres_targets(figures: &BTreeMap<(usize, Variant), Figures>, high: usize) -> Vec<TargetRow> {
    let measured = |ours: Variant, cure: Variant| {
        let (ours, cure) = (figures.get(&(high, ours))?, figures.get(&(high, cure))?);
        let (t, cure_t) = (ours.load.throughput(), cure.load.throughput());
        let (c, cure_c) = (ours.total_cpu_us_per_call()?, cure.total_cpu_us_per_call()?);
        let shown = format!(
            "{:.2}× the throughput ({t:.0} against {cure_t:.0} calls/s); {:.2}× the total CPU per call ({c:.0} against {cure_c:.0} µs)",
            t / cure_t,
            c / cure_c,
        );
        Some((shown, t / cure_t, c / cure_c))
    };
    let mut rows = Vec::new();
    for (replication, fresh_id, duplicate_id, with) in [
        (Replication::Alone, "Q1", "Q2", ""),
        (
            Replication::SyncStandby,
            "Q3",
            "Q4",
            ", both with a synchronous standby",
        ),
    ] {
        rows.push((
            fresh_id,
            format!("idemproxy on PostgreSQL against the PostgreSQL dedup table in the service on the same server{with}, fresh keys at {high} in flight"),
            "≥ 2× the throughput and ≤ 0.7× the total CPU per call",
            measured(
                Variant::PostgresFresh(replication),
                Variant::DedupTableFresh(replication),
            )
            .map(|(shown, t, c)| (shown, t >= 2.0 && c <= 0.7)),
        ));
        rows.push((
            duplicate_id,
            format!("idemproxy on PostgreSQL against the PostgreSQL dedup table in the service on the same server{with}, duplicate hits at {high} in flight"),
            "ahead in throughput and total CPU per call",
            measured(
                Variant::PostgresDuplicate(replication),
                Variant::DedupTableDuplicate(replication),
            )
            .map(|(shown, t, c)| (shown, t > 1.0 && c < 1.0)),
        ));
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_core::Stream;

    #[test]
    fn only_chooses_by_part_of_the_name_in_any_case() {
        let only = |parts: &[&str]| parts.iter().map(|p| p.to_string()).collect::<Vec<_>>();
        let chosen = |parts: &[&str]| {
            Variant::ALL
                .into_iter()
                .filter(|v| is_chosen(&only(parts), v.name()))
                .count()
        };
        assert_eq!(chosen(&[]), Variant::ALL.len(), "no --only: every variant");
        // Two sidecar and two cure variants, each alone and with a standby.
        assert_eq!(chosen(&["postgres"]), 8);
        assert_eq!(chosen(&["synchronous standby"]), 4);
        assert_eq!(chosen(&["nginx", "STANDBY"]), 5);
        assert!(!is_chosen(&only(&["postgres"]), "h2load"));
        assert!(is_chosen(&[], "h2load"));
    }

    #[tokio::test]
    async fn the_echo_service_accepts_with_nagle_off() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = incoming(listener);
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let accepted = std::future::poll_fn(|cx| std::pin::Pin::new(&mut incoming).poll_next(cx))
            .await
            .expect("a connection")
            .unwrap();
        assert!(accepted.nodelay().unwrap(), "TCP_NODELAY is set");
    }
}

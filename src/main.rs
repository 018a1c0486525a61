//! The `idemproxy` binary: parses the command line and hands over to the library.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// A gRPC idempotency sidecar: each keyed request takes effect once.
#[derive(Debug, Parser)]
#[command(name = "idemproxy", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start; the size of `Run` does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Run the sidecar in front of a gRPC service.
    Run(idemproxy::config::RunArgs),
    /// Load the settings and the service's descriptors as `run` would, print the policy of
    /// every method, and exit 0 when `run` would start (1 when the policy has errors).
    Check(idemproxy::config::RunArgs),
    /// Inspect, resolve and purge a running sidecar's records through its admin API.
    Keys(idemproxy::admin::cli::KeysArgs),
    /// Add the sidecar to the pods of Kubernetes YAML (Deployments, StatefulSets, Jobs, Pods,
    /// ...); writes the result to stdout. Injecting twice changes nothing.
    Inject(InjectArgs),
    /// Serve the mutating admission webhook that injects the sidecar into new pods.
    Injector(idemproxy::injector::InjectorArgs),
    /// Show, in seconds and with no setup, what the sidecar prevents.
    Demo,
    /// Accept that a damaged data dir lost records it had acknowledged, so `run` serves from
    /// it again. Their keys can then run a second time: restore the volume instead when a
    /// copy exists. Run it with the sidecar stopped.
    AcceptLoss(AcceptLossArgs),
}

/// The command line of `idemproxy accept-loss`.
#[derive(Debug, clap::Args)]
struct AcceptLossArgs {
    /// The data dir `run` refused.
    #[arg(long, env = "IDEMPROXY_DATA_DIR")]
    data_dir: std::path::PathBuf,
}

fn accept_loss(args: &AcceptLossArgs) -> anyhow::Result<ExitCode> {
    use anyhow::Context;
    let forgotten = idemproxy::store::witness::forget(&args.data_dir)
        .with_context(|| format!("forgetting what {} witnessed", args.data_dir.display()))?;
    if forgotten {
        eprintln!(
            "idemproxy: accepted the loss in {}: the records it held are served as they are, and the keys it lost can run again",
            args.data_dir.display()
        );
    } else {
        eprintln!(
            "idemproxy: {} has no record of what it acknowledged: nothing to accept",
            args.data_dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The command line of `idemproxy inject`.
#[derive(Debug, clap::Args)]
struct InjectArgs {
    /// The YAML file to read (`-` for stdin).
    #[arg(short = 'f', long = "filename")]
    file: std::path::PathBuf,
    /// The sidecar image [default: idemproxy:<this version>].
    #[arg(long)]
    image: Option<String>,
    /// A regular container with a preStop pause instead of a native sidecar (for clusters
    /// before Kubernetes 1.29).
    #[arg(long)]
    no_native_sidecar: bool,
}

fn inject(args: InjectArgs) -> anyhow::Result<ExitCode> {
    use anyhow::Context;
    use std::io::Read;
    let mut input = String::new();
    if args.file.as_os_str() == "-" {
        std::io::stdin()
            .read_to_string(&mut input)
            .context("reading stdin")?;
    } else {
        input = std::fs::read_to_string(&args.file)
            .with_context(|| format!("reading {}", args.file.display()))?;
    }
    let defaults = idemproxy::inject::InjectSettings::default();
    let settings = idemproxy::inject::InjectSettings {
        image: args.image.unwrap_or(defaults.image),
        native: !args.no_native_sidecar,
    };
    match idemproxy::inject::inject_yaml(&input, &settings) {
        Ok(output) => {
            print!("{output}");
            Ok(ExitCode::SUCCESS)
        }
        Err(error) => {
            eprintln!("idemproxy inject: {}: {error}", args.file.display());
            Ok(ExitCode::FAILURE)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Run(_)) {
        one_malloc_arena();
    }
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("idemproxy: {error:#}");
            ExitCode::from(2)
        }
    }
}

/// glibc's allocator gives each thread that allocates an arena of its own, and the sidecar's
/// threads (runtime, flusher, sweeper, sled's I/O pool) each keep freed memory in theirs:
/// with 1 M outcomes stored at 13k calls/s, RSS 60-68 MiB, and 46 MiB with one arena, at the
/// same CPU per call. The arena count is read from the environment at start only (setting it
/// from the process needs `mallopt`, and so `unsafe`), so `run` starts itself again with it,
/// in place (`exec`: the same process id). Set `MALLOC_ARENA_MAX` to choose another count;
/// other C libraries ignore it.
fn one_malloc_arena() {
    #[cfg(target_env = "gnu")]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        use std::os::unix::process::CommandExt;
        let Ok(exe) = std::env::current_exe() else {
            return;
        };
        let error = std::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .env("MALLOC_ARENA_MAX", "1")
            .exec();
        // `exec` returns only when it failed: this process goes on as it is.
        eprintln!("idemproxy: could not restart with MALLOC_ARENA_MAX=1 ({error}); going on");
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        // clap has checked the flags and variables; they are read again with the config file
        // laid under them (the arguments after `run`).
        Command::Run(_) => {
            let config = idemproxy::config::load(std::env::args_os().skip(2))?;
            // The sidecar shares its pod's cores with the service: its threads are a setting.
            let threads = Some(config.worker_threads);
            block_on(threads, async {
                // The OTLP exporters need the runtime; logs start with the span exporter.
                let backend = idemproxy::server::backend_name(&config);
                let env = idemproxy::telemetry::process_env;
                let telemetry = idemproxy::telemetry::Telemetry::from_env(&env, backend)?;
                telemetry.init_logs();
                idemproxy::server::run(config, std::sync::Arc::new(telemetry)).await
            })??;
        }
        Command::Check(_) => {
            let settings = idemproxy::config::parse_args(std::env::args_os().skip(2))?;
            let config = idemproxy::config::resolve_for_check(settings)?;
            return block_on(None, idemproxy::server::check(&config));
        }
        Command::Keys(args) => return block_on(None, idemproxy::admin::cli::run(args)),
        Command::Inject(args) => return inject(args),
        Command::Injector(args) => {
            idemproxy::telemetry::init_logs(&idemproxy::telemetry::process_env)?;
            block_on(None, idemproxy::injector::run(args))??;
        }
        Command::Demo => block_on(None, idemproxy::demo::run())??,
        Command::AcceptLoss(args) => return accept_loss(&args),
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `future` on a new runtime with `threads` workers (one per core when `None`), then
/// gives what still runs half a second: a telemetry flush stuck on a dead collector must not
/// hold the exit.
fn block_on<F: std::future::Future>(
    threads: Option<usize>,
    future: F,
) -> anyhow::Result<F::Output> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(threads) = threads {
        builder.worker_threads(threads);
    }
    let runtime = builder.build()?;
    let output = runtime.block_on(future);
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    Ok(output)
}

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
    /// Show, in seconds and with no setup, what the sidecar prevents.
    Demo,
    /// Measure what the sidecar costs against a direct call and nginx; writes BENCHMARKS.md.
    Bench(idemproxy::bench::BenchArgs),
    /// One load run against any address, for profiling a single process.
    #[command(hide = true)]
    BenchLoad(idemproxy::bench::LoadArgs),
    /// The benchmark's echo upstream (started by `bench`).
    #[command(hide = true)]
    BenchUpstream {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("idemproxy: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Run(args) => {
            let config = idemproxy::config::load(args)?;
            idemproxy::telemetry::init_logs();
            runtime.block_on(idemproxy::server::run(config))?;
        }
        Command::Check(args) => {
            let config = idemproxy::config::load(args)?;
            return Ok(runtime.block_on(idemproxy::server::check(&config)));
        }
        Command::Keys(args) => return Ok(runtime.block_on(idemproxy::admin::cli::run(args))),
        Command::Demo => runtime.block_on(idemproxy::demo::run())?,
        Command::Bench(args) => runtime.block_on(idemproxy::bench::run(args))?,
        Command::BenchLoad(args) => runtime.block_on(idemproxy::bench::run_load(args))?,
        Command::BenchUpstream { listen } => {
            runtime.block_on(idemproxy::bench::serve_upstream(listen))?
        }
    }
    Ok(ExitCode::SUCCESS)
}

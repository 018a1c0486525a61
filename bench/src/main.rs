//! `idemproxy-bench`: the benchmark of the sidecar, kept out of the product binary. It starts
//! the echo upstream and sled alone from this binary, nginx when installed, and the `idemproxy`
//! binary built beside it; see `bench.rs`.

mod bench;
mod cures;
mod h2load;
mod load;

/// The echo service of `proto/`, generated at build time.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
mod pb {
    include!(concat!(env!("OUT_DIR"), "/idemproxy.bench.v1.rs"));
}
mod postgres_server;
mod procs;
mod redis_server;
mod sled_alone;

use clap::{Parser, Subcommand};

/// Measures what the idemproxy sidecar costs against a direct call, nginx and sled alone, and
/// writes BENCHMARKS.md. Run it through `scripts/bench`, which builds both binaries first.
#[derive(Debug, Parser)]
#[command(name = "idemproxy-bench", args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    bench: bench::BenchArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// One load run against any address, for profiling a single process.
    Load(bench::LoadArgs),
    /// The benchmark's echo upstream (started by the benchmark).
    Upstream {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
        /// The service's own cure around the echo: `redis-flag=URL` or
        /// `dedup-table=CONNECTION` (a PostgreSQL connection string).
        #[arg(long)]
        cure: Option<String>,
    },
    /// The benchmark's sled-alone baseline (started by the benchmark).
    SledAlone(sled_alone::SledAloneArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Pinned before the runtime exists, so that it starts as many workers as the cores left
    // to it: two workers on one core cost the load generator two fifths of its throughput.
    if cli.command.is_none() && !cli.bench.no_pin {
        procs::pin()?;
    }
    // sled alone runs its writers on threads of its own: one runtime worker is enough there.
    let workers = matches!(cli.command, Some(Command::SledAlone(_))).then_some(1);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(workers) = workers {
        builder.worker_threads(workers);
    }
    let runtime = builder.build()?;
    let result = runtime.block_on(async move {
        match cli.command {
            None => bench::run(cli.bench).await,
            Some(Command::Load(args)) => bench::run_load(args).await,
            Some(Command::Upstream { listen, cure }) => bench::serve_upstream(listen, cure).await,
            Some(Command::SledAlone(args)) => sled_alone::run(args).await,
        }
    });
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    result
}

//! The baseline of the memory/disk run: sled 0.34 alone, doing what the sidecar's store does
//! for each fresh call and nothing else. Per record: read the key, compare-and-swap absent →
//! a 120-byte claim, a durable flush, compare-and-swap → a 350-byte outcome, a durable flush;
//! 32 writers at once on one runtime thread, one flusher thread for group commit (the
//! sidecar's own `Flusher` and `DataDirSync`, so both pay the same fsyncs), the sidecar's
//! default 8 MiB cache. Its own process, so its RSS and CPU time are its own.

use idemproxy::store::flusher::Flusher;
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Writers at once.
const WRITERS: u64 = 32;
/// The claim and outcome sizes of a 64-byte echo call's record.
const CLAIM_BYTES: usize = 120;
const OUTCOME_BYTES: usize = 350;
/// What one record holds once complete: its 32-byte key and its outcome.
pub const LOGICAL_BYTES_PER_RECORD: u64 = 32 + OUTCOME_BYTES as u64;
/// The sidecar's default `--sled-cache-bytes`.
const CACHE_BYTES: u64 = 8 << 20;

/// Flags of `idemproxy-bench sled-alone`.
#[derive(Debug, Clone, clap::Args)]
pub struct SledAloneArgs {
    /// The sled directory.
    #[arg(long)]
    pub dir: PathBuf,
    /// Records to add (0: only open, to time a reopen).
    #[arg(long, default_value_t = 0)]
    pub records: u64,
}

/// `idemproxy-bench sled-alone`: opens (timed), adds the records, prints one line of figures.
pub async fn run(args: SledAloneArgs) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let db = idemproxy::store::sled::open_db(&args.dir, CACHE_BYTES)?;
    let records = db.open_tree("records")?;
    // A first read, as the sidecar's first call would make.
    records.get([0u8; 32])?;
    let open_seconds = started.elapsed().as_secs_f64();
    let flusher = Arc::new(idemproxy::store::durable::start_flusher(
        &db, &args.dir, None,
    )?);
    let cpu_before = crate::procs::cpu_seconds(std::process::id(), false);
    let filled = std::time::Instant::now();
    let writers: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let (records, flusher) = (records.clone(), flusher.clone());
            let total = args.records;
            tokio::spawn(async move {
                let mut n = writer;
                while n < total {
                    add(&records, &flusher, n).await?;
                    n += WRITERS;
                }
                Ok::<_, anyhow::Error>(())
            })
        })
        .collect();
    for writer in writers {
        writer.await??;
    }
    let fill_seconds = filled.elapsed().as_secs_f64();
    let cpu_seconds = crate::procs::cpu_seconds(std::process::id(), false) - cpu_before;
    let pid = std::process::id();
    println!(
        "sled alone: records={} open_seconds={open_seconds:.3} fill_seconds={fill_seconds:.3} cpu_seconds={cpu_seconds:.3} rss_bytes={} peak_rss_bytes={}",
        args.records,
        crate::procs::memory_bytes(pid, "VmRSS"),
        crate::procs::memory_bytes(pid, "VmHWM"),
    );
    Ok(())
}

async fn add(records: &sled::Tree, flusher: &Flusher, n: u64) -> anyhow::Result<()> {
    let key: [u8; 32] = Sha256::digest(n.to_be_bytes()).into();
    let timeout = Duration::from_secs(30);
    anyhow::ensure!(records.get(key)?.is_none(), "key {n} already stored");
    let claim = vec![1u8; CLAIM_BYTES];
    records
        .compare_and_swap(key, None as Option<&[u8]>, Some(claim.clone()))?
        .map_err(|_| anyhow::anyhow!("claim of {n} lost a race"))?;
    flusher.flush(timeout).await.map_err(anyhow::Error::msg)?;
    let outcome = vec![2u8; OUTCOME_BYTES];
    records
        .compare_and_swap(key, Some(claim), Some(outcome))?
        .map_err(|_| anyhow::anyhow!("outcome of {n} lost a race"))?;
    flusher.flush(timeout).await.map_err(anyhow::Error::msg)?;
    Ok(())
}

/// What one `sled-alone` run printed.
#[derive(Debug, Clone, Copy, Default)]
pub struct SledAloneFigures {
    /// Seconds from open to the first read answered.
    pub open_seconds: f64,
    /// Seconds the records took to add.
    pub fill_seconds: f64,
    /// CPU seconds the records took to add.
    pub cpu_seconds: f64,
    /// Resident memory after adding them.
    pub rss_bytes: u64,
    /// Peak resident memory.
    pub peak_rss_bytes: u64,
}

impl SledAloneFigures {
    /// Parses the line `run` prints.
    pub fn parse(line: &str) -> Option<SledAloneFigures> {
        let field = |name: &str| -> Option<f64> {
            line.split_whitespace()
                .find_map(|part| part.strip_prefix(name)?.strip_prefix('='))?
                .parse()
                .ok()
        };
        Some(SledAloneFigures {
            open_seconds: field("open_seconds")?,
            fill_seconds: field("fill_seconds")?,
            cpu_seconds: field("cpu_seconds")?,
            rss_bytes: field("rss_bytes")? as u64,
            peak_rss_bytes: field("peak_rss_bytes")? as u64,
        })
    }
}

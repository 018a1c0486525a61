//! The load generator: a fixed number of calls in flight over one HTTP/2 connection, each
//! timed, for a fixed duration. Knows nothing of what is behind the address.

use crate::pb::echo_client::EchoClient;
use crate::pb::EchoMessage;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tonic::transport::Channel;

/// How calls carry keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyMode {
    /// No key: passthrough.
    None,
    /// A new key per call: the durable claim path.
    Fresh,
    /// One key for every call: duplicate hits after the first.
    Duplicate,
}

/// What one load run measured.
#[derive(Debug, Default)]
pub struct LoadResult {
    /// Calls answered OK within the measured window.
    pub ok: u64,
    /// Calls that failed.
    pub errors: u64,
    /// Latency of each OK call, in microseconds.
    pub latencies_us: Vec<u32>,
    /// The measured window.
    pub elapsed: Duration,
}

impl LoadResult {
    /// OK calls per second.
    pub fn throughput(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }

    /// Sorts the latencies; call once before reading percentiles.
    pub fn finish(&mut self) {
        self.latencies_us.sort_unstable();
    }

    /// The latency at quantile `q` (0..=1), in microseconds.
    pub fn percentile_us(&self, q: f64) -> u32 {
        if self.latencies_us.is_empty() {
            return 0;
        }
        let rank = ((self.latencies_us.len() - 1) as f64 * q).round() as usize;
        self.latencies_us[rank]
    }

    /// Adds another run's measurements.
    pub fn merge(&mut self, other: LoadResult) {
        self.ok += other.ok;
        self.errors += other.errors;
        self.latencies_us.extend(other.latencies_us);
        self.elapsed += other.elapsed;
    }
}

/// Connects one HTTP/2 channel to `addr`.
pub async fn connect(addr: SocketAddr) -> anyhow::Result<Channel> {
    Ok(Channel::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect()
        .await?)
}

/// Keeps `in_flight` calls running against `addr` for `warmup`, then measures for
/// `duration`. `run_id` keeps fresh keys unique across runs on one store.
pub async fn run(
    addr: SocketAddr,
    mode: KeyMode,
    in_flight: usize,
    warmup: Duration,
    duration: Duration,
    payload_bytes: usize,
    run_id: u64,
) -> anyhow::Result<LoadResult> {
    let channel = connect(addr).await?;
    let started = Instant::now();
    let measure_from = started + warmup;
    let stop_at = measure_from + duration;
    let counter = Arc::new(AtomicU64::new(0));
    let payload: bytes::Bytes = vec![b'x'; payload_bytes].into();
    let workers: Vec<_> = (0..in_flight)
        .map(|_| {
            let client = EchoClient::new(channel.clone());
            let counter = counter.clone();
            let payload = payload.clone();
            tokio::spawn(worker(
                client,
                mode,
                payload,
                counter,
                run_id,
                measure_from,
                stop_at,
            ))
        })
        .collect();
    let mut result = LoadResult::default();
    for worker in workers {
        result.merge(worker.await?);
    }
    result.elapsed = duration;
    Ok(result)
}

async fn worker(
    mut client: EchoClient<Channel>,
    mode: KeyMode,
    payload: bytes::Bytes,
    counter: Arc<AtomicU64>,
    run_id: u64,
    measure_from: Instant,
    stop_at: Instant,
) -> LoadResult {
    let mut result = LoadResult::default();
    loop {
        let sent = Instant::now();
        if sent >= stop_at {
            return result;
        }
        let mut request = tonic::Request::new(EchoMessage {
            payload: payload.to_vec(),
        });
        let key = match mode {
            KeyMode::None => None,
            KeyMode::Fresh => Some(format!(
                "b{run_id}-{}",
                counter.fetch_add(1, Ordering::Relaxed)
            )),
            KeyMode::Duplicate => Some(format!("b{run_id}-the-one")),
        };
        if let Some(key) = key {
            if let Ok(value) = key.parse() {
                request.metadata_mut().insert("idempotency-key", value);
            }
        }
        let answer = client.echo(request).await;
        if sent < measure_from {
            continue;
        }
        match answer {
            Ok(_) => {
                result.ok += 1;
                let micros = sent.elapsed().as_micros();
                result
                    .latencies_us
                    .push(u32::try_from(micros).unwrap_or(u32::MAX));
            }
            Err(_) => result.errors += 1,
        }
    }
}

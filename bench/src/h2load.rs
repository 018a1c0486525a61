//! P1 with a client that is not ours: nghttp2's `h2load`, one connection and one stream at a
//! time, sending the same gRPC call as the benchmark's own client (a 5-byte frame header and
//! an `EchoMessage`, `content-type: application/grpc`, `te: trailers`). It reports the mean
//! time per request, not percentiles, so the report compares means.

use crate::pb::EchoMessage;
use anyhow::{bail, Context};
use prost::Message;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// What one h2load run printed.
#[derive(Debug, Clone, Copy)]
pub struct H2loadFigures {
    pub requests_per_second: f64,
    pub mean_us: f64,
    pub min_us: f64,
    pub max_us: f64,
    pub failed: u64,
}

/// Writes the request body h2load sends: one gRPC message frame.
pub fn write_request(dir: &Path, payload_bytes: usize) -> anyhow::Result<std::path::PathBuf> {
    let message = EchoMessage {
        payload: vec![b'x'; payload_bytes],
    }
    .encode_to_vec();
    let mut frame = Vec::with_capacity(5 + message.len());
    frame.push(0);
    frame.extend_from_slice(&u32::try_from(message.len())?.to_be_bytes());
    frame.extend_from_slice(&message);
    let path = dir.join("echo-request.bin");
    std::fs::write(&path, frame)?;
    Ok(path)
}

/// Runs h2load against `target` for `warmup` then `duration` (whole seconds, at least one).
pub async fn run(
    h2load: &Path,
    target: SocketAddr,
    request: &Path,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<H2loadFigures> {
    let seconds = |d: Duration| d.as_secs_f64().ceil().max(1.0).to_string();
    let output = tokio::process::Command::new(h2load)
        .args(["--clients=1", "--max-concurrent-streams=1", "--threads=1"])
        .arg(format!("--duration={}", seconds(duration)))
        .arg(format!("--warm-up-time={}", seconds(warmup)))
        .arg("--data")
        .arg(request)
        .args(["--header", "content-type: application/grpc"])
        .args(["--header", "te: trailers"])
        .arg(format!("http://{target}/idemproxy.bench.v1.Echo/Echo"))
        .output()
        .await
        .with_context(|| format!("cannot run {}", h2load.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "h2load failed: {stdout} {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    parse(&stdout).with_context(|| format!("cannot read h2load's output: {stdout}"))
}

/// Reads `finished in …, N req/s`, `requests: … S succeeded, F failed …` and
/// `time for request: MIN MAX MEAN …` from h2load's summary.
fn parse(output: &str) -> Option<H2loadFigures> {
    let line = |start: &str| {
        output
            .lines()
            .map(str::trim)
            .find(|line| line.starts_with(start))
    };
    let requests_per_second = line("finished in")?
        .split(", ")
        .find_map(|part| part.strip_suffix(" req/s"))?
        .parse()
        .ok()?;
    let requests = line("requests:")?;
    let count = |what: &str| -> Option<u64> {
        requests
            .split(", ")
            .find_map(|part| part.trim().strip_suffix(what))?
            .trim()
            .parse()
            .ok()
    };
    let failed = count(" failed")? + count(" errored")? + count(" timeout")?;
    let times: Vec<f64> = line("time for request:")?
        .trim_start_matches("time for request:")
        .split_whitespace()
        .take(3)
        .map(micros)
        .collect::<Option<_>>()?;
    let [min_us, max_us, mean_us] = times[..] else {
        return None;
    };
    Some(H2loadFigures {
        requests_per_second,
        mean_us,
        min_us,
        max_us,
        failed,
    })
}

/// `420us`, `3.21ms` or `1.02s` in microseconds.
fn micros(value: &str) -> Option<f64> {
    let (number, scale) = if let Some(n) = value.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = value.strip_suffix("ms") {
        (n, 1e3)
    } else {
        (value.strip_suffix('s')?, 1e6)
    };
    Some(number.parse::<f64>().ok()? * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_summary_h2load_prints() {
        let output = "\
finished in 5.00s, 1621.40 req/s, 120.12KB/s
requests: 8107 total, 8107 started, 8107 done, 8100 succeeded, 5 failed, 2 errored, 0 timeout
status codes: 8107 2xx, 0 3xx, 0 4xx, 0 5xx
                     min         max         mean         sd        +/- sd
time for request:      420us      3.21ms       612us       100us    92.00%
time for connect:      100us       100us       100us         0us   100.00%
";
        let figures = parse(output).expect("parsed");
        assert_eq!(figures.requests_per_second, 1621.4);
        assert_eq!(figures.failed, 7);
        assert_eq!(
            (figures.min_us, figures.max_us, figures.mean_us),
            (420.0, 3210.0, 612.0)
        );
    }
}

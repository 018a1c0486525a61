//! The processes a benchmark runs: the echo upstream, the sidecar and nginx, each its own
//! process so its CPU time and memory can be read from `/proc`.

use anyhow::{bail, Context};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Linux's clock tick for `/proc/<pid>/stat` times (USER_HZ, 100 on every common kernel).
const TICKS_PER_SECOND: f64 = 100.0;

/// A child process and where it listens.
pub struct Process {
    /// The child.
    pub child: Child,
    /// Its listening address.
    pub addr: SocketAddr,
}

impl Process {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Stops it with SIGKILL and waits.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// The core kept for the proxy measured, once `pin` has pinned the benchmark elsewhere.
static PROXY_CORE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

/// Gives the measured proxy (the sidecar, nginx) a core of its own: pins this process, and so
/// every process it starts after (load generator, echo service, store servers), to the other
/// cores with `taskset`, and starts each proxy on the last core. On a 2-core machine the
/// proxies would otherwise share their core with the load and the service, and their CPU
/// per call would measure the contention as much as the proxy. Call it before the runtime is
/// built, so that its worker count follows the cores left to it. Returns the proxy's core;
/// `None` (nothing pinned) with fewer than 2 cores or without `taskset`.
pub fn pin() -> anyhow::Result<Option<usize>> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    if cores < 2 {
        return Ok(None);
    }
    let proxy = cores - 1;
    let others = if proxy == 1 {
        "0".to_string()
    } else {
        format!("0-{}", proxy - 1)
    };
    let pinned = std::process::Command::new("taskset")
        .args(["--all-tasks", "--pid", "--cpu-list", &others])
        .arg(std::process::id().to_string())
        .stdout(Stdio::null())
        .status();
    match pinned {
        Ok(status) if status.success() => {
            let _ = PROXY_CORE.set(proxy);
            Ok(Some(proxy))
        }
        Ok(status) => bail!("taskset failed ({status})"),
        Err(_) => Ok(None),
    }
}

/// The proxy's core, once `pin` has reserved one.
pub fn proxy_core() -> Option<usize> {
    PROXY_CORE.get().copied()
}

/// A command for `program`, on the proxy's own core when `pin` reserved one.
pub fn proxy_command(program: &Path) -> Command {
    match proxy_core() {
        Some(core) => {
            let mut command = Command::new("taskset");
            command.args(["--cpu-list", &core.to_string()]).arg(program);
            command
        }
        None => Command::new(program),
    }
}

/// Starts `program args`, waits (up to 60 s) for a stderr line containing `marker` followed
/// by an address, and keeps draining its output.
pub async fn spawn_until(program: &Path, args: &[String], marker: &str) -> anyhow::Result<Process> {
    spawn_command_until(Command::new(program), program, args, marker).await
}

/// `spawn_until` for a proxy: on its own core when pinned (see `pin`).
pub async fn spawn_proxy_until(
    program: &Path,
    args: &[String],
    marker: &str,
) -> anyhow::Result<Process> {
    spawn_command_until(proxy_command(program), program, args, marker).await
}

async fn spawn_command_until(
    mut command: Command,
    program: &Path,
    args: &[String],
    marker: &str,
) -> anyhow::Result<Process> {
    let mut child = command
        .args(args)
        .env("RUST_LOG", "warn,idemproxy=info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", program.display()))?;
    let stderr = child.stderr.take().context("stderr is piped")?;
    let (addr, _) = wait_for_address(stderr, marker).await?;
    Ok(Process { child, addr })
}

/// Reads a child's standard error (up to 60 s) until a line holds `marker` followed by an
/// address; returns the address and the line, and keeps draining the rest so the child never
/// blocks on a full pipe.
pub async fn wait_for_address(
    stderr: tokio::process::ChildStderr,
    marker: &str,
) -> anyhow::Result<(SocketAddr, String)> {
    let mut lines = BufReader::new(stderr).lines();
    let found = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(at) = line.find(marker) {
                // The address ends where its characters do (a space, or a JSON line's quote).
                let rest = &line[at + marker.len()..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || ".:[]".contains(c)))
                    .unwrap_or(rest.len());
                let addr = rest[..end].parse()?;
                return Ok::<_, anyhow::Error>((addr, line));
            }
        }
        bail!("the process exited before it logged {marker:?}")
    })
    .await
    .context("not ready within 60 s")??;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(found)
}

/// User plus system CPU seconds a process (and, with `children_of`, its direct children)
/// has used.
///
/// `/proc/<pid>/stat` shows a process's time in whole 10 ms ticks, so a process with a few
/// milliseconds of work in a short run, such as one of PostgreSQL's eight backends of a
/// cure, shows none at all. A process with one thread is read in nanoseconds from
/// `/proc/<pid>/schedstat` instead; one with several from `stat`, whose sum also holds the
/// time of threads that have exited.
pub fn cpu_seconds(pid: u32, children_of: bool) -> f64 {
    let mut seconds = process_cpu_seconds(pid);
    if children_of {
        for child in child_pids(pid) {
            seconds += process_cpu_seconds(child);
        }
    }
    seconds
}

fn process_cpu_seconds(pid: u32) -> f64 {
    let threads = std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, Iterator::count);
    if threads == 1 {
        let run_ns = std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
            .ok()
            .and_then(|line| line.split_whitespace().next()?.parse::<u64>().ok());
        if let Some(run_ns) = run_ns {
            return run_ns as f64 / 1e9;
        }
    }
    stat_ticks(pid) as f64 / TICKS_PER_SECOND
}

fn stat_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let Some(after) = stat.rfind(')').map(|at| &stat[at + 2..]) else {
        return 0;
    };
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |n: usize| {
        fields
            .get(n - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(14) + field(15)
}

fn child_pids(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|candidate| {
            std::fs::read_to_string(format!("/proc/{candidate}/stat"))
                .ok()
                .and_then(|stat| {
                    let after = &stat[stat.rfind(')')? + 2..];
                    after.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// A `/proc/<pid>/status` memory field (`VmRSS`, `VmHWM`), in bytes.
pub fn memory_bytes(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|line| line.starts_with(field))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(0)
}

/// Bytes the files under `dir` occupy on disk (allocated blocks).
pub fn disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => disk_bytes(&entry.path()),
            Ok(meta) => meta.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

/// Writes an nginx config proxying gRPC from a free port to `upstream`, with keepalive
/// limits raised so nginx does not close connections mid-run. Returns the config path.
pub fn nginx_config(
    dir: &Path,
    listen: SocketAddr,
    upstream: SocketAddr,
) -> anyhow::Result<PathBuf> {
    let config = format!(
        "worker_processes auto;\n\
         pid {dir}/nginx.pid;\n\
         error_log {dir}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n\
           access_log off;\n\
           client_body_temp_path {dir}/body;\n\
           proxy_temp_path {dir}/proxy;\n\
           fastcgi_temp_path {dir}/fastcgi;\n\
           uwsgi_temp_path {dir}/uwsgi;\n\
           scgi_temp_path {dir}/scgi;\n\
           upstream service {{ server {upstream}; keepalive 64; keepalive_requests 100000000; keepalive_timeout 600s; }}\n\
           server {{\n\
             listen {listen} http2;\n\
             keepalive_requests 100000000;\n\
             keepalive_timeout 600s;\n\
             location / {{ grpc_pass grpc://service; }}\n\
           }}\n\
         }}\n",
        dir = dir.display()
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, config)?;
    Ok(path)
}

/// A free loopback port, for programs that cannot report the one they bound.
pub fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

/// The machine's memory, from `/proc/meminfo`.
pub fn memory_total_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            let line = info.lines().find(|line| line.starts_with("MemTotal:"))?;
            Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
        })
        .unwrap_or(0)
}

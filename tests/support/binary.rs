//! The real `idemproxy` binary as a child process: started, killed with SIGKILL, restarted.

use std::net::SocketAddr;
use std::process::Stdio;
use tokio::process::{Child, Command};

/// A running `idemproxy run`.
pub struct BinarySidecar {
    child: Child,
    pub addr: SocketAddr,
    /// The log line that named `addr`.
    pub listening_line: String,
}

/// The binary's path, as cargo built it for the tests.
pub fn path() -> &'static str {
    env!("CARGO_BIN_EXE_idemproxy")
}

/// `run` flags of a binary sidecar: listen on a free port, forward to `upstream`, records
/// in `dir`, then `extra`.
pub fn run_args(upstream: SocketAddr, dir: &std::path::Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &format!("http://{upstream}"),
        "--data-dir",
        &dir.display().to_string(),
    ]
    .map(str::to_owned)
    .to_vec();
    args.extend(extra.iter().map(|arg| (*arg).to_owned()));
    args
}

/// Starts `idemproxy run ARGS` and waits until it logs its proxy address.
pub async fn start(args: &[String]) -> BinarySidecar {
    start_with_env(args, &[]).await
}

/// `start` with extra environment variables (OTEL_* settings and the like).
pub async fn start_with_env(args: &[String], env: &[(&str, String)]) -> BinarySidecar {
    start_under(&[], args, env).await
}

/// `start_with_env` run by the command `wrapper` (`prlimit --nofile=…`, …) when it is not
/// empty.
pub async fn start_under(
    wrapper: &[&str],
    args: &[String],
    env: &[(&str, String)],
) -> BinarySidecar {
    let mut command = match wrapper.split_first() {
        None => Command::new(path()),
        Some((program, wrapper_args)) => {
            let mut command = Command::new(program);
            command.args(wrapper_args).arg(path());
            command
        }
    };
    let mut child = command
        .arg("run")
        .args(args)
        .envs(env.iter().map(|(name, value)| (*name, value.as_str())))
        .env("RUST_LOG", "info")
        // Tests run many sidecars at once: each takes a free admin port unless told otherwise.
        .env("IDEMPROXY_ADMIN_LISTEN", "127.0.0.1:0")
        .env("IDEMPROXY_OPS_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the binary starts");
    let stderr = child.stderr.take().expect("stderr is piped");
    let (addr, listening_line) = listening(stderr).await;
    BinarySidecar {
        child,
        addr,
        listening_line,
    }
}

/// The environment that runs a child with its wall clock set to `at` (`YYYY-MM-DD hh:mm:ss`,
/// UTC) and going on from there, through libfaketime (Debian's `libfaketime`, installed by
/// `scripts/test`): for a test whose verdict rests on records written at a known time, so it
/// gives the same verdict on any day. The monotonic clock stays real (tokio's timers use it).
pub fn clock_at(at: &str) -> Vec<(&'static str, String)> {
    let library = ["x86_64-linux-gnu", "aarch64-linux-gnu"]
        .iter()
        .map(|arch| format!("/usr/lib/{arch}/faketime/libfaketimeMT.so.1"))
        .find(|path| std::path::Path::new(path).exists())
        .expect("libfaketime is installed (scripts/test installs Debian's libfaketime)");
    vec![
        ("LD_PRELOAD", library),
        ("FAKETIME", format!("@{at}")),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_owned()),
        ("TZ", "UTC".to_owned()),
    ]
}

impl BinarySidecar {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("still running")
    }

    /// SIGTERM, as Kubernetes sends before it stops a container.
    pub fn terminate(&self) {
        let pid = self.child.id().expect("still running");
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("runs kill");
        assert!(status.success(), "kill -TERM {pid}");
    }

    /// Waits for the process to exit; its exit code.
    pub async fn wait(mut self) -> Option<i32> {
        self.child.wait().await.expect("waits").code()
    }

    /// SIGKILL: no chance to flush or clean up, as in an OOM kill.
    pub async fn kill(mut self) {
        self.child.kill().await.expect("the child can be killed");
    }
}

/// Waits (up to 60 s) until something accepts connections on `addr`: for a binary started
/// with a fixed `--listen` whose standard error goes elsewhere (a log file, fiu-run).
pub async fn wait_listening(addr: SocketAddr) {
    super::eventually(
        std::time::Duration::from_secs(60),
        "the binary to listen",
        || async move { tokio::net::TcpStream::connect(addr).await.is_ok() },
    )
    .await;
}

/// Waits until the child logs its proxy address.
pub async fn listening_addr(stderr: tokio::process::ChildStderr) -> SocketAddr {
    listening(stderr).await.0
}

/// The proxy address and the line that named it.
async fn listening(stderr: tokio::process::ChildStderr) -> (SocketAddr, String) {
    wait_for_address(stderr, "proxy listening on ").await
}

/// Reads a child's standard error (up to 60 s) until a line holds `marker` followed by an
/// address; returns the address and the line, and keeps draining the rest so the child never
/// blocks on a full pipe.
pub async fn wait_for_address(
    stderr: tokio::process::ChildStderr,
    marker: &str,
) -> (SocketAddr, String) {
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    let found = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.expect("reads the child's stderr") {
            let Some(at) = line.find(marker) else {
                continue;
            };
            // The address ends where its characters do (a space, or a JSON line's quote).
            let rest = &line[at + marker.len()..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || ".:[]".contains(c)))
                .unwrap_or(rest.len());
            let addr = rest[..end].parse().expect("an address follows the marker");
            return (addr, line);
        }
        panic!("the process exited before it logged {marker:?}")
    })
    .await
    .unwrap_or_else(|_| panic!("{marker:?} not logged within 60 s"));
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    found
}

/// Runs `idemproxy keys ARGS --admin ADMIN`: (exit code, stdout, stderr).
pub fn keys(admin: &str, args: &[&str]) -> (i32, String, String) {
    let output = std::process::Command::new(path())
        .arg("keys")
        .args(["--admin", admin])
        .args(args)
        .env_remove("IDEMPROXY_ADMIN_TOKEN")
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `text` parsed as JSON; a test failure naming it when it is not.
pub fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|error| panic!("{error}: {text}"))
}

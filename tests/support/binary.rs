//! The real `idemproxy` binary as a child process: started, killed with SIGKILL, restarted.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A running `idemproxy run`.
pub struct BinarySidecar {
    child: Child,
    pub addr: SocketAddr,
}

/// The binary's path, as cargo built it for the tests.
pub fn path() -> &'static str {
    env!("CARGO_BIN_EXE_idemproxy")
}

/// Starts `idemproxy run ARGS` and waits until it logs its proxy address.
pub async fn start(args: &[String]) -> BinarySidecar {
    let mut child = Command::new(path())
        .arg("run")
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the binary starts");
    let stderr = child.stderr.take().expect("stderr is piped");
    let addr = listening_addr(stderr).await;
    BinarySidecar { child, addr }
}

impl BinarySidecar {
    /// SIGKILL: no chance to flush or clean up, as in an OOM kill.
    pub async fn kill(mut self) {
        self.child.kill().await.expect("the child can be killed");
    }
}

/// Reads a child's log until it names the proxy address, then keeps draining it in the
/// background so the child never blocks on a full pipe.
pub async fn listening_addr(stderr: tokio::process::ChildStderr) -> SocketAddr {
    let mut lines = BufReader::new(stderr).lines();
    let addr = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.expect("readable stderr") {
            if let Some(at) = line.find("proxy listening addr=") {
                let rest = &line[at + "proxy listening addr=".len()..];
                let addr = rest.split_whitespace().next().expect("an address");
                return addr.parse::<SocketAddr>().expect("a socket address");
            }
        }
        panic!("the binary exited before listening");
    })
    .await
    .expect("the binary listens within 30 s");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    addr
}

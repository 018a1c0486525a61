//! The redis-servers of the benchmark's Redis variants: one server, or three masters joined
//! into a cluster, each on a free loopback port in a directory of its own, with the
//! append-only file on and `appendfsync` as the variant says. Started fresh for every
//! measurement and killed after it.

use crate::procs;
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

/// When redis-server syncs its append-only file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fsync {
    /// Before it answers each write: as durable as idemproxy's own store.
    Always,
    /// Once a second: a crash of the machine can lose the last second of writes.
    Everysec,
}

impl Fsync {
    fn setting(self) -> &'static str {
        match self {
            Fsync::Always => "always",
            Fsync::Everysec => "everysec",
        }
    }
}

/// Running redis-servers, killed when dropped.
pub struct Redis {
    servers: Vec<(Child, u16)>,
    _dir: tempfile::TempDir,
}

impl Redis {
    /// One server.
    pub async fn single(program: &Path, fsync: Fsync) -> anyhow::Result<Redis> {
        Redis::start(program, fsync, 1).await
    }

    /// Three masters with every slot assigned, `cluster_state:ok` on each.
    pub async fn cluster(program: &Path, fsync: Fsync) -> anyhow::Result<Redis> {
        let redis = Redis::start(program, fsync, 3).await?;
        let cli = program.with_file_name("redis-cli");
        let created = Command::new(if cli.exists() {
            cli
        } else {
            PathBuf::from("redis-cli")
        })
        .args(["--cluster", "create"])
        .args(
            redis
                .servers
                .iter()
                .map(|(_, port)| format!("127.0.0.1:{port}")),
        )
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .context("cannot run redis-cli")?;
        anyhow::ensure!(created.success(), "redis-cli --cluster create failed");
        for (_, port) in &redis.servers {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while !command(*port, &["CLUSTER", "INFO"])
                .await
                .is_ok_and(|info| info.contains("cluster_state:ok"))
            {
                if tokio::time::Instant::now() >= deadline {
                    bail!("the cluster was not ok on port {port} within 30 s");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(redis)
    }

    async fn start(program: &Path, fsync: Fsync, nodes: usize) -> anyhow::Result<Redis> {
        let dir = tempfile::tempdir()?;
        let cluster = nodes > 1;
        let mut servers = Vec::with_capacity(nodes);
        for node in 0..nodes {
            let port = free_port_with_bus()?;
            let node_dir = dir.path().join(format!("node-{node}"));
            std::fs::create_dir(&node_dir)?;
            let mut command = Command::new(program);
            command
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .arg("--dir")
                .arg(&node_dir)
                .args(["--save", "", "--appendonly", "yes"])
                .args(["--appendfsync", fsync.setting()])
                .args(["--protected-mode", "no", "--daemonize", "no"]);
            if cluster {
                command.args([
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                ]);
            }
            let child = command
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("cannot start {}", program.display()))?;
            servers.push((child, port));
        }
        for (_, port) in &servers {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while command(*port, &["PING"]).await.is_err() {
                if tokio::time::Instant::now() >= deadline {
                    bail!("redis-server did not answer on port {port} within 30 s");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(Redis { servers, _dir: dir })
    }

    /// `--redis-url` for the sidecar: the server, or the cluster's seed nodes.
    pub fn url(&self) -> String {
        let urls: Vec<String> = self
            .servers
            .iter()
            .map(|(_, port)| format!("redis://127.0.0.1:{port}"))
            .collect();
        urls.join(",")
    }

    /// The servers' process ids, for their CPU time.
    pub fn pids(&self) -> Vec<u32> {
        self.servers
            .iter()
            .filter_map(|(child, _)| child.id())
            .collect()
    }
}

/// A free loopback port whose cluster bus port (+10000) is free too.
fn free_port_with_bus() -> anyhow::Result<u16> {
    loop {
        let port = procs::free_port()?.port();
        if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return Ok(port);
        }
    }
}

/// Sends one command in RESP and returns the reply as text (an error reply is an `Err`).
async fn command(port: u16, args: &[&str]) -> anyhow::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    stream.write_all(request.as_bytes()).await?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    // A status line, or a bulk string whose length its first line gives.
    loop {
        let n = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await??;
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&reply);
        let Some(first_end) = text.find("\r\n") else {
            continue;
        };
        match text.as_bytes()[0] {
            b'$' => {
                let len: usize = text[1..first_end].parse().unwrap_or(0);
                if reply.len() >= first_end + 2 + len {
                    break;
                }
            }
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&reply).into_owned();
    if text.starts_with('-') || text.is_empty() {
        bail!("redis answered {text:?}");
    }
    Ok(text)
}

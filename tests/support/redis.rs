//! Real redis-server processes for the tests: one server, or a three-master cluster, each on
//! free loopback ports in its own directory, killed when dropped. `scripts/test` installs
//! redis-server when it is missing.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One redis-server child process.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    cluster: bool,
    /// Extra settings (TLS, a password); readiness is then the port accepting connections.
    extra: Vec<String>,
}

/// A port free now on loopback, with its cluster bus port (+10000) free too.
fn free_port() -> u16 {
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        let port = listener.local_addr().expect("bound").port();
        if port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

fn redis_server() -> &'static str {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    assert!(
        found,
        "redis-server is not installed: run scripts/test, which installs it"
    );
    "redis-server"
}

fn spawn(port: u16, dir: &Path, cluster: bool, extra: &[String]) -> Child {
    let mut command = Command::new(redis_server());
    command
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .arg("--dir")
        .arg(dir)
        .args([
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
        ])
        .args(["--protected-mode", "no", "--daemonize", "no"])
        .args(["--maxmemory-policy", "noeviction"])
        // Last, so a test's own settings win over the defaults above.
        .args(extra);
    if cluster {
        command.args([
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "2000",
        ]);
    }
    command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server starts")
}

/// A plain connection to the test server on `port`, or `None` while it cannot answer.
pub fn connect(port: u16) -> Option<redis::Connection> {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .and_then(|client| client.get_connection_with_timeout(Duration::from_millis(500)))
        .ok()
}

/// Runs one command against `port` and returns its reply, or `None` while it cannot answer.
pub fn command(port: u16, args: &[&str]) -> Option<redis::Value> {
    let mut connection = connect(port)?;
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    cmd.query(&mut connection).ok()
}

fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl RedisServer {
    /// A single server, ready to answer.
    pub fn start() -> RedisServer {
        RedisServer::start_node(false)
    }

    fn start_node(cluster: bool) -> RedisServer {
        let dir = tempfile::tempdir().expect("a temp dir");
        RedisServer::start_in(dir, cluster, |_, _| Vec::new())
    }

    /// A single server with extra settings, made from its port and directory: `--port 0
    /// --tls-port PORT` for TLS only, `--requirepass` for a password.
    pub fn start_with(extra: impl FnOnce(u16, &Path) -> Vec<String>) -> RedisServer {
        RedisServer::start_in(tempfile::tempdir().expect("a temp dir"), false, extra)
    }

    fn start_in(
        dir: tempfile::TempDir,
        cluster: bool,
        extra: impl FnOnce(u16, &Path) -> Vec<String>,
    ) -> RedisServer {
        let port = free_port();
        let extra = extra(port, dir.path());
        let mut server = RedisServer {
            child: Some(spawn(port, dir.path(), cluster, &extra)),
            port,
            dir,
            cluster,
            extra,
        };
        server.wait_ready();
        server
    }

    fn wait_ready(&mut self) {
        let port = self.port;
        if self.extra.is_empty() {
            wait_until("redis-server to answer PING", || {
                command(port, &["PING"]).is_some()
            });
        } else {
            wait_until("redis-server to listen", || {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            });
        }
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILL, as a crashed Redis.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and directory (its append-only file is kept).
    pub fn restart(&mut self) {
        self.kill();
        self.child = Some(spawn(self.port, self.dir.path(), self.cluster, &self.extra));
        self.wait_ready();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Three masters with `--cluster-enabled`, slots assigned, state ok.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts the nodes and joins them into one cluster.
    pub fn start() -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..3).map(|_| RedisServer::start_node(true)).collect();
        let addresses: Vec<String> = nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port))
            .collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli runs");
        assert!(created.success(), "redis-cli --cluster create failed");
        for node in &nodes {
            let port = node.port;
            wait_until("the cluster to be ok on every node", || {
                match command(port, &["CLUSTER", "INFO"]) {
                    Some(redis::Value::BulkString(info)) => {
                        String::from_utf8_lossy(&info).contains("cluster_state:ok")
                    }
                    Some(redis::Value::VerbatimString { text, .. }) => {
                        text.contains("cluster_state:ok")
                    }
                    _ => false,
                }
            });
        }
        RedisCluster { nodes }
    }

    /// The seed nodes, comma-separated, as `--redis-url` takes them.
    pub fn urls(&self) -> String {
        let urls: Vec<String> = self.nodes.iter().map(RedisServer::url).collect();
        urls.join(",")
    }
}

/// The Redis a test sidecar runs on, kept alive as long as the sidecar.
pub enum TestRedis {
    Single(RedisServer),
    Cluster(RedisCluster),
}

//! Real redis-server processes for the tests: one server, a three-master cluster, or a master
//! with a replica and three sentinels (`RedisSentinels`), each on free loopback ports in its own
//! directory, killed when dropped. `scripts/test` installs redis-server and redis-sentinel when
//! they are missing.

use std::collections::HashMap;
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

/// `binary`, once it answers `--version`; else the test fails saying how to get it (`package`).
fn installed(binary: &'static str, package: &str) -> &'static str {
    let found = Command::new(binary)
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    assert!(
        found,
        "{binary} is not installed: run scripts/test, which installs Debian's {package}"
    );
    binary
}

fn redis_server() -> &'static str {
    installed("redis-server", "redis-server")
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

    /// The process id, to stop and continue it (`kill -STOP`, `-CONT`).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Starts it again on the same port and directory as a replica of the server on `port`,
    /// as a Redis pod restarted after a failover does.
    pub fn restart_as_replica_of(&mut self, port: u16) {
        self.extra
            .extend(["--replicaof".into(), "127.0.0.1".into(), port.to_string()]);
        self.restart();
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
    Sentinel(RedisSentinels),
}

/// The name the test sentinels monitor their master under.
pub const MASTER_NAME: &str = "idemproxy-test";

/// One redis-sentinel child process, with its config file (which it rewrites) in its own
/// directory.
pub struct SentinelNode {
    child: Option<Child>,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl SentinelNode {
    /// A sentinel watching the master on `master_port`, answering PING. A port found free
    /// may be taken before the sentinel binds it (it then exits): it is started again on
    /// another.
    fn start(master_port: u16, timing: SentinelTiming) -> SentinelNode {
        installed("redis-sentinel", "redis-sentinel");
        for _ in 0..5 {
            let dir = tempfile::tempdir().expect("a temp dir");
            let port = free_port();
            let config = dir.path().join("sentinel.conf");
            std::fs::write(
                &config,
                sentinel_config(port, dir.path(), master_port, timing),
            )
            .expect("writes the sentinel's config");
            let mut child = Command::new("redis-sentinel")
                .arg(&config)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-sentinel starts");
            let mut exited = false;
            wait_until("redis-sentinel to answer PING", || {
                exited = child.try_wait().is_ok_and(|status| status.is_some());
                exited || command(port, &["PING"]).is_some()
            });
            if !exited {
                return SentinelNode {
                    child: Some(child),
                    port,
                    _dir: dir,
                };
            }
        }
        panic!("redis-sentinel exited at start five times (ports taken?)")
    }

    /// What this sentinel says of the master (`SENTINEL MASTER`), field by field.
    pub fn master_info(&self) -> HashMap<String, String> {
        command(self.port, &["SENTINEL", "MASTER", MASTER_NAME])
            .and_then(|reply| redis::from_redis_value(reply).ok())
            .unwrap_or_default()
    }

    /// The port of the node this sentinel names master now.
    pub fn master_port(&self) -> Option<u16> {
        let reply = command(
            self.port,
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME],
        )?;
        let addr: Vec<String> = redis::from_redis_value(reply).ok()?;
        addr.get(1)?.parse().ok()
    }
}

impl Drop for SentinelNode {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A test sentinel's config file: loopback, its own directory, the master watched under
/// `MASTER_NAME` with quorum 2.
fn sentinel_config(port: u16, dir: &Path, master_port: u16, timing: SentinelTiming) -> String {
    let SentinelTiming {
        down_after_ms,
        failover_timeout_ms,
    } = timing;
    format!(
        "port {port}\nbind 127.0.0.1\nprotected-mode no\ndaemonize no\ndir {dir}\nlogfile {dir}/sentinel.log\n\
         sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n\
         sentinel down-after-milliseconds {MASTER_NAME} {down_after_ms}\n\
         sentinel failover-timeout {MASTER_NAME} {failover_timeout_ms}\n\
         sentinel parallel-syncs {MASTER_NAME} 1\n",
        dir = dir.display()
    )
}

/// How fast the test sentinels fail over.
#[derive(Debug, Clone, Copy)]
pub struct SentinelTiming {
    /// `down-after-milliseconds`: a master silent this long is down to a sentinel.
    pub down_after_ms: u64,
    /// `failover-timeout`: a failover stuck this long is tried again (after twice as long).
    pub failover_timeout_ms: u64,
}

impl Default for SentinelTiming {
    fn default() -> Self {
        SentinelTiming {
            down_after_ms: 1_000,
            failover_timeout_ms: 3_000,
        }
    }
}

/// A master, one replica of it and three sentinels watching it (quorum 2), each on free
/// loopback ports.
pub struct RedisSentinels {
    pub master: RedisServer,
    pub replica: RedisServer,
    pub sentinels: Vec<SentinelNode>,
}

impl RedisSentinels {
    /// The nodes and sentinels, the replica in sync and every sentinel naming the master.
    /// `data` are more settings of both data nodes (`--min-replicas-to-write 1`, say).
    pub fn start(data: &[&str], timing: SentinelTiming) -> RedisSentinels {
        RedisSentinels::start_through(data, timing, |port| port)
    }

    /// `start`, with the replica and the sentinels reaching the master at the port
    /// `through(master port)` gives (a relay's), so that the sentinels take the replica's
    /// master to be the one they watch.
    pub fn start_through(
        data: &[&str],
        timing: SentinelTiming,
        through: impl FnOnce(u16) -> u16,
    ) -> RedisSentinels {
        // A replica's first sync starts at once, not after Redis' 5 s wait for more replicas.
        let extra: Vec<String> = ["--repl-diskless-sync-delay", "0"]
            .iter()
            .chain(data)
            .map(|arg| (*arg).to_owned())
            .collect();
        let master_extra = extra.clone();
        let master = RedisServer::start_with(move |_, _| master_extra);
        let seen_at = through(master.port);
        let master_port = seen_at.to_string();
        let replica = RedisServer::start_with(move |_, _| {
            let mut args = vec!["--replicaof".into(), "127.0.0.1".into(), master_port];
            args.extend(extra);
            args
        });
        wait_until("the replica in sync", || {
            replication_info(replica.port).contains("master_link_status:up")
        });
        let sentinels: Vec<SentinelNode> = (0..3)
            .map(|_| SentinelNode::start(seen_at, timing))
            .collect();
        RedisSentinels {
            master,
            replica,
            sentinels,
        }
    }

    /// Waits until each sentinel knows the other two and the replica: only then can they
    /// agree on a failover and find a replica to promote.
    pub fn wait_until_failover_ready(&self) {
        for sentinel in &self.sentinels {
            wait_until("every sentinel to know the others and the replica", || {
                let info = sentinel.master_info();
                info.get("num-other-sentinels").map(String::as_str) == Some("2")
                    && info.get("num-slaves").map(String::as_str) == Some("1")
            });
        }
    }

    /// The sentinels, as `--redis-sentinels` takes them.
    pub fn addresses(&self) -> String {
        let addresses: Vec<String> = self
            .sentinels
            .iter()
            .map(|sentinel| format!("127.0.0.1:{}", sentinel.port))
            .collect();
        addresses.join(",")
    }

    /// The port every sentinel names master, once they agree.
    pub fn agreed_master_port(&self) -> Option<u16> {
        let first = self.sentinels[0].master_port()?;
        self.sentinels
            .iter()
            .all(|sentinel| sentinel.master_port() == Some(first))
            .then_some(first)
    }
}

/// `INFO replication` of the node on `port`, or "" while it cannot answer.
pub fn replication_info(port: u16) -> String {
    match command(port, &["INFO", "replication"]) {
        Some(redis::Value::BulkString(info)) => String::from_utf8_lossy(&info).into_owned(),
        Some(redis::Value::VerbatimString { text, .. }) => text,
        _ => String::new(),
    }
}

//! Real PostgreSQL servers for the tests: the distribution's PostgreSQL, initialised in a
//! directory of its own and started on a free loopback port (as the `postgres` user when the
//! tests run as root, which PostgreSQL refuses to run as), as `bench/src/postgres_server.rs`
//! does for the benchmark. One server per test binary serves every sidecar of the dedup
//! suite, each in a table of its own (`fresh_table`); tests that stop or kill a server start
//! their own. A small shell stays beside each server and stops it (then removes its
//! directory) when its standard input closes, which happens when the test process ends
//! however it ends: a server never outlives its tests. `scripts/test` installs PostgreSQL
//! when it is missing.

use std::io::Write;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The role every test server is initialised with (trust authentication on loopback).
pub const USER: &str = "idemproxy";

/// One PostgreSQL server and the shell that stops it.
pub struct PostgresServer {
    pub port: u16,
    pub dir: PathBuf,
    keeper: Option<Child>,
}

/// The directory of `initdb` and `postgres`: the newest under `/usr/lib/postgresql/*/bin`.
pub fn bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("postgres").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .expect("PostgreSQL is not installed: run scripts/test, which installs it")
}

/// The `postgres` user's ids when the tests run as root; `None` otherwise.
pub fn run_as() -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let probe = tempfile::tempdir().expect("a temp dir");
    if std::fs::metadata(probe.path()).expect("its metadata").uid() != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").expect("/etc/passwd");
    let ids = passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&"postgres"))
            .then(|| Some((fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?)))
            .flatten()
    });
    Some(ids.expect("running as root needs a postgres user (the postgresql package makes one)"))
}

/// A port free now on loopback.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
    listener.local_addr().expect("bound").port()
}

/// A command run as the server's owner.
pub fn as_owner(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new(program);
    if let Some((uid, gid)) = run_as() {
        command.uid(uid).gid(gid);
    }
    command
}

/// A new directory the server's owner may write, kept (the keeper removes it).
pub fn owned_dir() -> PathBuf {
    let dir = tempfile::Builder::new()
        .prefix("idemproxy-pg-")
        .tempdir()
        .expect("a temp dir")
        .keep();
    if let Some((uid, gid)) = run_as() {
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).expect("chown to postgres");
    }
    dir
}

/// Initialises a cluster in `data`.
pub fn initdb(data: &Path) {
    let output = as_owner(bin_dir().join("initdb"))
        .arg("-D")
        .arg(data)
        .args(["-U", USER, "--auth=trust", "-E", "UTF8", "--no-sync"])
        .stdout(Stdio::null())
        .output()
        .expect("initdb runs");
    assert!(
        output.status.success(),
        "initdb failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

impl PostgresServer {
    /// A new server with `settings` (`name=value` each) on a free port.
    pub fn start(settings: &[&str]) -> PostgresServer {
        let dir = owned_dir();
        initdb(&dir.join("data"));
        PostgresServer::start_in(dir, free_port(), settings)
    }

    /// Starts the cluster in `dir/data` on `port`, and waits until it answers.
    pub fn start_in(dir: PathBuf, port: u16, settings: &[&str]) -> PostgresServer {
        // Stops the server when the test process closes the pipe (or writes a line), then
        // removes its files unless the line was `keep`.
        let keeper = r#"dir="$1"; shift; "$@" & pid=$!; read -r line; kill -INT "$pid"; wait "$pid"; [ "$line" = keep ] || rm -rf "$dir""#;
        let mut command = as_owner("sh");
        command
            .args(["-c", keeper, "sh"])
            .arg(&dir)
            .arg(bin_dir().join("postgres"))
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-p", &port.to_string(), "-k"])
            .arg(&dir)
            .args(["-c", "listen_addresses=127.0.0.1"]);
        for setting in settings {
            command.args(["-c", setting]);
        }
        let keeper = command
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("postgres starts");
        let server = PostgresServer {
            port,
            dir,
            keeper: Some(keeper),
        };
        server.wait_until_ready();
        server
    }

    /// Waits until the server accepts connections (60 s at most).
    pub fn wait_until_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.is_ready() {
            assert!(
                Instant::now() < deadline,
                "PostgreSQL did not start within 60 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the server accepts connections now.
    pub fn is_ready(&self) -> bool {
        Command::new(bin_dir().join("pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
            .status()
            .is_ok_and(|status| status.success())
    }

    /// The conninfo of its `postgres` database, as `--postgres-url` takes it.
    pub fn url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user={USER} dbname=postgres sslmode=disable",
            self.port
        )
    }

    /// A connection for the test itself (its connection task spawned on this runtime).
    pub async fn connect(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .expect("the test connects to PostgreSQL");
        tokio::spawn(connection);
        client
    }

    /// Stops the server (a fast shutdown) and waits for it; its directory is removed.
    pub fn stop(mut self) {
        if let Some(mut keeper) = self.keeper.take() {
            drop(keeper.stdin.take());
            let _ = keeper.wait();
        }
    }

    /// Stops the server but keeps its directory (a restart, a standby's base backup).
    pub fn stop_keeping_files(mut self) -> PathBuf {
        if let Some(mut keeper) = self.keeper.take() {
            if let Some(mut stdin) = keeper.stdin.take() {
                let _ = stdin.write_all(b"keep\n");
            }
            let _ = keeper.wait();
        }
        self.dir.clone()
    }

    /// The postmaster's process id, from its pid file.
    pub fn postmaster_pid(&self) -> u32 {
        let text = std::fs::read_to_string(self.dir.join("data/postmaster.pid"))
            .expect("the postmaster's pid file");
        text.lines()
            .next()
            .and_then(|line| line.trim().parse().ok())
            .expect("a pid on the first line")
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        if let Some(mut keeper) = self.keeper.take() {
            drop(keeper.stdin.take());
            let _ = keeper.wait();
        }
    }
}

/// The server of this test binary, started on first use and stopped when the process ends.
pub fn shared() -> &'static PostgresServer {
    static SERVER: OnceLock<PostgresServer> = OnceLock::new();
    // fsync off: the dedup suite checks behaviour, not what survives a power cut, and its
    // many small commits would otherwise wait on the disk.
    SERVER.get_or_init(|| PostgresServer::start(&["fsync=off", "max_connections=300"]))
}

/// A table name no other sidecar of this test binary uses.
pub fn fresh_table() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("records_{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Sends `signal` (`KILL`, `STOP`, `CONT`) to the processes `pids`, by id.
pub fn signal(signal: &str, pids: &[u32]) {
    if pids.is_empty() {
        return;
    }
    let mut command = Command::new("kill");
    command.arg(format!("-{signal}"));
    for pid in pids {
        command.arg(pid.to_string());
    }
    let _ = command.stderr(Stdio::null()).status();
}

/// The processes whose parent is `parent`, from /proc.
pub fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            // `pid (comm) state ppid …`: the fields after the last parenthesis.
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    let rest = stat.rsplit_once(')')?.1.to_owned();
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

impl PostgresServer {
    /// SIGKILLs the postmaster and every backend it started, as a machine's crash would end
    /// them: nothing is shut down, nothing more is sent to a standby.
    pub fn kill_hard(&self) {
        let postmaster = self.postmaster_pid();
        let children = children_of(postmaster);
        signal("KILL", &[postmaster]);
        signal("KILL", &children);
    }

    /// Makes a standby of this server: a base backup (`pg_basebackup -R`) started on a free
    /// port with `settings`.
    pub fn start_standby(&self, settings: &[&str]) -> PostgresServer {
        let dir = owned_dir();
        let status = as_owner(bin_dir().join("pg_basebackup"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", USER])
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-R", "-X", "stream", "--no-sync"])
            .stdout(Stdio::null())
            .status()
            .expect("pg_basebackup runs");
        assert!(status.success(), "pg_basebackup failed");
        PostgresServer::start_in(dir, free_port(), settings)
    }

    /// Promotes this standby and waits until it takes writes.
    pub fn promote(&self) {
        let status = as_owner(bin_dir().join("pg_ctl"))
            .args(["promote", "-w", "-t", "60", "-D"])
            .arg(self.dir.join("data"))
            .stdout(Stdio::null())
            .status()
            .expect("pg_ctl runs");
        assert!(status.success(), "pg_ctl promote failed");
    }
}

//! The PostgreSQL servers of the PostgreSQL variants (the sidecar's store, the dedup-table
//! cure): the distribution's PostgreSQL, initialised and started by the benchmark in a
//! directory of its own (as the `postgres` user when the benchmark runs as root, which
//! PostgreSQL refuses to run as), `fsync` and `synchronous_commit` on, stopped and removed
//! after each measurement. With a synchronous standby, a second server is made from the
//! primary's base backup (`pg_basebackup -R`) in a directory of its own, and the primary
//! names it in `synchronous_standby_names`: every commit waits for the standby's flush.

use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};

/// The role every benchmark server is initialised with (trust authentication on loopback).
const USER: &str = "bench";

/// The standby's name, as its `cluster_name` (which its WAL receiver reports as its
/// application name) and as the primary's `synchronous_standby_names` lists it.
const STANDBY_NAME: &str = "bench_standby";

/// How long a server may take to accept connections, or a standby to become synchronous.
const READY_WITHIN: Duration = Duration::from_secs(60);

/// The directory of `initdb` and `postgres`: `dir` when given, else the newest under
/// `/usr/lib/postgresql/*/bin` (Debian's layout), else `None`.
pub fn find_bin_dir(dir: Option<&Path>) -> Option<PathBuf> {
    if let Some(dir) = dir {
        return dir.join("postgres").is_file().then(|| dir.to_owned());
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("postgres").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// Whether the primary runs alone or with a synchronous standby.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Replication {
    /// One server.
    Alone,
    /// A primary and one streaming standby it waits for at every commit.
    SyncStandby,
}

/// One running postmaster in a directory of its own, stopped when dropped (SIGKILL) or by
/// `stop` (a fast shutdown).
struct Server {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Starts the cluster in `dir/data` on a free loopback port with `settings`
    /// (`name=value` each), and waits until it accepts connections.
    async fn start(
        bin_dir: &Path,
        dir: tempfile::TempDir,
        owner: Option<(u32, u32)>,
        settings: &[String],
    ) -> anyhow::Result<Server> {
        let port = crate::procs::free_port()?.port();
        let mut server = Command::new(bin_dir.join("postgres"));
        server
            .arg("-D")
            .arg(dir.path().join("data"))
            .args(["-p", &port.to_string(), "-k"])
            .arg(dir.path())
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "fsync=on", "-c", "synchronous_commit=on"]);
        for setting in settings {
            server.args(["-c", setting]);
        }
        server
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        if let Some((uid, gid)) = owner {
            server.uid(uid).gid(gid);
        }
        let child = server.spawn().context("cannot start postgres")?;
        let server = Server {
            child,
            port,
            _dir: dir,
        };
        let deadline = tokio::time::Instant::now() + READY_WITHIN;
        while tokio_postgres::connect(&server.config(), tokio_postgres::NoTls)
            .await
            .is_err()
        {
            if tokio::time::Instant::now() >= deadline {
                bail!("PostgreSQL did not accept connections within {READY_WITHIN:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(server)
    }

    fn config(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user={USER} dbname=postgres",
            self.port
        )
    }

    fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// A fast shutdown (SIGINT): the postmaster ends its backends, then itself.
    async fn stop(mut self) {
        let pid = self.pid().to_string();
        let asked = Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .await
            .is_ok_and(|status| status.success());
        if !asked
            || tokio::time::timeout(Duration::from_secs(10), self.child.wait())
                .await
                .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// A running PostgreSQL: the primary the clients use, and its synchronous standby if any.
pub struct Postgres {
    primary: Server,
    standby: Option<Server>,
}

impl Postgres {
    /// Initialises a cluster in a new directory and starts it on a free loopback port; with
    /// `SyncStandby`, makes and starts its standby too, and returns once the primary reports
    /// it synchronous.
    pub async fn start(bin_dir: &Path, replication: Replication) -> anyhow::Result<Postgres> {
        let owner = run_as()?;
        let dir = owned_dir(owner)?;
        let mut initdb = Command::new(bin_dir.join("initdb"));
        initdb
            .arg("-D")
            .arg(dir.path().join("data"))
            .args(["-U", USER, "--auth=trust", "-E", "UTF8", "--no-sync"])
            .stdout(Stdio::null());
        run_owned(initdb, owner, "initdb").await?;
        let settings = match replication {
            Replication::Alone => Vec::new(),
            Replication::SyncStandby => vec![format!("synchronous_standby_names={STANDBY_NAME}")],
        };
        let primary = Server::start(bin_dir, dir, owner, &settings).await?;
        let standby = match replication {
            Replication::Alone => None,
            Replication::SyncStandby => Some(start_standby(bin_dir, &primary, owner).await?),
        };
        Ok(Postgres { primary, standby })
    }

    /// The connection string of the primary's `postgres` database.
    pub fn config(&self) -> String {
        self.primary.config()
    }

    /// The postmasters' process ids, primary first (their backends are their children).
    pub fn pids(&self) -> Vec<u32> {
        std::iter::once(&self.primary)
            .chain(self.standby.as_ref())
            .map(Server::pid)
            .collect()
    }

    /// Stops the standby, then the primary (fast shutdowns).
    pub async fn stop(self) {
        if let Some(standby) = self.standby {
            standby.stop().await;
        }
        self.primary.stop().await;
    }
}

/// Makes a standby of `primary` from its base backup, starts it, and waits until the primary
/// lists it as synchronous.
async fn start_standby(
    bin_dir: &Path,
    primary: &Server,
    owner: Option<(u32, u32)>,
) -> anyhow::Result<Server> {
    let dir = owned_dir(owner)?;
    let mut backup = Command::new(bin_dir.join("pg_basebackup"));
    backup
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &primary.port.to_string(),
            "-U",
            USER,
        ])
        .arg("-D")
        .arg(dir.path().join("data"))
        .args(["-R", "-X", "stream", "--no-sync"])
        .stdout(Stdio::null());
    run_owned(backup, owner, "pg_basebackup").await?;
    let standby = Server::start(
        bin_dir,
        dir,
        owner,
        &[format!("cluster_name={STANDBY_NAME}")],
    )
    .await?;
    let (client, connection) = tokio_postgres::connect(&primary.config(), tokio_postgres::NoTls)
        .await
        .context("cannot connect to the primary")?;
    tokio::spawn(connection);
    let deadline = tokio::time::Instant::now() + READY_WITHIN;
    loop {
        let synchronous: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_replication \
                 WHERE application_name = $1 AND sync_state = 'sync'",
                &[&STANDBY_NAME],
            )
            .await?
            .get(0);
        if synchronous == 1 {
            return Ok(standby);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("the standby was not synchronous within {READY_WITHIN:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A new directory the servers' owner may write, removed when dropped.
fn owned_dir(owner: Option<(u32, u32)>) -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
            .context("cannot give the PostgreSQL directory to the postgres user")?;
    }
    Ok(dir)
}

/// Runs `command` (as `owner` when given) to its end; fails with its standard error.
async fn run_owned(
    mut command: Command,
    owner: Option<(u32, u32)>,
    what: &str,
) -> anyhow::Result<()> {
    if let Some((uid, gid)) = owner {
        command.uid(uid).gid(gid);
    }
    let output = command
        .stderr(Stdio::piped())
        .output()
        .await
        .with_context(|| format!("cannot run {what}"))?;
    if !output.status.success() {
        bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// The `postgres` user's ids when the benchmark runs as root; `None` otherwise.
fn run_as() -> anyhow::Result<Option<(u32, u32)>> {
    use std::os::unix::fs::MetadataExt;
    // Root owns the directories it creates; anyone else runs PostgreSQL as themselves.
    let probe = tempfile::tempdir()?;
    if std::fs::metadata(probe.path())?.uid() != 0 {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    let ids = passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&"postgres"))
            .then(|| Some((fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?)))
            .flatten()
    });
    ids.map(Some).context(
        "PostgreSQL will not run as root, and there is no postgres user to run it as (the distribution's postgresql package creates one)",
    )
}

//! The PostgreSQL server of the dedup-table cure: the distribution's PostgreSQL, initialised
//! and started by the benchmark in a directory of its own (as the `postgres` user when the
//! benchmark runs as root, which PostgreSQL refuses to run as), `fsync` and
//! `synchronous_commit` on, stopped and removed after each measurement.

use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};

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

/// A running PostgreSQL, stopped when dropped (SIGKILL) or by `stop` (a fast shutdown).
pub struct Postgres {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Postgres {
    /// Initialises a cluster in a new directory and starts it on a free loopback port.
    pub async fn start(bin_dir: &Path) -> anyhow::Result<Postgres> {
        let dir = tempfile::tempdir()?;
        let owner = run_as()?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .context("cannot give the PostgreSQL directory to the postgres user")?;
        }
        let data = dir.path().join("data");
        let mut initdb = Command::new(bin_dir.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", "bench", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some((uid, gid)) = owner {
            initdb.uid(uid).gid(gid);
        }
        let output = initdb.output().await.context("cannot run initdb")?;
        if !output.status.success() {
            bail!(
                "initdb failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let port = crate::procs::free_port()?.port();
        let mut server = Command::new(bin_dir.join("postgres"));
        server
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(dir.path())
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "fsync=on", "-c", "synchronous_commit=on"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        if let Some((uid, gid)) = owner {
            server.uid(uid).gid(gid);
        }
        let child = server.spawn().context("cannot start postgres")?;
        let postgres = Postgres {
            child,
            port,
            _dir: dir,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while tokio_postgres::connect(&postgres.config(), tokio_postgres::NoTls)
            .await
            .is_err()
        {
            if tokio::time::Instant::now() >= deadline {
                bail!("PostgreSQL did not accept connections within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(postgres)
    }

    /// The connection string of its `postgres` database.
    pub fn config(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=bench dbname=postgres",
            self.port
        )
    }

    /// The postmaster's process id (its backends are its children).
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// A fast shutdown (SIGINT): the postmaster ends its backends, then itself.
    pub async fn stop(mut self) {
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

//! A real Patroni cluster for the tests: the distribution's etcd (`etcd-server`) and two
//! Patroni members (`patroni`, running the distribution's PostgreSQL), each on a host of a
//! `netns::Network` of the test's own, as Patroni's docs lay one out: synchronous replication
//! that never falls back to asynchronous (`synchronous_mode_strict`), `pg_rewind` (data
//! checksums, `wal_log_hints`) for an old primary to rejoin, and short `ttl`, `loop_wait` and
//! `retry_timeout` so that a failover takes seconds. Each process runs beside a small shell
//! that stops it when the test process closes its standard input, which happens when the
//! test ends however it ends; the member's directory goes with it. `scripts/test` installs
//! etcd and Patroni when they are missing.

use super::netns::Network;
use super::postgres::{bin_dir, children_of, owned_dir, signal, USER};
use super::require;
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The host etcd runs on; the tests' own calls to Patroni (`patronictl`, its REST API) come
/// from there too, as an operator's would.
pub const ETCD_HOST: &str = "etcd";

/// The hosts of the two members.
pub const MEMBER_HOSTS: [&str; 2] = ["pg-1", "pg-2"];

/// PostgreSQL's port on each member's host.
pub const POSTGRES_PORT: u16 = 5432;

/// Patroni's REST API port on each member's host.
const REST_PORT: u16 = 8008;

/// etcd's client port.
const ETCD_PORT: u16 = 2379;

/// The leader key's time to live, Patroni's main loop, its retries of etcd and PostgreSQL:
/// `loop_wait + 2 × retry_timeout ≤ ttl`, as Patroni requires, and a failover within
/// about `ttl`.
const TTL_S: u32 = 6;
const LOOP_WAIT_S: u32 = 1;
const RETRY_TIMEOUT_S: u32 = 2;

/// How long a walsender or walreceiver waits for a silent peer: a primary cut off from its
/// standby shuts down (demoted by Patroni) only once its walsender gives up, 60 s by
/// PostgreSQL's default.
const WAL_PEER_TIMEOUT: &str = "5s";

/// A standby this close to its leader's WAL has caught up: under load the positions each
/// member last reported (once a `loop_wait`) are seldom equal, but a standby that is still
/// replaying a rewind or a backlog is further behind.
const CAUGHT_UP_BYTES: u64 = 1024 * 1024;

/// The longest wait for the cluster to settle (a leader and a streaming synchronous standby).
const SETTLE_WAIT: Duration = Duration::from_secs(120);

/// A process on a host of the network, beside the shell that stops it.
struct Kept {
    keeper: Child,
    pid: u32,
}

/// The shell around a kept process: starts it (its output appended to `$1`), says its pid,
/// then waits for a line. `keep`: it leaves the process alone (it was killed, and will be
/// started again); anything else, or the pipe closing: the process is stopped (SIGTERM, then
/// SIGKILL after 10 s), any PostgreSQL left in `$2` is killed, and the directory `$2` removed.
const KEEPER: &str = r#"log="$1"; dir="$2"; shift 2; "$@" >>"$log" 2>&1 & pid=$!; echo "$pid"
read -r line; [ "$line" = keep ] && exit 0
kill -TERM "$pid" 2>/dev/null; n=0; while kill -0 "$pid" 2>/dev/null && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
kill -KILL "$pid" 2>/dev/null
[ -f "$dir/data/postmaster.pid" ] && kill -KILL "$(head -n 1 "$dir/data/postmaster.pid")" 2>/dev/null
rm -rf "$dir""#;

impl Kept {
    fn start(dir: &std::path::Path, command: &[String]) -> Kept {
        let mut keeper = Command::new("sh")
            .args(["-c", KEEPER, "sh"])
            .arg(dir.join("log"))
            .arg(dir)
            .args(command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("sh runs");
        let mut line = String::new();
        std::io::BufReader::new(keeper.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("the keeper says the pid");
        let pid = line.trim().parse().expect("a pid");
        Kept { keeper, pid }
    }

    /// Leaves the process (already killed) and its directory, and ends the keeper.
    fn forget(mut self) {
        if let Some(mut stdin) = self.keeper.stdin.take() {
            let _ = stdin.write_all(b"keep\n");
        }
        let _ = self.keeper.wait();
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        drop(self.keeper.stdin.take());
        let _ = self.keeper.wait();
    }
}

/// One Patroni member: its host, directory and config, and the running Patroni.
pub struct Member {
    pub name: String,
    pub host: &'static str,
    dir: PathBuf,
    patroni: Option<Kept>,
}

/// What Patroni's REST API says of one member (`GET /cluster`).
#[derive(Debug, Clone, PartialEq)]
pub struct MemberState {
    pub name: String,
    pub role: String,
    pub state: String,
    pub timeline: Option<u64>,
    pub lag: Option<u64>,
}

/// A running cluster: its network, etcd and both members.
pub struct Cluster {
    pub members: [Member; 2],
    synchronous: bool,
    etcd: Option<Kept>,
}

/// Patroni's config of member `index`.
fn member_config(
    net: &Network,
    scope: &str,
    index: usize,
    dir: &std::path::Path,
    synchronous: bool,
) -> String {
    let host = MEMBER_HOSTS[index];
    let addr = net.addr(host);
    let etcd = net.addr(ETCD_HOST);
    let subnet = format!(
        "{}/24",
        std::net::Ipv4Addr::from(u32::from(addr) & 0xffff_ff00)
    );
    let (data, bin) = (dir.join("data"), bin_dir());
    let (data, bin, dir) = (data.display(), bin.display(), dir.display());
    format!(
        r#"scope: {scope}
name: member-{index}
log:
  level: INFO
restapi:
  listen: {addr}:{REST_PORT}
  connect_address: {addr}:{REST_PORT}
etcd3:
  hosts: {etcd}:{ETCD_PORT}
bootstrap:
  dcs:
    ttl: {TTL_S}
    loop_wait: {LOOP_WAIT_S}
    retry_timeout: {RETRY_TIMEOUT_S}
    maximum_lag_on_failover: 1048576
    synchronous_mode: {synchronous}
    synchronous_mode_strict: {synchronous}
    postgresql:
      use_pg_rewind: true
      use_slots: true
      parameters:
        wal_log_hints: "on"
        max_wal_senders: 5
        max_replication_slots: 5
        max_connections: 200
        wal_sender_timeout: {WAL_PEER_TIMEOUT}
        wal_receiver_timeout: {WAL_PEER_TIMEOUT}
        fsync: "off"
  initdb:
    - encoding: UTF8
    - data-checksums
    - no-sync
  pg_hba:
    - local all all trust
    - host all all {subnet} trust
    - host replication all {subnet} trust
postgresql:
  listen: {addr}:{POSTGRES_PORT}
  connect_address: {addr}:{POSTGRES_PORT}
  data_dir: {data}
  bin_dir: {bin}
  pgpass: {dir}/pgpass
  authentication:
    superuser:
      username: {USER}
      password: unused-with-trust
    replication:
      username: replicator
      password: unused-with-trust
    rewind:
      username: {USER}
      password: unused-with-trust
  parameters:
    unix_socket_directories: {dir}
"#
    )
}

impl Member {
    fn config(&self) -> PathBuf {
        self.dir.join("patroni.yml")
    }

    /// Starts this member's Patroni (as the PostgreSQL user, on its host).
    fn start(&mut self, net: &Network) {
        assert!(self.patroni.is_none(), "{} runs already", self.name);
        let (uid, gid) = super::postgres::run_as().expect("Patroni's tests run as root");
        let mut command = net.on(self.host);
        command.extend([
            "setpriv".to_owned(),
            format!("--reuid={uid}"),
            format!("--regid={gid}"),
            "--clear-groups".to_owned(),
            "patroni".to_owned(),
            self.config().display().to_string(),
        ]);
        self.patroni = Some(Kept::start(&self.dir, &command));
    }

    /// SIGKILLs this member's Patroni and its PostgreSQL (the postmaster and every backend),
    /// as a machine's crash would end them.
    fn kill(&mut self) {
        let patroni = self.patroni.take().expect("Patroni runs");
        let postmaster = std::fs::read_to_string(self.dir.join("data/postmaster.pid"))
            .ok()
            .and_then(|text| text.lines().next()?.trim().parse::<u32>().ok());
        signal("KILL", &[patroni.pid]);
        if let Some(postmaster) = postmaster {
            let backends = children_of(postmaster);
            signal("KILL", &[postmaster]);
            signal("KILL", &backends);
        }
        patroni.forget();
    }

    /// The last lines of this member's log (Patroni's and PostgreSQL's), for a failure.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Cluster {
    /// Starts etcd and both members on `net` (which has the hosts `ETCD_HOST` and
    /// `MEMBER_HOSTS`), and waits until one leads with the other as its standby: a
    /// synchronous one that writes wait for (`synchronous_mode_strict`), or, when not
    /// `synchronous`, an asynchronous one (Patroni's default).
    pub fn start(net: &Network, synchronous: bool) -> Cluster {
        require("etcd", "etcd-server");
        require("patroni", "patroni");
        require("patronictl", "patroni");
        require("setpriv", "util-linux");
        assert!(
            bin_dir().join("pg_rewind").is_file(),
            "pg_rewind is not installed: run scripts/test, which installs PostgreSQL"
        );
        let etcd_dir = owned_dir();
        let etcd = net.addr(ETCD_HOST);
        let mut command = net.on(ETCD_HOST);
        command.extend(
            [
                "etcd",
                "--name",
                "etcd",
                "--data-dir",
                &etcd_dir.join("data").display().to_string(),
                "--listen-client-urls",
                &format!("http://{etcd}:{ETCD_PORT}"),
                "--advertise-client-urls",
                &format!("http://{etcd}:{ETCD_PORT}"),
                "--listen-peer-urls",
                &format!("http://{etcd}:2380"),
                "--initial-advertise-peer-urls",
                &format!("http://{etcd}:2380"),
                "--initial-cluster",
                &format!("etcd=http://{etcd}:2380"),
                // Its own durability is not what these tests are about.
                "--unsafe-no-fsync",
            ]
            .map(str::to_owned),
        );
        let etcd = Kept::start(&etcd_dir, &command);
        let scope = format!("idemproxy-{}", std::process::id());
        let members = [0, 1].map(|index| {
            let dir = owned_dir();
            let config = member_config(net, &scope, index, &dir, synchronous);
            std::fs::write(dir.join("patroni.yml"), config).expect("writes the config");
            Member {
                name: format!("member-{index}"),
                host: MEMBER_HOSTS[index],
                dir,
                patroni: None,
            }
        });
        let mut cluster = Cluster {
            members,
            synchronous,
            etcd: Some(etcd),
        };
        for member in &mut cluster.members {
            member.start(net);
        }
        cluster.settled(net);
        cluster
    }

    /// The multi-host URL of both members, as a sidecar takes it: the primary is whichever
    /// takes writes (`target_session_attrs=read-write`).
    pub fn url(&self, net: &Network) -> String {
        let [one, two] = MEMBER_HOSTS.map(|host| net.addr(host));
        format!(
            "postgres://{USER}@{one}:{POSTGRES_PORT},{two}:{POSTGRES_PORT}/postgres\
             ?target_session_attrs=read-write&sslmode=disable&connect_timeout=1"
        )
    }

    /// The members as Patroni's REST API on `from` (a member's host) reports them, asked
    /// from etcd's host; `None` when it does not answer.
    pub fn members_seen_by(&self, net: &Network, from: &str) -> Option<Vec<MemberState>> {
        let api = SocketAddr::from((net.addr(from), REST_PORT));
        let (status, body) = net.http_get(ETCD_HOST, api, "/cluster")?;
        if status != 200 {
            return None;
        }
        let cluster: serde_json::Value = serde_json::from_str(&body).ok()?;
        let members = cluster.get("members")?.as_array()?;
        Some(
            members
                .iter()
                .map(|member| MemberState {
                    name: member["name"].as_str().unwrap_or_default().to_owned(),
                    role: member["role"].as_str().unwrap_or_default().to_owned(),
                    state: member["state"].as_str().unwrap_or_default().to_owned(),
                    timeline: member["timeline"].as_u64(),
                    lag: member["lag"].as_u64(),
                })
                .collect(),
        )
    }

    /// The index of the member that leads as `from` sees it.
    pub fn leader_seen_by(&self, net: &Network, from: &str) -> Option<usize> {
        let members = self.members_seen_by(net, from)?;
        let leader = members
            .iter()
            .find(|member| member.role == "leader" && member.state == "running")?;
        self.members
            .iter()
            .position(|member| member.name == leader.name)
    }

    /// Whether one member leads and the other is its standby (synchronous when the cluster
    /// is), streaming on the leader's timeline and caught up, as both members see it.
    fn is_settled(&self, net: &Network) -> Option<usize> {
        let standby_role = if self.synchronous {
            "sync_standby"
        } else {
            "replica"
        };
        let mut leaders = MEMBER_HOSTS.iter().map(|host| {
            let members = self.members_seen_by(net, host)?;
            let leader = members
                .iter()
                .find(|m| m.role == "leader" && m.state == "running")?;
            let standby = members.iter().find(|m| m.role == standby_role)?;
            let in_step = matches!(standby.state.as_str(), "running" | "streaming")
                && standby.timeline == leader.timeline
                && standby.lag.is_some_and(|lag| lag <= CAUGHT_UP_BYTES);
            in_step.then(|| self.members.iter().position(|m| m.name == leader.name))?
        });
        let first = leaders.next()??;
        (leaders.next()?? == first).then_some(first)
    }

    /// Waits until the cluster has settled; the index of its leader.
    pub fn settled(&self, net: &Network) -> usize {
        let deadline = Instant::now() + SETTLE_WAIT;
        loop {
            if let Some(leader) = self.is_settled(net) {
                return leader;
            }
            assert!(
                Instant::now() < deadline,
                "the Patroni cluster did not settle within {SETTLE_WAIT:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until member `index` leads, as its own Patroni says (60 s at most).
    pub fn wait_leading(&self, net: &Network, index: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.leader_seen_by(net, self.members[index].host) != Some(index) {
            assert!(
                Instant::now() < deadline,
                "{} was not promoted within 60 s\n{}",
                self.members[index].name,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILLs member `index`'s Patroni and PostgreSQL.
    pub fn kill(&mut self, index: usize) {
        self.members[index].kill();
    }

    /// Starts member `index`'s Patroni again on its directory: it rejoins as Patroni decides
    /// (`pg_rewind`, or a new base backup).
    pub fn restart(&mut self, net: &Network, index: usize) {
        self.members[index].start(net);
    }

    /// `patronictl switchover` from the leader `from` to the other member, as an operator
    /// runs it (from etcd's host); returns once patronictl has.
    pub fn switchover(&self, net: &Network, from: usize) {
        let output = net
            .command(ETCD_HOST, "patronictl")
            .arg("-c")
            .arg(self.members[from].config())
            .args(["switchover", "--leader", &self.members[from].name])
            .args(["--candidate", &self.members[1 - from].name, "--force"])
            .output()
            .expect("patronictl runs");
        let said = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && said.contains("Successfully switched over"),
            "patronictl switchover failed: {said}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Both members' last log lines.
    pub fn logs(&self) -> String {
        self.members
            .iter()
            .map(|member| format!("--- {} ---\n{}", member.name, member.log_tail()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // The members first (each stops its PostgreSQL), then etcd.
        for member in &mut self.members {
            drop(member.patroni.take());
            // A member killed and not started again has no keeper to remove its directory.
            let _ = std::fs::remove_dir_all(&member.dir);
        }
        drop(self.etcd.take());
    }
}

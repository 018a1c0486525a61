//! A network of the test's own: one network namespace per host, each with one address on a
//! bridge that lives in a namespace of its own (the "hub"), so that a partition is real: the
//! hub's bridge drops what one host sends another (nft, bridge family), and a TCP peer sees
//! what it would see on a cut network, silence, not a refused connection. Addresses are
//! `10.77.0.N/24`, and exist only inside these namespaces: nothing here is routed to the
//! machine's own network, let alone beyond it.
//!
//! The test process itself stays in the machine's namespace. It reaches a host through
//! `expose` (a loopback port of the test's that relays to an address inside the host), and a
//! host reaches the test through `reach_from` (a loopback port inside the host that relays to
//! the test): both make their sockets in the host's namespace from a thread that joined it
//! for that one call (`setns`), so no thread of the runtime ever changes namespace.
//!
//! The namespaces go when the `Network` is dropped, and when the test process ends however it
//! ends (a shell beside it deletes them when its standard input closes). Needs root, as
//! `ip netns` does.

use std::ffi::OsStr;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// The first three octets of every host's address.
const SUBNET: [u8; 3] = [10, 77, 0];

/// Hosts of one network, at most (their addresses are `.1` to `.HOSTS_MAX`).
const HOSTS_MAX: usize = 32;

/// How long a relay waits for a connection inside a host.
const CONNECT_WAIT: Duration = Duration::from_secs(2);

/// The namespaces of one test's network, and the relays into and out of them.
pub struct Network {
    prefix: String,
    hosts: Vec<String>,
    keeper: Option<Child>,
    relays: Mutex<Vec<tokio::task::AbortHandle>>,
}

/// Runs `program args` and fails the test, naming the command, when it fails.
fn run(program: &str, args: &[&str]) {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("{program} does not run: {error}"));
    assert!(
        output.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Deletes the namespaces a test process left behind when it was killed (named for its pid).
fn delete_stale_namespaces() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("ipx-")
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

impl Network {
    /// Makes one namespace per host in `hosts`, each on the hub's bridge at its address.
    pub fn new(hosts: &[&str]) -> Network {
        assert!(hosts.len() <= HOSTS_MAX, "at most {HOSTS_MAX} hosts");
        assert!(
            rustix::process::geteuid().is_root(),
            "network namespaces need root: run the tests as root (CI does)"
        );
        super::require("ip", "iproute2");
        super::require("nft", "nftables");
        delete_stale_namespaces();
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let prefix = format!(
            "ipx-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let hub = format!("{prefix}-hub");
        let names: Vec<String> = hosts
            .iter()
            .map(|host| format!("{prefix}-{host}"))
            .collect();
        // The keeper deletes every namespace once the test process closes its standard input.
        let keeper = Command::new("sh")
            .args([
                "-c",
                r#"read -r line; for ns; do ip netns del "$ns" 2>/dev/null; done"#,
            ])
            .arg("sh")
            .arg(&hub)
            .args(&names)
            .stdin(Stdio::piped())
            .spawn()
            .expect("sh runs");
        run("ip", &["netns", "add", &hub]);
        run(
            "ip",
            &["-n", &hub, "link", "add", "name", "hub", "type", "bridge"],
        );
        run("ip", &["-n", &hub, "link", "set", "hub", "up"]);
        for (index, name) in names.iter().enumerate() {
            let port = format!("port{index}");
            let addr = format!("{}/24", Network::address(index));
            run("ip", &["netns", "add", name]);
            run(
                "ip",
                &[
                    "-n", &hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                    "netns", name,
                ],
            );
            run(
                "ip",
                &["-n", &hub, "link", "set", &port, "master", "hub", "up"],
            );
            run("ip", &["-n", name, "addr", "add", &addr, "dev", "eth0"]);
            run("ip", &["-n", name, "link", "set", "eth0", "up"]);
            run("ip", &["-n", name, "link", "set", "lo", "up"]);
        }
        let net = Network {
            prefix,
            hosts: hosts.iter().map(|host| (*host).to_owned()).collect(),
            keeper: Some(keeper),
            relays: Mutex::new(Vec::new()),
        };
        net.nft("add table bridge partition");
        net.nft("add chain bridge partition forward { type filter hook forward priority 0 ; }");
        net
    }

    fn address(index: usize) -> Ipv4Addr {
        let last = u8::try_from(index + 1).expect("at most HOSTS_MAX hosts");
        Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], last)
    }

    fn index(&self, host: &str) -> usize {
        self.hosts
            .iter()
            .position(|known| known == host)
            .unwrap_or_else(|| panic!("no host {host} in this network"))
    }

    /// The address of `host` on the network.
    pub fn addr(&self, host: &str) -> Ipv4Addr {
        Network::address(self.index(host))
    }

    /// The name of `host`'s namespace.
    pub fn namespace(&self, host: &str) -> String {
        format!("{}-{}", self.prefix, self.hosts[self.index(host)])
    }

    /// The words that run a program on `host` (`ip netns exec NS`), for a wrapper.
    pub fn on(&self, host: &str) -> Vec<String> {
        ["ip", "netns", "exec"]
            .map(str::to_owned)
            .into_iter()
            .chain([self.namespace(host)])
            .collect()
    }

    /// A command that runs `program` on `host`.
    pub fn command(&self, host: &str, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.namespace(host)])
            .arg(program);
        command
    }

    /// Cuts `host` off from each of `others`, both ways: the hub drops their packets.
    pub fn cut(&self, host: &str, others: &[&str]) {
        let addr = self.addr(host);
        for other in others {
            let other = self.addr(other);
            for (from, to) in [(addr, other), (other, addr)] {
                self.nft(&format!(
                    "add rule bridge partition forward ip saddr {from} ip daddr {to} drop"
                ));
            }
        }
    }

    /// Ends every cut.
    pub fn heal(&self) {
        self.nft("flush chain bridge partition forward");
    }

    /// Runs the nft command `command` (words separated by spaces) in the hub.
    fn nft(&self, command: &str) {
        let hub = format!("{}-hub", self.prefix);
        let mut args = vec!["netns", "exec", &hub, "nft"];
        args.extend(command.split_whitespace());
        run("ip", &args);
    }

    /// Runs `f` on a thread of its own that has joined `host`'s namespace: sockets it makes
    /// stay in that namespace.
    pub fn within<T: Send>(&self, host: &str, f: impl FnOnce() -> T + Send) -> T {
        within(&self.namespace(host), f)
    }

    /// A loopback address of the test's own that relays each connection to `addr` inside
    /// `host`'s namespace (the test's clients reach a sidecar on a host this way).
    pub async fn expose(&self, host: &str, addr: SocketAddr) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let local = listener.local_addr().expect("bound");
        let namespace = self.namespace(host);
        let task = tokio::spawn(async move {
            while let Ok((mut outside, _)) = listener.accept().await {
                let namespace = namespace.clone();
                tokio::spawn(async move {
                    let inside = tokio::task::spawn_blocking(move || {
                        within(&namespace, || {
                            std::net::TcpStream::connect_timeout(&addr, CONNECT_WAIT)
                        })
                    })
                    .await
                    .expect("the connecting thread does not panic");
                    // A connection that cannot be made is closed: the client sees it fail.
                    let Ok(inside) = inside else { return };
                    inside.set_nonblocking(true).expect("a non-blocking socket");
                    let mut inside =
                        tokio::net::TcpStream::from_std(inside).expect("a tokio socket");
                    let _ = tokio::io::copy_bidirectional(&mut outside, &mut inside).await;
                });
            }
        });
        self.relays.lock().unwrap().push(task.abort_handle());
        local
    }

    /// A loopback address inside `host`'s namespace that relays each connection to `target`,
    /// an address of the test's own (a sidecar on a host reaches the test's upstream so).
    pub async fn reach_from(&self, host: &str, target: SocketAddr) -> SocketAddr {
        let listener = self
            .within(host, || std::net::TcpListener::bind("127.0.0.1:0"))
            .expect("a loopback port inside the host");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking socket");
        let local = listener.local_addr().expect("bound");
        let listener = tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
        let task = tokio::spawn(async move {
            while let Ok((mut inside, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let Ok(mut outside) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut inside, &mut outside).await;
                });
            }
        });
        self.relays.lock().unwrap().push(task.abort_handle());
        local
    }

    /// One HTTP GET of `path` at `addr` from `host` (HTTP/1.0, 2 s at most): the status and
    /// the body, or `None` when no answer came.
    pub fn http_get(&self, host: &str, addr: SocketAddr, path: &str) -> Option<(u16, String)> {
        use std::io::Read;
        let mut stream = self
            .within(host, || {
                std::net::TcpStream::connect_timeout(&addr, CONNECT_WAIT)
            })
            .ok()?;
        stream.set_read_timeout(Some(CONNECT_WAIT)).ok()?;
        stream.set_write_timeout(Some(CONNECT_WAIT)).ok()?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let (head, body) = response.split_once("\r\n\r\n")?;
        let status = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((status, body.to_owned()))
    }
}

/// `Network::within` by namespace name.
fn within<T: Send>(namespace: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let file = std::fs::File::open(format!("/run/netns/{namespace}"))
                    .unwrap_or_else(|error| panic!("namespace {namespace}: {error}"));
                rustix::thread::move_into_link_name_space(
                    std::os::fd::AsFd::as_fd(&file),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .unwrap_or_else(|error| panic!("setns into {namespace}: {error}"));
                f()
            })
            .join()
            .expect("the thread in the namespace does not panic")
    })
}

impl Drop for Network {
    fn drop(&mut self) {
        for relay in self.relays.lock().unwrap().drain(..) {
            relay.abort();
        }
        if let Some(mut keeper) = self.keeper.take() {
            if let Some(mut stdin) = keeper.stdin.take() {
                let _ = stdin.write_all(b"\n");
            }
            let _ = keeper.wait();
        }
    }
}

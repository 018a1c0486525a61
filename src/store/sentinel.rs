//! The Redis master under Sentinel (`--store redis-sentinel`): which node it is, and following
//! it across failovers. The records, scripts and waiting duplicates are `redis.rs`'s, as on
//! one Redis; this module only says which node they go to.
//!
//! The sentinels are asked which node is the master of the monitored name through the client
//! library's lookup (each sentinel's `SENTINEL MASTERS`, a master flagged down skipped, and the
//! node named asked `ROLE`, so a node that says it is a replica is never taken). One
//! multiplexed connection to that master serves every call until something says it may no
//! longer be the master: a command on it that broke or did not answer in time, a `READONLY`
//! answer (the node is a replica now), a readiness check whose `ROLE` is not master, or
//! `+switch-master` from the sentinel this process subscribes to (a lost subscription counts
//! as a switch missed). The connection is then forgotten, and the next call asks the
//! sentinels again. Forgetting never retries anything: the call whose command failed fails
//! closed, as on one Redis, and nothing is forwarded without a claim the master took.
//!
//! Never held across an await: the lock of the current master. Lookups go one at a time (an
//! async mutex), so a failover does not send every waiting call to the sentinels at once.

use super::StoreError;
use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisError, RedisResult};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::oneshot;

/// Longest pause between two attempts to subscribe to a sentinel's `+switch-master`.
const RESUBSCRIBE_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// The channel on which a sentinel announces a new master:
/// `<name> <old ip> <old port> <new ip> <new port>`.
const SWITCH_MASTER: &str = "+switch-master";

/// `--redis-sentinels` as URLs: each `host:port` (a sentinel has no default port worth
/// guessing), or a `redis://` / `rediss://` URL (with the sentinels' own password, when they
/// have one, as its user info); all with TLS or all without, and one password for all.
pub fn parse_sentinels(text: &str) -> Result<Vec<String>, String> {
    let mut urls = Vec::new();
    let mut first: Option<ConnectionInfo> = None;
    for entry in text
        .split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
    {
        let url = if entry.contains("://") {
            entry.to_owned()
        } else {
            format!("redis://{entry}")
        };
        let Some((_, rest)) = url.split_once("://") else {
            unreachable!("the URL has a scheme")
        };
        let authority = rest.split('/').next().unwrap_or_default();
        let host_port = authority.rsplit_once('@').map_or(authority, |(_, at)| at);
        let explicit_port = host_port.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !explicit_port || !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            return Err(format!(
                "{entry:?} is not a sentinel's host:port (or a redis:// or rediss:// URL with a port)"
            ));
        }
        let info = url
            .as_str()
            .into_connection_info()
            .map_err(|error| format!("{entry:?}: {error}"))?;
        if info.redis_settings().db() != 0 {
            return Err(format!("{entry:?}: a sentinel has no databases to select"));
        }
        if let Some(first) = &first {
            if tls(first) != tls(&info) {
                return Err("give every sentinel with TLS (rediss://) or none".into());
            }
            let auth = |info: &ConnectionInfo| {
                let settings = info.redis_settings();
                (
                    settings.username().map(str::to_owned),
                    settings.password().map(str::to_owned),
                )
            };
            if auth(first) != auth(&info) {
                return Err("give every sentinel the same user and password".into());
            }
        } else {
            first = Some(info);
        }
        urls.push(url);
    }
    if urls.is_empty() {
        return Err("name at least one sentinel, host:port, separated by commas".into());
    }
    Ok(urls)
}

fn tls(info: &ConnectionInfo) -> bool {
    matches!(info.addr(), ConnectionAddr::TcpTls { .. })
}

/// The master in use: its address and one multiplexed connection to it, numbered so that a
/// failure forgets only the connection it happened on, never one found after it.
#[derive(Clone)]
struct Master {
    generation: u64,
    addr: String,
    client: redis::Client,
    connection: MultiplexedConnection,
}

/// Which node the sentinels name master, as last found.
pub struct Sentinel {
    name: String,
    lookup: tokio::sync::Mutex<SentinelClient>,
    current: Mutex<Option<Master>>,
    /// The address of the last master found, to log only a change.
    last_addr: Mutex<String>,
    generations: AtomicU64,
    timeout: Duration,
    /// Dropped with the store: ends the `+switch-master` subscription.
    _stop: oneshot::Sender<()>,
}

/// How to reach the sentinels and the master they name: `--redis-sentinels` (as
/// `parse_sentinels` gave them), the master's name, its password, the certificates a
/// `rediss://` node is verified against (`None`: the system's roots), the connections' TCP
/// settings, and the bound of one lookup.
pub struct SentinelSettings<'a> {
    /// The sentinels' URLs.
    pub urls: &'a [String],
    /// The name they monitor the master under.
    pub name: &'a str,
    /// The data nodes' password.
    pub password: Option<&'a str>,
    /// The CA of `rediss://` nodes and sentinels.
    pub certificates: Option<redis::TlsCertificates>,
    /// Every connection's TCP settings.
    pub tcp: redis::io::tcp::TcpSettings,
    /// Longest wait for one lookup (the sentinels, then the master they name).
    pub timeout: Duration,
}

impl Sentinel {
    /// The master behind `settings`' sentinels, looked up at the first call; subscribes to
    /// `+switch-master` at once. Must run inside a tokio runtime. Errors only on settings that
    /// can never work.
    pub fn new(settings: SentinelSettings<'_>) -> RedisResult<Arc<Sentinel>> {
        let SentinelSettings {
            urls,
            name,
            password,
            certificates,
            tcp,
            timeout,
        } = settings;
        let infos = urls
            .iter()
            .map(|url| url.as_str().into_connection_info())
            .collect::<RedisResult<Vec<_>>>()?;
        let Some(first) = infos.first() else {
            return Err(RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "no sentinel given",
            )));
        };
        let addrs = infos.iter().map(|info| info.addr().clone());
        let mut builder = SentinelClientBuilder::new(addrs, name, SentinelServerType::Master)?
            .set_client_to_redis_tcp_settings(tcp.clone())
            .set_client_to_sentinel_tcp_settings(tcp.clone());
        if let Some(user) = first.redis_settings().username() {
            builder = builder.set_client_to_sentinel_username(user);
        }
        if let Some(password) = first.redis_settings().password() {
            builder = builder.set_client_to_sentinel_password(password);
        }
        if let Some(password) = password {
            builder = builder.set_client_to_redis_password(password);
        }
        let tls = tls(first);
        let mut subscribers = Vec::with_capacity(infos.len());
        for info in infos.iter().cloned() {
            let info = info.set_tcp_settings(tcp.clone());
            subscribers.push(match (&certificates, tls) {
                (Some(certificates), true) => {
                    redis::Client::build_with_tls(info, certificates.clone())?
                }
                _ => redis::Client::open(info)?,
            });
        }
        if tls {
            // The master speaks TLS when its sentinels do.
            builder = builder.set_client_to_redis_tls_mode(redis::TlsMode::Secure);
            if let Some(certificates) = certificates {
                builder = builder
                    .set_client_to_redis_certificates(certificates.clone())
                    .set_client_to_sentinel_certificates(certificates);
            }
        }
        let (stop, stopped) = oneshot::channel();
        let sentinel = Arc::new(Sentinel {
            name: name.to_owned(),
            lookup: tokio::sync::Mutex::new(builder.build()?),
            current: Mutex::new(None),
            last_addr: Mutex::new(String::new()),
            generations: AtomicU64::new(0),
            timeout,
            _stop: stop,
        });
        tokio::spawn(follow(
            Arc::downgrade(&sentinel),
            subscribers,
            name.to_owned(),
            stopped,
        ));
        Ok(sentinel)
    }

    fn current(&self) -> Option<Master> {
        self.current
            .lock()
            .expect("the master's lock is never held across a panic")
            .clone()
    }

    /// A connection to the master, asking the sentinels when none is known.
    pub async fn connection(self: &Arc<Self>) -> Result<MasterConnection, StoreError> {
        let master = self.master().await?;
        Ok(MasterConnection {
            sentinel: self.clone(),
            generation: master.generation,
            addr: master.addr,
            connection: master.connection,
        })
    }

    /// A client of the master (for the change subscriber), asking when none is known.
    pub async fn client(self: &Arc<Self>) -> Result<redis::Client, StoreError> {
        Ok(self.master().await?.client)
    }

    async fn master(&self) -> Result<Master, StoreError> {
        if let Some(master) = self.current() {
            return Ok(master);
        }
        let mut lookup = self.lookup.lock().await;
        // Another call may have found it while this one waited for the lookup.
        if let Some(master) = self.current() {
            return Ok(master);
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let found = tokio::time::timeout(self.timeout, async {
            let client = lookup.async_get_client().await?;
            let connection = client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            Ok::<_, RedisError>((client, connection))
        })
        .await;
        let (client, connection) = match found {
            Ok(Ok(found)) => found,
            Ok(Err(error)) => {
                return Err(StoreError::Io(format!(
                    "Redis Sentinel: no usable master named {:?}: {error}",
                    self.name
                )))
            }
            Err(_) => {
                return Err(StoreError::Io(format!(
                    "Redis Sentinel: the sentinels and the master of {:?} gave no connection within {:?}",
                    self.name, self.timeout
                )))
            }
        };
        let master = Master {
            generation: self.generations.fetch_add(1, Ordering::Relaxed) + 1,
            addr: client.get_connection_info().addr().to_string(),
            client,
            connection,
        };
        let mut last = self.last_addr.lock().expect("never held across a panic");
        if *last != master.addr {
            tracing::info!(master = %master.addr, name = %self.name, previous = %last, "Redis master found by the sentinels");
            last.clone_from(&master.addr);
        }
        drop(last);
        *self.current.lock().expect("never held across a panic") = Some(master.clone());
        Ok(master)
    }

    /// Forgets the master in use if it is still the one of `generation` (any, with `None`):
    /// the next call asks the sentinels again.
    fn forget(&self, generation: Option<u64>, why: &str) {
        let mut current = self.current.lock().expect("never held across a panic");
        let Some(master) = current.as_ref() else {
            return;
        };
        if generation.is_none_or(|generation| generation == master.generation) {
            tracing::warn!(master = %master.addr, why, "asking the Redis sentinels for the master again");
            *current = None;
        }
    }

    /// What readiness says of the master in use.
    pub fn describe(&self, addr: &str) -> String {
        format!(
            "Redis master {addr}, named {:?} by the sentinels",
            self.name
        )
    }
}

/// Whether an error says the node may no longer be the master to write to: the connection
/// broke or timed out, or the node answered as a replica (or one still loading or cut off
/// from its master) would.
fn not_the_master(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
        || error.is_unrecoverable_error()
        || matches!(error.code(), Some("READONLY" | "MASTERDOWN" | "LOADING"))
}

/// The connection to the master of one call: a command on it that fails as on a node that is
/// no longer the master, or does not finish (its bound ran out), forgets that master.
#[derive(Clone)]
pub struct MasterConnection {
    sentinel: Arc<Sentinel>,
    generation: u64,
    /// The master's `host:port`.
    pub addr: String,
    /// The connection commands go through.
    pub connection: MultiplexedConnection,
}

impl MasterConnection {
    /// Watches one command: call `Watch::settle` with its result.
    pub fn watch(&self) -> Watch {
        Watch {
            sentinel: self.sentinel.clone(),
            generation: self.generation,
            settled: false,
        }
    }

    /// Forgets this master (a readiness check found it is not one any more).
    pub fn forget(&self, why: &str) {
        self.sentinel.forget(Some(self.generation), why);
    }

    /// What readiness says of it.
    pub fn describe(&self) -> String {
        self.sentinel.describe(&self.addr)
    }
}

/// One command on the master; dropped unsettled (its bound ran out), it forgets the master.
pub struct Watch {
    sentinel: Arc<Sentinel>,
    generation: u64,
    settled: bool,
}

impl Watch {
    /// The command's result: an error that says the node may no longer be the master
    /// forgets it.
    pub fn settle<T>(mut self, result: &RedisResult<T>) {
        self.settled = true;
        if let Err(error) = result {
            if not_the_master(error) {
                self.sentinel
                    .forget(Some(self.generation), &error.to_string());
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if !self.settled {
            self.sentinel
                .forget(Some(self.generation), "a command got no answer in time");
        }
    }
}

/// The `+switch-master` subscription: on one sentinel at a time, rotating when it is lost.
/// A switch of our master forgets it; so does a subscription made again, as a switch may have
/// come while none listened. Ends when the store is dropped.
async fn follow(
    sentinel: Weak<Sentinel>,
    clients: Vec<redis::Client>,
    name: String,
    mut stopped: oneshot::Receiver<()>,
) {
    let mut backoff = Duration::from_millis(50);
    let mut subscribed_before = false;
    for client in clients.iter().cycle() {
        let subscribing = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(SWITCH_MASTER).await?;
            Ok::<_, RedisError>(pubsub)
        };
        let pubsub = tokio::select! {
            subscribed = tokio::time::timeout(RESUBSCRIBE_BACKOFF_MAX, subscribing) => subscribed,
            _ = &mut stopped => return,
        };
        let Ok(Ok(pubsub)) = pubsub else {
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                _ = &mut stopped => return,
            }
            backoff = (backoff * 2).min(RESUBSCRIBE_BACKOFF_MAX);
            continue;
        };
        backoff = Duration::from_millis(50);
        if subscribed_before {
            let Some(current) = sentinel.upgrade() else {
                return;
            };
            current.forget(
                None,
                "subscribed to a sentinel again: a switch may have been missed",
            );
        }
        subscribed_before = true;
        let mut messages = pubsub.into_on_message();
        loop {
            let message = tokio::select! {
                message = messages.next() => message,
                _ = &mut stopped => return,
            };
            let Some(message) = message else {
                break;
            };
            let payload: String = message.get_payload().unwrap_or_default();
            if payload.split_whitespace().next() == Some(name.as_str()) {
                let Some(current) = sentinel.upgrade() else {
                    return;
                };
                current.forget(
                    None,
                    &format!("the sentinels switched the master: {payload}"),
                );
            }
        }
        tracing::warn!(
            "lost the subscription to a sentinel's +switch-master; trying the next sentinel"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::parse_sentinels;

    #[test]
    fn sentinel_lists_are_host_ports_or_urls_with_ports() {
        assert_eq!(
            parse_sentinels(" s-0:26379, s-1:26379 ,").unwrap(),
            ["redis://s-0:26379", "redis://s-1:26379"]
        );
        assert_eq!(
            parse_sentinels("rediss://:pw@s-0:26379").unwrap(),
            ["rediss://:pw@s-0:26379"]
        );
        for bad in [
            "",
            " , ",
            "s-0",
            "s-0:",
            ":26379",
            "s-0:0",
            "s-0:99999",
            "http://s-0:26379",
            "redis://s-0:26379/2",
            "redis://s-0:26379,rediss://s-1:26379",
            "redis://:a@s-0:26379,redis://:b@s-1:26379",
        ] {
            assert!(parse_sentinels(bad).is_err(), "{bad:?} must be refused");
        }
    }
}

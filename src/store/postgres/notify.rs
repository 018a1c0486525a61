//! Waking waiting duplicates on PostgreSQL (issue 32 item 6): one connection per process
//! LISTENs on the table's channel; each replaced or deleted record is announced there (by
//! the swap's own statement, so on its commit) with its key in hex, and wakes the waiters of
//! that key. Every waiter also polls, so a lost connection or notification only delays it;
//! a reconnected listener wakes them all, as it may have missed changes. This module never
//! reads or writes a record.

use super::tls::MakeRustls;
use futures_util::StreamExt;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_postgres::AsyncMessage;

/// Longest pause between two attempts to reconnect the listener.
const RELISTEN_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Notifications waiting for the waking loop at most; past it they are dropped (the waiters
/// poll).
const NOTIFICATIONS_QUEUED_MAX: usize = 4_096;

/// The waiters of this process, by key hex.
pub struct Notifier {
    keys: Mutex<HashMap<String, Waiters>>,
    poll_interval: Duration,
}

struct Waiters {
    changes: watch::Sender<u64>,
    count: usize,
}

/// Unregisters one waiter when its wait ends, however it ends.
struct Waiting {
    notifier: Arc<Notifier>,
    key: String,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut keys = self.notifier.keys.lock().expect("no panic holds this lock");
        if let Some(waiters) = keys.get_mut(&self.key) {
            waiters.count -= 1;
            if waiters.count == 0 {
                keys.remove(&self.key);
            }
        }
    }
}

impl Notifier {
    /// A notifier whose listener connects with `config` and LISTENs on `channel`.
    pub fn start(
        config: tokio_postgres::Config,
        tls: MakeRustls,
        channel: String,
        poll_interval: Duration,
    ) -> Arc<Notifier> {
        let notifier = Arc::new(Notifier {
            keys: Mutex::new(HashMap::new()),
            poll_interval,
        });
        tokio::spawn(listen(config, tls, channel, Arc::downgrade(&notifier)));
        notifier
    }

    /// Registers a waiter of `key` now (so no change after this call is missed) and returns
    /// the wait: a notification, or the poll interval.
    pub fn watch(self: &Arc<Self>, key: String) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let mut changes = {
            let mut keys = self.keys.lock().expect("no panic holds this lock");
            let waiters = keys.entry(key.clone()).or_insert_with(|| Waiters {
                changes: watch::channel(0).0,
                count: 0,
            });
            waiters.count += 1;
            waiters.changes.subscribe()
        };
        let waiting = Waiting {
            notifier: self.clone(),
            key,
        };
        let poll_interval = self.poll_interval;
        Box::pin(async move {
            let _waiting = waiting;
            tokio::select! {
                _ = changes.changed() => {}
                () = tokio::time::sleep(poll_interval) => {}
            }
        })
    }

    fn wake(&self, key: &str) {
        let keys = self.keys.lock().expect("no panic holds this lock");
        if let Some(waiters) = keys.get(key) {
            waiters.changes.send_modify(|n| *n += 1);
        }
    }

    fn wake_all(&self) {
        let keys = self.keys.lock().expect("no panic holds this lock");
        for waiters in keys.values() {
            waiters.changes.send_modify(|n| *n += 1);
        }
    }
}

/// The listener task: keeps one LISTENing connection up and wakes waiters on each
/// notification. Ends when the notifier is dropped.
async fn listen(
    config: tokio_postgres::Config,
    tls: MakeRustls,
    channel: String,
    notifier: Weak<Notifier>,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let listened = listen_once(&config, &tls, &channel, &notifier).await;
        if notifier.strong_count() == 0 {
            return;
        }
        if listened {
            backoff = Duration::from_millis(50);
        } else {
            backoff = (backoff * 2).min(RELISTEN_BACKOFF_MAX);
        }
        tracing::debug!(
            "PostgreSQL change listener lost; waiting duplicates poll until it is back"
        );
        tokio::time::sleep(backoff).await;
    }
}

/// One listening connection, until it breaks; whether it got as far as listening.
async fn listen_once(
    config: &tokio_postgres::Config,
    tls: &MakeRustls,
    channel: &str,
    notifier: &Weak<Notifier>,
) -> bool {
    let connecting = tokio::time::timeout(RELISTEN_BACKOFF_MAX, config.connect(tls.clone()));
    let Ok(Ok((client, mut connection))) = connecting.await else {
        return false;
    };
    let (payloads, mut received) = mpsc::channel(NOTIFICATIONS_QUEUED_MAX);
    // The connection is driven here, so that its notifications can be read.
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(notification) = message {
                let _ = payloads.try_send(notification.payload().to_owned());
            }
        }
    });
    let quoted = channel.replace('"', "\"\"");
    if client
        .batch_execute(&format!("LISTEN \"{quoted}\""))
        .await
        .is_err()
    {
        driver.abort();
        return false;
    }
    // Changes may have been announced while nobody listened.
    match notifier.upgrade() {
        Some(notifier) => notifier.wake_all(),
        None => return true,
    }
    while let Some(key) = received.recv().await {
        match notifier.upgrade() {
            Some(notifier) => notifier.wake(&key),
            None => break,
        }
    }
    driver.abort();
    drop(client);
    true
}

//! Waking waiting duplicates on PostgreSQL (issue 32 item 6): one connection per process
//! LISTENs on the table's channel; each replaced or deleted record that a duplicate waits
//! on (`watch`) is announced there (by the swap's own statement, so on its commit) with its
//! key in hex, and wakes the waiters of that key (`store::waiters`, which also polls, so a lost connection or notification only
//! delays a waiter); a reconnected listener wakes them all, as it may have missed changes.
//! This module never reads or writes a record.

use super::tls::MakeRustls;
use crate::store::waiters::{Subscription, Waiters};
use futures_util::StreamExt;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_postgres::AsyncMessage;

/// Longest pause between two attempts to reconnect the listener.
const RELISTEN_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Notifications waiting for the waking loop at most; past it they are dropped (the waiters
/// poll).
const NOTIFICATIONS_QUEUED_MAX: usize = 4_096;

/// Starts the listener, which connects with `config`, LISTENs on `channel` and wakes the
/// returned waiters; `subscriptions` hears each key's first waiter (`watch`).
pub fn start(
    config: tokio_postgres::Config,
    tls: MakeRustls,
    channel: String,
    poll_interval: Duration,
    subscriptions: mpsc::UnboundedSender<Subscription>,
) -> Arc<Waiters> {
    let waiters = Waiters::new(Some(subscriptions), poll_interval);
    tokio::spawn(listen(config, tls, channel, Arc::downgrade(&waiters)));
    waiters
}

/// The listener task: keeps one LISTENing connection up and wakes waiters on each
/// notification. Ends when the notifier is dropped.
async fn listen(
    config: tokio_postgres::Config,
    tls: MakeRustls,
    channel: String,
    notifier: Weak<Waiters>,
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
    notifier: &Weak<Waiters>,
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

//! The duplicates of this process waiting for a record to change, by the record's name (a
//! Redis key, a PostgreSQL key in hex), shared by the shared stores (design §5: waiting
//! duplicates are woken by a message, with polling as the fallback).
//!
//! A waiter registers before it reads the record, so no change after that is missed, and
//! waits for a wake-up or the poll interval, whichever comes first. A store's listener calls
//! `wake` for each change message and `wake_all` when it (re)connects, as messages may have
//! been missed meanwhile. A store that subscribes per record (Redis) is told when a name gets
//! its first waiter and loses its last. This module never reads or writes a record.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// A name's first waiter came, or its last left: what a per-record subscriber must follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subscription {
    /// Listen for changes of this name.
    Subscribe(String),
    /// Nobody waits on this name any more.
    Unsubscribe(String),
}

/// The waiters of this process, by name.
pub struct Waiters {
    names: Mutex<HashMap<String, Name>>,
    subscriptions: Option<mpsc::UnboundedSender<Subscription>>,
    poll_interval: Duration,
}

struct Name {
    changes: watch::Sender<u64>,
    waiters: usize,
}

/// Unregisters one waiter when its wait ends, however it ends.
struct Waiting {
    waiters: Arc<Waiters>,
    name: String,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut names = self.waiters.lock();
        if let Some(entry) = names.get_mut(&self.name) {
            entry.waiters -= 1;
            if entry.waiters == 0 {
                names.remove(&self.name);
                self.waiters
                    .tell(Subscription::Unsubscribe(self.name.clone()));
            }
        }
    }
}

impl Waiters {
    /// No waiter yet; `subscriptions`, when given, hears each name's first and last waiter.
    pub fn new(
        subscriptions: Option<mpsc::UnboundedSender<Subscription>>,
        poll_interval: Duration,
    ) -> Arc<Waiters> {
        Arc::new(Waiters {
            names: Mutex::new(HashMap::new()),
            subscriptions,
            poll_interval,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Name>> {
        self.names.lock().expect("no panic holds this lock")
    }

    fn tell(&self, subscription: Subscription) {
        if let Some(subscriptions) = &self.subscriptions {
            // A listener that is gone misses nothing: its waiters poll.
            let _ = subscriptions.send(subscription);
        }
    }

    /// Registers a waiter of `name` now (so no change after this call is missed) and
    /// returns the wait: a wake-up, or the poll interval.
    pub fn watch(self: &Arc<Self>, name: String) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let mut changes = {
            let mut names = self.lock();
            let entry = names.entry(name.clone()).or_insert_with(|| {
                self.tell(Subscription::Subscribe(name.clone()));
                Name {
                    changes: watch::channel(0).0,
                    waiters: 0,
                }
            });
            entry.waiters += 1;
            entry.changes.subscribe()
        };
        let waiting = Waiting {
            waiters: self.clone(),
            name,
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

    /// Wakes the waiters of `name`.
    pub fn wake(&self, name: &str) {
        if let Some(entry) = self.lock().get(name) {
            entry.changes.send_modify(|n| *n += 1);
        }
    }

    /// Wakes every waiter (a listener reconnected: it may have missed changes).
    pub fn wake_all(&self) {
        for entry in self.lock().values() {
            entry.changes.send_modify(|n| *n += 1);
        }
    }

    /// The names waited on now (for a subscriber that reconnects).
    pub fn names(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }
}

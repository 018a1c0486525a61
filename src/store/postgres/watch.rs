//! Marking the records this process's duplicates wait on (issue 32 item 6), so that a swap
//! announces a change only when somebody waits for it: a completion nobody waits on costs no
//! notification, in PostgreSQL or in any sidecar.
//!
//! When a key gets its first waiter here (`store::waiters` tells), its row's `watched` flag
//! is set, in a statement of its own. A swap that changes the row after that sees the flag
//! (the two take the row's lock in turn) and announces the change. One that changed it
//! before the flag was set announced nothing, so the waiters are woken here to read again
//! whenever the flag was not set yet or the row is gone. A mark that fails wakes nobody: the
//! waiters poll. This module never reads or writes a record's value.

use super::Shared;
use crate::key::Key;
use crate::store::waiters::Subscription;
use std::sync::Weak;
use tokio::sync::mpsc;

/// The marking task: one short statement per key that gets its first waiter. Ends when the
/// store is dropped.
pub async fn run(shared: Weak<Shared>, mut subscriptions: mpsc::UnboundedReceiver<Subscription>) {
    while let Some(subscription) = subscriptions.recv().await {
        let Subscription::Subscribe(name) = subscription else {
            continue;
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        // Each mark on its own, so that one waiting for a row's lock holds up no other.
        tokio::spawn(async move {
            match mark(&shared, &name).await {
                Ok(true) => shared.notifier.wake(&name),
                Ok(false) => {}
                Err(error) => tracing::debug!(
                    %error,
                    "could not mark a PostgreSQL record as waited on; its waiters poll"
                ),
            }
        });
    }
}

/// Sets the flag of the record named `name` (its key in hex); whether its waiters must read
/// again.
async fn mark(shared: &Shared, name: &str) -> Result<bool, crate::store::StoreError> {
    let key = Key::from_hex(name)
        .ok_or_else(|| crate::store::StoreError::Io(format!("not a key: {name:?}")))?;
    let key: &[u8] = &key.as_bytes()[..];
    shared.query_one(&shared.table.watch(), &[&key]).await
}

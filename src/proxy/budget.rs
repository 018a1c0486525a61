//! One budget for the bytes that keyed calls hold in memory: request bodies read whole before
//! the claim, and answers collected whole before they are recorded (`--max-buffered-bytes`).
//!
//! Each keyed call may hold up to `--max-request-bytes` and `--max-response-bytes`, per stream,
//! on any number of streams and connections: one connection with 70 unfinished 4 MB keyed
//! requests took the sidecar from 15 MiB to 286 MiB. With the budget, a request that does not
//! fit is refused at once (never queued: a queue would hold its bytes too), and an answer that
//! does not fit is streamed on, not kept. This module only counts; it never refuses a call.

use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The bytes all keyed calls together may buffer, and, once `for_connection` made it one
/// connection's, the share that connection may hold: one client connection cannot take the
/// whole budget and starve the callers on the others.
#[derive(Clone, Debug)]
pub struct Budget {
    bytes: Arc<Semaphore>,
    bytes_max: usize,
    /// The connection's own share, taken before the common budget.
    connection: Option<Arc<Semaphore>>,
}

/// The part of the budget one connection may hold: a quarter, and at least one largest
/// request, so that any request that fits the budget fits a connection.
pub fn connection_share(bytes_max: usize, request_bytes_max: usize) -> usize {
    (bytes_max / 4).max(request_bytes_max).min(bytes_max)
}

/// What one call holds of the budget: given back when the last clone is dropped. The proxy
/// holds one clone until the call's answer is built; the upstream client another while it
/// collects the answer (it travels in the request's extensions).
#[derive(Clone, Debug)]
pub struct Held {
    budget: Budget,
    /// What is taken of the common budget, and of the connection's share.
    permits: Arc<Mutex<(Option<OwnedSemaphorePermit>, Option<OwnedSemaphorePermit>)>>,
}

impl Budget {
    /// A budget of `bytes_max` bytes.
    pub fn new(bytes_max: usize) -> Budget {
        let bytes_max = bytes_max.min(Semaphore::MAX_PERMITS);
        Budget {
            bytes: Arc::new(Semaphore::new(bytes_max)),
            bytes_max,
            connection: None,
        }
    }

    /// The same common budget, with a share of `share_bytes` for one new connection.
    pub fn for_connection(&self, share_bytes: usize) -> Budget {
        let share_bytes = share_bytes.min(Semaphore::MAX_PERMITS);
        Budget {
            connection: Some(Arc::new(Semaphore::new(share_bytes))),
            ..self.clone()
        }
    }

    /// The budget's size.
    pub fn bytes_max(&self) -> usize {
        self.bytes_max
    }

    /// Bytes not held by any call now.
    pub fn available(&self) -> usize {
        self.bytes.available_permits()
    }

    /// An empty holding for one call.
    pub fn hold(&self) -> Held {
        Held {
            budget: self.clone(),
            permits: Arc::new(Mutex::new((None, None))),
        }
    }
}

impl Held {
    /// Takes `bytes` more, or nothing (`false`) when the budget has not that many left.
    pub fn grow(&self, bytes: usize) -> bool {
        let Ok(count) = u32::try_from(bytes) else {
            return false;
        };
        if count == 0 {
            return true;
        }
        let share = match &self.budget.connection {
            Some(connection) => match connection.clone().try_acquire_many_owned(count) {
                Ok(taken) => Some(taken),
                Err(_) => return false,
            },
            None => None,
        };
        // A share taken without room in the common budget goes back with `share`.
        let Ok(taken) = self.budget.bytes.clone().try_acquire_many_owned(count) else {
            return false;
        };
        let mut held = self.permits.lock().expect("never poisoned");
        merge(&mut held.0, taken);
        if let Some(share) = share {
            merge(&mut held.1, share);
        }
        true
    }
}

fn merge(held: &mut Option<OwnedSemaphorePermit>, taken: OwnedSemaphorePermit) {
    match held.as_mut() {
        Some(permits) => permits.merge(taken),
        None => *held = Some(taken),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_held_come_back_when_the_last_holder_goes() {
        let budget = Budget::new(100);
        let first = budget.hold();
        assert!(first.grow(60));
        let shared = first.clone();
        assert!(shared.grow(30));
        assert!(!budget.hold().grow(11), "past the budget nothing is taken");
        assert_eq!(budget.available(), 10);
        drop(first);
        assert_eq!(budget.available(), 10, "a clone still holds them");
        drop(shared);
        assert_eq!(budget.available(), 100);
    }

    #[test]
    fn one_connection_holds_at_most_its_share() {
        let budget = Budget::new(100);
        let greedy = budget.for_connection(connection_share(100, 10));
        let first = greedy.hold();
        assert!(first.grow(25));
        assert!(!greedy.hold().grow(1), "the connection's share is used up");
        let other = budget.for_connection(25).hold();
        assert!(other.grow(20), "another connection is still served");
        assert_eq!(budget.available(), 55, "a refused grow takes nothing");
    }
}

//! The process's file descriptors: the soft limit raised to the hard one at start (as Go's
//! runtime and nginx's `worker_rlimit_nofile` do), and a share kept back from client sockets.
//!
//! With the common soft limit of 1,024, 1,100 idle TCP connections made the store's next file
//! open fail with EMFILE, and a failed store write is sticky until a restart. This module
//! never closes or refuses anything itself: it says how many descriptors there are, and the
//! proxy bounds its connections to leave `RESERVED` of them to the store and the other
//! listeners.

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Descriptors kept from client connections: the store's files (sled's log, blobs, snapshots,
/// slices, the readiness probe), the ops and admin listeners and their clients, the
/// upstream connection, logs and exporters.
pub const RESERVED: u64 = 256;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; the soft limit in force afterwards
/// (`u64::MAX` for no limit).
pub fn raise_limit() -> u64 {
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(error) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(%error, "could not raise the open-files limit to its hard limit");
        }
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// Client connections the proxy may hold under the open-files `limit`: `asked`, or with 0 as
/// many as leave `RESERVED` free. The message names the setting and what to do when they do
/// not fit.
pub fn connections_max(asked: u64, limit: u64) -> Result<u64, String> {
    let room = limit.saturating_sub(RESERVED);
    if asked == 0 && room >= CONNECTIONS_MIN {
        return Ok(room.min(CONNECTIONS_AUTO_MAX));
    }
    if asked != 0 && asked <= room {
        return Ok(asked);
    }
    Err(format!(
        "--max-connections {asked} does not fit the open-files limit of {limit} with the \
         {RESERVED} kept for the store and the other listeners (0 means: as many as fit): \
         raise the container's nofile limit or lower --max-connections"
    ))
}

/// The fewest connections an automatic bound may leave the proxy.
const CONNECTIONS_MIN: u64 = 16;

/// The most connections an automatic bound gives, however high the limit.
const CONNECTIONS_AUTO_MAX: u64 = 65_536;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_must_leave_the_reserve_free() {
        assert_eq!(connections_max(0, 1_024), Ok(1_024 - RESERVED));
        assert_eq!(connections_max(0, u64::MAX), Ok(CONNECTIONS_AUTO_MAX));
        assert_eq!(connections_max(100, 1_024), Ok(100));
        let refused = connections_max(1_024, 1_024).expect_err("no room left for the store");
        assert!(refused.contains("--max-connections 1024"), "{refused}");
        assert!(connections_max(0, RESERVED + 1).is_err());
    }

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let limit = raise_limit();
        assert_eq!(
            Some(limit).filter(|limit| *limit != u64::MAX),
            getrlimit(Resource::Nofile).maximum
        );
    }
}

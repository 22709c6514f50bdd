//! The one error type of the crate. Every variant names what an operator needs to act on: the etcd
//! endpoints, the key, the field, the lease. etcd-client's own error type never escapes (it exists
//! only with the `etcd` feature), so causes are carried as text.

use std::time::Duration;

/// Why a membership operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// The crate was compiled without its `etcd` feature.
    #[error(
        "built without etcd support; rebuild with --features etcd (needs protoc: apt-get install protobuf-compiler)"
    )]
    NotBuilt,

    /// A configuration field is out of range or malformed.
    #[error("membership config: `{field}` {reason}")]
    InvalidConfig { field: &'static str, reason: String },

    /// A worker record cannot be published as given.
    #[error("worker record: `{field}` {reason}")]
    InvalidRecord { field: &'static str, reason: String },

    /// etcd could not be reached within the start-up retry budget.
    #[error(
        "etcd at {endpoints} unreachable after {attempts} attempt(s) over {elapsed:.1?}: {cause}"
    )]
    Unreachable {
        endpoints: String,
        attempts: u32,
        elapsed: Duration,
        cause: String,
    },

    /// An etcd request failed after start-up (the background tasks retry by themselves; this is
    /// returned only from calls the caller makes directly, such as `deregister`).
    #[error("etcd at {endpoints}: {op} of {key} failed: {cause}")]
    Request {
        endpoints: String,
        op: &'static str,
        key: String,
        cause: String,
    },

    /// The background watcher stopped, so no further membership changes will arrive.
    #[error("the membership watch on {prefix} has stopped")]
    WatchClosed { prefix: String },

    /// Fewer workers than required registered before the deadline.
    #[error(
        "timed out after {waited:.1?} waiting for {wanted} worker(s) under {prefix}; {} present: [{}]",
        present.len(),
        present.join(", ")
    )]
    NotEnoughMembers {
        prefix: String,
        wanted: usize,
        waited: Duration,
        present: Vec<String>,
    },
}

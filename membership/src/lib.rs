//! Cluster membership through etcd. Each worker publishes a [`WorkerRecord`] under
//! `<prefix>/workers/<id>` attached to a lease it keeps alive ([`register`]); the coordinator
//! follows that prefix ([`watch`]) and forms the group once enough workers are present
//! ([`wait_for_members`]). A worker that dies stops renewing its lease and its record disappears
//! when the lease expires; a worker that shuts down cleanly revokes its lease and disappears at once
//! ([`Registration::deregister`]).
//!
//! The etcd client lives behind the `etcd` cargo feature because etcd-client compiles its protobuf
//! definitions with a system `protoc`. Without the feature the same API exists and `register` and
//! `watch` return [`MembershipError::NotBuilt`], so dependents need no `#[cfg]` of their own. The
//! `testing` feature adds `testing::EtcdServer`, a real etcd process for tests.

// Without etcd, the halves of these modules that apply etcd's events have no caller outside their
// unit tests; they are still compiled (and tested) in that build.
#[cfg_attr(not(feature = "etcd"), allow(dead_code))]
mod backoff;
mod config;
mod error;
#[cfg_attr(not(feature = "etcd"), allow(dead_code))]
mod members;
#[cfg_attr(not(feature = "etcd"), allow(dead_code))]
mod record;

#[cfg(not(feature = "etcd"))]
mod disabled;
#[cfg(feature = "etcd")]
mod etcd;

#[cfg(feature = "testing")]
pub mod testing;

pub use config::MembershipConfig;
#[cfg(not(feature = "etcd"))]
pub use disabled::{Registration, register, watch};
pub use error::MembershipError;
#[cfg(feature = "etcd")]
pub use etcd::{Registration, register, watch};
pub use members::{MemberWatch, wait_for_members};
pub use record::WorkerRecord;

/// Whether this build can talk to etcd (the `etcd` feature), for `--help` texts and start-up
/// checks that want to fail before doing anything else.
pub const ETCD_SUPPORTED: bool = cfg!(feature = "etcd");

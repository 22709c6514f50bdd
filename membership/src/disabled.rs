//! Stand-ins for the etcd operations when the crate is built without its `etcd` feature (which
//! needs a system `protoc` to compile). Callers compile and link the same way either way, and find
//! out at run time, with a message saying how to rebuild.

use crate::config::MembershipConfig;
use crate::error::MembershipError;
use crate::members::MemberWatch;
use crate::record::WorkerRecord;

/// A worker's live membership; this build cannot create one (see [`register`]).
#[derive(Debug)]
pub struct Registration {
    // Uninhabited: no value of this type exists in a build without etcd.
    never: std::convert::Infallible,
}

/// Without the `etcd` feature: validates its arguments, then returns
/// [`MembershipError::NotBuilt`].
pub async fn register(
    cfg: &MembershipConfig,
    record: WorkerRecord,
) -> Result<Registration, MembershipError> {
    cfg.validate()?;
    record.validate()?;
    Err(MembershipError::NotBuilt)
}

/// Without the `etcd` feature: validates the config, then returns [`MembershipError::NotBuilt`].
pub async fn watch(cfg: &MembershipConfig) -> Result<MemberWatch, MembershipError> {
    cfg.validate()?;
    Err(MembershipError::NotBuilt)
}

impl Registration {
    /// The lease the record is attached to now.
    pub fn lease_id(&self) -> i64 {
        match self.never {}
    }

    /// Receives the current lease id whenever the worker re-registers under a new lease.
    pub fn lease_changes(&self) -> tokio::sync::watch::Receiver<i64> {
        match self.never {}
    }

    /// The etcd key of the record.
    pub fn key(&self) -> &str {
        match self.never {}
    }

    /// The published record.
    pub fn record(&self) -> &WorkerRecord {
        match self.never {}
    }

    /// Leaves the group now.
    pub async fn deregister(self) -> Result<(), MembershipError> {
        match self.never {}
    }
}

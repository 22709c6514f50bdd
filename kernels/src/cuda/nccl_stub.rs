//! NCCL in a build without the `cuda` feature: the same API, none of it usable.
//!
//! [`NcclId::new`] and [`probe_nccl`] return [`BackendError::CudaNotAvailable`], and
//! [`NcclComm`] holds a [`Never`], so its methods type-check (callers such as the worker's
//! `NcclRank` need no `#[cfg]`) but cannot run: `NcclComm::new` would need a `CudaBackend`, and
//! none exists in this build.

use std::time::Duration;

use super::nccl_types::{NcclError, NcclId, NcclVersion};
use super::stub::{CudaBackend, CudaTensor, Never};
use crate::{BackendError, Result};

fn not_built() -> BackendError {
    BackendError::CudaNotAvailable(
        "NCCL: this binary was built without the `cuda` feature (rebuild with `--features cuda`)"
            .into(),
    )
}

/// Whether NCCL can be loaded: never, in this build.
pub fn probe_nccl() -> Result<NcclVersion> {
    Err(not_built())
}

impl NcclId {
    /// Always [`BackendError::CudaNotAvailable`] in this build.
    pub fn new() -> Result<Self> {
        Err(not_built())
    }
}

/// A communicator (none can exist in this build).
#[derive(Debug)]
pub struct NcclComm {
    never: Never,
}

impl NcclComm {
    /// Always `CudaNotAvailable` in this build.
    pub fn new(
        _: &CudaBackend,
        _: &NcclId,
        _: usize,
        _: usize,
        _: Duration,
    ) -> Result<Self, NcclError> {
        Err(not_built().into())
    }

    pub fn rank(&self) -> usize {
        match self.never {}
    }

    pub fn world_size(&self) -> usize {
        match self.never {}
    }

    pub fn timeout(&self) -> Duration {
        match self.never {}
    }

    pub fn version(&self) -> NcclVersion {
        match self.never {}
    }

    pub fn is_usable(&self) -> bool {
        match self.never {}
    }

    pub fn all_reduce_sum(&self, _: &CudaBackend, _: &mut CudaTensor) -> Result<(), NcclError> {
        match self.never {}
    }

    pub fn all_gather_cols(&self, _: &CudaBackend, _: CudaTensor) -> Result<CudaTensor, NcclError> {
        match self.never {}
    }

    pub fn all_to_all(
        &self,
        _: &CudaBackend,
        _: Vec<CudaTensor>,
    ) -> Result<Vec<CudaTensor>, NcclError> {
        match self.never {}
    }

    pub fn broadcast(
        &self,
        _: &CudaBackend,
        _: &mut CudaTensor,
        _: usize,
    ) -> Result<(), NcclError> {
        match self.never {}
    }
}

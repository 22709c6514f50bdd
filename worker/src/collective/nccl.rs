//! NCCL between GPU ranks: [`NcclRank`] implements [`Collective<CudaBackend>`] on the kernels
//! crate's `NcclComm`, which moves the activations device to device (NVLink or PCIe within a
//! host, the network across hosts) with no copy through host memory.
//!
//! A group forms from one NCCL unique id: one process makes it (`NcclId::new`; that process
//! hosts NCCL's bootstrap root and must stay up until every rank joined), every rank receives
//! its bytes and calls [`NcclRank::from_id_bytes`] with its rank, the world size, its backend and
//! the collective timeout. Joining and every operation have that deadline: a rank that never
//! joins, stalls or dies becomes [`CollectiveError::Timeout`] (NCCL does not say which peer, so
//! `peers` is empty) or [`CollectiveError::Failed`], after which the communicator is aborted and
//! the group must be formed again with a new id. The type exists in every build; without the
//! `cuda` feature no `CudaBackend` can be made, so neither can an `NcclRank`.

use std::time::Duration;

use tessera_kernels::cuda::{CudaBackend, CudaTensor, NcclComm, NcclError, NcclId};

use super::{Collective, CollectiveError};

/// One rank of an NCCL group.
#[derive(Debug)]
pub struct NcclRank {
    comm: NcclComm,
}

impl NcclRank {
    /// Joins group `id` as `rank` of `world` on `backend`'s GPU, within `timeout` (also the
    /// deadline of every operation). Returns once every rank has joined.
    pub fn new(
        backend: &CudaBackend,
        id: &NcclId,
        rank: usize,
        world: usize,
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        let comm =
            NcclComm::new(backend, id, rank, world, timeout).map_err(|e| error("init", rank, e))?;
        Ok(NcclRank { comm })
    }

    /// [`NcclRank::new`] with the id as the bytes `NcclId::as_bytes` gave (what travels over
    /// gRPC).
    pub fn from_id_bytes(
        backend: &CudaBackend,
        id: &[u8],
        rank: usize,
        world: usize,
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        let id = NcclId::from_bytes(id).map_err(|e| error("init", rank, e.into()))?;
        Self::new(backend, &id, rank, world, timeout)
    }

    /// The communicator underneath (its NCCL version, whether it is still usable).
    pub fn comm(&self) -> &NcclComm {
        &self.comm
    }

    fn error(&self, op: &'static str, e: NcclError) -> CollectiveError {
        error(op, self.comm.rank(), e)
    }
}

/// The collective error for an NCCL one; `op` and `rank` name the call when NCCL's error does
/// not (a missing library, a refused argument).
fn error(op: &'static str, rank: usize, e: NcclError) -> CollectiveError {
    match e {
        NcclError::Timeout { op, rank, timeout } => CollectiveError::Timeout {
            op,
            rank,
            timeout,
            peers: Vec::new(),
        },
        NcclError::Mismatch { op, rank, detail } => CollectiveError::Mismatch { op, rank, detail },
        NcclError::Failed { op, rank, detail } => CollectiveError::Failed { op, rank, detail },
        NcclError::Unusable { op, rank, cause } => CollectiveError::Failed {
            op,
            rank,
            detail: format!("the group is unusable after an earlier failure: {cause}"),
        },
        NcclError::Backend(e) => CollectiveError::Failed {
            op,
            rank,
            detail: e.to_string(),
        },
    }
}

impl Collective<CudaBackend> for NcclRank {
    fn rank(&self) -> usize {
        self.comm.rank()
    }

    fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    fn all_reduce_sum(&self, b: &CudaBackend, t: &mut CudaTensor) -> Result<(), CollectiveError> {
        self.comm
            .all_reduce_sum(b, t)
            .map_err(|e| self.error("all_reduce", e))
    }

    fn all_gather_cols(
        &self,
        b: &CudaBackend,
        t: CudaTensor,
    ) -> Result<CudaTensor, CollectiveError> {
        self.comm
            .all_gather_cols(b, t)
            .map_err(|e| self.error("all_gather", e))
    }

    fn all_to_all(
        &self,
        b: &CudaBackend,
        chunks: Vec<CudaTensor>,
    ) -> Result<Vec<CudaTensor>, CollectiveError> {
        self.comm
            .all_to_all(b, chunks)
            .map_err(|e| self.error("all_to_all", e))
    }

    fn broadcast(
        &self,
        b: &CudaBackend,
        t: &mut CudaTensor,
        root: usize,
    ) -> Result<(), CollectiveError> {
        self.comm
            .broadcast(b, t, root)
            .map_err(|e| self.error("broadcast", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_kernels::BackendError;

    #[test]
    fn nccl_errors_keep_their_operation_rank_and_cause() {
        let t = error(
            "all_reduce",
            1,
            NcclError::Timeout {
                op: "all_reduce",
                rank: 1,
                timeout: Duration::from_secs(2),
            },
        );
        assert_eq!(
            t.to_string(),
            "all_reduce on rank 1: timed out after 2s waiting for peers"
        );
        let missing = error(
            "init",
            3,
            NcclError::Backend(BackendError::CudaNotAvailable(
                "libnccl.so.2 not found".into(),
            )),
        );
        assert!(
            matches!(&missing, CollectiveError::Failed { op: "init", rank: 3, detail } if detail.contains("libnccl.so.2")),
            "{missing}"
        );
        let gone = error(
            "broadcast",
            0,
            NcclError::Unusable {
                op: "broadcast",
                rank: 0,
                cause: "all_reduce on rank 0: timed out".into(),
            },
        );
        assert!(
            gone.to_string()
                .contains("unusable after an earlier failure: all_reduce")
        );
    }
}

//! NCCL collectives on the CUDA backend's tensors (feature `cuda`).
//!
//! A group forms from a unique id made once ([`NcclId::new`], `ncclGetUniqueId`) and handed to
//! every rank as bytes; each rank then joins with [`NcclComm::new`] on its own [`CudaBackend`]
//! and runs the collectives on that backend's stream. NCCL is loaded at run time (`ffi.rs`), like
//! every CUDA library here: without `libnccl.so.2` the backend still opens, and only NCCL's entry
//! points fail, with [`BackendError::CudaNotAvailable`].
//!
//! Deadlines are the point of the design (`comm.rs`): communicators are nonblocking, every wait
//! polls with a deadline, and a rank that never joins, stalls or dies turns into
//! [`NcclError::Timeout`] or [`NcclError::Failed`] after `ncclCommAbort`, never a hang. The
//! operations and how uneven shapes travel are in `ops.rs`.
//!
//! Several ranks on one GPU: NCCL before 2.30 refuses them, in one process or across processes
//! ("Duplicate GPU detected", found by comparing the ranks' host and PCI bus id during init).
//! NCCL 2.30 replaced that check with `NCCL_MULTI_RANK_GPU_ENABLE=1` (documented as experimental:
//! NVLS is turned off, and each rank takes its own channels of the GPU).
//!
//! [`CudaBackend`]: crate::cuda::CudaBackend
//! [`BackendError::CudaNotAvailable`]: crate::BackendError::CudaNotAvailable

mod comm;
mod ffi;
mod ops;

pub use comm::NcclComm;

use crate::Result;
use crate::cuda::nccl_types::{NcclId, NcclVersion};

/// `Ok` with NCCL's version when `libnccl.so.2` (2.18 or later) can be loaded; otherwise
/// `CudaNotAvailable` saying what is missing. Cheap after the first call.
pub(super) fn probe() -> Result<NcclVersion> {
    ffi::lib().map(|l| l.version)
}

impl NcclId {
    /// A fresh id (`ncclGetUniqueId`). This process becomes the group's bootstrap root (see
    /// [`NcclId`]). Needs NCCL, not a GPU.
    pub fn new() -> Result<Self> {
        let lib = ffi::lib()?;
        let mut id = ffi::UniqueId {
            internal: [0; crate::cuda::nccl_types::NCCL_ID_BYTES],
        };
        // SAFETY: ncclGetUniqueId writes one ncclUniqueId (128 bytes) through the pointer.
        let ret = unsafe { (lib.get_unique_id)(&mut id) };
        if ret != ffi::SUCCESS {
            return Err(crate::BackendError::Device {
                op: "ncclGetUniqueId",
                detail: lib.describe(ret, std::ptr::null_mut()),
            });
        }
        Ok(NcclId(id.internal))
    }
}

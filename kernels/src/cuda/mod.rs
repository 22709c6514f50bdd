//! The CUDA backend.
//!
//! With the `cuda` feature, [`CudaBackend`] implements [`crate::Backend`] on one GPU through
//! cudarc: the driver API for memory and launches, NVRTC to compile the kernels of
//! `kernels/cuda/*.cu` for the device's architecture (once per process and architecture), and
//! cuBLAS for the matrix products. Every CUDA library is loaded at run time, so the feature builds
//! on machines with no toolkit, and [`CudaBackend::new`] first checks that the driver, NVRTC and
//! cuBLAS can be loaded: a machine without them gets [`BackendError::CudaNotAvailable`] naming
//! what is missing, never a panic.
//!
//! Without the feature, [`CudaBackend::new`] always returns `CudaNotAvailable`; the types still
//! exist (uninhabited, `stub.rs`) and implement [`crate::Backend`], so callers need no `#[cfg]` of
//! their own: `Executor<CudaBackend>` compiles in every build and is simply never made.
//!
//! NCCL ([`NcclId`], [`NcclComm`], [`probe_nccl`]) follows the same pattern: `nccl/` with the
//! feature, `nccl_stub.rs` without, the id and error types shared (`nccl_types.rs`).
//!
//! [`BackendError::CudaNotAvailable`]: crate::BackendError::CudaNotAvailable

#[cfg(feature = "cuda")]
mod attention;
#[cfg(feature = "cuda")]
mod bandwidth;
#[cfg(feature = "cuda")]
mod context;
#[cfg(feature = "cuda")]
mod device;
#[cfg(feature = "cuda")]
mod graph;
#[cfg(feature = "cuda")]
mod imp;
#[cfg(feature = "cuda")]
mod memory;
#[cfg(feature = "cuda")]
mod moe;
#[cfg(feature = "cuda")]
mod moe_experts;
#[cfg(feature = "cuda")]
mod nccl;
#[cfg(not(feature = "cuda"))]
mod nccl_stub;
mod nccl_types;
#[cfg(feature = "cuda")]
mod ops;
pub mod plan;
#[cfg(feature = "cuda")]
mod prefill;
#[cfg(feature = "cuda")]
mod probe;
#[cfg(feature = "cuda")]
mod step;

#[cfg(feature = "cuda")]
pub use attention::CudaKv;
#[cfg(feature = "cuda")]
pub use device::{CudaBackend, CudaTensor, CudaWeight, DeviceInfo, compile_kernels};
#[cfg(feature = "cuda")]
pub use graph::DeviceGraph;
#[cfg(feature = "cuda")]
pub use moe::CudaRouting;
#[cfg(feature = "cuda")]
pub use nccl::NcclComm;
#[cfg(feature = "cuda")]
pub use probe::{probe_libraries, probe_nccl, probe_nvrtc};
#[cfg(feature = "cuda")]
pub use step::CudaStep;

#[cfg(not(feature = "cuda"))]
mod stub;
#[cfg(not(feature = "cuda"))]
pub use stub::{CudaBackend, CudaKv, CudaRouting, CudaStep, CudaTensor, CudaWeight, Never};

#[cfg(not(feature = "cuda"))]
pub use nccl_stub::{NcclComm, probe_nccl};
pub use nccl_types::{NCCL_ID_BYTES, NcclError, NcclId, NcclVersion};

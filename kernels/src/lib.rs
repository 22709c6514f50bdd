//! Compute backends for Tessera.
//!
//! The model code in `tessera-worker` is written once against the [`Backend`] trait; this crate
//! provides the implementations. [`cpu::CpuBackend`] is the portable reference (and the embedded
//! default); the CUDA backend lives behind the `cuda` feature and reports
//! [`BackendError::CudaNotAvailable`] when the feature or the driver is missing, so callers never
//! need `#[cfg]` of their own.
//!
//! Conventions shared by every backend:
//! - activations are row-major `[rows, cols]` f32 matrices (one row per token);
//! - weights keep the dtype they were stored in ([`HostTensor`] → [`Backend::Weight`]);
//! - a linear layer computes `x · Wᵀ` with `W` stored `[out_features, in_features]`, as PyTorch does.

pub mod backend;
mod context;
pub mod cpu;
pub mod cuda;
mod dtype;
mod error;
mod host;
mod step;

pub use backend::{
    AttentionParams, Backend, DeviceMemory, ExpertWeights, GroupScore, KvSpec, KvValues, MemoryUse,
    NoGraph, RopeApply, RopeLayout, RopeTable, RouterParams, RowSummary, Scoring,
};
pub use context::{AttentionPart, ContextLayout, KvRows, check_attention_rows, check_merge};
pub use dtype::DType;
pub use error::BackendError;
pub use host::{BlockLayout, HostData, HostTensor, WeightView};
pub use step::{SeqMeta, StepMeta, StepShape};

/// Result type of backend operations.
pub type Result<T, E = BackendError> = std::result::Result<T, E>;

//! The worker's error type: everything that can go wrong loading a shard or running a step.

use thiserror::Error;

use crate::checkpoint::CheckpointError;

#[derive(Debug, Error)]
pub enum WorkerError {
    #[error(transparent)]
    Config(#[from] tessera_common::ConfigError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Backend(#[from] tessera_kernels::BackendError),
    /// A request the engine cannot serve as given (the field and value are named).
    #[error("invalid request: {0}")]
    Request(String),
    /// The KV cache has no free block left.
    #[error("KV cache exhausted: {needed} blocks needed, {free} free")]
    OutOfBlocks { needed: usize, free: usize },
}

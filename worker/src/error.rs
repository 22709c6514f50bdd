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
    Collective(#[from] crate::collective::CollectiveError),
    #[error(transparent)]
    Backend(#[from] tessera_kernels::BackendError),
    /// The device asked for cannot be used (`--device`, `--gpu-memory-utilization`), and why.
    #[error("{0}")]
    Device(String),
    /// A sharding plan that cannot work (heads that do not divide over the ranks, ...).
    #[error("cannot shard the model: {0}")]
    Plan(String),
    /// A request the engine cannot serve as given (the field and value are named).
    #[error("invalid request: {0}")]
    Request(String),
    /// A worker process failed or could not be reached.
    #[error("worker {rank}: {detail}")]
    Remote { rank: usize, detail: String },
    /// A file or folder could not be read or written.
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// A KV cache this process cannot hold: its size overflows, its block ids would not fit in
    /// u32, or it exceeds the memory available (the size is named).
    #[error("KV cache too large: {0}")]
    KvCacheTooLarge(String),
    /// The KV cache has no free block left.
    #[error("KV cache exhausted: {needed} blocks needed, {free} free")]
    OutOfBlocks { needed: usize, free: usize },
}

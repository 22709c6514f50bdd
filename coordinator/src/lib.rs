//! The Tessera coordinator: turns user requests into work for the workers.
//!
//! - [`tokenizer`]: Hugging Face `tokenizer.json`, with streaming detokenisation.
//! - [`cluster`]: an embedded cluster of worker processes on loopback, driven over gRPC.
//! - `fuzz_targets` (feature `fuzz-targets`): the request and tokenizer fuzz targets' bodies.

pub mod cluster;
#[cfg(feature = "fuzz-targets")]
pub mod fuzz_targets;
pub mod grpc;
pub mod http;
pub mod jobs;
pub mod metrics;
pub mod scheduler;
pub mod serving;
pub mod tokenizer;

//! The Tessera coordinator: turns user requests into work for the workers.
//!
//! - [`tokenizer`]: Hugging Face `tokenizer.json`, with streaming detokenisation.
//! - [`cluster`]: an embedded cluster of worker processes on loopback, driven over gRPC.

pub mod auth;
pub mod cluster;
pub mod grpc;
pub mod http;
pub mod jobs;
pub mod metrics;
pub mod scheduler;
pub mod serving;
pub mod tokenizer;

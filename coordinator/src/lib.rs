//! The Tessera coordinator: turns user requests into work for the workers.
//!
//! - [`tokenizer`]: Hugging Face `tokenizer.json`, with streaming detokenisation.
//! - [`cluster`]: a worker group (embedded processes on loopback, or workers found elsewhere),
//!   driven over gRPC.
//! - [`registry`]: static membership: workers register with the coordinator over gRPC.
//! - [`tls`]: TLS on the public listeners and mutual TLS between coordinator and workers.
//! - `fuzz_targets` (feature `fuzz-targets`): the request and tokenizer fuzz targets' bodies.

pub mod auth;
pub mod cluster;
#[cfg(feature = "fuzz-targets")]
pub mod fuzz_targets;
pub mod grpc;
pub mod http;
pub mod jobs;
pub mod metrics;
pub mod registry;
pub mod scheduler;
pub mod serving;
pub mod tls;
pub mod tokenizer;

/// Locks a mutex, ignoring poisoning: the coordinator's shared state is replaced whole under its
/// locks, so a panicking writer cannot leave it half-updated, and serving must go on.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

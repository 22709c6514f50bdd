//! The Tessera worker: loads its shard of a checkpoint and runs the decoder forward pass.
//!
//! - [`checkpoint`]: memory-mapped safetensors (single file or sharded), zero-copy, slice-aware.
//! - [`layers`]: the shared building blocks (RMSNorm, linear, gated MLP, GQA and MLA attention,
//!   routed MoE), each written once and generic over the compute [`Backend`](tessera_kernels::Backend).
//! - [`collective`]: all-reduce, all-gather, all-to-all and broadcast among the ranks of a
//!   replica, with deadlines.
//! - [`device`]: `--device` selection (CPU or CUDA) and building an executor on the device.
//! - [`model`]: a decoder assembled from a [`ModelSpec`](tessera_common::ModelSpec).
//! - [`kv_cache`]: paged KV cache blocks and their allocator.
//! - [`sampling`]: temperature / top-k / top-p sampling and log-probabilities.
//! - [`executor`]: one batched step (prefill chunks and decode tokens together) plus sampling.
//! - [`graphs`]: decode steps replayed from captured graphs (CUDA graphs), padded to a shape.
//! - [`engine`]: single-process generation (prefill, then cached decode steps).
//! - [`service`], [`wire`]: the worker's gRPC service and the step types' wire form.
//! - [`synthetic`]: random-weight checkpoints in a real layout, for benchmarks.
//! - [`footprint`]: the weight bytes a decode step reads (a roofline's denominator).
//! - [`metrics`]: the worker's Prometheus metrics, collectives timed by a wrapper.

pub mod checkpoint;
pub mod collective;
pub mod device;
pub mod engine;
mod error;
pub mod executor;
pub mod footprint;
pub mod graphs;
pub mod kv_cache;
pub mod layers;
pub mod metrics;
pub mod model;
pub mod profile;
mod results;
pub mod sampling;
pub mod service;
pub mod synthetic;
pub mod wire;

pub use error::WorkerError;

//! Shared vocabulary of Tessera's coordinator and workers.
//!
//! - [`arch`]: one file per supported Hugging Face architecture, each turning its `config.json` into
//!   the architecture-neutral [`ModelSpec`] (shapes, layer kinds, routing rule, tensor names).
//! - [`spec`]: that neutral description, which the worker's shared layers are built from.
//! - [`rope`]: rotary-embedding parameters in both spellings found in the wild, and the inverse
//!   frequencies for every scaling variant (computed once here, applied by the kernels).
//! - [`generation`]: `generation_config.json` (stop tokens, sampling defaults).
//! - [`shard`]: which part of the model a worker owns.
//! - [`placement`]: the expert placement map, (layer, expert) → rank.
//! - [`metrics`]: names, labels and buckets of every exported Prometheus metric.
//! - `fuzz_targets` (feature `fuzz-targets`): the config fuzz target's body, shared by `fuzz/` and
//!   the stable regression test.

pub mod arch;
mod error;
#[cfg(feature = "fuzz-targets")]
pub mod fuzz_targets;
pub mod generation;
pub mod metrics;
pub mod placement;
pub mod rope;
pub mod shard;
pub mod spec;

pub use arch::load_model_spec;
pub use error::ConfigError;
pub use generation::GenerationConfig;
pub use placement::PlacementMap;
pub use shard::ShardSpec;
pub use spec::{
    AttentionSpec, FfnSpec, GqaSpec, LayerSpec, MlaSpec, MlpSpec, ModelSpec, MoeSpec, QkNorm,
    RouterSpec, SharedExpertSpec,
};

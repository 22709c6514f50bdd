//! Shared layers, written once for every architecture and every backend.
//!
//! Each layer is built from its part of the [`ModelSpec`](tessera_common::ModelSpec) through a
//! [`WeightLoader`], which checks every tensor's shape against the config and reads only what this
//! worker's shard owns.

mod attention;
mod loader;
mod mla;
mod mlp;
mod moe;

pub use attention::Gqa;
pub use loader::WeightLoader;
pub use mla::Mla;
pub use mlp::Mlp;
pub use moe::Moe;

use tessera_kernels::Backend;

use crate::WorkerError;

/// RMSNorm with a learned scale.
pub struct RmsNorm<B: Backend> {
    pub weight: B::Weight,
    pub eps: f32,
}

impl<B: Backend> RmsNorm<B> {
    pub fn load(
        w: &WeightLoader<'_, B>,
        name: &str,
        len: usize,
        eps: f32,
    ) -> Result<Self, WorkerError> {
        Ok(RmsNorm {
            weight: w.vector(name, len)?,
            eps,
        })
    }

    pub fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor, WorkerError> {
        Ok(b.rms_norm(x, &self.weight, self.eps)?)
    }
}

/// `x · Wᵀ + bias`.
pub struct Linear<B: Backend> {
    pub weight: B::Weight,
    pub bias: Option<B::Weight>,
}

impl<B: Backend> Linear<B> {
    /// Loads `{prefix}.weight` of shape `[out, inp]` and, if `bias`, `{prefix}.bias`.
    pub fn load(
        w: &WeightLoader<'_, B>,
        prefix: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<Self, WorkerError> {
        Ok(Linear {
            weight: w.matrix(&format!("{prefix}.weight"), out, inp)?,
            bias: if bias {
                Some(w.vector(&format!("{prefix}.bias"), out)?)
            } else {
                None
            },
        })
    }

    pub fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor, WorkerError> {
        Ok(b.linear(x, &self.weight, self.bias.as_ref())?)
    }
}

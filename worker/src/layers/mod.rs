//! Shared layers, written once for every architecture and every backend.
//!
//! Each layer is built from its part of the [`ModelSpec`](tessera_common::ModelSpec) through a
//! [`WeightLoader`], which checks every tensor's shape against the config and reads only what this
//! worker's shard owns.

mod attention;
mod loader;
mod mla;
mod mla_policy;
mod mla_split;
mod mlp;
mod moe;
mod tp;

pub use attention::Gqa;
pub use loader::WeightLoader;
pub use mla::{Mla, MlaAttend, SplitAttend};
pub use mla_policy::{Expansion, MlaForm, MlaPlan, MlaPolicy, MlaPrefill};
pub use mla_split::SplitStep;
pub use mlp::Mlp;
pub use moe::Moe;
pub use tp::TpContext;

use std::ops::Range;

use tessera_kernels::Backend;

use crate::WorkerError;
use crate::checkpoint::Slice;

/// How a linear layer is divided among tensor-parallel ranks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Split {
    /// Every rank holds the whole layer.
    Replicated,
    /// Column-parallel: this rank computes output features `range` (weight rows and bias slice).
    Out(Range<usize>),
    /// Row-parallel: this rank reads input features `range` and produces a partial sum; exactly one
    /// rank adds the bias.
    In { range: Range<usize>, bias: bool },
}

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

    /// Adds `y` to the residual stream `x` and returns the norm of the result.
    pub fn add_forward(
        &self,
        b: &B,
        x: &mut B::Tensor,
        y: &B::Tensor,
    ) -> Result<B::Tensor, WorkerError> {
        Ok(b.add_rms_norm(x, y, &self.weight, self.eps)?)
    }
}

/// Names and full shape of a linear layer: `{prefix}.weight` is `[out, inp]`.
#[derive(Clone, Copy, Debug)]
pub struct LinearSpec<'a> {
    pub prefix: &'a str,
    pub out: usize,
    pub inp: usize,
    pub bias: bool,
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
        Self::load_split(
            w,
            LinearSpec {
                prefix,
                out,
                inp,
                bias,
            },
            Split::Replicated,
        )
    }

    /// Loads this rank's part of a linear layer.
    pub fn load_split(
        w: &WeightLoader<'_, B>,
        l: LinearSpec<'_>,
        split: Split,
    ) -> Result<Self, WorkerError> {
        let (weight, bias) = (format!("{}.weight", l.prefix), format!("{}.bias", l.prefix));
        let shape = [l.out, l.inp];
        let (wslice, bslice) = match split {
            Split::Replicated => (Slice::Full, l.bias.then_some(Slice::Full)),
            Split::Out(r) => (Slice::Rows(r.clone()), l.bias.then_some(Slice::Rows(r))),
            Split::In { range, bias } => {
                (Slice::Cols(range), (l.bias && bias).then_some(Slice::Full))
            }
        };
        Ok(Linear {
            weight: w.load(&weight, &shape, wslice)?,
            bias: bslice.map(|s| w.load(&bias, &[l.out], s)).transpose()?,
        })
    }

    pub fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor, WorkerError> {
        Ok(b.linear(x, &self.weight, self.bias.as_ref())?)
    }

    /// Weight and bias, as [`Backend::linear_many`] takes them.
    pub fn parts(&self) -> (&B::Weight, Option<&B::Weight>) {
        (&self.weight, self.bias.as_ref())
    }
}

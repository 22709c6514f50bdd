//! The gated MLP `down(silu(gate(x)) · up(x))`: dense layers, experts and shared experts alike.

use tessera_common::MlpSpec;
use tessera_kernels::{Backend, ExpertWeights};

use super::WeightLoader;
use crate::WorkerError;

pub struct Mlp<B: Backend> {
    pub gate: B::Weight,
    pub up: B::Weight,
    pub down: B::Weight,
}

impl<B: Backend> Mlp<B> {
    pub fn load(
        w: &WeightLoader<'_, B>,
        spec: &MlpSpec,
        hidden: usize,
    ) -> Result<Self, WorkerError> {
        let [gate, up, down] = spec.names();
        let i = spec.intermediate_size;
        Ok(Mlp {
            gate: w.matrix(&gate, i, hidden)?,
            up: w.matrix(&up, i, hidden)?,
            down: w.matrix(&down, hidden, i)?,
        })
    }

    pub fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor, WorkerError> {
        let h = b.silu_mul(
            &b.linear(x, &self.gate, None)?,
            &b.linear(x, &self.up, None)?,
        )?;
        Ok(b.linear(&h, &self.down, None)?)
    }

    /// The weights as the backend's MoE kernel takes them.
    pub fn as_expert(&self) -> ExpertWeights<'_, B> {
        ExpertWeights {
            gate: &self.gate,
            up: &self.up,
            down: &self.down,
        }
    }
}

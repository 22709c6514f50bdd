//! The gated MLP `down(silu(gate(x)) · up(x))`: dense layers, experts and shared experts alike.

use tessera_common::MlpSpec;
use tessera_kernels::{Backend, ExpertWeights};

use super::{TpContext, WeightLoader};
use crate::WorkerError;
use crate::checkpoint::Slice;

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

    /// This rank's columns of the MLP (gate/up column-parallel, down row-parallel): its output is
    /// a partial sum over the ranks.
    pub fn load_split(
        w: &WeightLoader<'_, B>,
        spec: &MlpSpec,
        hidden: usize,
        tp: &TpContext<B>,
    ) -> Result<Self, WorkerError> {
        if tp.world() == 1 {
            return Self::load(w, spec, hidden);
        }
        let [gate, up, down] = spec.names();
        let (i, part) = (
            spec.intermediate_size,
            tp.shard.split(spec.intermediate_size),
        );
        Ok(Mlp {
            gate: w.load(&gate, &[i, hidden], Slice::Rows(part.clone()))?,
            up: w.load(&up, &[i, hidden], Slice::Rows(part.clone()))?,
            down: w.load(&down, &[hidden, i], Slice::Cols(part))?,
        })
    }

    pub fn forward(&self, b: &B, x: &B::Tensor) -> Result<B::Tensor, WorkerError> {
        Ok(b.mlp(x, &self.as_expert())?)
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

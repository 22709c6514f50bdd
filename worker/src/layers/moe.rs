//! The routed mixture-of-experts block: router, the experts this shard owns, and optional shared
//! experts (DeepSeek) or a sigmoid-gated shared expert (Qwen2-MoE).
//!
//! With expert parallelism each rank computes the same routing and runs only its own experts; the
//! partial sums are combined by the cluster's all-reduce. On a single worker every expert is local.

use tessera_common::MoeSpec;
use tessera_kernels::{Backend, RouterParams};

use super::{Mlp, TpContext, WeightLoader};
use crate::WorkerError;

pub struct Moe<B: Backend> {
    router: B::Weight,
    router_bias: Option<B::Weight>,
    params: RouterParams,
    /// Indexed by expert id; `None` for experts owned by another rank.
    experts: Vec<Option<Mlp<B>>>,
    shared: Option<Mlp<B>>,
    shared_gate: Option<B::Weight>,
}

impl<B: Backend> Moe<B> {
    pub fn load(
        w: &WeightLoader<'_, B>,
        s: &MoeSpec,
        layer: usize,
        hidden: usize,
        tp: &TpContext<B>,
    ) -> Result<Self, WorkerError> {
        let experts = (0..s.num_experts)
            .map(|e| {
                tp.shard
                    .owns_expert(layer, e, s.num_experts)
                    .then(|| Mlp::load(w, &s.expert(e), hidden))
                    .transpose()
            })
            .collect::<Result<_, _>>()?;
        let (shared, shared_gate) = match &s.shared {
            None => (None, None),
            Some(sh) => (
                Some(Mlp::load_split(w, &sh.mlp, hidden, tp)?),
                sh.gate
                    .as_deref()
                    .map(|g| w.matrix(g, 1, hidden))
                    .transpose()?,
            ),
        };
        Ok(Moe {
            router: w.matrix(&s.router, s.num_experts, hidden)?,
            router_bias: s
                .router_bias
                .as_deref()
                .map(|n| w.vector(n, s.num_experts))
                .transpose()?,
            params: RouterParams {
                num_experts: s.num_experts,
                top_k: s.top_k,
                scoring: s.rule.scoring,
                normalize: s.rule.normalize,
                groups: s.rule.groups,
                scaling: s.rule.scaling,
            },
            experts,
            shared,
            shared_gate,
        })
    }

    pub fn num_experts(&self) -> usize {
        self.params.num_experts
    }

    /// The block's output and the number of tokens routed to each expert. Counting copies to the
    /// host, which on a GPU waits for the device: a model step uses [`Moe::forward_routed`] and
    /// counts every MoE layer at once; this is for a caller running one block (tests, tools).
    pub fn forward(&self, b: &B, x: &B::Tensor) -> Result<(B::Tensor, Vec<u32>), WorkerError> {
        let (y, routing) = self.forward_routed(b, x)?;
        Ok((y, b.expert_counts(&routing, self.params.num_experts)?))
    }

    /// The block's output and its routing, which the caller keeps to count tokens per expert
    /// once per step for all MoE layers (`Backend::expert_counts_into`) rather than copying to
    /// the host, and waiting for the device, once per layer.
    pub fn forward_routed(
        &self,
        b: &B,
        x: &B::Tensor,
    ) -> Result<(B::Tensor, B::Routing), WorkerError> {
        let logits = b.linear(x, &self.router, None)?;
        let routing = b.route(&logits, &self.params, self.router_bias.as_ref())?;
        let experts: Vec<_> = self
            .experts
            .iter()
            .map(|e| e.as_ref().map(Mlp::as_expert))
            .collect();
        let mut y = b.moe(x, &routing, &experts)?;
        if let Some(shared) = &self.shared {
            let mut s = shared.forward(b, x)?;
            if let Some(g) = &self.shared_gate {
                b.mul_sigmoid_rows(&mut s, &b.linear(x, g, None)?)?;
            }
            b.add_assign(&mut y, &s)?;
        }
        Ok((y, routing))
    }
}

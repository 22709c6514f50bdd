//! Grouped-query attention (Llama, Qwen, Mixtral, OLMoE), with optional q/k biases and q/k RMSNorm
//! per head (Qwen3) or over the whole projection (OLMoE).

use tessera_common::{GqaSpec, QkNorm};
use tessera_kernels::{AttentionParams, Backend, RopeApply};

use super::{Linear, RmsNorm, WeightLoader};
use crate::WorkerError;

pub struct Gqa<B: Backend> {
    q: Linear<B>,
    k: Linear<B>,
    v: Linear<B>,
    o: Linear<B>,
    q_norm: Option<RmsNorm<B>>,
    k_norm: Option<RmsNorm<B>>,
    params: AttentionParams,
}

impl<B: Backend> Gqa<B> {
    pub fn load(
        w: &WeightLoader<'_, B>,
        s: &GqaSpec,
        hidden: usize,
        eps: f32,
    ) -> Result<Self, WorkerError> {
        let (qw, kvw) = (s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim);
        let p = &s.prefix;
        let norm =
            |name: &str, len: usize| RmsNorm::load(w, &format!("{p}.{name}.weight"), len, eps);
        let (q_norm, k_norm) = match s.qk_norm {
            QkNorm::None => (None, None),
            QkNorm::PerHead => (
                Some(norm("q_norm", s.head_dim)?),
                Some(norm("k_norm", s.head_dim)?),
            ),
            QkNorm::Whole => (Some(norm("q_norm", qw)?), Some(norm("k_norm", kvw)?)),
        };
        Ok(Gqa {
            q: Linear::load(w, &format!("{p}.q_proj"), qw, hidden, s.qkv_bias)?,
            k: Linear::load(w, &format!("{p}.k_proj"), kvw, hidden, s.qkv_bias)?,
            v: Linear::load(w, &format!("{p}.v_proj"), kvw, hidden, s.qkv_bias)?,
            o: Linear::load(w, &format!("{p}.o_proj"), hidden, qw, s.o_bias)?,
            q_norm,
            k_norm,
            params: AttentionParams {
                num_heads: s.num_heads,
                num_kv_heads: s.num_kv_heads,
                qk_dim: s.head_dim,
                v_dim: s.head_dim,
                scale: (s.head_dim as f32).powf(-0.5),
                sliding_window: s.sliding_window,
            },
        })
    }

    pub fn params(&self) -> &AttentionParams {
        &self.params
    }

    pub fn forward(
        &self,
        b: &B,
        x: &B::Tensor,
        cache: &mut B::KvLayer,
        step: &B::Step,
    ) -> Result<B::Tensor, WorkerError> {
        let p = &self.params;
        let mut q = self.q.forward(b, x)?;
        let mut k = self.k.forward(b, x)?;
        let v = self.v.forward(b, x)?;
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(b, &q)?;
            k = kn.forward(b, &k)?;
        }
        b.rope(
            &mut q,
            step,
            RopeApply {
                num_heads: p.num_heads,
                head_stride: p.qk_dim,
                offset: 0,
            },
        )?;
        b.rope(
            &mut k,
            step,
            RopeApply {
                num_heads: p.num_kv_heads,
                head_stride: p.qk_dim,
                offset: 0,
            },
        )?;
        b.write_kv(cache, &k, &v, step)?;
        let o = b.attention(&q, cache, step, p)?;
        self.o.forward(b, &o)
    }
}

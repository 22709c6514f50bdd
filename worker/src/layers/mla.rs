//! DeepSeek's multi-head latent attention.
//!
//! Queries come from `q_proj` or the low-rank `q_a_proj → RMSNorm → q_b_proj`; keys and values from
//! the compressed latent `kv_a_proj_with_mqa → RMSNorm → kv_b_proj`, plus one rotary key shared by
//! all heads. The cache holds the expanded per-head keys and values, so attention itself is the
//! shared paged kernel with `qk_dim = nope + rope` and `v_dim` differing.

use tessera_common::MlaSpec;
use tessera_kernels::{AttentionParams, Backend, RopeApply};

use super::tp::cols;
use super::{Linear, LinearSpec, RmsNorm, Split, TpContext, WeightLoader};
use crate::WorkerError;

/// transformers builds the latent norms with RMSNorm's default epsilon, not `rms_norm_eps`.
const LATENT_NORM_EPS: f32 = 1e-6;

enum Query<B: Backend> {
    Direct(Linear<B>),
    LowRank {
        a: Linear<B>,
        norm: RmsNorm<B>,
        b: Linear<B>,
    },
}

pub struct Mla<B: Backend> {
    query: Query<B>,
    kv_a: Linear<B>,
    kv_norm: RmsNorm<B>,
    kv_b: Linear<B>,
    o: Linear<B>,
    spec: MlaSpec,
    params: AttentionParams,
}

impl<B: Backend> Mla<B> {
    pub fn load(
        w: &WeightLoader<'_, B>,
        s: &MlaSpec,
        hidden: usize,
        tp: &TpContext<B>,
    ) -> Result<Self, WorkerError> {
        let p = &s.prefix;
        let qk = s.qk_nope_head_dim + s.qk_rope_head_dim;
        let h = s.num_heads;
        let (heads, _) = tp.heads(h, h)?;
        let name = |n: &str| format!("{p}.{n}");
        let load = |n: &str, (out, inp, bias): (usize, usize, bool), split| {
            Linear::load_split(
                w,
                LinearSpec {
                    prefix: &name(n),
                    out,
                    inp,
                    bias,
                },
                split,
            )
        };
        let query = match s.q_lora_rank {
            None => Query::Direct(load(
                "q_proj",
                (h * qk, hidden, false),
                Split::Out(cols(&heads, qk)),
            )?),
            Some(r) => Query::LowRank {
                a: load("q_a_proj", (r, hidden, s.attention_bias), Split::Replicated)?,
                norm: RmsNorm::load(w, &name("q_a_layernorm.weight"), r, LATENT_NORM_EPS)?,
                b: load("q_b_proj", (h * qk, r, false), Split::Out(cols(&heads, qk)))?,
            },
        };
        let latent = s.kv_lora_rank;
        let kv_width = s.qk_nope_head_dim + s.v_head_dim;
        Ok(Mla {
            query,
            kv_a: load(
                "kv_a_proj_with_mqa",
                (latent + s.qk_rope_head_dim, hidden, s.attention_bias),
                Split::Replicated,
            )?,
            kv_norm: RmsNorm::load(w, &name("kv_a_layernorm.weight"), latent, LATENT_NORM_EPS)?,
            kv_b: load(
                "kv_b_proj",
                (h * kv_width, latent, false),
                Split::Out(cols(&heads, kv_width)),
            )?,
            o: load(
                "o_proj",
                (hidden, h * s.v_head_dim, s.attention_bias),
                Split::In {
                    range: cols(&heads, s.v_head_dim),
                    bias: tp.is_first(),
                },
            )?,
            params: AttentionParams {
                num_heads: heads.len(),
                num_kv_heads: heads.len(),
                qk_dim: qk,
                v_dim: s.v_head_dim,
                scale: s.softmax_scale,
                sliding_window: None,
            },
            spec: s.clone(),
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
        let s = &self.spec;
        let (h, nope, rope) = (
            self.params.num_heads,
            s.qk_nope_head_dim,
            s.qk_rope_head_dim,
        );
        let mut q = match &self.query {
            Query::Direct(l) => l.forward(b, x)?,
            Query::LowRank { a, norm, b: up } => {
                up.forward(b, &norm.forward(b, &a.forward(b, x)?)?)?
            }
        };
        b.rope(
            &mut q,
            step,
            RopeApply {
                num_heads: h,
                head_stride: nope + rope,
                offset: nope,
            },
        )?;
        let compressed = self.kv_a.forward(b, x)?;
        let latent = self
            .kv_norm
            .forward(b, &b.narrow_cols(&compressed, 0, s.kv_lora_rank)?)?;
        let mut k_rot = b.narrow_cols(&compressed, s.kv_lora_rank, rope)?;
        b.rope(
            &mut k_rot,
            step,
            RopeApply {
                num_heads: 1,
                head_stride: rope,
                offset: 0,
            },
        )?;
        let kv = self.kv_b.forward(b, &latent)?;
        let (k_nope, v) = b.split_heads(&kv, h, nope)?;
        let k = b.concat_shared(&k_nope, &k_rot, h)?;
        b.write_kv(cache, &k, &v, step)?;
        let o = b.attention(&q, cache, step, &self.params)?;
        self.o.forward(b, &o)
    }
}

//! Grouped-query attention (Llama, Qwen, Mixtral, OLMoE), with optional q/k biases and q/k RMSNorm
//! per head (Qwen3) or over the whole projection (OLMoE). Under tensor parallelism each rank owns a
//! block of query heads (and the KV heads they read); `o_proj` yields a partial sum.

use tessera_common::{GqaSpec, QkNorm};
use tessera_kernels::{AttentionParams, Backend, KvValues, RopeApply};

use std::ops::Range;

use super::tp::cols;
use super::{Linear, LinearSpec, RmsNorm, Split, TpContext, WeightLoader};
use crate::WorkerError;

pub struct Gqa<B: Backend> {
    q: Linear<B>,
    k: Linear<B>,
    v: Linear<B>,
    o: Linear<B>,
    q_norm: Option<RmsNorm<B>>,
    k_norm: Option<RmsNorm<B>>,
    /// Columns of q and k this rank keeps after a whole-projection norm.
    keep: Option<(Range<usize>, Range<usize>)>,
    params: AttentionParams,
}

impl<B: Backend> Gqa<B> {
    pub fn load(
        w: &WeightLoader<'_, B>,
        s: &GqaSpec,
        dims: (usize, f32),
        tp: &TpContext<B>,
    ) -> Result<Self, WorkerError> {
        let (hidden, eps) = dims;
        let d = s.head_dim;
        let (qw, kvw) = (s.num_heads * d, s.num_kv_heads * d);
        let (hq, hkv) = tp.heads(s.num_heads, s.num_kv_heads)?;
        let p = &s.prefix;
        let norm =
            |name: &str, len: usize| RmsNorm::load(w, &format!("{p}.{name}.weight"), len, eps);
        // A norm over the whole projection needs all of it: such ranks compute q and k in full and
        // keep their heads after the norm.
        let whole = s.qk_norm == QkNorm::Whole;
        let (q_norm, k_norm) = match s.qk_norm {
            QkNorm::None => (None, None),
            QkNorm::PerHead => (Some(norm("q_norm", d)?), Some(norm("k_norm", d)?)),
            QkNorm::Whole => (Some(norm("q_norm", qw)?), Some(norm("k_norm", kvw)?)),
        };
        let names = ["q_proj", "k_proj", "v_proj", "o_proj"].map(|n| format!("{p}.{n}"));
        let spec = |i: usize, out, inp, bias| LinearSpec {
            prefix: &names[i],
            out,
            inp,
            bias,
        };
        let qk_split = |heads| {
            if whole {
                Split::Replicated
            } else {
                Split::Out(cols(heads, d))
            }
        };
        Ok(Gqa {
            q: Linear::load_split(w, spec(0, qw, hidden, s.qkv_bias), qk_split(&hq))?,
            k: Linear::load_split(w, spec(1, kvw, hidden, s.qkv_bias), qk_split(&hkv))?,
            v: Linear::load_split(
                w,
                spec(2, kvw, hidden, s.qkv_bias),
                Split::Out(cols(&hkv, d)),
            )?,
            o: Linear::load_split(
                w,
                spec(3, hidden, qw, s.o_bias),
                Split::In {
                    range: cols(&hq, d),
                    bias: tp.is_first(),
                },
            )?,
            q_norm,
            k_norm,
            keep: (whole && tp.world() > 1).then(|| (cols(&hq, d), cols(&hkv, d))),
            params: AttentionParams {
                num_heads: hq.len(),
                num_kv_heads: hkv.len(),
                qk_dim: d,
                v_dim: d,
                scale: (d as f32).powf(-0.5),
                sliding_window: s.sliding_window,
            },
        })
    }

    pub fn params(&self) -> &AttentionParams {
        &self.params
    }

    /// The cache stores a value row beside every key.
    pub fn kv_values(&self) -> KvValues {
        KvValues::Separate
    }

    pub fn forward(
        &self,
        b: &B,
        x: &B::Tensor,
        cache: &mut B::KvLayer,
        step: &B::Step,
    ) -> Result<B::Tensor, WorkerError> {
        let p = &self.params;
        // One call, so the backend can stream q, k and v in one pass.
        let [mut q, mut k, v]: [B::Tensor; 3] = b
            .linear_many(x, &[self.q.parts(), self.k.parts(), self.v.parts()])?
            .try_into()
            .map_err(|_| WorkerError::Request("linear_many returned the wrong count".into()))?;
        let rope = |num_heads| RopeApply {
            num_heads,
            head_stride: p.qk_dim,
            offset: 0,
        };
        let (rope_q, rope_k) = (rope(p.num_heads), rope(p.num_kv_heads));
        match (&self.q_norm, &self.k_norm) {
            // Norm then rotation in one call each (one kernel where the norm is per head, as
            // Qwen3's; whole-projection norms only narrow first when split across ranks).
            (Some(qn), Some(kn)) if self.keep.is_none() => {
                q = b.norm_rope(&q, &qn.weight, qn.eps, step, rope_q)?;
                k = b.norm_rope(&k, &kn.weight, kn.eps, step, rope_k)?;
            }
            norms => {
                if let (Some(qn), Some(kn)) = norms {
                    q = qn.forward(b, &q)?;
                    k = kn.forward(b, &k)?;
                }
                if let Some((qc, kc)) = &self.keep {
                    q = b.narrow_cols(&q, qc.start, qc.len())?;
                    k = b.narrow_cols(&k, kc.start, kc.len())?;
                }
                b.rope(&mut q, step, rope_q)?;
                b.rope(&mut k, step, rope_k)?;
            }
        }
        b.write_kv(cache, &k, Some(&v), step)?;
        let o = b.attention(&q, cache, step, p)?;
        self.o.forward(b, &o)
    }
}

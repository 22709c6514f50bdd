//! DeepSeek's multi-head latent attention, over a latent KV cache with absorbed up-projections.
//!
//! Queries come from `q_proj` or the low-rank `q_a_proj → RMSNorm → q_b_proj`; keys and values
//! from the compressed latent `kv_a_proj_with_mqa → RMSNorm`, plus one rotary key shared by all
//! heads. transformers expands the latent into per-head keys and values (`kv_b_proj`); here the
//! cache keeps only each position's `[latent | rotary key]` row (576 values for DeepSeek-V3,
//! against 128 heads × 320 expanded), read as one KV head whose values are its first
//! `kv_lora_rank` elements ([`KvValues::KeyPrefix`]).
//!
//! `kv_b_proj` is split per head into `W_UK` (key rows) and `W_UV` (value rows) at load time
//! and absorbed: a head's score `q_nope · (W_UK c)` is `(W_UKᵀ q_nope) · c`, so each query's
//! nope part is projected into the latent space once (`head_linear` with `W_UKᵀ`) and the
//! rotary part appended; attention over the latent rows then gives `Σ p c` per head, and
//! `W_UV` turns it into the head's value (`Σ p W_UV c`). Attention is the shared paged kernel
//! with every query head on the one latent KV head (`qk_dim = latent + rope`,
//! `v_dim = latent`). This costs more arithmetic per attended position than the expanded form,
//! which matters for long prefills, but reads a fraction of the cache bytes, which is what
//! bounds decode.
//!
//! So a step with long prompts may run the expanded form instead ([`MlaForm::Expanded`], chosen
//! per sequence by [`MlaPolicy`]): the step's contexts are read out of the latent cache as rows,
//! expanded by `kv_b_proj` into per-head keys (plus the shared rotary key) and values, and
//! attended as ordinary multi-head attention ([`Backend::attention_rows`]), as transformers
//! computes it. The cache is the same in both forms. When the step's contexts are longer than
//! the memory profile's step ([`Expansion`]), the heads are expanded and attended a few at a time
//! (each pass reads its heads' rows of `kv_b_proj` in place, [`Backend::linear_rows`], and
//! writes its heads' columns of the output, [`Backend::write_cols`]), so the expanded keys and
//! values of only those heads exist at once; and when even one head's pass over the whole
//! contexts is too large, the contexts are taken a chunk of positions at a time, each chunk's
//! attention merged into the others' by its log-sum-exp ([`Backend::merge_attention`]). A step
//! mixing decodes with prompt chunks attends each part in its own form ([`MlaAttend::Split`]).

use std::ops::Range;

use tessera_common::MlaSpec;
use tessera_kernels::{
    AttentionParams, AttentionPart, Backend, BlockLayout, KvRows, KvValues, RopeApply,
};

use super::mla_policy::{Expansion, MlaForm};
use super::tp::cols;
use super::{Linear, LinearSpec, RmsNorm, Split, TpContext, WeightLoader};
use crate::WorkerError;
use crate::checkpoint::Slice;

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
    /// `W_UKᵀ` per local head: `[heads·latent, nope]`.
    uk_t: B::Weight,
    /// `W_UV` per local head: `[heads·v, latent]`.
    uv: B::Weight,
    /// This rank's heads of `kv_b_proj`, `[heads·(nope + v), latent]`: the expanded form's
    /// up-projection of the context rows (no bias), read a pass's heads at a time.
    kv_b: B::Weight,
    o: Linear<B>,
    spec: MlaSpec,
    /// The absorbed form: every head over the one latent KV head.
    params: AttentionParams,
    /// The expanded form: a KV head per head, keys `nope + rope` wide, values `v`.
    expanded: AttentionParams,
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
        let (nope, v) = (s.qk_nope_head_dim, s.v_head_dim);
        let kv_width = nope + v;
        // This rank's heads of kv_b_proj, each `[nope + v, latent]`: key rows, then value rows.
        let kv_b = w.host(
            &name("kv_b_proj.weight"),
            &[h * kv_width, latent],
            Slice::Rows(cols(&heads, kv_width)),
        )?;
        // The shape was checked against the config as it was read, so these cannot fail.
        let uk_t = kv_b.block_rows(heads.len(), 0..nope, BlockLayout::Transposed)?;
        let uv = kv_b.block_rows(heads.len(), nope..kv_width, BlockLayout::AsStored)?;
        let (uk_t, uv) = (w.backend.upload_weight(uk_t)?, w.backend.upload_weight(uv)?);
        let kv_b = w.backend.upload_weight(kv_b)?;
        Ok(Mla {
            query,
            kv_a: load(
                "kv_a_proj_with_mqa",
                (latent + s.qk_rope_head_dim, hidden, s.attention_bias),
                Split::Replicated,
            )?,
            kv_norm: RmsNorm::load(w, &name("kv_a_layernorm.weight"), latent, LATENT_NORM_EPS)?,
            uk_t,
            uv,
            kv_b,
            o: load(
                "o_proj",
                (hidden, h * v, s.attention_bias),
                Split::In {
                    range: cols(&heads, v),
                    bias: tp.is_first(),
                },
            )?,
            params: AttentionParams {
                num_heads: heads.len(),
                num_kv_heads: 1,
                qk_dim: latent + s.qk_rope_head_dim,
                v_dim: latent,
                scale: s.softmax_scale,
                sliding_window: None,
            },
            expanded: AttentionParams {
                num_heads: heads.len(),
                num_kv_heads: heads.len(),
                qk_dim: qk,
                v_dim: v,
                scale: s.softmax_scale,
                sliding_window: None,
            },
            spec: s.clone(),
        })
    }

    pub fn params(&self) -> &AttentionParams {
        &self.params
    }

    /// The layer's shape, as the config gives it.
    pub fn spec(&self) -> &MlaSpec {
        &self.spec
    }

    /// The cache's values are the latent at the start of each key row.
    pub fn kv_values(&self) -> KvValues {
        KvValues::KeyPrefix
    }

    pub fn forward(
        &self,
        b: &B,
        x: &B::Tensor,
        cache: &mut B::KvLayer,
        step: &B::Step,
        attend: &MlaAttend<'_, B>,
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
        b.write_kv(cache, &b.concat_heads(&latent, &k_rot, 1)?, None, step)?;
        let o = match attend {
            MlaAttend::Whole(MlaForm::Absorbed) => self.absorbed(b, &q, cache, step)?,
            MlaAttend::Whole(MlaForm::Expanded(e)) => self.expanded(b, &q, cache, step, e)?,
            MlaAttend::Split(split) => {
                let (tokens, first) = (b.dims(&q).0, split.absorbed_tokens);
                let q_absorbed = b.narrow_rows(&q, 0, first)?;
                let q_expanded = b.narrow_rows(&q, first, tokens - first)?;
                let absorbed = self.absorbed(b, &q_absorbed, cache, split.absorbed)?;
                let expanded =
                    self.expanded(b, &q_expanded, cache, split.expanded, &split.expansion)?;
                let width = h * s.v_head_dim;
                let mut o = b.zeros(tokens, width)?;
                b.pack_into(&mut o, 0, &absorbed)?;
                b.pack_into(&mut o, first * width, &expanded)?;
                o
            }
        };
        self.o.forward(b, &o)
    }

    /// The absorbed form's attention, from the queries (`[nope | rope]` per head, rotated) over
    /// the latent cache: every head's value, `[tokens, heads·v]`.
    fn absorbed(
        &self,
        b: &B,
        q: &B::Tensor,
        cache: &B::KvLayer,
        step: &B::Step,
    ) -> Result<B::Tensor, WorkerError> {
        let (h, nope) = (self.params.num_heads, self.spec.qk_nope_head_dim);
        let (q_nope, q_rot) = b.split_heads(q, h, nope)?;
        let q_latent = b.head_linear(&q_nope, &self.uk_t, h)?;
        let q = b.concat_heads(&q_latent, &q_rot, h)?;
        let o_latent = b.attention(&q, cache, step, &self.params)?;
        Ok(b.head_linear(&o_latent, &self.uv, h)?)
    }

    /// The expanded form's attention, from the queries (`[nope | rope]` per head, rotated) over
    /// the step's contexts in the cache (this step's rows already written), in the chunks the
    /// step was prepared with ([`Backend::prepare_context`] with `e.chunk`) and
    /// `e.heads_per_pass` heads at a time: every head's value, `[tokens, heads·v]`.
    fn expanded(
        &self,
        b: &B,
        q: &B::Tensor,
        cache: &B::KvLayer,
        step: &B::Step,
        e: &Expansion,
    ) -> Result<B::Tensor, WorkerError> {
        // Chunk 0 always exists on a prepared step (and names the omission on another).
        let mut acc = self.expanded_chunk(b, (q, cache), (step, 0), e.heads_per_pass)?;
        for chunk in 1..b.context_chunks(step) {
            let part = self.expanded_chunk(b, (q, cache), (step, chunk), e.heads_per_pass)?;
            b.merge_attention(&mut acc, &part)?;
        }
        Ok(acc.out)
    }

    /// The part of the expanded attention over chunk `chunk` of the step's contexts.
    fn expanded_chunk(
        &self,
        b: &B,
        (q, cache): (&B::Tensor, &B::KvLayer),
        (step, chunk): (&B::Step, usize),
        heads_per_pass: usize,
    ) -> Result<AttentionPart<B::Tensor>, WorkerError> {
        let s = &self.spec;
        let (h, latent, v_dim) = (self.expanded.num_heads, s.kv_lora_rank, s.v_head_dim);
        let rows = b.gather_context(cache, step, chunk)?;
        let context = ExpandedContext {
            latent: b.narrow_cols(&rows, 0, latent)?,
            rot: b.narrow_cols(&rows, latent, s.qk_rope_head_dim)?,
            chunk,
        };
        drop(rows);
        if heads_per_pass >= h {
            return self.attend_heads(b, (q, &context), step, 0..h);
        }
        let (qk, tokens) = (self.expanded.qk_dim, b.dims(q).0);
        let (mut out, mut lse) = (b.zeros(tokens, h * v_dim)?, b.zeros(tokens, h)?);
        for first in (0..h).step_by(heads_per_pass.max(1)) {
            let heads = first..(first + heads_per_pass).min(h);
            let q_pass = b.narrow_cols(q, first * qk, heads.len() * qk)?;
            let part = self.attend_heads(b, (&q_pass, &context), step, heads)?;
            b.write_cols(&mut out, first * v_dim, &part.out)?;
            b.write_cols(&mut lse, first, &part.lse)?;
        }
        Ok(AttentionPart { out, lse })
    }

    /// Expanded attention of the local heads `heads` (`q` holds theirs alone) over `context`.
    fn attend_heads(
        &self,
        b: &B,
        (q, context): (&B::Tensor, &ExpandedContext<B>),
        step: &B::Step,
        heads: Range<usize>,
    ) -> Result<AttentionPart<B::Tensor>, WorkerError> {
        let (n, nope) = (heads.len(), self.spec.qk_nope_head_dim);
        let width = nope + self.spec.v_head_dim;
        let rows = heads.start * width..heads.end * width;
        let kv = b.linear_rows(&context.latent, &self.kv_b, rows)?;
        let (k_nope, v) = b.split_heads(&kv, n, nope)?;
        drop(kv);
        let k = b.concat_heads_shared(&k_nope, &context.rot, n)?;
        drop(k_nope);
        let params = AttentionParams {
            num_heads: n,
            num_kv_heads: n,
            ..self.expanded
        };
        let kv = KvRows {
            k: &k,
            v: &v,
            chunk: context.chunk,
        };
        Ok(b.attention_rows(q, kv, step, &params)?)
    }
}

/// One chunk of the step's context rows read out of the latent cache, split for expansion.
struct ExpandedContext<B: Backend> {
    /// `[chunk rows, latent]`, what `kv_b_proj` expands.
    latent: B::Tensor,
    /// `[chunk rows, rope]`, the rotary key every head shares.
    rot: B::Tensor,
    chunk: usize,
}

/// How the MLA layers of one step attend, with the steps each part runs over.
pub enum MlaAttend<'a, B: Backend> {
    /// The whole step in one form.
    Whole(MlaForm),
    /// The step's first tokens absorbed, the rest expanded ([`crate::layers::SplitStep`]).
    Split(SplitAttend<'a, B>),
}

/// The two parts of a split step ([`MlaAttend::Split`]).
pub struct SplitAttend<'a, B: Backend> {
    /// Tokens attended absorbed: the step's first rows.
    pub absorbed_tokens: usize,
    /// Those tokens' sequences as a step of their own.
    pub absorbed: &'a B::Step,
    /// The other sequences as a step of their own, made ready for the expanded form
    /// ([`Backend::prepare_context`] with `expansion.chunk`).
    pub expanded: &'a B::Step,
    pub expansion: Expansion,
}

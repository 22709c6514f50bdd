//! Paged causal attention on the CPU.
//!
//! The cache of one layer is `num_blocks × block_size` slots, each holding `num_kv_heads` keys of
//! `k_dim` and values of `v_dim`. A sequence's block table maps its positions to slots; attention
//! reads keys and values straight from those slots (no per-step copy of the cache). Query heads are
//! grouped onto KV heads (GQA). Rows (tokens) are processed in parallel.

use rayon::prelude::*;

use crate::{AttentionParams, BackendError, KvSpec, Result, StepMeta};

/// One layer's K and V storage.
pub struct CpuKv {
    pub(crate) spec: KvSpec,
    pub(crate) k: Vec<f32>,
    pub(crate) v: Vec<f32>,
}

impl CpuKv {
    pub(crate) fn new(spec: KvSpec) -> Self {
        let slots = spec.num_blocks * spec.block_size;
        CpuKv {
            spec,
            k: vec![0.0; slots * spec.num_kv_heads * spec.k_dim],
            v: vec![0.0; slots * spec.num_kv_heads * spec.v_dim],
        }
    }
}

/// The cache slot of `pos` for a sequence, checked against the table and the cache size.
fn slot(table: &[u32], pos: usize, spec: &KvSpec) -> Result<usize> {
    let block = *table.get(pos / spec.block_size).ok_or_else(|| {
        BackendError::invalid(
            "attention",
            format!(
                "position {pos} beyond a block table of {} blocks",
                table.len()
            ),
        )
    })? as usize;
    if block >= spec.num_blocks {
        return Err(BackendError::invalid(
            "attention",
            format!("block {block} beyond a cache of {} blocks", spec.num_blocks),
        ));
    }
    Ok(block * spec.block_size + pos % spec.block_size)
}

pub(crate) fn write_kv(cache: &mut CpuKv, k: &[f32], v: &[f32], meta: &StepMeta) -> Result<()> {
    let spec = cache.spec;
    let (kw, vw) = (
        spec.num_kv_heads * spec.k_dim,
        spec.num_kv_heads * spec.v_dim,
    );
    if k.len() != meta.num_tokens() * kw || v.len() != meta.num_tokens() * vw {
        return Err(BackendError::shape(
            "write_kv",
            format!(
                "k has {} and v {} values for {} tokens of widths {kw}/{vw}",
                k.len(),
                v.len(),
                meta.num_tokens()
            ),
        ));
    }
    for s in &meta.seqs {
        let first = s.context_len - s.num_tokens;
        for j in 0..s.num_tokens {
            let slot = slot(&s.block_table, first + j, &spec)?;
            let t = s.token_start + j;
            cache.k[slot * kw..(slot + 1) * kw].copy_from_slice(&k[t * kw..(t + 1) * kw]);
            cache.v[slot * vw..(slot + 1) * vw].copy_from_slice(&v[t * vw..(t + 1) * vw]);
        }
    }
    Ok(())
}

pub(crate) fn attention(
    q: &[f32],
    cache: &CpuKv,
    meta: &StepMeta,
    p: &AttentionParams,
) -> Result<Vec<f32>> {
    let spec = &cache.spec;
    if spec.k_dim != p.qk_dim || spec.v_dim != p.v_dim || spec.num_kv_heads != p.num_kv_heads {
        return Err(BackendError::shape(
            "attention",
            format!("cache {spec:?} does not fit {p:?}"),
        ));
    }
    if p.num_kv_heads == 0 || !p.num_heads.is_multiple_of(p.num_kv_heads) {
        return Err(BackendError::shape(
            "attention",
            format!(
                "{} query heads over {} kv heads",
                p.num_heads, p.num_kv_heads
            ),
        ));
    }
    let (qw, ow) = (p.num_heads * p.qk_dim, p.num_heads * p.v_dim);
    let n = meta.num_tokens();
    if q.len() != n * qw {
        return Err(BackendError::shape(
            "attention",
            format!("q has {} values for {n} tokens × {qw}", q.len()),
        ));
    }
    // Resolve every (sequence, position) to its slot once; rows then only read.
    let mut slots_per_seq = Vec::with_capacity(meta.seqs.len());
    let mut row_of_token = vec![(0usize, 0usize); n];
    for (si, s) in meta.seqs.iter().enumerate() {
        let slots = (0..s.context_len)
            .map(|pos| slot(&s.block_table, pos, spec))
            .collect::<Result<Vec<_>>>()?;
        slots_per_seq.push(slots);
        let first = s.context_len - s.num_tokens;
        for j in 0..s.num_tokens {
            row_of_token[s.token_start + j] = (si, first + j);
        }
    }
    let group = p.num_heads / p.num_kv_heads;
    let (kw, vw) = (
        spec.num_kv_heads * spec.k_dim,
        spec.num_kv_heads * spec.v_dim,
    );
    let mut out = vec![0f32; n * ow];
    out.par_chunks_mut(ow).enumerate().for_each(|(t, orow)| {
        let (si, pos) = row_of_token[t];
        let slots = &slots_per_seq[si];
        let lo = p.sliding_window.map_or(0, |w| (pos + 1).saturating_sub(w));
        let ctx = &slots[lo..=pos];
        let mut scores = vec![0f32; ctx.len()];
        for h in 0..p.num_heads {
            let kvh = h / group;
            let qh = &q[t * qw + h * p.qk_dim..][..p.qk_dim];
            let mut max = f32::NEG_INFINITY;
            for (sc, &sl) in scores.iter_mut().zip(ctx) {
                let kh = &cache.k[sl * kw + kvh * p.qk_dim..][..p.qk_dim];
                *sc = super::linear::dot(qh, kh) * p.scale;
                max = max.max(*sc);
            }
            let mut sum = 0f32;
            for sc in scores.iter_mut() {
                *sc = (*sc - max).exp();
                sum += *sc;
            }
            let oh = &mut orow[h * p.v_dim..(h + 1) * p.v_dim];
            for (sc, &sl) in scores.iter().zip(ctx) {
                let w = sc / sum;
                let vh = &cache.v[sl * vw + kvh * p.v_dim..][..p.v_dim];
                for (o, v) in oh.iter_mut().zip(vh) {
                    *o += w * v;
                }
            }
        }
    });
    Ok(out)
}

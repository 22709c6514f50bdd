//! Paged causal attention on the CPU.
//!
//! The cache of one layer is `num_blocks × block_size` slots, each holding `num_kv_heads` keys of
//! `k_dim` and values of `v_dim`. A sequence's block table maps its positions to slots; attention
//! reads keys and values straight from those slots (no per-step copy of the cache). Query heads are
//! grouped onto KV heads (GQA). Work is split by (token, KV head), so a single decoding token still
//! spreads over the threads when the context is long enough to be worth it.

use rayon::prelude::*;

use super::scratch;
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
    // Check every sequence's block table once; the rows then map positions to slots unchecked.
    let mut row_of_token = Vec::with_capacity(n);
    let mut macs = 0;
    for (si, s) in meta.seqs.iter().enumerate() {
        if s.context_len > 0 {
            slot(&s.block_table, s.context_len - 1, spec)?;
        }
        if let Some(&bad) = s.block_table[..s.context_len.div_ceil(spec.block_size)]
            .iter()
            .find(|b| **b as usize >= spec.num_blocks)
        {
            return Err(BackendError::invalid(
                "attention",
                format!("block {bad} beyond a cache of {} blocks", spec.num_blocks),
            ));
        }
        let first = s.context_len - s.num_tokens;
        row_of_token.extend((first..s.context_len).map(|pos| (si, pos)));
        macs += s.num_tokens * s.context_len * p.num_heads * (p.qk_dim + p.v_dim);
    }
    let group = p.num_heads / p.num_kv_heads;
    let (kw, vw) = (
        spec.num_kv_heads * spec.k_dim,
        spec.num_kv_heads * spec.v_dim,
    );
    let bs = spec.block_size;
    // One unit of work: token `t`'s query heads that share KV head `kvh` (adjacent in the output).
    let unit = |u: usize, ogroup: &mut [f32]| {
        let (t, kvh) = (u / p.num_kv_heads, u % p.num_kv_heads);
        let (si, pos) = row_of_token[t];
        let table = &meta.seqs[si].block_table;
        let lo = p.sliding_window.map_or(0, |w| (pos + 1).saturating_sub(w));
        let slot_of = |q: usize| table[q / bs] as usize * bs + q % bs;
        scratch::with_zeroed(pos + 1 - lo, |scores| {
            for (g, oh) in ogroup.chunks_exact_mut(p.v_dim).enumerate() {
                let h = kvh * group + g;
                let qh = &q[t * qw + h * p.qk_dim..][..p.qk_dim];
                let mut max = f32::NEG_INFINITY;
                for (sc, q_pos) in scores.iter_mut().zip(lo..=pos) {
                    let kh = &cache.k[slot_of(q_pos) * kw + kvh * p.qk_dim..][..p.qk_dim];
                    *sc = super::linear::dot(qh, kh) * p.scale;
                    max = max.max(*sc);
                }
                let mut sum = 0f32;
                for sc in scores.iter_mut() {
                    *sc = (*sc - max).exp();
                    sum += *sc;
                }
                oh.fill(0.0);
                for (sc, q_pos) in scores.iter().zip(lo..=pos) {
                    let w = sc / sum;
                    let vh = &cache.v[slot_of(q_pos) * vw + kvh * p.v_dim..][..p.v_dim];
                    for (o, v) in oh.iter_mut().zip(vh) {
                        *o += w * v;
                    }
                }
            }
        })
    };
    let mut out = vec![0f32; n * ow];
    let chunk = (group * p.v_dim).max(1);
    if super::linear::worth_parallel(macs) {
        out.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(u, o)| unit(u, o));
    } else {
        out.chunks_mut(chunk)
            .enumerate()
            .for_each(|(u, o)| unit(u, o));
    }
    Ok(out)
}

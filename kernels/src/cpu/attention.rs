//! Paged causal attention on the CPU.
//!
//! The cache of one layer is `num_blocks` blocks of `block_size` slots. Within a block, storage is
//! head-major: `[kv_head][slot][dim]`, so the keys (or values) one KV head holds for a block's
//! consecutive positions are one contiguous `block_size × dim` matrix. A sequence's block table
//! maps its positions to blocks; attention reads keys and values straight from the blocks (no
//! per-step copy of the cache).
//!
//! Query heads are grouped onto KV heads (GQA), and the unit of work is one token's group of query
//! heads that share a KV head: every key and value row is read once for the whole group. Scores of
//! a block are one small matrix product (the SIMD `linear` kernel, keys as weight rows and the
//! group's queries as tokens), the softmax exponentials are vectorised, and `P·V` accumulates the
//! group's outputs in registers. Units run in parallel when the context makes it worth it, so a
//! single decoding token still spreads over the threads.

use rayon::prelude::*;

use super::linear::{Acts, Isa, Mat, Pv, pv_accumulate, rows_times_x, softmax_in_place};
use super::{CpuTensor, scratch};
use crate::{AttentionParams, BackendError, KvSpec, KvValues, Result, StepMeta, WeightView};

/// One layer's K and V storage, `[block][kv_head][slot][dim]`.
pub struct CpuKv {
    pub(crate) spec: KvSpec,
    pub(crate) k: Vec<f32>,
    pub(crate) v: Vec<f32>,
}

impl CpuKv {
    /// Zeroed storage (untouched pages stay unmapped until used); fails on a size that overflows.
    pub(crate) fn new(spec: KvSpec) -> Result<Self> {
        spec.validate("alloc_kv")?;
        let (k, v) = spec.elements().ok_or_else(|| {
            BackendError::invalid(
                "alloc_kv",
                format!(
                    "{} blocks of {} positions overflow the address space",
                    spec.num_blocks, spec.block_size
                ),
            )
        })?;
        Ok(CpuKv {
            spec,
            k: vec![0.0; k],
            v: vec![0.0; v],
        })
    }
}

impl KvSpec {
    /// Index of the first element of `(block, kv_head, slot)` in a cache of rows `dim` wide.
    pub(super) fn at(&self, block: usize, head: usize, slot: usize, dim: usize) -> usize {
        ((block * self.num_kv_heads + head) * self.block_size + slot) * dim
    }
}

/// The cache block of `pos` for a sequence, checked against the table and the cache size.
fn block_of(table: &[u32], pos: usize, spec: &KvSpec) -> Result<usize> {
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
    Ok(block)
}

pub(crate) fn write_kv(
    cache: &mut CpuKv,
    k: &CpuTensor,
    v: Option<&CpuTensor>,
    meta: &StepMeta,
) -> Result<()> {
    let spec = cache.spec;
    spec.check_write(
        meta.num_tokens(),
        (k.rows, k.cols),
        v.map(|v| (v.rows, v.cols)),
    )?;
    let (k, v) = (&k.data, v.map(|v| &v.data));
    let (kd, vd) = (spec.k_dim, spec.v_dim);
    let (kw, vw) = (spec.num_kv_heads * kd, spec.num_kv_heads * vd);
    for s in &meta.seqs {
        let first = s.context_len - s.num_tokens;
        for j in 0..s.num_tokens {
            let pos = first + j;
            let (block, slot) = (block_of(&s.block_table, pos, &spec)?, pos % spec.block_size);
            let t = s.token_start + j;
            for h in 0..spec.num_kv_heads {
                let at = spec.at(block, h, slot, kd);
                cache.k[at..at + kd].copy_from_slice(&k[t * kw + h * kd..][..kd]);
                if let Some(v) = v {
                    let at = spec.at(block, h, slot, vd);
                    cache.v[at..at + vd].copy_from_slice(&v[t * vw + h * vd..][..vd]);
                }
            }
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
    // Check every sequence's block table once; the units then map positions to blocks unchecked.
    let mut row_of_token = Vec::with_capacity(n);
    let mut macs = 0;
    for (si, s) in meta.seqs.iter().enumerate() {
        for b in 0..s.context_len.div_ceil(spec.block_size) {
            block_of(&s.block_table, b * spec.block_size, spec)?;
        }
        let first = s.context_len - s.num_tokens;
        row_of_token.extend((first..s.context_len).map(|pos| (si, pos)));
        macs += s.num_tokens * s.context_len * p.num_heads * (p.qk_dim + p.v_dim);
    }
    let group = p.num_heads / p.num_kv_heads;
    let parallel = super::linear::worth_parallel(macs);
    // Few units and many heads per KV head (MLA's one latent head at decode) would leave
    // threads idle: a KV head's heads are then cut into `parts` units, each reading the keys
    // and values again for its share.
    let parts = if parallel {
        head_parts(group, n * p.num_kv_heads, rayon::current_num_threads())
    } else {
        1
    };
    let gs = group / parts;
    let bs = spec.block_size;
    let isa = Isa::best();
    // One unit of work: token `t`'s query heads `part * gs ..` of those that share KV head `kvh`
    // (adjacent in `q` and in the output).
    let unit = |u: usize, ogroup: &mut [f32]| {
        let (t, kvh, part) = (
            u / (p.num_kv_heads * parts),
            (u / parts) % p.num_kv_heads,
            u % parts,
        );
        let (si, pos) = row_of_token[t];
        let table = &meta.seqs[si].block_table;
        let lo = p.sliding_window.map_or(0, |w| (pos + 1).saturating_sub(w));
        let q_group = &q[t * qw + (kvh * group + part * gs) * p.qk_dim..][..gs * p.qk_dim];
        // Runs of consecutive positions in one block: (first position, block, slot, length).
        let runs = (lo / bs..=pos / bs).map(|b| {
            let first = (b * bs).max(lo);
            let end = ((b + 1) * bs).min(pos + 1);
            (first, table[b] as usize, first % bs, end - first)
        });
        let len = pos + 1 - lo;
        // `probs[g · len + i]`: head `g`'s weight for position `lo + i`.
        scratch::with_zeroed(len * gs, |probs| {
            scratch::with_zeroed(bs * gs, |block_scores| {
                for (first, block, slot, n) in runs.clone() {
                    let keys = Mat {
                        w: WeightView::F32(&cache.k),
                        offset: spec.at(block, kvh, slot, p.qk_dim),
                        stride: p.qk_dim,
                    };
                    let s = &mut block_scores[..n * gs];
                    rows_times_x(isa, keys, 0..n, Acts::rows(q_group, p.qk_dim), s);
                    for (i, row) in s.chunks_exact(gs).enumerate() {
                        for (g, v) in row.iter().enumerate() {
                            probs[g * len + first - lo + i] = v * p.scale;
                        }
                    }
                }
            });
            for head in probs.chunks_exact_mut(len) {
                softmax_in_place(isa, head);
            }
            ogroup.fill(0.0);
            let (store, vs) = match spec.values {
                KvValues::Separate => (&cache.v, p.v_dim),
                KvValues::KeyPrefix => (&cache.k, p.qk_dim),
            };
            for (first, block, slot, n) in runs {
                let values = &store[spec.at(block, kvh, slot, vs)..][..(n - 1) * vs + p.v_dim];
                let pv = Pv {
                    p: &probs[first - lo..],
                    ps: len,
                    group: gs,
                    v: values,
                    n,
                    vd: p.v_dim,
                    vs,
                };
                pv_accumulate(isa, pv, ogroup);
            }
        })
    };
    let mut out = super::pool::zeroed(n * ow);
    let chunk = (gs * p.v_dim).max(1);
    if parallel {
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

/// Into how many units to cut each KV head's `group` query heads when a step has `units` of
/// (token, KV head) for `threads` threads: the largest divisor of `group` no greater than the
/// threads each unit would otherwise leave idle (1 when the units already fill the threads).
fn head_parts(group: usize, units: usize, threads: usize) -> usize {
    let want = threads.div_ceil(units.max(1));
    (1..=want.min(group))
        .rev()
        .find(|d| group.is_multiple_of(*d))
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SeqMeta;

    #[test]
    fn heads_are_cut_only_when_units_leave_threads_idle() {
        // MLA at decode: one token, one latent head, 16 heads, 8 threads: 8 parts of 2 heads.
        assert_eq!(head_parts(16, 1, 8), 8);
        // Parts divide the group: 12 heads for 8 idle threads -> 6 parts of 2.
        assert_eq!(head_parts(12, 1, 8), 6);
        // Enough units already, or one head per KV head: no cut.
        assert_eq!(head_parts(16, 8, 8), 1);
        assert_eq!(head_parts(1, 1, 8), 1);
        // Two tokens on 8 threads: 4 parts each.
        assert_eq!(head_parts(16, 2, 8), 4);
    }

    fn vals(len: usize, seed: u64) -> Vec<f32> {
        (0..len as u64)
            .map(|i| {
                let h =
                    (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed.wrapping_mul(0xD6E8_FEB8);
                ((h >> 40) % 2000) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// Softmax attention of one query head over explicit key/value rows, in f64.
    fn naive(q: &[f32], keys: &[&[f32]], values: &[&[f32]], scale: f32) -> Vec<f64> {
        let s: Vec<f64> = keys
            .iter()
            .map(|k| {
                q.iter()
                    .zip(*k)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum::<f64>()
                    * scale as f64
            })
            .collect();
        let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|v| (v - max).exp()).collect();
        let z: f64 = e.iter().sum();
        (0..values[0].len())
            .map(|c| e.iter().zip(values).map(|(p, v)| p / z * v[c] as f64).sum())
            .collect()
    }

    /// A cache layout and the step attending over it.
    struct Case {
        heads: usize,
        kv_heads: usize,
        vd: usize,
        values: KvValues,
        seqs: Vec<SeqMeta>,
    }

    impl Case {
        /// Two sequences with out-of-order tables: a decode token at position 69 and a two-token
        /// chunk ending at position 49 (enough work to run in parallel).
        fn two_sequences(heads: usize, kv_heads: usize, vd: usize, values: KvValues) -> Case {
            Case {
                heads,
                kv_heads,
                vd,
                values,
                seqs: vec![
                    SeqMeta {
                        token_start: 0,
                        num_tokens: 1,
                        context_len: 70,
                        block_table: (0..18).rev().map(|b| b * 3 + 1).collect(),
                    },
                    SeqMeta {
                        token_start: 1,
                        num_tokens: 2,
                        context_len: 50,
                        block_table: (60..73).collect(),
                    },
                ],
            }
        }
    }

    #[test]
    fn gqa_over_scattered_blocks_matches_a_naive_reference() {
        against_naive(Case::two_sequences(8, 2, 64, KvValues::Separate));
    }

    #[test]
    fn values_read_from_the_keys_match_a_naive_reference() {
        // MLA's latent cache: the value is the start of the key row.
        against_naive(Case::two_sequences(8, 2, 40, KvValues::KeyPrefix));
    }

    #[test]
    fn one_decoding_token_over_one_latent_head_spreads_its_heads() {
        // One unit of (token, KV head) for four threads: the 16 heads go out in 4 parts.
        let case = Case {
            heads: 16,
            kv_heads: 1,
            vd: 48,
            values: KvValues::KeyPrefix,
            seqs: vec![SeqMeta {
                token_start: 0,
                num_tokens: 1,
                context_len: 300,
                block_table: (0..75).rev().collect(),
            }],
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(4)
            .build()
            .unwrap();
        assert_eq!(head_parts(16, 1, 4), 4);
        pool.install(|| against_naive(case));
    }

    /// Attention over a random cache against [`naive`], with and without a sliding window.
    fn against_naive(c: Case) {
        let (d, bs) = (64, 4);
        let (heads, kv_heads, vd) = (c.heads, c.kv_heads, c.vd);
        let spec = KvSpec {
            num_blocks: 80,
            block_size: bs,
            num_kv_heads: kv_heads,
            k_dim: d,
            v_dim: vd,
            values: c.values,
        };
        let mut cache = CpuKv::new(spec).unwrap();
        cache.k = vals(cache.k.len(), 1);
        cache.v = vals(cache.v.len(), 2);
        let meta = StepMeta::without_ids(c.seqs, bs);
        let rows: Vec<(usize, usize)> = meta
            .seqs
            .iter()
            .enumerate()
            .flat_map(|(si, s)| (s.context_len - s.num_tokens..s.context_len).map(move |p| (si, p)))
            .collect();
        let q = vals(rows.len() * heads * d, 3);
        for window in [None, Some(5)] {
            let p = AttentionParams {
                num_heads: heads,
                num_kv_heads: kv_heads,
                qk_dim: d,
                v_dim: vd,
                scale: 0.125,
                sliding_window: window,
            };
            let out = attention(&q, &cache, &meta, &p).unwrap();
            for (t, &(si, pos)) in rows.iter().enumerate() {
                let table = &meta.seqs[si].block_table;
                let lo = window.map_or(0, |w| (pos + 1usize).saturating_sub(w));
                for h in 0..heads {
                    let kvh = h / (heads / kv_heads);
                    // The documented layout: [block][kv_head][slot][dim].
                    let row = |c: &[f32], x: usize, width: usize| {
                        let at = ((table[x / bs] as usize * kv_heads + kvh) * bs + x % bs) * width;
                        c[at..at + width].to_vec()
                    };
                    let keys: Vec<Vec<f32>> = (lo..=pos).map(|x| row(&cache.k, x, d)).collect();
                    let values: Vec<Vec<f32>> = match spec.values {
                        KvValues::Separate => (lo..=pos).map(|x| row(&cache.v, x, vd)).collect(),
                        KvValues::KeyPrefix => keys.iter().map(|k| k[..vd].to_vec()).collect(),
                    };
                    let want = naive(
                        &q[(t * heads + h) * d..][..d],
                        &keys.iter().map(Vec::as_slice).collect::<Vec<_>>(),
                        &values.iter().map(Vec::as_slice).collect::<Vec<_>>(),
                        0.125,
                    );
                    let got = &out[(t * heads + h) * vd..][..vd];
                    for (g, w) in got.iter().zip(&want) {
                        assert!(
                            (*g as f64 - w).abs() < 1e-5,
                            "window {window:?} token {t} head {h}: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_block_beyond_the_cache_is_an_error() {
        let spec = KvSpec {
            num_blocks: 2,
            block_size: 4,
            num_kv_heads: 1,
            k_dim: 8,
            v_dim: 8,
            values: KvValues::Separate,
        };
        let cache = CpuKv::new(spec).unwrap();
        let meta = StepMeta::without_ids(
            vec![SeqMeta {
                token_start: 0,
                num_tokens: 1,
                context_len: 6,
                block_table: vec![0, 5],
            }],
            4,
        );
        let p = AttentionParams {
            num_heads: 1,
            num_kv_heads: 1,
            qk_dim: 8,
            v_dim: 8,
            scale: 1.0,
            sliding_window: None,
        };
        let err = attention(&[0.0; 8], &cache, &meta, &p).unwrap_err();
        assert!(err.to_string().contains("block 5"), "{err}");
    }
}

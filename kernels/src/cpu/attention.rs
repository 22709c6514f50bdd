//! Paged causal attention on the CPU.
//!
//! The cache of one layer is `num_blocks` blocks of `block_size` slots. Within a block, storage is
//! head-major: `[kv_head][slot][dim]`, so the keys (or values) one KV head holds for a block's
//! consecutive positions are one contiguous `block_size × dim` matrix. A sequence's block table
//! maps its positions to blocks; attention reads keys and values straight from the blocks (no
//! per-step copy of the cache).
//!
//! Query heads are grouped onto KV heads (GQA), and the unit of work is the group of query heads
//! that share a KV head, for one decoding token or for up to 32 query rows' worth of a prefill
//! chunk's consecutive tokens: every key and value row is read once for the whole unit (without
//! the tiling, a prefill with one head per KV head, MLA's expanded form, would read every row
//! once per token). Scores of a block are one small matrix product (the SIMD `linear` kernel,
//! keys as weight rows and the unit's queries as tokens; each token's positions past its own are
//! then dropped), the softmax exponentials are vectorised, and `P·V` accumulates the unit's
//! outputs. Units run in parallel when the context makes it worth it, so a
//! single decoding token still spreads over the threads.

use std::ops::Range;

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

/// Query rows one unit of attention serves at most: a prefill chunk's consecutive tokens share a
/// unit until their heads of one KV head reach this many.
const TILE_ROWS: usize = 32;

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
    for s in &meta.seqs {
        let first = s.context_len - s.num_tokens;
        for j in 0..s.num_tokens {
            let pos = first + j;
            let at = (block_of(&s.block_table, pos, &spec)?, pos % spec.block_size);
            store_row(cache, at, (k, v), s.token_start + j);
        }
    }
    Ok(())
}

/// Stores row `row` of `k` (and of `v`, where given) at `(block, slot)`: every KV head's key
/// and value (shapes and the block checked by the caller).
pub(super) fn store_row(
    cache: &mut CpuKv,
    (block, slot): (usize, usize),
    (k, v): (&CpuTensor, Option<&CpuTensor>),
    row: usize,
) {
    let spec = cache.spec;
    let (kd, vd) = (spec.k_dim, spec.v_dim);
    for h in 0..spec.num_kv_heads {
        let at = spec.at(block, h, slot, kd);
        cache.k[at..at + kd].copy_from_slice(&k.data[row * k.cols + h * kd..][..kd]);
        if let Some(v) = v {
            let at = spec.at(block, h, slot, vd);
            cache.v[at..at + vd].copy_from_slice(&v.data[row * v.cols + h * vd..][..vd]);
        }
    }
}

/// Attention of `q`'s rows over `cache` through `meta`'s tables, of positions in `keys` alone
/// (`0..usize::MAX`: all): the outputs `[tokens, heads · v_dim]` and each row's log-sum-exp of
/// its scores `[tokens, heads]` (`-inf`, with a zero output, for a row that attends no key).
pub(crate) fn attention(
    q: &[f32],
    cache: &CpuKv,
    (meta, keys): (&StepMeta, Range<usize>),
    p: &AttentionParams,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let spec = &cache.spec;
    if spec.k_dim != p.qk_dim || spec.v_dim != p.v_dim || spec.num_kv_heads != p.num_kv_heads {
        return Err(BackendError::shape(
            "attention",
            format!("cache {spec:?} does not fit {p:?}"),
        ));
    }
    p.check_heads("attention")?;
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
    // Consecutive tokens of one sequence (a prefill chunk) share a unit, up to `TILE_ROWS` query
    // rows in all, so that every key and value row read serves all of them; a decode token is
    // a unit of its own.
    let per_tile = (TILE_ROWS / gs).max(1);
    let mut tiles = Vec::new();
    for s in &meta.seqs {
        let end = s.token_start + s.num_tokens;
        tiles.extend(
            (s.token_start..end)
                .step_by(per_tile)
                .map(|t| (t, per_tile.min(end - t))),
        );
    }
    let head_groups = p.num_kv_heads * parts;
    let window_start = |pos: usize| {
        p.sliding_window
            .map_or(0, |w| (pos + 1).saturating_sub(w))
            .max(keys.start)
    };
    // One unit of work: tile `(t0, m)`'s tokens, their query heads `part * gs ..` of those that
    // share KV head `kvh`; the output rows `[token][head]` of the tile, in that order, and
    // their log-sum-exps.
    let unit = |u: usize, (out, lse): (&mut [f32], &mut [f32])| {
        let (ti, kvh, part) = (u / head_groups, (u / parts) % p.num_kv_heads, u % parts);
        let (t0, m) = tiles[ti];
        let rows = m * gs;
        let (si, last) = row_of_token[t0 + m - 1];
        let first_pos = last + 1 - m;
        let table = &meta.seqs[si].block_table;
        let (lo, hi) = (window_start(first_pos), (last + 1).min(keys.end));
        out.fill(0.0);
        lse.fill(f32::NEG_INFINITY);
        if lo >= hi {
            return;
        }
        let len = hi - lo;
        let head0 = (kvh * group + part * gs) * p.qk_dim;
        // Runs of consecutive positions in one block: (first position, block, slot, length).
        let runs = (lo / bs..=(hi - 1) / bs).map(|b| {
            let first = (b * bs).max(lo);
            let end = ((b + 1) * bs).min(hi);
            (first, table[b] as usize, first % bs, end - first)
        });
        scratch::with_buf(|gathered| {
            // The tile's query rows, adjacent: `[token][head]`.
            let queries: &[f32] = if m == 1 {
                &q[t0 * qw + head0..][..gs * p.qk_dim]
            } else {
                for t in t0..t0 + m {
                    gathered.extend_from_slice(&q[t * qw + head0..][..gs * p.qk_dim]);
                }
                gathered
            };
            // `probs[r · len + i]`: query row `r`'s weight for position `lo + i`.
            scratch::with_zeroed(len * rows, |probs| {
                scratch::with_zeroed(bs * rows, |block_scores| {
                    for (first, block, slot, n) in runs.clone() {
                        let keys = Mat {
                            w: WeightView::F32(&cache.k),
                            offset: spec.at(block, kvh, slot, p.qk_dim),
                            stride: p.qk_dim,
                        };
                        let s = &mut block_scores[..n * rows];
                        rows_times_x(isa, keys, 0..n, Acts::rows(queries, p.qk_dim), s);
                        for (i, row) in s.chunks_exact(rows).enumerate() {
                            for (r, v) in row.iter().enumerate() {
                                probs[r * len + first - lo + i] = v * p.scale;
                            }
                        }
                    }
                });
                // Each token attends its own window of the tile's span: the rest weighs 0.
                for (r, row) in probs.chunks_exact_mut(len).enumerate() {
                    let pos = first_pos + r / gs;
                    let from = window_start(pos).clamp(lo, hi) - lo;
                    let to = ((pos + 1).clamp(lo, hi) - lo).max(from);
                    row[..from].fill(0.0);
                    row[to..].fill(0.0);
                    lse[r] = softmax_lse(isa, &mut row[from..to]);
                }
                let (store, vs) = match spec.values {
                    KvValues::Separate => (&cache.v, p.v_dim),
                    KvValues::KeyPrefix => (&cache.k, p.qk_dim),
                };
                for (first, block, slot, n) in runs {
                    let values = &store[spec.at(block, kvh, slot, vs)..][..(n - 1) * vs + p.v_dim];
                    let pv = Pv {
                        p: &probs[first - lo..],
                        ps: len,
                        group: rows,
                        v: values,
                        n,
                        vd: p.v_dim,
                        vs,
                    };
                    pv_accumulate(isa, pv, out);
                }
            })
        })
    };
    // Units write tile by tile: `[tile][head group][token][head]`, which is the output's own
    // `[token][head]` order when every tile is one token (decode).
    let mut staged = super::pool::zeroed(n * ow);
    let mut staged_lse = vec![0.0; n * p.num_heads];
    let mut slices = Vec::new();
    let (mut rest, mut rest_lse) = (&mut staged[..], &mut staged_lse[..]);
    for &(_, m) in &tiles {
        for _ in 0..head_groups {
            let (unit_out, tail) = rest.split_at_mut(m * gs * p.v_dim);
            let (unit_lse, tail_lse) = rest_lse.split_at_mut(m * gs);
            slices.push((unit_out, unit_lse));
            (rest, rest_lse) = (tail, tail_lse);
        }
    }
    if parallel {
        slices
            .into_par_iter()
            .enumerate()
            .for_each(|(u, o)| unit(u, o));
    } else {
        for (u, o) in slices.into_iter().enumerate() {
            unit(u, o);
        }
    }
    if tiles.len() == n || ow == 0 {
        return Ok((staged, staged_lse));
    }
    let mut out = super::pool::zeroed(n * ow);
    let mut lse = vec![0.0; n * p.num_heads];
    for &(t0, m) in &tiles {
        let tile = &staged[t0 * ow..][..m * ow];
        let tile_lse = &staged_lse[t0 * p.num_heads..][..m * p.num_heads];
        let units = tile
            .chunks_exact(m * gs * p.v_dim)
            .zip(tile_lse.chunks_exact(m * gs));
        for (hg, (unit_out, unit_lse)) in units.enumerate() {
            let tokens = unit_out
                .chunks_exact(gs * p.v_dim)
                .zip(unit_lse.chunks_exact(gs));
            for (i, (token_out, token_lse)) in tokens.enumerate() {
                out[(t0 + i) * ow + hg * gs * p.v_dim..][..gs * p.v_dim].copy_from_slice(token_out);
                lse[(t0 + i) * p.num_heads + hg * gs..][..gs].copy_from_slice(token_lse);
            }
        }
    }
    super::pool::give(staged);
    Ok((out, lse))
}

/// Softmax of `row` in place, returning the log-sum-exp of its scores (`-inf` when empty).
/// The largest score's probability is `1 / Σ exp(s - max)`, so the sum comes back from it
/// without a second pass of exponentials.
fn softmax_lse(isa: Isa, row: &mut [f32]) -> f32 {
    let Some((at, max)) = row
        .iter()
        .copied()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(&b.1))
    else {
        return f32::NEG_INFINITY;
    };
    softmax_in_place(isa, row);
    max - row[at].ln()
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

    /// Softmax attention of one query head over explicit key/value rows, in f64: the output
    /// `vd` wide and the log-sum-exp of the scores (zeros and `-inf` over no rows).
    fn naive(
        q: &[f32],
        (keys, values): (&[&[f32]], &[&[f32]]),
        vd: usize,
        scale: f32,
    ) -> (Vec<f64>, f64) {
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
        if s.is_empty() {
            return (vec![0.0; vd], f64::NEG_INFINITY);
        }
        let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|v| (v - max).exp()).collect();
        let z: f64 = e.iter().sum();
        let out = (0..vd)
            .map(|c| e.iter().zip(values).map(|(p, v)| p / z * v[c] as f64).sum())
            .collect();
        (out, max + z.ln())
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

    /// Prefill chunks share units 32 query rows at a time: 37 tokens after a cached prefix of
    /// 20 (a whole tile and a short one with one head per KV head; four whole tiles and a short
    /// one with four), beside a decode token and a 3-token chunk.
    #[test]
    fn prefill_chunks_tiled_over_tokens_match_a_naive_reference() {
        for (heads, kv_heads) in [(6, 6), (8, 2)] {
            let seqs = vec![
                SeqMeta {
                    token_start: 0,
                    num_tokens: 37,
                    context_len: 57,
                    block_table: (0..15).rev().map(|b| b * 2 + 1).collect(),
                },
                SeqMeta {
                    token_start: 37,
                    num_tokens: 1,
                    context_len: 9,
                    block_table: vec![40, 42, 44],
                },
                SeqMeta {
                    token_start: 38,
                    num_tokens: 3,
                    context_len: 3,
                    block_table: vec![50],
                },
            ];
            let case = Case {
                heads,
                kv_heads,
                vd: 24,
                values: KvValues::Separate,
                seqs,
            };
            against_naive(case);
        }
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
        // Every key, a window of positions, and one that some tokens reach only in part and
        // others not at all.
        let key_ranges = [0..usize::MAX, 8..50, 52..70];
        for (window, keys) in [None, Some(5)]
            .into_iter()
            .flat_map(|w| key_ranges.clone().map(|k| (w, k)))
        {
            let p = AttentionParams {
                num_heads: heads,
                num_kv_heads: kv_heads,
                qk_dim: d,
                v_dim: vd,
                scale: 0.125,
                sliding_window: window,
            };
            let (out, lse) = attention(&q, &cache, (&meta, keys.clone()), &p).unwrap();
            for (t, &(si, pos)) in rows.iter().enumerate() {
                let table = &meta.seqs[si].block_table;
                let lo = window
                    .map_or(0, |w| (pos + 1usize).saturating_sub(w))
                    .max(keys.start);
                let attended = lo..(pos + 1).min(keys.end).max(lo);
                for h in 0..heads {
                    let kvh = h / (heads / kv_heads);
                    // The documented layout: [block][kv_head][slot][dim].
                    let row = |c: &[f32], x: usize, width: usize| {
                        let at = ((table[x / bs] as usize * kv_heads + kvh) * bs + x % bs) * width;
                        c[at..at + width].to_vec()
                    };
                    let keys_at: Vec<Vec<f32>> =
                        attended.clone().map(|x| row(&cache.k, x, d)).collect();
                    let values: Vec<Vec<f32>> = match spec.values {
                        KvValues::Separate => {
                            attended.clone().map(|x| row(&cache.v, x, vd)).collect()
                        }
                        KvValues::KeyPrefix => keys_at.iter().map(|k| k[..vd].to_vec()).collect(),
                    };
                    let (want, want_lse) = naive(
                        &q[(t * heads + h) * d..][..d],
                        (
                            &keys_at.iter().map(Vec::as_slice).collect::<Vec<_>>(),
                            &values.iter().map(Vec::as_slice).collect::<Vec<_>>(),
                        ),
                        vd,
                        0.125,
                    );
                    let at = format!("window {window:?} keys {keys:?} token {t} head {h}");
                    let got = &out[(t * heads + h) * vd..][..vd];
                    for (g, w) in got.iter().zip(&want) {
                        assert!((*g as f64 - w).abs() < 1e-5, "{at}: {g} vs {w}");
                    }
                    let got_lse = lse[t * heads + h] as f64;
                    assert!(
                        got_lse == want_lse || (got_lse - want_lse).abs() < 1e-4,
                        "{at}: log-sum-exp {got_lse} vs {want_lse}"
                    );
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
        let err = attention(&[0.0; 8], &cache, (&meta, 0..usize::MAX), &p).unwrap_err();
        assert!(err.to_string().contains("block 5"), "{err}");
    }
}

//! Context rows on the CPU: reading a step's cached contexts out as rows, and attention over
//! keys and values given as rows ([`crate::ContextLayout`]).
//!
//! Attention over rows copies them into a scratch cache laid out densely (each sequence's
//! context in consecutive blocks) and runs the paged kernel over it, so the rows are attended
//! exactly as cached keys and values would be. The copy is one pass over the rows, small next to
//! the product that made them.

use super::attention::{CpuKv, attention, store_row};
use super::{CpuTensor, pool};
use crate::{AttentionParams, BackendError, ContextLayout, KvSpec, KvValues, Result};

/// `[rows, kv_heads · k_dim]`: every context row's keys, read from the cache.
pub(crate) fn gather(cache: &CpuKv, layout: &ContextLayout) -> Result<CpuTensor> {
    let spec = &cache.spec;
    let (kd, heads, bs) = (spec.k_dim, spec.num_kv_heads, spec.block_size);
    let cols = heads * kd;
    let mut data = pool::zeroed(layout.rows * cols);
    for (r, &slot) in layout.cache_slots.iter().enumerate() {
        let (block, slot) = (slot as usize / bs, slot as usize % bs);
        if block >= spec.num_blocks {
            return Err(BackendError::invalid(
                "gather_context",
                format!("block {block} beyond a cache of {} blocks", spec.num_blocks),
            ));
        }
        for h in 0..heads {
            let at = spec.at(block, h, slot, kd);
            data[r * cols + h * kd..][..kd].copy_from_slice(&cache.k[at..at + kd]);
        }
    }
    Ok(CpuTensor {
        data,
        rows: layout.rows,
        cols,
    })
}

/// Attention of `q` over one chunk's `k` and `v` rows (shapes checked by the caller): the
/// outputs and log-sum-exps.
pub(crate) fn attend_rows(
    q: &CpuTensor,
    (k, v): (&CpuTensor, &CpuTensor),
    layout: &ContextLayout,
    p: &AttentionParams,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let spec = KvSpec {
        num_blocks: layout.dense_blocks,
        block_size: layout.dense.block_size,
        num_kv_heads: p.num_kv_heads,
        k_dim: p.qk_dim,
        v_dim: p.v_dim,
        values: KvValues::Separate,
    };
    // From the buffer pool, and back to it afterwards: a fresh allocation of this size each
    // layer would fault in every page again.
    let (kn, vn) = spec.elements().ok_or_else(|| {
        BackendError::invalid(
            "attention_rows",
            format!("{} blocks overflow", spec.num_blocks),
        )
    })?;
    let mut dense = CpuKv {
        spec,
        k: pool::zeroed(kn),
        v: pool::zeroed(vn),
    };
    let bs = spec.block_size;
    for (r, &slot) in layout.dense_slots.iter().enumerate() {
        let at = (slot as usize / bs, slot as usize % bs);
        store_row(&mut dense, at, (k, Some(v)), r);
    }
    let out = attention(&q.data, &dense, (&layout.dense, layout.keys.clone()), p);
    pool::give(dense.k);
    pool::give(dense.v);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::CpuBackend;
    use crate::{AttentionPart, Backend, KvRows, RopeLayout, RopeTable, SeqMeta, StepMeta};

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000)
            .map(|v| v as f32 / 500.0 - 1.0)
            .collect()
    }

    /// Two sequences (block size 4) in scattered blocks: one prefilling 3 tokens after 6
    /// cached positions, one decoding its 5th; `all` writes every context position.
    fn steps(all: bool) -> StepMeta {
        let seq = |start, tokens, context, table: &[u32]| SeqMeta {
            token_start: start,
            num_tokens: if all { context } else { tokens },
            context_len: context,
            block_table: table.to_vec(),
        };
        let seqs = vec![
            seq(0, 3, 9, &[5, 1, 7]),
            seq(if all { 9 } else { 3 }, 1, 5, &[2, 0]),
        ];
        StepMeta::without_ids(seqs, 4)
    }

    #[test]
    fn attention_over_context_rows_is_attention_over_the_cache() {
        let b = CpuBackend;
        let rope = RopeTable {
            inv_freq: vec![1.0],
            attention_scaling: 1.0,
            layout: RopeLayout::Half,
        };
        let p = AttentionParams {
            num_heads: 4,
            num_kv_heads: 2,
            qk_dim: 6,
            v_dim: 3,
            scale: 0.4,
            sliding_window: None,
        };
        let spec = KvSpec {
            num_blocks: 8,
            block_size: 4,
            num_kv_heads: 2,
            k_dim: 6,
            v_dim: 3,
            values: KvValues::Separate,
        };
        let mut cache = b.alloc_kv(spec).unwrap();
        let (k, v) = (values(14 * 12, 1), values(14 * 6, 2));
        let (k, v) = (
            b.tensor_from_host(k, 14, 12).unwrap(),
            b.tensor_from_host(v, 14, 6).unwrap(),
        );
        let write = b.prepare_step(&steps(true), &rope).unwrap();
        b.write_kv(&mut cache, &k, Some(&v), &write).unwrap();

        let mut step = b.prepare_step(&steps(false), &rope).unwrap();
        let q = b.tensor_from_host(values(4 * 24, 3), 4, 24).unwrap();
        let kv = KvRows {
            k: &k,
            v: &v,
            chunk: 0,
        };
        let err = b
            .attention_rows(&q, KvRows { ..kv }, &step, &p)
            .unwrap_err();
        assert!(err.to_string().contains("prepare_context"), "{err}");
        b.prepare_context(&mut step, None).unwrap();
        // The context rows of the partial step are every position written, in order.
        assert_eq!(b.gather_context(&cache, &step, 0).unwrap().data, k.data);
        let want = b.attention(&q, &cache, &step, &p).unwrap();
        let mut got = b.attention_rows(&q, KvRows { ..kv }, &step, &p).unwrap();
        assert_eq!((got.out.rows, got.out.cols), (4, 12));
        for (g, w) in got.out.data.iter().zip(&want.data) {
            assert!((g - w).abs() < 1e-6, "{g} vs {w}");
        }

        // Cut in chunks of one block (positions 0..4, 4..8, 8..9), gathered, attended and
        // merged chunk by chunk, the same.
        b.prepare_context(&mut step, Some(3)).unwrap();
        assert_eq!(b.context_chunks(&step), 3);
        let rows_of = |t: &CpuTensor, rows: &[usize]| {
            let data = rows
                .iter()
                .flat_map(|&r| t.data[r * t.cols..][..t.cols].to_vec())
                .collect();
            b.tensor_from_host(data, rows.len(), t.cols).unwrap()
        };
        let mut merged: Option<AttentionPart<CpuTensor>> = None;
        for chunk in 0..3 {
            let keys = chunk * 4..chunk * 4 + 4;
            // The first sequence's rows are its positions; the second's follow them.
            let rows: Vec<usize> = (keys.start..keys.end.min(9))
                .chain((keys.start..keys.end.min(5)).map(|p| 9 + p))
                .collect();
            let (ck, cv) = (rows_of(&k, &rows), rows_of(&v, &rows));
            assert_eq!(
                b.gather_context(&cache, &step, chunk).unwrap().data,
                ck.data
            );
            let kv = KvRows {
                k: &ck,
                v: &cv,
                chunk,
            };
            let part = b.attention_rows(&q, kv, &step, &p).unwrap();
            match &mut merged {
                None => merged = Some(part),
                Some(acc) => b.merge_attention(acc, &part).unwrap(),
            }
        }
        let merged = merged.unwrap();
        for (g, w) in merged.out.data.iter().zip(&want.data) {
            assert!((g - w).abs() < 1e-5, "merged {g} vs whole {w}");
        }
        let err = b.gather_context(&cache, &step, 3).unwrap_err().to_string();
        assert!(
            err.contains("chunk 3 of a step prepared in 3 chunks"),
            "{err}"
        );
        let lse = b.tensor_from_host(vec![0.0; 4 * 3], 4, 3).unwrap();
        let wrong = AttentionPart { out: want, lse };
        let err = b.merge_attention(&mut got, &wrong).unwrap_err().to_string();
        assert!(
            err.contains("merge_attention") && err.contains("(4, 3)"),
            "{err}"
        );
        b.prepare_context(&mut step, None).unwrap();
        let short = b.tensor_from_host(values(13 * 6, 4), 13, 6).unwrap();
        let err = b
            .attention_rows(&q, KvRows { v: &short, ..kv }, &step, &p)
            .unwrap_err();
        assert!(err.to_string().contains("14 context rows"), "{err}");
    }
}

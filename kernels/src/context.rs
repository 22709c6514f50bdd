//! A step's contexts as rows ([`ContextLayout`]): what attention over keys and values computed
//! for the step, rather than read from the paged cache, needs (MLA's expanded prefill).
//!
//! [`Backend::gather_context`](crate::Backend::gather_context) reads the sequences' cached
//! positions into rows, one sequence after another; the caller turns them into per-head keys and
//! values, and [`Backend::attention_rows`](crate::Backend::attention_rows) attends over those.
//! Both backends run the second as the paged kernel over a scratch cache whose blocks are the
//! context rows in order: sequence `s` owns dense blocks `base_s .. base_s + blocks`, so the
//! step's own metadata with those block tables ([`ContextLayout::dense`]) describes it, and no
//! second attention kernel is needed.
//!
//! A long context can be cut into chunks of positions ([`StepMeta::context_chunks`]), each
//! gathered, expanded and attended on its own, so that the rows of only one chunk exist at once.
//! Each chunk's attention then also gives every query row's log-sum-exp of its scores
//! ([`AttentionPart`]), and [`Backend::merge_attention`](crate::Backend::merge_attention)
//! combines the chunks' parts into what attention over the whole context gives (the softmax is
//! the same sum, taken in pieces). vLLM's MLA prefill bounds its memory the same way.

use std::ops::Range;

use crate::{AttentionParams, Backend, BackendError, Result, SeqMeta, StepMeta};

/// Where each context row of one chunk comes from and where it goes in the dense scratch cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContextLayout {
    /// The positions this chunk holds (of every sequence that reaches them).
    pub keys: Range<usize>,
    /// Context rows: each sequence's positions in `keys`, summed.
    pub rows: usize,
    /// Each row's slot in the step's cache (`block * block_size + slot`).
    pub cache_slots: Vec<u32>,
    /// Each row's slot in the dense cache.
    pub dense_slots: Vec<u32>,
    /// Blocks of the dense cache.
    pub dense_blocks: usize,
    /// The step with the dense cache's block tables (same tokens, positions and block size).
    /// Entries for blocks outside `keys` name dense block 0 and are never read.
    pub dense: StepMeta,
}

/// Keys and values given as rows of one context chunk ([`Backend::attention_rows`]).
pub struct KvRows<'a, B: Backend> {
    /// `[chunk rows, kv_heads · qk_dim]`.
    pub k: &'a B::Tensor,
    /// `[chunk rows, kv_heads · v_dim]`.
    pub v: &'a B::Tensor,
    /// Which chunk of the step's contexts the rows are ([`StepMeta::context_chunks`]).
    pub chunk: usize,
}

/// Attention over part of the keys: each query row's output normalised over that part alone,
/// and the log-sum-exp of its scores there (`-inf`, with a zero output, for a row that attends
/// none of them). Two parts over disjoint keys merge into attention over both
/// ([`Backend::merge_attention`]).
#[derive(Debug)]
pub struct AttentionPart<T> {
    /// `[tokens, heads · v_dim]`.
    pub out: T,
    /// `[tokens, heads]`.
    pub lse: T,
}

fn slot(op: &'static str, v: usize) -> Result<u32> {
    u32::try_from(v)
        .map_err(|_| BackendError::invalid(op, format!("context slot {v} beyond u32 indexing")))
}

impl StepMeta {
    /// The context rows of this (validated) step cut into chunks of `positions` positions
    /// (rounded up to whole blocks; `None`: one chunk), the chunks that hold any row; `op`
    /// names the caller in errors.
    pub fn context_chunks(
        &self,
        op: &'static str,
        positions: Option<usize>,
    ) -> Result<Vec<ContextLayout>> {
        let end = self.max_context();
        let Some(positions) = positions else {
            return Ok(vec![self.chunk_layout(op, 0..end)?]);
        };
        let bs = self.block_size.max(1);
        let per = positions.max(1).div_ceil(bs) * bs;
        (0..end.max(1))
            .step_by(per)
            .map(|from| self.chunk_layout(op, from..(from + per).min(end)))
            .collect()
    }

    /// The rows of positions `keys` (`keys.start` on a block boundary).
    fn chunk_layout(&self, op: &'static str, keys: Range<usize>) -> Result<ContextLayout> {
        let bs = self.block_size;
        let held = |s: &SeqMeta| keys.start..s.context_len.min(keys.end).max(keys.start);
        let rows = self.seqs.iter().map(|s| held(s).len()).sum();
        let (mut cache_slots, mut dense_slots) =
            (Vec::with_capacity(rows), Vec::with_capacity(rows));
        let mut seqs = Vec::with_capacity(self.seqs.len());
        let (first_block, mut base) = (keys.start / bs, 0);
        for s in &self.seqs {
            let held = held(s);
            for pos in held.clone() {
                cache_slots.push(slot(op, s.block_table[pos / bs] as usize * bs + pos % bs)?);
                dense_slots.push(slot(op, base * bs + pos - keys.start)?);
            }
            let used = held.len().div_ceil(bs);
            let mut block_table = vec![0; s.blocks_used(bs)];
            for (i, b) in (base..base + used).enumerate() {
                block_table[first_block + i] = slot(op, b)?;
            }
            seqs.push(SeqMeta {
                block_table,
                ..s.clone()
            });
            base += used;
        }
        Ok(ContextLayout {
            keys,
            rows,
            cache_slots,
            dense_slots,
            dense_blocks: base,
            dense: StepMeta {
                seqs,
                block_size: bs,
                tokens: self.tokens.clone(),
            },
        })
    }

    /// Context rows of the step: what [`StepMeta::context_chunks`] lays out in one chunk.
    pub fn context_rows(&self) -> usize {
        self.seqs.iter().map(|s| s.context_len).sum()
    }

    /// The longest context of the step.
    pub fn max_context(&self) -> usize {
        self.seqs.iter().map(|s| s.context_len).max().unwrap_or(0)
    }
}

/// The chunk `chunk` of the step's prepared chunks (a backend's form of each [`ContextLayout`]),
/// or the error naming `op`.
pub(crate) fn chunk_of<'a, T>(op: &'static str, chunks: &'a [T], chunk: usize) -> Result<&'a T> {
    match chunks {
        [] => Err(not_prepared(op)),
        _ => chunks.get(chunk).ok_or_else(|| {
            BackendError::invalid(
                op,
                format!(
                    "context chunk {chunk} of a step prepared in {} chunks",
                    chunks.len()
                ),
            )
        }),
    }
}

/// The error of an op that needs [`Backend::prepare_context`] on a step without it.
pub(crate) fn not_prepared(op: &'static str) -> BackendError {
    BackendError::invalid(
        op,
        "the step's context rows were not prepared (prepare_context)",
    )
}

/// Checks [`Backend::attention_rows`]' inputs, `(rows, cols)` each, against `params` for a step
/// of `tokens` tokens and `context_rows` rows in the chunk.
pub fn check_attention_rows(
    q: (usize, usize),
    kv: ((usize, usize), (usize, usize)),
    shape: (usize, usize),
    p: &AttentionParams,
) -> Result<()> {
    const OP: &str = "attention_rows";
    let (tokens, context_rows) = shape;
    p.check_heads(OP)?;
    let want = (
        (tokens, p.num_heads * p.qk_dim),
        (context_rows, p.num_kv_heads * p.qk_dim),
        (context_rows, p.num_kv_heads * p.v_dim),
    );
    if (q, kv.0, kv.1) != want {
        return Err(BackendError::shape(
            OP,
            format!(
                "q {q:?}, k {:?}, v {:?} for {tokens} tokens over {context_rows} context rows \
                 (want {want:?})",
                kv.0, kv.1
            ),
        ));
    }
    Ok(())
}

/// Checks [`Backend::merge_attention`]'s two parts against each other and gives the output
/// width per head.
pub fn check_merge<B: Backend>(
    b: &B,
    acc: &AttentionPart<B::Tensor>,
    part: &AttentionPart<B::Tensor>,
) -> Result<usize> {
    let dims = |p: &AttentionPart<B::Tensor>| (b.dims(&p.out), b.dims(&p.lse));
    merge_width(dims(acc), dims(part))
}

/// [`check_merge`] on the parts' `((out rows, out cols), (lse rows, lse cols))`.
fn merge_width(
    acc: ((usize, usize), (usize, usize)),
    part: ((usize, usize), (usize, usize)),
) -> Result<usize> {
    let ((rows, cols), (lse_rows, heads)) = acc;
    if acc != part || lse_rows != rows || heads == 0 || !cols.is_multiple_of(heads) {
        return Err(BackendError::shape(
            "merge_attention",
            format!(
                "parts with outputs {:?} and {:?}, log-sum-exps {:?} and {:?}: want equal \
                 shapes, one log-sum-exp per row and head",
                acc.0, part.0, acc.1, part.1
            ),
        ));
    }
    Ok(cols / heads)
}

/// Merges `part` into `acc` on the host, row by row and head by head: both backends' reference.
pub(crate) fn merge_rows(
    (out, lse): (&mut [f32], &mut [f32]),
    (part_out, part_lse): (&[f32], &[f32]),
    v_dim: usize,
) {
    for (h, (a, b)) in lse.iter_mut().zip(part_lse).enumerate() {
        let m = a.max(*b);
        if m == f32::NEG_INFINITY {
            continue;
        }
        let (wa, wb) = ((*a - m).exp(), (*b - m).exp());
        let sum = wa + wb;
        let (wa, wb) = (wa / sum, wb / sum);
        let (o, p) = (
            &mut out[h * v_dim..][..v_dim],
            &part_out[h * v_dim..][..v_dim],
        );
        for (o, p) in o.iter_mut().zip(p) {
            *o = *o * wa + p * wb;
        }
        *a = m + sum.ln();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contexts_are_laid_out_one_sequence_after_another() {
        // Block size 2: a 3-position context in blocks [7, 4], then a 2-position one in [5].
        let meta = StepMeta {
            seqs: vec![
                SeqMeta {
                    token_start: 0,
                    num_tokens: 2,
                    context_len: 3,
                    block_table: vec![7, 4, 9],
                },
                SeqMeta {
                    token_start: 2,
                    num_tokens: 1,
                    context_len: 2,
                    block_table: vec![5],
                },
            ],
            block_size: 2,
            tokens: vec![1, 2, 3],
        };
        let l = meta.context_chunks("test", None).unwrap().remove(0);
        assert_eq!(l.rows, 5);
        assert_eq!(meta.context_rows(), 5);
        assert_eq!(l.cache_slots, vec![14, 15, 8, 10, 11]);
        // The first sequence takes dense blocks 0 and 1 (slot 3 unused), the second block 2.
        assert_eq!(l.dense_slots, vec![0, 1, 2, 4, 5]);
        assert_eq!(l.dense_blocks, 3);
        assert_eq!(l.dense.seqs[0].block_table, vec![0, 1]);
        assert_eq!(l.dense.seqs[1].block_table, vec![2]);
        assert_eq!(l.dense.positions(), meta.positions());
        l.dense.validate("test").unwrap();

        // Chunks of one block (3 positions round up to 4 = two blocks would be one chunk).
        let chunks = meta.context_chunks("test", Some(1)).unwrap();
        assert_eq!(chunks.len(), 2);
        let (a, b) = (&chunks[0], &chunks[1]);
        assert_eq!(
            (a.keys.clone(), a.rows, b.keys.clone(), b.rows),
            (0..2, 4, 2..3, 1)
        );
        assert_eq!(a.cache_slots, vec![14, 15, 10, 11]);
        assert_eq!(a.dense_slots, vec![0, 1, 2, 3]);
        assert_eq!(a.dense_blocks, 2);
        // Table entries outside the chunk name block 0; each sequence's own start at theirs.
        assert_eq!(a.dense.seqs[0].block_table, vec![0, 0]);
        assert_eq!(a.dense.seqs[1].block_table, vec![1]);
        // The second chunk holds the first sequence's last position alone.
        assert_eq!(
            (b.cache_slots.clone(), b.dense_slots.clone()),
            (vec![8], vec![0])
        );
        assert_eq!(b.dense_blocks, 1);
        assert_eq!(b.dense.seqs[0].block_table, vec![0, 0]);
        for c in &chunks {
            c.dense.validate("test").unwrap();
        }
        assert_eq!(meta.context_chunks("test", Some(3)).unwrap().len(), 1);
    }

    #[test]
    fn merging_parts_is_attention_over_both() {
        // One row, two heads of 2 values. Head 0: scores {0} then {ln 3}; head 1: no key in
        // the first part.
        let (mut out, mut lse) = (vec![1.0, 2.0, 0.0, 0.0], vec![0.0, f32::NEG_INFINITY]);
        let part = (vec![5.0, 6.0, 7.0, 8.0], vec![3f32.ln(), 0.5]);
        merge_rows((&mut out, &mut lse), (&part.0, &part.1), 2);
        // Weights 1/4 and 3/4; head 1 is the second part's alone.
        for (g, w) in out.iter().zip([4.0, 5.0, 7.0, 8.0]) {
            assert!((g - w).abs() < 1e-6, "{out:?}");
        }
        assert!(
            (lse[0] - 4f32.ln()).abs() < 1e-6 && lse[1] == 0.5,
            "{lse:?}"
        );
        let err = merge_width(((2, 8), (2, 2)), ((2, 8), (2, 4))).unwrap_err();
        assert!(err.to_string().contains("(2, 4)"), "{err}");
        assert_eq!(merge_width(((2, 8), (2, 2)), ((2, 8), (2, 2))).unwrap(), 4);
    }
}

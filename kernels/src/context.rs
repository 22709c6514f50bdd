//! A step's contexts as rows ([`ContextLayout`]): what attention over keys and values computed
//! for the step, rather than read from the paged cache, needs (MLA's expanded prefill).
//!
//! [`Backend::gather_context`](crate::Backend::gather_context) reads every sequence's cached
//! positions `0 .. context_len` into rows, one sequence after another; the caller turns them
//! into per-head keys and values, and [`Backend::attention_rows`](crate::Backend::attention_rows)
//! attends over those. Both backends run the second as the paged kernel over a scratch cache
//! whose blocks are the context rows in order: sequence `s` owns dense blocks
//! `base_s .. base_s + blocks_used`, so the step's own metadata with those block tables
//! ([`ContextLayout::dense`]) describes it, and no second attention kernel is needed.

use crate::{BackendError, Result, SeqMeta, StepMeta};

/// Where each context row comes from and where it goes in the dense scratch cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContextLayout {
    /// Context rows: the sum of the sequences' context lengths.
    pub rows: usize,
    /// Each row's slot in the step's cache (`block * block_size + slot`).
    pub cache_slots: Vec<u32>,
    /// Each row's slot in the dense cache.
    pub dense_slots: Vec<u32>,
    /// Blocks of the dense cache.
    pub dense_blocks: usize,
    /// The step with the dense cache's block tables (same tokens, positions and block size).
    pub dense: StepMeta,
}

fn slot(op: &'static str, v: usize) -> Result<u32> {
    u32::try_from(v)
        .map_err(|_| BackendError::invalid(op, format!("context slot {v} beyond u32 indexing")))
}

impl StepMeta {
    /// The context rows of this (validated) step; `op` names the caller in errors.
    pub fn context_layout(&self, op: &'static str) -> Result<ContextLayout> {
        let bs = self.block_size;
        let rows = self.context_rows();
        let (mut cache_slots, mut dense_slots) =
            (Vec::with_capacity(rows), Vec::with_capacity(rows));
        let mut seqs = Vec::with_capacity(self.seqs.len());
        let mut base = 0;
        for s in &self.seqs {
            let used = s.blocks_used(bs);
            for pos in 0..s.context_len {
                cache_slots.push(slot(op, s.block_table[pos / bs] as usize * bs + pos % bs)?);
                dense_slots.push(slot(op, base * bs + pos)?);
            }
            seqs.push(SeqMeta {
                block_table: (base..base + used)
                    .map(|b| slot(op, b))
                    .collect::<Result<_>>()?,
                ..s.clone()
            });
            base += used;
        }
        Ok(ContextLayout {
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

    /// Context rows of the step: what [`StepMeta::context_layout`] lays out.
    pub fn context_rows(&self) -> usize {
        self.seqs.iter().map(|s| s.context_len).sum()
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
        let l = meta.context_layout("test").unwrap();
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
    }
}

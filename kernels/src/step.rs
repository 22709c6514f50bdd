//! The host description of one forward step ([`StepMeta`]) and the fixed shape a captured graph
//! replays ([`StepShape`]).
//!
//! A backend turns a `StepMeta` into its own `Step` once per step ([`crate::Backend::prepare_step`]),
//! so every layer reads the same positions, block tables and token ids without copying them
//! again. A graph (CUDA graphs) fixes every launch's shape and every address at capture, so the
//! step it replays must keep one shape across replays: a [`StepShape`] pads the rows to a batch
//! bucket and every block table to one width, and sizes launch decisions for the longest context
//! the shape admits.

use crate::{BackendError, Result};

/// One sequence's part of a forward step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqMeta {
    /// Index of this sequence's first new token among the step's tokens.
    pub token_start: usize,
    /// New tokens of this sequence in the step (prefill chunk length, or 1 when decoding).
    pub num_tokens: usize,
    /// Tokens in the sequence's context after this step, new ones included. The new tokens sit at
    /// positions `context_len - num_tokens .. context_len`.
    pub context_len: usize,
    /// Physical KV-cache blocks holding positions `i*block_size .. (i+1)*block_size`.
    pub block_table: Vec<u32>,
}

impl SeqMeta {
    /// Blocks the sequence's context occupies (a table may list more).
    pub fn blocks_used(&self, block_size: usize) -> usize {
        self.context_len.div_ceil(block_size.max(1))
    }
}

/// Host-side description of one forward step over a batch of sequences.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepMeta {
    pub seqs: Vec<SeqMeta>,
    /// Tokens per KV-cache block.
    pub block_size: usize,
    /// The new tokens' ids, in step order (the sequences' tokens one after the other).
    pub tokens: Vec<u32>,
}

impl StepMeta {
    /// A step over `seqs` whose token ids are all 0: for benchmarks and tests of operations
    /// that never embed.
    pub fn without_ids(seqs: Vec<SeqMeta>, block_size: usize) -> StepMeta {
        let n = seqs.iter().map(|s| s.num_tokens).sum();
        StepMeta {
            seqs,
            block_size,
            tokens: vec![0; n],
        }
    }

    /// Total new tokens in the step.
    pub fn num_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.num_tokens).sum()
    }

    /// The position of every new token, in step order.
    pub fn positions(&self) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.num_tokens());
        for s in &self.seqs {
            let first = s.context_len - s.num_tokens;
            out.extend((first..s.context_len).map(|p| p as u32));
        }
        out
    }

    /// Checks what every backend relies on: a block size, sequences laid out one after the other
    /// with at least one new token each, block tables long enough for their contexts, and one id
    /// per new token.
    pub fn validate(&self, op: &'static str) -> Result<()> {
        if self.block_size == 0 {
            return Err(BackendError::invalid(op, "block size 0"));
        }
        let mut next = 0;
        for s in &self.seqs {
            if s.token_start != next || s.num_tokens == 0 || s.num_tokens > s.context_len {
                return Err(BackendError::invalid(
                    op,
                    format!("inconsistent sequence {s:?}"),
                ));
            }
            if s.block_table.len() * self.block_size < s.context_len {
                return Err(BackendError::invalid(
                    op,
                    format!(
                        "{} blocks cannot hold {} positions",
                        s.block_table.len(),
                        s.context_len
                    ),
                ));
            }
            next += s.num_tokens;
        }
        if self.tokens.len() != next {
            return Err(BackendError::invalid(
                op,
                format!(
                    "{} token ids for a step of {next} tokens",
                    self.tokens.len()
                ),
            ));
        }
        Ok(())
    }

    /// The longest span of positions any new token attends: its context, or the sliding window
    /// when that is shorter.
    pub fn max_span(&self, window: Option<usize>) -> usize {
        self.seqs
            .iter()
            .map(|s| window.map_or(s.context_len, |w| s.context_len.min(w.max(1))))
            .max()
            .unwrap_or(0)
    }
}

/// The shape a graph's step keeps from replay to replay.
///
/// The step has `rows` token rows: the sequences' tokens, then padding rows that only fill the
/// shape (token 0 at position 0, reading block 0; they write no KV entry and count towards no
/// expert). Every block table is `table_width` entries wide, and launches whose plan depends on
/// context length (split-K attention) are sized for `max_span` positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StepShape {
    pub rows: usize,
    pub table_width: usize,
    pub max_span: usize,
}

impl StepShape {
    /// Checks that `meta` (already validated) fits the shape: no more tokens than rows and no
    /// more sequences than rows, no context longer than the span, no context using more blocks
    /// than the table width.
    pub fn check(&self, op: &'static str, meta: &StepMeta) -> Result<()> {
        let tokens = meta.num_tokens();
        if tokens > self.rows || meta.seqs.len() > self.rows {
            return Err(BackendError::invalid(
                op,
                format!(
                    "{tokens} tokens of {} sequences in a step shaped for {} rows",
                    meta.seqs.len(),
                    self.rows
                ),
            ));
        }
        for s in &meta.seqs {
            let used = s.blocks_used(meta.block_size);
            if used > self.table_width || s.context_len > self.max_span {
                return Err(BackendError::invalid(
                    op,
                    format!(
                        "a context of {} positions ({used} blocks) in a step shaped for {} \
                         positions and tables of {} blocks",
                        s.context_len, self.max_span, self.table_width
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(start: usize, tokens: usize, context: usize, blocks: usize) -> SeqMeta {
        SeqMeta {
            token_start: start,
            num_tokens: tokens,
            context_len: context,
            block_table: (0..blocks as u32).collect(),
        }
    }

    #[test]
    fn validation_names_what_is_inconsistent() {
        let ok = StepMeta::without_ids(vec![seq(0, 3, 5, 2), seq(3, 1, 9, 3)], 4);
        ok.validate("t").unwrap();
        let err = |m: &StepMeta| m.validate("t").unwrap_err().to_string();
        assert!(err(&StepMeta::without_ids(vec![seq(0, 1, 9, 2)], 4)).contains("2 blocks"));
        assert!(err(&StepMeta::without_ids(vec![seq(1, 1, 1, 1)], 4)).contains("inconsistent"));
        assert!(err(&StepMeta::without_ids(vec![], 0)).contains("block size 0"));
        let short = StepMeta {
            tokens: vec![1],
            ..ok.clone()
        };
        assert!(err(&short).contains("1 token ids for a step of 4 tokens"));
        assert_eq!(ok.max_span(None), 9);
        assert_eq!(ok.max_span(Some(6)), 6);
    }

    #[test]
    fn a_shape_refuses_steps_it_cannot_hold() {
        let shape = StepShape {
            rows: 2,
            table_width: 2,
            max_span: 8,
        };
        let fits = StepMeta::without_ids(vec![seq(0, 1, 8, 3), seq(1, 1, 1, 1)], 4);
        shape.check("t", &fits).unwrap();
        let long = StepMeta::without_ids(vec![seq(0, 1, 9, 3)], 4);
        assert!(shape.check("t", &long).is_err());
        let many =
            StepMeta::without_ids(vec![seq(0, 1, 1, 1), seq(1, 1, 1, 1), seq(2, 1, 1, 1)], 4);
        assert!(shape.check("t", &many).is_err());
    }
}

//! A step whose MLA attention is split ([`MlaPlan::Split`](super::MlaPlan::Split)): its
//! sequences reordered so that those attending absorbed come first, and each part as a step of
//! its own.
//!
//! Every layer but attention treats tokens one by one, and attention treats each sequence
//! alone, so a step runs the same with its sequences in any order; putting the absorbed ones
//! first makes each part a contiguous range of rows ([`Backend::narrow_rows`]), with no gather
//! per layer. The logits rows the caller asked for follow their tokens ([`SplitStep::token_at`]).
//!
//! [`Backend::narrow_rows`]: tessera_kernels::Backend::narrow_rows

use tessera_kernels::{SeqMeta, StepMeta};

/// A step reordered for a split MLA attention.
#[derive(Clone, Debug, PartialEq)]
pub struct SplitStep {
    /// The step with the absorbed sequences first, in their order, then the others in theirs.
    pub meta: StepMeta,
    /// Where each token of the original step is in `meta`.
    pub token_at: Vec<usize>,
    /// The absorbed sequences alone: `meta`'s first [`SplitStep::absorbed_tokens`] tokens.
    pub absorbed: StepMeta,
    /// The other sequences alone: the rest of `meta`'s tokens.
    pub expanded: StepMeta,
}

impl SplitStep {
    /// `meta` with its sequences `absorbed` (ascending indices) moved to the front.
    pub fn new(meta: &StepMeta, absorbed: &[usize]) -> SplitStep {
        let rest = (0..meta.seqs.len()).filter(|i| absorbed.binary_search(i).is_err());
        let order: Vec<usize> = absorbed.iter().copied().chain(rest).collect();
        let mut token_at = vec![0; meta.tokens.len()];
        let (mut seqs, mut tokens) = (Vec::with_capacity(order.len()), Vec::new());
        for &i in &order {
            let s = &meta.seqs[i];
            let from = s.token_start..s.token_start + s.num_tokens;
            for (j, old) in from.clone().enumerate() {
                token_at[old] = tokens.len() + j;
            }
            seqs.push(SeqMeta {
                token_start: tokens.len(),
                ..s.clone()
            });
            tokens.extend_from_slice(&meta.tokens[from]);
        }
        let part = |seqs: &[SeqMeta]| {
            let first = seqs.first().map_or(0, |s| s.token_start);
            let seqs: Vec<SeqMeta> = seqs
                .iter()
                .map(|s| SeqMeta {
                    token_start: s.token_start - first,
                    ..s.clone()
                })
                .collect();
            let n: usize = seqs.iter().map(|s| s.num_tokens).sum();
            StepMeta {
                seqs,
                block_size: meta.block_size,
                tokens: tokens[first..first + n].to_vec(),
            }
        };
        let (a, e) = seqs.split_at(absorbed.len());
        let (absorbed, expanded) = (part(a), part(e));
        SplitStep {
            meta: StepMeta {
                seqs,
                block_size: meta.block_size,
                tokens,
            },
            token_at,
            absorbed,
            expanded,
        }
    }

    /// Tokens of the absorbed sequences, the first rows of the reordered step.
    pub fn absorbed_tokens(&self) -> usize {
        self.absorbed.tokens.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(token_start: usize, num_tokens: usize, context_len: usize, block: u32) -> SeqMeta {
        SeqMeta {
            token_start,
            num_tokens,
            context_len,
            block_table: vec![block],
        }
    }

    #[test]
    fn absorbed_sequences_move_to_the_front_with_their_tokens() {
        // A 3-token chunk, a decode, a 2-token chunk, a decode.
        let meta = StepMeta {
            seqs: vec![
                seq(0, 3, 3, 7),
                seq(3, 1, 9, 2),
                seq(4, 2, 5, 4),
                seq(6, 1, 12, 5),
            ],
            block_size: 16,
            tokens: vec![10, 11, 12, 20, 30, 31, 40],
        };
        let split = SplitStep::new(&meta, &[1, 3]);
        assert_eq!(split.meta.tokens, vec![20, 40, 10, 11, 12, 30, 31]);
        assert_eq!(split.token_at, vec![2, 3, 4, 0, 5, 6, 1]);
        for (old, &new) in split.token_at.iter().enumerate() {
            assert_eq!(meta.tokens[old], split.meta.tokens[new]);
        }
        assert_eq!(split.absorbed_tokens(), 2);
        assert_eq!(split.absorbed.seqs, vec![seq(0, 1, 9, 2), seq(1, 1, 12, 5)]);
        assert_eq!(split.absorbed.tokens, vec![20, 40]);
        assert_eq!(split.expanded.seqs, vec![seq(0, 3, 3, 7), seq(3, 2, 5, 4)]);
        assert_eq!(split.expanded.tokens, vec![10, 11, 12, 30, 31]);
        // The same positions, sequence by sequence.
        assert_eq!(
            split.meta.positions(),
            [
                &split.absorbed.positions()[..],
                &split.expanded.positions()[..]
            ]
            .concat()
        );
        for m in [&split.meta, &split.absorbed, &split.expanded] {
            m.validate("test").unwrap();
        }
    }
}

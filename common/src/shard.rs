//! What part of the model one worker holds.
//!
//! Experts are placed per (layer, expert): a worker builds only the experts it owns and never reads
//! the bytes of the others. Tensor-parallel splitting of attention and dense MLPs uses `rank` and
//! `world_size` (contiguous head and column blocks).

use std::collections::BTreeSet;
use std::ops::Range;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardSpec {
    pub rank: usize,
    pub world_size: usize,
    /// `(layer, expert)` pairs this worker owns; `None` means every expert.
    pub experts: Option<BTreeSet<(usize, usize)>>,
}

impl ShardSpec {
    /// The whole model on one worker.
    pub fn whole() -> Self {
        ShardSpec {
            rank: 0,
            world_size: 1,
            experts: None,
        }
    }

    /// Whether this worker runs `expert` of MoE `layer` (which has `num_experts`): the explicit
    /// placement if given, else contiguous blocks of experts by rank.
    pub fn owns_expert(&self, layer: usize, expert: usize, num_experts: usize) -> bool {
        match &self.experts {
            Some(set) => set.contains(&(layer, expert)),
            None => split_range(num_experts, self.rank, self.world_size).contains(&expert),
        }
    }

    /// This rank's part of `total` items split tensor-parallel.
    pub fn split(&self, total: usize) -> Range<usize> {
        split_range(total, self.rank, self.world_size)
    }
}

/// Rank `rank`'s query heads, and the KV heads they read, when `world` ranks split attention.
/// Query heads must divide evenly; KV heads are split when the world divides them and replicated
/// when they divide the world. The error explains which numbers do not fit.
pub fn head_split(
    num_heads: usize,
    num_kv_heads: usize,
    rank: usize,
    world: usize,
) -> Result<(Range<usize>, Range<usize>), String> {
    let world = world.max(1);
    if !num_heads.is_multiple_of(world) {
        return Err(format!(
            "{num_heads} attention heads cannot be split evenly over {world} ranks"
        ));
    }
    if num_kv_heads == 0
        || !(num_kv_heads.is_multiple_of(world) || world.is_multiple_of(num_kv_heads))
    {
        return Err(format!(
            "{num_kv_heads} KV heads over {world} ranks: one must divide the other"
        ));
    }
    let q = split_range(num_heads, rank, world);
    let group = num_heads / num_kv_heads;
    Ok((q.clone(), q.start / group..(q.end - 1) / group + 1))
}

/// The `rank`-th of `world` near-equal contiguous parts of `0..total` (earlier parts one larger
/// when it does not divide).
pub fn split_range(total: usize, rank: usize, world: usize) -> Range<usize> {
    let world = world.max(1);
    let (base, extra) = (total / world, total % world);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_range_covers_everything_once() {
        for (total, world) in [(8, 2), (6, 4), (3, 4), (7, 3)] {
            let parts: Vec<_> = (0..world).map(|r| split_range(total, r, world)).collect();
            assert_eq!(parts.iter().map(|r| r.len()).sum::<usize>(), total);
            for w in parts.windows(2) {
                assert_eq!(w[0].end, w[1].start);
            }
        }
        assert_eq!(split_range(6, 3, 4), 5..6);
        assert_eq!(split_range(3, 3, 4), 3..3);
    }

    #[test]
    fn default_placement_is_contiguous_blocks() {
        let shard = ShardSpec {
            rank: 1,
            world_size: 4,
            experts: None,
        };
        let owned: Vec<usize> = (0..6).filter(|e| shard.owns_expert(0, *e, 6)).collect();
        assert_eq!(owned, vec![2, 3]);
        assert!(ShardSpec::whole().owns_expert(3, 5, 6));
    }
}

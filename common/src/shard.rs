//! What part of the model one worker holds.
//!
//! Experts are placed per (layer, expert): a worker builds only the experts it owns and never reads
//! the bytes of the others. Tensor-parallel splitting of attention and dense MLPs uses `rank` and
//! `world_size` (contiguous head and column blocks).

use std::collections::BTreeSet;

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

    pub fn owns_expert(&self, layer: usize, expert: usize) -> bool {
        self.experts
            .as_ref()
            .is_none_or(|set| set.contains(&(layer, expert)))
    }
}

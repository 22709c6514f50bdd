//! The expert placement map: which rank runs each expert of each MoE layer.
//!
//! It is data: serialisable, logged when a cluster starts, printed by `tessera placement`, and
//! replaceable by a later load balancer. The default places contiguous blocks of experts on the
//! ranks (uneven splits are fine; with fewer experts than ranks some ranks hold none). Each expert
//! lives on exactly one rank, so the all-reduce after the MoE block counts it once.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::shard::split_range;
use crate::spec::{FfnSpec, ModelSpec};
use crate::{ConfigError, ShardSpec};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerPlacement {
    pub layer: usize,
    /// `ranks[e]` runs expert `e`.
    pub ranks: Vec<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementMap {
    pub world_size: usize,
    /// One entry per MoE layer, in layer order.
    pub layers: Vec<LayerPlacement>,
}

impl PlacementMap {
    /// Contiguous blocks of experts per rank, for every MoE layer of `spec`.
    pub fn contiguous(spec: &ModelSpec, world_size: usize) -> Self {
        let world_size = world_size.max(1);
        let layers = spec
            .layers
            .iter()
            .enumerate()
            .filter_map(|(layer, l)| match &l.ffn {
                FfnSpec::Moe(m) => Some(LayerPlacement {
                    layer,
                    // The ranks' ranges tile 0..num_experts in order.
                    ranks: (0..world_size)
                        .flat_map(|r| split_range(m.num_experts, r, world_size).map(move |_| r))
                        .collect(),
                }),
                FfnSpec::Dense(_) => None,
            })
            .collect();
        PlacementMap { world_size, layers }
    }

    /// Checks the map covers exactly `spec`'s MoE layers and experts with ranks below the world.
    pub fn validate(&self, spec: &ModelSpec) -> Result<(), ConfigError> {
        let moe: Vec<(usize, usize)> = spec
            .layers
            .iter()
            .enumerate()
            .filter_map(|(i, l)| match &l.ffn {
                FfnSpec::Moe(m) => Some((i, m.num_experts)),
                FfnSpec::Dense(_) => None,
            })
            .collect();
        let have: Vec<(usize, usize)> = self
            .layers
            .iter()
            .map(|l| (l.layer, l.ranks.len()))
            .collect();
        if have != moe {
            return Err(ConfigError::invalid(
                "placement.layers",
                format!("{have:?}"),
                format!("must list the MoE layers with their expert counts: {moe:?}"),
            ));
        }
        for l in &self.layers {
            if let Some((e, r)) = l
                .ranks
                .iter()
                .enumerate()
                .find(|(_, r)| **r >= self.world_size)
            {
                return Err(ConfigError::invalid(
                    &format!("placement.layers[{}].ranks[{e}]", l.layer),
                    r,
                    format!("ranks go up to {}", self.world_size - 1),
                ));
            }
        }
        Ok(())
    }

    /// What rank `rank` loads.
    pub fn shard(&self, rank: usize) -> ShardSpec {
        let experts: BTreeSet<(usize, usize)> = self
            .layers
            .iter()
            .flat_map(|l| {
                l.ranks
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| **r == rank)
                    .map(move |(e, _)| (l.layer, e))
            })
            .collect();
        ShardSpec {
            rank,
            world_size: self.world_size,
            experts: Some(experts),
        }
    }

    /// Experts per rank, summed over layers (for logs).
    pub fn experts_per_rank(&self) -> Vec<usize> {
        let mut counts = vec![0; self.world_size];
        for r in self.layers.iter().flat_map(|l| &l.ranks) {
            if let Some(c) = counts.get_mut(*r) {
                *c += 1;
            }
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::model_spec_from_value;

    fn spec(experts: usize) -> ModelSpec {
        let v = serde_json::json!({"architectures": ["MixtralForCausalLM"], "vocab_size": 10, "hidden_size": 8,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 4,
            "num_local_experts": experts, "num_experts_per_tok": 1});
        model_spec_from_value(std::path::Path::new("config.json"), &v).unwrap()
    }

    #[test]
    fn uneven_and_empty_ranks() {
        let map = PlacementMap::contiguous(&spec(6), 4);
        assert_eq!(map.layers[0].ranks, vec![0, 0, 1, 1, 2, 3]);
        map.validate(&spec(6)).unwrap();
        let few = PlacementMap::contiguous(&spec(2), 3);
        assert_eq!(few.experts_per_rank(), vec![2, 2, 0]);
        assert_eq!(few.shard(2).experts, Some(BTreeSet::new()));
        let shard = map.shard(1);
        assert!(shard.owns_expert(1, 3, 6) && !shard.owns_expert(1, 4, 6));
    }

    #[test]
    fn a_map_that_does_not_fit_is_rejected() {
        let mut map = PlacementMap::contiguous(&spec(6), 2);
        map.layers[1].ranks[0] = 5;
        assert!(
            map.validate(&spec(6))
                .unwrap_err()
                .to_string()
                .contains("ranks[0]")
        );
        assert!(
            PlacementMap::contiguous(&spec(4), 2)
                .validate(&spec(6))
                .is_err()
        );
        let json = serde_json::to_string(&PlacementMap::contiguous(&spec(6), 2)).unwrap();
        let back: PlacementMap = serde_json::from_str(&json).unwrap();
        assert_eq!(back, PlacementMap::contiguous(&spec(6), 2));
    }
}

//! `DeepseekV3ForCausalLM` (DeepSeek-V3, R1, Kimi K2): MLA, sigmoid scoring with
//! `e_score_correction_bias` used for selection only, group-limited top-k (groups scored by their
//! two best experts), renormalisation and `routed_scaling_factor`, shared experts, and the first
//! `first_k_dense_replace` layers dense.

use serde::Deserialize;
use serde_json::Value;

use super::mla::{DeepseekMoeKeys, MlaKeys, mla};
use super::{CommonConfig, dense_mlp, from_json, layer};
use crate::ConfigError;
use crate::rope::RopeLayout;
use crate::spec::{FfnSpec, GroupScore, ModelSpec, RouterSpec, Scoring};

const NAME: &str = "DeepseekV3ForCausalLM";

#[derive(Debug, Deserialize)]
pub struct DeepseekV3Config {
    #[serde(flatten)]
    pub common: CommonConfig,
    #[serde(flatten)]
    pub mla: MlaKeys,
    #[serde(flatten)]
    pub moe: DeepseekMoeKeys,
    /// Rotary pairs are interleaved `(x0, x1), (x2, x3)…` (default true).
    pub rope_interleave: Option<bool>,
}

pub(super) fn spec(v: &Value) -> Result<ModelSpec, ConfigError> {
    let c: DeepseekV3Config = from_json(NAME, v)?;
    let layout = if c.rope_interleave.unwrap_or(true) {
        RopeLayout::Interleaved
    } else {
        RopeLayout::Half
    };
    let rope = c.common.rope.resolve(
        c.mla.qk_rope_head_dim,
        c.common.max_position_embeddings,
        10000.0,
        layout,
    )?;
    let groups = c.moe.n_group.unwrap_or(1);
    let rule = RouterSpec {
        scoring: Scoring::Sigmoid,
        normalize: c.moe.norm_topk_prob.unwrap_or(true),
        groups: Some((
            groups,
            c.moe.topk_group.unwrap_or(groups),
            GroupScore::SumTop2,
        )),
        scaling: c.moe.routed_scaling_factor.unwrap_or(2.5) as f32,
    };
    c.common.model(NAME, rope.clone(), |i| {
        let ffn = if c.moe.is_moe(i, 3) {
            FfnSpec::moe(c.moe.moe(i, rule, true)?)
        } else {
            dense_mlp(i, c.moe.intermediate_size)
        };
        Ok(layer(i, mla(&c.common, &c.mla, &rope, i), ffn))
    })
}

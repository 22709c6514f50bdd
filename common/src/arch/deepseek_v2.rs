//! `DeepseekV2ForCausalLM` (DeepSeek-V2, V2-Lite, Coder-V2): MLA with interleaved RoPE, softmax
//! scoring, `greedy` or `group_limited_greedy` top-k (groups scored by their best expert), weights
//! scaled by `routed_scaling_factor` and not renormalised (as transformers does), shared experts.

use serde::Deserialize;
use serde_json::Value;

use super::mla::{DeepseekMoeKeys, MlaKeys, mla};
use super::{CommonConfig, dense_mlp, from_json, layer};
use crate::ConfigError;
use crate::rope::RopeLayout;
use crate::spec::{FfnSpec, GroupScore, ModelSpec, RouterSpec, Scoring};

const NAME: &str = "DeepseekV2ForCausalLM";

#[derive(Debug, Deserialize)]
pub struct DeepseekV2Config {
    #[serde(flatten)]
    pub common: CommonConfig,
    #[serde(flatten)]
    pub mla: MlaKeys,
    #[serde(flatten)]
    pub moe: DeepseekMoeKeys,
}

pub(super) fn spec(v: &Value) -> Result<ModelSpec, ConfigError> {
    let c: DeepseekV2Config = from_json(NAME, v)?;
    let rope = c.common.rope.resolve(
        c.mla.qk_rope_head_dim,
        c.common.max_position_embeddings,
        10000.0,
        RopeLayout::Interleaved,
    )?;
    let groups = match c.moe.topk_method.as_deref().unwrap_or("greedy") {
        "greedy" => None,
        "group_limited_greedy" => {
            let n = c.moe.n_group.unwrap_or(1);
            Some((n, c.moe.topk_group.unwrap_or(n), GroupScore::Max))
        }
        other => {
            return Err(ConfigError::invalid(
                "topk_method",
                other,
                "expected greedy or group_limited_greedy",
            ));
        }
    };
    let rule = RouterSpec {
        scoring: Scoring::Softmax,
        normalize: false,
        groups,
        scaling: c.moe.routed_scaling_factor.unwrap_or(1.0) as f32,
    };
    c.common.model(NAME, rope.clone(), |i| {
        let ffn = if c.moe.is_moe(i, 0) {
            FfnSpec::moe(c.moe.moe(i, rule, false)?)
        } else {
            dense_mlp(i, c.moe.intermediate_size)
        };
        Ok(layer(i, mla(&c.common, &c.mla, &rope, i), ffn))
    })
}

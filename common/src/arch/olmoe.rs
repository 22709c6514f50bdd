//! `OlmoeForCausalLM`: RMSNorm over the whole q and k projections, softmax top-k routing.

use serde::Deserialize;
use serde_json::Value;

use super::{CommonConfig, GqaOptions, from_json, gqa, layer, reject_if, routed_moe};
use crate::ConfigError;
use crate::spec::{FfnSpec, MlpSpec, ModelSpec, QkNorm, RouterSpec};

const NAME: &str = "OlmoeForCausalLM";

#[derive(Debug, Deserialize)]
pub struct OlmoeConfig {
    #[serde(flatten)]
    pub common: CommonConfig,
    pub intermediate_size: usize,
    #[serde(alias = "num_local_experts")]
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    #[serde(default)]
    pub norm_topk_prob: bool,
    #[serde(default)]
    pub attention_bias: bool,
    /// Clamp q/k/v activations (default none; unsupported when set).
    pub clip_qkv: Option<f64>,
}

pub(super) fn spec(v: &Value) -> Result<ModelSpec, ConfigError> {
    let c: OlmoeConfig = from_json(NAME, v)?;
    reject_if(c.clip_qkv.is_some(), "clip_qkv", "clamping q/k/v")?;
    let rope = c.common.standard_rope(10000.0)?;
    let opts = GqaOptions {
        qkv_bias: c.attention_bias,
        o_bias: c.attention_bias,
        qk_norm: QkNorm::Whole,
        sliding_window: None,
    };
    c.common.model(NAME, rope, |i| {
        let prefix = format!("model.layers.{i}.mlp");
        let ffn = FfnSpec::moe(routed_moe(
            prefix,
            c.num_experts,
            c.num_experts_per_tok,
            RouterSpec::softmax(c.norm_topk_prob),
            MlpSpec::standard(String::new(), c.intermediate_size),
        ));
        Ok(layer(i, gqa(&c.common, i, opts)?, ffn))
    })
}

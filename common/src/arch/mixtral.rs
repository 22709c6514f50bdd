//! `MixtralForCausalLM`: softmax top-k routing with renormalised weights; experts named
//! `block_sparse_moe.experts.{e}.w1/w3/w2` (gate/up/down).

use serde::Deserialize;
use serde_json::Value;

use super::{CommonConfig, GqaOptions, from_json, gqa, layer, routed_moe};
use crate::ConfigError;
use crate::spec::{FfnSpec, MlpSpec, ModelSpec, QkNorm, RouterSpec};

const NAME: &str = "MixtralForCausalLM";

#[derive(Debug, Deserialize)]
pub struct MixtralConfig {
    #[serde(flatten)]
    pub common: CommonConfig,
    pub intermediate_size: usize,
    #[serde(alias = "num_experts")]
    pub num_local_experts: usize,
    pub num_experts_per_tok: usize,
    /// Attend only to the last `sliding_window` positions (default: unlimited).
    pub sliding_window: Option<usize>,
}

pub(super) fn spec(v: &Value) -> Result<ModelSpec, ConfigError> {
    let c: MixtralConfig = from_json(NAME, v)?;
    let rope = c.common.standard_rope(1e6)?;
    let opts = GqaOptions {
        qkv_bias: false,
        o_bias: false,
        qk_norm: QkNorm::None,
        sliding_window: c.sliding_window,
    };
    c.common.model(NAME, rope, |i| {
        let prefix = format!("model.layers.{i}.block_sparse_moe");
        let ffn = FfnSpec::moe(routed_moe(
            prefix,
            c.num_local_experts,
            c.num_experts_per_tok,
            RouterSpec::softmax(true),
            MlpSpec {
                prefix: String::new(),
                intermediate_size: c.intermediate_size,
                gate: "w1".into(),
                up: "w3".into(),
                down: "w2".into(),
            },
        ));
        Ok(layer(i, gqa(&c.common, i, opts)?, ffn))
    })
}

//! `LlamaForCausalLM`: dense decoder (Llama 2/3, and the many models sharing its layout).

use serde::Deserialize;
use serde_json::Value;

use super::{CommonConfig, GqaOptions, dense_mlp, from_json, gqa, layer, reject_if};
use crate::ConfigError;
use crate::spec::{ModelSpec, QkNorm};

const NAME: &str = "LlamaForCausalLM";

#[derive(Debug, Deserialize)]
pub struct LlamaConfig {
    #[serde(flatten)]
    pub common: CommonConfig,
    pub intermediate_size: usize,
    /// Bias on q/k/v/o projections (default false).
    #[serde(default)]
    pub attention_bias: bool,
    /// Bias on the MLP projections (default false; unsupported when true).
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "silu")]
    pub hidden_act: String,
}

pub(super) fn silu() -> String {
    "silu".into()
}

pub(super) fn spec(v: &Value) -> Result<ModelSpec, ConfigError> {
    let c: LlamaConfig = from_json(NAME, v)?;
    reject_if(c.mlp_bias, "mlp_bias", "MLP biases")?;
    reject_if(
        c.hidden_act != "silu",
        "hidden_act",
        "activations other than silu",
    )?;
    let rope = c.common.standard_rope(10000.0)?;
    let opts = GqaOptions {
        qkv_bias: c.attention_bias,
        o_bias: c.attention_bias,
        qk_norm: QkNorm::None,
        sliding_window: None,
    };
    c.common.model(NAME, rope, |i| {
        Ok(layer(
            i,
            gqa(&c.common, i, opts)?,
            dense_mlp(i, c.intermediate_size),
        ))
    })
}

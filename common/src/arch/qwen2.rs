//! `Qwen2ForCausalLM`: dense decoder with q/k/v biases (Qwen2/2.5, QwQ-32B, Yi-1.5 style).

use serde::Deserialize;
use serde_json::Value;

use super::{CommonConfig, GqaOptions, dense_mlp, from_json, gqa, layer, reject_if};
use crate::ConfigError;
use crate::spec::{ModelSpec, QkNorm};

const NAME: &str = "Qwen2ForCausalLM";

#[derive(Debug, Deserialize)]
pub struct Qwen2Config {
    #[serde(flatten)]
    pub common: CommonConfig,
    pub intermediate_size: usize,
    /// Sliding-window attention on some layers (default false; unsupported when true).
    #[serde(default)]
    pub use_sliding_window: bool,
    #[serde(default = "super::llama::silu")]
    pub hidden_act: String,
}

pub(super) fn spec(v: &Value) -> Result<ModelSpec, ConfigError> {
    let c: Qwen2Config = from_json(NAME, v)?;
    reject_if(
        c.use_sliding_window,
        "use_sliding_window",
        "per-layer sliding windows",
    )?;
    reject_if(
        c.hidden_act != "silu",
        "hidden_act",
        "activations other than silu",
    )?;
    let rope = c.common.standard_rope(10000.0)?;
    let opts = GqaOptions {
        qkv_bias: true,
        o_bias: false,
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

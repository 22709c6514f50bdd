//! `Qwen3MoeForCausalLM`: per-head q/k RMSNorm, softmax top-k routing, optional dense layers chosen
//! by `decoder_sparse_step` and `mlp_only_layers`.

use serde::Deserialize;
use serde_json::Value;

use super::{
    CommonConfig, GqaOptions, dense_mlp, from_json, gqa, layer, one, reject_if, routed_moe,
};
use crate::ConfigError;
use crate::spec::{FfnSpec, MlpSpec, ModelSpec, QkNorm, RouterSpec};

const NAME: &str = "Qwen3MoeForCausalLM";

#[derive(Debug, Deserialize)]
pub struct Qwen3MoeConfig {
    #[serde(flatten)]
    pub common: CommonConfig,
    /// Dense-layer MLP width.
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    #[serde(alias = "num_local_experts")]
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    /// Layer `i` is sparse when `(i + 1) % decoder_sparse_step == 0` (default 1: all).
    #[serde(default = "one")]
    pub decoder_sparse_step: usize,
    /// Layers forced dense (default none; `null` allowed).
    #[serde(default)]
    pub mlp_only_layers: Option<Vec<usize>>,
    /// Renormalise the top-k weights (default false).
    #[serde(default)]
    pub norm_topk_prob: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub use_sliding_window: bool,
}

/// Whether Qwen-MoE layer `i` is sparse (shared with Qwen2-MoE).
pub(super) fn is_sparse(i: usize, num_experts: usize, step: usize, mlp_only: &[usize]) -> bool {
    !mlp_only.contains(&i) && num_experts > 0 && step > 0 && (i + 1).is_multiple_of(step)
}

pub(super) fn spec(v: &Value) -> Result<ModelSpec, ConfigError> {
    let c: Qwen3MoeConfig = from_json(NAME, v)?;
    reject_if(
        c.use_sliding_window,
        "use_sliding_window",
        "per-layer sliding windows",
    )?;
    let rope = c.common.standard_rope(10000.0)?;
    let opts = GqaOptions {
        qkv_bias: c.attention_bias,
        o_bias: c.attention_bias,
        qk_norm: QkNorm::PerHead,
        sliding_window: None,
    };
    let mlp_only = c.mlp_only_layers.clone().unwrap_or_default();
    c.common.model(NAME, rope, |i| {
        let ffn = if is_sparse(i, c.num_experts, c.decoder_sparse_step, &mlp_only) {
            let prefix = format!("model.layers.{i}.mlp");
            FfnSpec::moe(routed_moe(
                prefix,
                c.num_experts,
                c.num_experts_per_tok,
                RouterSpec::softmax(c.norm_topk_prob),
                MlpSpec::standard(String::new(), c.moe_intermediate_size),
            ))
        } else {
            dense_mlp(i, c.intermediate_size)
        };
        Ok(layer(i, gqa(&c.common, i, opts)?, ffn))
    })
}

//! `Qwen2MoeForCausalLM`: q/k/v biases, softmax top-k routing, and a shared expert whose output is
//! scaled by `sigmoid(shared_expert_gate(x))`.

use serde::Deserialize;
use serde_json::Value;

use super::qwen3_moe::is_sparse;
use super::{
    CommonConfig, GqaOptions, dense_mlp, from_json, gqa, layer, one, reject_if, routed_moe,
};
use crate::ConfigError;
use crate::spec::{FfnSpec, MlpSpec, ModelSpec, MoeSpec, QkNorm, RouterSpec, SharedExpertSpec};

const NAME: &str = "Qwen2MoeForCausalLM";

#[derive(Debug, Deserialize)]
pub struct Qwen2MoeConfig {
    #[serde(flatten)]
    pub common: CommonConfig,
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub shared_expert_intermediate_size: usize,
    #[serde(alias = "num_local_experts")]
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    #[serde(default = "one")]
    pub decoder_sparse_step: usize,
    #[serde(default)]
    pub mlp_only_layers: Option<Vec<usize>>,
    #[serde(default)]
    pub norm_topk_prob: bool,
    /// q/k/v biases (default true).
    #[serde(default = "yes")]
    pub qkv_bias: bool,
    #[serde(default)]
    pub use_sliding_window: bool,
}

fn yes() -> bool {
    true
}

pub(super) fn spec(v: &Value) -> Result<ModelSpec, ConfigError> {
    let c: Qwen2MoeConfig = from_json(NAME, v)?;
    reject_if(
        c.use_sliding_window,
        "use_sliding_window",
        "per-layer sliding windows",
    )?;
    let rope = c.common.standard_rope(10000.0)?;
    let opts = GqaOptions {
        qkv_bias: c.qkv_bias,
        o_bias: false,
        qk_norm: QkNorm::None,
        sliding_window: None,
    };
    let mlp_only = c.mlp_only_layers.clone().unwrap_or_default();
    c.common.model(NAME, rope, |i| {
        let ffn = if is_sparse(i, c.num_experts, c.decoder_sparse_step, &mlp_only) {
            let prefix = format!("model.layers.{i}.mlp");
            let shared = (c.shared_expert_intermediate_size > 0).then(|| SharedExpertSpec {
                mlp: MlpSpec::standard(
                    format!("{prefix}.shared_expert"),
                    c.shared_expert_intermediate_size,
                ),
                gate: Some(format!("{prefix}.shared_expert_gate.weight")),
            });
            FfnSpec::moe(MoeSpec {
                shared,
                ..routed_moe(
                    prefix,
                    c.num_experts,
                    c.num_experts_per_tok,
                    RouterSpec::softmax(c.norm_topk_prob),
                    MlpSpec::standard(String::new(), c.moe_intermediate_size),
                )
            })
        } else {
            dense_mlp(i, c.intermediate_size)
        };
        Ok(layer(i, gqa(&c.common, i, opts)?, ffn))
    })
}

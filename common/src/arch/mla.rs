//! Pieces shared by the DeepSeek architectures (V2 and V3, which also serves R1 and Kimi K2):
//! the multi-head latent attention keys and the MoE-layout keys.

use serde::Deserialize;

use super::CommonConfig;
use crate::ConfigError;
use crate::rope::RopeSpec;
use crate::spec::{AttentionSpec, MlaSpec, MlpSpec, MoeSpec, RouterSpec, SharedExpertSpec};

/// Multi-head latent attention keys.
#[derive(Debug, Deserialize)]
pub struct MlaKeys {
    /// Query compression rank; `null` means a plain `q_proj`.
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    #[serde(default)]
    pub attention_bias: bool,
}

/// Which layers are MoE and how experts are laid out.
#[derive(Debug, Deserialize)]
pub struct DeepseekMoeKeys {
    /// Dense-layer MLP width.
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    /// Routed experts; `null` makes every layer dense.
    #[serde(alias = "num_local_experts", alias = "num_experts")]
    pub n_routed_experts: Option<usize>,
    pub num_experts_per_tok: Option<usize>,
    pub n_shared_experts: Option<usize>,
    /// The first `k` layers are dense (transformers' default: 3 for V3, 0 for V2).
    pub first_k_dense_replace: Option<usize>,
    /// Every `moe_layer_freq`-th layer after those is MoE (default 1).
    pub moe_layer_freq: Option<usize>,
    pub routed_scaling_factor: Option<f64>,
    pub n_group: Option<usize>,
    pub topk_group: Option<usize>,
    pub norm_topk_prob: Option<bool>,
    pub topk_method: Option<String>,
}

impl DeepseekMoeKeys {
    pub fn is_moe(&self, i: usize, default_first_dense: usize) -> bool {
        self.n_routed_experts.is_some_and(|n| n > 0)
            && i >= self.first_k_dense_replace.unwrap_or(default_first_dense)
            && i.is_multiple_of(self.moe_layer_freq.unwrap_or(1).max(1))
    }

    /// The MoE block of layer `i` (`model.layers.{i}.mlp`) with the given routing rule.
    pub fn moe(
        &self,
        i: usize,
        rule: RouterSpec,
        router_bias: bool,
    ) -> Result<MoeSpec, ConfigError> {
        let prefix = format!("model.layers.{i}.mlp");
        let num_experts = self.n_routed_experts.unwrap_or(0);
        let top_k = self.num_experts_per_tok.ok_or_else(|| {
            ConfigError::invalid(
                "num_experts_per_tok",
                "null",
                "required with n_routed_experts",
            )
        })?;
        let shared = match self.n_shared_experts.filter(|n| *n > 0) {
            None => None,
            // The shared experts are stored as one MLP `n` experts wide.
            Some(n) => Some(SharedExpertSpec {
                mlp: MlpSpec::standard(
                    format!("{prefix}.shared_experts"),
                    self.moe_intermediate_size.checked_mul(n).ok_or_else(|| {
                        ConfigError::invalid(
                            "n_shared_experts",
                            n,
                            format!(
                                "times moe_intermediate_size = {} overflows",
                                self.moe_intermediate_size
                            ),
                        )
                    })?,
                ),
                gate: None,
            }),
        };
        Ok(MoeSpec {
            router_bias: router_bias.then(|| format!("{prefix}.gate.e_score_correction_bias")),
            shared,
            ..super::routed_moe(
                prefix,
                num_experts,
                top_k,
                rule,
                MlpSpec::standard(String::new(), self.moe_intermediate_size),
            )
        })
    }
}

/// `model.layers.{i}.self_attn` as MLA, with DeepSeek's YaRN `mscale²` softmax correction.
pub fn mla(c: &CommonConfig, k: &MlaKeys, rope: &RopeSpec, i: usize) -> AttentionSpec {
    // In f64: the dims come straight from config.json and their integer sum may overflow.
    let qk_head_dim = k.qk_nope_head_dim as f64 + k.qk_rope_head_dim as f64;
    let m = rope.deepseek_softmax_mscale();
    AttentionSpec::Mla(MlaSpec {
        prefix: format!("model.layers.{i}.self_attn"),
        num_heads: c.num_attention_heads,
        q_lora_rank: k.q_lora_rank,
        kv_lora_rank: k.kv_lora_rank,
        qk_nope_head_dim: k.qk_nope_head_dim,
        qk_rope_head_dim: k.qk_rope_head_dim,
        v_head_dim: k.v_head_dim,
        softmax_scale: (qk_head_dim.powf(-0.5) * m * m) as f32,
        attention_bias: k.attention_bias,
    })
}

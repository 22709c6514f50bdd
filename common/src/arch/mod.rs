//! Supported architectures: one file each, holding that architecture's `config.json` schema (a serde
//! struct with transformers' defaults) and its mapping onto the shared [`ModelSpec`].
//!
//! Adding an architecture means adding a file here: the worker's layers are shared by all of them.

mod deepseek_v2;
mod deepseek_v3;
mod llama;
mod mixtral;
mod mla;
mod olmoe;
mod qwen2;
mod qwen2_moe;
mod qwen3_moe;

use std::path::Path;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::ConfigError;
use crate::generation::TokenIds;
use crate::rope::{RopeKeys, RopeLayout, RopeSpec};
use crate::spec::{
    AttentionSpec, FfnSpec, GqaSpec, LayerSpec, MAX_LAYERS, MlpSpec, ModelSpec, MoeSpec, QkNorm,
    RouterSpec,
};

type Parser = fn(&Value) -> Result<ModelSpec, ConfigError>;

/// `architectures[0]` → parser.
const ARCHITECTURES: &[(&str, Parser)] = &[
    ("LlamaForCausalLM", llama::spec),
    ("Qwen2ForCausalLM", qwen2::spec),
    ("Qwen2MoeForCausalLM", qwen2_moe::spec),
    ("Qwen3MoeForCausalLM", qwen3_moe::spec),
    ("MixtralForCausalLM", mixtral::spec),
    ("OlmoeForCausalLM", olmoe::spec),
    ("DeepseekV2ForCausalLM", deepseek_v2::spec),
    ("DeepseekV3ForCausalLM", deepseek_v3::spec),
];

/// Names of every supported architecture.
pub fn supported() -> Vec<&'static str> {
    ARCHITECTURES.iter().map(|(n, _)| *n).collect()
}

/// Reads `dir/config.json` and builds the validated [`ModelSpec`].
pub fn load_model_spec(dir: &Path) -> Result<ModelSpec, ConfigError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Io {
        path: path.clone(),
        source,
    })?;
    let value: Value = serde_json::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.clone(),
        source,
    })?;
    model_spec_from_value(&path, &value)
}

/// Builds the validated [`ModelSpec`] of a parsed `config.json` (`path` is for messages).
pub fn model_spec_from_value(path: &Path, value: &Value) -> Result<ModelSpec, ConfigError> {
    let name = value
        .get("architectures")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(Value::as_str)
        .ok_or_else(|| ConfigError::NoArchitecture {
            path: path.to_path_buf(),
        })?;
    let (_, parse) = ARCHITECTURES
        .iter()
        .find(|(n, _)| *n == name)
        .ok_or_else(|| ConfigError::UnsupportedArchitecture {
            path: path.to_path_buf(),
            name: name.to_string(),
            supported: supported().join(", "),
        })?;
    let spec = parse(value)?;
    spec.validate()?;
    Ok(spec)
}

/// Deserialises an architecture's config struct, naming the architecture on failure.
fn from_json<T: DeserializeOwned>(architecture: &str, v: &Value) -> Result<T, ConfigError> {
    // serde_json's own message names the expected type but not the key; the path does.
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        ConfigError::Schema {
            architecture: architecture.into(),
            reason: if path == "." {
                inner.to_string()
            } else {
                format!("`{path}`: {inner}")
            },
        }
    })
}

/// Keys every decoder config has, with transformers' defaults.
#[derive(Clone, Debug, Deserialize)]
pub(crate) struct CommonConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Defaults to `num_attention_heads` (no GQA).
    pub num_key_value_heads: Option<usize>,
    /// Defaults to `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub eos_token_id: Option<TokenIds>,
    pub bos_token_id: Option<u32>,
    #[serde(flatten)]
    pub rope: RopeKeys,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_positions() -> usize {
    2048
}
pub(crate) fn one() -> usize {
    1
}

impl CommonConfig {
    pub fn head_dim(&self) -> Result<usize, ConfigError> {
        match self.head_dim {
            Some(d) => Ok(d),
            None if self.num_attention_heads > 0
                && self.hidden_size.is_multiple_of(self.num_attention_heads) =>
            {
                Ok(self.hidden_size / self.num_attention_heads)
            }
            None => Err(ConfigError::invalid(
                "num_attention_heads",
                self.num_attention_heads,
                format!(
                    "must divide hidden_size = {} when head_dim is absent",
                    self.hidden_size
                ),
            )),
        }
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// RoPE over each head's `head_dim` (times `partial_rotary_factor`), half-split pairs.
    pub fn standard_rope(&self, default_theta: f64) -> Result<RopeSpec, ConfigError> {
        self.rope.resolve(
            self.head_dim()?,
            self.max_position_embeddings,
            default_theta,
            RopeLayout::Half,
        )
    }

    /// Assembles the spec with the standard top-level tensor names; `layer_at(i)` describes layer `i`.
    pub fn model(
        &self,
        architecture: &str,
        rope: RopeSpec,
        layer_at: impl Fn(usize) -> Result<LayerSpec, ConfigError>,
    ) -> Result<ModelSpec, ConfigError> {
        // Checked before building one spec per layer: a corrupt count would otherwise allocate
        // without bound instead of failing.
        if self.num_hidden_layers > MAX_LAYERS {
            return Err(ConfigError::invalid(
                "num_hidden_layers",
                self.num_hidden_layers,
                format!("more than {MAX_LAYERS}; is config.json corrupt?"),
            ));
        }
        let layers = (0..self.num_hidden_layers)
            .map(layer_at)
            .collect::<Result<_, _>>()?;
        Ok(ModelSpec {
            architecture: architecture.into(),
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            rms_norm_eps: self.rms_norm_eps as f32,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            rope,
            layers,
            embed_tokens: "model.embed_tokens.weight".into(),
            final_norm: "model.norm.weight".into(),
            lm_head: "lm_head.weight".into(),
            eos_token_ids: self
                .eos_token_id
                .clone()
                .map(TokenIds::into_vec)
                .unwrap_or_default(),
            bos_token_id: self.bos_token_id,
        })
    }
}

/// Options of a grouped-query attention block.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GqaOptions {
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub qk_norm: QkNorm,
    pub sliding_window: Option<usize>,
}

/// `model.layers.{i}.self_attn` as grouped-query attention.
pub(crate) fn gqa(c: &CommonConfig, i: usize, o: GqaOptions) -> Result<AttentionSpec, ConfigError> {
    Ok(AttentionSpec::Gqa(GqaSpec {
        prefix: format!("model.layers.{i}.self_attn"),
        num_heads: c.num_attention_heads,
        num_kv_heads: c.num_kv_heads(),
        head_dim: c.head_dim()?,
        qkv_bias: o.qkv_bias,
        o_bias: o.o_bias,
        qk_norm: o.qk_norm,
        sliding_window: o.sliding_window,
    }))
}

/// `model.layers.{i}.mlp` as a dense gated MLP.
pub(crate) fn dense_mlp(i: usize, intermediate_size: usize) -> FfnSpec {
    FfnSpec::Dense(MlpSpec::standard(
        format!("model.layers.{i}.mlp"),
        intermediate_size,
    ))
}

/// Layer `i` with the standard norm names.
pub(crate) fn layer(i: usize, attention: AttentionSpec, ffn: FfnSpec) -> LayerSpec {
    LayerSpec {
        input_norm: format!("model.layers.{i}.input_layernorm.weight"),
        post_attention_norm: format!("model.layers.{i}.post_attention_layernorm.weight"),
        attention,
        ffn,
    }
}

/// A routed MoE block at `prefix`: router `{prefix}.gate.weight`, expert `e` at
/// `{prefix}.experts.{e}` with `expert`'s projection names; no shared expert, no router bias.
pub(crate) fn routed_moe(
    prefix: String,
    num_experts: usize,
    top_k: usize,
    rule: RouterSpec,
    expert: MlpSpec,
) -> MoeSpec {
    MoeSpec {
        num_experts,
        top_k,
        router: format!("{prefix}.gate.weight"),
        router_bias: None,
        rule,
        experts_prefix: format!("{prefix}.experts"),
        expert,
        shared: None,
    }
}

/// Rejects a feature we do not implement instead of silently computing something else.
pub(crate) fn reject_if(cond: bool, field: &str, reason: &str) -> Result<(), ConfigError> {
    if cond {
        Err(ConfigError::unsupported(field, reason))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests;

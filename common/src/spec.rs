//! The architecture-neutral model description.
//!
//! Every supported architecture reduces to a decoder stack of [`LayerSpec`]s: a pre-norm attention
//! block (GQA or MLA) and a pre-norm feed-forward block (a gated MLP or a routed MoE). The spec also
//! carries the checkpoint tensor names, so the worker's layers never know which architecture they
//! serve. [`ModelSpec::validate`] checks the shapes fit together before any weight is read.

use serde::Serialize;
pub use tessera_kernels::{GroupScore, Scoring};

use crate::ConfigError;
use crate::rope::RopeSpec;

/// Most decoder layers a config may declare. Published models have at most a few hundred; the
/// bound turns a corrupt count into an error rather than an unbounded allocation.
pub const MAX_LAYERS: usize = 1 << 10;
/// Most routed experts per MoE layer (published models: at most a few hundred). Bounds the
/// per-expert work done before any weight is read (placement, shard plans).
pub const MAX_EXPERTS: usize = 1 << 14;

#[derive(Clone, Debug, Serialize)]
pub struct ModelSpec {
    /// The `architectures[0]` it came from, e.g. `Qwen3MoeForCausalLM`.
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub rms_norm_eps: f32,
    pub max_position_embeddings: usize,
    /// The output projection reuses the embedding table (no `lm_head` tensor).
    pub tie_word_embeddings: bool,
    pub rope: RopeSpec,
    pub layers: Vec<LayerSpec>,
    pub embed_tokens: String,
    pub final_norm: String,
    pub lm_head: String,
    /// Stop tokens named by `config.json` (generation_config.json may add more).
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
}

#[derive(Clone, Debug, Serialize)]
pub struct LayerSpec {
    pub input_norm: String,
    pub post_attention_norm: String,
    pub attention: AttentionSpec,
    pub ffn: FfnSpec,
}

#[derive(Clone, Debug, Serialize)]
pub enum AttentionSpec {
    Gqa(GqaSpec),
    Mla(MlaSpec),
}

/// Where q/k normalisation applies, if anywhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum QkNorm {
    None,
    /// RMSNorm over each head (`head_dim` weights): Qwen3.
    PerHead,
    /// RMSNorm over the whole projection (`heads * head_dim` weights): OLMoE.
    Whole,
}

/// Grouped-query attention with `{prefix}.{q,k,v,o}_proj` (and optional `q_norm`/`k_norm`).
#[derive(Clone, Debug, Serialize)]
pub struct GqaSpec {
    pub prefix: String,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub qk_norm: QkNorm,
    pub sliding_window: Option<usize>,
}

/// DeepSeek's multi-head latent attention.
#[derive(Clone, Debug, Serialize)]
pub struct MlaSpec {
    pub prefix: String,
    pub num_heads: usize,
    /// `None`: a plain `q_proj` (DeepSeek-V2-Lite style); else `q_a_proj` → norm → `q_b_proj`.
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    /// Softmax scale including YaRN's `mscale²` correction.
    pub softmax_scale: f32,
    pub attention_bias: bool,
}

/// Tensor names of a gated MLP: `{prefix}.{gate}.weight` etc.
#[derive(Clone, Debug, Serialize)]
pub struct MlpSpec {
    pub prefix: String,
    pub intermediate_size: usize,
    pub gate: String,
    pub up: String,
    pub down: String,
}

impl MlpSpec {
    /// `gate_proj` / `up_proj` / `down_proj`, the common naming.
    pub fn standard(prefix: String, intermediate_size: usize) -> Self {
        MlpSpec {
            prefix,
            intermediate_size,
            gate: "gate_proj".into(),
            up: "up_proj".into(),
            down: "down_proj".into(),
        }
    }

    pub fn names(&self) -> [String; 3] {
        [&self.gate, &self.up, &self.down].map(|n| format!("{}.{n}.weight", self.prefix))
    }
}

#[derive(Clone, Debug, Serialize)]
pub enum FfnSpec {
    Dense(MlpSpec),
    Moe(Box<MoeSpec>),
}

impl FfnSpec {
    pub fn moe(spec: MoeSpec) -> Self {
        FfnSpec::Moe(Box::new(spec))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct RouterSpec {
    pub scoring: Scoring,
    pub normalize: bool,
    pub groups: Option<(usize, usize, GroupScore)>,
    pub scaling: f32,
}

impl RouterSpec {
    /// Softmax over all experts, top-k, optionally renormalised (Mixtral, Qwen, OLMoE).
    pub fn softmax(normalize: bool) -> Self {
        RouterSpec {
            scoring: Scoring::Softmax,
            normalize,
            groups: None,
            scaling: 1.0,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct SharedExpertSpec {
    pub mlp: MlpSpec,
    /// A `[1, hidden]` gate whose sigmoid scales the shared expert's output (Qwen2-MoE).
    pub gate: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct MoeSpec {
    pub num_experts: usize,
    pub top_k: usize,
    /// Router weight `[num_experts, hidden]`.
    pub router: String,
    /// DeepSeek-V3's `e_score_correction_bias`.
    pub router_bias: Option<String>,
    pub rule: RouterSpec,
    /// Expert `e` is the MLP `{experts_prefix}.{e}` with these projection names.
    pub experts_prefix: String,
    pub expert: MlpSpec,
    pub shared: Option<SharedExpertSpec>,
}

impl MoeSpec {
    /// The MLP of expert `e`.
    pub fn expert(&self, e: usize) -> MlpSpec {
        MlpSpec {
            prefix: format!("{}.{e}", self.experts_prefix),
            ..self.expert.clone()
        }
    }
}

impl ModelSpec {
    /// Number of MoE layers.
    pub fn num_moe_layers(&self) -> usize {
        self.layers
            .iter()
            .filter(|l| matches!(l.ffn, FfnSpec::Moe(_)))
            .count()
    }

    /// Checks the attention of every layer splits over `world` tensor-parallel ranks.
    pub fn check_tensor_parallel(&self, world: usize) -> Result<(), ConfigError> {
        for layer in &self.layers {
            let (heads, kv) = match &layer.attention {
                AttentionSpec::Gqa(a) => (a.num_heads, a.num_kv_heads),
                AttentionSpec::Mla(a) => (a.num_heads, a.num_heads),
            };
            crate::shard::head_split(heads, kv, 0, world)
                .map_err(|reason| ConfigError::invalid("--tp", world, reason))?;
        }
        Ok(())
    }

    /// Checks that the shapes fit together; errors name the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        positive("vocab_size", self.vocab_size)?;
        positive("hidden_size", self.hidden_size)?;
        positive("num_hidden_layers", self.layers.len())?;
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite()) {
            return Err(ConfigError::invalid(
                "rms_norm_eps",
                self.rms_norm_eps,
                "must be positive",
            ));
        }
        self.rope.validate()?;
        for id in self.eos_token_ids.iter().chain(&self.bos_token_id) {
            if *id as usize >= self.vocab_size {
                return Err(ConfigError::invalid(
                    "eos_token_id",
                    id,
                    format!("outside vocab_size {}", self.vocab_size),
                ));
            }
        }
        for layer in &self.layers {
            match &layer.attention {
                AttentionSpec::Gqa(a) => {
                    positive("num_attention_heads", a.num_heads)?;
                    positive("num_key_value_heads", a.num_kv_heads)?;
                    positive("head_dim", a.head_dim)?;
                    if !a.num_heads.is_multiple_of(a.num_kv_heads) {
                        return Err(ConfigError::invalid(
                            "num_key_value_heads",
                            a.num_kv_heads,
                            format!("must divide num_attention_heads = {}", a.num_heads),
                        ));
                    }
                    if self.rope.rotary_dim > a.head_dim {
                        return Err(ConfigError::invalid(
                            "partial_rotary_factor",
                            self.rope.rotary_dim,
                            format!("rotary dims exceed head_dim {}", a.head_dim),
                        ));
                    }
                }
                AttentionSpec::Mla(m) => {
                    positive("num_attention_heads", m.num_heads)?;
                    positive("kv_lora_rank", m.kv_lora_rank)?;
                    positive("v_head_dim", m.v_head_dim)?;
                    if m.qk_rope_head_dim != self.rope.rotary_dim {
                        return Err(ConfigError::invalid(
                            "qk_rope_head_dim",
                            m.qk_rope_head_dim,
                            "must equal the rotary dims",
                        ));
                    }
                }
            }
            match &layer.ffn {
                FfnSpec::Dense(m) => positive("intermediate_size", m.intermediate_size)?,
                FfnSpec::Moe(m) => {
                    positive("num_experts", m.num_experts)?;
                    if m.num_experts > MAX_EXPERTS {
                        return Err(ConfigError::invalid(
                            "num_experts",
                            m.num_experts,
                            format!("more than {MAX_EXPERTS}; is config.json corrupt?"),
                        ));
                    }
                    positive("moe_intermediate_size", m.expert.intermediate_size)?;
                    if m.top_k == 0 || m.top_k > m.num_experts {
                        return Err(ConfigError::invalid(
                            "num_experts_per_tok",
                            m.top_k,
                            format!("must be in 1..={} (the number of experts)", m.num_experts),
                        ));
                    }
                    if let Some((groups, keep, _)) = m.rule.groups {
                        if groups == 0 || !m.num_experts.is_multiple_of(groups) {
                            return Err(ConfigError::invalid(
                                "n_group",
                                groups,
                                format!("must divide the {} experts", m.num_experts),
                            ));
                        }
                        if keep == 0
                            || keep > groups
                            || keep.saturating_mul(m.num_experts / groups) < m.top_k
                        {
                            return Err(ConfigError::invalid(
                                "topk_group",
                                keep,
                                format!(
                                    "must be in 1..={groups} and keep at least top_k = {} experts",
                                    m.top_k
                                ),
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

fn positive(field: &str, v: usize) -> Result<(), ConfigError> {
    if v == 0 {
        return Err(ConfigError::invalid(field, v, "must be positive"));
    }
    Ok(())
}

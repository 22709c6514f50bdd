//! The shapes of synthetic models: the presets benchmarks know by name, the `config.json` each
//! family writes, and the list of tensors (name, shape, fill) a model of that config loads,
//! derived from the [`ModelSpec`] the config parses to so that the file always holds exactly what
//! the loader asks for.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tessera_common::arch::model_spec_from_value;
use tessera_common::{AttentionSpec, FfnSpec, GqaSpec, MlaSpec, MlpSpec, ModelSpec, QkNorm};

use crate::WorkerError;
/// The Hugging Face layout a synthetic model is written in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Family {
    /// `Qwen3MoeForCausalLM`: per-head q/k norms, every layer sparse.
    #[default]
    Qwen3Moe,
    /// `MixtralForCausalLM`: `block_sparse_moe` experts, no q/k norms.
    Mixtral,
    /// `DeepseekV2ForCausalLM`: latent attention (MLA), shared experts, dense first layers.
    DeepseekV2(DeepseekShape),
}

/// What the DeepSeek-V2 layout adds to a [`SyntheticModel`]: MLA's widths and the expert layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeepseekShape {
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    pub n_shared_experts: usize,
    /// Leading layers with a dense MLP instead of experts.
    pub first_k_dense_replace: usize,
    /// The dense layers' MLP width.
    pub intermediate_size: usize,
}

/// The shape of a synthetic MoE model (every layer sparse, but DeepSeek's first dense ones).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyntheticModel {
    /// Absent in markers written before there was a choice: those are Qwen3-MoE.
    #[serde(default)]
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub num_experts: usize,
    pub top_k: usize,
    pub moe_intermediate_size: usize,
    pub max_position_embeddings: usize,
}

impl SyntheticModel {
    /// About one billion parameters (2.1 GB in bf16) with Qwen3-30B-A3B's proportions at half the
    /// width: 128-dim heads with 4× GQA, 3·hidden/8 expert width, top-8 routing; 64 experts
    /// instead of 128 so that twelve layers fit in the budget.
    pub fn qwen3_moe_1b() -> Self {
        SyntheticModel {
            family: Family::Qwen3Moe,
            vocab_size: 32768,
            hidden_size: 1024,
            num_layers: 12,
            num_heads: 16,
            num_kv_heads: 4,
            head_dim: 128,
            num_experts: 64,
            top_k: 8,
            moe_intermediate_size: 384,
            max_position_embeddings: 4096,
        }
    }

    /// A few hundred kilobytes: for tests of the tools built on synthetic checkpoints.
    pub fn tiny() -> Self {
        SyntheticModel {
            family: Family::Qwen3Moe,
            vocab_size: 512,
            hidden_size: 64,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            num_experts: 8,
            top_k: 2,
            moe_intermediate_size: 32,
            max_position_embeddings: 1024,
        }
    }

    /// Qwen3-30B-A3B's shape (48 layers, 128 experts, top-8; 61 GB in bf16): the GPU benchmark's
    /// first model. Benchmarks may keep fewer layers ([`Self::with_layers`]) to fit a device.
    pub fn qwen3_30b_a3b() -> Self {
        SyntheticModel {
            family: Family::Qwen3Moe,
            vocab_size: 151_936,
            hidden_size: 2048,
            num_layers: 48,
            num_heads: 32,
            num_kv_heads: 4,
            head_dim: 128,
            num_experts: 128,
            top_k: 8,
            moe_intermediate_size: 768,
            max_position_embeddings: 4096,
        }
    }

    /// Mixtral-8x7B's shape (32 layers, 8 experts of width 14336, top-2; 93 GB in bf16): the GPU
    /// benchmark's second model, with fewer layers on one GPU.
    pub fn mixtral_8x7b() -> Self {
        SyntheticModel {
            family: Family::Mixtral,
            vocab_size: 32_000,
            hidden_size: 4096,
            num_layers: 32,
            num_heads: 32,
            num_kv_heads: 8,
            head_dim: 128,
            num_experts: 8,
            top_k: 2,
            moe_intermediate_size: 14_336,
            max_position_embeddings: 4096,
        }
    }

    /// DeepSeek-V2-Lite's shape (27 layers, MLA with a 512-wide latent, 64 experts of width
    /// 1408 top-6 plus 2 shared, a dense first layer; 31 GB in bf16): the latent KV cache's
    /// benchmark. `num_kv_heads` and `head_dim` do not apply (MLA has its own widths).
    pub fn deepseek_v2_lite() -> Self {
        SyntheticModel {
            family: Family::DeepseekV2(DeepseekShape {
                kv_lora_rank: 512,
                qk_nope_head_dim: 128,
                qk_rope_head_dim: 64,
                v_head_dim: 128,
                n_shared_experts: 2,
                first_k_dense_replace: 1,
                intermediate_size: 10_944,
            }),
            vocab_size: 102_400,
            hidden_size: 2048,
            num_layers: 27,
            num_heads: 16,
            num_kv_heads: 16,
            head_dim: 192,
            num_experts: 64,
            top_k: 6,
            moe_intermediate_size: 1408,
            max_position_embeddings: 4096,
        }
    }

    /// The same shape with `layers` decoder layers.
    pub fn with_layers(self, layers: usize) -> Self {
        SyntheticModel {
            num_layers: layers,
            ..self
        }
    }

    /// The shapes benchmarks know by name.
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "1b" => Some(Self::qwen3_moe_1b()),
            "tiny" => Some(Self::tiny()),
            "qwen3-30b-a3b" => Some(Self::qwen3_30b_a3b()),
            "mixtral-8x7b" => Some(Self::mixtral_8x7b()),
            "deepseek-v2-lite" => Some(Self::deepseek_v2_lite()),
            _ => None,
        }
    }

    /// The `config.json` transformers would write for this shape.
    pub fn config_json(&self) -> Value {
        match self.family {
            Family::Qwen3Moe => self.qwen3_moe_config(),
            Family::Mixtral => self.mixtral_config(),
            Family::DeepseekV2(d) => self.deepseek_v2_config(&d),
        }
    }

    fn deepseek_v2_config(&self, d: &DeepseekShape) -> Value {
        json!({
            "architectures": ["DeepseekV2ForCausalLM"],
            "model_type": "deepseek_v2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": d.intermediate_size,
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_heads,
            "n_routed_experts": self.num_experts,
            "num_experts_per_tok": self.top_k,
            "n_shared_experts": d.n_shared_experts,
            "first_k_dense_replace": d.first_k_dense_replace,
            "moe_layer_freq": 1,
            "routed_scaling_factor": 1.0,
            "topk_method": "greedy",
            "norm_topk_prob": false,
            "q_lora_rank": null,
            "kv_lora_rank": d.kv_lora_rank,
            "qk_nope_head_dim": d.qk_nope_head_dim,
            "qk_rope_head_dim": d.qk_rope_head_dim,
            "v_head_dim": d.v_head_dim,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10_000.0,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": false,
            "attention_bias": false,
            "hidden_act": "silu",
            "bos_token_id": 0,
            "eos_token_id": 1,
            "torch_dtype": "bfloat16",
        })
    }

    fn mixtral_config(&self) -> Value {
        json!({
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.moe_intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "num_local_experts": self.num_experts,
            "num_experts_per_tok": self.top_k,
            "rms_norm_eps": 1e-5,
            "rope_theta": 1_000_000.0,
            "max_position_embeddings": self.max_position_embeddings,
            "sliding_window": null,
            "tie_word_embeddings": false,
            "hidden_act": "silu",
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "bfloat16",
        })
    }

    fn qwen3_moe_config(&self) -> Value {
        json!({
            "architectures": ["Qwen3MoeForCausalLM"],
            "model_type": "qwen3_moe",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": 3 * self.hidden_size,
            "moe_intermediate_size": self.moe_intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "num_experts": self.num_experts,
            "num_experts_per_tok": self.top_k,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "norm_topk_prob": true,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1_000_000.0,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": false,
            "attention_bias": false,
            "use_sliding_window": false,
            "hidden_act": "silu",
            "bos_token_id": null,
            "eos_token_id": self.vocab_size - 1,
            "torch_dtype": "bfloat16",
        })
    }

    /// The validated spec the config parses to.
    pub fn spec(&self) -> Result<ModelSpec, WorkerError> {
        Ok(model_spec_from_value(
            Path::new("<synthetic config.json>"),
            &self.config_json(),
        )?)
    }
}

/// What a tensor is filled with.
#[derive(Clone, Copy, Debug)]
pub(super) enum Fill {
    /// Every element 1 (norm weights).
    Ones,
    /// Uniform with standard deviation [`super::WEIGHT_STD`].
    Random,
}

/// One tensor of the checkpoint: its name, shape and fill.
#[derive(Clone, Debug)]
pub struct TensorPlan {
    pub name: String,
    pub shape: Vec<usize>,
    pub(super) fill: Fill,
}

impl TensorPlan {
    fn new(name: impl Into<String>, shape: &[usize], fill: Fill) -> Self {
        TensorPlan {
            name: name.into(),
            shape: shape.to_vec(),
            fill,
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

fn mlp_tensors(out: &mut Vec<TensorPlan>, m: &MlpSpec, hidden: usize) {
    let [gate, up, down] = m.names();
    let i = m.intermediate_size;
    out.push(TensorPlan::new(gate, &[i, hidden], Fill::Random));
    out.push(TensorPlan::new(up, &[i, hidden], Fill::Random));
    out.push(TensorPlan::new(down, &[hidden, i], Fill::Random));
}

/// Every tensor a model of `spec` loads, with its full shape.
pub fn tensor_plan(spec: &ModelSpec) -> Result<Vec<TensorPlan>, WorkerError> {
    let h = spec.hidden_size;
    let mut out = vec![TensorPlan::new(
        &spec.embed_tokens,
        &[spec.vocab_size, h],
        Fill::Random,
    )];
    for layer in &spec.layers {
        out.push(TensorPlan::new(&layer.input_norm, &[h], Fill::Ones));
        out.push(TensorPlan::new(
            &layer.post_attention_norm,
            &[h],
            Fill::Ones,
        ));
        match &layer.attention {
            AttentionSpec::Gqa(a) => gqa_tensors(&mut out, a, h),
            AttentionSpec::Mla(a) => mla_tensors(&mut out, a, h),
        }
        match &layer.ffn {
            FfnSpec::Dense(m) => mlp_tensors(&mut out, m, h),
            FfnSpec::Moe(m) => {
                out.push(TensorPlan::new(
                    &m.router,
                    &[m.num_experts, h],
                    Fill::Random,
                ));
                if let Some(bias) = &m.router_bias {
                    out.push(TensorPlan::new(bias, &[m.num_experts], Fill::Random));
                }
                for e in 0..m.num_experts {
                    mlp_tensors(&mut out, &m.expert(e), h);
                }
                if let Some(sh) = &m.shared {
                    mlp_tensors(&mut out, &sh.mlp, h);
                }
            }
        }
    }
    out.push(TensorPlan::new(&spec.final_norm, &[h], Fill::Ones));
    if !spec.tie_word_embeddings {
        out.push(TensorPlan::new(
            &spec.lm_head,
            &[spec.vocab_size, h],
            Fill::Random,
        ));
    }
    Ok(out)
}

/// Grouped-query attention's projections, biases and q/k norms.
fn gqa_tensors(out: &mut Vec<TensorPlan>, a: &GqaSpec, h: usize) {
    let (q, kv) = (a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim);
    let p = &a.prefix;
    for (name, shape) in [
        ("q_proj", [q, h]),
        ("k_proj", [kv, h]),
        ("v_proj", [kv, h]),
        ("o_proj", [h, q]),
    ] {
        out.push(TensorPlan::new(
            format!("{p}.{name}.weight"),
            &shape,
            Fill::Random,
        ));
        if a.qkv_bias && name != "o_proj" || a.o_bias && name == "o_proj" {
            out.push(TensorPlan::new(
                format!("{p}.{name}.bias"),
                &shape[..1],
                Fill::Random,
            ));
        }
    }
    let norm_len = match a.qk_norm {
        QkNorm::None => None,
        QkNorm::PerHead => Some((a.head_dim, a.head_dim)),
        QkNorm::Whole => Some((q, kv)),
    };
    if let Some((qn, kn)) = norm_len {
        out.push(TensorPlan::new(
            format!("{p}.q_norm.weight"),
            &[qn],
            Fill::Ones,
        ));
        out.push(TensorPlan::new(
            format!("{p}.k_norm.weight"),
            &[kn],
            Fill::Ones,
        ));
    }
}

/// MLA's projections: the query (plain or low-rank), the latent KV with its norm, its per-head
/// up-projection and the output.
fn mla_tensors(out: &mut Vec<TensorPlan>, a: &MlaSpec, h: usize) {
    let qk = a.qk_nope_head_dim + a.qk_rope_head_dim;
    let heads = a.num_heads;
    let mut push = |name: &str, shape: &[usize], fill| {
        out.push(TensorPlan::new(format!("{}.{name}", a.prefix), shape, fill));
    };
    let bias = a.attention_bias;
    match a.q_lora_rank {
        None => push("q_proj.weight", &[heads * qk, h], Fill::Random),
        Some(r) => {
            push("q_a_proj.weight", &[r, h], Fill::Random);
            if bias {
                push("q_a_proj.bias", &[r], Fill::Random);
            }
            push("q_a_layernorm.weight", &[r], Fill::Ones);
            push("q_b_proj.weight", &[heads * qk, r], Fill::Random);
        }
    }
    let latent = a.kv_lora_rank;
    push(
        "kv_a_proj_with_mqa.weight",
        &[latent + a.qk_rope_head_dim, h],
        Fill::Random,
    );
    if bias {
        push(
            "kv_a_proj_with_mqa.bias",
            &[latent + a.qk_rope_head_dim],
            Fill::Random,
        );
    }
    push("kv_a_layernorm.weight", &[latent], Fill::Ones);
    push(
        "kv_b_proj.weight",
        &[heads * (a.qk_nope_head_dim + a.v_head_dim), latent],
        Fill::Random,
    );
    push("o_proj.weight", &[h, heads * a.v_head_dim], Fill::Random);
    if bias {
        push("o_proj.bias", &[h], Fill::Random);
    }
}

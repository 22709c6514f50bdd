//! Config parsing across architectures and spellings.

use std::path::Path;

use serde_json::{Value, json};

use super::model_spec_from_value;
use crate::spec::{AttentionSpec, FfnSpec, GroupScore, Scoring};
use crate::{ConfigError, ModelSpec};

fn parse(v: Value) -> Result<ModelSpec, ConfigError> {
    model_spec_from_value(Path::new("config.json"), &v)
}

fn qwen3(extra: Value) -> Value {
    let mut v = json!({"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 100, "hidden_size": 16,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "intermediate_size": 32, "moe_intermediate_size": 8, "num_experts": 4, "num_experts_per_tok": 2,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 64});
    v.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    v
}

#[test]
fn qwen3_sparse_step_and_mlp_only_layers_pick_dense_layers() {
    let spec = parse(qwen3(
        json!({"decoder_sparse_step": 2, "mlp_only_layers": [3]}),
    ))
    .unwrap();
    let kinds: Vec<bool> = spec
        .layers
        .iter()
        .map(|l| matches!(l.ffn, FfnSpec::Moe(_)))
        .collect();
    assert_eq!(kinds, vec![false, true, false, false]);
}

#[test]
fn num_local_experts_is_accepted_for_num_experts() {
    let mut v = qwen3(json!({}));
    let n = v.as_object_mut().unwrap().remove("num_experts").unwrap();
    v["num_local_experts"] = n;
    let spec = parse(v).unwrap();
    let FfnSpec::Moe(m) = &spec.layers[0].ffn else {
        panic!("dense")
    };
    assert_eq!(m.num_experts, 4);
}

#[test]
fn errors_name_the_field() {
    let err = parse(qwen3(json!({"num_experts_per_tok": 9}))).unwrap_err();
    assert!(err.to_string().contains("num_experts_per_tok"), "{err}");
    let err = parse(qwen3(json!({"num_key_value_heads": 3}))).unwrap_err();
    assert!(err.to_string().contains("num_key_value_heads"), "{err}");
    let mut v = qwen3(json!({}));
    v.as_object_mut().unwrap().remove("hidden_size");
    let err = parse(v).unwrap_err();
    assert!(err.to_string().contains("hidden_size"), "{err}");
    let err = parse(json!({"architectures": ["GPT2LMHeadModel"]})).unwrap_err();
    assert!(err.to_string().contains("GPT2LMHeadModel"), "{err}");
}

#[test]
fn deepseek_v3_routing_and_mla_scale() {
    let v = json!({"architectures": ["DeepseekV3ForCausalLM"], "vocab_size": 100, "hidden_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 64,
        "moe_intermediate_size": 16, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 4,
        "topk_group": 2, "routed_scaling_factor": 2.5, "n_shared_experts": 1, "first_k_dense_replace": 1,
        "q_lora_rank": null, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 12,
        "max_position_embeddings": 256, "rope_theta": 10000.0,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
            "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}});
    let spec = parse(v).unwrap();
    assert!(matches!(spec.layers[0].ffn, FfnSpec::Dense(_)));
    let FfnSpec::Moe(m) = &spec.layers[1].ffn else {
        panic!("dense")
    };
    assert_eq!(m.rule.scoring, Scoring::Sigmoid);
    assert_eq!(m.rule.groups, Some((4, 2, GroupScore::SumTop2)));
    assert_eq!(
        m.router_bias.as_deref(),
        Some("model.layers.1.mlp.gate.e_score_correction_bias")
    );
    assert_eq!(m.shared.as_ref().unwrap().mlp.intermediate_size, 16);
    let AttentionSpec::Mla(a) = &spec.layers[1].attention else {
        panic!("gqa")
    };
    let mscale = 0.1 * 4f64.ln() + 1.0;
    assert!((a.softmax_scale as f64 - 16f64.powf(-0.5) * mscale * mscale).abs() < 1e-6);
}

#[test]
fn absurd_sizes_fail_naming_the_field_instead_of_allocating_or_overflowing() {
    let ds = |extra: Value| {
        let mut v = serde_json::from_str::<Value>(include_str!(
            "../../../tests/fixtures/deepseek_v3/config.json"
        ))
        .unwrap();
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        v
    };
    let cases = [
        (
            qwen3(json!({"num_hidden_layers": 1u64 << 40})),
            "num_hidden_layers",
        ),
        (qwen3(json!({"num_experts": 1u64 << 40})), "num_experts"),
        (
            ds(json!({"n_shared_experts": u64::MAX, "moe_intermediate_size": 3})),
            "n_shared_experts",
        ),
        (
            ds(json!({"n_group": 1, "topk_group": 1, "n_routed_experts": 8,
                      "num_experts_per_tok": usize::MAX})),
            "num_experts_per_tok",
        ),
    ];
    for (config, field) in cases {
        let err = parse(config).expect_err(field).to_string();
        assert!(err.contains(field), "{field}: {err}");
    }
    // No panic on dims whose sum overflows (the softmax scale is computed in f64).
    let _ = parse(ds(
        json!({"qk_nope_head_dim": u64::MAX, "qk_rope_head_dim": 64}),
    ));
}

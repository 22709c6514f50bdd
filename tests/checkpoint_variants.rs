//! Checkpoints the fixtures do not ship as such: the same weights stored as f16, and a config that
//! disagrees with its weights. transformers' references still decide what is right.

mod common;

use std::path::Path;

use half::f16;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use tessera_common::{ShardSpec, load_model_spec};
use tessera_kernels::cpu::CpuBackend;
use tessera_worker::checkpoint::Checkpoint;
use tessera_worker::engine::{Engine, EngineConfig};
use tessera_worker::model::Model;

/// Copies a fixture's JSON files into a temp folder.
fn copy_configs(from: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for name in ["config.json", "generation_config.json"] {
        std::fs::copy(from.join(name), dir.path().join(name)).unwrap();
    }
    dir
}

#[test]
fn an_f16_copy_of_a_checkpoint_matches_transformers() {
    let src = common::fixtures_dir().join("llama");
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let converted: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), Dtype::F32, "{name}");
            let halves: Vec<u8> = view
                .data()
                .chunks_exact(4)
                .flat_map(|c| {
                    f16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_le_bytes()
                })
                .collect();
            (name, view.shape().to_vec(), halves)
        })
        .collect();
    let views: Vec<(&str, TensorView<'_>)> = converted
        .iter()
        .map(|(n, s, d)| {
            (
                n.as_str(),
                TensorView::new(Dtype::F16, s.clone(), d).unwrap(),
            )
        })
        .collect();
    let dir = copy_configs(&src);
    std::fs::write(
        dir.path().join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();

    let spec = load_model_spec(dir.path()).unwrap();
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let model = Model::load(CpuBackend, spec, &ckpt, &ShardSpec::whole()).unwrap();
    let mut engine = Engine::new(model, EngineConfig::default()).unwrap();
    let reference = common::reference(&src);
    for case in &reference.cases {
        let req = common::greedy_request(case);
        let out = engine.generate(&req, |_| {}).unwrap();
        assert_eq!(out.token_ids, case.greedy_ids);
        for (a, b) in out.logprobs.iter().zip(&case.greedy_logprobs) {
            assert!((a - b).abs() <= common::tolerance("float16"), "{a} vs {b}");
        }
    }
}

#[test]
fn a_config_that_disagrees_with_the_weights_names_the_tensor() {
    let src = common::fixtures_dir().join("qwen3_moe");
    let dir = copy_configs(&src);
    std::fs::copy(
        src.join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let path = dir.path().join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["moe_intermediate_size"] = serde_json::json!(24);
    std::fs::write(&path, config.to_string()).unwrap();

    let spec = load_model_spec(dir.path()).unwrap();
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let err = Model::load(CpuBackend, spec, &ckpt, &ShardSpec::whole())
        .err()
        .expect("shape mismatch");
    let msg = err.to_string();
    assert!(
        msg.contains("experts.0.gate_proj.weight") && msg.contains("24"),
        "{msg}"
    );
}

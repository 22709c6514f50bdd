//! Every fixture, through the library: Tessera's greedy tokens and log-probabilities must match
//! Hugging Face transformers' (recorded in each fixture's `reference.json`).

mod common;

use tessera_common::{GenerationConfig, ShardSpec, load_model_spec};
use tessera_kernels::cpu::CpuBackend;
use tessera_worker::checkpoint::Checkpoint;
use tessera_worker::engine::{Engine, EngineConfig, GenerateRequest};
use tessera_worker::executor::Executor;
use tessera_worker::layers::{MlaPolicy, MlaPrefill};
use tessera_worker::model::Model;

fn model(dir: &std::path::Path) -> Model<CpuBackend> {
    let spec = load_model_spec(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let ckpt = Checkpoint::open(dir).unwrap();
    Model::load(CpuBackend, spec, &ckpt, &ShardSpec::whole())
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

fn engine(dir: &std::path::Path) -> Engine<Executor<CpuBackend>> {
    Engine::new(model(dir), EngineConfig::default()).unwrap()
}

#[test]
fn greedy_tokens_and_logprobs_match_transformers() {
    let fixtures = common::fixtures();
    assert!(
        fixtures.len() >= 9,
        "expected the generated fixtures, found {}",
        fixtures.len()
    );
    let failures = mismatches(&fixtures, MlaPolicy::default(), EngineConfig::default());
    assert!(
        failures.is_empty(),
        "mismatches against transformers:\n{}",
        failures.join("\n")
    );
}

/// MLA attends in the absorbed form (queries projected into the latent space) or the expanded
/// one (context rows expanded into per-head keys and values); by default a fresh prompt expands
/// and decode stays absorbed. Forced, each form runs every step, decode over cached prefixes
/// included, and each must match transformers alone.
#[test]
fn each_mla_form_alone_matches_transformers() {
    let mla: Vec<_> = common::fixtures()
        .into_iter()
        .filter(|(_, dir)| {
            let spec = load_model_spec(dir).unwrap();
            spec.layers
                .iter()
                .any(|l| matches!(l.attention, tessera_common::AttentionSpec::Mla(_)))
        })
        .collect();
    assert!(
        mla.len() >= 3,
        "expected the MLA fixtures, found {}",
        mla.len()
    );
    // The third policy expands every head at once only within 8 context rows: longer contexts
    // (the fixtures' prompts, and decode over them) expand 3, 2 or 1 of their 4 heads per pass.
    // The last fits not even one head over a whole context: every context is cut into chunks
    // of one block (4 positions here, so up to 5 chunks), each attended one head at a time and
    // merged into the others by its log-sum-exp.
    let absorbed = MlaPolicy {
        prefill: MlaPrefill::Absorbed,
        ..MlaPolicy::default()
    };
    let expanded = MlaPolicy {
        prefill: MlaPrefill::Expanded,
        ..absorbed
    };
    let in_passes = MlaPolicy {
        max_context_rows: 8,
        ..expanded
    };
    let in_chunks = MlaPolicy {
        max_context_rows: 1,
        ..expanded
    };
    let blocks_of_4 = EngineConfig {
        block_size: 4,
        ..EngineConfig::default()
    };
    let runs = [
        (absorbed, EngineConfig::default()),
        (expanded, EngineConfig::default()),
        (in_passes, EngineConfig::default()),
        (in_chunks, blocks_of_4),
    ];
    for (policy, config) in runs {
        let failures = mismatches(&mla, policy, config);
        assert!(
            failures.is_empty(),
            "{policy:?} MLA against transformers:\n{}",
            failures.join("\n")
        );
    }
}

/// Every case of every fixture through an engine whose MLA layers follow `policy`: what differs
/// from transformers' greedy tokens, log-probabilities and top alternatives.
fn mismatches(
    fixtures: &[(String, std::path::PathBuf)],
    policy: MlaPolicy,
    config: EngineConfig,
) -> Vec<String> {
    let mut failures = Vec::new();
    for (name, dir) in fixtures {
        let reference = common::reference(dir);
        let tol = common::tolerance(&reference.dtype);
        let mut m = model(dir);
        m.set_mla_policy(policy);
        let mut engine = Engine::new(m, config).unwrap();
        assert_eq!(engine.spec().architecture, reference.architecture, "{name}");
        for (ci, case) in reference.cases.iter().enumerate() {
            let req = GenerateRequest {
                top_logprobs: 5,
                prompt_logprobs: true,
                ..common::greedy_request(case)
            };
            let out = engine.generate(&req, |_| {}).unwrap();
            if out.token_ids != case.greedy_ids {
                failures.push(format!(
                    "{name} case {ci}: tokens {:?} != {:?}",
                    out.token_ids, case.greedy_ids
                ));
                continue;
            }
            let worst = out
                .logprobs
                .iter()
                .zip(&case.greedy_logprobs)
                .chain(
                    out.prompt_logprobs
                        .iter()
                        .zip(&case.prompt_logprobs)
                        .filter_map(|(a, b)| Some((a.as_ref()?, b.as_ref()?))),
                )
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            if worst > tol {
                failures.push(format!(
                    "{name} case {ci}: max |Δ logprob| {worst:.2e} > {tol:.0e}"
                ));
            }
            let top_ids: Vec<Vec<u32>> = out
                .top_logprobs
                .iter()
                .map(|t| t.iter().map(|x| x.0).collect())
                .collect();
            let want_ids: Vec<Vec<u32>> = case
                .top5
                .iter()
                .map(|t| t.iter().map(|x| x.0).collect())
                .collect();
            if top_ids.iter().zip(&want_ids).any(|(a, b)| a[0] != b[0]) {
                failures.push(format!("{name} case {ci}: top-1 alternatives differ"));
            }
        }
    }
    failures
}

#[test]
fn generation_stops_at_eos_like_transformers() {
    let mut checked = 0;
    for (name, dir) in common::fixtures() {
        let reference = common::reference(&dir);
        let eos = GenerationConfig::load(&dir).unwrap().eos_token_ids();
        let mut engine = engine(&dir);
        for case in reference
            .cases
            .iter()
            .filter(|c| c.greedy_until_eos != c.greedy_ids)
        {
            let req = GenerateRequest {
                stop_token_ids: eos.clone(),
                ..common::greedy_request(case)
            };
            let out = engine.generate(&req, |_| {}).unwrap();
            assert_eq!(out.token_ids, case.greedy_until_eos, "{name}");
            assert_eq!(out.finish_reason.as_str(), "stop", "{name}");
            checked += 1;
        }
    }
    assert!(checked > 0, "no fixture exercises eos stopping");
}

/// DeepSeek's latent attention caches one `[latent | rotary key]` row per position, read as one
/// KV head whose values are the latent, instead of every head's expanded key and value, whichever
/// form attends over it.
#[test]
fn mla_caches_hold_only_the_latent_row() {
    use tessera_common::AttentionSpec;
    use tessera_kernels::{KvSpec, KvValues};
    let mut checked = 0;
    for (name, dir) in common::fixtures() {
        let model = model(&dir);
        for (spec, layer) in model.kv_specs(4, 16).iter().zip(&model.spec().layers) {
            let AttentionSpec::Mla(m) = &layer.attention else {
                assert_eq!(spec.values, KvValues::Separate, "{name}");
                continue;
            };
            let latent = KvSpec {
                num_blocks: 4,
                block_size: 16,
                num_kv_heads: 1,
                k_dim: m.kv_lora_rank + m.qk_rope_head_dim,
                v_dim: m.kv_lora_rank,
                values: KvValues::KeyPrefix,
            };
            assert_eq!(*spec, latent, "{name}");
            // What transformers' cache holds per position: every head's key and value.
            let expanded = m.num_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim);
            assert!(
                latent.bytes(2).unwrap() * 3
                    < KvSpec {
                        k_dim: expanded,
                        v_dim: 0,
                        ..latent
                    }
                    .bytes(2)
                    .unwrap(),
                "{name}: the latent row should be far smaller than {expanded} values"
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 3,
        "expected the MLA fixtures' layers, checked {checked}"
    );
}

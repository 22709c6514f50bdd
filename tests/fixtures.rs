//! Every fixture, through the library: Tessera's greedy tokens and log-probabilities must match
//! Hugging Face transformers' (recorded in each fixture's `reference.json`).

mod common;

use tessera_common::{GenerationConfig, ShardSpec, load_model_spec};
use tessera_kernels::cpu::CpuBackend;
use tessera_worker::checkpoint::Checkpoint;
use tessera_worker::engine::{Engine, EngineConfig, GenerateRequest};
use tessera_worker::executor::Executor;
use tessera_worker::model::Model;

fn engine(dir: &std::path::Path) -> Engine<Executor<CpuBackend>> {
    let spec = load_model_spec(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let ckpt = Checkpoint::open(dir).unwrap();
    let model = Model::load(CpuBackend, spec, &ckpt, &ShardSpec::whole())
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    Engine::new(model, EngineConfig::default()).unwrap()
}

#[test]
fn greedy_tokens_and_logprobs_match_transformers() {
    let fixtures = common::fixtures();
    assert!(
        fixtures.len() >= 9,
        "expected the generated fixtures, found {}",
        fixtures.len()
    );
    let mut failures = Vec::new();
    for (name, dir) in &fixtures {
        let reference = common::reference(dir);
        let tol = common::tolerance(&reference.dtype);
        let mut engine = engine(dir);
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
    assert!(
        failures.is_empty(),
        "mismatches against transformers:\n{}",
        failures.join("\n")
    );
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

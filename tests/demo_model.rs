//! The embedded demo model, `models/tessera-demo` (a small trained Qwen3-MoE; see its
//! MODEL_CARD.md and tools/train_demo_model/), against transformers' references in its
//! `reference.json`: greedy tokens, log-probabilities, tokenizer and eos handling, through the
//! library and through `tessera generate --tp 2`.
//!
//! Unlike the random fixtures, a trained model's greedy steps are not all far from a tie, so each
//! case is compared only up to the first step where Tessera picks another token, and that is
//! only allowed where transformers' top-1/top-2 margin is below `TIE_MARGIN`.

mod common;

use std::path::PathBuf;
use std::process::Command;

use serde::Deserialize;
use serde_json::Value;
use tessera_common::{GenerationConfig, ShardSpec, load_model_spec};
use tessera_coordinator::tokenizer::Tokenizer;
use tessera_kernels::cpu::CpuBackend;
use tessera_worker::checkpoint::Checkpoint;
use tessera_worker::engine::{Engine, EngineConfig, GenerateRequest};
use tessera_worker::executor::Executor;
use tessera_worker::model::Model;

/// A greedy step whose top-1/top-2 log-prob gap is below this may legitimately go the other way.
const TIE_MARGIN: f32 = 1e-2;
/// |Δ logprob| allowed against transformers. Both sides compute in float32 from the same bf16
/// weights (transformers upcasts them), so this is the fixtures' float32 tolerance, not their
/// looser bf16 one.
const TOLERANCE: f32 = 1e-3;
/// Every case must agree with transformers for at least this many greedy tokens.
const MIN_AGREED: usize = 8;
/// The demo model ships in the repository; keep it small.
const MAX_WEIGHT_BYTES: u64 = 20_000_000;

fn demo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/tessera-demo")
}

/// Fields of the demo's reference.json beyond the fixture format.
#[derive(Deserialize)]
struct Extras {
    stop_token_ids: Vec<u32>,
}

fn engine() -> Engine<Executor<CpuBackend>> {
    let dir = demo_dir();
    let spec = load_model_spec(&dir).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let model = Model::load(CpuBackend, spec, &ckpt, &ShardSpec::whole()).unwrap();
    Engine::new(model, EngineConfig::default()).unwrap()
}

fn margin(case: &common::Case, step: usize) -> f32 {
    case.top5[step][0].1 - case.top5[step][1].1
}

/// How many leading tokens of `got` equal `want`; panics if they part where transformers'
/// choice was not close to a tie.
fn agreed_prefix(name: &str, case: &common::Case, got: &[u32], want: &[u32]) -> usize {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if g != w {
            let m = margin(case, i);
            assert!(
                m < TIE_MARGIN,
                "{name}: step {i}: token {g} != transformers' {w} with margin {m:.4} \
                 (got {got:?}, want {want:?})"
            );
            return i;
        }
    }
    assert_eq!(got.len(), want.len(), "{name}: lengths differ");
    got.len()
}

#[test]
fn demo_model_is_small_and_well_formed() {
    let dir = demo_dir();
    let bytes = std::fs::metadata(dir.join("model.safetensors"))
        .expect("models/tessera-demo/model.safetensors")
        .len();
    assert!(bytes <= MAX_WEIGHT_BYTES, "{bytes} bytes of weights");
    let reference = common::reference(&dir);
    let spec = load_model_spec(&dir).unwrap();
    assert_eq!(spec.architecture, reference.architecture);
    assert_eq!(reference.dtype, "bfloat16");
    // Stops at the end of a fortune (<|endoftext|>) and at the end of a chat turn (<|im_end|>).
    let extras: Extras =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let eos = GenerationConfig::load(&dir).unwrap().eos_token_ids();
    assert_eq!(eos, extras.stop_token_ids);
    assert_eq!(reference.eos_token_id, Some(0));
    let tok_config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap())
            .unwrap();
    let template = tok_config["chat_template"]
        .as_str()
        .expect("a chat template");
    assert!(template.contains("<|im_start|>") && template.contains("<|im_end|>"));
}

#[test]
fn tokenizer_matches_transformers() {
    let dir = demo_dir();
    let tokenizer = Tokenizer::load(&dir).unwrap().expect("tokenizer.json");
    for case in common::reference(&dir).cases {
        let text = case.prompt_text.as_deref().expect("text cases only");
        assert_eq!(
            tokenizer.encode(text, true).unwrap(),
            case.prompt_ids,
            "{text:?}"
        );
        assert_eq!(tokenizer.decode(&case.prompt_ids, false).unwrap(), text);
        assert_eq!(
            tokenizer.decode(&case.greedy_ids, true).unwrap(),
            case.greedy_text.clone().unwrap(),
            "{text:?}"
        );
    }
}

#[test]
fn greedy_tokens_and_logprobs_match_transformers() {
    let dir = demo_dir();
    let reference = common::reference(&dir);
    let tol = TOLERANCE;
    let eos = GenerationConfig::load(&dir).unwrap().eos_token_ids();
    let mut engine = engine();
    for case in &reference.cases {
        let name = case.prompt_text.as_deref().unwrap();
        let req = GenerateRequest {
            top_logprobs: 5,
            prompt_logprobs: true,
            ..common::greedy_request(case)
        };
        let out = engine.generate(&req, |_| {}).unwrap();
        let n = agreed_prefix(name, case, &out.token_ids, &case.greedy_ids);
        assert!(n >= MIN_AGREED, "{name}: only {n} tokens agree");
        let mut worst = 0f32;
        for (i, (a, b)) in out
            .logprobs
            .iter()
            .zip(&case.greedy_logprobs)
            .enumerate()
            .take(n)
        {
            assert!((a - b).abs() <= tol, "{name}: step {i}: logprob {a} vs {b}");
            worst = worst.max((a - b).abs());
        }
        for (i, (a, b)) in out
            .prompt_logprobs
            .iter()
            .zip(&case.prompt_logprobs)
            .enumerate()
        {
            match (a, b) {
                (Some(a), Some(b)) => {
                    assert!((a - b).abs() <= tol, "{name}: prompt {i}: {a} vs {b}");
                    worst = worst.max((a - b).abs());
                }
                (None, None) => {}
                _ => panic!("{name}: prompt logprob {i}: {a:?} vs {b:?}"),
            }
        }
        eprintln!(
            "{name:?}: {n}/{} greedy tokens agree, max |Δ logprob| {worst:.1e}",
            case.greedy_ids.len()
        );
        for (i, (got, want)) in out.top_logprobs.iter().zip(&case.top5).enumerate().take(n) {
            if margin(case, i) >= TIE_MARGIN {
                assert_eq!(got[0].0, want[0].0, "{name}: step {i}: best alternative");
            }
        }

        // With the model's stop tokens, generation ends where transformers' did.
        let stopped = engine
            .generate(
                &GenerateRequest {
                    stop_token_ids: eos.clone(),
                    ..common::greedy_request(case)
                },
                |_| {},
            )
            .unwrap();
        let n = agreed_prefix(name, case, &stopped.token_ids, &case.greedy_until_eos);
        if n == case.greedy_until_eos.len() && n < case.greedy_ids.len() {
            assert_eq!(stopped.finish_reason.as_str(), "stop", "{name}");
        }
    }
}

#[test]
fn cli_generate_with_tp2_matches_transformers() {
    const MAX_TOKENS: usize = 16;
    let dir = demo_dir();
    let reference = common::reference(&dir);
    for case in &reference.cases {
        let prompt = case.prompt_text.as_deref().unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args([
                "generate",
                "--model",
                dir.to_str().unwrap(),
                "--prompt",
                prompt,
            ])
            .args([
                "--temperature",
                "0",
                "--max-tokens",
                &MAX_TOKENS.to_string(),
            ])
            .args(["--json", "--tp", "2"])
            .output()
            .expect("tessera runs");
        assert!(
            out.status.success(),
            "tessera generate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
        let got: Vec<u32> = serde_json::from_value(v["token_ids"].clone()).unwrap();
        // The CLI stops at the model's eos tokens, like transformers' eos-aware run.
        let want = &case.greedy_until_eos[..case.greedy_until_eos.len().min(MAX_TOKENS)];
        let n = agreed_prefix(prompt, case, &got, want);
        assert!(
            n >= MIN_AGREED.min(want.len()),
            "{prompt:?}: only {n} tokens agree"
        );
        if n == want.len() {
            let tokenizer = Tokenizer::load(&dir).unwrap().unwrap();
            assert_eq!(
                v["text"].as_str().unwrap(),
                tokenizer.decode(want, true).unwrap(),
                "{prompt:?}"
            );
        }
    }
}

/// The quickstart: no `--model`, no `--prompt`, an embedded 2-worker cluster, from any directory.
#[test]
fn the_quickstart_defaults_run_the_demo_model_on_two_workers() {
    let anywhere = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
        .current_dir(anywhere.path())
        .env_remove("TESSERA_MODEL")
        .args([
            "generate",
            "--tp",
            "2",
            "--temperature",
            "0",
            "--max-tokens",
            "8",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // transformers' greedy continuation of "A fool and his money" (see MODEL_CARD.md).
    assert!(
        v["text"].as_str().unwrap().starts_with(" is a good thing."),
        "{v}"
    );
}

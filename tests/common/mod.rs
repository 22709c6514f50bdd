//! Helpers shared by the integration tests: fixture discovery and reference files written by
//! `tests/fixtures/gen_fixtures.py` (Hugging Face transformers is the referee).

#![allow(dead_code)]

pub mod server;
pub mod staggered;

use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
pub struct Reference {
    pub architecture: String,
    pub dtype: String,
    pub eos_token_id: Option<u32>,
    pub cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
pub struct Case {
    pub prompt_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
    pub greedy_logprobs: Vec<f32>,
    pub prompt_logprobs: Vec<Option<f32>>,
    pub top5: Vec<Vec<(u32, f32)>>,
    pub min_margin: f32,
    pub greedy_until_eos: Vec<u32>,
    pub prompt_text: Option<String>,
    pub greedy_text: Option<String>,
}

pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Every fixture directory (those holding a `reference.json`), sorted.
pub fn fixtures() -> Vec<(String, PathBuf)> {
    let mut out: Vec<_> = std::fs::read_dir(fixtures_dir())
        .expect("tests/fixtures exists")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.join("reference.json").exists())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), p))
        .collect();
    out.sort();
    out
}

pub fn reference(dir: &std::path::Path) -> Reference {
    let text = std::fs::read_to_string(dir.join("reference.json")).expect("reference.json");
    serde_json::from_str(&text).expect("reference.json parses")
}

/// Greedy generation of `case`'s prompt for as many tokens as transformers produced, nothing
/// extra reported and no stop tokens; tests override fields with struct-update syntax.
pub fn greedy_request(case: &Case) -> tessera_worker::engine::GenerateRequest {
    tessera_worker::engine::GenerateRequest {
        prompt: case.prompt_ids.clone(),
        max_tokens: case.greedy_ids.len(),
        sampling: tessera_worker::sampling::SamplingParams::greedy(),
        top_logprobs: 0,
        prompt_logprobs: false,
        stop_token_ids: vec![],
    }
}

/// |Δ logprob| allowed against transformers for a checkpoint's stored dtype.
pub fn tolerance(dtype: &str) -> f32 {
    if dtype == "float32" { 1e-3 } else { 5e-2 }
}

/// A greedy gRPC `Generate` request for the prompt `ids` and exactly `n` tokens (eos ignored).
pub fn greedy_grpc_request(ids: &[u32], n: u32) -> tessera_proto::v1::GenerateRequest {
    use tessera_proto::v1 as pb;
    pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds {
            ids: ids.to_vec(),
        })),
        max_tokens: Some(n),
        sampling: Some(pb::SamplingParams {
            temperature: Some(0.0),
            ..Default::default()
        }),
        ignore_eos: true,
        ..Default::default()
    }
}

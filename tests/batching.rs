//! Continuous batching at the executor: sequences that join at different steps, with prompts
//! prefilled in two chunks while others decode in the same step, must produce exactly what each
//! produces alone — and what transformers produces.

mod common;

use common::staggered::Order;
use tessera_common::{ShardSpec, load_model_spec};
use tessera_kernels::cpu::CpuBackend;
use tessera_worker::checkpoint::Checkpoint;
use tessera_worker::executor::{Executor, SeqStep};
use tessera_worker::layers::{MlaPolicy, MlaPrefill};
use tessera_worker::model::Model;
use tessera_worker::sampling::SamplingParams;

#[test]
fn staggered_chunked_batches_match_transformers() {
    for name in ["qwen3_moe", "deepseek_v3", "mixtral"] {
        staggered(name, Order::Arrival);
    }
}

/// MLA attends a step's decodes absorbed and its prompt chunks expanded, moving the decodes to
/// the front for that: a batch listing the chunks first must come out the same.
#[test]
fn batches_listing_prompt_chunks_before_decodes_match_transformers() {
    for name in ["deepseek_v3", "kimi_k2_style"] {
        staggered(name, Order::NewestFirst);
    }
}

/// Every MLA step expanded within the memory of 4 context rows: a step's several sequences, of
/// different lengths, are cut into chunks of one 4-position block that each sequence reaches or
/// not, attended a head at a time, and the chunks merged by their log-sum-exps.
#[test]
fn batches_expanded_in_chunks_match_transformers() {
    let policy = MlaPolicy {
        prefill: MlaPrefill::Expanded,
        max_context_rows: 4,
    };
    for name in ["deepseek_v3", "kimi_k2_style"] {
        staggered_with(name, Order::Arrival, Some(policy));
    }
}

/// The cases of fixture `name` staggered through a CPU executor ([`common::staggered`]).
fn staggered(name: &str, order: Order) {
    staggered_with(name, order, None);
}

/// [`staggered`], the MLA layers following `policy` if given.
fn staggered_with(name: &str, order: Order, policy: Option<MlaPolicy>) {
    let dir = common::fixtures_dir().join(name);
    let reference = common::reference(&dir);
    let mut model = Model::load(
        CpuBackend,
        load_model_spec(&dir).unwrap(),
        &Checkpoint::open(&dir).unwrap(),
        &ShardSpec::whole(),
    )
    .unwrap();
    if let Some(policy) = policy {
        model.set_mla_policy(policy);
    }
    let mut exec = Executor::new(model, 64, 4).unwrap();
    let tol = common::tolerance(&reference.dtype);
    common::staggered::run(&mut exec, &reference, (name, order, Some(tol)));
}

/// A token id past the vocabulary is refused before any work, naming the id, and the executor
/// goes on serving.
#[test]
fn a_token_outside_the_vocabulary_is_refused_and_loses_nothing() {
    let dir = common::fixtures_dir().join("qwen3_moe");
    let spec = load_model_spec(&dir).unwrap();
    let vocab = spec.vocab_size as u32;
    let model = Model::load(
        CpuBackend,
        spec,
        &Checkpoint::open(&dir).unwrap(),
        &ShardSpec::whole(),
    )
    .unwrap();
    let mut exec = Executor::new(model, 8, 4).unwrap();
    let step = |tokens: Vec<u32>| SeqStep {
        seq_id: 1,
        context_len: tokens.len(),
        tokens,
        block_table: vec![0, 1],
        sampling: SamplingParams::greedy(),
        top_logprobs: 0,
        prompt_logprobs: false,
        sample: true,
        prompt_len: 3,
    };
    let err = exec.step(&[step(vec![1, vocab, 2])]).unwrap_err();
    assert!(
        err.to_string().contains(&format!(
            "token id {vocab} outside the vocabulary of {vocab}"
        )),
        "{err}"
    );
    let ok = exec.step(&[step(vec![1, 5, 2])]).unwrap();
    assert!(ok.results[0].token.is_some());
}

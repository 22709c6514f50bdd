//! Continuous batching at the executor: sequences that join at different steps, with prompts
//! prefilled in two chunks while others decode in the same step, must produce exactly what each
//! produces alone — and what transformers produces.

mod common;

use tessera_common::{ShardSpec, load_model_spec};
use tessera_kernels::cpu::CpuBackend;
use tessera_worker::checkpoint::Checkpoint;
use tessera_worker::executor::{Executor, SeqStep};
use tessera_worker::kv_cache::BlockAllocator;
use tessera_worker::model::Model;
use tessera_worker::sampling::SamplingParams;

struct Live {
    prompt: Vec<u32>,
    /// Prompt tokens already prefilled.
    done: usize,
    blocks: Vec<u32>,
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    prompt_logprobs: Vec<Option<f32>>,
    max: usize,
}

#[test]
fn staggered_chunked_batches_match_transformers() {
    for name in ["qwen3_moe", "deepseek_v3", "mixtral"] {
        let dir = common::fixtures_dir().join(name);
        let reference = common::reference(&dir);
        let model = Model::load(
            CpuBackend,
            load_model_spec(&dir).unwrap(),
            &Checkpoint::open(&dir).unwrap(),
            &ShardSpec::whole(),
        )
        .unwrap();
        let (num_blocks, block_size) = (64, 4);
        let mut exec = Executor::new(model, num_blocks, block_size).unwrap();
        let mut alloc = BlockAllocator::new(num_blocks, block_size);
        let mut live: Vec<Live> = reference
            .cases
            .iter()
            .map(|c| Live {
                prompt: c.prompt_ids.clone(),
                done: 0,
                blocks: alloc
                    .allocate(alloc.blocks_for(c.prompt_ids.len() + c.greedy_ids.len()))
                    .unwrap(),
                tokens: vec![],
                logprobs: vec![],
                prompt_logprobs: vec![],
                max: c.greedy_ids.len(),
            })
            .collect();
        for step_no in 0.. {
            let mut batch = Vec::new();
            for (i, s) in live.iter().enumerate() {
                // Sequence i joins at step i; its prompt goes in two chunks.
                if step_no < i || s.tokens.len() >= s.max {
                    continue;
                }
                let (tokens, context_len, sample) = if s.done < s.prompt.len() {
                    let end = if s.done == 0 {
                        s.prompt.len() / 2
                    } else {
                        s.prompt.len()
                    };
                    (s.prompt[s.done..end].to_vec(), end, end == s.prompt.len())
                } else {
                    (
                        vec![*s.tokens.last().unwrap()],
                        s.prompt.len() + s.tokens.len(),
                        true,
                    )
                };
                batch.push(SeqStep {
                    seq_id: i as u64,
                    prompt_logprobs: s.done < s.prompt.len(),
                    tokens,
                    context_len,
                    block_table: s.blocks.clone(),
                    sampling: SamplingParams::greedy(),
                    top_logprobs: 0,
                    sample,
                    prompt_len: s.prompt.len(),
                });
            }
            if batch.is_empty() {
                break;
            }
            let result = exec.step(&batch).unwrap();
            for (st, r) in batch.iter().zip(result.results) {
                let s = &mut live[st.seq_id as usize];
                if s.done < s.prompt.len() {
                    s.done = st.context_len;
                    s.prompt_logprobs.extend(r.prompt_logprobs);
                }
                if let Some(t) = r.token {
                    s.tokens.push(t);
                    s.logprobs.push(r.logprob);
                }
            }
        }
        for (s, case) in live.iter().zip(&reference.cases) {
            assert_eq!(s.tokens, case.greedy_ids, "{name}");
            let tol = common::tolerance(&reference.dtype);
            for (a, b) in s.logprobs.iter().zip(&case.greedy_logprobs) {
                assert!((a - b).abs() <= tol, "{name}: {a} vs {b}");
            }
            assert_eq!(
                s.prompt_logprobs.len(),
                case.prompt_logprobs.len(),
                "{name}"
            );
            assert!(s.prompt_logprobs[0].is_none(), "{name}");
            for (a, b) in s.prompt_logprobs.iter().zip(&case.prompt_logprobs).skip(1) {
                let (a, b) = (
                    a.expect("prompt logprob across the chunk boundary"),
                    b.unwrap(),
                );
                assert!((a - b).abs() <= tol, "{name}: prompt {a} vs {b}");
            }
        }
    }
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

//! Continuous batching at a step runner: the cases of a fixture joining one step apart, each
//! prompt prefilled in two chunks beside the others' decodes, checked against transformers.

use tessera_worker::executor::{SeqStep, StepRunner};
use tessera_worker::kv_cache::BlockAllocator;
use tessera_worker::sampling::SamplingParams;

use super::Reference;

/// The order of the sequences in each step's batch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Order {
    /// The order they joined in: decodes, then prompt chunks.
    Arrival,
    /// The reverse: prompt chunks, then decodes.
    NewestFirst,
}

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

/// Case `i` of `reference` joins at step `i`, its prompt in two chunks; every sequence must give
/// transformers' greedy tokens, and with `tol` its log-probabilities (greedy and prompt) within
/// it. `name` labels failures.
pub fn run(
    runner: &mut dyn StepRunner,
    reference: &Reference,
    (name, order, tol): (&str, Order, Option<f32>),
) {
    let mut alloc = BlockAllocator::new(runner.num_blocks(), runner.block_size());
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
        if order == Order::NewestFirst {
            batch.reverse();
        }
        let result = runner
            .step(&batch)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
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
        let Some(tol) = tol else { continue };
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
